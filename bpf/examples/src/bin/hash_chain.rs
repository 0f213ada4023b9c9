//! Hash-chain walk (`exofs_abi::formats::hash`): hop 0 reads the header and hashes the key
//! to its bucket, hop 1 reads the bucket's slot, each later hop one entry of the chain.
#![no_std]
#![no_main]

use exofs_abi::chain::{HopState, NEXT_ABORT};
use exofs_abi::formats::hash::{bucket_of, slot_offset, END, MAGIC};
use exofs_examples::{answer, data_u64, follow_entry, go_to, lookup_key};

#[no_mangle]
pub extern "C" fn next(state: *mut HopState) -> i32 {
    // SAFETY: the driver calls `next` with its live hop state.
    let state = unsafe { &mut *state };
    walk(state).unwrap_or(NEXT_ABORT)
}

fn walk(state: &mut HopState) -> Option<i32> {
    if state.hop == 0 {
        let (magic, buckets) = (data_u64(state, 0)?, data_u64(state, 8)?);
        if magic != MAGIC || buckets == 0 {
            return None;
        }
        return Some(go_to(
            state,
            slot_offset(bucket_of(lookup_key(state), buckets)),
        ));
    }
    if state.hop == 1 {
        let head = data_u64(state, 0)?;
        return Some(if head == END {
            answer(state, None)
        } else {
            go_to(state, head)
        });
    }
    follow_entry(state, END)
}
