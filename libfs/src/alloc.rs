//! Allocator layer: block and inode bitmaps, and the rules for reusing freed blocks.
//!
//! Interface: [`BlockAllocator`] (`allocate` a run near a goal, `free`, `reclaim`) and
//! [`InodeAllocator`]; [`Epochs`] and [`EpochPin`] let a reader (the kernel binding's
//! chains) hold freed blocks back from reuse.
//!
//! Each bitmap exists twice: on the device (changed only through the journal) and in
//! memory. In memory a bit is set while the block is allocated *or held*. A freed block
//! is held until both:
//!   - a checkpoint has passed the transaction that freed it, so no replay of an older
//!     transaction can write stale metadata over whatever the block holds next, and no
//!     crash can bring back a file that still points at it;
//!   - no epoch pin taken before the free is still alive (see [`Epochs`]).

use crate::error::{Error, Result};
use crate::format::{
    seal_block, verify_block, BITMAP_BITS_PER_BLOCK, BITMAP_DATA_OFFSET, MAGIC_BITMAP,
};
use crate::journal::Journal;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A bitmap on the device mirrored in memory.
#[derive(Debug)]
struct Bitmap {
    /// First device block of the on-disk bitmap.
    start: u64,
    /// Number of valid bits.
    bits: u64,
    /// In-memory bits: set = not allocatable.
    words: Vec<u64>,
    /// Bits set in `words`.
    set_count: u64,
}

impl Bitmap {
    fn load(journal: &mut Journal, start: u64, blocks: u64, bits: u64, what: &str) -> Result<Self> {
        let mut words = vec![0u64; bits.div_ceil(64) as usize];
        for index in 0..blocks {
            let nr = start + index;
            let block = journal.read(nr)?;
            verify_block(&block, MAGIC_BITMAP, nr, what)?;
            let data = &block[BITMAP_DATA_OFFSET..];
            let first_bit = index * BITMAP_BITS_PER_BLOCK;
            for (byte_index, byte) in data.iter().enumerate() {
                if *byte == 0 {
                    continue;
                }
                for bit in 0..8 {
                    if byte & (1 << bit) == 0 {
                        continue;
                    }
                    let global = first_bit + byte_index as u64 * 8 + bit;
                    if global >= bits {
                        return Err(Error::corrupt(
                            nr,
                            format!("{what}: bit {global} set past the end ({bits} bits)"),
                        ));
                    }
                    words[(global / 64) as usize] |= 1 << (global % 64);
                }
            }
        }
        let set_count = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(Self {
            start,
            bits,
            words,
            set_count,
        })
    }

    fn is_set(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn set_memory(&mut self, start: u64, len: u64, value: bool) {
        for bit in start..start + len {
            let word = &mut self.words[(bit / 64) as usize];
            let mask = 1u64 << (bit % 64);
            if value && *word & mask == 0 {
                *word |= mask;
                self.set_count += 1;
            } else if !value && *word & mask != 0 {
                *word &= !mask;
                self.set_count -= 1;
            }
        }
    }

    /// Writes bits [start, start+len) of the on-disk copy through the journal.
    fn set_disk(&self, journal: &mut Journal, start: u64, len: u64, value: bool) -> Result<()> {
        let mut bit = start;
        let end = start + len;
        while bit < end {
            let index = bit / BITMAP_BITS_PER_BLOCK;
            let nr = self.start + index;
            let block_end = ((index + 1) * BITMAP_BITS_PER_BLOCK).min(end);
            let mut block = *journal.read(nr)?;
            verify_block(&block, MAGIC_BITMAP, nr, "bitmap")?;
            for global in bit..block_end {
                let local = global - index * BITMAP_BITS_PER_BLOCK;
                let byte = &mut block[BITMAP_DATA_OFFSET + (local / 8) as usize];
                if value {
                    *byte |= 1 << (local % 8);
                } else {
                    *byte &= !(1 << (local % 8));
                }
            }
            seal_block(&mut block, MAGIC_BITMAP, nr);
            journal.write(nr, block)?;
            bit = block_end;
        }
        Ok(())
    }

    /// First clear bit at or after `from` (wrapping once), and the length of the clear
    /// run there, at most `max_len`.
    fn find_clear_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let from = if from >= self.bits { 0 } else { from };
        let start = self
            .find_clear(from, self.bits)
            .or_else(|| self.find_clear(0, from))?;
        let mut len = 1;
        while len < max_len && start + len < self.bits && !self.is_set(start + len) {
            len += 1;
        }
        Some((start, len))
    }

    fn find_clear(&self, from: u64, to: u64) -> Option<u64> {
        let mut bit = from;
        while bit < to {
            let word = self.words[(bit / 64) as usize] | ((1u64 << (bit % 64)) - 1);
            if word != u64::MAX {
                let found = (bit / 64) * 64 + u64::from(word.trailing_ones());
                return (found < to).then_some(found);
            }
            bit = (bit / 64 + 1) * 64;
        }
        None
    }
}

