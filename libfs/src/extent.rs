//! Extent layer: a file's map from file blocks to device blocks.
//!
//! Interface: `lookup`, `list`, `insert` (into a hole, merging with neighbours),
//! `remove_range` (splitting extents at the edges; the caller frees what comes back),
//! `mark_written`. Up to INLINE_EXTENTS extents live in the inode; beyond that the map
//! moves to a B+tree (key = first file block) and stays there until it is empty.
//!
//! Invariants: extents are sorted, non-overlapping and non-empty; `extent_count` is
//! exact; the caller writes the inode back after any call that takes `&mut Inode`.

use crate::btree::{self, Tree};
use crate::error::{Error, Result};
use crate::format::{
    read_struct, ExtentValue, BTREE_KIND_EXTENTS, EXTENT_FLAG_UNWRITTEN, INLINE_EXTENTS,
    INODE_FLAG_EXTENT_TREE,
};
use crate::inode::{Extent, Inode, Meta};
use zerocopy::little_endian::{U32, U64};
use zerocopy::IntoBytes;

/// Longest extent (the on-disk length is a u32).
pub const MAX_EXTENT_BLOCKS: u64 = u32::MAX as u64;

/// What a file block maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// The block is in this extent (`extent.logical <= block < extent.logical_end()`).
    Mapped(Extent),
    /// A hole up to the next extent (`None`: to the end of the address space).
    Hole { next: Option<u64> },
}

fn tree_of(inode: &Inode) -> Option<Tree> {
    (inode.flags & INODE_FLAG_EXTENT_TREE != 0).then_some(Tree {
        root: inode.tree_root,
        kind: BTREE_KIND_EXTENTS,
        owner: inode.ino,
    })
}

fn decode(key: u64, value: &[u8], tree: &Tree) -> Result<Extent> {
    let v: ExtentValue = read_struct(value, tree.root, "extent entry")?;
    let extent = Extent {
        logical: key,
        physical: v.physical.get(),
        length: u64::from(v.length.get()),
        unwritten: v.flags.get() & EXTENT_FLAG_UNWRITTEN != 0,
    };
    if extent.length == 0 || value.len() != size_of::<ExtentValue>() {
        return Err(Error::corrupt(
            tree.root,
            format!("inode {}: bad extent entry at block {key}", tree.owner),
        ));
    }
    Ok(extent)
}

fn encode(extent: &Extent) -> ExtentValue {
    ExtentValue {
        physical: U64::new(extent.physical),
        length: U32::new(extent.length as u32),
        flags: U32::new(if extent.unwritten {
            EXTENT_FLAG_UNWRITTEN
        } else {
            0
        }),
    }
}

/// Files map at most this many blocks (MAX_FILE_SIZE / BLOCK_SIZE).
const MAX_FILE_BLOCKS: u64 = crate::fs::MAX_FILE_SIZE / crate::format::BLOCK_SIZE_U64;

/// Checks an extent read from the device before anyone computes offsets with it.
fn checked(meta: &Meta, inode: &Inode, extent: Extent) -> Result<Extent> {
    let inside_file = extent
        .logical
        .checked_add(extent.length)
        .is_some_and(|end| end <= MAX_FILE_BLOCKS);
    let inside_data = extent.physical >= meta.data_start
        && extent
            .physical
            .checked_add(extent.length)
            .is_some_and(|end| end <= meta.total_blocks);
    if extent.length == 0 || !inside_file || !inside_data {
        return Err(Error::corrupt(
            if inode.tree_root != 0 {
                inode.tree_root
            } else {
                0
            },
            format!(
                "inode {}: extent {}+{} -> {} lies outside the file or the data area",
                inode.ino, extent.logical, extent.length, extent.physical
            ),
        ));
    }
    Ok(extent)
}

