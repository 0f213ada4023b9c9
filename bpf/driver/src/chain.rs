//! The chain program: translate, check, copy, call `next`, repeat (DESIGN "The chain").
//!
//! Per hop: look the file up in EXOFS_FILES (registered? same generation?), refuse
//! offsets at or past its size, translate the block through its chunk of EXOFS_EXTENTS
//! (one lookup, a bounded binary search), copy from the caller's read-only mapping of the
//! device into the calling task's HopState with `bpf_copy_from_user`, re-check the generation
//! (as XRP does after data arrives: a file changed during the copy gives STALE and the
//! data is never shown to the caller), then call `next`. Fan-out offsets go on a small
//! stack and are walked depth first; the hop limit bounds the whole chain.
//!
//! Verifier rules followed here: context fields are read and written at constant offsets
//! only (files are copied out one by one, scratch word by word); every loop has a
//! constant bound; lengths passed to helpers are clamped to constants.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{
        bpf_copy_from_user, bpf_get_current_cgroup_id, bpf_get_current_uid_gid, bpf_loop,
        bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use exofs_abi::chain::{
    stats, status, BatchCtx, BatchLookup, ChainCtx, ChainFile, HopState, TicketKey,
    BATCH_SCRATCH_SIZE, BLOCK_SIZE, MAX_BATCH, MAX_CHAIN_FILES, MAX_FANOUT, MAX_HOPS, NEXT_ABORT,
    NEXT_CONTINUE, NEXT_DONE, NO_FAULT, SCRATCH_SIZE, SUBJECT_NAMED, TABLE_ONLY,
};
use exofs_abi::extents::{
    ExtentChunk, ExtentKey, FileInfo, FileKey, EXTENTS_PER_CHUNK, EXTENT_UNWRITTEN,
};

use exofs_abi::policy::{PolicyKey, MODE_KEY, SUBJECT_CGROUP, SUBJECT_GID, SUBJECT_UID};

use crate::task_storage::TaskStorage;
use crate::{daemon, hot};

/// `BPF_F_NO_PREALLOC`: the hash maps take memory for the entries they hold, not for their
/// capacity (preallocated, the extents map alone was 200 MB, charged to the memory cgroup
/// of whoever created it: a mount under a 256 MiB budget could not start).
const BPF_F_NO_PREALLOC: u32 = 1;

/// Registered files.
#[map]
static EXOFS_FILES: HashMap<FileKey, FileInfo> =
    HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// Registered extents, chunked (see exofs_abi::extents).
#[map]
static EXOFS_EXTENTS: HashMap<ExtentKey, ExtentChunk> =
    HashMap::with_max_entries(262144, BPF_F_NO_PREALLOC);

/// The policy (see exofs_abi::policy).
#[map]
static EXOFS_POLICY: HashMap<PolicyKey, exofs_abi::policy::PolicyGrant> =
    HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// Tickets: which uid may run direct chains over which inode (see
/// `exofs_abi::chain::MAP_TICKETS`).
#[map]
static EXOFS_TICKETS: HashMap<TicketKey, u64> = HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// This program's tag (`exofs_abi::policy::program_tag` of its name): each bound program
/// has its own instance of this map, written by kernel-ext when it binds the program.
#[map]
static EXOFS_PROGRAM: Array<u64> = Array::with_max_entries(1, 0);

/// No grant (see `grant_for`).
const NO_GRANT: u64 = u64::MAX;

/// The grant for `ino` and this program of the first subject that has one (uid, gid, then
/// cgroup), as max_hops << 32 | max_batch, or NO_GRANT. (A plain u64 rather than an
/// `Option<PolicyGrant>`: LLVM's code for the option read a clobbered register, which the
/// verifier refused.)
#[inline(always)]
fn grant_for(uid: u32, gid: u32, cgroup: u64, ino: u64, program: u64) -> u64 {
    let subjects = [
        (SUBJECT_UID, uid as u64),
        (SUBJECT_GID, gid as u64),
        (SUBJECT_CGROUP, cgroup),
    ];
    for (kind, id) in subjects {
        if kind == SUBJECT_CGROUP && cgroup == NO_GRANT {
            break;
        }
        let key = PolicyKey {
            kind,
            _pad: 0,
            id,
            ino,
            program,
        };
        // SAFETY: the map's values are plain integers, read at once.
        if let Some(grant) = unsafe { EXOFS_POLICY.get(&key) } {
            return (grant.max_hops as u64) << 32 | grant.max_batch as u64;
        }
    }
    NO_GRANT
}

/// What `allowed` returns when the policy allows the chain (else a `stats::DENIED_*`).
const ALLOWED: u32 = 0;

