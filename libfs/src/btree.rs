//! Generic on-disk B+tree: u64 keys, byte-string values, one node per 4096-byte block.
//!
//! Layer: above the block store ([`NodeStore`]: a journal transaction in the file system,
//! memory in tests) and below directories, extent maps and xattrs, which each keep trees
//! rooted in an inode.
//!
//! Interface: a [`Tree`] names the root block, the kind and the owning inode. The free
//! functions [`create`], [`get`], [`insert`], [`remove`], [`floor`], [`ceiling`],
//! [`range`], [`is_empty`], [`destroy`] and [`walk`] (for fsck) each read O(log n) nodes
//! (`range`: O(log n + k)).
//!
//! Layout (see `format`): a [`BtreeNodeHeader`], then `count` [`BtreeChild`] entries
//! (internal nodes) or `count` [`BtreeSlot`] entries whose values are packed at the end
//! of the block (leaves).
//!
//! Invariants:
//! - The root block never moves, because the caller stores its number in an inode: a root
//!   split moves the root's two halves to new blocks, and an internal root left with a
//!   single child takes over that child's contents.
//! - Keys strictly increase within a node. Child i of an internal node holds keys in
//!   [key i, key i+1) and the first key is a lower bound of the whole node: inserting a
//!   smaller key lowers it along the path, so every key of a subtree is >= the key that
//!   names the subtree. Lookups below the first key go to child 0.
//! - Leaves are level 0 and a node at level n has children at level n - 1 (n < 16). The
//!   level drops at every step down, so no corrupt child pointer can make an operation
//!   loop.
//! - Only the root may be empty (as an empty leaf). Emptied nodes are freed; a sparse node
//!   is merged into a neighbour when both fit comfortably in one block.
//! - Nodes are rebuilt from scratch on every write, so leaf values are always packed with
//!   no holes: removals and replacements never fragment a leaf.
//! - Every node read is checked (magic, crc, block number, kind, owner, level, count, slot
//!   bounds, key order) before anything else looks at it: corrupt data yields
//!   `Error::Corrupt` naming the block, never a panic.

use crate::error::{Error, Result};
use crate::format::{
    read_struct, seal_block, verify_block, write_struct, Block, BlockHeader, BtreeChild,
    BtreeNodeHeader, BtreeSlot, BLOCK_SIZE, BTREE_MAX_VALUE, MAGIC_BTREE,
};
use std::collections::HashSet;
use std::fmt::Display;
use std::sync::Arc;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

/// Where a B+tree keeps its nodes. The file system implements it on top of a journal
/// transaction; tests implement it in memory.
pub trait NodeStore {
    /// Reads a node block as stored on the device (the tree verifies header and crc).
    fn read(&mut self, block: u64) -> Result<Arc<Block>>;
    /// Writes a node block (already sealed by the tree).
    fn write(&mut self, block: u64, data: &Block) -> Result<()>;
    /// Allocates a fresh block for a node.
    fn alloc(&mut self) -> Result<u64>;
    /// Frees a node block.
    fn free(&mut self, block: u64) -> Result<()>;
}

/// A B+tree as its owner records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tree {
    /// Root block; fixed for the life of the tree.
    pub root: u64,
    /// BTREE_KIND_*; every node must carry it.
    pub kind: u16,
    /// Owning inode; every node must carry it.
    pub owner: u64,
}

/// Bytes of the node header.
const HEADER_SIZE: usize = size_of::<BtreeNodeHeader>();
/// Bytes of a leaf slot, and of an internal node's child entry.
const ENTRY_SIZE: usize = size_of::<BtreeSlot>();
const _: () = assert!(size_of::<BtreeChild>() == ENTRY_SIZE);
/// Bytes after the header: slots plus values, or child entries.
const PAYLOAD: usize = BLOCK_SIZE - HEADER_SIZE;
/// Most entries a node holds (a leaf of empty values, or an internal node).
const CAPACITY: usize = PAYLOAD / ENTRY_SIZE;
/// Levels are below this: 254-way fan-out makes deeper trees impossible, so a higher
/// level can only be corruption.
const MAX_LEVEL: u16 = 16;
/// A node using less than this after a removal asks its parent for a merge.
const SPARSE_BYTES: usize = PAYLOAD / 4;
/// Two nodes merge only if the result stays below this, leaving room for inserts so
/// that alternating inserts and removals don't split and merge the same node.
const MERGE_LIMIT: usize = PAYLOAD * 3 / 4;
/// Names the block type in errors.
const WHAT: &str = "B+tree node";

/// A corruption report for node `nr`.
fn corrupt(nr: u64, what: impl Display) -> Error {
    Error::corrupt(nr, format!("{WHAT}: {what}"))
}

/// Allocates an empty tree: a single empty leaf root.
pub fn create<S: NodeStore + ?Sized>(store: &mut S, kind: u16, owner: u64) -> Result<Tree> {
    let root = store.alloc()?;
    let tree = Tree { root, kind, owner };
    write_node(store, &tree, root, &Items::Leaf(Vec::new()))?;
    Ok(tree)
}

/// The value stored under `key`.
pub fn get<S: NodeStore + ?Sized>(store: &mut S, tree: &Tree, key: u64) -> Result<Option<Vec<u8>>> {
    let mut node = load(store, tree, tree.root, None)?;
    while !node.is_leaf() {
        let (_, child) = node.route(key)?;
        node = load(store, tree, child, Some(node.child_level()))?;
    }
    let slots = node.slots();
    let found = slots.binary_search_by_key(&key, |slot| slot.key.get()).ok();
    Ok(found
        .and_then(|i| slots.get(i))
        .map(|slot| node.value(slot).to_vec()))
}

/// Stores `value` under `key`, returning the value it replaces. Values longer than
/// `BTREE_MAX_VALUE` are refused with `Error::Invalid`.
pub fn insert<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    key: u64,
    value: &[u8],
) -> Result<Option<Vec<u8>>> {
    if value.len() > BTREE_MAX_VALUE {
        return Err(Error::Invalid(format!(
            "B+tree value of {} bytes exceeds {BTREE_MAX_VALUE}",
            value.len()
        )));
    }
    // The root never reports a split: it grows a level in place instead.
    let (old, _) = insert_into(store, tree, Place::root(tree), key, value)?;
    Ok(old)
}

/// Removes `key`, returning its value.
pub fn remove<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    key: u64,
) -> Result<Option<Vec<u8>>> {
    let Some((old, shape)) = remove_from(store, tree, Place::root(tree), key)? else {
        return Ok(None);
    };
    match shape {
        // Whatever the root was, it is now an empty tree.
        Shape::Empty => write_node(store, tree, tree.root, &Items::Leaf(Vec::new()))?,
        // An internal root may be down to one child.
        Shape::Sparse => collapse_root(store, tree)?,
        Shape::Fine => {}
    }
    Ok(Some(old))
}

/// Greatest entry with key <= `key`.
pub fn floor<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    key: u64,
) -> Result<Option<(u64, Vec<u8>)>> {
    floor_in(store, tree, tree.root, None, key)
}

/// Smallest entry with key >= `key`.
pub fn ceiling<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    key: u64,
) -> Result<Option<(u64, Vec<u8>)>> {
    ceiling_in(store, tree, tree.root, None, key)
}

/// Entries with lo <= key <= hi in key order, at most `limit` of them.
pub fn range<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    lo: u64,
    hi: u64,
    limit: usize,
) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    if lo <= hi && limit > 0 {
        let bounds = RangeQuery { lo, hi, limit };
        range_in(store, tree, tree.root, None, &bounds, &mut out)?;
    }
    Ok(out)
}

/// Frees every node including the root.
pub fn destroy<S: NodeStore + ?Sized>(store: &mut S, tree: &Tree) -> Result<()> {
    destroy_subtree(store, tree, tree.root, None)
}

