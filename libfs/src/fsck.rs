//! fsck: checks an exofs image independently of the write path, and mends what is safe.
//!
//! Layer: beside [`crate::fs`], on top of `journal` (replay), `btree` (`walk`), `dir` and
//! `xattr` (name rules) and `format`. It never uses the allocators, the inode cache or
//! any state of an open [`crate::Fs`]: everything is decoded again from the blocks.
//!
//! Interface: [`check`] replays the journal in memory (read-only) and returns a [`Report`]
//! of [`Problem`]s; [`repair`] checks, mends the safe cases through the journal (one or a
//! few transactions, committed and checkpointed, so a crash part way leaves a state that
//! a later repair finishes) and checks again.
//!
//! Passes, in order:
//!   1. superblock (`fs::check_superblock`), journal replay into an overlay;
//!   2. both bitmaps (header, crc, no bit set past the end);
//!   3. the inode table: crc of every non-zero slot, inode bitmap == allocated slots;
//!   4. every allocated inode: fields, extent map (inline or B+tree), directory and
//!      xattr trees; every block it references is recorded with its owner. A damaged
//!      tree node loses only its own subtree: the walk resumes at its siblings;
//!   5. the orphan list (inodes with no links that were open);
//!   6. the namespace from the root: entries name allocated inodes of their type, each
//!      directory is reached once, sizes, parents and link counts add up, and whatever
//!      is not reached (and not an orphan) is leaked;
//!   7. block accounting: a sweep over the recorded references finds blocks referenced
//!      twice, referenced but free, and marked used but referenced by nothing.
//!
//! Invariants: `check` never writes and never panics on what it reads; damage becomes a
//! [`Problem`] and only an unusable superblock or journal (or a failing device) is an
//! `Err`. Repair only acts on what the check proved: it frees inodes and blocks only when
//! every tree and inode could be read (so nothing unseen can reference them), frees
//! leaked blocks only while no block is double-allocated, never guesses which owner of
//! a shared block is right, and re-reads each thing it edits to confirm the check's view.

use crate::btree::{self, NodeStore, Tree};
use crate::device::BlockDevice;
use crate::dir;
use crate::error::{Error, Result};
use crate::format::{
    block_crc, read_struct, seal_block, verify_block, Block, BtreeChild, BtreeNodeHeader,
    DirEntryHeader, DiskInode, ExtentValue, Superblock, XattrHeader, BITMAP_BITS_PER_BLOCK,
    BITMAP_DATA_OFFSET, BLOCK_SIZE, BLOCK_SIZE_U64, BTREE_KIND_DIRECTORY, BTREE_KIND_EXTENTS,
    INLINE_EXTENTS, INODES_PER_BLOCK, INODE_FLAG_EXTENT_TREE, INODE_FLAG_ORPHAN, INODE_SIZE,
    MAGIC_BITMAP, MAGIC_BTREE, ROOT_INO, SYMLINK_MAX, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK,
    S_IFMT, S_IFREG, S_IFSOCK,
};
use crate::fs::MAX_FILE_SIZE;
use crate::journal::Journal;
use crate::superblock::{check_superblock, locate_journal};
use crate::xattr;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use zerocopy::little_endian::{U32, U64};
use zerocopy::IntoBytes;

/// Metadata cache of the journal fsck opens.
const CACHE_BYTES: usize = 16 << 20;
/// Highest file block + 1 an extent may reach.
const MAX_FILE_BLOCKS: u64 = MAX_FILE_SIZE / BLOCK_SIZE_U64;
/// Keys one name hash may take in a directory or xattr tree (see `dir`).
const COLLISION_SLOTS: u64 = 1 << 16;
/// Free blocks set aside for B+tree edits during repair (removals rarely need any).
const SPARE_BLOCKS: usize = 64;

// ---------------------------------------------------------------------------------------
// Public types

/// What kind of damage a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemKind {
    /// A metadata block or inode whose crc32c does not match its contents.
    BadChecksum,
    /// A structure that breaks the format's rules (a field, a tree, an entry).
    Corrupt,
    /// A block referenced by two owners (or twice by one).
    DoubleAllocated,
    /// A block marked used in the block bitmap but referenced by nothing.
    LeakedBlock,
    /// A block (or inode) in use but marked free in its bitmap.
    FreeButUsed,
    /// An inode whose `nlink` disagrees with the entries naming it.
    WrongLinkCount,
    /// A directory entry naming a free inode, or with the wrong file type.
    DanglingEntry,
    /// An allocated inode nothing names (and not on the orphan list), or an inode
    /// bitmap bit set for a free slot.
    LeakedInode,
    /// A directory whose `size` is not its number of entries.
    WrongSize,
    /// An inode whose `blocks` is not the number of data blocks its extents map.
    WrongBlockCount,
    /// A directory whose `parent` is not the directory containing it (or a non-directory
    /// with a parent).
    BadParent,
    /// The orphan list is inconsistent.
    Unclean,
}

impl ProblemKind {
    fn label(self) -> &'static str {
        match self {
            ProblemKind::BadChecksum => "bad checksum",
            ProblemKind::Corrupt => "corrupt",
            ProblemKind::DoubleAllocated => "double-allocated",
            ProblemKind::LeakedBlock => "leaked",
            ProblemKind::FreeButUsed => "free but used",
            ProblemKind::WrongLinkCount => "wrong link count",
            ProblemKind::DanglingEntry => "dangling entry",
            ProblemKind::LeakedInode => "leaked inode",
            ProblemKind::WrongSize => "wrong size",
            ProblemKind::WrongBlockCount => "wrong block count",
            ProblemKind::BadParent => "bad parent",
            ProblemKind::Unclean => "unclean",
        }
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One thing wrong with the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The block concerned (the first of a run).
    pub block: Option<u64>,
    /// For a run of blocks: the last one (inclusive). None for a single block.
    pub last_block: Option<u64>,
    /// The inode concerned (for an entry: the directory holding it).
    pub ino: Option<u64>,
    /// What was found, for a human.
    pub detail: String,
    /// Whether [`repair`] mends it.
    pub repairable: bool,
}

impl Problem {
    fn at_block(kind: ProblemKind, block: u64, detail: impl Into<String>) -> Self {
        Self {
            kind,
            block: Some(block),
            last_block: None,
            ino: None,
            detail: detail.into(),
            repairable: false,
        }
    }

    fn at_inode(kind: ProblemKind, ino: u64, detail: impl Into<String>) -> Self {
        Self {
            kind,
            block: None,
            last_block: None,
            ino: Some(ino),
            detail: detail.into(),
            repairable: false,
        }
    }

    fn with_ino(mut self, ino: u64) -> Self {
        self.ino = Some(ino);
        self
    }

    fn repairable(mut self, repairable: bool) -> Self {
        self.repairable = repairable;
        self
    }
}

impl fmt::Display for Problem {
    /// One line: where, what, and the details in parentheses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.block, self.last_block, self.ino) {
            (Some(first), Some(last), _) if last > first => write!(f, "blocks {first}..={last}")?,
            (Some(block), _, Some(ino)) => write!(f, "block {block} (inode {ino})")?,
            (Some(block), _, None) => write!(f, "block {block}")?,
            (None, _, Some(ino)) => write!(f, "inode {ino}")?,
            (None, _, None) => f.write_str("file system")?,
        }
        write!(f, ": {}", self.kind)?;
        if !self.detail.is_empty() {
            let detail: String = self
                .detail
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub problems: Vec<Problem>,
    /// Problems of this report that [`repair`] mended (0 for [`check`]).
    pub repaired: usize,
    /// Allocated inodes that are not directories.
    pub files: u64,
    /// Allocated directories.
    pub directories: u64,
    /// Metadata region plus every block referenced by an inode.
    pub used_blocks: u64,
    /// Damage that journal recovery healed without loss (a torn superblock or journal
    /// header): worth a line, not a problem.
    pub notes: Vec<String>,
}

impl Report {
    /// True if nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// The problems of one kind.
    pub fn of_kind(&self, kind: ProblemKind) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(move |p| p.kind == kind)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} files, {} directories, {} blocks used: ",
            self.files, self.directories, self.used_blocks
        )?;
        if self.is_clean() {
            return f.write_str("clean");
        }
        write!(
            f,
            "{} problem(s), {} repaired",
            self.problems.len(),
            self.repaired
        )?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

/// Checks the file system on `device` (read-only: the journal is replayed in memory
/// only). Fails only if the superblock or the journal cannot be used, or the device
/// fails; any other damage is a [`Problem`] of the report.
pub fn check(device: Arc<dyn BlockDevice>) -> Result<Report> {
    let (mut journal, layout) = open(device, true)?;
    let outcome = Checker::run(&mut journal, layout)?;
    Ok(outcome.report)
}