/// Whether the policy lets the subject run a chain of at most `hops` hops (and, for a
/// batch, `batch` lookups) over the first `file_count` of `files` with this program:
/// ALLOWED, or the `stats::DENIED_*` reason. Open when the policy map has no mode entry.
/// The subject is the calling task, or, when the context names one ([`NAMED_BIT`] of
/// `limits`, never set for direct programs) and the caller is the speaker (the registered
/// mount daemon, see `daemon`), the uid, gid and cgroup it names. A direct program
/// ([`TICKET_BIT`]) also needs the caller's uid to hold a ticket for every file. Small
/// values travel packed (`limits`: hops << 32 | batch << 16 | named << 15 | ticket << 14
/// | file_count; `subject`: uid | gid << 32): with five arguments LLVM read the fifth from
/// r5 after a helper call had clobbered it, which the verifier refused ("R5 !read_ok").
#[inline(never)]
fn allowed(
    files: &[ChainFile; MAX_CHAIN_FILES],
    limits: u64,
    subject: u64,
    subject_cgroup: u64,
) -> u32 {
    let (hops, batch, named, ticket, file_count) = (
        (limits >> 32) as u32,
        (limits >> 16) as u32 & 0xffff,
        limits & NAMED_BIT != 0,
        limits & TICKET_BIT != 0,
        limits & 0x3fff,
    );
    // SAFETY: a lookup of a plain value.
    if unsafe { EXOFS_POLICY.get(&MODE_KEY) }.is_none() {
        return ALLOWED;
    }
    let program = match EXOFS_PROGRAM.get(0) {
        Some(tag) => *tag,
        None => 0,
    };
    let speaker = named && daemon::is_daemon();
    let (uid, gid, cgroup) = if speaker {
        let cgroup = if subject_cgroup == 0 {
            NO_GRANT
        } else {
            subject_cgroup
        };
        (subject as u32, (subject >> 32) as u32, cgroup)
    } else {
        // SAFETY: as above.
        let ids = unsafe { bpf_get_current_uid_gid() };
        // SAFETY: as above.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        (ids as u32, (ids >> 32) as u32, cgroup)
    };
    for (index, file) in files.iter().enumerate() {
        if index as u64 >= file_count {
            break;
        }
        let grant = grant_for(uid, gid, cgroup, file.ino, program);
        if grant == NO_GRANT {
            return stats::DENIED_NO_GRANT;
        }
        if hops > (grant >> 32) as u32 {
            return stats::DENIED_HOPS;
        }
        if batch > grant as u32 {
            return stats::DENIED_BATCH;
        }
        let key = TicketKey {
            uid,
            _pad: 0,
            ino: file.ino,
        };
        // SAFETY: a lookup of a plain value.
        if ticket && unsafe { EXOFS_TICKETS.get(&key) }.is_none() {
            return stats::DENIED_NO_TICKET;
        }
    }
    ALLOWED
}

/// `limits` bit of `allowed`: the context names a subject.
const NAMED_BIT: u64 = 1 << 15;
/// `limits` bit of `allowed`: the caller needs tickets (a direct program).
const TICKET_BIT: u64 = 1 << 14;

/// One block of zeros, never written by anyone: the source that clears the hop state's
/// block buffer at the end of a chain.
#[map]
static EXOFS_ZERO: Array<[u8; BLOCK_SIZE]> = Array::with_max_entries(1, 0);

/// Clears the block buffer (and everything `next` may have left in it) when this chain
/// runs for someone else than the task's previous one, or with another program: a daemon
/// thread serves many callers, and none may see another's blocks; and a grant of one
/// program on a file does not grant another's view of it. A task running its own chains keeps the
/// buffer: clearing 4 KiB on every chain was 8% of a depth-1 chain (perf). (Clearing with a
/// `bpf_copy_from_user` from address 0, which zeroes its destination when it fails, went
/// through a page fault: 15-20%.)
#[inline(always)]
fn clear_if_new_subject(state: &mut HopState, walk: &mut Walk, named: u64, named_cgroup: u64) {
    let program = match EXOFS_PROGRAM.get(0) {
        Some(tag) => *tag,
        None => 0,
    };
    // SAFETY: these helpers take no arguments.
    let subject = unsafe {
        [
            bpf_get_current_uid_gid(),
            bpf_get_current_cgroup_id(),
            named,
            named_cgroup,
            program,
        ]
    };
    if walk.last_subject == subject {
        return;
    }
    walk.last_subject = subject;
    clear_block(state);
}

/// Overwrites the block buffer with zeros from EXOFS_ZERO.
#[inline(always)]
fn clear_block(state: &mut HopState) {
    if let Some(zero) = EXOFS_ZERO.get_ptr(0) {
        // SAFETY: both are BLOCK_SIZE-byte map values.
        unsafe {
            bpf_probe_read_kernel(
                state.data.as_mut_ptr().cast(),
                BLOCK_SIZE as u32,
                zero.cast(),
            )
        };
    }
}

/// Counters, see exofs_abi::chain::stats.
#[map]
static EXOFS_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

/// Adds `amount` to this CPU's counter `index`.
#[inline(always)]
fn count(index: u32, amount: u64) {
    if let Some(counter) = EXOFS_STATS.get_ptr_mut(index) {
        // SAFETY: a live, aligned u64 map value of this CPU.
        unsafe { *counter += amount };
    }
}

/// Counts the hops one call walked for a chain (or a lookup of a batch) and, unless it
/// stopped MISSING to be resumed, the chain's end and outcome.
#[inline(always)]
fn count_chain(result: i32, walked: u64) {
    count(stats::HOPS, walked);
    if result == status::MISSING {
        return;
    }
    count(stats::CHAINS, 1);
    let outcome = match result {
        status::DONE => stats::DONE,
        status::STALE => stats::STALE,
        status::DENIED => stats::DENIED,
        status::ABORTED | status::HOP_LIMIT => stats::ABORTED,
        _ => stats::REJECTED,
    };
    count(outcome, 1);
}