/// Walks the whole tree verifying every invariant (ordering across nodes, key bounds
/// from parents, levels, checksums, no node reachable twice, no empty non-root node, no
/// overlapping values) and calls `visit_block(block)` for each node block and
/// `visit_entry(key, value)` for each leaf entry, in key order. Used by fsck; returns the
/// first error (Corrupt naming the block, or what `visit_entry` returned).
pub fn walk<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    visit_block: &mut dyn FnMut(u64),
    visit_entry: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut walker = Walker {
        tree,
        seen: HashSet::new(),
        visit_block,
        visit_entry,
    };
    walker.visit(store, tree.root, None, 0, None)
}

/// True if the tree has no entries.
pub fn is_empty<S: NodeStore + ?Sized>(store: &mut S, tree: &Tree) -> Result<bool> {
    // Only the root may be empty, and an internal root always has entries below it.
    let root = load(store, tree, tree.root, None)?;
    Ok(root.is_leaf() && root.count == 0)
}

// ---------------------------------------------------------------------------------------
// Reading nodes

/// A node block that passed every check of [`load`], read in place.
struct NodeView {
    nr: u64,
    data: Arc<Block>,
    level: u16,
    count: usize,
}

impl NodeView {
    fn is_leaf(&self) -> bool {
        self.level == 0
    }

    /// Level of this node's children.
    fn child_level(&self) -> u16 {
        self.level.saturating_sub(1)
    }

    /// A leaf's slots (empty for an internal node).
    fn slots(&self) -> &[BtreeSlot] {
        if !self.is_leaf() {
            return &[];
        }
        // `load` checked that the array fits, so this never falls back.
        <[BtreeSlot]>::ref_from_prefix_with_elems(&self.data[HEADER_SIZE..], self.count)
            .map_or(&[], |(slots, _)| slots)
    }

    /// An internal node's children (empty for a leaf).
    fn children(&self) -> &[BtreeChild] {
        if self.is_leaf() {
            return &[];
        }
        <[BtreeChild]>::ref_from_prefix_with_elems(&self.data[HEADER_SIZE..], self.count)
            .map_or(&[], |(children, _)| children)
    }

    /// The value a slot of this leaf points to (bounds checked by `load`).
    fn value(&self, slot: &BtreeSlot) -> &[u8] {
        let start = usize::from(slot.offset.get());
        let end = start + usize::from(slot.length.get());
        self.data.get(start..end).unwrap_or(&[])
    }

    /// A leaf entry as the caller receives it.
    fn entry(&self, slot: &BtreeSlot) -> (u64, Vec<u8>) {
        (slot.key.get(), self.value(slot).to_vec())
    }

    /// The child of an internal node that covers `key`: its index and block.
    fn route(&self, key: u64) -> Result<(usize, u64)> {
        let children = self.children();
        let i = child_index(children, key);
        let child = children
            .get(i)
            .ok_or_else(|| corrupt(self.nr, "internal node without children"))?;
        Ok((i, child.child.get()))
    }

    /// The node's contents, ready to be edited and written back.
    fn items(&self) -> Items<'_> {
        if self.is_leaf() {
            let entries = self
                .slots()
                .iter()
                .map(|slot| (slot.key.get(), self.value(slot)));
            Items::Leaf(entries.collect())
        } else {
            Items::Internal {
                level: self.level,
                children: self.children().to_vec(),
            }
        }
    }
}

/// Index of the child covering `key`: the last whose key is <= `key`, or child 0 for keys
/// below the node's lower bound.
fn child_index(children: &[BtreeChild], key: u64) -> usize {
    children
        .partition_point(|child| child.key.get() <= key)
        .saturating_sub(1)
}

/// Reads node `nr` and checks everything about it that can be checked locally.
/// `level` is the level its parent implies, or None for the root.
fn load<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    nr: u64,
    level: Option<u16>,
) -> Result<NodeView> {
    let data = store.read(nr)?;
    verify_block(&data, MAGIC_BTREE, nr, WHAT)?;
    let header: BtreeNodeHeader = read_struct(&data[..], nr, WHAT)?;
    check_header(tree, nr, &header, level)?;
    let node = NodeView {
        nr,
        data,
        level: header.level.get(),
        count: usize::from(header.count.get()),
    };
    let value_start = usize::from(header.value_start.get());
    if node.is_leaf() {
        check_leaf(&node, value_start)?;
    } else {
        check_internal(&node, value_start)?;
    }
    Ok(node)
}

/// Checks the header fields that don't depend on the node type.
fn check_header(
    tree: &Tree,
    nr: u64,
    header: &BtreeNodeHeader,
    expected_level: Option<u16>,
) -> Result<()> {
    let (kind, owner, level) = (header.kind.get(), header.owner.get(), header.level.get());
    let count = usize::from(header.count.get());
    if kind != tree.kind {
        return Err(corrupt(nr, format!("kind {kind}, expected {}", tree.kind)));
    }
    if owner != tree.owner {
        return Err(corrupt(
            nr,
            format!("owner {owner}, expected {}", tree.owner),
        ));
    }
    if level >= MAX_LEVEL {
        return Err(corrupt(
            nr,
            format!("level {level} is not below {MAX_LEVEL}"),
        ));
    }
    if let Some(expected) = expected_level {
        if level != expected {
            return Err(corrupt(
                nr,
                format!("level {level}, its parent implies {expected}"),
            ));
        }
    }
    if count > CAPACITY {
        return Err(corrupt(
            nr,
            format!("count {count} exceeds capacity {CAPACITY}"),
        ));
    }
    Ok(())
}

/// Checks a leaf: value area after the slot array, every value inside it, keys sorted.
fn check_leaf(node: &NodeView, value_start: usize) -> Result<()> {
    let nr = node.nr;
    let slots_end = HEADER_SIZE + ENTRY_SIZE * node.count;
    if value_start < slots_end || value_start > BLOCK_SIZE {
        return Err(corrupt(
            nr,
            format!("value area starts at {value_start}, slots end at {slots_end}"),
        ));
    }
    let (slots, _) =
        <[BtreeSlot]>::ref_from_prefix_with_elems(&node.data[HEADER_SIZE..], node.count)
            .map_err(|_| corrupt(nr, "slot array does not fit the block"))?;
    for (i, slot) in slots.iter().enumerate() {
        let (offset, length) = (
            usize::from(slot.offset.get()),
            usize::from(slot.length.get()),
        );
        if length > BTREE_MAX_VALUE {
            return Err(corrupt(
                nr,
                format!("slot {i}: value of {length} bytes is too long"),
            ));
        }
        if offset < value_start || offset + length > BLOCK_SIZE {
            return Err(corrupt(
                nr,
                format!("slot {i}: value at {offset}+{length} outside {value_start}..{BLOCK_SIZE}"),
            ));
        }
        if slot.reserved.get() != 0 {
            return Err(corrupt(nr, format!("slot {i}: reserved field is not zero")));
        }
    }
    check_sorted(nr, slots.iter().map(|slot| slot.key.get()))
}

/// Checks an internal node: at least one child, no value area, keys sorted.
fn check_internal(node: &NodeView, value_start: usize) -> Result<()> {
    let nr = node.nr;
    if node.count == 0 {
        return Err(corrupt(nr, "internal node without children"));
    }
    if value_start != 0 {
        return Err(corrupt(
            nr,
            format!("internal node with value area at {value_start}"),
        ));
    }
    let (children, _) =
        <[BtreeChild]>::ref_from_prefix_with_elems(&node.data[HEADER_SIZE..], node.count)
            .map_err(|_| corrupt(nr, "child array does not fit the block"))?;
    if let Some((i, child)) = children
        .iter()
        .enumerate()
        .find(|(_, c)| c.child.get() == 0 || c.child.get() == nr)
    {
        return Err(corrupt(
            nr,
            format!("child {i} points to block {}", child.child.get()),
        ));
    }
    check_sorted(nr, children.iter().map(|child| child.key.get()))
}