/// Checks, then mends what is safe to mend through the journal (crash-safe), and checks
/// again. Returns the report of the first check with `repaired` set to the number of its
/// problems that the second check no longer finds.
pub fn repair(device: Arc<dyn BlockDevice>) -> Result<Report> {
    let mut first = check(device.clone())?;
    if !first.problems.iter().any(|p| p.repairable) {
        return Ok(first);
    }
    {
        // A read-write open replays the journal home; the check is run again on what is
        // now on the device, so the plan matches what it edits.
        let (mut journal, layout) = open(device.clone(), false)?;
        let outcome = Checker::run(&mut journal, layout)?;
        apply(&mut journal, &layout, &outcome.plan, outcome.spare)?;
    }
    let second = check(device)?;
    first.repaired = first
        .problems
        .iter()
        .filter(|p| p.repairable && !second.problems.iter().any(|q| same_place(p, q)))
        .count();
    for left in second.problems.iter().filter(|p| p.repairable) {
        log::warn!("fsck: still there after repair: {left}");
    }
    Ok(first)
}

fn same_place(a: &Problem, b: &Problem) -> bool {
    a.kind == b.kind && a.block == b.block && a.ino == b.ino
}

// ---------------------------------------------------------------------------------------
// Opening

/// Where the regions of the image lie (from a validated superblock).
#[derive(Debug, Clone, Copy)]
struct Layout {
    total_blocks: u64,
    data_start: u64,
    bitmap_start: u64,
    bitmap_blocks: u64,
    inode_bitmap_start: u64,
    inode_bitmap_blocks: u64,
    inode_table_start: u64,
    inode_table_blocks: u64,
    inode_count: u64,
    orphan_head: u64,
}

impl Layout {
    fn of(sb: &Superblock) -> Self {
        Self {
            total_blocks: sb.total_blocks.get(),
            data_start: sb.data_start.get(),
            bitmap_start: sb.bitmap_start.get(),
            bitmap_blocks: sb.bitmap_blocks.get(),
            inode_bitmap_start: sb.inode_bitmap_start.get(),
            inode_bitmap_blocks: sb.inode_bitmap_blocks.get(),
            inode_table_start: sb.inode_table_start.get(),
            inode_table_blocks: sb.inode_table_blocks.get(),
            inode_count: sb.inode_count.get(),
            orphan_head: sb.orphan_head.get(),
        }
    }

    /// Inode-table block and byte offset of an inode.
    fn inode_location(&self, ino: u64) -> (u64, usize) {
        let per_block = INODES_PER_BLOCK as u64;
        (
            self.inode_table_start + ino / per_block,
            (ino % per_block) as usize * INODE_SIZE,
        )
    }

    fn in_data_area(&self, block: u64) -> bool {
        block >= self.data_start && block < self.total_blocks
    }
}

/// Validates the superblock, opens the journal (replaying it in memory when
/// `read_only`, home otherwise) and validates the superblock the journal may hold.
fn open(device: Arc<dyn BlockDevice>, read_only: bool) -> Result<(Journal, Layout)> {
    let size = device.size();
    let (journal_start, journal_blocks, note) = locate_journal(&*device, read_only)?;
    let mut journal = Journal::open(
        device,
        journal_start,
        journal_blocks,
        CACHE_BYTES,
        read_only,
    )?;
    journal.add_notes(note);
    let sb = check_superblock(&*journal.read(0)?, size, read_only)?;
    Ok((journal, Layout::of(&sb)))
}

// ---------------------------------------------------------------------------------------
// Bitmaps

/// A bitmap as read from the device. Bits of bitmap blocks that failed their checks are
/// unknown and never compared.
#[derive(Debug, Default)]
struct Bits {
    words: Vec<u64>,
    count: u64,
    /// Per bitmap block: it passed its checks.
    known: Vec<bool>,
}

impl Bits {
    fn new(count: u64, blocks: u64) -> Self {
        Self {
            words: vec![0; count.div_ceil(64) as usize],
            count,
            known: vec![false; blocks as usize],
        }
    }

    fn set(&mut self, bit: u64) {
        if let Some(word) = self.words.get_mut((bit / 64) as usize) {
            *word |= 1 << (bit % 64);
        }
    }

    fn get(&self, bit: u64) -> bool {
        bit < self.count
            && self
                .words
                .get((bit / 64) as usize)
                .is_some_and(|word| word & (1 << (bit % 64)) != 0)
    }

    fn is_known(&self, bit: u64) -> bool {
        self.known
            .get((bit / BITMAP_BITS_PER_BLOCK) as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Runs [start, end) inside [from, to) of known bits equal to `value`.
    fn runs(&self, from: u64, to: u64, value: bool) -> Vec<(u64, u64)> {
        let to = to.min(self.count);
        let mut out = Vec::new();
        let mut open: Option<u64> = None;
        let mut bit = from;
        while bit < to {
            // Whole words at once (a word never straddles two bitmap blocks).
            if bit & 63 == 0 && bit + 64 <= to && self.is_known(bit) {
                let word = self.words.get((bit / 64) as usize).copied().unwrap_or(0);
                let all = if value { u64::MAX } else { 0 };
                if (word == all && open.is_some()) || (word == !all && open.is_none()) {
                    bit += 64;
                    continue;
                }
            }
            let hit = self.is_known(bit) && self.get(bit) == value;
            match (hit, open) {
                (true, None) => open = Some(bit),
                (false, Some(start)) => {
                    out.push((start, bit));
                    open = None;
                }
                _ => {}
            }
            bit += 1;
        }
        if let Some(start) = open {
            out.push((start, to));
        }
        out
    }
}

/// Which bitmap a planned change is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Region {
    Blocks,
    Inodes,
}

// ---------------------------------------------------------------------------------------
// What the check learns

/// The fields of an allocated inode fsck looks at.
#[derive(Debug, Clone)]
struct InodeInfo {
    ino: u64,
    mode: u32,
    flags: u32,
    nlink: u32,
    size: u64,
    blocks: u64,
    parent: u64,
    xattr_root: u64,
    next_orphan: u64,
    tree_root: u64,
    extent_count: u32,
    /// Inline extents as (logical, physical, length), without the tree flag.
    inline: Vec<(u64, u64, u64)>,
}

impl InodeInfo {
    fn of(ino: u64, disk: &DiskInode) -> Self {
        let count = (disk.extent_count.get() as usize).min(INLINE_EXTENTS);
        let inline = if disk.flags.get() & INODE_FLAG_EXTENT_TREE == 0 {
            disk.extents[..count]
                .iter()
                .map(|e| (e.logical.get(), e.physical.get(), u64::from(e.length.get())))
                .collect()
        } else {
            Vec::new()
        };
        Self {
            ino,
            mode: disk.mode.get(),
            flags: disk.flags.get(),
            nlink: disk.nlink.get(),
            size: disk.size.get(),
            blocks: disk.blocks.get(),
            parent: disk.parent.get(),
            xattr_root: disk.xattr_root.get(),
            next_orphan: disk.next_orphan.get(),
            tree_root: disk.tree_root.get(),
            extent_count: disk.extent_count.get(),
            inline,
        }
    }

    fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }

    fn has_extent_tree(&self) -> bool {
        self.flags & INODE_FLAG_EXTENT_TREE != 0
    }

    /// Directory-entry file type of the inode.
    fn file_type(&self) -> u8 {
        ((self.mode & S_IFMT) >> 12) as u8
    }
}

/// A decoded directory entry.
#[derive(Debug, Clone)]
struct EntryInfo {
    key: u64,
    name: Vec<u8>,
    ino: u64,
    file_type: u8,
}

/// A directory's entries as read from its tree.
#[derive(Debug, Default)]
struct DirInfo {
    /// Entries that decoded.
    entries: Vec<EntryInfo>,
    /// Entries in the tree, decodable or not (what `size` must count).
    total: u64,
    /// The whole tree was read and every entry decoded.
    complete: bool,
}

/// What references a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnerKind {
    /// File data; `logical` is the file block of the run's first block.
    Data {
        logical: u64,
    },
    ExtentNode,
    DirNode,
    XattrNode,
}

/// A run of blocks referenced by one owner.
#[derive(Debug, Clone, Copy)]
struct Ref {
    start: u64,
    len: u64,
    ino: u64,
    kind: OwnerKind,
}

impl Ref {
    fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The owner, as it reads for block `block` of the run.
    fn describe(&self, block: u64) -> String {
        let ino = self.ino;
        match self.kind {
            OwnerKind::Data { logical } => {
                let file_block = logical + block.saturating_sub(self.start);
                format!("inode {ino} extent at file block {file_block}")
            }
            OwnerKind::ExtentNode => format!("inode {ino} extent tree node"),
            OwnerKind::DirNode => format!("inode {ino} directory tree node"),
            OwnerKind::XattrNode => format!("inode {ino} xattr tree node"),
        }
    }

