//! The exofs chain ABI, shared by user space and BPF: `#[repr(C)]` types with asserted
//! sizes, map names and limits. `no_std`; the `user` feature adds `aya::Pod` impls.
//! `include/exofs.h` is the same ABI for C authors (a test compares every size and
//! offset).
#![no_std]

pub mod chain;
pub mod extents;
pub mod formats;
pub mod hot;
pub mod ioctl;
pub mod policy;

/// Byte views of the ABI's `Pod` types, for user space (the `user` feature).
#[cfg(feature = "user")]
pub mod bytes {
    use core::mem::size_of;

    /// The bytes of `value`.
    pub fn of<T: aya::Pod>(value: &T) -> &[u8] {
        // SAFETY: `T: Pod` has no padding or uninitialized bytes; the slice borrows `value`.
        unsafe {
            core::slice::from_raw_parts(core::ptr::from_ref(value).cast::<u8>(), size_of::<T>())
        }
    }

    /// A `T` read from exactly `size_of::<T>()` bytes; None for any other length.
    pub fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
        if bytes.len() != size_of::<T>() {
            return None;
        }
        // SAFETY: `T: Pod` is valid for any bit pattern, and `bytes` holds exactly one
        // (unaligned) `T`.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }
}

/// The toolchain probe's context (`exofs_probe` in bpf/driver): the smallest program that
/// exercises the whole load path (map relocation, sleepable syscall program,
/// BPF_PROG_TEST_RUN, `bpf_copy_from_user` on the caller's memory).
pub mod probe {
    /// Bytes the probe copies at most, and the size of [`ProbeCtx::out`].
    pub const PROBE_OUT_LEN: usize = 64;

    /// Context of `exofs_probe`, passed in and back out by BPF_PROG_TEST_RUN (a syscall
    /// program's context is copied from the caller's `ctx_in` and written back there).
    ///
    /// Layout: 88 bytes, 8-byte aligned, no implicit padding (every byte is a field, so
    /// viewing it as bytes is sound). Every field is at an offset that is a multiple of
    /// its size, as the verifier requires for syscall-program context accesses.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ProbeCtx {
        /// In: user-space address to read from, in the address space of the process that
        /// runs the program.
        pub addr: u64,
        /// In: bytes requested; the probe copies `min(len, PROBE_OUT_LEN)`.
        pub len: u32,
        /// Explicit padding; set to 0.
        pub _pad: u32,
        /// Out: the bytes read (the rest is zero).
        pub out: [u8; PROBE_OUT_LEN],
        /// Out: bytes copied (0 if the copy failed).
        pub copied: u32,
        /// Out: 0, or the negative errno `bpf_copy_from_user` returned.
        pub status: i32,
    }

    const _: () = assert!(core::mem::size_of::<ProbeCtx>() == 88);

    // SAFETY: `ProbeCtx` is `repr(C)`, `Copy`, made only of integers and byte arrays, with
    // no implicit padding (asserted size 88 = 8 + 4 + 4 + 64 + 4 + 4), so every bit pattern
    // is valid and every byte is initialized.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for ProbeCtx {}
}