/// Reader epochs. A reader pins the current epoch while it may read blocks through
/// extents it looked up; each batch of frees is stamped with the epoch current when it
/// happened and advances it. Freed blocks stamped `e` are reused only once no pin `<= e`
/// remains.
#[derive(Debug, Default)]
pub struct Epochs {
    current: AtomicU64,
    pins: Mutex<BTreeMap<u64, usize>>,
}

impl Epochs {
    /// Pins the current epoch until the returned guard is dropped.
    pub fn pin(self: &Arc<Self>) -> EpochPin {
        let mut pins = self.lock();
        let epoch = self.current.load(Ordering::SeqCst);
        *pins.entry(epoch).or_insert(0) += 1;
        EpochPin {
            epochs: self.clone(),
            epoch,
        }
    }

    /// Stamps a free: returns the epoch it belongs to and starts a new one.
    pub fn advance(&self) -> u64 {
        let _pins = self.lock();
        self.current.fetch_add(1, Ordering::SeqCst)
    }

    /// The oldest epoch still pinned.
    pub fn oldest_pinned(&self) -> Option<u64> {
        self.lock().keys().next().copied()
    }

    /// The current epoch.
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, usize>> {
        self.pins
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Holds freed blocks back from reuse while alive (see [`Epochs`]).
#[derive(Debug)]
pub struct EpochPin {
    epochs: Arc<Epochs>,
    epoch: u64,
}

impl EpochPin {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl Drop for EpochPin {
    fn drop(&mut self) {
        let mut pins = self.epochs.lock();
        if let Some(count) = pins.get_mut(&self.epoch) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.epoch);
            }
        }
    }
}

/// A run of freed blocks waiting to become allocatable.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    start: u64,
    len: u64,
}

/// One step to undo when an operation fails.
#[derive(Debug, Clone, Copy)]
enum Undo {
    Allocated { start: u64, len: u64 },
    Freed,
}

/// Block allocator.
#[derive(Debug)]
pub struct BlockAllocator {
    bitmap: Bitmap,
    /// Blocks below this are the fixed metadata regions.
    data_start: u64,
    /// Where the next search starts when the caller has no goal.
    cursor: u64,
    /// Freed in the running transaction.
    running: Vec<Held>,
    /// Freed in committed transactions not yet checkpointed.
    committed: Vec<Held>,
    /// Allocations and frees of the current operation, to undo on failure.
    undo: Vec<Undo>,
    /// Checkpointed, waiting for their epoch to be unpinned.
    waiting: Vec<Held>,
    epochs: Arc<Epochs>,
}

impl BlockAllocator {
    /// Loads the block bitmap.
    pub fn load(
        journal: &mut Journal,
        bitmap_start: u64,
        bitmap_blocks: u64,
        total_blocks: u64,
        data_start: u64,
        epochs: Arc<Epochs>,
    ) -> Result<Self> {
        let bitmap = Bitmap::load(
            journal,
            bitmap_start,
            bitmap_blocks,
            total_blocks,
            "block bitmap",
        )?;
        if let Some(bit) = (0..data_start.min(total_blocks)).find(|bit| !bitmap.is_set(*bit)) {
            return Err(Error::corrupt(
                bitmap_start,
                format!("block bitmap: metadata block {bit} marked free"),
            ));
        }
        Ok(Self {
            bitmap,
            data_start,
            cursor: data_start,
            running: Vec::new(),
            committed: Vec::new(),
            undo: Vec::new(),
            waiting: Vec::new(),
            epochs,
        })
    }

    /// Allocates up to `max_len` contiguous blocks, at `goal` if free, else the next free
    /// run after it. Returns (start, len) with 1 <= len <= max_len.
    pub fn allocate(
        &mut self,
        journal: &mut Journal,
        goal: Option<u64>,
        max_len: u64,
    ) -> Result<(u64, u64)> {
        let from = goal
            .filter(|g| *g >= self.data_start)
            .unwrap_or(self.cursor);
        let (start, len) = self
            .bitmap
            .find_clear_run(from, max_len.max(1))
            .ok_or(Error::NoSpace)?;
        self.bitmap.set_disk(journal, start, len, true)?;
        self.bitmap.set_memory(start, len, true);
        self.cursor = start + len;
        self.undo.push(Undo::Allocated { start, len });
        Ok((start, len))
    }

    /// Frees a run: free on the device at the next commit, reusable once held back long
    /// enough (see the module header).
    pub fn free(&mut self, journal: &mut Journal, start: u64, len: u64) -> Result<()> {
        if start < self.data_start || start + len > self.bitmap.bits {
            return Err(Error::corrupt(
                start,
                format!("free of blocks {start}+{len} outside the data area"),
            ));
        }
        if let Some(bit) = (start..start + len).find(|bit| !self.bitmap.is_set(*bit)) {
            return Err(Error::corrupt(bit, "block freed twice"));
        }
        self.bitmap.set_disk(journal, start, len, false)?;
        let epoch = self.epochs.current();
        self.running.push(Held { epoch, start, len });
        self.undo.push(Undo::Freed);
        Ok(())
    }

