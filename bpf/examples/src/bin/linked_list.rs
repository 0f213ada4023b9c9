//! Linked-list walk (`exofs_abi::formats::list`): each hop reads one node.
#![no_std]
#![no_main]

use exofs_abi::chain::{HopState, NEXT_ABORT};
use exofs_abi::formats::list::END;
use exofs_examples::{answer, data_u64, go_to, lookup_key};

#[no_mangle]
pub extern "C" fn next(state: *mut HopState) -> i32 {
    // SAFETY: the driver calls `next` with its live hop state.
    let state = unsafe { &mut *state };
    walk(state).unwrap_or(NEXT_ABORT)
}

fn walk(state: &mut HopState) -> Option<i32> {
    let (next, key, value) = (
        data_u64(state, 0)?,
        data_u64(state, 8)?,
        data_u64(state, 16)?,
    );
    if key == lookup_key(state) {
        return Some(answer(state, Some(value)));
    }
    Some(if next == END {
        answer(state, None)
    } else {
        go_to(state, next)
    })
}
