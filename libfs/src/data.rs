//! File data: read, write, truncate, fallocate, on top of the extent map.
//!
//! Data blocks never go through the journal. Ordering rules that keep a crash from
//! showing garbage or another file's bytes:
//!   - a newly allocated block is written in full (zero-filled around the data) before
//!     the transaction that maps it commits (the journal syncs data first);
//!   - fallocated blocks are mapped "unwritten" and read as zeros until written;
//!   - freed blocks are not reused until the free is checkpointed (see `alloc`);
//!   - bytes past the end of file inside its last block are kept zero (truncate clears
//!     them), so a later extension reads zeros.

use crate::error::{Error, Result};
use crate::events::ChangeKind;
use crate::extent::{self, Mapping, MAX_EXTENT_BLOCKS};
use crate::format::{BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::fs::{now_ns, FallocateMode, Inner, MAX_FILE_SIZE};
use crate::inode::{blocks_for, Extent, Inode};

/// Blocks allocated per step of a large write or fallocate.
const ALLOCATION_STEP: u64 = 8192;

/// One piece of a planned read: `len` bytes at `start` of the caller's buffer, read from
/// the device at byte `device`, or zeros (a hole or an unwritten extent).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadPiece {
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) device: Option<u64>,
}

impl ReadPiece {
    /// Fills this piece of `buf`, reading device bytes with `read_at(chunk, offset)`.
    pub(crate) fn read(
        &self,
        buf: &mut [u8],
        mut read_at: impl FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let chunk = &mut buf[self.start..self.start + self.len];
        match self.device {
            Some(at) => read_at(chunk, at),
            None => {
                chunk.fill(0);
                Ok(())
            }
        }
    }
}

impl Inner {
    /// Reads from `offset`, clipped to the file size; holes and unwritten extents read
    /// as zeros.
    pub(crate) fn read_data(
        &mut self,
        inode: &Inode,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let (len, pieces) = self.plan_read(inode, offset, buf.len())?;
        for piece in &pieces {
            piece.read(buf, |chunk, at| self.meta.journal.read_data(chunk, at))?;
        }
        Ok(len)
    }

    /// Where the bytes of a read from `offset` of up to `wanted` bytes are: the count
    /// (clipped to the file size) and the pieces, each on the device or zeros. The plan
    /// stays valid while the blocks cannot be reused (the caller holds the lock, or an
    /// epoch pin taken under it).
    pub(crate) fn plan_read(
        &mut self,
        inode: &Inode,
        offset: u64,
        wanted: usize,
    ) -> Result<(usize, Vec<ReadPiece>)> {
        if offset >= inode.size {
            return Ok((0, Vec::new()));
        }
        let len = (inode.size - offset).min(wanted as u64) as usize;
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < len {
            let pos = offset + done as u64;
            let block = pos / BLOCK_SIZE_U64;
            let (run_end, device) = match extent::lookup(&mut self.meta, inode, block)? {
                Mapping::Mapped(e) => {
                    let start =
                        (e.physical + (block - e.logical)) * BLOCK_SIZE_U64 + pos % BLOCK_SIZE_U64;
                    (
                        e.logical_end() * BLOCK_SIZE_U64,
                        (!e.unwritten).then_some(start),
                    )
                }
                Mapping::Hole { next } => (next.map_or(u64::MAX, |n| n * BLOCK_SIZE_U64), None),
            };
            let n = (run_end - pos).min((len - done) as u64) as usize;
            if let Some(at) = device {
                self.check_data_range(at, n as u64, inode)?;
            }
            pieces.push(ReadPiece {
                start: done,
                len: n,
                device,
            });
            done += n;
        }
        Ok((len, pieces))
    }

    fn check_data_range(&self, at: u64, len: u64, inode: &Inode) -> Result<()> {
        let end = at
            .checked_add(len)
            .ok_or(Error::corrupt(0, "extent overflows"))?;
        if end > self.meta.total_blocks * BLOCK_SIZE_U64 {
            return Err(Error::corrupt(
                inode.tree_root,
                format!("inode {}: extent points past the device end", inode.ino),
            ));
        }
        Ok(())
    }

