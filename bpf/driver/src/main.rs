//! exofs trusted driver (BPF side).
//!
//! Layer: bpf/ — the programs kernel-ext loads as BPF_PROG_TYPE_SYSCALL (sleepable) and
//! runs with BPF_PROG_TEST_RUN. Interface: each program takes a `#[repr(C)]` context from
//! `exofs-abi`, copied in from and back out to the caller's buffer by the kernel.
//! Invariants: programs live in ELF section `syscall`; maps are legacy `maps`-section
//! definitions (aya-ebpf `#[map]`) relocated by kernel-ext's loader; nothing here may
//! panic (the panic handler is unreachable by construction, the verifier proves it).
//!
//! Programs: `exofs_chain` (see `chain`), and `exofs_probe`, the toolchain probe that proves the path
//! Rust -> bpf-linker -> aya-obj -> raw BPF_PROG_LOAD -> BPF_PROG_TEST_RUN, reading the
//! CALLER's memory with `bpf_copy_from_user` and exercising a map relocation.
#![no_std]
#![no_main]

mod chain;
mod daemon;
mod hot;
mod task_storage;

use core::ffi::c_void;

use aya_ebpf::{helpers::generated::bpf_copy_from_user, macros::map, maps::Array};
use exofs_abi::probe::{ProbeCtx, PROBE_OUT_LEN};

/// Number of completed probe runs, one `u64` at key 0.
#[map]
static EXOFS_PROBE_STATS: Array<u64> = Array::with_max_entries(1, 0);

/// Copies `min(ctx.len, 64)` bytes from the caller's address `ctx.addr` into `ctx.out`,
/// sets `ctx.copied` and `ctx.status` (0 or the helper's negative errno), and counts the
/// run in `EXOFS_PROBE_STATS[0]`. Returns `ctx.status`.
///
/// Contract: called only by the kernel with `ctx` pointing at a context of at least
/// `size_of::<ProbeCtx>()` bytes (the verifier records the largest offset used and
/// BPF_PROG_TEST_RUN refuses a smaller `ctx_size_in`).
#[no_mangle]
#[link_section = "syscall"]
pub extern "C" fn exofs_probe(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<ProbeCtx>();
    // SAFETY: see the function's contract; the kernel passes a valid, aligned context.
    let (addr, len) = unsafe { ((*ctx).addr, (*ctx).len) };
    let n = if len as usize > PROBE_OUT_LEN {
        PROBE_OUT_LEN as u32
    } else {
        len
    };
    // u64 words, so that the stack slot is 8-byte aligned and the copy-out below is eight
    // 8-byte moves. Zeroing keeps kernel stack bytes out of `out` after a short or failed
    // copy; LLVM emits it as a call to compiler-builtins' `memset` in `.text`, a static
    // BPF-to-BPF call that the loader links in (aya-obj `relocate_calls`).
    let mut buf = [0u64; PROBE_OUT_LEN / 8];
    // SAFETY: `buf` is a stack buffer of PROBE_OUT_LEN >= n bytes; `addr` is a user address
    // that the helper validates (it faults pages in or returns -EFAULT and zeroes `buf`).
    let ret = unsafe { bpf_copy_from_user(buf.as_mut_ptr().cast(), n, addr as *const c_void) };
    let (copied, status) = if ret == 0 { (n, 0) } else { (0, ret as i32) };
    // One 8-byte store per word at a constant offset from the context pointer: the verifier
    // refuses context accesses through a derived pointer ("dereference of modified ctx
    // ptr"), which is what a plain array copy into `out` compiles to. The volatile stores
    // keep LLVM from turning the loop back into such a copy.
    let words = ctx.cast::<u64>();
    let out_word = core::mem::offset_of!(ProbeCtx, out) / 8;
    for (i, word) in buf.iter().enumerate() {
        // SAFETY: `out` lies inside the context at an 8-byte aligned offset (16), so each
        // of its eight words is in bounds and aligned.
        unsafe { words.add(out_word + i).write_volatile(*word) };
    }
    // SAFETY: `copied` and `status` lie inside the context and are aligned.
    unsafe {
        (*ctx).copied = copied;
        (*ctx).status = status;
    }
    if let Some(counter) = EXOFS_PROBE_STATS.get_ptr_mut(0) {
        // Not atomic: core's atomic RMW operations are not available for bpfel-unknown-none
        // (no CAS in the target spec), so concurrent runs on two CPUs may lose a count. Real
        // statistics belong in a PERCPU_ARRAY, which needs no atomics.
        // SAFETY: the lookup returned a live, 8-byte aligned u64 map value.
        unsafe { *counter += 1 };
    }
    status
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
