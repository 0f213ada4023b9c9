//! Namespace operations: lookup, create, link, unlink, rename, readdir.
//!
//! Rules kept here: a directory's `size` counts its entries and its `nlink` is 2 plus
//! its subdirectories; `parent` names the directory holding it; nothing exceeds LINK_MAX;
//! a directory never moves below itself; errors follow Linux's order.

use crate::dir::{self, Entry};
use crate::error::{Error, Result};
use crate::format::*;
use crate::fs::{file_type_of, now_ns, Attr, DirEntry, Inner, RenameMode, LINK_MAX};
use crate::inode::Inode;
use std::path::Path;

impl Inner {
    pub(crate) fn dir_tree(&mut self, ino: u64) -> Result<(Inode, crate::btree::Tree)> {
        let inode = self.get(ino)?;
        if !inode.is_dir() {
            return Err(Error::NotDir);
        }
        let tree = dir::tree(inode.tree_root, ino);
        Ok((inode, tree))
    }

    pub(crate) fn lookup_entry(
        &mut self,
        parent: u64,
        name: &[u8],
    ) -> Result<Option<(u64, Entry)>> {
        let (_, tree) = self.dir_tree(parent)?;
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        dir::lookup(&mut self.meta, &tree, name)
    }

    pub(crate) fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<u64> {
        if name == b"." {
            self.dir_tree(parent)?;
            return Ok(parent);
        }
        if name == b".." {
            let (inode, _) = self.dir_tree(parent)?;
            return Ok(if inode.ino == ROOT_INO {
                ROOT_INO
            } else {
                inode.parent
            });
        }
        Ok(self
            .lookup_entry(parent, name)?
            .ok_or(Error::NotFound)?
            .1
            .ino)
    }

    pub(crate) fn resolve(&mut self, path: &Path) -> Result<u64> {
        use std::os::unix::ffi::OsStrExt;
        let mut ino = ROOT_INO;
        for component in path.components() {
            match component {
                std::path::Component::RootDir | std::path::Component::CurDir => {}
                other => ino = self.lookup(ino, other.as_os_str().as_bytes())?,
            }
        }
        Ok(ino)
    }