    /// The owner without the position (to tell runs of the same owners apart).
    fn identity(&self) -> String {
        let tag = match self.kind {
            OwnerKind::Data { .. } => "data",
            OwnerKind::ExtentNode => "extent-node",
            OwnerKind::DirNode => "dir-node",
            OwnerKind::XattrNode => "xattr-node",
        };
        format!("{}:{tag}", self.ino)
    }
}

/// A stretch of blocks referenced by the same set of refs.
#[derive(Debug)]
struct Segment {
    start: u64,
    end: u64,
    owners: Vec<usize>,
}

/// Splits the references into segments with a constant set of owners, in block order.
fn sweep(refs: &[Ref]) -> Vec<Segment> {
    let mut order: Vec<usize> = (0..refs.len()).collect();
    order.sort_by_key(|&i| refs[i].start);
    let mut out = Vec::new();
    let mut active: Vec<usize> = Vec::new();
    let mut next = 0;
    let mut cursor = 0;
    loop {
        if active.is_empty() {
            let Some(&i) = order.get(next) else {
                break;
            };
            cursor = refs[i].start;
        }
        while let Some(&i) = order.get(next) {
            if refs[i].start != cursor {
                break;
            }
            active.push(i);
            next += 1;
        }
        let Some(first_end) = active.iter().map(|&i| refs[i].end()).min() else {
            continue;
        };
        let boundary = order
            .get(next)
            .map_or(first_end, |&i| refs[i].start.min(first_end));
        if boundary > cursor {
            out.push(Segment {
                start: cursor,
                end: boundary,
                owners: active.clone(),
            });
        }
        cursor = boundary;
        active.retain(|&i| refs[i].end() > cursor);
    }
    out
}

/// Block-accounting damage before runs are joined into problems.
#[derive(Debug)]
struct Finding {
    kind: ProblemKind,
    start: u64,
    end: u64,
    /// Findings join only with the same key (the owners).
    key: String,
    detail: String,
    repairable: bool,
    /// The bitmap value repair writes (None: mended by another fix).
    fix: Option<bool>,
}

// ---------------------------------------------------------------------------------------
// The repair plan

/// Inode fields to rewrite.
#[derive(Debug, Default, Clone)]
struct InodeFix {
    nlink: Option<u32>,
    size: Option<u64>,
    blocks: Option<u64>,
    parent: Option<u64>,
    extent_count: Option<u32>,
}

/// A directory entry to remove or retype, as the check saw it.
#[derive(Debug, Clone)]
struct EntryFix {
    dir: u64,
    root: u64,
    entry: EntryInfo,
    /// None: remove it; Some: rewrite it with this file type.
    file_type: Option<u8>,
}

/// Everything repair will do.
#[derive(Debug, Default)]
struct Plan {
    /// (bitmap, first bit, bits, value).
    bits: Vec<(Region, u64, u64, bool)>,
    inodes: BTreeMap<u64, InodeFix>,
    entries: Vec<EntryFix>,
    /// Leaked inodes with no links, to free (their blocks are in `bits`).
    frees: Vec<u64>,
}

impl Plan {
    fn inode(&mut self, ino: u64) -> &mut InodeFix {
        self.inodes.entry(ino).or_default()
    }
}

/// The check's result.
#[derive(Debug)]
struct Outcome {
    report: Report,
    plan: Plan,
    /// Free, unreferenced blocks repair may allocate B+tree nodes from.
    spare: Vec<u64>,
}

// ---------------------------------------------------------------------------------------
// B+tree node access

/// The B+tree store fsck uses: reads through the journal, refusing pointers outside the
/// data area. With `spare` (repair), allocations and frees edit the block bitmap.
struct Store<'a> {
    journal: &'a mut Journal,
    layout: Layout,
    spare: Option<&'a mut Vec<u64>>,
}

impl NodeStore for Store<'_> {
    fn read(&mut self, block: u64) -> Result<Arc<Block>> {
        if !self.layout.in_data_area(block) {
            return Err(Error::corrupt(
                block,
                format!(
                    "B+tree node pointer to block {block}, outside the data area {}..{}",
                    self.layout.data_start, self.layout.total_blocks
                ),
            ));
        }
        self.journal.read(block)
    }

    fn write(&mut self, block: u64, data: &Block) -> Result<()> {
        self.journal.write(block, *data)
    }

    fn alloc(&mut self) -> Result<u64> {
        let spare = self.spare.as_mut().ok_or(Error::ReadOnly)?;
        let block = spare.pop().ok_or(Error::NoSpace)?;
        write_bits(
            self.journal,
            &self.layout,
            Region::Blocks,
            &[(block, 1)],
            true,
        )?;
        Ok(block)
    }

    fn free(&mut self, block: u64) -> Result<()> {
        if self.spare.is_none() {
            return Err(Error::ReadOnly);
        }
        write_bits(
            self.journal,
            &self.layout,
            Region::Blocks,
            &[(block, 1)],
            false,
        )
    }
}

/// What a tree walk saw: every node and entry it could reach, and what stopped it in
/// each damaged part.
#[derive(Debug, Default)]
struct Walked {
    nodes: Vec<u64>,
    entries: Vec<(u64, Vec<u8>)>,
    errors: Vec<Error>,
}

/// An internal node's level and children (key, block), decoded for the fallback walk.
type Children = (u16, Vec<(u64, u64)>);

/// Levels are below this (as in `btree`).
const MAX_LEVEL: u16 = 16;
/// Children an internal node holds at most.
const MAX_CHILDREN: usize = (BLOCK_SIZE - size_of::<BtreeNodeHeader>()) / size_of::<BtreeChild>();

// ---------------------------------------------------------------------------------------
// The check

/// One run of the check over an open journal.
struct Checker<'j> {
    journal: &'j mut Journal,
    layout: Layout,
    problems: Vec<Problem>,
    plan: Plan,
    /// Every tree and inode was read: no unseen structure can reference a block or name
    /// an inode, so leaks and link counts are exact.
    complete: bool,
    block_bits: Bits,
    inode_bits: Bits,
    inodes: BTreeMap<u64, InodeInfo>,
    /// Slots whose checksum failed: their contents are unknown.
    unreadable: HashSet<u64>,
    refs: Vec<Ref>,
    dirs: HashMap<u64, DirInfo>,
    orphans: HashSet<u64>,
}

impl<'j> Checker<'j> {
    fn run(journal: &'j mut Journal, layout: Layout) -> Result<Outcome> {
        let mut checker = Checker {
            journal,
            layout,
            problems: Vec::new(),
            plan: Plan::default(),
            complete: true,
            block_bits: Bits::default(),
            inode_bits: Bits::default(),
            inodes: BTreeMap::new(),
            unreadable: HashSet::new(),
            refs: Vec::new(),
            dirs: HashMap::new(),
            orphans: HashSet::new(),
        };
        checker.block_bits = checker.load_bits(Region::Blocks)?;
        checker.inode_bits = checker.load_bits(Region::Inodes)?;
        checker.scan_inode_table()?;
        let inos: Vec<u64> = checker.inodes.keys().copied().collect();
        for ino in inos {
            checker.scan_inode(ino)?;
        }
        checker.check_orphans();
        checker.check_namespace();
        let (used_blocks, spare) = checker.check_blocks();
        let directories = checker.inodes.values().filter(|i| i.is_dir()).count() as u64;
        let report = Report {
            problems: checker.problems,
            repaired: 0,
            files: checker.inodes.len() as u64 - directories,
            directories,
            used_blocks,
            notes: checker.journal.recovery_notes().to_vec(),
        };
        Ok(Outcome {
            report,
            plan: checker.plan,
            spare,
        })
    }

    fn read(&mut self, block: u64) -> Result<Arc<Block>> {
        if block >= self.layout.total_blocks {
            return Err(Error::corrupt(block, "block past the end of the image"));
        }
        self.journal.read(block)
    }

    /// BadChecksum if `block` carries `magic` but its crc is wrong, else Corrupt.
    fn damage_kind(&mut self, block: u64, magic: u32) -> Result<ProblemKind> {
        if block >= self.layout.total_blocks {
            return Ok(ProblemKind::Corrupt);
        }
        let data = self.read(block)?;
        let found_magic = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let stored = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
        Ok(if found_magic == magic && stored != block_crc(&data) {
            ProblemKind::BadChecksum
        } else {
            ProblemKind::Corrupt
        })
    }

    // --- pass 2: bitmaps

