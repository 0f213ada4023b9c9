//! The FUSE file system: libfs behind fuser's low-level `Filesystem` trait.
//!
//! Layer: mount-tool, between the kernel's FUSE requests (fuser) and libfs's `Fs`.
//! Inode numbers are libfs's (the root is 1 in both). Every operation maps one to one onto
//! an `Fs` call; errors become their POSIX errno (`libfs::Error::errno`).
//!
//! Invariants:
//! - An open file keeps its inode (`Fs::retain` at open, `Fs::release` at release), so a
//!   file unlinked while open stays readable and writable until its last handle closes.
//! - Writes on a handle opened with O_APPEND go to the end of the file in one libfs operation
//!   (`Fs::append`), whatever offset the kernel sends.
//! - Every request is checked against its caller's credentials (`access.rs`) before libfs
//!   runs it, whatever the mount options; with `default_permissions` (the default) the
//!   kernel has checked first. New files belong to the caller's uid, and to its gid or the
//!   setgid parent directory's.
//! - A handle remembers whether it was opened for writing: writes, fallocate and
//!   ftruncate through a read-only handle are refused.
//! - `fsync` makes the file durable (a journal commit); otherwise the daemon commits every
//!   few seconds (mount.rs).

use crate::access::{self, Credentials, SetattrRequest, TimeChange, XattrAccess};
use crate::chains::{Caller, ChainService, PolicyRefresher};

mod checked;
use exofs_abi::ioctl::{IOC_CHAIN, IOC_CHAIN_BATCH, IOC_DIRECT, IOC_POLICY_RELOAD};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use libfs::{Attr, FallocateMode, Fs, RenameMode, SetAttr, SetTime, XattrMode};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache attributes and entries. Every change goes through this
/// daemon, which the kernel invalidates on its own writes, so a second is safe.
const TTL: Duration = Duration::from_secs(1);

/// How long the kernel may cache a name when it does not check permissions itself: not
/// at all, since a path walk through cached names sends the daemon no request, so search
/// permission would go unchecked.
const UNCHECKED_ENTRY_TTL: Duration = Duration::ZERO;

/// One open file or directory.
#[derive(Debug, Clone, Copy)]
struct Handle {
    ino: u64,
    append: bool,
    /// Opened for writing (O_WRONLY or O_RDWR).
    writable: bool,
}

/// libfs served over FUSE.
pub struct ExofsFuse {
    fs: Arc<Fs>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// Per handle, the uids that took a direct-chain ticket for its file through it
    /// (IOC_DIRECT), each once; given back when the handle closes.
    tickets: Mutex<HashMap<u64, Vec<u32>>>,
    next_handle: AtomicU64,
    /// The chain ioctls, when the kernel binding is available.
    chains: Option<Arc<ChainService>>,
    /// Recompiles the chain service's policy after name changes.
    refresher: Option<PolicyRefresher>,
    /// Bumped after every change of names (the chain service recompiles the policy's
    /// paths when it moved).
    namespace: Arc<AtomicU64>,
    /// How long the kernel may cache a name (TTL, or none when it does not check
    /// permissions itself).
    entry_ttl: Duration,
}

impl ExofsFuse {
    /// `kernel_checks`: the mount has `default_permissions`. Fails if the policy
    /// refresher's thread cannot start.
    pub fn new(
        fs: Arc<Fs>,
        chains: Option<Arc<ChainService>>,
        namespace: Arc<AtomicU64>,
        kernel_checks: bool,
    ) -> std::io::Result<Self> {
        let refresher = chains.as_ref().map(PolicyRefresher::start).transpose()?;
        Ok(Self {
            fs,
            handles: Mutex::new(HashMap::new()),
            tickets: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            chains,
            refresher,
            namespace,
            entry_ttl: if kernel_checks {
                TTL
            } else {
                UNCHECKED_ENTRY_TTL
            },
        })
    }

