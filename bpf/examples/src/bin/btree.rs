//! B-tree search over fixed-layout nodes of 512 B or 4 KiB (`exofs_abi::formats::btree`):
//! a binary search in each node, then down to the child or the answer.
#![no_std]
#![no_main]

use exofs_abi::chain::{HopState, NEXT_ABORT};
use exofs_abi::formats::btree::{capacity, ENTRY_SIZE, HEADER_SIZE, MAGIC};
use exofs_examples::{answer, data_u64, go_to, lookup_key};

/// Steps of the binary search: enough for the 255 entries of a 4 KiB node.
const SEARCH_STEPS: usize = 9;

#[no_mangle]
pub extern "C" fn next(state: *mut HopState) -> i32 {
    // SAFETY: the driver calls `next` with its live hop state.
    let state = unsafe { &mut *state };
    search(state).unwrap_or(NEXT_ABORT)
}

fn search(state: &mut HopState) -> Option<i32> {
    let key = lookup_key(state);
    let header = data_u64(state, 0)?;
    let (magic, level, count) = (
        header as u32,
        (header >> 32) as u16,
        (header >> 48) as usize,
    );
    let node_size = data_u64(state, 8)? as u32 as usize;
    if magic != MAGIC || node_size > state.data_len as usize || count > capacity(node_size) {
        return None;
    }
    // Largest entry whose key is <= the key: entries[..low] are <= key, [high..] are >.
    let (mut low, mut high) = (0usize, count);
    for _ in 0..SEARCH_STEPS {
        if low >= high {
            break;
        }
        let middle = (low + high) / 2;
        if data_u64(state, HEADER_SIZE + middle * ENTRY_SIZE)? <= key {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    if low == 0 {
        return Some(answer(state, None));
    }
    let at = HEADER_SIZE + (low - 1) * ENTRY_SIZE;
    let (entry_key, value) = (data_u64(state, at)?, data_u64(state, at + 8)?);
    if level == 0 {
        let found = (entry_key == key).then_some(value);
        return Some(answer(state, found));
    }
    Some(go_to(state, value))
}