/// The hop state `next` works on, one per task (see `task_storage` for why not per CPU).
/// `next` is handed a pointer to this value alone: the verifier bounds its accesses to
/// it, so application code can never reach the walk's own state below.
#[link_section = "maps"]
#[no_mangle]
static EXOFS_HOP: TaskStorage<HopState> = TaskStorage::new();

/// The walk's state, one per task, private to the driver.
#[link_section = "maps"]
#[no_mangle]
static EXOFS_WALK: TaskStorage<Walk> = TaskStorage::new();

/// Pending fan-out offsets (a power of two; at most STACK - MAX_FANOUT are pending).
const STACK: usize = 32;

const SCRATCH_WORDS: usize = SCRATCH_SIZE / 8;
const SCRATCH_WORD: usize = core::mem::offset_of!(ChainCtx, scratch) / 8;

/// The walk's state. It lives in a map value rather than on the stack so that the
/// verifier sees its counters as unknown numbers: on the stack they are exact constants,
/// and every combination of them became a separate state to verify in each `bpf_loop`
/// iteration (over 1M instructions processed).
#[repr(C)]
pub struct Walk {
    files: [ChainFile; MAX_CHAIN_FILES],
    file_count: u64,
    read_len: u64,
    hop_limit: u64,
    map_addr: u64,
    map_len: u64,
    /// Offsets on the fan-out stack.
    depth: u64,
    hops: u64,
    status: i64,
    /// NO_FAULT or 0.
    flags: u64,
    /// The block (device offset) a NO_FAULT chain may still wait for: the one the
    /// caller has just read into the page cache (u64::MAX: none).
    may_wait: u64,
    /// The number of the chain's (or the running lookup's) first hop.
    first_hop: u64,
    /// With status MISSING: device offset of the block that was not in memory, and the
    /// number of the hop that needed it.
    missing: u64,
    missing_hop: u64,
    pending_file: [u32; STACK],
    pending_offset: [u64; STACK],
    /// Batches: the lookup running, how many there are, its hop, lookups done.
    lookup: u64,
    count: u64,
    lookup_hop: u64,
    done: u64,
    /// Who the task's last chain ran for: the caller's uid/gid and cgroup, and the
    /// subject it named, and the program. The block buffer is cleared when this changes
    /// (see `clear_if_new_subject`).
    last_subject: [u64; 5],
    /// Direct programs: the number of the daemon's registration the walk reads through.
    daemon_seq: u64,
    /// Direct programs: 1 once a hop of this call was served from the hot-block table.
    hot_used: u64,
    batch: [BatchLookup; MAX_BATCH],
}

/// What each `bpf_loop` iteration gets: the two task values, looked up once per chain.
#[repr(C)]
struct Values {
    state: *mut HopState,
    walk: *mut Walk,
}

/// Where the application's `next` goes. The binder (kernel-ext `binder`) cuts this
/// function out of the linked driver and puts the application's `next` and its callees in
/// its place; the driver as built never runs a chain on its own. The body reads the state
/// through a volatile load so that the compiler can neither inline the call nor fold its
/// result into the caller.
#[no_mangle]
#[inline(never)]
pub extern "C" fn exofs_next(state: *mut HopState) -> i32 {
    // SAFETY: the driver passes its live hop state.
    if unsafe { core::ptr::read_volatile(&(*state).data_len) } == u32::MAX {
        NEXT_DONE
    } else {
        NEXT_ABORT
    }
}

/// The arguments a single chain and a batch share, read from either context.
struct Header {
    files: [ChainFile; MAX_CHAIN_FILES],
    file_count: u64,
    read_len: u64,
    hop_limit: u32,
    map_addr: u64,
    map_len: u64,
    /// uid | gid << 32, as named by the caller (counts for the speaker only).
    subject: u64,
    /// The cgroup id named by the caller (as `subject`).
    subject_cgroup: u64,
    flags: u32,
}

/// Reads a [`Header`] from a `ChainCtx` or `BatchCtx` pointer, at constant offsets.
macro_rules! header_of {
    ($ctx:expr) => {
        Header {
            files: [
                (*$ctx).files[0],
                (*$ctx).files[1],
                (*$ctx).files[2],
                (*$ctx).files[3],
            ],
            file_count: (*$ctx).file_count as u64,
            read_len: (*$ctx).read_len as u64,
            hop_limit: (*$ctx).hop_limit,
            map_addr: (*$ctx).map_addr,
            map_len: (*$ctx).map_len,
            subject: (*$ctx).subject_uid as u64 | ((*$ctx).subject_gid as u64) << 32,
            subject_cgroup: (*$ctx).subject_cgroup,
            flags: (*$ctx).flags,
        }
    };
}

