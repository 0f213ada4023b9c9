//! Helpers for application functions: the `next` that a chain calls at each hop
//! (docs/BPF.md). The C side is `bpf/abi/include/exofs_helpers.h`, with the same names.
//!
//! The verifier must prove every read of the hop's data in bounds, whatever the compiler
//! did to the checks in the source, and every loop finite, within its budget of a
//! million instructions over all paths. So:
//! - every read masks its index to the block ([`byte`] and the integer reads): the
//!   verifier sees the mask, so a check the compiler dropped or moved cannot make a read
//!   out of bounds. The check against `data_len` stays, as logic: a read past the bytes
//!   the hop read is `None`;
//! - loops whose bodies are long or whose count depends on the data go through
//!   [`bpf_loop`]: the verifier checks the body once, not once per iteration and path.
//!   [`partition_point`] is a binary search built that way, for any number of entries up
//!   to a block's worth, with the entry's key read by the caller.
//!
//! Nothing here panics (a panic is a path the verifier must follow, to a handler that
//! loops forever).
#![cfg_attr(not(test), no_std)]

use core::ffi::c_void;
use exofs_abi::chain::{HopState, BLOCK_SIZE, SCRATCH_SIZE};

/// Masks an index into the block: the verifier sees every read bounded by it.
const MASK: usize = BLOCK_SIZE - 1;

/// Steps that always suffice for a binary search over up to BLOCK_SIZE entries.
pub const SEARCH_STEPS: u32 = 13;

/// The byte at `at` of the hop's data; None at or past `data_len`.
#[inline(always)]
pub fn byte(state: &HopState, at: usize) -> Option<u8> {
    if at >= state.data_len as usize {
        return None;
    }
    Some(state.data[at & MASK])
}

/// `N` (at most 8) bytes at `at` as a big-endian unsigned integer.
#[inline(always)]
fn big_endian<const N: usize>(state: &HopState, at: usize) -> Option<u64> {
    if N > 8 || at >= BLOCK_SIZE || at + N > state.data_len as usize {
        return None;
    }
    let mut value = 0u64;
    for i in 0..N {
        value = value << 8 | u64::from(state.data[(at + i) & MASK]);
    }
    Some(value)
}

/// `N` (at most 8) bytes at `at` as a little-endian unsigned integer.
#[inline(always)]
fn little_endian<const N: usize>(state: &HopState, at: usize) -> Option<u64> {
    if N > 8 || at >= BLOCK_SIZE || at + N > state.data_len as usize {
        return None;
    }
    let mut value = 0u64;
    for i in 0..N {
        value |= u64::from(state.data[(at + i) & MASK]) << (8 * i);
    }
    Some(value)
}

/// Big-endian u16 at `at`.
#[inline(always)]
pub fn be16(state: &HopState, at: usize) -> Option<u16> {
    big_endian::<2>(state, at).map(|v| v as u16)
}

/// Big-endian u32 at `at`.
#[inline(always)]
pub fn be32(state: &HopState, at: usize) -> Option<u32> {
    big_endian::<4>(state, at).map(|v| v as u32)
}

/// Big-endian u64 at `at`.
#[inline(always)]
pub fn be64(state: &HopState, at: usize) -> Option<u64> {
    big_endian::<8>(state, at)
}

/// Little-endian u16 at `at`.
#[inline(always)]
pub fn le16(state: &HopState, at: usize) -> Option<u16> {
    little_endian::<2>(state, at).map(|v| v as u16)
}

/// Little-endian u32 at `at`.
#[inline(always)]
pub fn le32(state: &HopState, at: usize) -> Option<u32> {
    little_endian::<4>(state, at).map(|v| v as u32)
}

/// Little-endian u64 at `at`.
#[inline(always)]
pub fn le64(state: &HopState, at: usize) -> Option<u64> {
    little_endian::<8>(state, at)
}

/// A big-endian integer of `len` bytes (0..=8, any length, as SQLite stores them) at
/// `at`, unsigned. `len` may come from the data: the loop runs 8 steps at most.
#[inline(always)]
pub fn be_var(state: &HopState, at: usize, len: usize) -> Option<u64> {
    if len > 8 || at >= BLOCK_SIZE || at + len > state.data_len as usize {
        return None;
    }
    let mut value = 0u64;
    for i in 0..8 {
        if i >= len {
            break;
        }
        value = value << 8 | u64::from(state.data[(at + i) & MASK]);
    }
    Some(value)
}

