//! One chain: its arguments and results (the BPF_PROG_TEST_RUN context), the state an
//! application's `next` function sees at each hop, its return codes, and the limits.
//!
//! The context is kept small on purpose: the kernel copies it in and back out on every
//! call, and that copy is most of a call's fixed cost (0.65 µs at 0 bytes, 0.96 µs at
//! 4 KiB, 4.0 µs at 64 KiB, measured here). Block data never travels in it: the driver
//! copies each block into a per-task map value ([`HopState`]) and calls `next` on that.
//!
//! `include/exofs.h` declares the same types for C authors; a test compiles it and
//! compares every size and offset with these.

/// Bytes of one block: the unit a hop reads.
pub const BLOCK_SIZE: usize = 4096;
/// Hops one chain may take at most, whatever the caller asks.
pub const MAX_HOPS: u32 = 64;
/// Next offsets one hop may return.
pub const MAX_FANOUT: usize = 4;
/// Bytes of application scratch carried from hop to hop and back to the caller.
pub const SCRATCH_SIZE: usize = 256;
/// Registered files one chain may read.
pub const MAX_CHAIN_FILES: usize = 4;
/// Lookups one batched call may carry.
pub const MAX_BATCH: usize = 32;

/// `next` returns: the lookup is complete; the result is in the scratch.
pub const NEXT_DONE: i32 = 0;
/// `next` returns: read the `next_count` offsets it wrote, then call it again (0 offsets
/// end this branch of a fan-out: the walk goes on with the offsets still pending).
pub const NEXT_CONTINUE: i32 = 1;
/// `next` returns: give up (the status says aborted).
pub const NEXT_ABORT: i32 = 2;

/// Chain statuses ([`ChainCtx::status`]).
pub mod status {
    /// `next` returned NEXT_DONE.
    pub const DONE: i32 = 0;
    /// `next` returned NEXT_ABORT (or an unknown code).
    pub const ABORTED: i32 = 1;
    /// The hop limit was reached before `next` was done.
    pub const HOP_LIMIT: i32 = 2;
    /// A file's generation changed during the chain: the result is withheld; retry.
    pub const STALE: i32 = 3;
    /// An offset lies at or past the end of its file.
    pub const OUT_OF_FILE: i32 = 4;
    /// An offset lies in a hole or an unwritten extent.
    pub const HOLE: i32 = 5;
    /// A file of the chain is not registered (or has another generation already).
    pub const NOT_REGISTERED: i32 = 6;
    /// The policy does not let the subject run this chain.
    pub const DENIED: i32 = 7;
    /// Copying a block from the caller's mapping failed.
    pub const FAULT: i32 = 8;
    /// The arguments are malformed (counts, lengths, file indexes).
    pub const INVALID: i32 = 9;
    /// Chains and batches run with [`super::NO_FAULT`]: the block at `missing` is not in
    /// memory; the chain did not finish. The caller brings the block into the page cache
    /// and runs the chain again from where the context now says, naming that block in
    /// `missing` (see [`super::ChainCtx::start_hop`]).
    pub const MISSING: i32 = 10;
    /// A direct chain could not read the mount daemon's mapping of the device: the daemon
    /// exited (or was killed), or the device read failed. No data was returned.
    pub const NO_DAEMON: i32 = 11;

    /// The status's name, for messages.
    pub const fn name(status: i32) -> &'static str {
        match status {
            DONE => "done",
            ABORTED => "aborted by next",
            HOP_LIMIT => "hop limit reached",
            STALE => "stale (the file changed)",
            OUT_OF_FILE => "offset outside the file",
            HOLE => "offset in a hole",
            NOT_REGISTERED => "file not registered",
            DENIED => "denied by policy",
            FAULT => "fault reading the device mapping",
            INVALID => "invalid arguments",
            MISSING => "block not in memory",
            NO_DAEMON => "the mount daemon is gone (its device mapping cannot be read)",
            _ => "unknown status",
        }
    }
}

