//! Helpers shared by the example application functions (one per binary in `src/bin`).
//!
//! An application function is `#[no_mangle] pub extern "C" fn next(state: *mut HopState)
//! -> i32` in a `no_std` crate built for `bpfel-unknown-none`. It may use its argument, its
//! stack and its own functions, nothing else (no maps, no global data, no helpers but
//! `bpf_loop`); the kernel verifier must be able to prove every access in bounds, so
//! nothing here may panic: every read is checked and returns `None` instead.
#![no_std]

use exofs_abi::chain::{HopState, BLOCK_SIZE, NEXT_CONTINUE, NEXT_DONE, SCRATCH_SIZE};
use exofs_abi::formats::Lookup;

/// The u64 at byte `at` of the block data, if `at` is 8-aligned and the 8 bytes were read.
#[inline(always)]
pub fn data_u64(state: &HopState, at: usize) -> Option<u64> {
    if at % 8 != 0 || at > BLOCK_SIZE - 8 || at + 8 > state.data_len as usize {
        return None;
    }
    // SAFETY: `at + 8 <= BLOCK_SIZE` keeps the read inside `data`; `data` starts at an
    // 8-aligned offset of the 8-aligned HopState and `at` is a multiple of 8.
    Some(unsafe { state.data.as_ptr().add(at).cast::<u64>().read() })
}

/// The lookup's key (scratch word 0).
#[inline(always)]
pub fn lookup_key(state: &HopState) -> u64 {
    // SAFETY: the scratch holds a Lookup (24 bytes < SCRATCH_SIZE) at an 8-aligned offset.
    const _: () = assert!(core::mem::size_of::<Lookup>() <= SCRATCH_SIZE);
    unsafe { state.scratch.as_ptr().cast::<Lookup>().read().key }
}

/// Ends the lookup with its answer.
#[inline(always)]
pub fn answer(state: &mut HopState, value: Option<u64>) -> i32 {
    let lookup = Lookup {
        key: lookup_key(state),
        found: u64::from(value.is_some()),
        value: value.unwrap_or(0),
    };
    // SAFETY: as in `lookup_key`.
    unsafe { state.scratch.as_mut_ptr().cast::<Lookup>().write(lookup) };
    NEXT_DONE
}

/// Continues the lookup at `offset` of the same file.
#[inline(always)]
pub fn go_to(state: &mut HopState, offset: u64) -> i32 {
    state.next_count = 1;
    state.next_file[0] = state.file;
    state.next_offset[0] = offset;
    NEXT_CONTINUE
}

/// One entry of a chain of { next u64, key u64, value u64 }: the answer if its key is the
/// lookup's, else on to `next`, or not found when `next` is `end`.
#[inline(always)]
pub fn follow_entry(state: &mut HopState, end: u64) -> Option<i32> {
    let (next, key, value) = (
        data_u64(state, 0)?,
        data_u64(state, 8)?,
        data_u64(state, 16)?,
    );
    if key == lookup_key(state) {
        return Some(answer(state, Some(value)));
    }
    Some(if next == end {
        answer(state, None)
    } else {
        go_to(state, next)
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