    fn load_bits(&mut self, region: Region) -> Result<Bits> {
        let l = self.layout;
        let (start, blocks, count, what) = match region {
            Region::Blocks => (
                l.bitmap_start,
                l.bitmap_blocks,
                l.total_blocks,
                "block bitmap",
            ),
            Region::Inodes => (
                l.inode_bitmap_start,
                l.inode_bitmap_blocks,
                l.inode_count,
                "inode bitmap",
            ),
        };
        let mut bits = Bits::new(count, blocks);
        for index in 0..blocks {
            let nr = start + index;
            let block = self.read(nr)?;
            if let Err(e) = verify_block(&block, MAGIC_BITMAP, nr, what) {
                let kind = self.damage_kind(nr, MAGIC_BITMAP)?;
                self.problems
                    .push(Problem::at_block(kind, nr, message(&e)).repairable(false));
                continue;
            }
            if let Some(slot) = bits.known.get_mut(index as usize) {
                *slot = true;
            }
            let first = index * BITMAP_BITS_PER_BLOCK;
            let mut past_end = Vec::new();
            for (byte_index, byte) in block[BITMAP_DATA_OFFSET..].iter().enumerate() {
                for bit in (0..8).filter(|bit| byte & (1 << bit) != 0) {
                    let global = first + byte_index as u64 * 8 + bit;
                    if global < count {
                        bits.set(global);
                    } else {
                        past_end.push(global);
                    }
                }
            }
            self.past_end(region, nr, what, count, &past_end);
        }
        Ok(bits)
    }

    /// Reports (and plans to clear) bits set past the end of a bitmap.
    fn past_end(&mut self, region: Region, nr: u64, what: &str, count: u64, bits: &[u64]) {
        let (Some(&first), Some(&last)) = (bits.first(), bits.last()) else {
            return;
        };
        self.problems.push(
            Problem::at_block(
                ProblemKind::Corrupt,
                nr,
                format!(
                    "{what}: {} bit(s) set past the end ({count} bits), first {first}",
                    bits.len()
                ),
            )
            .repairable(true),
        );
        self.plan
            .bits
            .push((region, first, last - first + 1, false));
    }

    // --- pass 3: the inode table

    fn scan_inode_table(&mut self) -> Result<()> {
        let per_block = INODES_PER_BLOCK as u64;
        for index in 0..self.layout.inode_table_blocks {
            let nr = self.layout.inode_table_start + index;
            let block = self.read(nr)?;
            for slot in 0..INODES_PER_BLOCK {
                let ino = index * per_block + slot as u64;
                if ino == 0 || ino >= self.layout.inode_count {
                    continue;
                }
                let raw = &block[slot * INODE_SIZE..(slot + 1) * INODE_SIZE];
                self.scan_slot(ino, nr, raw);
            }
        }
        if self.inode_bits.is_known(0) && !self.inode_bits.get(0) {
            self.problems.push(
                Problem::at_block(
                    ProblemKind::Corrupt,
                    self.layout.inode_bitmap_start,
                    "inode bitmap: reserved inode 0 marked free",
                )
                .repairable(true),
            );
            self.plan.bits.push((Region::Inodes, 0, 1, true));
        }
        Ok(())
    }

    /// Decodes one inode slot and compares it with the inode bitmap.
    fn scan_slot(&mut self, ino: u64, nr: u64, raw: &[u8]) {
        let used = if raw.iter().all(|b| *b == 0) {
            false
        } else {
            let Ok(disk) = read_struct::<DiskInode>(raw, nr, "inode") else {
                return;
            };
            let (stored, computed) = (disk.crc.get(), disk.compute_crc(ino));
            if stored != computed {
                self.problems.push(
                    Problem::at_block(
                        ProblemKind::BadChecksum,
                        nr,
                        format!("inode crc {stored:#010x}, computed {computed:#010x}"),
                    )
                    .with_ino(ino),
                );
                self.unreadable.insert(ino);
                self.complete = false;
                return;
            }
            if disk.mode.get() != 0 {
                self.inodes.insert(ino, InodeInfo::of(ino, &disk));
            }
            disk.mode.get() != 0
        };
        if !self.inode_bits.is_known(ino) {
            return;
        }
        match (used, self.inode_bits.get(ino)) {
            (true, false) => {
                self.problems.push(
                    Problem::at_inode(
                        ProblemKind::FreeButUsed,
                        ino,
                        "allocated inode marked free in the inode bitmap",
                    )
                    .repairable(true),
                );
                self.plan.bits.push((Region::Inodes, ino, 1, true));
            }
            (false, true) => {
                self.problems.push(
                    Problem::at_inode(
                        ProblemKind::LeakedInode,
                        ino,
                        "marked used in the inode bitmap, but its slot is free",
                    )
                    .repairable(true),
                );
                self.plan.bits.push((Region::Inodes, ino, 1, false));
            }
            _ => {}
        }
    }

    // --- pass 4: each allocated inode

    fn scan_inode(&mut self, ino: u64) -> Result<()> {
        let Some(info) = self.inodes.get(&ino).cloned() else {
            return Ok(());
        };
        if let Err(why) = validate_fields(&info) {
            self.problems
                .push(Problem::at_inode(ProblemKind::Corrupt, ino, why));
            self.complete = false;
            return Ok(());
        }
        if info.mode & S_IFMT == S_IFLNK && (info.size == 0 || info.size > SYMLINK_MAX as u64) {
            let detail = format!("symlink target of {} bytes", info.size);
            self.problems
                .push(Problem::at_inode(ProblemKind::Corrupt, ino, detail));
        }
        let mapped = if info.is_dir() {
            self.scan_directory(&info)?;
            Some(0)
        } else if info.has_extent_tree() {
            self.scan_extent_tree(&info)?
        } else {
            self.check_extents(&info, &info.inline)
        };
        if info.xattr_root != 0 {
            self.scan_xattrs(&info)?;
        }
        if let Some(mapped) = mapped.filter(|m| *m != info.blocks) {
            self.problems.push(
                Problem::at_inode(
                    ProblemKind::WrongBlockCount,
                    ino,
                    format!(
                        "blocks {}, its extents map {mapped} data blocks",
                        info.blocks
                    ),
                )
                .repairable(true),
            );
            self.plan.inode(ino).blocks = Some(mapped);
        }
        if !info.is_dir() && info.parent != 0 {
            self.problems.push(
                Problem::at_inode(
                    ProblemKind::BadParent,
                    ino,
                    format!("not a directory, but parent is {}", info.parent),
                )
                .repairable(true),
            );
            self.plan.inode(ino).parent = Some(0);
        }
        Ok(())
    }

    /// Checks a list of extents (sorted by file block) and records their blocks.
    /// Returns the data blocks they map, or None if some were unusable.
    fn check_extents(&mut self, info: &InodeInfo, extents: &[(u64, u64, u64)]) -> Option<u64> {
        let l = self.layout;
        let mut previous_end = 0;
        let mut mapped = 0u64;
        let mut usable = true;
        for &(logical, physical, length) in extents {
            let why = if length == 0 {
                Some("is empty".to_string())
            } else if logical < previous_end {
                Some(format!(
                    "overlaps the one before (ending at {previous_end})"
                ))
            } else if logical
                .checked_add(length)
                .is_none_or(|end| end > MAX_FILE_BLOCKS)
            {
                Some("lies past the largest file size".to_string())
            } else if physical < l.data_start
                || physical
                    .checked_add(length)
                    .is_none_or(|end| end > l.total_blocks)
            {
                Some(format!(
                    "lies outside the data area {}..{}",
                    l.data_start, l.total_blocks
                ))
            } else {
                None
            };
            if let Some(why) = why {
                self.problems.push(Problem::at_inode(
                    ProblemKind::Corrupt,
                    info.ino,
                    format!("extent at file block {logical} -> blocks {physical}+{length} {why}"),
                ));
                self.complete = false;
                usable = false;
                continue;
            }
            previous_end = logical + length;
            mapped += length;
            self.refs.push(Ref {
                start: physical,
                len: length,
                ino: info.ino,
                kind: OwnerKind::Data { logical },
            });
        }
        usable.then_some(mapped)
    }

    /// Walks a tree, collecting its node blocks and entries until the first error.
    fn walk(&mut self, tree: Tree) -> Result<Walked> {
        let mut walked = Walked::default();
        self.walk_into(tree, (0, None), &mut walked)?;
        Ok(walked)
    }