/// Checks the arguments and the policy for `lookups` lookups, finds the task's hop and
/// walk state, and fills the walk's common fields. Err(status) refuses the call.
///
/// A direct program (`DIRECT`) refuses a context that names a mapping or a subject, or
/// asks for NO_FAULT (it cannot be honoured: a block of another process's mapping can only
/// be read with a copy that may fault), and reads through the registered daemon's mapping.
#[inline(always)]
unsafe fn prepare<const DIRECT: bool>(
    header: &Header,
    lookups: u64,
) -> Result<(*mut HopState, *mut Walk), i32> {
    let (map_addr, map_len, daemon_seq) = if DIRECT {
        if header.map_addr != 0
            || header.map_len != 0
            || header.subject != 0
            || header.subject_cgroup != 0
            || header.flags & (NO_FAULT | SUBJECT_NAMED) != 0
        {
            count(stats::DIRECT_INVALID, 1);
            return Err(status::INVALID);
        }
        let mapping = daemon::mapping();
        (mapping.addr, mapping.len, mapping.seq)
    } else {
        (header.map_addr, header.map_len, 0)
    };
    if header.file_count == 0
        || header.file_count > MAX_CHAIN_FILES as u64
        || header.read_len == 0
        || header.read_len > BLOCK_SIZE as u64
    {
        return Err(status::INVALID);
    }
    let hop_limit = if header.hop_limit > MAX_HOPS {
        MAX_HOPS
    } else {
        header.hop_limit
    };
    let named = if !DIRECT && header.flags & SUBJECT_NAMED != 0 {
        NAMED_BIT
    } else {
        0
    };
    let ticket = if DIRECT { TICKET_BIT } else { 0 };
    let limits = (hop_limit as u64) << 32 | lookups << 16 | named | ticket | header.file_count;
    let verdict = allowed(&header.files, limits, header.subject, header.subject_cgroup);
    if verdict != ALLOWED {
        count(verdict, lookups);
        return Err(status::DENIED);
    }
    if DIRECT && map_len == 0 {
        return Err(status::NO_DAEMON);
    }
    let Some(state) = EXOFS_HOP.current() else {
        return Err(status::INVALID);
    };
    let Some(walk) = EXOFS_WALK.current() else {
        return Err(status::INVALID);
    };
    clear_if_new_subject(
        &mut *state,
        &mut *walk,
        header.subject,
        header.subject_cgroup,
    );
    (*walk).files = header.files;
    (*walk).file_count = header.file_count;
    (*walk).read_len = header.read_len;
    (*walk).hop_limit = hop_limit as u64;
    (*walk).map_addr = map_addr;
    (*walk).map_len = map_len;
    (*walk).daemon_seq = daemon_seq;
    (*walk).hot_used = 0;
    Ok((state, walk))
}

/// [`prepare`] for a chain. Not inlined, so that the header's copy is not on the stack of
/// the function that runs the hops: the application's `next` shares the 512-byte stack
/// with every frame below it.
#[inline(never)]
unsafe fn prepare_chain<const DIRECT: bool>(
    ctx: *mut ChainCtx,
) -> Result<(*mut HopState, *mut Walk), i32> {
    let header = header_of!(ctx);
    prepare::<DIRECT>(&header, 1)
}

/// [`prepare`] for a batch of `lookups` (as [`prepare_chain`]).
#[inline(never)]
unsafe fn prepare_batch<const DIRECT: bool>(
    ctx: *mut BatchCtx,
    lookups: u64,
) -> Result<(*mut HopState, *mut Walk), i32> {
    let header = header_of!(ctx);
    prepare::<DIRECT>(&header, lookups)
}

/// What `step` returns to go on to the next hop.
const KEEP_GOING: i32 = -1;

/// Entry point: runs one chain described by the context and writes status and hops back.
///
/// The hop loop is a `bpf_loop` callback: the verifier checks one hop once, instead of
/// every path through every hop of an unrolled loop (which exceeded its 1M-instruction
/// budget at 64 hops).
#[no_mangle]
#[link_section = "syscall"]
pub extern "C" fn exofs_chain(ctx: *mut c_void) -> i32 {
    chain::<false>(ctx)
}

/// Entry point of direct callers (unprivileged processes): as `exofs_chain`, reading the
/// device through the mount daemon's mapping (see `prepare`).
#[no_mangle]
#[link_section = "syscall"]
pub extern "C" fn exofs_direct_chain(ctx: *mut c_void) -> i32 {
    chain::<true>(ctx)
}

#[inline(always)]
fn chain<const DIRECT: bool>(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<ChainCtx>();
    // SAFETY: the kernel passes the caller's context, at least size_of::<ChainCtx>() bytes
    // (the verifier records the largest offset used; test-run refuses smaller buffers).
    let (result, hops, walked) = unsafe { run::<DIRECT>(ctx) };
    // SAFETY: as above; constant offsets.
    unsafe {
        (*ctx).status = result;
        (*ctx).hops = hops;
    }
    count_chain(result, walked);
    result
}