/// An SQLite varint at `at`: its value and its length (1..=9 bytes). Big-endian groups of
/// 7 bits, the high bit set on every byte but the last; a ninth byte gives all 8 bits.
///
/// Its nine ways out give nine lengths. A caller that goes on reading at `at + length`
/// would have the verifier follow the rest of the hop once per length, and per length of
/// the varint before it: so the position and the length go through [`opaque`] (which is
/// why this takes the state mutably).
#[inline(never)]
pub fn sqlite_varint(state: &mut HopState, at: usize) -> Option<(u64, usize)> {
    let at = opaque(state, at as u64) as usize;
    let (mut value, mut length) = (0u64, 0usize);
    for i in 0..9 {
        let b = byte(state, at + i)?;
        if i == 8 {
            value = value << 8 | u64::from(b);
            length = 9;
            break;
        }
        value = value << 7 | u64::from(b & 0x7f);
        if b < 0x80 {
            length = i + 1;
            break;
        }
    }
    Some((value, opaque(state, length as u64) as usize))
}

/// An unsigned LEB128 varint at `at` (protobuf, DWARF, WebAssembly): its value and its
/// length (1..=10 bytes). Little-endian groups of 7 bits, the high bit set on every byte
/// but the last. None if it runs past the data or past 64 bits. Mutable for the reason
/// [`sqlite_varint`] is.
#[inline(never)]
pub fn leb128(state: &mut HopState, at: usize) -> Option<(u64, usize)> {
    let at = opaque(state, at as u64) as usize;
    let (mut value, mut length) = (0u64, 0usize);
    for i in 0..10 {
        let b = byte(state, at + i)?;
        if i == 9 && b > 1 {
            return None;
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            length = i + 1;
            break;
        }
    }
    if length == 0 {
        return None;
    }
    Some((value, opaque(state, length as u64) as usize))
}

/// The kernel's `bpf_loop` (helper 181): calls `callback(index, ctx)` for index 0, 1, ...
/// up to `count` times (at most 1 << 23), stopping early when it returns 1. Returns the
/// number of calls made, or a negative error. The verifier checks `callback` once, however
/// large `count` is. (On the host, for tests, the same loop in Rust.)
#[inline(always)]
pub fn bpf_loop(
    count: u32,
    callback: extern "C" fn(u64, *mut c_void) -> i64,
    ctx: *mut c_void,
) -> i64 {
    #[cfg(target_arch = "bpf")]
    {
        // The count goes as a u64, zero-extended here: a u32 in a BPF register may carry
        // garbage in its upper half (the calling convention leaves it), and the verifier
        // inlines bpf_loop with a 64-bit comparison of the count against its maximum: a
        // count with garbage above it makes the inlined loop return -E2BIG without one
        // call. (Found the hard way: a u32 cut from a u64 reached bpf_loop whole.)
        let count = u64::from(count) & u64::from(u32::MAX);
        // SAFETY: helper 181 is bpf_loop(nr_loops, callback_fn, callback_ctx, flags) in
        // every kernel that has it (5.17+); the binder allows exactly this helper.
        unsafe {
            let helper: unsafe extern "C" fn(u64, *mut c_void, *mut c_void, u64) -> i64 =
                core::mem::transmute(181usize);
            helper(count, callback as *mut c_void, ctx, 0)
        }
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        if count > 1 << 23 {
            return -7; // -E2BIG, as the kernel
        }
        let mut calls = 0;
        for index in 0..u64::from(count) {
            calls += 1;
            if callback(index, ctx) == 1 {
                break;
            }
        }
        calls
    }
}

/// Scratch offset of the helpers' 16 bytes, its last: [`partition_point`]'s bounds, then
/// [`opaque`]'s word. An application function keeps its own state below it. (They are
/// not kept across a batch's resumption, nor need to be: they live within one hop.)
pub const HELPER_AREA: usize = SCRATCH_SIZE - 16;
const SEARCH_WORD: usize = HELPER_AREA;
const OPAQUE_WORD: usize = HELPER_AREA + 8;

/// The u64 at scratch offset `at` (8-aligned, at most SCRATCH_SIZE - 8), read from memory
/// whose contents the verifier does not track: its range is unknown.
#[inline(always)]
pub fn scratch_word(state: &HopState, at: usize) -> u64 {
    let at = at & (SCRATCH_SIZE - 8);
    // SAFETY: 8 bytes inside the scratch, 8-aligned (HopState is, and so is its scratch).
    // Volatile: the compiler may not reuse a value it knows.
    unsafe { core::ptr::read_volatile(state.scratch.as_ptr().add(at).cast::<u64>()) }
}

/// Writes the u64 at scratch offset `at` (8-aligned).
#[inline(always)]
pub fn set_scratch_word(state: &mut HopState, at: usize, value: u64) {
    let at = at & (SCRATCH_SIZE - 8);
    // SAFETY: as in scratch_word.
    unsafe { core::ptr::write_volatile(state.scratch.as_mut_ptr().add(at).cast::<u64>(), value) }
}