    /// Allocates an inode and links it as `name` in `parent`.
    pub(crate) fn new_inode(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Inode> {
        dir::check_name(name)?;
        let (mut dir_inode, tree) = self.dir_tree(parent)?;
        if dir::lookup(&mut self.meta, &tree, name)?.is_some() {
            return Err(Error::Exists);
        }
        let ino = self.meta.inode_alloc.allocate(&mut self.meta.journal)?;
        let old = self.meta.inodes.read(&mut self.meta.journal, ino)?;
        if old.is_allocated() {
            return Err(Error::corrupt(
                0,
                format!("inode {ino} is free in the bitmap but in use in the table"),
            ));
        }
        let now = now_ns();
        let inode = Inode::new(ino, mode, uid, gid, old.generation + 1, now);
        dir::insert(&mut self.meta, &tree, name, ino, file_type_of(mode))?;
        dir_inode.size += 1;
        dir_inode.mtime_ns = now;
        dir_inode.ctime_ns = now;
        self.put(&dir_inode)?;
        self.put(&inode)?;
        Ok(inode)
    }

    pub(crate) fn mkdir(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        let parent_inode = self.get(parent)?;
        if parent_inode.nlink >= LINK_MAX {
            return Err(Error::TooManyLinks);
        }
        let mut inode = self.new_inode(parent, name, S_IFDIR | (mode & 0o7777), uid, gid)?;
        let tree = crate::btree::create(&mut self.meta, BTREE_KIND_DIRECTORY, inode.ino)?;
        inode.tree_root = tree.root;
        inode.parent = parent;
        inode.nlink = 2;
        self.put(&inode)?;
        let mut parent_inode = self.get(parent)?;
        parent_inode.nlink += 1;
        self.put(&parent_inode)?;
        Ok(Attr::of(&inode))
    }

    /// Creates the root directory of a fresh file system.
    pub(crate) fn make_root(&mut self) -> Result<()> {
        let ino = self.meta.inode_alloc.allocate(&mut self.meta.journal)?;
        if ino != ROOT_INO {
            return Err(Error::Invalid(format!(
                "fresh image gave inode {ino} for the root"
            )));
        }
        let tree = crate::btree::create(&mut self.meta, BTREE_KIND_DIRECTORY, ino)?;
        let mut root = Inode::new(ino, S_IFDIR | 0o755, 0, 0, 1, now_ns());
        root.nlink = 2;
        root.parent = ROOT_INO;
        root.tree_root = tree.root;
        self.put(&root)
    }

    pub(crate) fn link(&mut self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr> {
        let inode = self.get(ino)?;
        if inode.is_dir() {
            return Err(Error::NotPermitted("hard link to a directory".into()));
        }
        if inode.nlink >= LINK_MAX {
            return Err(Error::TooManyLinks);
        }
        if inode.nlink == 0 {
            return Err(Error::NotFound);
        }
        dir::check_name(name)?;
        let (mut dir_inode, tree) = self.dir_tree(parent)?;
        dir::insert(&mut self.meta, &tree, name, ino, file_type_of(inode.mode))?;
        let now = now_ns();
        dir_inode.size += 1;
        dir_inode.mtime_ns = now;
        dir_inode.ctime_ns = now;
        self.put(&dir_inode)?;
        let mut inode = self.get(ino)?;
        inode.nlink += 1;
        inode.ctime_ns = now;
        self.put(&inode)?;
        Ok(Attr::of(&inode))
    }

    pub(crate) fn unlink(&mut self, parent: u64, name: &[u8], want_dir: bool) -> Result<()> {
        if name == b"." || name == b".." {
            return Err(if name == b"." {
                Error::Invalid("rmdir of \".\"".into())
            } else {
                Error::NotEmpty
            });
        }
        let (key, entry) = self.lookup_entry(parent, name)?.ok_or(Error::NotFound)?;
        let inode = self.get(entry.ino)?;
        if want_dir && !inode.is_dir() {
            return Err(Error::NotDir);
        }
        if !want_dir && inode.is_dir() {
            return Err(Error::IsDir);
        }
        if inode.is_dir() && inode.size != 0 {
            return Err(Error::NotEmpty);
        }
        let (mut dir_inode, tree) = self.dir_tree(parent)?;
        crate::btree::remove(&mut self.meta, &tree, key)?;
        let now = now_ns();
        dir_inode.size -= 1;
        dir_inode.mtime_ns = now;
        dir_inode.ctime_ns = now;
        if inode.is_dir() {
            dir_inode.nlink -= 1;
        }
        self.put(&dir_inode)?;
        self.drop_link(entry.ino)
    }

    /// Removes one link of `ino`; frees it (or puts it on the orphan list while open)
    /// when none remain.
    pub(crate) fn drop_link(&mut self, ino: u64) -> Result<()> {
        let mut inode = self.get(ino)?;
        inode.ctime_ns = now_ns();
        inode.nlink = if inode.is_dir() {
            0
        } else {
            inode.nlink.saturating_sub(1)
        };
        // Written before freeing: freeing may commit part way, and a crash then must
        // find an orphan with no links, not a linked file.
        self.put(&inode)?;
        if inode.nlink > 0 {
            return Ok(());
        }
        if self.open_counts.contains_key(&ino) {
            return self.orphan_add(ino);
        }
        self.free_inode(inode)
    }

    pub(crate) fn is_ancestor(&mut self, ancestor: u64, mut ino: u64) -> Result<bool> {
        let mut steps = 0;
        while ino != ROOT_INO {
            if ino == ancestor {
                return Ok(true);
            }
            ino = self.get(ino)?.parent;
            steps += 1;
            if steps > self.meta.inodes.count() {
                return Err(Error::corrupt(0, "directory parent pointers loop"));
            }
        }
        Ok(ancestor == ROOT_INO)
    }

    pub(crate) fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<()> {
        dir::check_name(new_name)?;
        if name == b"." || name == b".." {
            return Err(Error::Invalid("rename of \".\" or \"..\"".into()));
        }
        let (source_key, source) = self.lookup_entry(parent, name)?.ok_or(Error::NotFound)?;
        let target = self.lookup_entry(new_parent, new_name)?;
        match (mode, &target) {
            (RenameMode::Exchange, None) => return Err(Error::NotFound),
            (RenameMode::NoReplace, Some(_)) => return Err(Error::Exists),
            _ => {}
        }
        let source_inode = self.get(source.ino)?;
        if source_inode.is_dir()
            && parent != new_parent
            && self.is_ancestor(source.ino, new_parent)?
        {
            return Err(Error::Invalid("cannot move a directory into itself".into()));
        }
        let now = now_ns();
        let (_, source_tree) = self.dir_tree(parent)?;
        let (_, target_tree) = self.dir_tree(new_parent)?;
        match (mode, target) {
            (RenameMode::Exchange, Some((target_key, target))) => {
                let target_inode = self.get(target.ino)?;
                if target_inode.is_dir()
                    && parent != new_parent
                    && self.is_ancestor(target.ino, parent)?
                {
                    return Err(Error::Invalid("cannot move a directory into itself".into()));
                }
                dir::replace(
                    &mut self.meta,
                    &source_tree,
                    source_key,
                    name,
                    target.ino,
                    target.file_type,
                )?;
                dir::replace(
                    &mut self.meta,
                    &target_tree,
                    target_key,
                    new_name,
                    source.ino,
                    source.file_type,
                )?;
                if parent != new_parent {
                    self.exchange_parents(&source_inode, &target_inode, parent, new_parent)?;
                }
                self.touch(&[source.ino, target.ino], &[parent, new_parent], now)?;
                return Ok(());
            }
            (_, Some((target_key, target))) => {
                if target.ino == source.ino {
                    return Ok(());
                }
                let target_inode = self.get(target.ino)?;
                match (source_inode.is_dir(), target_inode.is_dir()) {
                    (true, false) => return Err(Error::NotDir),
                    (false, true) => return Err(Error::IsDir),
                    (true, true) if target_inode.size != 0 => return Err(Error::NotEmpty),
                    _ => {}
                }
                dir::replace(
                    &mut self.meta,
                    &target_tree,
                    target_key,
                    new_name,
                    source.ino,
                    source.file_type,
                )?;
                crate::btree::remove(&mut self.meta, &source_tree, source_key)?;
                self.adjust_dir(parent, -1, 0)?;
                if target_inode.is_dir() {
                    self.adjust_dir(new_parent, 0, -1)?;
                }
                self.drop_link(target.ino)?;
            }
            (_, None) => {
                dir::insert(
                    &mut self.meta,
                    &target_tree,
                    new_name,
                    source.ino,
                    source.file_type,
                )?;
                crate::btree::remove(&mut self.meta, &source_tree, source_key)?;
                self.adjust_dir(parent, -1, 0)?;
                self.adjust_dir(new_parent, 1, 0)?;
            }
        }
        if parent != new_parent {
            self.reparent(source.ino, parent, new_parent)?;
        }
        self.touch(&[source.ino], &[parent, new_parent], now)
    }

    /// Moves directory `ino`'s ".." from `from` to `to` (no-op for non-directories).
    pub(crate) fn reparent(&mut self, ino: u64, from: u64, to: u64) -> Result<()> {
        let mut inode = self.get(ino)?;
        if !inode.is_dir() {
            return Ok(());
        }
        if self.get(to)?.nlink >= LINK_MAX {
            return Err(Error::TooManyLinks);
        }
        inode.parent = to;
        self.put(&inode)?;
        self.adjust_dir(from, 0, -1)?;
        self.adjust_dir(to, 0, 1)
    }

    /// After two entries in different directories swapped inodes: fix the ".." of the
    /// directories among them and the parents' link counts (which change only when one
    /// of the two is a directory and the other is not).
    pub(crate) fn exchange_parents(
        &mut self,
        source: &Inode,
        target: &Inode,
        parent: u64,
        new_parent: u64,
    ) -> Result<()> {
        for (inode, to) in [(source, new_parent), (target, parent)] {
            if inode.is_dir() {
                let mut moved = self.get(inode.ino)?;
                moved.parent = to;
                self.put(&moved)?;
            }
        }
        let gained = i64::from(source.is_dir()) - i64::from(target.is_dir());
        let (gains, loses) = if gained >= 0 {
            (new_parent, parent)
        } else {
            (parent, new_parent)
        };
        if gained != 0 && self.get(gains)?.nlink >= LINK_MAX {
            return Err(Error::TooManyLinks);
        }
        self.adjust_dir(gains, 0, gained.abs())?;
        self.adjust_dir(loses, 0, -gained.abs())
    }

    pub(crate) fn adjust_dir(&mut self, ino: u64, entries: i64, links: i64) -> Result<()> {
        let mut inode = self.get(ino)?;
        inode.size = inode.size.saturating_add_signed(entries);
        inode.nlink = (i64::from(inode.nlink) + links).max(0) as u32;
        self.put(&inode)
    }

    pub(crate) fn touch(&mut self, changed: &[u64], dirs: &[u64], now: i64) -> Result<()> {
        for ino in changed {
            let mut inode = self.get(*ino)?;
            inode.ctime_ns = now;
            self.put(&inode)?;
        }
        for ino in dirs {
            let mut inode = self.get(*ino)?;
            inode.mtime_ns = now;
            inode.ctime_ns = now;
            self.put(&inode)?;
        }
        Ok(())
    }

    pub(crate) fn readdir_batch(
        &mut self,
        ino: u64,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<DirEntry>> {
        let (inode, tree) = self.dir_tree(ino)?;
        let mut out = Vec::new();
        if cursor == 0 {
            out.push(DirEntry {
                name: b".".to_vec(),
                ino,
                kind: S_IFDIR,
                next: 1,
            });
        }
        if cursor <= 1 {
            out.push(DirEntry {
                name: b"..".to_vec(),
                ino: inode.parent,
                kind: S_IFDIR,
                next: 2,
            });
        }
        let from = cursor.saturating_sub(2);
        for (key, entry) in dir::list_from(&mut self.meta, &tree, from, limit)? {
            out.push(DirEntry {
                name: entry.name,
                ino: entry.ino,
                kind: u32::from(entry.file_type) << 12,
                next: key + 3,
            });
        }
        Ok(out)
    }
}