/// Chain statistics: the `stats` map (PERCPU_ARRAY of u64, indexed by these constants;
/// user space sums the CPUs). Counted by the driver at the end of each chain. The counts
/// are per CPU without atomics; a chain preempted in the middle of an increment by another
/// on the same CPU can lose one count (statistics, not accounting).
pub mod stats {
    /// Name of the map.
    pub const MAP_STATS: &str = "EXOFS_STATS";
    /// Chains run.
    pub const CHAINS: u32 = 0;
    /// Hops taken (blocks handed to `next`).
    pub const HOPS: u32 = 1;
    /// Chains that ended with status DONE.
    pub const DONE: u32 = 2;
    /// Chains that ended STALE (the caller retries).
    pub const STALE: u32 = 3;
    /// Chains refused: offset out of file, hole, file not registered, invalid arguments,
    /// fault.
    pub const REJECTED: u32 = 4;
    /// Chains the policy denied.
    pub const DENIED: u32 = 5;
    /// Chains `next` aborted or that hit the hop limit.
    pub const ABORTED: u32 = 6;
    /// Chain requests the mount daemon refused before they reached the kernel (a program
    /// or file the policy does not grant). Written by the daemon alone, on CPU 0's slot:
    /// the driver never touches it.
    pub const REFUSED: u32 = 7;
    /// Denials (also counted in DENIED) because a file of the chain has no grant for the
    /// subject: its uid, gid and cgroup have none (or none for this program).
    pub const DENIED_NO_GRANT: u32 = 8;
    /// Denials because the chain asked for more hops than the grant allows.
    pub const DENIED_HOPS: u32 = 9;
    /// Denials because the batch carried more lookups than the grant allows.
    pub const DENIED_BATCH: u32 = 10;
    /// Direct calls refused because their context named a mapping or a subject, or asked
    /// for NO_FAULT (also counted in REJECTED).
    pub const DIRECT_INVALID: u32 = 11;
    /// Denials of direct calls because the caller's uid holds no ticket for a file of the
    /// chain: it has not asked for it (`IOC_DIRECT`) through a handle it opened, or has
    /// closed every such handle.
    pub const DENIED_NO_TICKET: u32 = 12;
    /// Direct hops served from the hot-block table (`crate::hot`).
    pub const HOT_HITS: u32 = 13;
    /// Direct hops that found no slot for their block and read the daemon's mapping.
    pub const HOT_MISSES: u32 = 14;
    /// Entries in the map.
    pub const COUNT: u32 = 15;
}

/// The driver's programs, by ELF symbol: the privileged single chain and batch (the
/// caller names its own mapping of the device, and the mount daemon may name a subject),
/// their direct variants for unprivileged callers (the device is read through the mount
/// daemon's mapping; nothing in the context may name a mapping or a subject), and the
/// daemon's registration (see [`RegisterCtx`]).
pub mod programs {
    pub const CHAIN: &str = "exofs_chain";
    pub const BATCH: &str = "exofs_chain_batch";
    pub const DIRECT_CHAIN: &str = "exofs_direct_chain";
    pub const DIRECT_BATCH: &str = "exofs_direct_batch";
    pub const REGISTER: &str = "exofs_register";
}

/// Name of the daemon map: one entry, the mount daemon's task (a referenced kptr) and its
/// mapping of the device, written by `exofs_register` alone.
pub const MAP_DAEMON: &str = "EXOFS_DAEMON";
/// Name of the tickets map: [`TicketKey`] -> u64, present while a uid may run direct
/// chains over an inode (the mount daemon writes a ticket when the uid asks for the file
/// through a handle it opened, past the ordinary permission checks, and removes it when
/// the uid's last such handle closes). Direct programs require one for every file, on top
/// of the policy's grant.
pub const MAP_TICKETS: &str = "EXOFS_TICKETS";

/// Key of the tickets map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TicketKey {
    pub uid: u32,
    pub _pad: u32,
    pub ino: u64,
}

/// Name of the program map: one entry per bound program, its [`crate::policy::program_tag`]
/// (each bound program gets its own instance of this map).
pub const MAP_PROGRAM: &str = "EXOFS_PROGRAM";

/// The context of `exofs_register`: the calling process becomes the daemon (the speaker of
/// the policy, whose mapping direct chains read); with `map_len` 0 it stops being one (no
/// daemon). Only holders of that program's fd can run it: processes that load the driver
/// (root); it is never pinned.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegisterCtx {
    /// In: address of the caller's read-only mapping of the whole device.
    pub map_addr: u64,
    /// In: its length in bytes.
    pub map_len: u64,
    /// Out: 0, or a `status::*` value.
    pub status: i32,
    pub _pad: u32,
}

/// One file a chain may read.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainFile {
    /// libfs inode number.
    pub ino: u64,
    /// The generation the caller saw when it decided to run the chain.
    pub generation: u64,
}