/// Checks that keys strictly increase.
fn check_sorted(nr: u64, keys: impl Iterator<Item = u64>) -> Result<()> {
    let mut previous = None;
    for (i, key) in keys.enumerate() {
        if previous.is_some_and(|p| key <= p) {
            return Err(corrupt(
                nr,
                format!("key {i} ({key}) does not follow the one before"),
            ));
        }
        previous = Some(key);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Writing nodes

/// A node's contents being rebuilt. Leaf values borrow from the blocks they were read
/// from (or from the caller), so an edit copies each value once, into the new block.
enum Items<'a> {
    Leaf(Vec<(u64, &'a [u8])>),
    Internal {
        level: u16,
        children: Vec<BtreeChild>,
    },
}

impl<'a> Items<'a> {
    fn level(&self) -> u16 {
        match self {
            Items::Leaf(_) => 0,
            Items::Internal { level, .. } => *level,
        }
    }

    fn first_key(&self) -> Option<u64> {
        match self {
            Items::Leaf(entries) => entries.first().map(|(key, _)| *key),
            Items::Internal { children, .. } => children.first().map(|child| child.key.get()),
        }
    }

    /// Bytes each entry takes after the header.
    fn sizes(&self) -> Vec<usize> {
        match self {
            Items::Leaf(entries) => entries.iter().map(|(_, v)| ENTRY_SIZE + v.len()).collect(),
            Items::Internal { children, .. } => vec![ENTRY_SIZE; children.len()],
        }
    }

    /// Bytes the entries take after the header.
    fn used(&self) -> usize {
        match self {
            Items::Leaf(entries) => entries.iter().map(|(_, v)| ENTRY_SIZE + v.len()).sum(),
            Items::Internal { children, .. } => ENTRY_SIZE * children.len(),
        }
    }

    fn fits(&self) -> bool {
        self.used() <= PAYLOAD
    }

    /// What the parent must do about this node once it is written.
    fn shape(&self) -> Shape {
        match self.used() {
            0 => Shape::Empty,
            used if used < SPARSE_BYTES => Shape::Sparse,
            _ => Shape::Fine,
        }
    }

    /// Keeps entries `..at` and returns the others.
    fn split_off(&mut self, at: usize) -> Items<'a> {
        match self {
            Items::Leaf(entries) => Items::Leaf(entries.split_off(at)),
            Items::Internal { level, children } => Items::Internal {
                level: *level,
                children: children.split_off(at),
            },
        }
    }

    /// Appends the entries of the node that follows this one at the same level.
    fn append(&mut self, next: Items<'a>, nr: u64) -> Result<()> {
        match (self, next) {
            (Items::Leaf(entries), Items::Leaf(more)) => entries.extend(more),
            (Items::Internal { children, .. }, Items::Internal { children: more, .. }) => {
                children.extend(more);
            }
            _ => return Err(corrupt(nr, "sibling of a different level")),
        }
        Ok(())
    }

    /// The node as a block, not yet sealed. Leaf values are packed downwards from the end
    /// of the block in slot order, leaving no holes.
    fn encode(&self, tree: &Tree, nr: u64) -> Result<Block> {
        if !self.fits() {
            // Callers split first; reaching this is a bug, reported rather than written.
            return Err(Error::Invalid(format!(
                "{WHAT} {nr}: contents overflow the block"
            )));
        }
        let mut block = [0u8; BLOCK_SIZE];
        let (count, value_start) = match self {
            Items::Leaf(entries) => {
                let mut cursor = BLOCK_SIZE;
                for (i, (key, value)) in entries.iter().enumerate() {
                    cursor -= value.len();
                    block[cursor..cursor + value.len()].copy_from_slice(value);
                    // fits() bounds the offset by BLOCK_SIZE and the length by
                    // BTREE_MAX_VALUE, so both fit in u16.
                    let slot = BtreeSlot {
                        key: U64::new(*key),
                        offset: U16::new(cursor as u16),
                        length: U16::new(value.len() as u16),
                        reserved: U32::new(0),
                    };
                    write_struct(&mut block[HEADER_SIZE + i * ENTRY_SIZE..], &slot);
                }
                (entries.len(), cursor)
            }
            Items::Internal { children, .. } => {
                let raw = children.as_bytes();
                block[HEADER_SIZE..HEADER_SIZE + raw.len()].copy_from_slice(raw);
                (children.len(), 0)
            }
        };
        let header = BtreeNodeHeader {
            // seal_block fills in the magic, block number and crc.
            header: BlockHeader {
                magic: U32::new(0),
                crc: U32::new(0),
                block_nr: U64::new(0),
            },
            level: U16::new(self.level()),
            count: U16::new(count as u16),
            value_start: U16::new(value_start as u16),
            kind: U16::new(tree.kind),
            owner: U64::new(tree.owner),
        };
        write_struct(&mut block[..], &header);
        Ok(block)
    }
}

/// How a node stands after a removal, for its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// No entries left, and not written: the parent frees it.
    Empty,
    /// Written, but using little of its block: the parent tries a merge.
    Sparse,
    /// Nothing for the parent to do.
    Fine,
}

/// Encodes, seals and writes a node.
fn write_node<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    nr: u64,
    items: &Items,
) -> Result<()> {
    let mut block = items.encode(tree, nr)?;
    seal_block(&mut block, MAGIC_BTREE, nr);
    store.write(nr, &block)
}

/// A child entry for an internal node.
fn child_entry(key: u64, block: u64) -> BtreeChild {
    BtreeChild {
        key: U64::new(key),
        child: U64::new(block),
    }
}

/// Where a node sits in the tree.
#[derive(Debug, Clone, Copy)]
struct Place {
    nr: u64,
    /// The level the parent implies; None for the root.
    level: Option<u16>,
    /// On the path of the smallest keys of the tree.
    leftmost: bool,
    /// On the path of the greatest keys of the tree.
    rightmost: bool,
}

impl Place {
    fn root(tree: &Tree) -> Place {
        Place {
            nr: tree.root,
            level: None,
            leftmost: true,
            rightmost: true,
        }
    }

    fn is_root(&self) -> bool {
        self.level.is_none()
    }