/// The extent with the greatest start <= `block`.
fn floor(meta: &mut Meta, inode: &Inode, block: u64) -> Result<Option<Extent>> {
    let found = match tree_of(inode) {
        Some(tree) => btree::floor(meta, &tree, block)?
            .map(|(key, value)| decode(key, &value, &tree))
            .transpose()?,
        None => inode
            .inline
            .iter()
            .rev()
            .find(|e| e.logical <= block)
            .copied(),
    };
    found.map(|e| checked(meta, inode, e)).transpose()
}

/// The extent with the smallest start >= `block`.
fn ceiling(meta: &mut Meta, inode: &Inode, block: u64) -> Result<Option<Extent>> {
    let found = match tree_of(inode) {
        Some(tree) => btree::ceiling(meta, &tree, block)?
            .map(|(key, value)| decode(key, &value, &tree))
            .transpose()?,
        None => inode.inline.iter().find(|e| e.logical >= block).copied(),
    };
    found.map(|e| checked(meta, inode, e)).transpose()
}

/// What file block `block` maps to.
pub fn lookup(meta: &mut Meta, inode: &Inode, block: u64) -> Result<Mapping> {
    if let Some(extent) = floor(meta, inode, block)? {
        if block < extent.logical_end() {
            return Ok(Mapping::Mapped(extent));
        }
    }
    let next = ceiling(meta, inode, block)?.map(|e| e.logical);
    if next.is_some_and(|next| next <= block) {
        // floor and ceiling disagree: the map is not sorted.
        return Err(Error::corrupt(
            inode.tree_root,
            format!(
                "inode {}: extent map out of order at block {block}",
                inode.ino
            ),
        ));
    }
    Ok(Mapping::Hole { next })
}

/// Every extent, in order.
pub fn list(meta: &mut Meta, inode: &Inode) -> Result<Vec<Extent>> {
    let extents: Vec<Extent> = match tree_of(inode) {
        Some(tree) => btree::range(meta, &tree, 0, u64::MAX, usize::MAX)?
            .iter()
            .map(|(key, value)| decode(*key, value, &tree))
            .collect::<Result<_>>()?,
        None => inode.inline.clone(),
    };
    extents
        .into_iter()
        .map(|e| checked(meta, inode, e))
        .collect()
}

/// Adds an extent record (no merging; the range must be free in the map).
fn put(meta: &mut Meta, inode: &mut Inode, extent: Extent) -> Result<()> {
    if tree_of(inode).is_none() && inode.inline.len() >= INLINE_EXTENTS {
        move_to_tree(meta, inode)?;
    }
    match tree_of(inode) {
        Some(tree) => {
            btree::insert(meta, &tree, extent.logical, encode(&extent).as_bytes())?;
        }
        None => {
            let at = inode.inline.partition_point(|e| e.logical < extent.logical);
            inode.inline.insert(at, extent);
        }
    }
    inode.extent_count += 1;
    Ok(())
}

/// Removes the extent record starting at `logical`.
fn take(meta: &mut Meta, inode: &mut Inode, logical: u64) -> Result<()> {
    match tree_of(inode) {
        Some(tree) => {
            if btree::remove(meta, &tree, logical)?.is_none() {
                return Err(Error::corrupt(
                    tree.root,
                    format!("inode {}: extent at {logical} vanished", inode.ino),
                ));
            }
            inode.extent_count = inode.extent_count.saturating_sub(1);
            if inode.extent_count == 0 {
                btree::destroy(meta, &tree)?;
                inode.flags &= !INODE_FLAG_EXTENT_TREE;
                inode.tree_root = 0;
            }
        }
        None => {
            inode.inline.retain(|e| e.logical != logical);
            inode.extent_count = inode.inline.len() as u32;
        }
    }
    Ok(())
}

fn move_to_tree(meta: &mut Meta, inode: &mut Inode) -> Result<()> {
    let tree = btree::create(meta, BTREE_KIND_EXTENTS, inode.ino)?;
    for extent in &inode.inline {
        btree::insert(meta, &tree, extent.logical, encode(extent).as_bytes())?;
    }
    inode.inline.clear();
    inode.flags |= INODE_FLAG_EXTENT_TREE;
    inode.tree_root = tree.root;
    Ok(())
}

