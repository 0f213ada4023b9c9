//! Attribute operations: setattr (mode, owner, times, size) and extended attributes.

use crate::error::{Error, Result};
use crate::format::*;
use crate::fs::{now_ns, Attr, Inner, SetAttr, SetTime, MAX_FILE_SIZE};
use crate::xattr::{self, SetMode};

impl Inner {
    pub(crate) fn setattr(&mut self, ino: u64, changes: &SetAttr) -> Result<Attr> {
        let mut inode = self.get(ino)?;
        let now = now_ns();
        if let Some(size) = changes.size {
            inode.check_regular()?;
            if size > MAX_FILE_SIZE {
                return Err(Error::TooBig);
            }
            self.set_size(&mut inode, size)?;
            inode.mtime_ns = now;
        }
        if let Some(mode) = changes.mode {
            inode.mode = (inode.mode & S_IFMT) | (mode & 0o7777);
        }
        if let Some(uid) = changes.uid {
            inode.uid = uid;
        }
        if let Some(gid) = changes.gid {
            inode.gid = gid;
        }
        let resolve = |t: SetTime| match t {
            SetTime::Now => now,
            SetTime::At(ns) => ns,
        };
        if let Some(t) = changes.atime {
            inode.atime_ns = resolve(t);
        }
        if let Some(t) = changes.mtime {
            inode.mtime_ns = resolve(t);
        }
        inode.ctime_ns = now;
        self.put(&inode)?;
        Ok(Attr::of(&inode))
    }

    pub(crate) fn setxattr(
        &mut self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        mode: SetMode,
    ) -> Result<()> {
        xattr::check_name(name)?;
        let mut inode = self.get(ino)?;
        if inode.xattr_root == 0 {
            if mode == SetMode::Replace {
                return Err(Error::NoAttr);
            }
            inode.xattr_root = crate::btree::create(&mut self.meta, BTREE_KIND_XATTR, ino)?.root;
        }
        xattr::set(
            &mut self.meta,
            &xattr::tree(inode.xattr_root, ino),
            name,
            value,
            mode,
        )?;
        inode.ctime_ns = now_ns();
        self.put(&inode)
    }

    pub(crate) fn removexattr(&mut self, ino: u64, name: &[u8]) -> Result<()> {
        let mut inode = self.get(ino)?;
        if inode.xattr_root == 0 {
            return Err(Error::NoAttr);
        }
        let tree = xattr::tree(inode.xattr_root, ino);
        xattr::remove(&mut self.meta, &tree, name)?;
        if crate::btree::is_empty(&mut self.meta, &tree)? {
            crate::btree::destroy(&mut self.meta, &tree)?;
            inode.xattr_root = 0;
        }
        inode.ctime_ns = now_ns();
        self.put(&inode)
    }
}