/// `value`, with its range forgotten by the verifier: it goes through the hop state's
/// memory, whose contents the verifier does not track.
///
/// Use it on a position carried from one step of a [`repeat`] body to the next (a cursor
/// over varints, the bounds of a search). The verifier checks a bpf_loop body until its
/// states repeat; a position that grows each step never repeats, and the body is checked
/// once per value it can take: thousands of times, until the verifier gives up ("the
/// sequence of 8193 jumps is too complex"). Every read here masks its index, so a
/// position whose range is unknown is still read in bounds. (Keeping such positions in
/// the scratch, with [`scratch_word`], does the same and spares the stack.)
#[inline(always)]
pub fn opaque(state: &mut HopState, value: u64) -> u64 {
    set_scratch_word(state, OPAQUE_WORD, value);
    scratch_word(state, OPAQUE_WORD)
}

/// Runs `body(state, i)` for i in 0..count through [`bpf_loop`], until it returns false.
/// Returns how many times it ran (0 if bpf_loop refused). Pass positions carried between
/// steps through [`opaque`].
#[inline(always)]
pub fn repeat<F: FnMut(&mut HopState, u32) -> bool>(
    state: &mut HopState,
    count: u32,
    body: &mut F,
) -> u32 {
    struct Context<F> {
        state: *mut HopState,
        body: *mut F,
    }
    extern "C" fn step<F: FnMut(&mut HopState, u32) -> bool>(index: u64, ctx: *mut c_void) -> i64 {
        // SAFETY: `ctx` is the Context repeat passed to bpf_loop, alive for the call, and
        // its pointers are the exclusive borrows repeat holds.
        let context = unsafe { &mut *ctx.cast::<Context<F>>() };
        let (state, body) = unsafe { (&mut *context.state, &mut *context.body) };
        if body(state, index as u32) {
            0
        } else {
            1
        }
    }
    let mut context = Context {
        state: core::ptr::from_mut(state),
        body: core::ptr::from_mut(body),
    };
    let ran = bpf_loop(count, step::<F>, core::ptr::from_mut(&mut context).cast());
    if ran < 0 {
        0
    } else {
        ran as u32
    }
}

/// Binary search over `count` sorted entries (at most BLOCK_SIZE): the first index whose
/// entry is not "before" the sought key, in 0..=count, as `slice::partition_point`.
/// `before(state, i)` reads entry i's key and says whether it sorts before the sought
/// one; None (an unreadable entry) makes the search None. One bpf_loop of SEARCH_STEPS
/// steps, its bounds kept in the helpers' scratch word (no stack, and a range the verifier
/// does not track): it verifies at any `count`.
#[inline(always)]
pub fn partition_point<F: FnMut(&mut HopState, u32) -> Option<bool>>(
    state: &mut HopState,
    count: u32,
    mut before: F,
) -> Option<u32> {
    /// low and high in one word.
    fn bounds(low: u32, high: u32) -> u64 {
        u64::from(high) << 32 | u64::from(low)
    }
    if count as usize > BLOCK_SIZE {
        return None;
    }
    set_scratch_word(state, SEARCH_WORD, bounds(0, count));
    let mut step = move |state: &mut HopState, _| {
        let word = scratch_word(state, SEARCH_WORD);
        let (low, high) = (word as u32, (word >> 32) as u32);
        if low >= high || high as usize > BLOCK_SIZE {
            return false;
        }
        let middle = low + (high - low) / 2;
        let next = match before(state, middle) {
            Some(true) => bounds(middle + 1, high),
            Some(false) => bounds(low, middle),
            // Marks the search failed: no bounds are ever this.
            None => u64::MAX,
        };
        set_scratch_word(state, SEARCH_WORD, next);
        next != u64::MAX
    };
    repeat(state, SEARCH_STEPS, &mut step);
    let word = scratch_word(state, SEARCH_WORD);
    let (low, high) = (word as u32, (word >> 32) as u32);
    if low != high || high as usize > BLOCK_SIZE {
        return None;
    }
    Some(low)
}

/// Encoders for the varints the readers decode, for the programs and tests that write
/// the data (no allocation: the bytes and how many of them are used).
pub mod encode {
    /// SQLite's varint encoding (as sqlite3PutVarint).
    pub fn sqlite_varint(value: u64) -> ([u8; 9], usize) {
        let mut out = [0u8; 9];
        if value >> 56 != 0 {
            out[8] = value as u8;
            let mut v = value >> 8;
            for b in out[..8].iter_mut().rev() {
                *b = (v & 0x7f) as u8 | 0x80;
                v >>= 7;
            }
            return (out, 9);
        }
        let mut groups = 1;
        while groups < 8 && value >> (7 * groups) != 0 {
            groups += 1;
        }
        for (i, b) in out[..groups].iter_mut().enumerate() {
            let shift = 7 * (groups - 1 - i);
            *b = ((value >> shift) & 0x7f) as u8 | if i + 1 < groups { 0x80 } else { 0 };
        }
        (out, groups)
    }

    /// Unsigned LEB128.
    pub fn leb128(mut value: u64) -> ([u8; 10], usize) {
        let mut out = [0u8; 10];
        for (i, b) in out.iter_mut().enumerate() {
            *b = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                return (out, i + 1);
            }
            *b |= 0x80;
        }
        (out, 10)
    }
}

#[cfg(test)]
mod tests;