/// Runs the chain: its status, its hops (counted from hop 0), and the hops this call
/// walked (a resumed chain starts at `start_hop`).
unsafe fn run<const DIRECT: bool>(ctx: *mut ChainCtx) -> (i32, u32, u64) {
    let (state, walk) = match prepare_chain::<DIRECT>(ctx) {
        Ok(values) => values,
        Err(outcome) => return (outcome, 0, 0),
    };
    let words = ctx.cast::<u64>();
    let scratch = (*state).scratch.as_mut_ptr().cast::<u64>();
    for i in 0..SCRATCH_WORDS {
        scratch
            .add(i)
            .write_unaligned(words.add(SCRATCH_WORD + i).read_volatile());
    }
    (*state).next_file = [0; MAX_FANOUT];
    (*state).next_offset = [0; MAX_FANOUT];
    (*walk).pending_file[0] = (*ctx).start_file;
    (*walk).pending_offset[0] = (*ctx).start_offset;
    (*walk).depth = 1;
    (*walk).first_hop = first_hop((*ctx).start_hop, (*walk).hop_limit);
    (*walk).hops = (*walk).first_hop;
    (*walk).status = status::HOP_LIMIT as i64;
    (*walk).flags = (*ctx).flags as u64;
    (*walk).may_wait = (*ctx).missing;
    let mut values = Values { state, walk };
    bpf_loop(
        MAX_HOPS,
        hop::<DIRECT> as *const () as usize as *mut c_void,
        (&mut values as *mut Values).cast(),
        0,
    );
    let mut result = (*walk).status as i32;
    if DIRECT && !served_by_live_daemon(&*walk) {
        // Nothing read from the table leaves: not the hop count, which depends on what
        // was read, nor the bytes in the task's block buffer.
        result = status::NO_DAEMON;
        (*walk).hops = (*walk).first_hop;
        clear_block(&mut *state);
    }
    let resumable = result == status::MISSING && (*walk).depth == 0;
    if result == status::MISSING {
        (*ctx).missing = (*walk).missing;
    }
    if resumable {
        // The hop that missed is still at the bottom of the pending stack.
        (*ctx).start_file = (*walk).pending_file[0];
        (*ctx).start_offset = (*walk).pending_offset[0];
        (*ctx).start_hop = (*walk).missing_hop as u32;
    }
    if result == status::DONE || resumable {
        for i in 0..SCRATCH_WORDS {
            words
                .add(SCRATCH_WORD + i)
                .write_volatile(scratch.add(i).read_unaligned());
        }
    }
    let walked = (*walk).hops.saturating_sub((*walk).first_hop);
    (result, (*walk).hops as u32, walked)
}

/// False if a hop of this call was served from the hot-block table and the daemon that
/// fills the table has died (or unregistered) since: the table is current only while the
/// daemon holds the file system, so the call's data must not be returned. Checked at the
/// end of the call: if the daemon is alive then, it was alive at every hop before.
#[inline(always)]
unsafe fn served_by_live_daemon(walk: &Walk) -> bool {
    walk.hot_used == 0 || daemon::alive(walk.daemon_seq, walk.map_addr)
}

/// The first hop's number as the caller gave it, at most the hop limit (a chain that
/// starts there ends at once with HOP_LIMIT): hop numbers stay far from overflowing, and
/// the hops reported never exceed the limit.
#[inline(always)]
fn first_hop(start_hop: u32, hop_limit: u64) -> u64 {
    if start_hop as u64 > hop_limit {
        hop_limit
    } else {
        start_hop as u64
    }
}

/// One hop (the `bpf_loop` callback): 0 to go on, 1 to stop with `walk.status` set.
extern "C" fn hop<const DIRECT: bool>(index: u64, values: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `run` gave it, to a live `Values` whose
    // pointers are the task's two map values (checked non-null in `run`).
    let (state, walk) = unsafe {
        let values = &*values.cast::<Values>();
        (&mut *values.state, &mut *values.walk)
    };
    // SAFETY: the caller's memory is only read through a helper, map values only through
    // bounds-checked indexes, inside `step`.
    let outcome = unsafe { step::<DIRECT>(state, walk, (walk.first_hop + index) as u32) };
    if outcome == KEEP_GOING {
        return 0;
    }
    walk.status = outcome as i64;
    1
}

unsafe fn step<const DIRECT: bool>(state: &mut HopState, walk: &mut Walk, hop: u32) -> i32 {
    if walk.depth == 0 || walk.depth > STACK as u64 {
        // Every branch ended without NEXT_DONE.
        return status::ABORTED;
    }
    if hop as u64 >= walk.hop_limit {
        return status::HOP_LIMIT;
    }
    walk.depth -= 1;
    let index = (walk.depth as usize) & (STACK - 1);
    let (file, offset) = (walk.pending_file[index] as u64, walk.pending_offset[index]);
    if file >= walk.file_count {
        return status::INVALID;
    }
    let chain_file = walk.files[(file as usize) & (MAX_CHAIN_FILES - 1)];
    let outcome = read_hop::<DIRECT>(state, walk, &chain_file, offset);
    if outcome != status::DONE {
        walk.missing_hop = hop as u64;
        return outcome;
    }
    state.hop = hop;
    state.file = file as u32;
    state.offset = offset;
    state.next_count = 0;
    walk.hops = hop as u64 + 1;
    match exofs_next(state) {
        NEXT_DONE => status::DONE,
        NEXT_CONTINUE => {
            // 0 offsets ends this branch: the walk goes on with the pending ones (and is
            // ABORTED when none is left).
            let count = state.next_count as u64;
            if count > MAX_FANOUT as u64 || walk.depth + MAX_FANOUT as u64 > STACK as u64 {
                return status::INVALID;
            }
            // Copy every fan-out slot, then advance by `count` (the slots past it are
            // never read). Pending offsets are walked from the last one written.
            let depth = walk.depth as usize;
            for k in 0..MAX_FANOUT {
                walk.pending_file[(depth + k) & (STACK - 1)] = state.next_file[k];
                walk.pending_offset[(depth + k) & (STACK - 1)] = state.next_offset[k];
            }
            walk.depth += count;
            KEEP_GOING
        }
        _ => status::ABORTED,
    }
}

