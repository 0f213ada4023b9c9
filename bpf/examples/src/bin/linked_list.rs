//! Linked-list walk (`exofs_abi::formats::list`): each hop reads one node.
#![no_std]
#![no_main]

use exofs_abi::chain::{HopState, NEXT_ABORT};
use exofs_abi::formats::list::END;
use exofs_examples::follow_entry;

#[no_mangle]
pub extern "C" fn next(state: *mut HopState) -> i32 {
    // SAFETY: the driver calls `next` with its live hop state.
    let state = unsafe { &mut *state };
    walk(state).unwrap_or(NEXT_ABORT)
}

fn walk(state: &mut HopState) -> Option<i32> {
    follow_entry(state, END)
}
