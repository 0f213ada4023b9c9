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
    helpers::generated::{bpf_copy_from_user, bpf_loop},
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use exofs_abi::chain::{
    stats, status, ChainCtx, ChainFile, HopState, BLOCK_SIZE, MAX_CHAIN_FILES, MAX_FANOUT,
    MAX_HOPS, NEXT_ABORT, NEXT_CONTINUE, NEXT_DONE, SCRATCH_SIZE,
};
use exofs_abi::extents::{
    ExtentChunk, ExtentKey, FileInfo, FileKey, EXTENTS_PER_CHUNK, EXTENT_UNWRITTEN,
};

use crate::task_storage::TaskStorage;

/// Registered files.
#[map]
static EXOFS_FILES: HashMap<FileKey, FileInfo> = HashMap::with_max_entries(16384, 0);

/// Registered extents, chunked (see exofs_abi::extents).
#[map]
static EXOFS_EXTENTS: HashMap<ExtentKey, ExtentChunk> = HashMap::with_max_entries(262144, 0);

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
    pending_file: [u32; STACK],
    pending_offset: [u64; STACK],
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
    let ctx = ctx.cast::<ChainCtx>();
    // SAFETY: the kernel passes the caller's context, at least size_of::<ChainCtx>() bytes
    // (the verifier records the largest offset used; test-run refuses smaller buffers).
    let (result, hops) = unsafe { run(ctx) };
    // SAFETY: as above; constant offsets.
    unsafe {
        (*ctx).status = result;
        (*ctx).hops = hops;
    }
    count(stats::CHAINS, 1);
    count(stats::HOPS, hops as u64);
    let outcome = match result {
        status::DONE => stats::DONE,
        status::STALE => stats::STALE,
        status::DENIED => stats::DENIED,
        status::ABORTED | status::HOP_LIMIT => stats::ABORTED,
        _ => stats::REJECTED,
    };
    count(outcome, 1);
    result
}

unsafe fn run(ctx: *mut ChainCtx) -> (i32, u32) {
    let file_count = (*ctx).file_count as u64;
    let read_len = (*ctx).read_len as u64;
    if file_count == 0
        || file_count > MAX_CHAIN_FILES as u64
        || read_len == 0
        || read_len > BLOCK_SIZE as u64
    {
        return (status::INVALID, 0);
    }
    let hop_limit = if (*ctx).hop_limit > MAX_HOPS {
        MAX_HOPS
    } else {
        (*ctx).hop_limit
    };
    let Some(state) = EXOFS_HOP.current() else {
        return (status::INVALID, 0);
    };
    let Some(walk) = EXOFS_WALK.current() else {
        return (status::INVALID, 0);
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
    (*walk).files = [
        (*ctx).files[0],
        (*ctx).files[1],
        (*ctx).files[2],
        (*ctx).files[3],
    ];
    (*walk).file_count = file_count;
    (*walk).read_len = read_len;
    (*walk).hop_limit = hop_limit as u64;
    (*walk).map_addr = (*ctx).map_addr;
    (*walk).map_len = (*ctx).map_len;
    (*walk).pending_file[0] = (*ctx).start_file;
    (*walk).pending_offset[0] = (*ctx).start_offset;
    (*walk).depth = 1;
    (*walk).hops = 0;
    (*walk).status = status::HOP_LIMIT as i64;
    let mut values = Values { state, walk };
    bpf_loop(
        MAX_HOPS,
        hop as usize as *mut c_void,
        (&mut values as *mut Values).cast(),
        0,
    );
    let result = (*walk).status as i32;
    if result == status::DONE {
        for i in 0..SCRATCH_WORDS {
            words
                .add(SCRATCH_WORD + i)
                .write_volatile(scratch.add(i).read_unaligned());
        }
    }
    // Leave no block behind for the task's next chain, which a daemon thread may run for
    // another caller. bpf_copy_from_user zeroes its destination when the copy fails, and
    // a copy from address 0 always fails: one helper call clears the whole block.
    let _ = bpf_copy_from_user(
        (*state).data.as_mut_ptr().cast(),
        BLOCK_SIZE as u32,
        core::ptr::null(),
    );
    (result, (*walk).hops as u32)
}

/// One hop (the `bpf_loop` callback): 0 to go on, 1 to stop with `walk.status` set.
extern "C" fn hop(index: u64, values: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `run` gave it, to a live `Values` whose
    // pointers are the task's two map values (checked non-null in `run`).
    let (state, walk) = unsafe {
        let values = &*values.cast::<Values>();
        (&mut *values.state, &mut *values.walk)
    };
    // SAFETY: the caller's memory is only read through a helper, map values only through
    // bounds-checked indexes, inside `step`.
    let outcome = unsafe { step(state, walk, index as u32) };
    if outcome == KEEP_GOING {
        return 0;
    }
    walk.status = outcome as i64;
    1
}

unsafe fn step(state: &mut HopState, walk: &mut Walk, hop: u32) -> i32 {
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
    let outcome = read_hop(
        state,
        &chain_file,
        offset,
        walk.read_len,
        walk.map_addr,
        walk.map_len,
    );
    if outcome != status::DONE {
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
            let count = state.next_count as u64;
            if count == 0
                || count > MAX_FANOUT as u64
                || walk.depth + MAX_FANOUT as u64 > STACK as u64
            {
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

/// Checks the file, translates `offset`, copies the bytes into `state.data` and re-checks
/// the generation. Returns status::DONE when the data is valid.
#[inline(always)]
unsafe fn read_hop(
    state: &mut HopState,
    file: &ChainFile,
    offset: u64,
    read_len: u64,
    map_addr: u64,
    map_len: u64,
) -> i32 {
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
    let ret = bpf_copy_from_user(
        state.data.as_mut_ptr().cast(),
        len,
        (map_addr + device_offset) as *const c_void,
    );
    if ret != 0 {
        return status::FAULT;
    }
    // The file may have changed while the block was copied: trust the data only if the
    // generation is still the one the chain started with.
    match EXOFS_FILES.get(&key) {
        Some(after) if after.generation == file.generation => {}
        _ => return status::STALE,
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
