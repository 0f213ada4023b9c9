//! The chain ioctls on a file of an exofs mount: how an unprivileged application runs a
//! bound program over a file it has open on the mount. The mount daemon runs the chain
//! (one FUSE round trip per lookup, however many hops) after checking the policy, and the
//! driver checks it again for the subject the daemon names.
//!
//! Each request is one `#[repr(C)]` struct, read and written back whole: FUSE copies
//! exactly the size encoded in the ioctl number (`_IOWR('E', nr, struct)`), so a caller
//! built against another layout gets ENOTTY, never a misread struct.
//!
//! Errors (errno of the ioctl): EACCES, the policy does not grant the program, the file,
//! the hops or the batch size; ENOENT, no program of that name is loaded; EINVAL, a
//! malformed request (name not NUL-terminated or not a valid name, hop limit, read length
//! or count out of range); ENOTTY, an unknown request; EOPNOTSUPP, the daemon has no
//! kernel binding (BPF unavailable).
//! A chain that runs gets status and hops in the struct (HOLE, OUT_OF_FILE, ABORTED and
//! the other statuses are answers, not errors).

use crate::chain::{BATCH_SCRATCH_SIZE, MAX_BATCH, SCRATCH_SIZE};

/// The ioctl type byte of exofs requests.
pub const IOCTL_TYPE: u8 = b'E';
/// Bytes of a program name, NUL-padded (names are 1-64 characters: at most 63 fit with
/// their NUL, which is the limit for ioctl callers).
pub const PROGRAM_NAME_SIZE: usize = 64;

/// One chain over the ioctl's file.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainIoctl {
    /// In: the program's name (as given to `exofs prog load`), NUL-terminated.
    pub program: [u8; PROGRAM_NAME_SIZE],
    /// In: byte offset in the file of the first hop.
    pub start: u64,
    /// In: hops at most (1..=MAX_HOPS), or 0 for as many as the caller's grant allows.
    pub hop_limit: u32,
    /// In: bytes copied per hop (1..=BLOCK_SIZE).
    pub read_len: u32,
    /// Out: a `chain::status` value.
    pub status: i32,
    /// Out: hops taken.
    pub hops: u32,
    /// In and out: the program's scratch.
    pub scratch: [u8; SCRATCH_SIZE],
}

/// One lookup of a [`BatchIoctl`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlLookup {
    /// In: byte offset in the file of the first hop.
    pub start: u64,
    /// Out: a `chain::status` value.
    pub status: i32,
    /// Out: hops taken.
    pub hops: u32,
    /// In and out: the first BATCH_SCRATCH_SIZE bytes of the lookup's scratch.
    pub scratch: [u8; BATCH_SCRATCH_SIZE],
}

/// Up to MAX_BATCH independent lookups over the ioctl's file in one request.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchIoctl {
    /// In: the program's name, NUL-terminated.
    pub program: [u8; PROGRAM_NAME_SIZE],
    /// In: hops at most per lookup (1..=MAX_HOPS, or 0 for the grant's maximum).
    pub hop_limit: u32,
    /// In: bytes copied per hop (1..=BLOCK_SIZE).
    pub read_len: u32,
    /// In: lookups in `lookups` (1..=MAX_BATCH).
    pub count: u32,
    /// Out: lookups that finished with status DONE.
    pub done: u32,
    pub lookups: [IoctlLookup; MAX_BATCH],
}

/// Bytes of [`PolicyReload::message`].
pub const MESSAGE_SIZE: usize = 1024;

/// The answer to a policy reload: empty on success, else what was wrong with the file
/// (every mistake, `FILE:LINE:COL: ...`), NUL-terminated and cut to fit. (FUSE returns
/// data only with a successful ioctl, hence the return value 1 rather than an errno.)
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyReload {
    pub message: [u8; MESSAGE_SIZE],
}

/// Bytes of a pin path in [`DirectIoctl`], NUL-terminated.
pub const PIN_PATH_SIZE: usize = 256;

/// Discovery for direct chains: what a process needs to run a program over the ioctl's
/// file itself, in the kernel, with no daemon in the data path. The daemon checks that the
/// policy grants the caller the program on this file (else EACCES, counted and logged as
/// a refusal), registers the file's extents with the driver (publishing them again if the
/// file changed), and answers. The caller then opens the pins with BPF_OBJ_GET and runs
/// them with BPF_PROG_TEST_RUN on a [`crate::chain::ChainCtx`] or
/// [`crate::chain::BatchCtx`] naming `files[0] = { ino, generation }`, with `map_addr`,
/// `map_len`, the subject fields and `flags` zero. The daemon keeps the file registered
/// while a handle on it is open: keep it open while chains run. A STALE or NOT_REGISTERED
/// answer means the file changed (or was closed): ask again.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectIoctl {
    /// In: the program's name, NUL-terminated.
    pub program: [u8; PROGRAM_NAME_SIZE],
    /// Out: the file's inode number and generation, as a chain names them.
    pub ino: u64,
    pub generation: u64,
    /// Out: the most hops and lookups per batch the caller's grant allows.
    pub max_hops: u32,
    pub max_batch: u32,
    /// Out: the pins of the program's direct single-chain and batch variants.
    pub chain_pin: [u8; PIN_PATH_SIZE],
    pub batch_pin: [u8; PIN_PATH_SIZE],
}

