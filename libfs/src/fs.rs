//! File-system layer: the public [`Fs`] API (by inode number, as FUSE wants it, plus
//! path helpers), opening, closing, and the operation wrapper.
//!
//! Every operation runs under one lock, between `begin_op` and either success (the
//! running transaction keeps its changes; it is committed when large, on `fsync` /
//! `sync`, and at close) or failure (every block, allocation and cached inode the
//! operation touched is rolled back, so an error such as ENOSPC leaves no partial
//! metadata). Operations longer than one transaction (truncating a file of millions of
//! extents) commit at consistent intermediate points. A panic inside an operation (a
//! bug, an overflow, a device or listener that panics) is caught and counts as a failure:
//! the operation is rolled back and returns `Error::Panicked`, or, where a rollback
//! cannot be trusted (the panic cut a commit short, or listeners were already told of the
//! changes), the file system stops: every later change fails with `Error::Stopped` naming
//! the panic until it is reopened. Either way nothing partial is ever committed; the
//! `operation` module has the wrapper and the argument.
//!
//! Permission checks are the caller's (FUSE `default_permissions`, or a privileged app).

use crate::alloc::{BlockAllocator, EpochPin, Epochs, InodeAllocator};
use crate::device::{BlockDevice, FileDevice};
use crate::error::{Error, Result};
use crate::events::{ChangeKind, ExtentChange, ExtentListener};
use crate::extent;
use crate::format::*;
use crate::inode::{Extent, Inode, InodeTable, Meta};
use crate::journal::{Journal, JournalStats};
use crate::xattr::{self, SetMode};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use zerocopy::little_endian::U64;

mod operation;

/// Options for [`Fs::open`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Byte budget of the metadata block cache.
    pub cache_bytes: usize,
    /// Number of decoded inodes kept in memory.
    pub inode_cache: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            cache_bytes: 64 << 20,
            inode_cache: 65536,
        }
    }
}

impl OpenOptions {
    pub fn read_only() -> Self {
        Self {
            read_only: true,
            ..Self::default()
        }
    }
}

/// Attributes of an inode (what `stat` shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    /// File type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    /// Data blocks of 4 KiB.
    pub blocks: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub crtime_ns: i64,
    pub rdev: u32,
    pub generation: u64,
}

impl Attr {
    pub(crate) fn of(inode: &Inode) -> Self {
        Self {
            ino: inode.ino,
            mode: inode.mode,
            uid: inode.uid,
            gid: inode.gid,
            nlink: inode.nlink,
            size: inode.size,
            blocks: inode.blocks,
            atime_ns: inode.atime_ns,
            mtime_ns: inode.mtime_ns,
            ctime_ns: inode.ctime_ns,
            crtime_ns: inode.crtime_ns,
            rdev: inode.rdev,
            generation: inode.generation,
        }
    }
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
}

/// A time to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Now,
    /// ns since the Unix epoch.
    At(i64),
}

/// Attribute changes for [`Fs::setattr`]; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    /// Permission bits (the file type bits are ignored).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Truncate or extend.
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// How [`Fs::rename`] treats an existing target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RenameMode {
    /// Replace it (POSIX rename).
    #[default]
    Replace,
    /// Fail with `Exists` (RENAME_NOREPLACE).
    NoReplace,
    /// Swap the two entries (RENAME_EXCHANGE).
    Exchange,
}

/// One readdir entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    /// File type bits (S_IFMT part of the mode).
    pub kind: u32,
    /// Cursor to pass to `readdir` to continue after this entry.
    pub next: u64,
}

/// File-system statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    pub block_size: u32,
    pub total_blocks: u64,
    /// Free blocks, including freed ones not yet reusable.
    pub free_blocks: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub name_max: u32,
}

/// fallocate modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FallocateMode {
    /// Do not change the size (FALLOC_FL_KEEP_SIZE).
    pub keep_size: bool,
    /// Deallocate the range (FALLOC_FL_PUNCH_HOLE; requires keep_size).
    pub punch_hole: bool,
}

/// Largest file size supported: 2^52 bytes.
pub const MAX_FILE_SIZE: u64 = 1 << 52;
/// Most links one inode can have.
pub const LINK_MAX: u32 = 65000;

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Mode bits -> directory-entry file type.
pub(crate) fn file_type_of(mode: u32) -> u8 {
    ((mode & S_IFMT) >> 12) as u8
}