    /// The place of child `i` (block `nr`) of `node`, which sits here.
    fn child(&self, node: &NodeView, i: usize, nr: u64) -> Place {
        Place {
            nr,
            level: Some(node.child_level()),
            leftmost: self.leftmost && i == 0,
            rightmost: self.rightmost && i + 1 == node.count,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Insertion

/// Inserts into the subtree at `place`. Returns the replaced value, and the entry for a
/// new right sibling the parent must add if the node split.
fn insert_into<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    place: Place,
    key: u64,
    value: &[u8],
) -> Result<(Option<Vec<u8>>, Option<BtreeChild>)> {
    let node = load(store, tree, place.nr, place.level)?;
    if node.is_leaf() {
        let Items::Leaf(mut entries) = node.items() else {
            return Err(corrupt(place.nr, "leaf without entries"));
        };
        let (old, at) = match entries.binary_search_by_key(&key, |(k, _)| *k) {
            Ok(i) => {
                let old = entries
                    .get_mut(i)
                    .map(|entry| std::mem::replace(&mut entry.1, value));
                (old.map(<[u8]>::to_vec), i)
            }
            Err(i) => {
                entries.insert(i, (key, value));
                (None, i)
            }
        };
        let split = store_node(store, tree, place, Items::Leaf(entries), at)?;
        return Ok((old, split));
    }

    let (i, child_nr) = node.route(key)?;
    let mut children = node.children().to_vec();
    // A key below the node's lower bound goes to child 0, whose bound drops to cover it
    // (so every key of a subtree stays >= the key naming it).
    let lowered = match children.first_mut() {
        Some(first) if key < first.key.get() => {
            first.key = U64::new(key);
            true
        }
        _ => false,
    };
    let (old, split) = insert_into(store, tree, place.child(&node, i, child_nr), key, value)?;
    let items = match split {
        Some(sibling) => {
            children.insert(i + 1, sibling);
            Items::Internal {
                level: node.level,
                children,
            }
        }
        None if lowered => Items::Internal {
            level: node.level,
            children,
        },
        None => return Ok((old, None)),
    };
    let split = store_node(store, tree, place, items, i + 1)?;
    Ok((old, split))
}

/// Writes a node's new contents to its block, splitting them when they no longer fit
/// (`at` is the entry just added or changed). Returns the entry the parent must add for
/// the new right half. The root keeps its block: its halves move to two new blocks and it
/// becomes their parent, one level up.
fn store_node<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    place: Place,
    mut items: Items,
    at: usize,
) -> Result<Option<BtreeChild>> {
    if items.fits() {
        write_node(store, tree, place.nr, &items)?;
        return Ok(None);
    }
    let cut = split_point(&items, at, place)?;
    let right = items.split_off(cut);
    let right_key = first_key_of_half(&right, place.nr)?;
    if !place.is_root() {
        let right_nr = store.alloc()?;
        write_node(store, tree, right_nr, &right)?;
        write_node(store, tree, place.nr, &items)?;
        return Ok(Some(child_entry(right_key, right_nr)));
    }
    let level = items.level() + 1;
    if level >= MAX_LEVEL {
        return Err(Error::Invalid(format!(
            "B+tree {} would exceed {MAX_LEVEL} levels",
            tree.root
        )));
    }
    let left_key = first_key_of_half(&items, place.nr)?;
    let left_nr = store.alloc()?;
    let right_nr = store.alloc()?;
    write_node(store, tree, left_nr, &items)?;
    write_node(store, tree, right_nr, &right)?;
    let children = vec![
        child_entry(left_key, left_nr),
        child_entry(right_key, right_nr),
    ];
    write_node(store, tree, place.nr, &Items::Internal { level, children })?;
    Ok(None)
}

/// First key of one half of a split (never empty: `split_point` cuts inside).
fn first_key_of_half(items: &Items, nr: u64) -> Result<u64> {
    items
        .first_key()
        .ok_or_else(|| Error::Invalid(format!("{WHAT} {nr}: empty half of a split")))
}

/// Where to cut an overfull node so both halves fit. An append at the right (or left) edge
/// of the tree leaves the old entries together in a full node, so trees filled in key
/// order (extent maps grow that way) end up with full blocks; any other insert cuts near
/// the middle by bytes.
fn split_point(items: &Items, at: usize, place: Place) -> Result<usize> {
    let sizes = items.sizes();
    let n = sizes.len();
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0usize);
    for size in &sizes {
        prefix.push(prefix.last().copied().unwrap_or(0) + size);
    }
    let total = prefix.last().copied().unwrap_or(0);
    let left_bytes = |cut: usize| prefix.get(cut).copied();
    let fits =
        |cut: usize| left_bytes(cut).is_some_and(|left| left <= PAYLOAD && total - left <= PAYLOAD);
    if place.rightmost && at + 1 == n && fits(n - 1) {
        return Ok(n - 1);
    }
    if place.leftmost && at == 0 && fits(1) {
        return Ok(1);
    }
    // Entries are at most 16 + BTREE_MAX_VALUE bytes and the node overflowed by one
    // entry, so a cut near the middle always fits.
    (1..n)
        .filter(|&cut| fits(cut))
        .min_by_key(|&cut| left_bytes(cut).map_or(usize::MAX, |left| left.abs_diff(total - left)))
        .ok_or_else(|| Error::Invalid(format!("{WHAT} {}: no way to split", place.nr)))
}

// ---------------------------------------------------------------------------------------
// Removal

/// Removes `key` from the subtree at `place`. Returns the value and how the node stands.
/// An emptied node is not written: its parent frees it (or `remove` rewrites the root).
fn remove_from<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    place: Place,
    key: u64,
) -> Result<Option<(Vec<u8>, Shape)>> {
    let node = load(store, tree, place.nr, place.level)?;
    let (old, items) = if node.is_leaf() {
        let Items::Leaf(mut entries) = node.items() else {
            return Err(corrupt(place.nr, "leaf without entries"));
        };
        let Ok(i) = entries.binary_search_by_key(&key, |(k, _)| *k) else {
            return Ok(None);
        };
        let (_, old) = entries.remove(i);
        (old.to_vec(), Items::Leaf(entries))
    } else {
        let (i, child_nr) = node.route(key)?;
        let child = place.child(&node, i, child_nr);
        let Some((old, shape)) = remove_from(store, tree, child, key)? else {
            return Ok(None);
        };
        let mut children = node.children().to_vec();
        match shape {
            Shape::Fine => return Ok(Some((old, Shape::Fine))),
            Shape::Empty => {
                store.free(child_nr)?;
                children.remove(i);
            }
            Shape::Sparse => {
                if !merge_neighbours(store, tree, &mut children, i, node.child_level())? {
                    return Ok(Some((old, Shape::Fine)));
                }
            }
        }
        (
            old,
            Items::Internal {
                level: node.level,
                children,
            },
        )
    };
    let shape = items.shape();
    if shape != Shape::Empty {
        write_node(store, tree, place.nr, &items)?;
    }
    Ok(Some((old, shape)))
}

/// Merges the sparse child `i` with a neighbour when both fit comfortably in one block,
/// so removals don't leave a tree of near-empty nodes. The left node's block survives
/// (its key in the parent already bounds both); the right one is freed. Returns whether
/// it merged.
fn merge_neighbours<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    children: &mut Vec<BtreeChild>,
    i: usize,
    level: u16,
) -> Result<bool> {
    let left = if i + 1 < children.len() {
        i
    } else if let Some(before) = i.checked_sub(1) {
        before
    } else {
        return Ok(false);
    };
    let (Some(left_child), Some(right_child)) = (children.get(left), children.get(left + 1)) else {
        return Ok(false);
    };
    let (left_nr, right_nr) = (left_child.child.get(), right_child.child.get());
    let left_node = load(store, tree, left_nr, Some(level))?;
    let right_node = load(store, tree, right_nr, Some(level))?;
    let mut merged = left_node.items();
    merged.append(right_node.items(), right_nr)?;
    if merged.used() > MERGE_LIMIT {
        return Ok(false);
    }
    write_node(store, tree, left_nr, &merged)?;
    store.free(right_nr)?;
    children.remove(left + 1);
    Ok(true)
}

/// While the root is an internal node with a single child, copies that child into the
/// root block (the root must not move) and frees it, so the tree loses a level.
fn collapse_root<S: NodeStore + ?Sized>(store: &mut S, tree: &Tree) -> Result<()> {
    loop {
        let root = load(store, tree, tree.root, None)?;
        let [only] = root.children() else {
            return Ok(());
        };
        let child_nr = only.child.get();
        let child = load(store, tree, child_nr, Some(root.child_level()))?;
        // Same kind, owner and format: only the block number in the header changes.
        let mut block = *child.data;
        seal_block(&mut block, MAGIC_BTREE, tree.root);
        store.write(tree.root, &block)?;
        store.free(child_nr)?;
    }
}

// ---------------------------------------------------------------------------------------
// Queries and whole-tree operations