impl Default for DirectIoctl {
    fn default() -> Self {
        Self {
            program: [0; PROGRAM_NAME_SIZE],
            ino: 0,
            generation: 0,
            max_hops: 0,
            max_batch: 0,
            chain_pin: [0; PIN_PATH_SIZE],
            batch_pin: [0; PIN_PATH_SIZE],
        }
    }
}

/// `_IOC(dir, type, nr, size)` of Linux's asm-generic/ioctl.h.
const fn ioc(dir: u32, nr: u8, size: usize) -> u32 {
    const NR_SHIFT: u32 = 0;
    const TYPE_SHIFT: u32 = 8;
    const SIZE_SHIFT: u32 = 16;
    const DIR_SHIFT: u32 = 30;
    assert!(
        size < 1 << 14,
        "an ioctl struct must be smaller than 16 KiB"
    );
    dir << DIR_SHIFT
        | (size as u32) << SIZE_SHIFT
        | (IOCTL_TYPE as u32) << TYPE_SHIFT
        | (nr as u32) << NR_SHIFT
}

/// `_IOC_WRITE`: user space writes the struct.
const WRITE: u32 = 1;
/// `_IOC_READ`: user space reads the struct back.
const READ: u32 = 2;

/// `_IOWR('E', 1, struct exofs_chain_ioctl)`.
pub const IOC_CHAIN: u32 = ioc(READ | WRITE, 1, core::mem::size_of::<ChainIoctl>());
/// `_IOWR('E', 2, struct exofs_batch_ioctl)`.
pub const IOC_CHAIN_BATCH: u32 = ioc(READ | WRITE, 2, core::mem::size_of::<BatchIoctl>());
/// `_IOR('E', 3, struct exofs_policy_reload)`: re-reads the mount's policy file (root
/// or the mount's owner only, else EPERM). Returns 0 when the new policy is in force, 1
/// when the file has mistakes (named in the answer; the old policy stays). EINVAL when
/// the mount has no policy file.
pub const IOC_POLICY_RELOAD: u32 = ioc(READ, 3, core::mem::size_of::<PolicyReload>());
/// `_IOWR('E', 4, struct exofs_direct_ioctl)`: see [`DirectIoctl`]. Errors as for
/// IOC_CHAIN.
pub const IOC_DIRECT: u32 = ioc(READ | WRITE, 4, core::mem::size_of::<DirectIoctl>());

impl Default for ChainIoctl {
    fn default() -> Self {
        Self {
            program: [0; PROGRAM_NAME_SIZE],
            start: 0,
            hop_limit: 0,
            read_len: 0,
            status: 0,
            hops: 0,
            scratch: [0; SCRATCH_SIZE],
        }
    }
}

impl Default for BatchIoctl {
    fn default() -> Self {
        Self {
            program: [0; PROGRAM_NAME_SIZE],
            hop_limit: 0,
            read_len: 0,
            count: 0,
            done: 0,
            lookups: [IoctlLookup::default(); MAX_BATCH],
        }
    }
}

impl Default for PolicyReload {
    fn default() -> Self {
        Self {
            message: [0; MESSAGE_SIZE],
        }
    }
}

/// Whether `name` is a valid program name: 1-64 characters of `[A-Za-z0-9_-]`, the rule
/// of `exofs prog load` (a name is a pin's file name), of policy files and of the ioctls
/// (whose NUL-terminated field holds at most 63 of them).
pub fn is_valid_program_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

/// The name in a NUL-terminated `program` field, if it is one.
pub fn program_name(field: &[u8; PROGRAM_NAME_SIZE]) -> Option<&str> {
    let end = field.iter().position(|&byte| byte == 0)?;
    core::str::from_utf8(&field[..end]).ok()
}

/// `name` as a NUL-terminated `program` field; None if it does not fit.
pub fn program_field(name: &str) -> Option<[u8; PROGRAM_NAME_SIZE]> {
    let mut field = [0u8; PROGRAM_NAME_SIZE];
    if name.len() >= PROGRAM_NAME_SIZE {
        return None;
    }
    field[..name.len()].copy_from_slice(name.as_bytes());
    Some(field)
}

const _: () = assert!(core::mem::size_of::<ChainIoctl>() == 64 + 8 + 16 + SCRATCH_SIZE);
const _: () = assert!(core::mem::size_of::<IoctlLookup>() == 16 + BATCH_SCRATCH_SIZE);
const _: () = assert!(core::mem::size_of::<DirectIoctl>() == 64 + 24 + 2 * PIN_PATH_SIZE);
const _: () = assert!(core::mem::size_of::<BatchIoctl>() == 64 + 16 + MAX_BATCH * 48);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] integers and byte arrays without implicit padding (sizes
    // asserted above); every bit pattern is valid.
    unsafe impl aya::Pod for super::ChainIoctl {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IoctlLookup {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BatchIoctl {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyReload {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DirectIoctl {}
}