/// Expands `$body` once per lookup slot of a batch, with `$i` a literal index: context
/// accesses must be at constant offsets, so the batch is copied in and out slot by slot.
macro_rules! for_each_slot {
    ($i:ident => $body:block) => {
        for_each_slot!(@each $i $body; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21
            22 23 24 25 26 27 28 29 30 31);
    };
    (@each $i:ident $body:block; $($n:literal)*) => {
        $( { const $i: usize = $n; $body } )*
    };
}

const _: () = assert!(MAX_BATCH == 32, "for_each_slot lists 32 slots");
const BATCH_SCRATCH_WORDS: usize = BATCH_SCRATCH_SIZE / 8;

/// Byte offset in the batch context of field `field_offset` of lookup `slot`.
const fn slot_field(slot: usize, field_offset: usize) -> usize {
    core::mem::offset_of!(BatchCtx, lookups)
        + slot * core::mem::size_of::<BatchLookup>()
        + field_offset
}

/// Batch entry point: runs up to MAX_BATCH independent lookups over the same files in one
/// call. One `bpf_loop` walks every hop of every lookup: when a lookup finishes, the next
/// one starts in the same iteration sequence.
#[no_mangle]
#[link_section = "syscall"]
pub extern "C" fn exofs_chain_batch(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<BatchCtx>();
    // SAFETY: the kernel passes the caller's context, at least size_of::<BatchCtx>() bytes;
    // every access below is at a constant offset.
    unsafe { run_batch::<false>(ctx) }
}

/// Batch entry point of direct callers (see `exofs_direct_chain`).
#[no_mangle]
#[link_section = "syscall"]
pub extern "C" fn exofs_direct_batch(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<BatchCtx>();
    // SAFETY: as in `exofs_chain_batch`.
    unsafe { run_batch::<true>(ctx) }
}

unsafe fn run_batch<const DIRECT: bool>(ctx: *mut BatchCtx) -> i32 {
    let bytes = ctx.cast::<u8>();
    let lookups = (*ctx).count as u64;
    if lookups == 0 || lookups > MAX_BATCH as u64 {
        return status::INVALID;
    }
    let (state, walk) = match prepare_batch::<DIRECT>(ctx, lookups) {
        Ok(values) => values,
        Err(outcome) => {
            if outcome == status::DENIED {
                count(stats::CHAINS, lookups);
                count(stats::DENIED, lookups);
            }
            return outcome;
        }
    };
    (*walk).flags = (*ctx).flags as u64;
    (*walk).count = lookups;
    (*walk).lookup = 0;
    (*walk).done = 0;
    for_each_slot!(I => {
        let lookup = &mut (*walk).batch[I];
        lookup.start_file = bytes
            .add(slot_field(I, core::mem::offset_of!(BatchLookup, start_file)))
            .cast::<u32>()
            .read_volatile();
        lookup.start_offset = bytes
            .add(slot_field(I, core::mem::offset_of!(BatchLookup, start_offset)))
            .cast::<u64>()
            .read_volatile();
        lookup.start_hop = bytes
            .add(slot_field(I, core::mem::offset_of!(BatchLookup, start_hop)))
            .cast::<u32>()
            .read_volatile();
        lookup.missing = bytes
            .add(slot_field(I, core::mem::offset_of!(BatchLookup, missing)))
            .cast::<u64>()
            .read_volatile();
        lookup.status = status::INVALID;
        lookup.hops = 0;
        let scratch = lookup.scratch.as_mut_ptr().cast::<u64>();
        for w in 0..BATCH_SCRATCH_WORDS {
            scratch.add(w).write_unaligned(
                bytes
                    .add(slot_field(I, core::mem::offset_of!(BatchLookup, scratch)) + w * 8)
                    .cast::<u64>()
                    .read_volatile(),
            );
        }
    });
    begin_lookup(&mut *state, &mut *walk);
    let mut values = Values { state, walk };
    bpf_loop(
        MAX_BATCH as u32 * (MAX_HOPS + 1),
        batch_hop::<DIRECT> as *const () as usize as *mut c_void,
        (&mut values as *mut Values).cast(),
        0,
    );
    // As for a chain: a dead daemon's table gives no data (no hop counts either). The
    // scratches stay as sent.
    let live = !DIRECT || served_by_live_daemon(&*walk);
    if !live {
        clear_block(&mut *state);
    }
    for_each_slot!(I => {
        let lookup = &(*walk).batch[I];
        bytes
            .add(slot_field(I, core::mem::offset_of!(BatchLookup, status)))
            .cast::<i32>()
            .write_volatile(if live { lookup.status } else { status::NO_DAEMON });
        bytes
            .add(slot_field(I, core::mem::offset_of!(BatchLookup, hops)))
            .cast::<u32>()
            .write_volatile(if live { lookup.hops } else { 0 });
        // A resume point after hops from a dead daemon's table would carry what they
        // read: the fields stay as sent.
        if live {
            bytes
                .add(slot_field(I, core::mem::offset_of!(BatchLookup, missing)))
                .cast::<u64>()
                .write_volatile(lookup.missing);
            bytes
                .add(slot_field(I, core::mem::offset_of!(BatchLookup, start_file)))
                .cast::<u32>()
                .write_volatile(lookup.start_file);
            bytes
                .add(slot_field(I, core::mem::offset_of!(BatchLookup, start_offset)))
                .cast::<u64>()
                .write_volatile(lookup.start_offset);
            bytes
                .add(slot_field(I, core::mem::offset_of!(BatchLookup, start_hop)))
                .cast::<u32>()
                .write_volatile(lookup.start_hop);
        }
        if live {
            let scratch = lookup.scratch.as_ptr().cast::<u64>();
            for w in 0..BATCH_SCRATCH_WORDS {
                bytes
                    .add(slot_field(I, core::mem::offset_of!(BatchLookup, scratch)) + w * 8)
                    .cast::<u64>()
                    .write_volatile(scratch.add(w).read_unaligned());
            }
        }
    });
    (*ctx).done = if live { (*walk).done as u32 } else { 0 };
    status::DONE
}

