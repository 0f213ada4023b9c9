//! Out of core, for `exofs bench chain --cache-budget`: the steady state each phase
//! starts from, the blocks its lookups need that are not in memory, and the device's own
//! limit, measured on the same file in the same run.
//!
//! - **Steady state.** A phase starts with the image's page cache dropped, then the upper
//!   levels of the tree that fit in a quarter of the budget read in (what any cache holds
//!   out of core), then as many untimed lookups through the phase's own path as it
//!   measures (its mappings and the budget's share of the lower levels settle). A cold
//!   start would measure the loading of the upper levels instead, which read-around
//!   favours.
//! - **Needed blocks.** The tree is full and its layout known (`FullBtree::path_of`), so
//!   the blocks a phase's lookups read are known without reading them; `mincore` on a
//!   mapping of the image says which are not in memory when the phase starts. Read
//!   amplification is the disk's bytes over 4 KiB times that count.
//! - **The limit.** O_DIRECT 4 KiB reads at random offsets of the index, one at a time
//!   and 32 at a time (io_uring), give the device's IOPS at QD1 and QD32; divided by the
//!   misses per lookup, the best lookups/s a serial and an overlapping path could reach.

use kernel_ext::binding::DeviceMapping;
use kernel_ext::index::FullBtree;
use kernel_ext::ring::Ring;
use libfs::device::AlignedBuffer;
use libfs::Extent;
use std::collections::BTreeSet;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

const BLOCK: u64 = 4096;

/// Device block of file block `block`, through the file's extents.
fn device_block(extents: &[Extent], block: u64) -> Result<u64, String> {
    let index = extents.partition_point(|e| e.logical <= block);
    index
        .checked_sub(1)
        .and_then(|i| extents.get(i))
        .filter(|e| block < e.logical + e.length)
        .map(|e| e.physical + block - e.logical)
        .ok_or_else(|| format!("file block {block} is not mapped"))
}