    /// Walks the subtree rooted at `tree.root`, whose keys must lie in `bounds`, into
    /// `walked`. `btree::walk` stops at the first damage; when it does and the root is a
    /// sound internal node, each child is walked on its own, so that a damaged node
    /// loses only what lies below it.
    fn walk_into(
        &mut self,
        tree: Tree,
        bounds: (u64, Option<u64>),
        walked: &mut Walked,
    ) -> Result<()> {
        let mut part = Walked::default();
        let mut store = Store {
            journal: &mut *self.journal,
            layout: self.layout,
            spare: None,
        };
        let (nodes, entries) = (&mut part.nodes, &mut part.entries);
        let result = btree::walk(
            &mut store,
            &tree,
            &mut |block| nodes.push(block),
            &mut |key, value| {
                entries.push((key, value.to_vec()));
                Ok(())
            },
        );
        let error = match result {
            Ok(()) => {
                let (lo, hi) = bounds;
                if let Some((key, _)) = part
                    .entries
                    .iter()
                    .find(|(key, _)| *key < lo || hi.is_some_and(|hi| *key >= hi))
                {
                    let why = format!("B+tree node: key {key} outside its parent's range");
                    walked.errors.push(Error::corrupt(tree.root, why));
                }
                walked.nodes.append(&mut part.nodes);
                walked.entries.append(&mut part.entries);
                return Ok(());
            }
            Err(e @ Error::Corrupt { .. }) => e,
            Err(other) => return Err(other),
        };
        let Some((level, children)) = self.children(&tree)? else {
            walked.nodes.append(&mut part.nodes);
            walked.errors.push(error);
            return Ok(());
        };
        walked.nodes.push(tree.root);
        let errors_before = walked.errors.len();
        for (i, &(key, child)) in children.iter().enumerate() {
            let hi = children.get(i + 1).map(|&(next, _)| next).or(bounds.1);
            let lo = if i == 0 { bounds.0 } else { key };
            let subtree = Tree {
                root: child,
                ..tree
            };
            if let Some(found) = self.sound_level(child)? {
                if found + 1 != level {
                    let why = format!(
                        "B+tree node: level {found}, its parent implies {}",
                        level - 1
                    );
                    walked.errors.push(Error::corrupt(child, why));
                    continue;
                }
            }
            self.walk_into(subtree, (lo, hi), walked)?;
        }
        if walked.errors.len() == errors_before {
            // The children are sound: the damage is in this node itself.
            walked.errors.push(error);
        }
        Ok(())
    }

    /// The level of node `block` if it passes its header checks.
    fn sound_level(&mut self, block: u64) -> Result<Option<u16>> {
        if !self.layout.in_data_area(block) {
            return Ok(None);
        }
        let data = self.read(block)?;
        if verify_block(&data, MAGIC_BTREE, block, "B+tree node").is_err() {
            return Ok(None);
        }
        Ok(read_struct::<BtreeNodeHeader>(&data[..], block, "node")
            .ok()
            .map(|header| header.level.get()))
    }

    /// The level and children of `tree.root` if it is a sound internal node of the tree
    /// (header, crc, kind, owner, level, count), else None.
    fn children(&mut self, tree: &Tree) -> Result<Option<Children>> {
        if !self.layout.in_data_area(tree.root) {
            return Ok(None);
        }
        let data = self.read(tree.root)?;
        if verify_block(&data, MAGIC_BTREE, tree.root, "B+tree node").is_err() {
            return Ok(None);
        }
        let Ok(header) = read_struct::<BtreeNodeHeader>(&data[..], tree.root, "node") else {
            return Ok(None);
        };
        let (level, count) = (header.level.get(), usize::from(header.count.get()));
        if header.kind.get() != tree.kind
            || header.owner.get() != tree.owner
            || level == 0
            || level >= MAX_LEVEL
            || count == 0
            || count > MAX_CHILDREN
        {
            return Ok(None);
        }
        let header_size = size_of::<BtreeNodeHeader>();
        let entry_size = size_of::<BtreeChild>();
        let mut children = Vec::with_capacity(count);
        for i in 0..count {
            let at = header_size + i * entry_size;
            let Ok(child) = read_struct::<BtreeChild>(&data[at..], tree.root, "child") else {
                return Ok(None);
            };
            let block = child.child.get();
            if block == 0 || block == tree.root {
                return Ok(None);
            }
            children.push((child.key.get(), block));
        }
        Ok(Some((level, children)))
    }

    /// Records a walk's node blocks and reports its error. Returns whether it was whole.
    fn record_walk(&mut self, walked: &mut Walked, tree: &Tree, what: &str) -> Result<bool> {
        let kind = match tree.kind {
            BTREE_KIND_EXTENTS => OwnerKind::ExtentNode,
            BTREE_KIND_DIRECTORY => OwnerKind::DirNode,
            _ => OwnerKind::XattrNode,
        };
        for &node in &walked.nodes {
            self.refs.push(Ref {
                start: node,
                len: 1,
                ino: tree.owner,
                kind,
            });
        }
        let mut whole = true;
        for error in std::mem::take(&mut walked.errors) {
            let Error::Corrupt { block, what: why } = error else {
                return Err(error);
            };
            whole = false;
            self.complete = false;
            let damage = self.damage_kind(block, MAGIC_BTREE)?;
            // A damaged node is still this tree's block (its parent points at it),
            // unless the pointer leads somewhere that is not a node at all.
            if self.layout.in_data_area(block)
                && !walked.nodes.contains(&block)
                && self.read(block)?[0..4] == MAGIC_BTREE.to_le_bytes()
            {
                walked.nodes.push(block);
                self.refs.push(Ref {
                    start: block,
                    len: 1,
                    ino: tree.owner,
                    kind,
                });
            }
            self.problems.push(
                Problem::at_block(
                    damage,
                    block,
                    format!("{what} of inode {}: {why}", tree.owner),
                )
                .with_ino(tree.owner),
            );
        }
        Ok(whole)
    }

    fn scan_extent_tree(&mut self, info: &InodeInfo) -> Result<Option<u64>> {
        let tree = Tree {
            root: info.tree_root,
            kind: BTREE_KIND_EXTENTS,
            owner: info.ino,
        };
        let mut walked = self.walk(tree)?;
        let whole = self.record_walk(&mut walked, &tree, "extent tree")?;
        let mut extents = Vec::with_capacity(walked.entries.len());
        let mut decodable = true;
        for (key, value) in &walked.entries {
            match read_struct::<ExtentValue>(value, tree.root, "extent")
                .ok()
                .filter(|_| value.len() == size_of::<ExtentValue>())
            {
                Some(v) => extents.push((*key, v.physical.get(), u64::from(v.length.get()))),
                None => {
                    self.problems.push(Problem::at_inode(
                        ProblemKind::Corrupt,
                        info.ino,
                        format!(
                            "extent tree entry at file block {key} has {} bytes",
                            value.len()
                        ),
                    ));
                    self.complete = false;
                    decodable = false;
                }
            }
        }
        let mapped = self.check_extents(info, &extents);
        if whole && decodable && extents.len() as u64 != u64::from(info.extent_count) {
            self.problems.push(
                Problem::at_inode(
                    ProblemKind::Corrupt,
                    info.ino,
                    format!(
                        "extent_count {}, its extent tree holds {}",
                        info.extent_count,
                        extents.len()
                    ),
                )
                .repairable(true),
            );
            self.plan.inode(info.ino).extent_count = u32::try_from(extents.len()).ok();
        }
        Ok(mapped.filter(|_| whole && decodable))
    }

    fn scan_directory(&mut self, info: &InodeInfo) -> Result<()> {
        let tree = dir::tree(info.tree_root, info.ino);
        let mut walked = self.walk(tree)?;
        let whole = self.record_walk(&mut walked, &tree, "directory tree")?;
        let mut dir_info = DirInfo {
            entries: Vec::with_capacity(walked.entries.len()),
            total: walked.entries.len() as u64,
            complete: whole,
        };
        let mut names = HashSet::new();
        for (key, value) in &walked.entries {
            let decoded = decode_entry(*key, value).and_then(|entry| {
                if names.insert(entry.name.clone()) {
                    Ok(entry)
                } else {
                    Err(format!("name {} appears twice", show(&entry.name)))
                }
            });
            match decoded {
                Ok(entry) => dir_info.entries.push(entry),
                Err(why) => {
                    self.problems
                        .push(Problem::at_inode(ProblemKind::Corrupt, info.ino, why));
                    self.complete = false;
                    dir_info.complete = false;
                }
            }
        }
        self.dirs.insert(info.ino, dir_info);
        Ok(())
    }

    fn scan_xattrs(&mut self, info: &InodeInfo) -> Result<()> {
        let tree = xattr::tree(info.xattr_root, info.ino);
        let mut walked = self.walk(tree)?;
        self.record_walk(&mut walked, &tree, "xattr tree")?;
        for (key, value) in &walked.entries {
            if let Err(why) = check_xattr(*key, value) {
                self.problems
                    .push(Problem::at_inode(ProblemKind::Corrupt, info.ino, why));
            }
        }
        Ok(())
    }

    // --- pass 5: the orphan list

