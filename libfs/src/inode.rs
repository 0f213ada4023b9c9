//! Inode layer: the inode table, its cache, and the storage that B+trees of an inode
//! (extents, directory entries, xattrs) use.
//!
//! Interface: [`Inode`] (native-typed copy of a [`DiskInode`]), [`InodeTable`]
//! (`read` / `write` through the journal with an LRU of decoded inodes), and
//! [`Meta`], the bundle of lower layers every upper layer works through.
//!
//! Invariants: an inode slot is free iff its 256 bytes are zero... or its mode is 0 after
//! a delete (generation kept so a reused number gets a newer generation). Every
//! non-zero slot carries a valid crc32c seeded with its inode number.

use crate::alloc::{BlockAllocator, InodeAllocator};
use crate::btree::NodeStore;
use crate::cache::BoundedLru;
use crate::error::{Error, Result};
use crate::format::{
    Block, DiskExtent, DiskInode, BLOCK_SIZE, EXTENT_FLAG_UNWRITTEN, INLINE_EXTENTS,
    INODES_PER_BLOCK, INODE_SIZE, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG,
};
use crate::journal::Journal;
use std::sync::Arc;
use zerocopy::little_endian::{I64, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

/// One extent of a file: `length` blocks from file block `logical` live at device block
/// `physical` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    /// Allocated by fallocate and never written: reads as zeros.
    pub unwritten: bool,
}

impl Extent {
    /// First file block after the extent.
    pub fn logical_end(&self) -> u64 {
        self.logical + self.length
    }

    pub(crate) fn from_disk(disk: &DiskExtent) -> Self {
        Self {
            logical: disk.logical.get(),
            physical: disk.physical.get(),
            length: u64::from(disk.length.get()),
            unwritten: disk.flags.get() & EXTENT_FLAG_UNWRITTEN != 0,
        }
    }

    pub(crate) fn to_disk(self) -> DiskExtent {
        DiskExtent {
            logical: U64::new(self.logical),
            physical: U64::new(self.physical),
            length: U32::new(self.length as u32),
            flags: U32::new(if self.unwritten {
                EXTENT_FLAG_UNWRITTEN
            } else {
                0
            }),
        }
    }
}

/// An inode in memory, with native integer fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub flags: u32,
    pub nlink: u32,
    pub size: u64,
    pub generation: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub crtime_ns: i64,
    pub blocks: u64,
    pub parent: u64,
    pub xattr_root: u64,
    pub next_orphan: u64,
    pub tree_root: u64,
    pub rdev: u32,
    pub extent_count: u32,
    /// Inline extents (used when the extent map is not a tree).
    pub inline: Vec<Extent>,
}

impl Inode {
    fn from_disk(ino: u64, disk: &DiskInode) -> Self {
        let count = (disk.extent_count.get() as usize).min(INLINE_EXTENTS);
        let inline = if disk.flags.get() & crate::format::INODE_FLAG_EXTENT_TREE == 0 {
            disk.extents[..count]
                .iter()
                .map(Extent::from_disk)
                .collect()
        } else {
            Vec::new()
        };
        Self {
            ino,
            mode: disk.mode.get(),
            uid: disk.uid.get(),
            gid: disk.gid.get(),
            flags: disk.flags.get(),
            nlink: disk.nlink.get(),
            size: disk.size.get(),
            generation: disk.generation.get(),
            atime_ns: disk.atime_ns.get(),
            mtime_ns: disk.mtime_ns.get(),
            ctime_ns: disk.ctime_ns.get(),
            crtime_ns: disk.crtime_ns.get(),
            blocks: disk.blocks.get(),
            parent: disk.parent.get(),
            xattr_root: disk.xattr_root.get(),
            next_orphan: disk.next_orphan.get(),
            tree_root: disk.tree_root.get(),
            rdev: disk.rdev.get(),
            extent_count: disk.extent_count.get(),
            inline,
        }
    }

