//! The FUSE file system's checked operations: each decides with `access.rs` on the
//! caller's credentials, then calls libfs (see `fuse.rs` for the invariants).

use super::{errno, ExofsFuse, Handle, OrErrno};
use crate::access::{self, Credentials, SetattrRequest, XattrAccess, MAY_EXEC, MAY_READ};
use fuser::{Errno, FileHandle, WriteFlags};
use libfs::{Attr, RenameMode, SetAttr};

impl ExofsFuse {
    pub(super) fn attr(&self, ino: u64) -> Result<Attr, Errno> {
        self.fs.getattr(ino).or_errno()
    }

    pub(super) fn handle(&self, fh: FileHandle) -> Option<Handle> {
        self.handles().get(&fh.0).copied()
    }

    /// The handle `fh`, if it is open for writing on `ino`; EBADF otherwise.
    pub(super) fn writable_handle(&self, ino: u64, fh: FileHandle) -> Result<Handle, Errno> {
        match self.handle(fh) {
            Some(handle) if handle.ino == ino && handle.writable => Ok(handle),
            _ => Err(Errno::EBADF),
        }
    }

    /// The attributes of directory `ino`; ENOTDIR if it is not one.
    fn dir_attr(&self, ino: u64) -> Result<Attr, Errno> {
        let dir = self.attr(ino)?;
        if !dir.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        Ok(dir)
    }

    pub(super) fn checked_lookup(
        &self,
        who: &Credentials,
        parent: u64,
        name: &[u8],
    ) -> Result<Attr, Errno> {
        let dir = self.dir_attr(parent)?;
        access::permission(who, &dir, MAY_EXEC)?;
        self.fs.lookup(parent, name).or_errno()
    }

    /// The mode and group of a new inode named in `parent`, once the caller may create
    /// there.
    pub(super) fn new_inode(
        &self,
        who: &Credentials,
        parent: u64,
        mode: u32,
    ) -> Result<(u32, u32), Errno> {
        let dir = self.dir_attr(parent)?;
        access::may_create(who, &dir)?;
        Ok(access::new_inode_owner(who, &dir, mode))
    }

    /// The checks of unlink, rmdir and the source of a rename: the entry `name` of
    /// `parent` may be removed by `who`. Returns the entry's attributes.
    pub(super) fn may_delete(
        &self,
        who: &Credentials,
        parent: u64,
        name: &[u8],
    ) -> Result<Attr, Errno> {
        let dir = self.dir_attr(parent)?;
        access::permission(who, &dir, MAY_EXEC)?;
        let victim = self.fs.lookup(parent, name).or_errno()?;
        access::may_delete(who, &dir, &victim)?;
        Ok(victim)
    }

    pub(super) fn checked_rename(
        &self,
        who: &Credentials,
        (parent, name): (u64, &[u8]),
        (new_parent, new_name): (u64, &[u8]),
        mode: RenameMode,
    ) -> Result<(), Errno> {
        let source = self.may_delete(who, parent, name)?;
        let new_dir = self.dir_attr(new_parent)?;
        access::permission(who, &new_dir, MAY_EXEC)?;
        let target = match self.fs.lookup(new_parent, new_name) {
            Ok(target) => Some(target),
            Err(libfs::Error::NotFound) => None,
            Err(err) => return Err(errno(&err)),
        };
        match &target {
            Some(target) => access::may_delete(who, &new_dir, target)?,
            None => access::may_create(who, &new_dir)?,
        }
        // A directory that changes parent rewrites its `..`: it must be writable.
        if new_parent != parent {
            if source.is_dir() {
                access::permission(who, &source, access::MAY_WRITE)?;
            }
            if let (RenameMode::Exchange, Some(target)) = (mode, &target) {
                if target.is_dir() {
                    access::permission(who, target, access::MAY_WRITE)?;
                }
            }
        }
        self.fs
            .rename(parent, name, new_parent, new_name, mode)
            .or_errno()
    }

    pub(super) fn checked_setattr(
        &self,
        who: &Credentials,
        ino: u64,
        changes: SetAttr,
        request: SetattrRequest,
    ) -> Result<Attr, Errno> {
        let attr = self.attr(ino)?;
        let mode = access::check_setattr(who, &attr, &request)?;
        let changes = SetAttr { mode, ..changes };
        self.fs.setattr(ino, &changes).or_errno()
    }

    pub(super) fn checked_open(
        &self,
        who: &Credentials,
        ino: u64,
        flags: i32,
    ) -> Result<FileHandle, Errno> {
        let attr = self.attr(ino)?;
        access::may_open(who, &attr, flags)?;
        self.open_handle(ino, flags).or_errno()
    }

    pub(super) fn checked_opendir(
        &self,
        who: &Credentials,
        ino: u64,
        flags: i32,
    ) -> Result<FileHandle, Errno> {
        let attr = self.dir_attr(ino)?;
        access::permission(who, &attr, MAY_READ)?;
        self.open_handle(ino, flags).or_errno()
    }

    pub(super) fn checked_write(
        &self,
        who: &Credentials,
        ino: u64,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
    ) -> Result<usize, Errno> {
        let handle = self.writable_handle(ino, fh)?;
        let written = if handle.append {
            self.fs.append(ino, data).map(|(_, n)| n)
        } else {
            self.fs.write_at(ino, offset, data)
        }
        .or_errno()?;
        // The kernel marks the writes that clear setuid and setgid (the writer lacks
        // CAP_FSETID; FUSE_HANDLE_KILLPRIV_V2): the daemon clears them.
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            let attr = self.attr(ino)?;
            if let Some(mode) = access::mode_after_killing_write(who, &attr) {
                let changes = SetAttr {
                    mode: Some(mode),
                    ..SetAttr::default()
                };
                self.fs.setattr(ino, &changes).or_errno()?;
            }
        }
        Ok(written)
    }

    pub(super) fn checked_xattr(
        &self,
        who: &Credentials,
        ino: u64,
        name: &[u8],
        wanted: XattrAccess,
    ) -> Result<(), Errno> {
        let attr = self.attr(ino)?;
        access::xattr_permission(who, &attr, name, wanted)
    }

    pub(super) fn listed_xattrs(&self, who: &Credentials, ino: u64) -> Result<Vec<u8>, Errno> {
        let mut list = Vec::new();
        for name in self.fs.listxattr(ino).or_errno()? {
            if access::xattr_listed(who, &name) {
                list.extend_from_slice(&name);
                list.push(0);
            }
        }
        Ok(list)
    }
}