/// Arguments and results of one chain: the context of a BPF_PROG_TEST_RUN call, copied
/// in and written back.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainCtx {
    /// In: the files the chain may read (`file_count` of them).
    pub files: [ChainFile; MAX_CHAIN_FILES],
    /// In: number of valid entries in `files` (1..=MAX_CHAIN_FILES).
    pub file_count: u32,
    /// In: hops at most (clamped to MAX_HOPS).
    pub hop_limit: u32,
    /// In: index in `files` of the first hop's file.
    pub start_file: u32,
    /// In: bytes to copy per hop from the block holding the offset (1..=BLOCK_SIZE;
    /// the copy starts at the offset and stays inside its block).
    pub read_len: u32,
    /// In: byte offset of the first hop in its file.
    pub start_offset: u64,
    /// In: address of the caller's read-only mapping of the whole device.
    pub map_addr: u64,
    /// In: length of that mapping in bytes.
    pub map_len: u64,
    /// In: the subject the policy is checked for, with [`SUBJECT_NAMED`], when the caller
    /// is the registered daemon speaking for a FUSE caller; ignored for other callers
    /// (their own ids count). Direct programs refuse a context that sets any of these.
    pub subject_uid: u32,
    pub subject_gid: u32,
    /// In: the subject's cgroup id (0: none), as `subject_uid`.
    pub subject_cgroup: u64,
    /// Out: a `status::*` value.
    pub status: i32,
    /// Out: hops taken (counted from hop 0, `start_hop` included).
    pub hops: u32,
    /// In: [`NO_FAULT`], [`SUBJECT_NAMED`], or 0.
    pub flags: u32,
    /// In: the number of the first hop (0 for a new chain). Out, with status MISSING:
    /// where to resume. When no other branch of the walk was pending, the driver sets
    /// `start_file`, `start_offset`, `start_hop` and `scratch` to the hop that missed, as
    /// `next` left them; otherwise they stay as given and the chain is run again from
    /// there.
    pub start_hop: u32,
    /// In: the device offset of a block the chain may wait for even with NO_FAULT (the
    /// block the caller has just read into the page cache), or u64::MAX. Out, with
    /// status MISSING: the device offset of the block that was not in memory.
    pub missing: u64,
    /// In and out: the application's scratch (keys in, results out).
    pub scratch: [u8; SCRATCH_SIZE],
}

impl Default for ChainCtx {
    fn default() -> Self {
        Self {
            files: [ChainFile::default(); MAX_CHAIN_FILES],
            file_count: 0,
            hop_limit: 0,
            start_file: 0,
            read_len: 0,
            start_offset: 0,
            map_addr: 0,
            map_len: 0,
            subject_uid: 0,
            subject_gid: 0,
            subject_cgroup: 0,
            status: 0,
            hops: 0,
            flags: 0,
            start_hop: 0,
            missing: u64::MAX,
            scratch: [0; SCRATCH_SIZE],
        }
    }
}

/// Bytes of scratch per lookup of a batch: the first bytes of `next`'s scratch, and all
/// of a batched lookup's state between hops. The rest of the scratch starts zeroed, also
/// when a lookup resumes after a miss.
pub const BATCH_SCRATCH_SIZE: usize = 32;
/// [`ChainCtx::flags`] and [`BatchCtx::flags`]: never wait for the disk (except for the
/// block named in `missing`); a block not in memory ends the chain with status MISSING
/// instead (see [`status::MISSING`]).
pub const NO_FAULT: u32 = 1;

/// [`ChainCtx::flags`] and [`BatchCtx::flags`]: the policy is checked for the subject the
/// context names (`subject_uid`, `subject_gid`, `subject_cgroup`) instead of the caller,
/// if the caller is the registered mount daemon (otherwise the flag changes nothing).
/// Direct programs refuse it.
pub const SUBJECT_NAMED: u32 = 2;

/// [`ChainCtx::flags`] and [`BatchCtx::flags`], direct programs only: a hop whose block
/// is not in the mount daemon's hot-block table ends the chain (or the batched lookup)
/// with status MISSING and a resume point, instead of reading the daemon's mapping, which
/// would wait for the disk one block at a time. The block is noted as wanted, and the
/// daemon reads the blocks wanted together.
///
/// `missing` comes back 0: a direct caller is not told device offsets. The caller resumes
/// as after any MISSING, with `missing` set to anything but u64::MAX. The first hop of
/// the resumed lookup may then read the mapping (its block's read is under way, so the
/// waits overlap); later hops stop again at blocks the table lacks.
///
/// Privileged programs ignore the flag, and so do direct programs of a mount whose table
/// has under 64 slots (`-o hot=0` makes one).
pub const TABLE_ONLY: u32 = 4;