/// State behind the lock.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) meta: Meta,
    /// Open handles per inode: an unlinked inode is freed when its last one closes.
    pub(crate) open_counts: HashMap<u64, usize>,
    /// Changes of the running operation, delivered when it succeeds.
    pub(crate) pending_events: Vec<ExtentChange>,
    listeners: Vec<Arc<dyn ExtentListener>>,
    /// Listeners were told of changes since the last `begin_op`: a rollback would
    /// contradict what they were told.
    events_delivered: bool,
    closed: bool,
}

impl std::fmt::Debug for dyn ExtentListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtentListener")
    }
}

/// An open exofs file system.
#[derive(Debug)]
pub struct Fs {
    inner: Mutex<Inner>,
    epochs: Arc<Epochs>,
    device: Arc<dyn BlockDevice>,
    uuid: [u8; 16],
    read_only: bool,
}

impl Fs {
    /// Makes a new file system on all of `device` (see [`crate::mkfs`]).
    pub fn format(
        device: Arc<dyn BlockDevice>,
        options: &crate::mkfs::FormatOptions,
    ) -> Result<crate::mkfs::Geometry> {
        crate::mkfs::format(device, options)
    }

    /// Opens the image or block device at `path`.
    ///
    /// ```no_run
    /// use libfs::{Fs, OpenOptions};
    /// let fs = Fs::open("disk.img".as_ref(), &OpenOptions::default())?;
    /// let attr = fs.lookup(libfs::ROOT_INO, b"hello.txt")?;
    /// let mut buf = vec![0; attr.size as usize];
    /// fs.read_at(attr.ino, 0, &mut buf)?;
    /// fs.close()?;
    /// # Ok::<(), libfs::Error>(())
    /// ```
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Fs> {
        let device = FileDevice::open(path, !options.read_only)?;
        Self::open_device(Arc::new(device), options)
    }

    /// The uuid of the file system on `path`, read from its superblock without opening it
    /// (no lock, no journal replay): what names a mounted image's kernel objects while the
    /// mount daemon holds it.
    pub fn peek_uuid(path: &Path) -> Result<[u8; 16]> {
        use std::io::Read;
        let mut raw = [0u8; BLOCK_SIZE];
        std::fs::File::open(path)
            .and_then(|mut file| file.read_exact(&mut raw))
            .map_err(|err| {
                Error::Io(std::io::Error::new(
                    err.kind(),
                    format!("{}: {err}", path.display()),
                ))
            })?;
        verify_block(&raw, MAGIC_SUPER, 0, "superblock")?;
        let superblock: Superblock = read_struct(&raw, 0, "superblock")?;
        Ok(superblock.uuid)
    }

    /// Opens a file system on any device: replays the journal, loads the bitmaps, and
    /// (read-write) frees inodes left on the orphan list by a crash.
    pub fn open_device(device: Arc<dyn BlockDevice>, options: &OpenOptions) -> Result<Fs> {
        let (journal_start, journal_blocks, _note) =
            crate::superblock::locate_journal(&*device, options.read_only)?;
        let mut journal = Journal::open(
            device.clone(),
            journal_start,
            journal_blocks,
            options.cache_bytes,
            options.read_only,
        )?;
        // The journal may have held a newer superblock.
        let sb = crate::superblock::check_superblock(
            &*journal.read(0)?,
            device.size(),
            options.read_only,
        )?;
        if (sb.journal_start.get(), sb.journal_blocks.get()) != (journal_start, journal_blocks) {
            return Err(Error::corrupt(
                0,
                "superblock and journal header disagree on the journal",
            ));
        }
        let epochs = Arc::new(Epochs::default());
        let blocks = BlockAllocator::load(
            &mut journal,
            sb.bitmap_start.get(),
            sb.bitmap_blocks.get(),
            sb.total_blocks.get(),
            sb.data_start.get(),
            epochs.clone(),
        )?;
        let inode_alloc = InodeAllocator::load(
            &mut journal,
            sb.inode_bitmap_start.get(),
            sb.inode_bitmap_blocks.get(),
            sb.inode_count.get(),
        )?;
        let inodes = InodeTable::new(
            sb.inode_table_start.get(),
            sb.inode_count.get(),
            options.inode_cache,
        );
        let meta = Meta {
            journal,
            blocks,
            inode_alloc,
            inodes,
            total_blocks: sb.total_blocks.get(),
            data_start: sb.data_start.get(),
        };
        let inner = Inner {
            meta,
            open_counts: HashMap::new(),
            pending_events: Vec::new(),
            listeners: Vec::new(),
            events_delivered: false,
            closed: false,
        };
        let fs = Fs {
            inner: Mutex::new(inner),
            epochs,
            device,
            uuid: sb.uuid,
            read_only: options.read_only,
        };
        if !options.read_only {
            fs.modify("open", |inner| {
                inner.recover_orphans()?;
                inner.update_superblock(|sb| {
                    sb.state = STATE_DIRTY.into();
                    sb.mount_count = U64::new(sb.mount_count.get().saturating_add(1));
                })
            })?;
            fs.locked("open", |inner| inner.commit())?;
        }
        Ok(fs)
    }