/// `floor` within the subtree at `nr`. When the child covering `key` holds only greater
/// keys, the answer is the greatest key of the child before it; with no empty nodes that
/// costs at most one extra descent.
fn floor_in<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    nr: u64,
    level: Option<u16>,
    key: u64,
) -> Result<Option<(u64, Vec<u8>)>> {
    let node = load(store, tree, nr, level)?;
    if node.is_leaf() {
        let slots = node.slots();
        let below = slots.partition_point(|slot| slot.key.get() <= key);
        let found = below.checked_sub(1).and_then(|i| slots.get(i));
        return Ok(found.map(|slot| node.entry(slot)));
    }
    let children = node.children();
    let i = child_index(children, key);
    for child in children.iter().take(i + 1).rev() {
        if let Some(found) = floor_in(
            store,
            tree,
            child.child.get(),
            Some(node.child_level()),
            key,
        )? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// `ceiling` within the subtree at `nr`: the mirror image of [`floor_in`].
fn ceiling_in<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    nr: u64,
    level: Option<u16>,
    key: u64,
) -> Result<Option<(u64, Vec<u8>)>> {
    let node = load(store, tree, nr, level)?;
    if node.is_leaf() {
        let slots = node.slots();
        let found = slots.get(slots.partition_point(|slot| slot.key.get() < key));
        return Ok(found.map(|slot| node.entry(slot)));
    }
    let children = node.children();
    for child in children.iter().skip(child_index(children, key)) {
        let found = ceiling_in(
            store,
            tree,
            child.child.get(),
            Some(node.child_level()),
            key,
        )?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// The bounds of a `range` call.
struct RangeQuery {
    lo: u64,
    hi: u64,
    limit: usize,
}

/// Appends the entries of the subtree at `nr` that `query` selects, in key order.
fn range_in<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    nr: u64,
    level: Option<u16>,
    query: &RangeQuery,
    out: &mut Vec<(u64, Vec<u8>)>,
) -> Result<()> {
    let node = load(store, tree, nr, level)?;
    if node.is_leaf() {
        let slots = node.slots();
        let start = slots.partition_point(|slot| slot.key.get() < query.lo);
        let wanted = slots
            .iter()
            .skip(start)
            .take_while(|slot| slot.key.get() <= query.hi);
        let room = query.limit.saturating_sub(out.len());
        out.extend(wanted.take(room).map(|slot| node.entry(slot)));
        return Ok(());
    }
    let children = node.children();
    for child in children.iter().skip(child_index(children, query.lo)) {
        // Children after the first hold only keys >= their own key.
        if child.key.get() > query.hi || out.len() >= query.limit {
            break;
        }
        range_in(
            store,
            tree,
            child.child.get(),
            Some(node.child_level()),
            query,
            out,
        )?;
    }
    Ok(())
}

/// Frees the subtree at `nr`, children first.
fn destroy_subtree<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    nr: u64,
    level: Option<u16>,
) -> Result<()> {
    let node = load(store, tree, nr, level)?;
    for child in node.children() {
        destroy_subtree(store, tree, child.child.get(), Some(node.child_level()))?;
    }
    store.free(nr)
}

/// State of a [`walk`].
struct Walker<'a> {
    tree: &'a Tree,
    /// Nodes visited so far: a node reachable twice means a shared or cyclic pointer.
    seen: HashSet<u64>,
    visit_block: &'a mut dyn FnMut(u64),
    visit_entry: &'a mut dyn FnMut(u64, &[u8]) -> Result<()>,
}

impl Walker<'_> {
    /// Checks the subtree at `nr`, whose keys must lie in [lo, hi) (hi None: no bound).
    fn visit<S: NodeStore + ?Sized>(
        &mut self,
        store: &mut S,
        nr: u64,
        level: Option<u16>,
        lo: u64,
        hi: Option<u64>,
    ) -> Result<()> {
        if !self.seen.insert(nr) {
            return Err(corrupt(nr, "reachable twice in the tree"));
        }
        let node = load(store, self.tree, nr, level)?;
        (self.visit_block)(nr);
        if level.is_some() && node.count == 0 {
            return Err(corrupt(nr, "empty node below the root"));
        }
        check_bounds(&node, lo, hi)?;
        if node.is_leaf() {
            check_no_overlap(&node)?;
            for slot in node.slots() {
                (self.visit_entry)(slot.key.get(), node.value(slot))?;
            }
            return Ok(());
        }
        let children = node.children();
        for (i, child) in children.iter().enumerate() {
            let child_hi = children.get(i + 1).map(|next| next.key.get()).or(hi);
            let child_level = Some(node.child_level());
            self.visit(
                store,
                child.child.get(),
                child_level,
                child.key.get(),
                child_hi,
            )?;
        }
        Ok(())
    }
}

/// Checks that a node's keys lie in [lo, hi); `load` checked they are sorted, so the first
/// and last keys tell.
fn check_bounds(node: &NodeView, lo: u64, hi: Option<u64>) -> Result<()> {
    let (first, last) = if node.is_leaf() {
        let slots = node.slots();
        (
            slots.first().map(|s| s.key.get()),
            slots.last().map(|s| s.key.get()),
        )
    } else {
        let children = node.children();
        (
            children.first().map(|c| c.key.get()),
            children.last().map(|c| c.key.get()),
        )
    };
    if let Some(first) = first.filter(|&first| first < lo) {
        return Err(corrupt(
            node.nr,
            format!("key {first} below the parent's bound {lo}"),
        ));
    }
    if let (Some(last), Some(hi)) = (last, hi) {
        if last >= hi {
            return Err(corrupt(
                node.nr,
                format!("key {last} not below the next bound {hi}"),
            ));
        }
    }
    Ok(())
}