    /// Notes a change of names (after it is made).
    fn names_changed(&self) {
        self.namespace.fetch_add(1, Ordering::AcqRel);
        if let Some(refresher) = &self.refresher {
            refresher.poke();
        }
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Handle>> {
        self.handles
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn open_handle(&self, ino: u64, flags: i32) -> libfs::Result<FileHandle> {
        self.fs.retain(ino)?;
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let append = flags & libc::O_APPEND != 0;
        let writable = access::open_mask(flags) & access::MAY_WRITE != 0;
        self.handles().insert(
            fh,
            Handle {
                ino,
                append,
                writable,
            },
        );
        Ok(FileHandle(fh))
    }

    /// Records that `uid` asked for direct chains over `ino` through handle `fh` (the
    /// ticket is taken once per handle and uid, and given back when the handle closes).
    fn hold_ticket(
        &self,
        chains: &ChainService,
        uid: u32,
        ino: u64,
        fh: FileHandle,
    ) -> Result<(), crate::chains::Refusal> {
        // The handles' lock is held throughout, so that the handle cannot close between
        // the check and the ticket (its close gives the tickets back under the same lock).
        let handles = self.handles();
        if handles.get(&fh.0).is_none_or(|h| h.ino != ino) {
            return Err(crate::chains::Refusal::new(
                libc::EBADF,
                "the ioctl's handle is not open",
            ));
        }
        let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let held = tickets.entry(fh.0).or_default();
        if !held.contains(&uid) {
            chains.take_ticket(uid, ino)?;
            held.push(uid);
        }
        Ok(())
    }

    fn close_handle(&self, fh: FileHandle) -> libfs::Result<()> {
        let (handle, last, tickets) = {
            let mut handles = self.handles();
            let Some(handle) = handles.remove(&fh.0) else {
                return Ok(());
            };
            let last = !handles.values().any(|other| other.ino == handle.ino);
            let tickets = self
                .tickets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&fh.0)
                .unwrap_or_default();
            (handle, last, tickets)
        };
        if let Some(chains) = &self.chains {
            for uid in tickets {
                chains.drop_ticket(uid, handle.ino);
            }
            if last {
                chains.forget_file(handle.ino);
            }
        }
        self.fs.release(handle.ino)
    }
}

fn errno(err: &libfs::Error) -> Errno {
    Errno::from_i32(err.errno())
}

fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn ns_of(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// The FUSE view of libfs attributes.
pub fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        // st_blocks counts 512-byte units.
        blocks: attr.blocks * 8,
        atime: time_of(attr.atime_ns),
        mtime: time_of(attr.mtime_ns),
        ctime: time_of(attr.ctime_ns),
        crtime: time_of(attr.crtime_ns),
        kind: kind_of(attr.mode),
        perm: (attr.mode & 0o7777) as u16,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: libfs::BLOCK_SIZE as u32,
        flags: 0,
    }
}

fn set_time(time: Option<TimeOrNow>) -> Option<SetTime> {
    time.map(|time| match time {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(at) => SetTime::At(ns_of(at)),
    })
}

fn empty(reply: ReplyEmpty, result: libfs::Result<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(err) => reply.error(errno(&err)),
    }
}

/// libfs results as FUSE errors.
trait OrErrno<T> {
    fn or_errno(self) -> Result<T, Errno>;
}

impl<T> OrErrno<T> for libfs::Result<T> {
    fn or_errno(self) -> Result<T, Errno> {
        self.map_err(|err| errno(&err))
    }
}

/// The credentials of a request's caller (see `access.rs`).
fn caller(req: &Request) -> Credentials {
    Credentials::of_request(req.uid(), req.gid(), req.pid())
}

fn time_change(time: Option<TimeOrNow>) -> Option<TimeChange> {
    time.map(|time| match time {
        TimeOrNow::Now => TimeChange::Now,
        TimeOrNow::SpecificTime(_) => TimeChange::At,
    })
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(err) => reply.error(err),
    }
}

fn reply_attr(reply: ReplyAttr, result: Result<Attr, Errno>) {
    match result {
        Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
        Err(err) => reply.error(err),
    }
}

impl ExofsFuse {
    fn reply_entry(&self, reply: ReplyEntry, result: Result<Attr, Errno>) {
        match result {
            Ok(attr) => {
                let file = file_attr(&attr);
                reply.entry_with_ttls(&TTL, &self.entry_ttl, &file, Generation(attr.generation))
            }
            Err(err) => reply.error(err),
        }
    }
}

