//! Freeing inodes and the orphan list: inodes with no links that are still open, or
//! whose freeing spans several transactions, are listed from the superblock so that the
//! next open finishes freeing them after a crash.

use crate::dir;
use crate::error::{Error, Result};
use crate::events::ChangeKind;
use crate::format::*;
use crate::fs::Inner;
use crate::inode::Inode;
use crate::xattr;
use zerocopy::little_endian::U64;

impl Inner {
    /// Frees an inode with no links: its data (in steps), trees and slot.
    pub(crate) fn free_inode(&mut self, mut inode: Inode) -> Result<()> {
        // A large file is freed over several transactions: keep it on the orphan list
        // meanwhile so a crash part way does not leak it.
        if crate::data::freeing_takes_steps(&inode) && inode.flags & INODE_FLAG_ORPHAN == 0 {
            self.orphan_add(inode.ino)?;
            inode = self.get(inode.ino)?;
        }
        if inode.is_dir() {
            crate::btree::destroy(&mut self.meta, &dir::tree(inode.tree_root, inode.ino))?;
            inode.tree_root = 0;
        } else {
            self.truncate_blocks(&mut inode, 0, ChangeKind::Delete)?;
        }
        if inode.xattr_root != 0 {
            crate::btree::destroy(&mut self.meta, &xattr::tree(inode.xattr_root, inode.ino))?;
        }
        if inode.flags & INODE_FLAG_ORPHAN != 0 {
            self.put(&inode)?;
            self.orphan_remove(inode.ino)?;
        }
        self.put(&Inode::free_slot(inode.ino, inode.generation + 1))?;
        self.meta
            .inode_alloc
            .free(&mut self.meta.journal, inode.ino)
    }

    pub(crate) fn orphan_add(&mut self, ino: u64) -> Result<()> {
        let head = self.superblock()?.orphan_head.get();
        let mut inode = self.get(ino)?;
        inode.next_orphan = head;
        inode.flags |= INODE_FLAG_ORPHAN;
        self.put(&inode)?;
        self.update_superblock(|sb| sb.orphan_head = U64::new(ino))
    }

    pub(crate) fn orphan_remove(&mut self, ino: u64) -> Result<()> {
        let inode = self.get(ino)?;
        if inode.flags & INODE_FLAG_ORPHAN == 0 {
            return Ok(());
        }
        let next = inode.next_orphan;
        let head = self.superblock()?.orphan_head.get();
        if head == ino {
            self.update_superblock(|sb| sb.orphan_head = U64::new(next))?;
        } else {
            let mut cursor = head;
            let mut steps = 0;
            while cursor != 0 {
                let mut node = self.get(cursor)?;
                if node.next_orphan == ino {
                    node.next_orphan = next;
                    self.put(&node)?;
                    break;
                }
                cursor = node.next_orphan;
                steps += 1;
                if steps > self.meta.inodes.count() {
                    return Err(Error::corrupt(0, "orphan list loops"));
                }
            }
        }
        let mut inode = self.get(ino)?;
        inode.flags &= !INODE_FLAG_ORPHAN;
        inode.next_orphan = 0;
        self.put(&inode)
    }

    /// Frees every inode on the orphan list (left by a crash while they were open).
    pub(crate) fn recover_orphans(&mut self) -> Result<()> {
        let mut steps = 0;
        loop {
            let head = self.superblock()?.orphan_head.get();
            if head == 0 {
                return Ok(());
            }
            let inode = self.get(head)?;
            if inode.nlink == 0 {
                log::info!("freeing orphan inode {head}");
                self.free_inode(inode)?;
            } else {
                self.orphan_remove(head)?;
            }
            self.consistent_point()?;
            steps += 1;
            if steps > self.meta.inodes.count() {
                return Err(Error::corrupt(0, "orphan list loops"));
            }
        }
    }
}