    fn to_disk(&self) -> DiskInode {
        let mut disk = DiskInode::zeroed();
        disk.mode = U32::new(self.mode);
        disk.uid = U32::new(self.uid);
        disk.gid = U32::new(self.gid);
        disk.flags = U32::new(self.flags);
        disk.nlink = U32::new(self.nlink);
        disk.size = U64::new(self.size);
        disk.generation = U64::new(self.generation);
        disk.atime_ns = I64::new(self.atime_ns);
        disk.mtime_ns = I64::new(self.mtime_ns);
        disk.ctime_ns = I64::new(self.ctime_ns);
        disk.crtime_ns = I64::new(self.crtime_ns);
        disk.blocks = U64::new(self.blocks);
        disk.parent = U64::new(self.parent);
        disk.xattr_root = U64::new(self.xattr_root);
        disk.next_orphan = U64::new(self.next_orphan);
        disk.tree_root = U64::new(self.tree_root);
        disk.rdev = U32::new(self.rdev);
        disk.extent_count = U32::new(self.extent_count);
        for (slot, extent) in disk.extents.iter_mut().zip(&self.inline) {
            *slot = extent.to_disk();
        }
        disk.crc = U32::new(disk.compute_crc(self.ino));
        disk
    }

    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
    /// A new inode with one link, no data, all times `now`.
    pub fn new(ino: u64, mode: u32, uid: u32, gid: u32, generation: u64, now: i64) -> Self {
        Self {
            mode,
            uid,
            gid,
            nlink: 1,
            generation,
            atime_ns: now,
            mtime_ns: now,
            ctime_ns: now,
            crtime_ns: now,
            ..Self::free_slot(ino, generation)
        }
    }

    /// A free inode slot that remembers the generation its next user must exceed.
    pub fn free_slot(ino: u64, generation: u64) -> Self {
        let mut inode = Self::from_disk(ino, &DiskInode::zeroed());
        inode.generation = generation;
        inode
    }

    /// Data operations (write, truncate, fallocate) apply to regular files only.
    pub fn check_regular(&self) -> Result<()> {
        if self.is_dir() {
            return Err(Error::IsDir);
        }
        if !self.is_reg() {
            return Err(Error::Invalid(format!(
                "inode {} is not a regular file",
                self.ino
            )));
        }
        Ok(())
    }

    /// Whether the inode is in use.
    pub fn is_allocated(&self) -> bool {
        self.mode != 0
    }
}

/// The inode table with an LRU of decoded inodes.
#[derive(Debug)]
pub struct InodeTable {
    start: u64,
    count: u64,
    cache: BoundedLru<u64, Inode>,
    /// Inodes written by the current operation (dropped from the cache on rollback).
    touched: Vec<u64>,
}

impl InodeTable {
    pub fn new(start: u64, count: u64, cache_inodes: usize) -> Self {
        Self {
            start,
            count,
            cache: BoundedLru::new(cache_inodes.max(16)),
            touched: Vec::new(),
        }
    }

    /// Block and byte offset of an inode.
    fn location(&self, ino: u64) -> Result<(u64, usize)> {
        if ino == 0 || ino >= self.count {
            return Err(Error::Invalid(format!(
                "inode number {ino} out of range 1..{}",
                self.count
            )));
        }
        let block = self.start + ino / INODES_PER_BLOCK as u64;
        let offset = (ino as usize % INODES_PER_BLOCK) * INODE_SIZE;
        Ok((block, offset))
    }

    /// Reads an inode (allocated or not). A slot that is not all zeros must have a
    /// valid crc.
    pub fn read(&mut self, journal: &mut Journal, ino: u64) -> Result<Inode> {
        if let Some(inode) = self.cache.get(&ino) {
            return Ok(inode.clone());
        }
        let (block_nr, offset) = self.location(ino)?;
        let block = journal.read(block_nr)?;
        let raw = &block[offset..offset + INODE_SIZE];
        let disk = DiskInode::read_from_bytes(raw)
            .map_err(|_| Error::corrupt(block_nr, format!("inode {ino}: truncated")))?;
        if raw.iter().any(|b| *b != 0) && disk.crc.get() != disk.compute_crc(ino) {
            return Err(Error::corrupt(
                block_nr,
                format!("inode {ino}: bad checksum"),
            ));
        }
        let inode = Inode::from_disk(ino, &disk);
        validate(&inode, block_nr)?;
        self.cache.put(ino, inode.clone());
        Ok(inode)
    }