    fn check_orphans(&mut self) {
        let mut cursor = self.layout.orphan_head;
        let mut from = "the superblock".to_string();
        while cursor != 0 {
            let why = if self.unreadable.contains(&cursor) {
                Some("which is unreadable")
            } else if !self.inodes.contains_key(&cursor) {
                Some("which is not allocated")
            } else if self.orphans.contains(&cursor) {
                Some("again: the list loops")
            } else {
                None
            };
            if let Some(why) = why {
                self.problems.push(Problem::at_inode(
                    ProblemKind::Unclean,
                    cursor,
                    format!("orphan list: {from} links to inode {cursor}, {why}"),
                ));
                break;
            }
            self.orphans.insert(cursor);
            let next = self.inodes.get(&cursor).map_or(0, |i| i.next_orphan);
            from = format!("inode {cursor}");
            cursor = next;
        }
        let flagged: Vec<(u64, bool)> = self
            .inodes
            .values()
            .map(|i| (i.ino, i.flags & INODE_FLAG_ORPHAN != 0))
            .filter(|&(ino, flag)| flag != self.orphans.contains(&ino))
            .collect();
        for (ino, flag) in flagged {
            let detail = if flag {
                "orphan flag set, but not on the orphan list"
            } else {
                "on the orphan list without the orphan flag"
            };
            self.problems
                .push(Problem::at_inode(ProblemKind::Unclean, ino, detail));
        }
    }

    // --- pass 6: the namespace

    fn check_namespace(&mut self) {
        let mut links: HashMap<u64, u64> = HashMap::new();
        let mut reached: HashSet<u64> = HashSet::new();
        let mut queue = VecDeque::new();
        match self.inodes.get(&ROOT_INO) {
            Some(root) if root.is_dir() => {
                if root.parent != ROOT_INO {
                    let detail = format!("root directory with parent {}", root.parent);
                    self.problems.push(
                        Problem::at_inode(ProblemKind::BadParent, ROOT_INO, detail)
                            .repairable(true),
                    );
                    self.plan.inode(ROOT_INO).parent = Some(ROOT_INO);
                }
                reached.insert(ROOT_INO);
                queue.push_back(ROOT_INO);
            }
            _ => {
                if !self.unreadable.contains(&ROOT_INO) {
                    self.problems.push(Problem::at_inode(
                        ProblemKind::Corrupt,
                        ROOT_INO,
                        "the root is not an allocated directory",
                    ));
                }
                self.complete = false;
            }
        }
        while let Some(dir) = queue.pop_front() {
            self.check_directory(dir, &mut links, &mut reached, &mut queue);
        }
        self.check_links(&links, &reached);
    }

    /// Checks one reachable directory's entries, size and link count.
    fn check_directory(
        &mut self,
        dir: u64,
        links: &mut HashMap<u64, u64>,
        reached: &mut HashSet<u64>,
        queue: &mut VecDeque<u64>,
    ) {
        let (Some(info), Some(dir_info)) = (self.inodes.get(&dir).cloned(), self.dirs.remove(&dir))
        else {
            return;
        };
        let mut subdirs = 0u64;
        let mut removed = 0u64;
        let mut targets_known = true;
        for entry in &dir_info.entries {
            if self.unreadable.contains(&entry.ino) {
                targets_known = false;
                continue;
            }
            let Some(target) = self.inodes.get(&entry.ino).cloned() else {
                self.dangling(&info, &dir_info, entry, None);
                removed += u64::from(dir_info.complete);
                continue;
            };
            if entry.file_type != target.file_type() {
                self.dangling(&info, &dir_info, entry, Some(&target));
            }
            *links.entry(entry.ino).or_insert(0) += 1;
            if target.is_dir() {
                subdirs += 1;
                self.reach(dir, entry, &target, reached, queue);
            }
        }
        if dir_info.complete {
            self.check_dir_counts(&info, &dir_info, removed, subdirs, targets_known);
        }
        self.dirs.insert(dir, dir_info);
    }

    /// Reports a dangling entry: its target is free (`target` None) or of another type.
    fn dangling(
        &mut self,
        dir: &InodeInfo,
        dir_info: &DirInfo,
        entry: &EntryInfo,
        target: Option<&InodeInfo>,
    ) {
        let name = show(&entry.name);
        let (detail, file_type) = match target {
            None => (
                format!("entry {name} names inode {}, which is free", entry.ino),
                None,
            ),
            Some(t) => (
                format!(
                    "entry {name} names inode {} as a {}, but it is a {}",
                    entry.ino,
                    type_name(entry.file_type),
                    type_name(t.file_type())
                ),
                Some(t.file_type()),
            ),
        };
        self.problems.push(
            Problem::at_inode(ProblemKind::DanglingEntry, dir.ino, detail)
                .repairable(dir_info.complete),
        );
        if dir_info.complete {
            self.plan.entries.push(EntryFix {
                dir: dir.ino,
                root: dir.tree_root,
                entry: entry.clone(),
                file_type,
            });
        }
    }

    /// Follows an entry to a subdirectory: it must be reached once and name its parent.
    fn reach(
        &mut self,
        dir: u64,
        entry: &EntryInfo,
        target: &InodeInfo,
        reached: &mut HashSet<u64>,
        queue: &mut VecDeque<u64>,
    ) {
        if !reached.insert(target.ino) {
            self.problems.push(Problem::at_inode(
                ProblemKind::Corrupt,
                target.ino,
                format!(
                    "directory reached twice (again as {} in directory {dir})",
                    show(&entry.name)
                ),
            ));
            self.complete = false;
            return;
        }
        queue.push_back(target.ino);
        if target.parent != dir {
            self.problems.push(
                Problem::at_inode(
                    ProblemKind::BadParent,
                    target.ino,
                    format!(
                        "parent is {}, but directory {dir} holds it as {}",
                        target.parent,
                        show(&entry.name)
                    ),
                )
                .repairable(true),
            );
            self.plan.inode(target.ino).parent = Some(dir);
        }
    }

    /// A fully read directory: `size` = entries, `nlink` = 2 + subdirectories.
    fn check_dir_counts(
        &mut self,
        info: &InodeInfo,
        dir_info: &DirInfo,
        removed: u64,
        subdirs: u64,
        targets_known: bool,
    ) {
        let ino = info.ino;
        if info.size != dir_info.total {
            self.problems.push(
                Problem::at_inode(
                    ProblemKind::WrongSize,
                    ino,
                    format!("size {}, {} entries", info.size, dir_info.total),
                )
                .repairable(true),
            );
        }
        let final_size = dir_info.total - removed;
        if final_size != info.size {
            self.plan.inode(ino).size = Some(final_size);
        }
        if !targets_known {
            return;
        }
        let expected = 2 + subdirs;
        if u64::from(info.nlink) != expected {
            let fix = u32::try_from(expected).ok();
            self.problems.push(
                Problem::at_inode(
                    ProblemKind::WrongLinkCount,
                    ino,
                    format!(
                        "nlink {}, expected {expected} (2 + {subdirs} subdirectories)",
                        info.nlink
                    ),
                )
                .repairable(fix.is_some()),
            );
            self.plan.inode(ino).nlink = fix;
        }
    }

    /// Link counts of files, and inodes nothing names.
    fn check_links(&mut self, links: &HashMap<u64, u64>, reached: &HashSet<u64>) {
        let inodes: Vec<InodeInfo> = self.inodes.values().cloned().collect();
        for info in inodes {
            let ino = info.ino;
            let count = if info.is_dir() {
                if reached.contains(&ino) {
                    continue;
                }
                0
            } else {
                links.get(&ino).copied().unwrap_or(0)
            };
            if count == 0 && !self.orphans.contains(&ino) {
                self.leaked(&info);
            } else if !info.is_dir() && u64::from(info.nlink) != count {
                let fix = u32::try_from(count).ok().filter(|_| self.complete);
                let detail = if count == 0 {
                    format!(
                        "nlink {} on the orphan list, but nothing names it",
                        info.nlink
                    )
                } else {
                    format!("nlink {}, {count} entries name it", info.nlink)
                };
                self.problems.push(
                    Problem::at_inode(ProblemKind::WrongLinkCount, ino, detail)
                        .repairable(fix.is_some()),
                );
                if fix.is_some() {
                    self.plan.inode(ino).nlink = fix;
                }
            }
        }
    }

    /// An allocated inode nothing names and not on the orphan list. Freed by repair when
    /// it has no links and the check saw everything.
    fn leaked(&mut self, info: &InodeInfo) {
        let repairable = self.complete && info.nlink == 0;
        self.problems.push(
            Problem::at_inode(
                ProblemKind::LeakedInode,
                info.ino,
                format!(
                    "{} with nlink {}: no entry names it and it is not on the orphan list",
                    type_name(info.file_type()),
                    info.nlink
                ),
            )
            .repairable(repairable),
        );
        if repairable {
            self.plan.frees.push(info.ino);
            self.plan.bits.push((Region::Inodes, info.ino, 1, false));
            self.plan.inodes.remove(&info.ino);
        }
    }