/// Starts lookup `walk.lookup`: its first offset and hop, its scratch (the rest zeroed).
#[inline(always)]
fn begin_lookup(state: &mut HopState, walk: &mut Walk) {
    let lookup = &walk.batch[(walk.lookup as usize) & (MAX_BATCH - 1)];
    walk.pending_file[0] = lookup.start_file;
    walk.pending_offset[0] = lookup.start_offset;
    walk.depth = 1;
    walk.first_hop = first_hop(lookup.start_hop, walk.hop_limit);
    walk.hops = walk.first_hop;
    walk.lookup_hop = walk.first_hop;
    walk.may_wait = lookup.missing;
    state.scratch = [0; SCRATCH_SIZE];
    state.scratch[..BATCH_SCRATCH_SIZE].copy_from_slice(&lookup.scratch);
    state.next_file = [0; MAX_FANOUT];
    state.next_offset = [0; MAX_FANOUT];
}

/// One hop of a batch (the `bpf_loop` callback): 0 to go on, 1 when every lookup is done.
extern "C" fn batch_hop<const DIRECT: bool>(_index: u64, values: *mut c_void) -> i64 {
    // SAFETY: as in `hop`.
    let (state, walk) = unsafe {
        let values = &*values.cast::<Values>();
        (&mut *values.state, &mut *values.walk)
    };
    // SAFETY: as in `hop`.
    let outcome = unsafe { step::<DIRECT>(state, walk, walk.lookup_hop as u32) };
    if outcome == KEEP_GOING {
        walk.lookup_hop += 1;
        return 0;
    }
    let slot = (walk.lookup as usize) & (MAX_BATCH - 1);
    let hops = walk.hops;
    let missing = walk.missing;
    // As for a single chain: resumable when no other branch was pending.
    let resumable = outcome == status::MISSING && walk.depth == 0;
    let (resume_file, resume_offset, resume_hop) = (
        walk.pending_file[0],
        walk.pending_offset[0],
        walk.missing_hop as u32,
    );
    let lookup = &mut walk.batch[slot];
    lookup.status = outcome;
    lookup.hops = hops as u32;
    if outcome == status::DONE {
        lookup
            .scratch
            .copy_from_slice(&state.scratch[..BATCH_SCRATCH_SIZE]);
        walk.done += 1;
    } else if outcome == status::MISSING {
        lookup.missing = missing;
    }
    if resumable {
        lookup.start_file = resume_file;
        lookup.start_offset = resume_offset;
        lookup.start_hop = resume_hop;
        lookup
            .scratch
            .copy_from_slice(&state.scratch[..BATCH_SCRATCH_SIZE]);
    }
    count_chain(outcome, hops.saturating_sub(walk.first_hop));
    walk.lookup += 1;
    if walk.lookup >= walk.count {
        return 1;
    }
    begin_lookup(state, walk);
    0
}