fn mergeable(left: &Extent, right: &Extent) -> bool {
    left.logical_end() == right.logical
        && left.physical + left.length == right.physical
        && left.unwritten == right.unwritten
        && left.length + right.length <= MAX_EXTENT_BLOCKS
}

/// Maps a hole to `extent`, merging it with contiguous neighbours.
pub fn insert(meta: &mut Meta, inode: &mut Inode, extent: Extent) -> Result<()> {
    if extent.length == 0 || extent.length > MAX_EXTENT_BLOCKS {
        return Err(Error::Invalid(format!(
            "extent of {} blocks",
            extent.length
        )));
    }
    let mut merged = extent;
    if let Some(left) = extent
        .logical
        .checked_sub(1)
        .map(|b| floor(meta, inode, b))
        .transpose()?
        .flatten()
    {
        if left.logical_end() > extent.logical {
            return Err(Error::corrupt(
                inode.tree_root,
                format!(
                    "inode {}: insert over mapped block {}",
                    inode.ino, extent.logical
                ),
            ));
        }
        if mergeable(&left, &merged) {
            take(meta, inode, left.logical)?;
            merged = Extent {
                logical: left.logical,
                physical: left.physical,
                length: left.length + merged.length,
                unwritten: merged.unwritten,
            };
        }
    }
    if let Some(right) = ceiling(meta, inode, extent.logical)? {
        if right.logical < extent.logical_end() {
            return Err(Error::corrupt(
                inode.tree_root,
                format!(
                    "inode {}: insert over mapped block {}",
                    inode.ino, right.logical
                ),
            ));
        }
        if mergeable(&merged, &right) {
            take(meta, inode, right.logical)?;
            merged.length += right.length;
        }
    }
    put(meta, inode, merged)
}

/// Unmaps file blocks [start, end), splitting extents that straddle the edges. Removes at
/// most `limit` extents, highest first, and returns the unmapped pieces (highest first)
/// and whether mapped blocks remain in the range.
pub fn remove_range(
    meta: &mut Meta,
    inode: &mut Inode,
    start: u64,
    end: u64,
    limit: usize,
) -> Result<(Vec<Extent>, bool)> {
    let mut removed = Vec::new();
    let mut cursor = end;
    while cursor > start {
        let Some(extent) = floor(meta, inode, cursor - 1)? else {
            break;
        };
        if extent.logical_end() <= start {
            break;
        }
        if removed.len() >= limit {
            return Ok((removed, true));
        }
        take(meta, inode, extent.logical)?;
        let cut_start = extent.logical.max(start);
        let cut_end = extent.logical_end().min(end);
        if extent.logical < cut_start {
            put(
                meta,
                inode,
                Extent {
                    length: cut_start - extent.logical,
                    ..extent
                },
            )?;
        }
        if cut_end < extent.logical_end() {
            let offset = cut_end - extent.logical;
            put(
                meta,
                inode,
                Extent {
                    logical: cut_end,
                    physical: extent.physical + offset,
                    length: extent.logical_end() - cut_end,
                    unwritten: extent.unwritten,
                },
            )?;
        }
        removed.push(Extent {
            logical: cut_start,
            physical: extent.physical + (cut_start - extent.logical),
            length: cut_end - cut_start,
            unwritten: extent.unwritten,
        });
        cursor = extent.logical;
    }
    Ok((removed, false))
}

/// Marks file blocks [start, end) written (they were written after a fallocate).
pub fn mark_written(meta: &mut Meta, inode: &mut Inode, start: u64, end: u64) -> Result<()> {
    let (pieces, _) = remove_range(meta, inode, start, end, usize::MAX)?;
    for piece in pieces.into_iter().rev() {
        insert(
            meta,
            inode,
            Extent {
                unwritten: false,
                ..piece
            },
        )?;
    }
    Ok(())
}