    /// Starts an operation (see `rollback_op`).
    pub fn begin_op(&mut self) {
        self.undo.clear();
    }

    /// Undoes the allocations and frees of the current operation.
    pub fn rollback_op(&mut self) {
        self.rollback_to(0);
    }

    /// A point inside the current operation that `rollback_to` can return to.
    pub fn savepoint(&self) -> usize {
        self.undo.len()
    }

    /// Undoes the allocations and frees made since `savepoint`.
    pub fn rollback_to(&mut self, savepoint: usize) {
        while self.undo.len() > savepoint {
            match self.undo.pop() {
                Some(Undo::Allocated { start, len }) => self.bitmap.set_memory(start, len, false),
                Some(Undo::Freed) => {
                    self.running.pop();
                }
                None => break,
            }
        }
    }

    /// Called after the running transaction committed.
    pub fn committed(&mut self) {
        self.committed.append(&mut self.running);
        self.undo.clear();
    }

    /// Called after a checkpoint: blocks freed by committed transactions pass the first
    /// condition (frees of the running transaction do not: it is not in the log yet).
    pub fn checkpointed(&mut self) {
        if !self.committed.is_empty() {
            self.epochs.advance();
            self.waiting.append(&mut self.committed);
        }
        self.reclaim();
    }

    /// Makes waiting blocks allocatable where no older reader pin remains.
    pub fn reclaim(&mut self) {
        let oldest = self.epochs.oldest_pinned();
        let bitmap = &mut self.bitmap;
        self.waiting.retain(|held| {
            let free_now = oldest.is_none_or(|pinned| pinned > held.epoch);
            if free_now {
                bitmap.set_memory(held.start, held.len, false);
            }
            !free_now
        });
    }

    /// True if freed blocks are held back (a checkpoint or unpin may give space).
    pub fn has_held(&self) -> bool {
        !self.running.is_empty() || !self.committed.is_empty() || !self.waiting.is_empty()
    }

    /// Blocks that are free or will be once released.
    pub fn free_blocks(&self) -> u64 {
        let held: u64 = self
            .running
            .iter()
            .chain(&self.committed)
            .chain(&self.waiting)
            .map(|h| h.len)
            .sum();
        self.bitmap.bits - self.bitmap.set_count + held
    }

    /// Blocks free right now.
    pub fn allocatable_blocks(&self) -> u64 {
        self.bitmap.bits - self.bitmap.set_count
    }
}

/// Inode allocator. Freed inodes are reusable at once: inode slots are metadata, so
/// their reuse is ordered by the journal, and readers check the inode generation.
#[derive(Debug)]
pub struct InodeAllocator {
    bitmap: Bitmap,
    cursor: u64,
    /// (inode, was allocated) steps of the current operation.
    undo: Vec<(u64, bool)>,
}

impl InodeAllocator {
    pub fn load(journal: &mut Journal, start: u64, blocks: u64, inode_count: u64) -> Result<Self> {
        let bitmap = Bitmap::load(journal, start, blocks, inode_count, "inode bitmap")?;
        if inode_count > 0 && !bitmap.is_set(0) {
            return Err(Error::corrupt(start, "inode bitmap: inode 0 marked free"));
        }
        Ok(Self {
            bitmap,
            cursor: 1,
            undo: Vec::new(),
        })
    }

    /// Allocates an inode number.
    pub fn allocate(&mut self, journal: &mut Journal) -> Result<u64> {
        let (ino, _) = self
            .bitmap
            .find_clear_run(self.cursor, 1)
            .ok_or(Error::NoInodes)?;
        self.bitmap.set_disk(journal, ino, 1, true)?;
        self.bitmap.set_memory(ino, 1, true);
        self.cursor = ino + 1;
        self.undo.push((ino, true));
        Ok(ino)
    }

    pub fn free(&mut self, journal: &mut Journal, ino: u64) -> Result<()> {
        if ino == 0 || ino >= self.bitmap.bits || !self.bitmap.is_set(ino) {
            return Err(Error::corrupt(
                self.bitmap.start,
                format!("inode {ino} freed but not allocated"),
            ));
        }
        self.bitmap.set_disk(journal, ino, 1, false)?;
        self.bitmap.set_memory(ino, 1, false);
        self.undo.push((ino, false));
        Ok(())
    }

    pub fn begin_op(&mut self) {
        self.undo.clear();
    }

    pub fn rollback_op(&mut self) {
        self.rollback_to(0);
    }

    pub fn savepoint(&self) -> usize {
        self.undo.len()
    }

    pub fn rollback_to(&mut self, savepoint: usize) {
        while self.undo.len() > savepoint {
            let Some((ino, allocated)) = self.undo.pop() else {
                break;
            };
            self.bitmap.set_memory(ino, 1, !allocated);
        }
    }

    pub fn free_inodes(&self) -> u64 {
        self.bitmap.bits - self.bitmap.set_count
    }
}