    // --- pass 7: block accounting

    /// Compares the references with the block bitmap. Returns the blocks in use and
    /// spare free blocks for repair.
    fn check_blocks(&mut self) -> (u64, Vec<u64>) {
        let l = self.layout;
        let segments = sweep(&self.refs);
        let doubled = segments.iter().any(|s| s.owners.len() > 1);
        let freed: HashSet<u64> = self.plan.frees.iter().copied().collect();
        let mut findings = Vec::new();
        for (start, end) in self.block_bits.runs(0, l.data_start, false) {
            findings.push(Finding {
                kind: ProblemKind::FreeButUsed,
                start,
                end,
                key: "metadata".into(),
                detail: "metadata region marked free".into(),
                repairable: true,
                fix: Some(true),
            });
        }
        let leaks_repairable = self.complete && !doubled;
        let mut spare = Vec::new();
        let mut cursor = l.data_start;
        let mut used = l.data_start;
        for segment in &segments {
            self.gap(
                cursor,
                segment.start,
                leaks_repairable,
                &mut findings,
                &mut spare,
            );
            self.segment(segment, &freed, &mut findings);
            used += segment.end - segment.start;
            cursor = segment.end;
        }
        self.gap(
            cursor,
            l.total_blocks,
            leaks_repairable,
            &mut findings,
            &mut spare,
        );
        self.report_findings(coalesce(findings));
        (used, spare)
    }

    /// Unreferenced blocks [from, to): any marked used is leaked.
    fn gap(
        &self,
        from: u64,
        to: u64,
        repairable: bool,
        findings: &mut Vec<Finding>,
        spare: &mut Vec<u64>,
    ) {
        if from >= to {
            return;
        }
        for (start, end) in self.block_bits.runs(from, to, true) {
            findings.push(Finding {
                kind: ProblemKind::LeakedBlock,
                start,
                end,
                key: String::new(),
                detail: "marked used, referenced by nothing".into(),
                repairable,
                fix: Some(false),
            });
        }
        if spare.len() < SPARE_BLOCKS {
            for (start, end) in self.block_bits.runs(from, to, false) {
                let room = SPARE_BLOCKS - spare.len();
                spare.extend((start..end).take(room));
                if spare.len() >= SPARE_BLOCKS {
                    break;
                }
            }
        }
    }