/// One lookup of a batch.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLookup {
    /// In: index in the batch's files of the first hop's file.
    pub start_file: u32,
    /// Out: a `status::*` value.
    pub status: i32,
    /// In: byte offset of the first hop.
    pub start_offset: u64,
    /// Out: hops taken.
    pub hops: u32,
    /// In and out: as [`ChainCtx::start_hop`] (with MISSING, the start fields and the
    /// scratch say where to resume).
    pub start_hop: u32,
    /// In and out: as [`ChainCtx::missing`].
    pub missing: u64,
    /// In and out: the first BATCH_SCRATCH_SIZE bytes of the lookup's scratch.
    pub scratch: [u8; BATCH_SCRATCH_SIZE],
}

impl Default for BatchLookup {
    fn default() -> Self {
        Self {
            start_file: 0,
            status: 0,
            start_offset: 0,
            hops: 0,
            start_hop: 0,
            missing: u64::MAX,
            scratch: [0; BATCH_SCRATCH_SIZE],
        }
    }
}

/// Arguments and results of a batch of independent lookups over the same files: the
/// context of the driver's batch program. One crossing runs up to MAX_BATCH lookups.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchCtx {
    /// In: the files the lookups may read.
    pub files: [ChainFile; MAX_CHAIN_FILES],
    /// In: valid entries in `files`.
    pub file_count: u32,
    /// In: hops at most per lookup (clamped to MAX_HOPS).
    pub hop_limit: u32,
    /// In: bytes copied per hop (as [`ChainCtx::read_len`]).
    pub read_len: u32,
    /// In: lookups in `lookups` (1..=MAX_BATCH).
    pub count: u32,
    /// In: the caller's read-only mapping of the device.
    pub map_addr: u64,
    pub map_len: u64,
    /// In: as in [`ChainCtx`].
    pub subject_uid: u32,
    pub subject_gid: u32,
    pub subject_cgroup: u64,
    /// In: as [`ChainCtx::flags`].
    pub flags: u32,
    /// Out: lookups that finished with status DONE.
    pub done: u32,
    /// The lookups.
    pub lookups: [BatchLookup; MAX_BATCH],
}

impl Default for BatchCtx {
    fn default() -> Self {
        Self {
            files: [ChainFile::default(); MAX_CHAIN_FILES],
            file_count: 0,
            hop_limit: 0,
            read_len: 0,
            count: 0,
            map_addr: 0,
            map_len: 0,
            subject_uid: 0,
            subject_gid: 0,
            subject_cgroup: 0,
            flags: 0,
            done: 0,
            lookups: [BatchLookup::default(); MAX_BATCH],
        }
    }
}

/// What `next` reads and writes at each hop: a per-task map value the driver fills (one
/// per calling thread, so no other chain can touch it while this one sleeps on a fault).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HopState {
    /// In: hop number, from 0.
    pub hop: u32,
    /// In: index in the chain's files of the block's file.
    pub file: u32,
    /// In: byte offset the data was read from.
    pub offset: u64,
    /// In: bytes valid in `data`.
    pub data_len: u32,
    /// Out (NEXT_CONTINUE): offsets written to `next_offset` (0..=MAX_FANOUT; 0 ends the
    /// branch).
    pub next_count: u32,
    /// Out: file index of each next offset.
    pub next_file: [u32; MAX_FANOUT],
    /// Out: the next offsets.
    pub next_offset: [u64; MAX_FANOUT],
    /// In and out: the application's scratch.
    pub scratch: [u8; SCRATCH_SIZE],
    /// In: the bytes read at `offset`.
    pub data: [u8; BLOCK_SIZE],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] integers and byte arrays with no implicit padding (sizes are
    // asserted below and in the C header test).
    unsafe impl aya::Pod for super::ChainCtx {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ChainFile {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BatchCtx {}
    // SAFETY: as above (explicit padding field).
    unsafe impl aya::Pod for super::RegisterCtx {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TicketKey {}
}

const _: () = assert!(size_of::<ChainFile>() == 16);
const _: () = assert!(size_of::<RegisterCtx>() == 24);
const _: () = assert!(size_of::<BatchLookup>() == 32 + BATCH_SCRATCH_SIZE);
const _: () = assert!(size_of::<BatchCtx>() == 64 + 16 + 16 + 8 + 8 + 8 + MAX_BATCH * 64);
const _: () = assert!(size_of::<ChainCtx>() == 64 + 16 + 8 + 8 + 8 + 8 + 8 + 8 + 16 + SCRATCH_SIZE);
const _: () = assert!(size_of::<HopState>() == 24 + 16 + 32 + SCRATCH_SIZE + BLOCK_SIZE);