/// Reads the first `bytes` of the index file (its upper levels) into the page cache, 64
/// KiB at a time on a POSIX_FADV_RANDOM descriptor: with the disk's default read-ahead,
/// a sequential read here asked for 8 MiB windows at once, pages locked for I/O that
/// an 8 MiB budget could not reclaim (the cgroup's OOM killer ended the bench).
pub(crate) fn preload(image: &Path, extents: &[Extent], bytes: u64) -> Result<(), String> {
    const PIECE: u64 = 16 * BLOCK;
    let device = std::fs::File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
    // SAFETY: advice on a descriptor this function owns; no memory is passed.
    let rc = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&device),
            0,
            0,
            libc::POSIX_FADV_RANDOM,
        )
    };
    if rc != 0 {
        return Err(format!(
            "posix_fadvise: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    let mut buffer = vec![0u8; PIECE as usize];
    let mut block = 0;
    while block * BLOCK < bytes {
        // A piece stays inside one extent and inside the levels asked for.
        let at = device_block(extents, block)?;
        let mut blocks = 1;
        while blocks < PIECE / BLOCK
            && (block + blocks) * BLOCK < bytes
            && device_block(extents, block + blocks) == Ok(at + blocks)
        {
            blocks += 1;
        }
        let piece = &mut buffer[..(blocks * BLOCK) as usize];
        device
            .read_exact_at(piece, at * BLOCK)
            .map_err(|e| format!("preloading device byte {}: {e}", at * BLOCK))?;
        block += blocks;
    }
    Ok(())
}

/// Bytes of the top levels that fit in `room` bytes.
pub(crate) fn levels_that_fit(tree: &FullBtree, room: u64) -> u64 {
    (0..=tree.depth)
        .map(|levels| tree.bytes_above(levels))
        .take_while(|bytes| *bytes <= room)
        .last()
        .unwrap_or(0)
}

/// The distinct device blocks the lookups of `keys` (keys are 2 * item) read.
pub(crate) fn needed_blocks(
    tree: &FullBtree,
    extents: &[Extent],
    keys: &[u64],
) -> Result<BTreeSet<u64>, String> {
    let mut blocks = BTreeSet::new();
    for key in keys {
        for offset in tree.path_of(key / 2) {
            blocks.insert(device_block(extents, offset / BLOCK)?);
        }
    }
    Ok(blocks)
}

/// How many of `blocks` are not in the page cache (mincore over a mapping of the image;
/// it faults nothing in).
pub(crate) fn not_cached(mapping: &DeviceMapping, blocks: &BTreeSet<u64>) -> Result<u64, String> {
    let (addr, _) = mapping.range();
    let mut missing = 0;
    for block in blocks {
        let mut resident = 0u8;
        // SAFETY: one page of a live mapping (the block lies inside the device); the
        // kernel writes one byte into `resident`.
        let rc = unsafe {
            libc::mincore(
                (addr + block * BLOCK) as *mut libc::c_void,
                BLOCK as usize,
                &mut resident,
            )
        };
        if rc != 0 {
            return Err(format!("mincore: {}", std::io::Error::last_os_error()));
        }
        missing += u64::from(resident & 1 == 0);
    }
    Ok(missing)
}

/// The device's 4 KiB random-read IOPS at queue depths 1 and 32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceLimit {
    pub(crate) qd1: f64,
    pub(crate) qd32: f64,
}

impl DeviceLimit {
    /// IOPS at the queue depth `path` can keep busy: 32 for the paths that overlap
    /// lookups, 1 for the others.
    pub(crate) fn iops_for(&self, path: &str) -> f64 {
        if matches!(
            path,
            "io_uring_32" | "io_uring_32_direct" | "chain_batch" | "chain_pipelined"
        ) {
            self.qd32
        } else {
            self.qd1
        }
    }
}

/// Measures O_DIRECT 4 KiB reads at random blocks of `blocks` (device block numbers,
/// the index's extent) for `time` at each depth.
pub(crate) fn device_limit(
    image: &Path,
    blocks: std::ops::Range<u64>,
    time: Duration,
) -> Result<DeviceLimit, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(image)
        .map_err(|e| format!("{} with O_DIRECT: {e}", image.display()))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut random_block = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        blocks.start + state.wrapping_mul(0x9e37_79b9_7f4a_7c15) % (blocks.end - blocks.start)
    };
    let mut iops = |depth: usize| -> Result<f64, String> {
        let mut buffers: Vec<AlignedBuffer> = (0..depth)
            .map(|_| AlignedBuffer::new(BLOCK as usize))
            .collect();
        // Declared after the buffers: dropping the ring waits for reads into them.
        let mut ring = Ring::new(depth).map_err(|e| format!("io_uring: {e}"))?;
        let mut submit = |ring: &mut Ring, slot: usize, buffers: &mut [AlignedBuffer]| {
            let entry = io_uring::opcode::Read::new(
                io_uring::types::Fd(fd),
                buffers[slot].as_mut_ptr(),
                BLOCK as u32,
            )
            .offset(random_block() * BLOCK)
            .build()
            .user_data(slot as u64);
            // SAFETY: the buffer stays in `buffers`, which outlives the ring.
            unsafe { ring.push(&entry) }.map_err(|e| format!("io_uring push: {e}"))
        };
        for slot in 0..depth {
            submit(&mut ring, slot, &mut buffers)?;
        }
        let start = Instant::now();
        let mut done = 0u64;
        while start.elapsed() < time {
            for (slot, result) in ring.wait(1).map_err(|e| format!("io_uring: {e}"))? {
                if result != BLOCK as i32 {
                    return Err(format!("O_DIRECT read returned {result}"));
                }
                done += 1;
                submit(&mut ring, slot as usize, &mut buffers)?;
            }
        }
        Ok(done as f64 / start.elapsed().as_secs_f64())
    };
    Ok(DeviceLimit {
        qd1: iops(1)?,
        qd32: iops(32)?,
    })
}