    /// Referenced blocks: more than one owner is a double allocation; any marked free is
    /// free but used. Blocks only freed inodes own are cleared by their free.
    fn segment(&mut self, segment: &Segment, freed: &HashSet<u64>, findings: &mut Vec<Finding>) {
        let owners: Vec<&Ref> = segment
            .owners
            .iter()
            .filter_map(|&i| self.refs.get(i))
            .collect();
        let mut identities: Vec<String> = owners.iter().map(|r| r.identity()).collect();
        identities.sort();
        let key = identities.join(",");
        let describe = |block: u64| -> String {
            owners
                .iter()
                .map(|r| r.describe(block))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if owners.len() > 1 {
            findings.push(Finding {
                kind: ProblemKind::DoubleAllocated,
                start: segment.start,
                end: segment.end,
                key: key.clone(),
                detail: describe(segment.start),
                repairable: false,
                fix: None,
            });
        }
        let all_freed = owners.iter().all(|r| freed.contains(&r.ino));
        for (start, end) in self.block_bits.runs(segment.start, segment.end, false) {
            findings.push(Finding {
                kind: ProblemKind::FreeButUsed,
                start,
                end,
                key: key.clone(),
                detail: format!("marked free, referenced by {}", describe(start)),
                repairable: owners.len() == 1,
                fix: (owners.len() == 1 && !all_freed).then_some(true),
            });
        }
        if all_freed {
            for (start, end) in self.block_bits.runs(segment.start, segment.end, true) {
                self.plan
                    .bits
                    .push((Region::Blocks, start, end - start, false));
            }
        }
    }

    fn report_findings(&mut self, findings: Vec<Finding>) {
        for finding in findings {
            let len = finding.end - finding.start;
            if finding.repairable {
                if let Some(value) = finding.fix {
                    self.plan
                        .bits
                        .push((Region::Blocks, finding.start, len, value));
                }
            }
            self.problems.push(Problem {
                kind: finding.kind,
                block: Some(finding.start),
                last_block: (len > 1).then(|| finding.end - 1),
                ino: None,
                detail: finding.detail,
                repairable: finding.repairable,
            });
        }
    }
}

/// Joins findings of the same kind, owners and fix that follow one another on disk.
fn coalesce(findings: Vec<Finding>) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::new();
    let mut open: HashMap<ProblemKind, usize> = HashMap::new();
    for finding in findings {
        if let Some(previous) = open.get(&finding.kind).and_then(|&i| out.get_mut(i)) {
            if previous.end == finding.start
                && previous.key == finding.key
                && previous.repairable == finding.repairable
                && previous.fix == finding.fix
            {
                previous.end = finding.end;
                continue;
            }
        }
        open.insert(finding.kind, out.len());
        out.push(finding);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Decoding helpers

/// Checks the fields of an allocated inode that say how to read the rest.
fn validate_fields(info: &InodeInfo) -> std::result::Result<(), String> {
    let kind = info.mode & S_IFMT;
    let known_flags = INODE_FLAG_EXTENT_TREE | INODE_FLAG_ORPHAN;
    if ![
        S_IFREG, S_IFDIR, S_IFLNK, S_IFIFO, S_IFCHR, S_IFBLK, S_IFSOCK,
    ]
    .contains(&kind)
    {
        return Err(format!("mode {:#o} has no valid file type", info.mode));
    }
    if info.flags & !known_flags != 0 {
        return Err(format!("unknown flags {:#x}", info.flags & !known_flags));
    }
    if info.is_dir() {
        if info.tree_root == 0 || info.has_extent_tree() || info.extent_count != 0 {
            return Err(format!(
                "directory with entry tree {}, flags {:#x}, {} extents",
                info.tree_root, info.flags, info.extent_count
            ));
        }
        return Ok(());
    }
    if info.has_extent_tree() && info.tree_root == 0 {
        return Err("extent tree flag without a root".into());
    }
    if !info.has_extent_tree() && info.tree_root != 0 {
        return Err(format!(
            "tree root {} without the extent tree flag",
            info.tree_root
        ));
    }
    if !info.has_extent_tree() && info.extent_count as usize > INLINE_EXTENTS {
        return Err(format!("{} inline extents", info.extent_count));
    }
    Ok(())
}

/// Decodes a directory entry and checks its name and key.
fn decode_entry(key: u64, value: &[u8]) -> std::result::Result<EntryInfo, String> {
    let header: DirEntryHeader = read_struct(value, 0, "directory entry")
        .map_err(|_| format!("entry {key:#x} is truncated"))?;
    let name = &value[size_of::<DirEntryHeader>()..];
    if name.len() != usize::from(header.name_len) {
        return Err(format!("entry {key:#x} has a bad name length"));
    }
    dir::check_name(name).map_err(|_| format!("entry {key:#x} has a bad name {}", show(name)))?;
    let base = dir::key_base(name);
    if key < base || key >= base + COLLISION_SLOTS {
        return Err(format!(
            "entry {} has key {key:#x}, but its name hashes to {base:#x}",
            show(name)
        ));
    }
    Ok(EntryInfo {
        key,
        name: name.to_vec(),
        ino: header.ino.get(),
        file_type: header.file_type,
    })
}

/// Checks an xattr value: lengths, name, key.
fn check_xattr(key: u64, value: &[u8]) -> std::result::Result<(), String> {
    let header: XattrHeader =
        read_struct(value, 0, "xattr").map_err(|_| format!("xattr {key:#x} is truncated"))?;
    let name_len = usize::from(header.name_len);
    let body = &value[size_of::<XattrHeader>()..];
    if body.len() != name_len + usize::from(header.value_len.get()) {
        return Err(format!("xattr {key:#x} has bad lengths"));
    }
    let name = &body[..name_len];
    xattr::check_name(name).map_err(|_| format!("xattr {key:#x} has a bad name {}", show(name)))?;
    let base = dir::key_base(name);
    if key < base || key >= base + COLLISION_SLOTS {
        return Err(format!(
            "xattr {} has key {key:#x}, but its name hashes to {base:#x}",
            show(name)
        ));
    }
    Ok(())
}

/// A name, quoted and escaped onto one line.
fn show(name: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(name))
}

/// What a file type is called.
fn type_name(file_type: u8) -> String {
    match u32::from(file_type) << 12 {
        S_IFREG => "regular file".into(),
        S_IFDIR => "directory".into(),
        S_IFLNK => "symlink".into(),
        S_IFIFO => "fifo".into(),
        S_IFCHR => "character device".into(),
        S_IFBLK => "block device".into(),
        S_IFSOCK => "socket".into(),
        _ => format!("file of type {file_type}"),
    }
}

/// The part of an error worth showing in a problem.
fn message(e: &Error) -> String {
    match e {
        Error::Corrupt { what, .. } => what.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Repair

/// Carries out a plan through the journal, in units that each leave the image no worse
/// than before: bits of used things are set first, inodes and entries fixed next, and
/// only then are inodes freed and bits of unused things cleared.
fn apply(journal: &mut Journal, layout: &Layout, plan: &Plan, mut spare: Vec<u64>) -> Result<()> {
    for ((region, block), ranges) in bit_units(layout, plan, true) {
        unit(journal, "set bitmap bits", |j| {
            write_bitmap_block(j, region_start(layout, region) + block, &ranges, true)
        })?;
    }
    for (&ino, fix) in &plan.inodes {
        unit(journal, "rewrite an inode", |j| {
            fix_inode(j, layout, ino, fix)
        })?;
    }
    for fix in &plan.entries {
        unit(journal, "mend a directory entry", |j| {
            fix_entry(j, layout, fix, &mut spare)
        })?;
    }
    for &ino in &plan.frees {
        unit(journal, "free an inode", |j| free_inode(j, layout, ino))?;
    }
    for ((region, block), ranges) in bit_units(layout, plan, false) {
        unit(journal, "clear bitmap bits", |j| {
            write_bitmap_block(j, region_start(layout, region) + block, &ranges, false)
        })?;
    }
    commit(journal)?;
    journal.checkpoint()?;
    Ok(())
}

/// Runs one repair step as a journal operation: rolled back if it fails (the problem
/// stays, the next check reports it), committed when the transaction grows large.
fn unit(
    journal: &mut Journal,
    what: &str,
    step: impl FnOnce(&mut Journal) -> Result<()>,
) -> Result<()> {
    journal.begin_op();
    if let Err(e) = step(journal) {
        journal.rollback_op();
        if let Error::Io(_) = e {
            return Err(e);
        }
        log::warn!("fsck: could not {what}: {e}");
        return Ok(());
    }
    if journal.should_commit() {
        commit(journal)?;
    }
    Ok(())
}

fn commit(journal: &mut Journal) -> Result<()> {
    if journal.needs_checkpoint() {
        journal.checkpoint()?;
    }
    journal.commit()
}

fn region_start(layout: &Layout, region: Region) -> u64 {
    match region {
        Region::Blocks => layout.bitmap_start,
        Region::Inodes => layout.inode_bitmap_start,
    }
}

/// Planned bit changes to `value`, grouped by bitmap block: (region, block index) ->
/// ranges of bits local to the block.
#[allow(clippy::type_complexity)]
fn bit_units(
    layout: &Layout,
    plan: &Plan,
    value: bool,
) -> BTreeMap<(Region, u64), Vec<(u64, u64)>> {
    let mut units: BTreeMap<(Region, u64), Vec<(u64, u64)>> = BTreeMap::new();
    for &(region, start, len, v) in &plan.bits {
        if v != value {
            continue;
        }
        let blocks = match region {
            Region::Blocks => layout.bitmap_blocks,
            Region::Inodes => layout.inode_bitmap_blocks,
        };
        let end = start
            .saturating_add(len)
            .min(blocks * BITMAP_BITS_PER_BLOCK);
        let mut bit = start;
        while bit < end {
            let index = bit / BITMAP_BITS_PER_BLOCK;
            let first = index * BITMAP_BITS_PER_BLOCK;
            let stop = end.min(first + BITMAP_BITS_PER_BLOCK);
            units
                .entry((region, index))
                .or_default()
                .push((bit - first, stop - first));
            bit = stop;
        }
    }
    units
}

/// Sets or clears bits of one bitmap block (ranges local to it) through the journal.
fn write_bitmap_block(
    journal: &mut Journal,
    nr: u64,
    ranges: &[(u64, u64)],
    value: bool,
) -> Result<()> {
    let mut block = *journal.read(nr)?;
    verify_block(&block, MAGIC_BITMAP, nr, "bitmap")?;
    for &(start, end) in ranges {
        for local in start..end {
            let byte = &mut block[BITMAP_DATA_OFFSET + (local / 8) as usize];
            if value {
                *byte |= 1 << (local % 8);
            } else {
                *byte &= !(1 << (local % 8));
            }
        }
    }
    seal_block(&mut block, MAGIC_BITMAP, nr);
    journal.write(nr, block)
}

/// Sets or clears global bits [start, start + len) of a bitmap.
fn write_bits(
    journal: &mut Journal,
    layout: &Layout,
    region: Region,
    runs: &[(u64, u64)],
    value: bool,
) -> Result<()> {
    let plan = Plan {
        bits: runs
            .iter()
            .map(|&(start, len)| (region, start, len, value))
            .collect(),
        ..Plan::default()
    };
    for ((region, index), ranges) in bit_units(layout, &plan, value) {
        write_bitmap_block(
            journal,
            region_start(layout, region) + index,
            &ranges,
            value,
        )?;
    }
    Ok(())
}

/// Reads an inode slot (which must pass its checksum), lets `edit` change it, reseals
/// and writes it back.
fn edit_inode(
    journal: &mut Journal,
    layout: &Layout,
    ino: u64,
    edit: impl FnOnce(&mut DiskInode) -> Result<()>,
) -> Result<()> {
    let (nr, offset) = layout.inode_location(ino);
    let mut block = *journal.read(nr)?;
    let raw = &mut block[offset..offset + INODE_SIZE];
    let mut disk: DiskInode = read_struct(raw, nr, "inode")?;
    if disk.crc.get() != disk.compute_crc(ino) {
        return Err(Error::corrupt(nr, format!("inode {ino}: bad checksum")));
    }
    edit(&mut disk)?;
    disk.crc = U32::new(disk.compute_crc(ino));
    raw.copy_from_slice(disk.as_bytes());
    journal.write(nr, block)
}

fn fix_inode(journal: &mut Journal, layout: &Layout, ino: u64, fix: &InodeFix) -> Result<()> {
    edit_inode(journal, layout, ino, |disk| {
        if disk.mode.get() == 0 {
            return Err(Error::Invalid(format!(
                "inode {ino} is no longer allocated"
            )));
        }
        if let Some(nlink) = fix.nlink {
            disk.nlink = U32::new(nlink);
        }
        if let Some(size) = fix.size {
            disk.size = U64::new(size);
        }
        if let Some(blocks) = fix.blocks {
            disk.blocks = U64::new(blocks);
        }
        if let Some(parent) = fix.parent {
            disk.parent = U64::new(parent);
        }
        if let Some(count) = fix.extent_count {
            disk.extent_count = U32::new(count);
        }
        Ok(())
    })
}

/// Frees a leaked inode's slot, keeping a newer generation for its next user (the
/// inode bit and its blocks are cleared by the bitmap steps).
fn free_inode(journal: &mut Journal, layout: &Layout, ino: u64) -> Result<()> {
    edit_inode(journal, layout, ino, |disk| {
        if disk.mode.get() == 0 || disk.nlink.get() != 0 {
            return Err(Error::Invalid(format!(
                "inode {ino} changed since the check"
            )));
        }
        let generation = disk.generation.get().saturating_add(1);
        *disk = DiskInode::zeroed();
        disk.generation = U64::new(generation);
        Ok(())
    })
}

/// Removes or retypes a directory entry, after checking it is still the one the check
/// saw.
fn fix_entry(
    journal: &mut Journal,
    layout: &Layout,
    fix: &EntryFix,
    spare: &mut Vec<u64>,
) -> Result<()> {
    let mut store = Store {
        journal,
        layout: *layout,
        spare: Some(spare),
    };
    let tree = dir::tree(fix.root, fix.dir);
    let entry = &fix.entry;
    let current = btree::get(&mut store, &tree, entry.key)?
        .map(|value| decode_entry(entry.key, &value))
        .transpose()
        .map_err(|why| Error::corrupt(fix.root, why))?;
    if !current.is_some_and(|c| c.name == entry.name && c.ino == entry.ino) {
        return Err(Error::Invalid(format!(
            "entry {} of directory {} changed since the check",
            show(&entry.name),
            fix.dir
        )));
    }
    match fix.file_type {
        None => btree::remove(&mut store, &tree, entry.key).map(|_| ()),
        Some(file_type) => dir::replace(
            &mut store,
            &tree,
            entry.key,
            &entry.name,
            entry.ino,
            file_type,
        ),
    }
}