/// Checks that no two values of a leaf share bytes.
fn check_no_overlap(node: &NodeView) -> Result<()> {
    let mut spans: Vec<(usize, usize)> = node
        .slots()
        .iter()
        .map(|slot| {
            (
                usize::from(slot.offset.get()),
                usize::from(slot.length.get()),
            )
        })
        .filter(|&(_, length)| length > 0)
        .collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        if let [(offset, length), (next, _)] = pair {
            if offset + length > *next {
                return Err(corrupt(
                    node.nr,
                    format!("values at {offset} and {next} overlap"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::format::{BTREE_KIND_DIRECTORY, BTREE_KIND_EXTENTS, BTREE_KIND_XATTR};
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, HashMap};

    /// Nodes in memory. Catches reads of freed or unwritten blocks, writes to blocks not
    /// allocated, and double frees.
    #[derive(Debug, Default, Clone)]
    struct MemStore {
        blocks: HashMap<u64, Arc<Block>>,
        live: HashSet<u64>,
        freed: HashSet<u64>,
        next: u64,
    }

    impl NodeStore for MemStore {
        fn read(&mut self, block: u64) -> Result<Arc<Block>> {
            if self.freed.contains(&block) {
                return Err(Error::Invalid(format!("read of freed block {block}")));
            }
            let data = self.blocks.get(&block).cloned();
            data.ok_or_else(|| Error::Invalid(format!("read of unwritten block {block}")))
        }

        fn write(&mut self, block: u64, data: &Block) -> Result<()> {
            if !self.live.contains(&block) {
                return Err(Error::Invalid(format!(
                    "write to unallocated block {block}"
                )));
            }
            self.blocks.insert(block, Arc::new(*data));
            Ok(())
        }

        fn alloc(&mut self) -> Result<u64> {
            // Numbers start above 0 like a real device's data area; never reused, so a
            // stale pointer to a freed block is always caught.
            self.next += 1;
            let block = 100 + self.next;
            self.live.insert(block);
            Ok(block)
        }

        fn free(&mut self, block: u64) -> Result<()> {
            if !self.live.remove(&block) {
                let why = if self.freed.contains(&block) {
                    "double free"
                } else {
                    "free"
                };
                return Err(Error::Invalid(format!("{why} of block {block}")));
            }
            self.blocks.remove(&block);
            self.freed.insert(block);
            Ok(())
        }
    }

    fn value_for(key: u64, len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (key as u8) ^ (i as u8).wrapping_mul(31) ^ salt)
            .collect()
    }

    /// Walks the tree (the only one in `store`) and returns its contents, checking that
    /// the walk visits exactly the store's live blocks: no leaks, no strays.
    fn contents(store: &mut MemStore, tree: &Tree) -> BTreeMap<u64, Vec<u8>> {
        let mut blocks = HashSet::new();
        let mut map = BTreeMap::new();
        let mut previous = None;
        walk(
            store,
            tree,
            &mut |b| assert!(blocks.insert(b)),
            &mut |k, v| {
                assert!(previous < Some(k), "walk out of order");
                previous = Some(k);
                map.insert(k, v.to_vec());
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            blocks, store.live,
            "walked blocks differ from allocated blocks"
        );
        map
    }

    fn root_header(store: &mut MemStore, tree: &Tree) -> BtreeNodeHeader {
        let data = store.read(tree.root).unwrap();
        read_struct(&data[..], tree.root, WHAT).unwrap()
    }

    fn assert_single_empty_root(store: &mut MemStore, tree: &Tree) {
        assert!(is_empty(store, tree).unwrap());
        assert_eq!(store.live.len(), 1);
        assert_eq!(store.blocks.len(), 1);
        assert!(store.live.contains(&tree.root));
        let header = root_header(store, tree);
        assert_eq!((header.level.get(), header.count.get()), (0, 0));
        assert_eq!(usize::from(header.value_start.get()), BLOCK_SIZE);
    }

    #[test]
    fn empty_tree() {
        let mut store = MemStore::default();
        let tree = create(&mut store, BTREE_KIND_DIRECTORY, 7).unwrap();
        assert_single_empty_root(&mut store, &tree);
        assert_eq!(get(&mut store, &tree, 5).unwrap(), None);
        assert_eq!(floor(&mut store, &tree, u64::MAX).unwrap(), None);
        assert_eq!(ceiling(&mut store, &tree, 0).unwrap(), None);
        assert!(range(&mut store, &tree, 0, u64::MAX, 10)
            .unwrap()
            .is_empty());
        assert_eq!(remove(&mut store, &tree, 5).unwrap(), None);
        assert!(contents(&mut store, &tree).is_empty());
        destroy(&mut store, &tree).unwrap();
        assert!(store.live.is_empty());
    }

    #[test]
    fn insert_replace_remove() {
        let mut store = MemStore::default();
        let tree = create(&mut store, BTREE_KIND_DIRECTORY, 7).unwrap();
        assert_eq!(insert(&mut store, &tree, 10, b"ten").unwrap(), None);
        assert_eq!(insert(&mut store, &tree, 0, b"").unwrap(), None);
        assert_eq!(insert(&mut store, &tree, u64::MAX, b"max").unwrap(), None);
        assert_eq!(
            insert(&mut store, &tree, 10, b"TEN!").unwrap(),
            Some(b"ten".to_vec())
        );
        assert_eq!(get(&mut store, &tree, 10).unwrap(), Some(b"TEN!".to_vec()));
        assert_eq!(get(&mut store, &tree, 0).unwrap(), Some(Vec::new()));
        assert_eq!(floor(&mut store, &tree, 9).unwrap(), Some((0, Vec::new())));
        assert_eq!(
            ceiling(&mut store, &tree, 11).unwrap(),
            Some((u64::MAX, b"max".to_vec()))
        );
        assert_eq!(
            range(&mut store, &tree, 0, u64::MAX, 2).unwrap(),
            vec![(0, Vec::new()), (10, b"TEN!".to_vec())]
        );
        assert_eq!(range(&mut store, &tree, 11, 10, 5).unwrap(), vec![]);
        assert_eq!(range(&mut store, &tree, 0, u64::MAX, 0).unwrap(), vec![]);
        assert!(!is_empty(&mut store, &tree).unwrap());
        assert_eq!(
            remove(&mut store, &tree, 10).unwrap(),
            Some(b"TEN!".to_vec())
        );
        assert_eq!(remove(&mut store, &tree, 10).unwrap(), None);
        assert_eq!(remove(&mut store, &tree, 0).unwrap(), Some(Vec::new()));
        assert_eq!(
            remove(&mut store, &tree, u64::MAX).unwrap(),
            Some(b"max".to_vec())
        );
        assert_single_empty_root(&mut store, &tree);
    }

    #[test]
    fn value_size_limit() {
        let mut store = MemStore::default();
        let tree = create(&mut store, BTREE_KIND_DIRECTORY, 7).unwrap();
        let big = vec![0xa5; BTREE_MAX_VALUE];
        insert(&mut store, &tree, 1, &big).unwrap();
        assert_eq!(get(&mut store, &tree, 1).unwrap(), Some(big));
        let too_big = vec![0; BTREE_MAX_VALUE + 1];
        assert!(matches!(
            insert(&mut store, &tree, 2, &too_big),
            Err(Error::Invalid(_))
        ));
        assert_eq!(get(&mut store, &tree, 2).unwrap(), None);
    }

    #[test]
    fn replacements_keep_leaf_compact() {
        // A single leaf whose values are rewritten with varying sizes must never lose
        // space to holes: 3 values of 1024 bytes keep fitting in one block.
        let mut store = MemStore::default();
        let tree = create(&mut store, BTREE_KIND_DIRECTORY, 7).unwrap();
        for round in 0..50u64 {
            for key in 0..3u64 {
                let len = if (round + key) % 2 == 0 {
                    1024
                } else {
                    10 + round as usize
                };
                insert(&mut store, &tree, key, &value_for(key, len, round as u8)).unwrap();
            }
        }
        for key in 0..3u64 {
            insert(&mut store, &tree, key, &value_for(key, 1024, 1)).unwrap();
        }
        assert_eq!(
            store.live.len(),
            1,
            "three 1 KiB values fit in the root leaf"
        );
        let header = root_header(&mut store, &tree);
        assert_eq!(usize::from(header.value_start.get()), BLOCK_SIZE - 3 * 1024);
    }

    #[test]
    fn root_split_keeps_root_block() {
        let mut store = MemStore::default();
        let tree = create(&mut store, BTREE_KIND_EXTENTS, 3).unwrap();
        let mut key = 0;
        while root_header(&mut store, &tree).level.get() == 0 {
            insert(&mut store, &tree, key * 10, &value_for(key, 300, 0)).unwrap();
            key += 1;
        }
        assert_eq!(key, 13, "12 entries of 316 bytes fill a leaf");
        let header = root_header(&mut store, &tree);
        assert_eq!((header.level.get(), header.count.get()), (1, 2));
        assert_eq!(usize::from(header.value_start.get()), 0);
        assert_eq!(store.live.len(), 3);
        let map = contents(&mut store, &tree);
        assert_eq!(map.len(), 13);
        for k in 0..key {
            assert_eq!(
                get(&mut store, &tree, k * 10).unwrap(),
                Some(value_for(k, 300, 0))
            );
        }
        // Keys below the root's first key still land in the tree (lower bound drops).
        let mut store2 = store.clone();
        insert(&mut store, &tree, 5, b"five").unwrap();
        assert_eq!(
            floor(&mut store, &tree, 9).unwrap(),
            Some((5, b"five".to_vec()))
        );
        contents(&mut store, &tree);
        // Once the left leaf is sparse (3 entries left) it merges with its neighbour and
        // the root absorbs the merged leaf.
        for k in 0..key {
            remove(&mut store2, &tree, k * 10).unwrap();
            if k == 9 {
                assert_eq!(store2.live.len(), 1, "merged back into the root");
                assert_eq!(root_header(&mut store2, &tree).level.get(), 0);
            }
        }
        assert_single_empty_root(&mut store2, &tree);
    }

    #[test]
    fn lower_bound_drops_below_first_key() {
        let mut store = MemStore::default();
        let tree = create(&mut store, BTREE_KIND_EXTENTS, 3).unwrap();
        for key in (1000..4000u64).rev() {
            insert(&mut store, &tree, key, &value_for(key, 40, 0)).unwrap();
        }
        assert!(root_header(&mut store, &tree).level.get() >= 1);
        for key in (0..1000u64).step_by(7) {
            insert(&mut store, &tree, key, &value_for(key, 40, 0)).unwrap();
        }
        let map = contents(&mut store, &tree);
        assert_eq!(map.len(), 3000 + 1000usize.div_ceil(7));
        assert_eq!(ceiling(&mut store, &tree, 0).unwrap().map(|e| e.0), Some(0));
        assert_eq!(
            floor(&mut store, &tree, 999).unwrap().map(|e| e.0),
            Some(994)
        );
    }

    /// Builds a tree of `n` even keys (inserted in shuffled or ascending order), checks
    /// every query against the model, then removes everything in random order.
    fn deep_tree(n: u64, value_len: usize, shuffled: bool, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut store = MemStore::default();
        let tree = create(&mut store, BTREE_KIND_EXTENTS, 42).unwrap();
        let mut keys: Vec<u64> = (0..n).map(|i| i * 2).collect();
        if shuffled {
            keys.shuffle(&mut rng);
        }
        for &key in &keys {
            assert_eq!(
                insert(&mut store, &tree, key, &value_for(key, value_len, 1)).unwrap(),
                None
            );
        }
        let level = root_header(&mut store, &tree).level.get();
        assert!(level >= 2, "expected a deep tree, got level {level}");
        let per_leaf = (PAYLOAD / (ENTRY_SIZE + value_len)) as u64;
        let leaves_min = n.div_ceil(per_leaf);
        let blocks = store.live.len() as u64;
        // Ascending inserts pack leaves; random ones leave them at least half full.
        let slack = if shuffled {
            2 * leaves_min + leaves_min / 4
        } else {
            leaves_min + leaves_min / 50
        };
        assert!(
            blocks <= slack,
            "{blocks} blocks for {leaves_min} full leaves"
        );

        let map = contents(&mut store, &tree);
        assert_eq!(map.len() as u64, n);
        for i in 0..n {
            let key = i * 2;
            assert_eq!(
                get(&mut store, &tree, key).unwrap(),
                Some(value_for(key, value_len, 1))
            );
            assert_eq!(get(&mut store, &tree, key + 1).unwrap(), None);
        }
        for _ in 0..2000 {
            let probe = rng.gen_range(0..n * 2 + 2);
            let below = map
                .range(..=probe)
                .next_back()
                .map(|(k, v)| (*k, v.clone()));
            let above = map.range(probe..).next().map(|(k, v)| (*k, v.clone()));
            assert_eq!(floor(&mut store, &tree, probe).unwrap(), below);
            assert_eq!(ceiling(&mut store, &tree, probe).unwrap(), above);
            let hi = probe + rng.gen_range(0..2000);
            let limit = rng.gen_range(0..400);
            let want: Vec<_> = map
                .range(probe..=hi)
                .take(limit)
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            assert_eq!(range(&mut store, &tree, probe, hi, limit).unwrap(), want);
        }
        assert_eq!(
            range(&mut store, &tree, 0, u64::MAX, usize::MAX)
                .unwrap()
                .len() as u64,
            n
        );

        keys.shuffle(&mut rng);
        for (done, &key) in keys.iter().enumerate() {
            assert_eq!(
                remove(&mut store, &tree, key).unwrap(),
                Some(value_for(key, value_len, 1))
            );
            if done == keys.len() / 2 {
                let map = contents(&mut store, &tree);
                assert_eq!(map.len(), keys.len() - done - 1);
            }
        }
        assert_single_empty_root(&mut store, &tree);
    }

    #[test]
    fn deep_tree_small_values() {
        deep_tree(200_000, 16, true, 1);
    }

    #[test]
    fn deep_tree_large_values() {
        deep_tree(200_000, 300, false, 2);
    }

    #[test]
    fn remove_everything_in_each_order_frees_all_blocks() {
        for order in 0..3 {
            let mut rng = StdRng::seed_from_u64(order);
            let mut store = MemStore::default();
            let tree = create(&mut store, BTREE_KIND_DIRECTORY, 9).unwrap();
            let mut keys: Vec<u64> = (0..20_000).map(|_| rng.gen()).collect();
            for &key in &keys {
                let len = rng.gen_range(0..=BTREE_MAX_VALUE / 4);
                insert(&mut store, &tree, key, &value_for(key, len, 0)).unwrap();
            }
            keys.sort_unstable();
            keys.dedup();
            match order {
                0 => {}
                1 => keys.reverse(),
                _ => keys.shuffle(&mut rng),
            }
            for &key in &keys {
                assert!(remove(&mut store, &tree, key).unwrap().is_some());
            }
            assert_single_empty_root(&mut store, &tree);
        }
    }

    #[test]
    fn destroy_frees_every_block() {
        let mut store = MemStore::default();
        let tree = create(&mut store, BTREE_KIND_DIRECTORY, 9).unwrap();
        for key in 0..5000u64 {
            insert(&mut store, &tree, key * 3, &value_for(key, 100, 0)).unwrap();
        }
        assert!(store.live.len() > 100);
        destroy(&mut store, &tree).unwrap();
        assert!(store.live.is_empty());
        assert!(store.blocks.is_empty());
    }

    #[test]
    fn wrong_kind_or_owner_is_corrupt() {
        let mut store = MemStore::default();
        let tree = create(&mut store, BTREE_KIND_DIRECTORY, 9).unwrap();
        insert(&mut store, &tree, 1, b"x").unwrap();
        let other_kind = Tree {
            kind: BTREE_KIND_EXTENTS,
            ..tree
        };
        let other_owner = Tree { owner: 10, ..tree };
        for bad in [other_kind, other_owner] {
            let err = get(&mut store, &bad, 1).unwrap_err();
            assert!(
                matches!(err, Error::Corrupt { block, .. } if block == tree.root),
                "{err}"
            );
        }
    }

    /// Rewrites a node's block after `edit`, resealing it so that only the structural
    /// checks can catch the damage.
    fn tamper(store: &mut MemStore, nr: u64, edit: impl FnOnce(&mut Block)) {
        let mut block = *store.blocks[&nr];
        edit(&mut block);
        seal_block(&mut block, MAGIC_BTREE, nr);
        store.blocks.insert(nr, Arc::new(block));
    }

    /// A change to a node block.
    type Edit = Box<dyn Fn(&mut Block)>;

    #[test]
    fn structural_damage_is_reported() {
        let mut base = MemStore::default();
        let tree = create(&mut base, BTREE_KIND_DIRECTORY, 9).unwrap();
        for key in 0..40u64 {
            insert(&mut base, &tree, key, &value_for(key, 200, 0)).unwrap();
        }
        let root = tree.root;
        let first_child = u64::from_le_bytes(
            base.blocks[&root][HEADER_SIZE + 8..HEADER_SIZE + 16]
                .try_into()
                .unwrap(),
        );
        let slot0 = HEADER_SIZE;
        let slot1 = HEADER_SIZE + ENTRY_SIZE;
        let cases: Vec<(&str, u64, Edit)> = vec![
            ("level", root, Box::new(|b: &mut Block| b[16] = 16)),
            ("level", first_child, Box::new(|b: &mut Block| b[16] = 1)),
            ("count", first_child, Box::new(|b: &mut Block| b[18] = 255)),
            (
                "value area",
                first_child,
                Box::new(|b: &mut Block| b[20..22].copy_from_slice(&40u16.to_le_bytes())),
            ),
            ("kind", first_child, Box::new(|b: &mut Block| b[22] ^= 1)),
            ("owner", first_child, Box::new(|b: &mut Block| b[24] ^= 1)),
            (
                "does not follow",
                first_child,
                Box::new(move |b: &mut Block| {
                    b[slot1..slot1 + 8].copy_from_slice(&0u64.to_le_bytes())
                }),
            ),
            (
                "outside",
                first_child,
                Box::new(move |b: &mut Block| {
                    b[slot0 + 8..slot0 + 10].copy_from_slice(&4095u16.to_le_bytes())
                }),
            ),
            (
                "too long",
                first_child,
                Box::new(move |b: &mut Block| {
                    b[slot0 + 10..slot0 + 12].copy_from_slice(&2000u16.to_le_bytes())
                }),
            ),
            (
                "reserved",
                first_child,
                Box::new(move |b: &mut Block| b[slot0 + 12] = 1),
            ),
            ("value area", root, Box::new(|b: &mut Block| b[20] = 1)),
            (
                "points to",
                root,
                Box::new(move |b: &mut Block| {
                    b[slot0 + 8..slot0 + 16].copy_from_slice(&root.to_le_bytes())
                }),
            ),
        ];
        for (what, nr, edit) in cases {
            let mut store = base.clone();
            tamper(&mut store, nr, edit);
            let err = walk(&mut store, &tree, &mut |_| {}, &mut |_, _| Ok(())).unwrap_err();
            match err {
                Error::Corrupt {
                    block,
                    what: message,
                } => {
                    assert_eq!(block, nr, "{message}");
                    assert!(message.contains(what), "{message} (expected {what})");
                }
                other => panic!("{what}: {other}"),
            }
        }
        // Overlapping values and cross-node ordering are caught by walk alone.
        let mut store = base.clone();
        tamper(&mut store, first_child, |b| {
            let offset1 = b[slot1 + 8..slot1 + 10].to_vec();
            b[slot0 + 8..slot0 + 10].copy_from_slice(&offset1);
        });
        let err = walk(&mut store, &tree, &mut |_| {}, &mut |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
        let mut store = base.clone();
        tamper(&mut store, first_child, |b| {
            let count = usize::from(u16::from_le_bytes([b[18], b[19]]));
            let last = HEADER_SIZE + (count - 1) * ENTRY_SIZE;
            b[last..last + 8].copy_from_slice(&1000u64.to_le_bytes());
        });
        let err = walk(&mut store, &tree, &mut |_| {}, &mut |_, _| Ok(())).unwrap_err();
        assert!(
            err.to_string().contains("not below the next bound"),
            "{err}"
        );
    }

    /// Runs every operation on a (possibly damaged) tree. Any result is fine; a panic
    /// fails the test.
    fn exercise(store: &mut MemStore, tree: &Tree, rng: &mut StdRng, keys: &[u64]) -> Result<()> {
        let known = keys[rng.gen_range(0..keys.len())];
        let probe = rng.gen_range(0..keys.len() as u64 * 4);
        let _ = get(store, tree, known);
        let _ = get(store, tree, probe);
        let _ = floor(store, tree, probe);
        let _ = ceiling(store, tree, probe);
        let _ = range(store, tree, probe, probe + 500, 100);
        let _ = range(store, tree, 0, u64::MAX, usize::MAX);
        let _ = is_empty(store, tree);
        let walked = walk(store, tree, &mut |_| {}, &mut |_, _| Ok(()));
        let _ = insert(
            store,
            tree,
            probe,
            &value_for(probe, rng.gen_range(0..=1024), 3),
        );
        let _ = remove(store, tree, known);
        for _ in 0..20 {
            let key = keys[rng.gen_range(0..keys.len())];
            let _ = remove(store, tree, key);
            let _ = insert(
                store,
                tree,
                key + 1,
                &value_for(key, rng.gen_range(0..=1024), 4),
            );
        }
        let _ = walk(store, tree, &mut |_| {}, &mut |_, _| Ok(()));
        let _ = destroy(store, tree);
        walked
    }

    /// Flips 1-3 bits of a random node of a copy of `base` (resealing every other block
    /// so that the structural checks, not only the crc, are exercised), then runs every
    /// operation on it. Any result is fine; a panic fails the test.
    fn flip_bits(base: &MemStore, tree: &Tree, keys: &[u64], rounds: usize, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let nodes: Vec<u64> = base.live.iter().copied().collect();
        for round in 0..rounds {
            let mut store = base.clone();
            let nr = nodes[rng.gen_range(0..nodes.len())];
            let reseal = round % 2 == 0;
            let mut block = *store.blocks[&nr];
            for _ in 0..rng.gen_range(1..=3) {
                // Favour the header and entry arrays, where structure lives.
                let byte = if rng.gen_bool(0.7) {
                    rng.gen_range(0..512)
                } else {
                    rng.gen_range(0..BLOCK_SIZE)
                };
                block[byte] ^= 1 << rng.gen_range(0..8);
            }
            if reseal {
                seal_block(&mut block, MAGIC_BTREE, nr);
            }
            // Flips of the same bit can cancel out.
            let changed = block != *base.blocks[&nr];
            store.blocks.insert(nr, Arc::new(block));
            let walked = exercise(&mut store, tree, &mut rng, keys);
            if changed && !reseal {
                // The crc catches any flip of up to 3 bits.
                assert!(matches!(walked, Err(Error::Corrupt { block, .. }) if block == nr));
            }
        }
    }

    /// A tree of `n` keys with values of random lengths in `lengths`, and its keys.
    fn populated(n: u64, lengths: std::ops::RangeInclusive<usize>) -> (MemStore, Tree, Vec<u64>) {
        let mut rng = StdRng::seed_from_u64(n);
        let mut store = MemStore::default();
        let tree = create(&mut store, BTREE_KIND_EXTENTS, 5).unwrap();
        let keys: Vec<u64> = (0..n).map(|i| i * 4).collect();
        for &key in &keys {
            let value = value_for(key, rng.gen_range(lengths.clone()), 0);
            insert(&mut store, &tree, key, &value).unwrap();
        }
        (store, tree, keys)
    }

    #[test]
    fn bit_flips_never_panic_big_values() {
        // Big values give a three-level tree from few entries.
        let (base, tree, keys) = populated(1500, 600..=1024);
        assert_eq!(root_header(&mut base.clone(), &tree).level.get(), 2);
        flip_bits(&base, &tree, &keys, 1000, 99);
    }

    #[test]
    fn bit_flips_never_panic_small_values() {
        // Small values give leaves with many slots.
        let (base, tree, keys) = populated(3000, 0..=40);
        assert_eq!(root_header(&mut base.clone(), &tree).level.get(), 1);
        flip_bits(&base, &tree, &keys, 1000, 98);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, usize, u8),
        Remove(u64),
        Get(u64),
        Floor(u64),
        Ceiling(u64),
        Range(u64, u64, usize),
    }

    /// Keys below `space` (small spaces mean many replacements and removals that hit),
    /// plus the extremes.
    fn key_strategy(space: u64) -> impl Strategy<Value = u64> {
        prop_oneof![8 => 0..space, 1 => Just(0u64), 1 => Just(u64::MAX)]
    }

    fn op_strategy(space: u64) -> impl Strategy<Value = Op> {
        let key = move || key_strategy(space);
        let len = prop_oneof![0usize..=32, 0usize..=BTREE_MAX_VALUE, Just(BTREE_MAX_VALUE)];
        let insert = (key(), len, any::<u8>()).prop_map(|(k, l, s)| Op::Insert(k, l, s));
        let range = (key(), key(), 0usize..100).prop_map(|(a, b, l)| Op::Range(a, b, l));
        prop_oneof![
            6 => insert,
            3 => key().prop_map(Op::Remove),
            1 => key().prop_map(Op::Get),
            1 => key().prop_map(Op::Floor),
            1 => key().prop_map(Op::Ceiling),
            1 => range,
        ]
    }

    fn ops_strategy() -> impl Strategy<Value = Vec<Op>> {
        (20u64..3000).prop_flat_map(|space| prop::collection::vec(op_strategy(space), 1..1500))
    }

    fn owned(entry: Option<(&u64, &Vec<u8>)>) -> Option<(u64, Vec<u8>)> {
        entry.map(|(k, v)| (*k, v.clone()))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn matches_btreemap(ops in ops_strategy()) {
            let mut store = MemStore::default();
            let tree = create(&mut store, BTREE_KIND_XATTR, 11).unwrap();
            let mut model = BTreeMap::new();
            for (done, op) in ops.into_iter().enumerate() {
                // Check the whole structure now and then, not only the answers.
                if done % 128 == 127 {
                    prop_assert_eq!(&contents(&mut store, &tree), &model);
                }
                match op {
                    Op::Insert(key, len, salt) => {
                        let value = value_for(key, len, salt);
                        let old = insert(&mut store, &tree, key, &value).unwrap();
                        prop_assert_eq!(old, model.insert(key, value));
                    }
                    Op::Remove(key) => {
                        let old = remove(&mut store, &tree, key).unwrap();
                        prop_assert_eq!(old, model.remove(&key));
                    }
                    Op::Get(key) => {
                        let found = get(&mut store, &tree, key).unwrap();
                        prop_assert_eq!(found, model.get(&key).cloned());
                    }
                    Op::Floor(key) => {
                        let want = owned(model.range(..=key).next_back());
                        prop_assert_eq!(floor(&mut store, &tree, key).unwrap(), want);
                    }
                    Op::Ceiling(key) => {
                        let want = owned(model.range(key..).next());
                        prop_assert_eq!(ceiling(&mut store, &tree, key).unwrap(), want);
                    }
                    Op::Range(lo, hi, limit) => {
                        let want: Vec<_> = if lo <= hi {
                            model.range(lo..=hi).take(limit).map(|(k, v)| (*k, v.clone())).collect()
                        } else {
                            Vec::new()
                        };
                        prop_assert_eq!(range(&mut store, &tree, lo, hi, limit).unwrap(), want);
                    }
                }
            }
            prop_assert_eq!(&contents(&mut store, &tree), &model);
            prop_assert_eq!(is_empty(&mut store, &tree).unwrap(), model.is_empty());
            for key in model.keys() {
                prop_assert!(remove(&mut store, &tree, *key).unwrap().is_some());
            }
            assert_single_empty_root(&mut store, &tree);
        }
    }
}