    /// Writes an inode through the journal.
    pub fn write(&mut self, journal: &mut Journal, inode: &Inode) -> Result<()> {
        let (block_nr, offset) = self.location(inode.ino)?;
        let mut block: Block = *journal.read(block_nr)?;
        block[offset..offset + INODE_SIZE].copy_from_slice(inode.to_disk().as_bytes());
        journal.write(block_nr, block)?;
        self.cache.put(inode.ino, inode.clone());
        self.touched.push(inode.ino);
        Ok(())
    }

    pub fn begin_op(&mut self) {
        self.touched.clear();
    }

    /// Forgets the cached copies of inodes the operation wrote: the journal rollback
    /// restored their blocks, so the next read decodes the old values.
    pub fn rollback_op(&mut self) {
        self.rollback_to(0);
    }

    pub fn savepoint(&self) -> usize {
        self.touched.len()
    }

    /// Forgets cached inodes written since `savepoint`.
    pub fn rollback_to(&mut self, savepoint: usize) {
        for ino in self.touched.drain(savepoint.min(self.touched.len())..) {
            self.cache.pop(&ino);
        }
    }

    /// Number of inode slots (valid numbers are 1..count).
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Checks the fields of an inode that the upper layers rely on.
fn validate(inode: &Inode, block: u64) -> Result<()> {
    if !inode.is_allocated() {
        return Ok(());
    }
    let ino = inode.ino;
    if inode.flags & crate::format::INODE_FLAG_EXTENT_TREE == 0 {
        if inode.extent_count as usize > INLINE_EXTENTS {
            return Err(Error::corrupt(
                block,
                format!("inode {ino}: {} inline extents", inode.extent_count),
            ));
        }
        let mut previous_end = 0;
        for extent in &inode.inline {
            if extent.length == 0 || extent.logical < previous_end {
                return Err(Error::corrupt(
                    block,
                    format!("inode {ino}: inline extents overlap or are empty"),
                ));
            }
            previous_end = extent.logical_end();
        }
    } else if inode.tree_root == 0 {
        return Err(Error::corrupt(
            block,
            format!("inode {ino}: extent tree flag without a root"),
        ));
    }
    if inode.is_dir() && inode.tree_root == 0 {
        return Err(Error::corrupt(
            block,
            format!("inode {ino}: directory without an entry tree"),
        ));
    }
    Ok(())
}

/// Everything below the inode layer, bundled: what every upper layer works through.
#[derive(Debug)]
pub struct Meta {
    pub journal: Journal,
    pub blocks: BlockAllocator,
    pub inode_alloc: InodeAllocator,
    pub inodes: InodeTable,
    pub total_blocks: u64,
    /// First block of the data area: extents and tree nodes lie in [data_start, total).
    pub data_start: u64,
}

impl NodeStore for Meta {
    fn read(&mut self, block: u64) -> Result<Arc<Block>> {
        if block < self.data_start || block >= self.total_blocks {
            return Err(Error::corrupt(
                block,
                "tree node pointer outside the device",
            ));
        }
        self.journal.read(block)
    }
    fn write(&mut self, block: u64, data: &Block) -> Result<()> {
        self.journal.write(block, *data)
    }
    fn alloc(&mut self) -> Result<u64> {
        let (block, _) = self.blocks.allocate(&mut self.journal, None, 1)?;
        Ok(block)
    }
    fn free(&mut self, block: u64) -> Result<()> {
        self.blocks.free(&mut self.journal, block, 1)
    }
}

/// A point inside an operation that [`Meta::rollback_to`] returns every layer to.
#[derive(Debug, Clone, Copy)]
pub struct Savepoint {
    journal: usize,
    blocks: usize,
    inode_alloc: usize,
    inodes: usize,
}

impl Meta {
    pub fn savepoint(&self) -> Savepoint {
        Savepoint {
            journal: self.journal.savepoint(),
            blocks: self.blocks.savepoint(),
            inode_alloc: self.inode_alloc.savepoint(),
            inodes: self.inodes.savepoint(),
        }
    }

    pub fn rollback_to(&mut self, savepoint: Savepoint) {
        self.journal.rollback_to(savepoint.journal);
        self.blocks.rollback_to(savepoint.blocks);
        self.inode_alloc.rollback_to(savepoint.inode_alloc);
        self.inodes.rollback_to(savepoint.inodes);
    }
}

/// Size in bytes of an inode's data, rounded up to blocks.
pub fn blocks_for(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE as u64)
}