impl Filesystem for ExofsFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // The daemon clears setuid and setgid itself (on write, truncate and chown), so
        // the kernel does not send a chmod in the writer's name that the ownership rule
        // would refuse.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2) {
            log::warn!(
                "the kernel lacks {missing:?}: it clears setuid and setgid bits on writes \
                 with a chmod of its own"
            );
        }
        Ok(())
    }

    fn destroy(&mut self) {
        let handles: Vec<Handle> = self.handles().drain().map(|(_, h)| h).collect();
        for handle in handles {
            let _ = self.fs.release(handle.ino);
        }
        if let Err(err) = self.fs.checkpoint() {
            log::error!("final checkpoint: {err}");
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let who = caller(req);
        match self.checked_lookup(&who, parent.0, name.as_bytes()) {
            // A name that does not exist, cached as such for as long as names are (node
            // 0: a negative entry). Safe for the same reason: every creation goes through
            // this mount, and the kernel replaces the negative entry when it creates the
            // name. SQLite asks for its journal's name at every transaction, and without
            // this each question was a round trip to this daemon.
            Err(Errno::ENOENT) if !self.entry_ttl.is_zero() => {
                let absent = FileAttr {
                    ino: INodeNo(0),
                    size: 0,
                    blocks: 0,
                    atime: UNIX_EPOCH,
                    mtime: UNIX_EPOCH,
                    ctime: UNIX_EPOCH,
                    crtime: UNIX_EPOCH,
                    kind: FileType::RegularFile,
                    perm: 0,
                    nlink: 0,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    blksize: libfs::BLOCK_SIZE as u32,
                    flags: 0,
                };
                reply.entry_with_ttls(&self.entry_ttl, &self.entry_ttl, &absent, Generation(0));
            }
            result => self.reply_entry(reply, result),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.attr(ino.0));
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let who = caller(req);
        let result = self.attr(ino.0).and_then(|attr| {
            let wanted = (mask.bits() & (libc::R_OK | libc::W_OK | libc::X_OK)) as u32;
            access::permission(&who, &attr, wanted)
        });
        reply_empty(reply, result);
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let who = caller(req);
        let writable_handle = fh.is_some_and(|fh| self.writable_handle(ino.0, fh).is_ok());
        let request = SetattrRequest {
            mode,
            uid,
            gid,
            size,
            atime: time_change(atime),
            mtime: time_change(mtime),
            writable_handle,
        };
        let changes = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        reply_attr(reply, self.checked_setattr(&who, ino.0, changes, request));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(err) => reply.error(errno(&err)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let who = caller(req);
        let result = self
            .new_inode(&who, parent.0, mode)
            .and_then(|(mode, gid)| {
                self.fs
                    .mknod(parent.0, name.as_bytes(), mode, rdev, who.uid, gid)
                    .or_errno()
            });
        self.names_changed();
        self.reply_entry(reply, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let who = caller(req);
        let result = self
            .new_inode(&who, parent.0, libc::S_IFDIR | (mode & 0o7777))
            .and_then(|(mode, gid)| {
                self.fs
                    .mkdir(parent.0, name.as_bytes(), mode, who.uid, gid)
                    .or_errno()
            });
        self.names_changed();
        self.reply_entry(reply, result);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let who = caller(req);
        let result = self
            .may_delete(&who, parent.0, name.as_bytes())
            .and_then(|_| self.fs.unlink(parent.0, name.as_bytes()).or_errno());
        self.names_changed();
        reply_empty(reply, result);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let who = caller(req);
        let result = self
            .may_delete(&who, parent.0, name.as_bytes())
            .and_then(|_| self.fs.rmdir(parent.0, name.as_bytes()).or_errno());
        self.names_changed();
        reply_empty(reply, result);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let who = caller(req);
        let result = self
            .new_inode(&who, parent.0, libc::S_IFLNK | 0o777)
            .and_then(|(_, gid)| {
                self.fs
                    .symlink(
                        parent.0,
                        link_name.as_bytes(),
                        target.as_os_str().as_bytes(),
                        who.uid,
                        gid,
                    )
                    .or_errno()
            });
        self.names_changed();
        self.reply_entry(reply, result);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mode = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else if flags.is_empty() {
            RenameMode::Replace
        } else {
            reply.error(Errno::EINVAL);
            return;
        };
        let who = caller(req);
        let result = self.checked_rename(
            &who,
            (parent.0, name.as_bytes()),
            (newparent.0, newname.as_bytes()),
            mode,
        );
        self.names_changed();
        reply_empty(reply, result);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let who = caller(req);
        let result = self
            .attr(ino.0)
            .and_then(|source| access::may_link(&who, &source, access::hardlinks_protected()))
            .and_then(|()| self.new_inode(&who, newparent.0, 0))
            .and_then(|_| {
                self.fs
                    .link(ino.0, newparent.0, newname.as_bytes())
                    .or_errno()
            });
        self.names_changed();
        self.reply_entry(reply, result);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let who = caller(req);
        match self.checked_open(&who, ino.0, flags.0) {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(err) => reply.error(err),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut buf = vec![0u8; size as usize];
        match self.fs.read_at(ino.0, offset, &mut buf) {
            Ok(n) => reply.data(&buf[..n]),
            Err(err) => reply.error(errno(&err)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let who = caller(req);
        match self.checked_write(&who, ino.0, fh, offset, data, write_flags) {
            Ok(n) => reply.written(n as u32),
            Err(err) => reply.error(err),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.close_handle(fh));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fs.fsync(ino.0));
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let who = caller(req);
        match self.checked_opendir(&who, ino.0, flags.0) {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(err) => reply.error(err),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let result = self.fs.readdir(ino.0, offset, |entry| {
            // `add` returns true when the reply buffer is full: stop there.
            !reply.add(
                INodeNo(entry.ino),
                entry.next,
                kind_of(entry.kind),
                OsStr::from_bytes(&entry.name),
            )
        });
        match result {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(&err)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.close_handle(fh));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fs.fsync(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.total_blocks,
                s.free_blocks,
                s.free_blocks,
                s.total_inodes,
                s.free_inodes,
                s.block_size,
                s.name_max,
                s.block_size,
            ),
            Err(err) => reply.error(errno(&err)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let mode = if flags & libc::XATTR_CREATE != 0 {
            XattrMode::Create
        } else if flags & libc::XATTR_REPLACE != 0 {
            XattrMode::Replace
        } else {
            XattrMode::Any
        };
        let who = caller(req);
        let result = self
            .checked_xattr(&who, ino.0, name.as_bytes(), XattrAccess::Set)
            .and_then(|()| {
                self.fs
                    .setxattr(ino.0, name.as_bytes(), value, mode)
                    .or_errno()
            });
        reply_empty(reply, result);
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let who = caller(req);
        let result = self
            .checked_xattr(&who, ino.0, name.as_bytes(), XattrAccess::Read)
            .and_then(|()| self.fs.getxattr(ino.0, name.as_bytes()).or_errno());
        match result {
            Ok(value) => xattr_reply(reply, &value, size),
            Err(err) => reply.error(err),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let who = caller(req);
        match self.listed_xattrs(&who, ino.0) {
            Ok(list) => xattr_reply(reply, &list, size),
            Err(err) => reply.error(err),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let who = caller(req);
        let result = self
            .checked_xattr(&who, ino.0, name.as_bytes(), XattrAccess::Remove)
            .and_then(|()| self.fs.removexattr(ino.0, name.as_bytes()).or_errno());
        reply_empty(reply, result);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let who = caller(req);
        let created = self
            .new_inode(&who, parent.0, libc::S_IFREG | (mode & 0o7777))
            .and_then(|(mode, gid)| {
                self.fs
                    .create(parent.0, name.as_bytes(), mode & 0o7777, who.uid, gid)
                    .or_errno()
            });
        self.names_changed();
        let attr = match created {
            Ok(attr) => attr,
            Err(err) => return reply.error(err),
        };
        // The creator opens what it made with the flags it asked for, whatever the
        // new file's mode (as open(2) with O_CREAT does).
        match self.open_handle(attr.ino, flags) {
            Ok(fh) => reply.created(
                &self.entry_ttl,
                &file_attr(&attr),
                Generation(attr.generation),
                fh,
                FopenFlags::empty(),
            ),
            Err(err) => {
                // The kernel hears only the error, so the name must not stay: its negative
                // entry (cached from the lookup before) would hide a file that exists.
                if let Err(undo) = self.fs.unlink(parent.0, name.as_bytes()) {
                    log::error!("create: removing the unopenable new file: {undo}");
                }
                self.names_changed();
                reply.error(errno(&err))
            }
        }
    }

    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        if ![IOC_CHAIN, IOC_CHAIN_BATCH, IOC_DIRECT, IOC_POLICY_RELOAD].contains(&cmd) {
            return reply.error(Errno::ENOTTY);
        }
        let Some(chains) = &self.chains else {
            return reply.error(Errno::EOPNOTSUPP);
        };
        let caller = Caller {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        };
        let answer = match cmd {
            IOC_CHAIN => chains
                .chain(&caller, ino.0, in_data)
                .map(|bytes| (0, bytes)),
            IOC_CHAIN_BATCH => chains
                .chain_batch(&caller, ino.0, in_data)
                .map(|bytes| (0, bytes)),
            IOC_DIRECT => chains.direct(&caller, ino.0, in_data).and_then(|bytes| {
                self.hold_ticket(chains, caller.uid, ino.0, fh)?;
                Ok((0, bytes))
            }),
            _ => chains.reload_policy(&caller),
        };
        match answer {
            Ok((result, bytes)) => reply.ioctl(result, &bytes),
            Err(refusal) => {
                log::info!("ioctl {cmd:#x}: {}", refusal.reason);
                reply.error(Errno::from_i32(refusal.errno));
            }
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let known = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
        if mode & !known != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let mode = FallocateMode {
            keep_size: mode & libc::FALLOC_FL_KEEP_SIZE != 0,
            punch_hole: mode & libc::FALLOC_FL_PUNCH_HOLE != 0,
        };
        let result = self
            .writable_handle(ino.0, fh)
            .and_then(|_| self.fs.fallocate(ino.0, offset, length, mode).or_errno());
        reply_empty(reply, result);
    }
}

/// getxattr/listxattr replies: the size when asked for it (size 0), ERANGE when the
/// caller's buffer is too small, else the bytes.
fn xattr_reply(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}