    /// Writes `data` at `offset`, allocating blocks for holes. Updates the inode in
    /// memory (the caller writes it back). Returns a short count if the device filled up
    /// after part of the data was written.
    pub(crate) fn write_data(
        &mut self,
        inode: &mut Inode,
        offset: u64,
        data: &[u8],
    ) -> Result<usize> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > MAX_FILE_SIZE)
        {
            return Err(Error::TooBig);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let old_blocks = blocks_for(inode.size);
        let mut done = 0usize;
        while done < data.len() {
            // Each step is all or nothing, so a device that fills up part way gives a
            // short count over consistent metadata.
            let savepoint = self.meta.savepoint();
            let before = inode.clone();
            let events = self.pending_events.len();
            match self.write_step(inode, offset + done as u64, &data[done..], old_blocks) {
                Ok(n) => done += n,
                Err(Error::NoSpace) if done > 0 => {
                    self.meta.rollback_to(savepoint);
                    *inode = before;
                    self.pending_events.truncate(events);
                    break;
                }
                Err(e) => return Err(e),
            }
            inode.size = inode.size.max(offset + done as u64);
        }
        let now = now_ns();
        inode.mtime_ns = now;
        inode.ctime_ns = now;
        Ok(done)
    }

    /// Writes a prefix of `data` at `pos` within one extent or one new allocation.
    fn write_step(
        &mut self,
        inode: &mut Inode,
        pos: u64,
        data: &[u8],
        old_blocks: u64,
    ) -> Result<usize> {
        let block = pos / BLOCK_SIZE_U64;
        let in_block = pos % BLOCK_SIZE_U64;
        match extent::lookup(&mut self.meta, inode, block)? {
            Mapping::Mapped(e) if !e.unwritten => {
                let n = (e.logical_end() * BLOCK_SIZE_U64 - pos).min(data.len() as u64) as usize;
                let at = (e.physical + block - e.logical) * BLOCK_SIZE_U64 + in_block;
                self.check_data_range(at, n as u64, inode)?;
                self.meta.journal.write_data(&data[..n], at)?;
                Ok(n)
            }
            Mapping::Mapped(e) => {
                let blocks = e.logical_end() - block;
                let n =
                    self.write_fresh(inode, pos, data, e.physical + block - e.logical, blocks)?;
                extent::mark_written(&mut self.meta, inode, block, blocks_for(pos + n as u64))?;
                Ok(n)
            }
            Mapping::Hole { next } => {
                let wanted = blocks_for(pos + data.len() as u64) - block;
                let room = next.map_or(u64::MAX, |n| n - block);
                let extent = self.map_new_run(inode, block, wanted.min(room), false, old_blocks)?;
                self.write_fresh(inode, pos, data, extent.physical, extent.length)
            }
        }
    }

    /// Allocates up to `max` blocks (at most one step) for the hole at file block
    /// `block`, next to the previous extent when possible, maps them and reports it.
    fn map_new_run(
        &mut self,
        inode: &mut Inode,
        block: u64,
        max: u64,
        unwritten: bool,
        old_blocks: u64,
    ) -> Result<Extent> {
        let goal = self.allocation_goal(inode, block)?;
        let max = max.min(ALLOCATION_STEP).min(MAX_EXTENT_BLOCKS);
        let (physical, length) = self
            .meta
            .blocks
            .allocate(&mut self.meta.journal, goal, max)?;
        let extent = Extent {
            logical: block,
            physical,
            length,
            unwritten,
        };
        extent::insert(&mut self.meta, inode, extent)?;
        inode.blocks += length;
        let kind = if block >= old_blocks {
            ChangeKind::Extend
        } else {
            ChangeKind::Allocate
        };
        self.emit(inode.ino, inode.generation, kind, vec![extent]);
        Ok(extent)
    }

    /// Writes into `blocks` blocks at device block `physical` that hold nothing yet,
    /// file position `pos` at the first one: every whole block is written, zero-filled
    /// around the data. Returns the bytes of `data` written.
    fn write_fresh(
        &mut self,
        inode: &Inode,
        pos: u64,
        data: &[u8],
        physical: u64,
        blocks: u64,
    ) -> Result<usize> {
        let in_block = (pos % BLOCK_SIZE_U64) as usize;
        let n = (blocks * BLOCK_SIZE_U64 - in_block as u64).min(data.len() as u64) as usize;
        let covered = (in_block + n).div_ceil(BLOCK_SIZE);
        let at = physical * BLOCK_SIZE_U64;
        self.check_data_range(at, (covered * BLOCK_SIZE) as u64, inode)?;
        if in_block == 0 && n.is_multiple_of(BLOCK_SIZE) {
            self.meta.journal.write_data(&data[..n], at)?;
        } else {
            let mut buffer = vec![0u8; covered * BLOCK_SIZE];
            buffer[in_block..in_block + n].copy_from_slice(&data[..n]);
            self.meta.journal.write_data(&buffer, at)?;
        }
        Ok(n)
    }

    /// Device block after the extent that ends just before `block`, to keep files
    /// contiguous.
    fn allocation_goal(&mut self, inode: &Inode, block: u64) -> Result<Option<u64>> {
        let Some(previous) = block.checked_sub(1) else {
            return Ok(None);
        };
        Ok(match extent::lookup(&mut self.meta, inode, previous)? {
            Mapping::Mapped(e) => Some(e.physical + e.length),
            Mapping::Hole { .. } => None,
        })
    }

    /// Truncates or extends to `size`.
    pub(crate) fn set_size(&mut self, inode: &mut Inode, size: u64) -> Result<()> {
        if size < inode.size {
            self.zero_tail(inode, size)?;
            self.truncate_blocks(inode, blocks_for(size), ChangeKind::Truncate)?;
        }
        inode.size = size;
        Ok(())
    }

    /// Zeroes the bytes of the block holding `size` that lie at or after it.
    fn zero_tail(&mut self, inode: &Inode, size: u64) -> Result<()> {
        let in_block = size % BLOCK_SIZE_U64;
        if in_block == 0 {
            return Ok(());
        }
        if let Mapping::Mapped(e) = extent::lookup(&mut self.meta, inode, size / BLOCK_SIZE_U64)? {
            if !e.unwritten {
                let at =
                    (e.physical + size / BLOCK_SIZE_U64 - e.logical) * BLOCK_SIZE_U64 + in_block;
                self.check_data_range(at, BLOCK_SIZE_U64 - in_block, inode)?;
                self.meta
                    .journal
                    .write_data(&vec![0u8; (BLOCK_SIZE_U64 - in_block) as usize], at)?;
            }
        }
        Ok(())
    }

    /// Unmaps and frees every block from file block `first` on, in steps: between steps
    /// the size shrinks to the last block still mapped and the journal may commit, so a
    /// crash leaves a shorter but consistent file. Bumps the generation first.
    pub(crate) fn truncate_blocks(
        &mut self,
        inode: &mut Inode,
        first: u64,
        kind: ChangeKind,
    ) -> Result<()> {
        loop {
            let (removed, more) = extent::remove_range(
                &mut self.meta,
                inode,
                first,
                u64::MAX,
                TRUNCATE_STEP_EXTENTS,
            )?;
            if removed.is_empty() {
                return Ok(());
            }
            inode.generation += 1;
            self.free_extents(inode, &removed)?;
            if more {
                let lowest = removed.iter().map(|e| e.logical).min().unwrap_or(first);
                inode.size = inode.size.min(lowest * BLOCK_SIZE_U64);
            }
            self.put(inode)?;
            self.emit(inode.ino, inode.generation, kind, removed);
            if !more {
                return Ok(());
            }
            self.consistent_point()?;
        }
    }

    fn free_extents(&mut self, inode: &mut Inode, removed: &[Extent]) -> Result<()> {
        for piece in removed {
            self.meta
                .blocks
                .free(&mut self.meta.journal, piece.physical, piece.length)?;
            inode.blocks = inode.blocks.saturating_sub(piece.length);
        }
        Ok(())
    }

    pub(crate) fn fallocate(
        &mut self,
        ino: u64,
        offset: u64,
        len: u64,
        mode: FallocateMode,
    ) -> Result<()> {
        if !mode.punch_hole {
            // Before anything changes: making room may commit.
            self.make_room(offset, len)?;
        }
        let mut inode = self.get(ino)?;
        inode.check_regular()?;
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= MAX_FILE_SIZE)
            .ok_or(Error::TooBig)?;
        if len == 0 {
            return Err(Error::Invalid("fallocate of length 0".into()));
        }
        if mode.punch_hole {
            if !mode.keep_size {
                return Err(Error::Unsupported("punch hole without keep size".into()));
            }
            self.punch(&mut inode, offset, end)?;
        } else {
            self.preallocate(&mut inode, offset, end)?;
            if !mode.keep_size && end > inode.size {
                inode.size = end;
            }
        }
        inode.ctime_ns = now_ns();
        self.put(&inode)
    }

    /// Deallocates whole blocks inside [offset, end) and zeroes the partial edges.
    fn punch(&mut self, inode: &mut Inode, offset: u64, end: u64) -> Result<()> {
        let end = end.min(inode.size.max(offset));
        if end <= offset {
            return Ok(());
        }
        let first_whole = offset.div_ceil(BLOCK_SIZE_U64);
        let last_whole = end / BLOCK_SIZE_U64;
        let head_end = (first_whole * BLOCK_SIZE_U64).min(end);
        self.zero_range(inode, offset, head_end)?;
        if last_whole >= first_whole {
            self.zero_range(inode, (last_whole * BLOCK_SIZE_U64).max(offset), end)?;
        }
        if last_whole <= first_whole {
            return Ok(());
        }
        let (removed, _) =
            extent::remove_range(&mut self.meta, inode, first_whole, last_whole, usize::MAX)?;
        if !removed.is_empty() {
            inode.generation += 1;
            self.free_extents(inode, &removed)?;
            self.emit(inode.ino, inode.generation, ChangeKind::Punch, removed);
        }
        inode.mtime_ns = now_ns();
        Ok(())
    }

    /// Writes zeros over [start, end) where blocks are mapped and written.
    fn zero_range(&mut self, inode: &mut Inode, start: u64, end: u64) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        let block = start / BLOCK_SIZE_U64;
        if let Mapping::Mapped(e) = extent::lookup(&mut self.meta, inode, block)? {
            if !e.unwritten {
                let at = (e.physical + block - e.logical) * BLOCK_SIZE_U64 + start % BLOCK_SIZE_U64;
                self.check_data_range(at, end - start, inode)?;
                self.meta
                    .journal
                    .write_data(&vec![0u8; (end - start) as usize], at)?;
            }
        }
        Ok(())
    }

    /// Maps every hole in [offset, end) to unwritten extents.
    fn preallocate(&mut self, inode: &mut Inode, offset: u64, end: u64) -> Result<()> {
        let mut block = offset / BLOCK_SIZE_U64;
        let last = blocks_for(end);
        let old_blocks = blocks_for(inode.size);
        while block < last {
            match extent::lookup(&mut self.meta, inode, block)? {
                Mapping::Mapped(e) => block = e.logical_end(),
                Mapping::Hole { next } => {
                    let hole_end = next.map_or(last, |n| n.min(last));
                    block += self
                        .map_new_run(inode, block, hole_end - block, true, old_blocks)?
                        .length;
                }
            }
        }
        Ok(())
    }
}

/// Extents removed per step of a long truncate.
const TRUNCATE_STEP_EXTENTS: usize = 2048;

/// Whether freeing this inode's blocks may take more than one transaction.
pub(crate) fn freeing_takes_steps(inode: &Inode) -> bool {
    inode.extent_count as usize > TRUNCATE_STEP_EXTENTS
}
