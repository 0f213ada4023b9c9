//! User-space walks of `exofs bench chain`'s B-tree beyond libfs pread: what a user who
//! does not use exofs's chains would write (DESIGN "Performance method").
//!
//! - [`DirectReader`]: one O_DIRECT read per hop, no page cache at all (XRP's baseline).
//! - [`in_flight_walk`]: io_uring keeping up to N lookups in flight, each a small state
//!   machine that submits its next node's read as its current one completes (the strongest
//!   user-space peer out of core: the device's queue stays full). Buffered, or O_DIRECT.
//!
//! Each walk reads device offsets that the caller translates from file offsets (the
//! file's extents), and steps through nodes with `kernel_ext::index::btree_step`, as
//! the chain's `next` does.

use kernel_ext::index::{btree_step, Answer, BtreeStep};
use kernel_ext::ring::Ring;
use libfs::device::{AlignedBuffer, DIRECT_ALIGN};
use std::os::fd::RawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

/// File offset -> device offset.
pub(crate) type Translate<'a> = dyn Fn(u64) -> Result<u64, String> + Sync + 'a;

/// The aligned span of an O_DIRECT read that covers `len` bytes at `offset`.
fn aligned_span(offset: u64, len: usize) -> (u64, usize) {
    let start = offset / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
    let end = (offset + len as u64).next_multiple_of(DIRECT_ALIGN as u64);
    (start, (end - start) as usize)
}

/// Reads nodes of the image with O_DIRECT, through one aligned buffer.
pub(crate) struct DirectReader {
    file: std::fs::File,
    buffer: AlignedBuffer,
}

impl DirectReader {
    pub(crate) fn open(image: &Path) -> Result<Self, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(image)
            .map_err(|e| format!("{} with O_DIRECT: {e}", image.display()))?;
        Ok(Self {
            file,
            buffer: AlignedBuffer::new(2 * DIRECT_ALIGN),
        })
    }

    /// Fills `out` from device offset `at`, reading the aligned blocks around it.
    pub(crate) fn read(&mut self, at: u64, out: &mut [u8]) -> Result<usize, String> {
        let (start, len) = aligned_span(at, out.len());
        if len > self.buffer.len() {
            self.buffer = AlignedBuffer::new(len);
        }
        let buffer = &mut self.buffer[..len];
        self.file
            .read_exact_at(buffer, start)
            .map_err(|e| format!("O_DIRECT read at {start}: {e}"))?;
        let within = (at - start) as usize;
        out.copy_from_slice(&buffer[within..within + out.len()]);
        Ok(out.len())
    }
}

/// One lookup in flight.
struct Slot {
    key: usize,
    hop: u32,
    /// File offset of the node being read.
    offset: u64,
    /// Where in the buffer the node starts (O_DIRECT reads whole aligned blocks).
    within: usize,
    started: Instant,
    buffer: AlignedBuffer,
}

/// Looks every key of `keys` up with up to `in_flight` lookups at once through one
/// io_uring on `fd` (opened with O_DIRECT when `direct`). Returns each key's answer and
/// latency (first submission to last completion, in ns), in the order of `keys`.
pub(crate) fn in_flight_walk(
    fd: RawFd,
    direct: bool,
    translate: &Translate<'_>,
    node_size: usize,
    keys: &[u64],
    in_flight: usize,
) -> Result<Vec<(Answer, u64)>, String> {
    let in_flight = in_flight.clamp(1, keys.len().max(1));
    let span = if direct {
        2 * DIRECT_ALIGN.max(node_size)
    } else {
        node_size
    };
    let mut slots: Vec<Slot> = (0..in_flight)
        .map(|key| Slot {
            key,
            hop: 0,
            offset: 0,
            within: 0,
            started: Instant::now(),
            buffer: AlignedBuffer::new(span),
        })
        .collect();
    // After the buffers: dropping the ring (on any return) waits for their reads.
    let mut ring = Ring::new(in_flight).map_err(|e| format!("io_uring: {e}"))?;
    let mut answers: Vec<Option<(Answer, u64)>> = vec![None; keys.len()];
    // Submits the read of `slot`'s current node.
    let submit = |ring: &mut Ring, index: usize, slot: &mut Slot| {
        let at = translate(slot.offset)?;
        let (start, len) = if direct {
            aligned_span(at, node_size)
        } else {
            (at, node_size)
        };
        slot.within = (at - start) as usize;
        let read = io_uring::opcode::Read::new(
            io_uring::types::Fd(fd),
            slot.buffer.as_mut_ptr(),
            len as u32,
        )
        .offset(start)
        .build()
        .user_data(index as u64);
        // SAFETY: the slot's buffer lives in `slots`, which outlives the ring (the ring
        // waits for its reads when dropped), and a slot has one read in flight at a
        // time, so the kernel writes into memory nobody touches until its completion.
        unsafe { ring.push(&read) }.map_err(|e| format!("io_uring push: {e}"))
    };
    let mut next_key = in_flight;
    let mut busy = 0;
    for (index, slot) in slots.iter_mut().enumerate() {
        if slot.key < keys.len() {
            submit(&mut ring, index, slot)?;
            busy += 1;
        }
    }
    while busy > 0 {
        let done = ring.wait(1).map_err(|e| format!("io_uring: {e}"))?;
        for (index, result) in done {
            let index = index as usize;
            let slot = &mut slots[index];
            if result < (slot.within + node_size) as i32 {
                return Err(format!("read of offset {}: result {result}", slot.offset));
            }
            slot.hop += 1;
            let node = &slot.buffer[slot.within..slot.within + node_size];
            match btree_step(node, slot.offset, keys[slot.key], slot.hop)
                .map_err(|e| e.to_string())?
            {
                BtreeStep::Next(child) => slot.offset = child,
                BtreeStep::Done(answer) => {
                    let ns = slot.started.elapsed().as_nanos() as u64;
                    answers[slot.key] = Some((answer, ns));
                    if next_key == keys.len() {
                        busy -= 1;
                        continue;
                    }
                    slot.key = next_key;
                    next_key += 1;
                    slot.hop = 0;
                    slot.offset = 0;
                    slot.started = Instant::now();
                }
            }
            submit(&mut ring, index, slot)?;
        }
    }
    answers
        .into_iter()
        .map(|answer| answer.ok_or_else(|| "a lookup never finished".to_owned()))
        .collect()
}

/// Opens `image` for reading, with O_DIRECT when `direct`; the descriptor lives as
/// long as the returned file.
pub(crate) fn open_image(image: &Path, direct: bool) -> Result<std::fs::File, String> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options
        .open(image)
        .map_err(|e| format!("{}: {e}", image.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_reads_cover_whole_aligned_blocks() {
        assert_eq!(aligned_span(4096, 4096), (4096, 4096));
        assert_eq!(aligned_span(4096 + 512, 512), (4096, 4096));
        assert_eq!(aligned_span(4000, 200), (0, 8192));
    }
}