/// Checks the file, translates `offset`, copies the bytes into `state.data` and re-checks
/// the generation. Returns status::DONE when the data is valid. A direct program copies
/// from the daemon's mapping (a copy that may fault; there is no other way to read another
/// process's memory), every other from the caller's own.
///
/// Not inlined: its frame (map keys, the daemon's task) is gone by the time `step` calls
/// the application's `next`.
#[inline(never)]
unsafe fn read_hop<const DIRECT: bool>(
    state: &mut HopState,
    walk: &mut Walk,
    file: &ChainFile,
    offset: u64,
) -> i32 {
    let (read_len, map_addr, map_len) = (walk.read_len, walk.map_addr, walk.map_len);
    let key = FileKey { ino: file.ino };
    let Some(info) = EXOFS_FILES.get(&key) else {
        return status::NOT_REGISTERED;
    };
    if info.generation != file.generation {
        return status::STALE;
    }
    if offset >= info.size {
        return status::OUT_OF_FILE;
    }
    let block = offset / BLOCK_SIZE as u64;
    let within = offset % BLOCK_SIZE as u64;
    let shift = (info.chunk_shift & 63) as u64;
    let chunk_key = ExtentKey {
        ino: file.ino,
        chunk: block >> shift,
    };
    let Some(chunk) = EXOFS_EXTENTS.get(&chunk_key) else {
        return status::HOLE;
    };
    let physical = translate(chunk, block);
    if physical == NO_BLOCK {
        return status::HOLE;
    }
    // The extents come from the file system, which never maps past its device; checked
    // anyway, before any arithmetic that could wrap.
    if physical >= map_len / BLOCK_SIZE as u64 {
        return status::FAULT;
    }
    let mut len = BLOCK_SIZE as u64 - within;
    if len > read_len {
        len = read_len;
    }
    let device_offset = physical * BLOCK_SIZE as u64 + within;
    if device_offset + len > map_len {
        return status::FAULT;
    }
    let len = (len & (2 * BLOCK_SIZE as u64 - 1)) as u32;
    if len == 0 || len as usize > BLOCK_SIZE {
        return status::INVALID;
    }
    if DIRECT {
        if hot::read(state.data.as_mut_ptr().cast(), physical, within, len) {
            count(stats::HOT_HITS, 1);
            walk.hot_used = 1;
            return checked_again(state, file, len);
        }
        count(stats::HOT_MISSES, 1);
        // TABLE_ONLY: stop here, unless this is the first hop of a lookup resumed after
        // such a stop (`missing` sent), whose block is on its way. A direct caller is
        // not told the block's device offset: `missing` says only that it stopped.
        let resumed_here = walk.may_wait != u64::MAX && walk.hops == walk.first_hop;
        if walk.flags & TABLE_ONLY as u64 != 0 && !resumed_here && hot::served() {
            walk.missing = 0;
            return status::MISSING;
        }
        let ret = daemon::copy_from_daemon(
            state.data.as_mut_ptr().cast(),
            len,
            map_addr + device_offset,
            walk.daemon_seq,
        );
        if ret != 0 {
            return status::NO_DAEMON;
        }
        return checked_again(state, file, len);
    }
    let source = (map_addr + device_offset) as *const c_void;
    // First without faulting: when the page is mapped (warm), this skips the page-fault
    // machinery and the hardened-usercopy checks of bpf_copy_from_user (5% of a warm
    // chain, measured with perf). Not for the block the caller has just read in: that
    // page is in memory but not yet mapped, and the attempt would only fail.
    let block_offset = device_offset - within;
    let awaited = block_offset == walk.may_wait;
    let mut ret = if awaited {
        -1
    } else {
        bpf_probe_read_user(state.data.as_mut_ptr().cast(), len, source)
    };
    if ret != 0 {
        if walk.flags & NO_FAULT as u64 != 0 && !awaited {
            walk.missing = block_offset;
            return status::MISSING;
        }
        // May sleep: faults the page in (from the page cache, or from the disk).
        ret = bpf_copy_from_user(state.data.as_mut_ptr().cast(), len, source);
        if ret != 0 {
            return status::FAULT;
        }
    }
    checked_again(state, file, len)
}

/// The file may have changed while the block was copied: the data is trusted (DONE) only
/// if the generation is still the one the chain started with.
#[inline(always)]
unsafe fn checked_again(state: &mut HopState, file: &ChainFile, len: u32) -> i32 {
    let key = FileKey { ino: file.ino };
    match EXOFS_FILES.get(&key) {
        Some(after) if after.generation == file.generation => {}
        _ => {
            // The block may have gone to another file meanwhile: no later `next` of this
            // task may find its bytes (past a shorter read's end, say).
            clear_block(state);
            return status::STALE;
        }
    }
    state.data_len = len;
    status::DONE
}

/// What `translate` returns for a hole or an unwritten extent.
const NO_BLOCK: u64 = u64::MAX;

/// Device block of `block` through one chunk (bounded binary search), or NO_BLOCK for a
/// hole or an unwritten extent. Not inlined on purpose: the search leaves a different
/// constant in its index registers on each path, and a separate function lets the
/// verifier's paths meet again at the return (state pruning) instead of multiplying
/// through every later hop.
#[inline(never)]
fn translate(chunk: &ExtentChunk, block: u64) -> u64 {
    let count = if chunk.count as usize > EXTENTS_PER_CHUNK {
        EXTENTS_PER_CHUNK
    } else {
        chunk.count as usize
    };
    let (mut low, mut high) = (0usize, count);
    // log2(EXTENTS_PER_CHUNK) + 1 steps always suffice.
    for _ in 0..6 {
        if low >= high {
            break;
        }
        let middle = (low + high) / 2;
        if chunk.extents[middle & (EXTENTS_PER_CHUNK - 1)].logical <= block {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    if low == 0 {
        return NO_BLOCK;
    }
    let entry = &chunk.extents[(low - 1) & (EXTENTS_PER_CHUNK - 1)];
    if block >= entry.logical + entry.length as u64 || entry.flags & EXTENT_UNWRITTEN != 0 {
        return NO_BLOCK;
    }
    entry.physical + block - entry.logical
}