    /// Flushes everything, marks the image clean and closes it.
    pub fn close(self) -> Result<()> {
        self.locked("close", |inner| inner.close())
    }

    /// The file system's UUID.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The device (the kernel binding maps it read-only).
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        self.query("lookup", |inner| {
            let ino = inner.lookup(parent, name)?;
            Ok(Attr::of(&inner.get(ino)?))
        })
    }

    /// Resolves an absolute or root-relative path (symlinks are not followed).
    pub fn resolve(&self, path: &Path) -> Result<Attr> {
        self.query("resolve", |inner| {
            let ino = inner.resolve(path)?;
            Ok(Attr::of(&inner.get(ino)?))
        })
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        self.query("getattr", |inner| Ok(Attr::of(&inner.get(ino)?)))
    }

    /// Changes attributes; a size change truncates or extends.
    pub fn setattr(&self, ino: u64, changes: &SetAttr) -> Result<Attr> {
        self.modify("setattr", |inner| inner.setattr(ino, changes))
    }

    /// Creates a regular file.
    pub fn create(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        self.mknod(parent, name, S_IFREG | (mode & 0o7777), 0, uid, gid)
    }

    /// Creates a file of any type but directory and symlink (regular, fifo, socket,
    /// device); `mode` includes the type bits.
    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        let kind = mode & S_IFMT;
        if ![S_IFREG, S_IFIFO, S_IFSOCK, S_IFCHR, S_IFBLK].contains(&kind) {
            return Err(Error::Invalid(format!("mknod of file type {kind:#o}")));
        }
        self.modify("mknod", |inner| {
            let mut inode = inner.new_inode(parent, name, mode, uid, gid)?;
            inode.rdev = rdev;
            inner.put(&inode)?;
            Ok(Attr::of(&inode))
        })
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        self.modify("mkdir", |inner| inner.mkdir(parent, name, mode, uid, gid))
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        if target.is_empty() || target.len() > SYMLINK_MAX {
            return Err(if target.is_empty() {
                Error::NotFound
            } else {
                Error::NameTooLong
            });
        }
        self.modify("symlink", |inner| {
            let mut inode = inner.new_inode(parent, name, S_IFLNK | 0o777, uid, gid)?;
            inner.write_data(&mut inode, 0, target)?;
            inner.put(&inode)?;
            Ok(Attr::of(&inode))
        })
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        self.query("readlink", |inner| {
            let inode = inner.get(ino)?;
            if !inode.is_symlink() {
                return Err(Error::NotSymlink);
            }
            if inode.size > SYMLINK_MAX as u64 {
                return Err(Error::corrupt(
                    0,
                    format!("inode {ino}: symlink target of {} bytes", inode.size),
                ));
            }
            let mut target = vec![0; inode.size as usize];
            let n = inner.read_data(&inode, 0, &mut target)?;
            target.truncate(n);
            Ok(target)
        })
    }

    /// Adds a hard link to `ino` named `name` in `parent`.
    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr> {
        self.modify("link", |inner| inner.link(ino, parent, name))
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.modify("unlink", |inner| inner.unlink(parent, name, false))
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.modify("rmdir", |inner| inner.unlink(parent, name, true))
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<()> {
        self.modify("rename", |inner| {
            inner.rename(parent, name, new_parent, new_name, mode)
        })
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns the count (0 at end of file).
    /// Only the mapping is looked up under the lock; the device is read after it is
    /// released (with an epoch pin, so the blocks are not reused meanwhile), so reads run
    /// in parallel with each other and with other operations.
    pub fn read_at(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let (len, pieces, _pin) = self.query("read_at", |inner| {
            let inode = inner.get(ino)?;
            if inode.is_dir() {
                return Err(Error::IsDir);
            }
            let (len, pieces) = inner.plan_read(&inode, offset, buf.len())?;
            Ok((len, pieces, self.epochs.pin()))
        })?;
        for piece in &pieces {
            piece.read(buf, |chunk, at| Ok(self.device.read_at(chunk, at)?))?;
        }
        Ok(len)
    }

    /// Writes `data` at `offset`; returns the count written (short only when the device
    /// fills up part way).
    pub fn write_at(&self, ino: u64, offset: u64, data: &[u8]) -> Result<usize> {
        self.modify("write_at", |inner| {
            // Before anything changes: making room may commit.
            inner.make_room(offset, data.len() as u64)?;
            let mut inode = inner.get(ino)?;
            inode.check_regular()?;
            let written = inner.write_data(&mut inode, offset, data)?;
            inner.put(&inode)?;
            Ok(written)
        })
    }

    /// Writes `data` at the end of the file as one operation, so concurrent appenders never
    /// write over each other (O_APPEND). Returns the offset written at and the count.
    pub fn append(&self, ino: u64, data: &[u8]) -> Result<(u64, usize)> {
        self.modify("append", |inner| {
            let offset = inner.get(ino)?.size;
            // Making room may commit, but under this lock nothing else changes the size.
            inner.make_room(offset, data.len() as u64)?;
            let mut inode = inner.get(ino)?;
            inode.check_regular()?;
            let written = inner.write_data(&mut inode, offset, data)?;
            inner.put(&inode)?;
            Ok((offset, written))
        })
    }

    /// Allocates (or with `punch_hole`, deallocates) `[offset, offset + len)`.
    pub fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: FallocateMode) -> Result<()> {
        self.modify("fallocate", |inner| inner.fallocate(ino, offset, len, mode))
    }

    /// Calls `emit` for entries from `cursor` on ("." and ".." first; cursor 0 is the
    /// start) until it returns false or the directory ends. Cursors stay valid while the
    /// directory changes: entries present throughout are returned exactly once.
    pub fn readdir(
        &self,
        ino: u64,
        cursor: u64,
        mut emit: impl FnMut(DirEntry) -> bool,
    ) -> Result<()> {
        let mut cursor = cursor;
        loop {
            let batch = self.query("readdir", |inner| inner.readdir_batch(ino, cursor, 256))?;
            let Some(last) = batch.last() else {
                return Ok(());
            };
            cursor = last.next;
            for entry in batch {
                if !emit(entry) {
                    return Ok(());
                }
            }
        }
    }

    /// All entries of a directory except "." and "..".
    pub fn list_dir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let mut entries = Vec::new();
        self.readdir(ino, 2, |entry| {
            entries.push(entry);
            true
        })?;
        Ok(entries)
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        self.query("getxattr", |inner| {
            let inode = inner.get(ino)?;
            if inode.xattr_root == 0 {
                return Err(Error::NoAttr);
            }
            xattr::get(&mut inner.meta, &xattr::tree(inode.xattr_root, ino), name)
        })
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], mode: SetMode) -> Result<()> {
        self.modify("setxattr", |inner| inner.setxattr(ino, name, value, mode))
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>> {
        self.query("listxattr", |inner| {
            let inode = inner.get(ino)?;
            if inode.xattr_root == 0 {
                return Ok(Vec::new());
            }
            xattr::list(&mut inner.meta, &xattr::tree(inode.xattr_root, ino))
        })
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.modify("removexattr", |inner| inner.removexattr(ino, name))
    }

    pub fn statfs(&self) -> Result<StatFs> {
        self.query("statfs", |inner| {
            let meta = &inner.meta;
            Ok(StatFs {
                block_size: BLOCK_SIZE as u32,
                total_blocks: meta.total_blocks,
                free_blocks: meta.blocks.free_blocks(),
                total_inodes: meta.inodes.count() - 1,
                free_inodes: meta.inode_alloc.free_inodes(),
                name_max: NAME_MAX as u32,
            })
        })
    }

    /// Makes the file's data and metadata durable (commits every pending change: the
    /// journal is global).
    pub fn fsync(&self, ino: u64) -> Result<()> {
        self.query("fsync", |inner| {
            inner.get(ino)?;
            inner.commit()
        })
    }

    /// Makes every change durable.
    pub fn sync(&self) -> Result<()> {
        self.query("sync", |inner| inner.commit())
    }

    /// Commits and checkpoints: the journal is empty afterwards and freed blocks become
    /// reusable (subject to epoch pins).
    pub fn checkpoint(&self) -> Result<()> {
        self.query("checkpoint", |inner| {
            inner.commit()?;
            inner.checkpoint()
        })
    }

    /// The extents of a file: (logical block, physical block, length).
    pub fn extents(&self, ino: u64) -> Result<Vec<Extent>> {
        self.query("extents", |inner| {
            let inode = inner.get(ino)?;
            extent::list(&mut inner.meta, &inode)
        })
    }

    /// A file's extents and attributes read together, under one lock: what the kernel
    /// binding publishes (the generation must belong to exactly these extents).
    pub fn extent_snapshot(&self, ino: u64) -> Result<(Vec<Extent>, Attr)> {
        self.query("extent_snapshot", |inner| {
            let inode = inner.get(ino)?;
            let extents = extent::list(&mut inner.meta, &inode)?;
            Ok((extents, Attr::of(&inode)))
        })
    }

    /// Subscribes to extent changes (see `events`).
    pub fn subscribe(&self, listener: Arc<dyn ExtentListener>) {
        self.lock().listeners.push(listener);
    }

    /// Removes a subscription.
    pub fn unsubscribe(&self, listener: &Arc<dyn ExtentListener>) {
        self.lock().listeners.retain(|l| !Arc::ptr_eq(l, listener));
    }

    /// Pins the current epoch: blocks freed from now on are not reused until the pin
    /// is dropped.
    pub fn pin_epoch(&self) -> EpochPin {
        self.epochs.pin()
    }

    /// Releases freed blocks whose epochs are no longer pinned.
    pub fn reclaim(&self) {
        let result = self.locked("reclaim", |inner| {
            inner.meta.blocks.reclaim();
            Ok(())
        });
        if let Err(e) = result {
            log::error!("reclaiming freed blocks failed: {e}");
        }
    }

    /// Notes an open handle on `ino`: if it loses its last link while open, it is freed
    /// when the last handle is released (and after a crash, at the next open).
    pub fn retain(&self, ino: u64) -> Result<()> {
        self.locked("retain", |inner| {
            inner.get(ino)?;
            *inner.open_counts.entry(ino).or_insert(0) += 1;
            Ok(())
        })
    }

    /// Releases a handle taken with `retain`.
    pub fn release(&self, ino: u64) -> Result<()> {
        let free_now = self.locked("release", |inner| {
            let Some(count) = inner.open_counts.get_mut(&ino) else {
                return Ok(false);
            };
            *count -= 1;
            if *count > 0 {
                return Ok(false);
            }
            inner.open_counts.remove(&ino);
            let inode = inner.get(ino)?;
            Ok(inode.nlink == 0 && inode.is_allocated())
        })?;
        if free_now && !self.read_only {
            self.modify("release", |inner| {
                inner.orphan_remove(ino)?;
                let inode = inner.get(ino)?;
                inner.free_inode(inode)
            })?;
        }
        Ok(())
    }

    /// Creates the root directory of a freshly formatted image.
    pub(crate) fn make_root(&self) -> Result<()> {
        self.modify("make_root", |inner| inner.make_root())
    }

    /// Journal and cache counters.
    pub fn journal_stats(&self) -> JournalStats {
        self.lock().meta.journal.stats()
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        if let Err(e) = self.locked("close", |inner| inner.close()) {
            log::error!("closing the file system failed: {e}");
        }
    }
}

impl Inner {
    fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        if !self.meta.journal.is_read_only() {
            self.begin_op();
            self.update_superblock(|sb| sb.state = STATE_CLEAN.into())?;
            self.commit()?;
            self.checkpoint()?;
        }
        self.closed = true;
        Ok(())
    }

    pub(crate) fn emit(
        &mut self,
        ino: u64,
        generation: u64,
        kind: ChangeKind,
        extents: Vec<Extent>,
    ) {
        if !extents.is_empty() && !self.listeners.is_empty() {
            self.pending_events.push(ExtentChange {
                ino,
                generation,
                kind,
                extents,
                old: Vec::new(),
            });
        }
    }

    /// Reads an allocated inode.
    pub(crate) fn get(&mut self, ino: u64) -> Result<Inode> {
        if ino == 0 || ino >= self.meta.inodes.count() {
            return Err(Error::NotFound);
        }
        let inode = self.meta.inodes.read(&mut self.meta.journal, ino)?;
        if !inode.is_allocated() {
            return Err(Error::NotFound);
        }
        Ok(inode)
    }

    pub(crate) fn put(&mut self, inode: &Inode) -> Result<()> {
        self.meta.inodes.write(&mut self.meta.journal, inode)
    }
}
