//! Model-based test: random operation sequences run on libfs and on a simple in-memory
//! model of POSIX semantics, compared after every operation.
//!
//! The namespace is tiny (four names, paths of depth one to three) so that collisions,
//! overwrites, renames over existing entries and operations on missing parents are
//! frequent. Every operation's outcome (success, or the same errno) is compared, and
//! after every operation the whole tree is compared: directory listings (names, file
//! types and the mapping of model inodes to libfs inode numbers), link counts, sizes,
//! allocated blocks and extent maps, symlink targets and xattrs; file contents are read
//! back in full every few operations, after every reopen and at the end.
//!
//! `PROPTEST_CASES` raises the number of cases (default 64). A failure prints the
//! shrunk, minimal operation sequence.

use libc::{
    E2BIG, EEXIST, EINVAL, EISDIR, ENAMETOOLONG, ENODATA, ENOENT, ENOTDIR, ENOTEMPTY, EPERM,
};
use libfs::format::{S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, XATTR_MAX_TOTAL};
use libfs::{
    format, BlockDevice, Error, FallocateMode, FormatOptions, Fs, MemDevice, OpenOptions,
    RenameMode, SetAttr, XattrMode, BLOCK_SIZE, ROOT_INO,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};

const BS: u64 = BLOCK_SIZE as u64;
const DEVICE_BYTES: u64 = 64 << 20;
/// The last name is NAME_MAX (255) bytes long.
const NAMES: [&[u8]; 5] = [b"a", b"b", b"c", b"d", &[b'L'; 255]];
const MAX_HANDLES: usize = 4;
const XATTR_NAMES: [&[u8]; 3] = [b"user.a", b"user.bb", b"trusted.c"];

fn symlink_target(index: u8) -> Vec<u8> {
    match index % 5 {
        0 => b"a".to_vec(),
        1 => b"../b/c".to_vec(),
        2 => b"/some/absolute/path".to_vec(),
        3 => vec![b'x'; 4095],
        // Longer than a block: ENAMETOOLONG.
        _ => vec![b'y'; 5000],
    }
}

/// Deterministic contents for a write: all zeros for seed 0.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if seed == 0 {
                0
            } else {
                ((i as u32).wrapping_mul(u32::from(seed) | 1) >> 3) as u8 ^ seed ^ (i >> 12) as u8
            }
        })
        .collect()
}

fn blocks_for(bytes: u64) -> u64 {
    bytes.div_ceil(BS)
}

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

/// A path from the root: indices into NAMES.
#[derive(Clone, PartialEq, Eq)]
struct P(Vec<u8>);

impl P {
    fn parent(&self) -> &[u8] {
        &self.0[..self.0.len() - 1]
    }
    fn name(&self) -> &'static [u8] {
        NAMES[usize::from(self.0[self.0.len() - 1])]
    }
}

impl fmt::Debug for P {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.0 {
            match NAMES[usize::from(*c)] {
                long if long.len() > 8 => write!(f, "/L{}", long.len())?,
                name => write!(f, "/{}", String::from_utf8_lossy(name))?,
            }
        }
        Ok(())
    }
}

/// What a data operation works on: a path, or an open handle (index modulo the number
/// of handles; nothing happens when none is open).
#[derive(Clone, PartialEq, Eq)]
enum T {
    Path(P),
    Handle(u8),
}

impl fmt::Debug for T {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            T::Path(p) => p.fmt(f),
            T::Handle(h) => write!(f, "#{h}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Falloc {
    Plain,
    KeepSize,
    Punch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum XMode {
    Any,
    Create,
    Replace,
}

#[derive(Clone, Debug)]
enum Op {
    Create(P),
    Mkdir(P),
    Symlink(P, u8),
    Write {
        path: T,
        offset: u64,
        len: usize,
        seed: u8,
    },
    Truncate(T, u64),
    /// Single-block writes at every other block from `start`: `count` extents (a
    /// multi-level extent tree when large).
    Scatter {
        path: T,
        start: u64,
        count: u64,
        seed: u8,
    },
    Fallocate {
        path: T,
        offset: u64,
        len: u64,
        mode: Falloc,
    },
    Unlink(P),
    Rmdir(P),
    Rename(P, P, RenameMode),
    Link(P, P),
    SetXattr {
        path: P,
        name: u8,
        len: usize,
        seed: u8,
        mode: XMode,
    },
    RemoveXattr(P, u8),
    Fsync(P),
    /// Opens a handle (`Fs::retain`): at most MAX_HANDLES are open.
    Open(P),
    /// Releases a handle.
    Close(u8),
    /// Links the inode of an open handle (ENOENT once it has no links).
    LinkHandle(u8, P),
    Sync,
    Checkpoint,
    Reopen,
    CrashReopen,
}

#[derive(Clone, Debug)]
struct Case {
    /// Open with tiny block and inode caches (exercises eviction).
    small_cache: bool,
    /// Start from a small tree (see `prologue`) rather than an empty root.
    prologue: bool,
    /// Format with the smallest journal mkfs allows (frequent commits and checkpoints).
    small_journal: bool,
    ops: Vec<Op>,
}

/// Directories /a, /b, /a/a, /a/b and files /c, /a/c, /a/b/d, /b/d.
fn prologue() -> Vec<Op> {
    let p = |comps: &[u8]| P(comps.to_vec());
    vec![
        Op::Mkdir(p(&[0])),
        Op::Mkdir(p(&[1])),
        Op::Mkdir(p(&[0, 0])),
        Op::Mkdir(p(&[0, 1])),
        Op::Create(p(&[2])),
        Op::Create(p(&[0, 2])),
        Op::Create(p(&[0, 1, 3])),
        Op::Create(p(&[1, 3])),
    ]
}

/// A name index: mostly "a" / "b" (directory names) or "c" / "d" (file names), so that
/// sequences build trees, yet types still collide now and then.
fn component(dir_name: bool) -> impl Strategy<Value = u8> {
    let preferred = if dir_name { vec![0u8, 1] } else { vec![2u8, 3] };
    prop_oneof![6 => prop::sample::select(preferred), 1 => 0u8..5]
}

/// A path to a directory: one to three components.
fn dir_path() -> impl Strategy<Value = P> {
    prop_oneof![
        4 => prop::collection::vec(component(true), 1..=1),
        4 => prop::collection::vec(component(true), 2..=2),
        1 => prop::collection::vec(component(true), 3..=3),
    ]
    .prop_map(P)
}

/// A path to a file: zero to two directory components and a file name.
fn file_path() -> impl Strategy<Value = P> {
    (
        prop_oneof![
            3 => prop::collection::vec(component(true), 0..=0),
            4 => prop::collection::vec(component(true), 1..=1),
            2 => prop::collection::vec(component(true), 2..=2),
        ],
        component(false),
    )
        .prop_map(|(mut comps, leaf)| {
            comps.push(leaf);
            P(comps)
        })
}

/// Any path of one to three components.
fn any_path() -> impl Strategy<Value = P> {
    prop::collection::vec(0u8..5, 1..=3).prop_map(P)
}

fn path() -> impl Strategy<Value = P> {
    prop_oneof![3 => file_path(), 2 => dir_path(), 1 => any_path()]
}

fn target() -> impl Strategy<Value = T> {
    prop_oneof![4 => file_path().prop_map(T::Path), 1 => any::<u8>().prop_map(T::Handle)]
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0u64..8192,
        2 => (0u64..300).prop_map(|b| b * BS),
        2 => 0u64..(1 << 20),
    ]
}

fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => Just(0usize),
        3 => 1usize..64,
        3 => 1usize..8192,
        2 => 1usize..65536,
        1 => (1usize..16).prop_map(|b| b * BLOCK_SIZE),
    ]
}

fn new_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0u64..8192,
        2 => (0u64..300).prop_map(|b| b * BS),
        2 => 0u64..(1 << 20) + 65536,
    ]
}

fn falloc_len() -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => Just(0u64),
        3 => 1u64..8192,
        2 => 1u64..(256 << 10),
        1 => (1u64..64).prop_map(|b| b * BS),
    ]
}

fn rename_mode() -> impl Strategy<Value = RenameMode> {
    prop_oneof![
        3 => Just(RenameMode::Replace),
        1 => Just(RenameMode::NoReplace),
        1 => Just(RenameMode::Exchange),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => file_path().prop_map(Op::Create),
        4 => dir_path().prop_map(Op::Mkdir),
        2 => (path(), any::<u8>()).prop_map(|(p, t)| Op::Symlink(p, t)),
        14 => (target(), offset(), length(), any::<u8>())
            .prop_map(|(path, offset, len, seed)| Op::Write { path, offset, len, seed }),
        4 => (target(), new_size()).prop_map(|(p, s)| Op::Truncate(p, s)),
        1 => (target(), 0u64..64, 1u64..400, any::<u8>())
            .prop_map(|(path, start, count, seed)| Op::Scatter { path, start, count, seed }),
        5 => (
            target(),
            offset(),
            falloc_len(),
            prop_oneof![Just(Falloc::Plain), Just(Falloc::KeepSize), Just(Falloc::Punch)]
        )
            .prop_map(|(path, offset, len, mode)| Op::Fallocate { path, offset, len, mode }),
        4 => path().prop_map(Op::Unlink),
        3 => path().prop_map(Op::Rmdir),
        10 => prop_oneof![
            (file_path(), file_path()),
            (dir_path(), dir_path()),
            (path(), path()),
        ]
        .prop_flat_map(|(a, b)| (Just(a), Just(b), rename_mode()))
        .prop_map(|(a, b, m)| Op::Rename(a, b, m)),
        3 => (prop_oneof![3 => file_path(), 1 => path()], file_path())
            .prop_map(|(a, b)| Op::Link(a, b)),
        4 => (
            path(),
            0u8..3,
            prop_oneof![
                5 => (0usize..48, prop_oneof![Just(XMode::Any), Just(XMode::Create), Just(XMode::Replace)]),
                1 => ((XATTR_MAX_TOTAL - 20)..(XATTR_MAX_TOTAL + 20), Just(XMode::Any)),
            ],
            any::<u8>()
        )
            .prop_map(|(path, name, (len, mode), seed)| Op::SetXattr { path, name, len, seed, mode }),
        2 => (path(), 0u8..3).prop_map(|(p, n)| Op::RemoveXattr(p, n)),
        1 => path().prop_map(Op::Fsync),
        2 => prop_oneof![4 => file_path(), 1 => path()].prop_map(Op::Open),
        2 => any::<u8>().prop_map(Op::Close),
        1 => (any::<u8>(), file_path()).prop_map(|(h, p)| Op::LinkHandle(h, p)),
        1 => Just(Op::Sync),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Reopen),
        1 => Just(Op::CrashReopen),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::bool::weighted(0.25),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.25),
        prop::collection::vec(op(), 50..300),
    )
        .prop_map(|(small_cache, prologue, small_journal, ops)| Case {
            small_cache,
            prologue,
            small_journal,
            ops,
        })
}

/// What a successful operation produced: model ids on the model side, inode numbers on
/// the libfs side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Unit,
    /// A new inode.
    New(u64),
    /// A new link to an existing inode.
    Linked(u64),
    Wrote(usize),
    /// Not applicable (a data operation on a symlink).
    Skip,
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

type Id = u64;
const ROOT: Id = 1;

#[derive(Clone, Debug)]
enum Node {
    File(Vec<u8>),
    Dir {
        entries: BTreeMap<Vec<u8>, Id>,
        parent: Id,
    },
    Symlink(Vec<u8>),
}

#[derive(Clone, Debug)]
struct MInode {
    node: Node,
    /// Links of a non-directory (a directory's count follows from the tree).
    nlink: u32,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// File blocks that are allocated (written or preallocated).
    blocks: BTreeSet<u64>,
}

impl MInode {
    fn new(node: Node) -> Self {
        Self {
            node,
            nlink: 1,
            xattrs: BTreeMap::new(),
            blocks: BTreeSet::new(),
        }
    }
    fn is_dir(&self) -> bool {
        matches!(self.node, Node::Dir { .. })
    }
    fn kind(&self) -> u32 {
        match self.node {
            Node::File(_) => S_IFREG,
            Node::Dir { .. } => S_IFDIR,
            Node::Symlink(_) => S_IFLNK,
        }
    }
}

#[derive(Clone, Debug)]
struct Model {
    inodes: BTreeMap<Id, MInode>,
    next: Id,
    /// Open handles: an inode without links lives on while one is open.
    handles: Vec<Id>,
}

impl Model {
    fn new() -> Self {
        let mut inodes = BTreeMap::new();
        inodes.insert(
            ROOT,
            MInode::new(Node::Dir {
                entries: BTreeMap::new(),
                parent: ROOT,
            }),
        );
        Self {
            inodes,
            next: ROOT + 1,
            handles: Vec::new(),
        }
    }

    fn node(&self, id: Id) -> &MInode {
        &self.inodes[&id]
    }

    fn node_mut(&mut self, id: Id) -> &mut MInode {
        self.inodes.get_mut(&id).expect("live model inode")
    }

    fn entries(&self, id: Id) -> Result<&BTreeMap<Vec<u8>, Id>, i32> {
        match &self.node(id).node {
            Node::Dir { entries, .. } => Ok(entries),
            _ => Err(ENOTDIR),
        }
    }

    fn entries_mut(&mut self, id: Id) -> &mut BTreeMap<Vec<u8>, Id> {
        match &mut self.node_mut(id).node {
            Node::Dir { entries, .. } => entries,
            _ => panic!("model: {id} is not a directory"),
        }
    }

    fn parent_of(&self, id: Id) -> Id {
        match &self.node(id).node {
            Node::Dir { parent, .. } => *parent,
            _ => panic!("model: {id} is not a directory"),
        }
    }

    fn set_parent(&mut self, id: Id, to: Id) {
        if let Node::Dir { parent, .. } = &mut self.node_mut(id).node {
            *parent = to;
        }
    }

    /// Subdirectory count + 2 for directories, the link count otherwise.
    fn nlink(&self, id: Id) -> u32 {
        match &self.node(id).node {
            Node::Dir { entries, .. } => {
                2 + entries.values().filter(|c| self.node(**c).is_dir()).count() as u32
            }
            _ => self.node(id).nlink,
        }
    }

    fn walk(&self, comps: &[u8]) -> Result<Id, i32> {
        let mut id = ROOT;
        for c in comps {
            id = *self
                .entries(id)?
                .get(NAMES[usize::from(*c)])
                .ok_or(ENOENT)?;
        }
        Ok(id)
    }

    fn lookup(&self, dir: Id, name: &[u8]) -> Result<Option<Id>, i32> {
        Ok(self.entries(dir)?.get(name).copied())
    }

    fn alloc(&mut self, node: Node) -> Id {
        let id = self.next;
        self.next += 1;
        self.inodes.insert(id, MInode::new(node));
        id
    }

    /// Drops one link of a non-directory, or the only one of a directory.
    fn drop_link(&mut self, id: Id) {
        let inode = self.node_mut(id);
        if inode.is_dir() {
            inode.nlink = 0;
        } else {
            inode.nlink -= 1;
        }
        if inode.nlink == 0 && !self.handles.contains(&id) {
            self.inodes.remove(&id);
        }
    }

    fn handle(&self, h: u8) -> Option<Id> {
        (!self.handles.is_empty()).then(|| self.handles[usize::from(h) % self.handles.len()])
    }

    /// Every handle goes away (the file system was reopened): orphans are freed.
    fn drop_handles(&mut self) {
        for id in std::mem::take(&mut self.handles) {
            if self.inodes.get(&id).is_some_and(|i| i.nlink == 0) {
                self.inodes.remove(&id);
            }
        }
    }

    /// Whether directory `ancestor` is `id` or above it.
    fn is_ancestor(&self, ancestor: Id, mut id: Id) -> bool {
        loop {
            if id == ancestor {
                return true;
            }
            if id == ROOT {
                return false;
            }
            id = self.parent_of(id);
        }
    }

    /// Resolves an inode target for data operations: Skip for symlinks.
    fn data_target(&self, t: &T) -> Result<Option<Id>, i32> {
        let id = match t {
            T::Path(p) => self.walk(&p.0)?,
            T::Handle(h) => match self.handle(*h) {
                Some(id) => id,
                None => return Ok(None),
            },
        };
        match &self.node(id).node {
            Node::Symlink(_) => Ok(None),
            Node::Dir { .. } => Err(EISDIR),
            Node::File(_) => Ok(Some(id)),
        }
    }

    fn file_mut(&mut self, id: Id) -> (&mut Vec<u8>, &mut BTreeSet<u64>) {
        let inode = self.node_mut(id);
        match &mut inode.node {
            Node::File(data) => (data, &mut inode.blocks),
            _ => panic!("model: {id} is not a file"),
        }
    }

    fn new_entry(&mut self, p: &P, node: Node) -> Result<Effect, i32> {
        let parent = self.walk(p.parent())?;
        if self.lookup(parent, p.name())?.is_some() {
            return Err(EEXIST);
        }
        let is_dir = matches!(node, Node::Dir { .. });
        let blocks = match &node {
            Node::Symlink(target) => blocks_for(target.len() as u64),
            _ => 0,
        };
        let id = self.alloc(node);
        if is_dir {
            self.set_parent(id, parent);
        }
        self.node_mut(id).blocks.extend(0..blocks);
        self.entries_mut(parent).insert(p.name().to_vec(), id);
        Ok(Effect::New(id))
    }

    fn apply(&mut self, op: &Op) -> Result<Effect, i32> {
        match op {
            Op::Create(p) => self.new_entry(p, Node::File(Vec::new())),
            Op::Mkdir(p) => self.new_entry(
                p,
                Node::Dir {
                    entries: BTreeMap::new(),
                    parent: 0,
                },
            ),
            Op::Symlink(p, t) => {
                let target = symlink_target(*t);
                self.walk(p.parent())?;
                if target.len() > BLOCK_SIZE {
                    return Err(ENAMETOOLONG);
                }
                self.new_entry(p, Node::Symlink(target))
            }
            Op::Write {
                path,
                offset,
                len,
                seed,
            } => {
                let Some(id) = self.data_target(path)? else {
                    return Ok(Effect::Skip);
                };
                if *len == 0 {
                    return Ok(Effect::Wrote(0));
                }
                let data = pattern(*len, *seed);
                let (content, blocks) = self.file_mut(id);
                let start = *offset as usize;
                let end = start + len;
                if content.len() < end {
                    content.resize(end, 0);
                }
                content[start..end].copy_from_slice(&data);
                blocks.extend(offset / BS..blocks_for(end as u64));
                Ok(Effect::Wrote(*len))
            }
            Op::Scatter {
                path,
                start,
                count,
                seed,
            } => {
                let Some(id) = self.data_target(path)? else {
                    return Ok(Effect::Skip);
                };
                let (content, blocks) = self.file_mut(id);
                for i in 0..*count {
                    let block = start + 2 * i;
                    let data = pattern(BLOCK_SIZE, seed.wrapping_add(i as u8));
                    let at = (block * BS) as usize;
                    if content.len() < at + BLOCK_SIZE {
                        content.resize(at + BLOCK_SIZE, 0);
                    }
                    content[at..at + BLOCK_SIZE].copy_from_slice(&data);
                    blocks.insert(block);
                }
                Ok(Effect::Unit)
            }
            Op::Truncate(p, size) => {
                let Some(id) = self.data_target(p)? else {
                    return Ok(Effect::Skip);
                };
                let (content, blocks) = self.file_mut(id);
                if (*size as usize) < content.len() {
                    content.truncate(*size as usize);
                    blocks.retain(|b| *b < blocks_for(*size));
                } else {
                    content.resize(*size as usize, 0);
                }
                Ok(Effect::Unit)
            }
            Op::Fallocate {
                path,
                offset,
                len,
                mode,
            } => {
                let Some(id) = self.data_target(path)? else {
                    return Ok(Effect::Skip);
                };
                if *len == 0 {
                    return Err(EINVAL);
                }
                let end = offset + len;
                let (content, blocks) = self.file_mut(id);
                match mode {
                    Falloc::Plain | Falloc::KeepSize => {
                        blocks.extend(offset / BS..blocks_for(end));
                        if *mode == Falloc::Plain && end as usize > content.len() {
                            content.resize(end as usize, 0);
                        }
                    }
                    Falloc::Punch => {
                        // Only the part inside the file is punched.
                        let end = end.min((content.len() as u64).max(*offset));
                        if end > *offset {
                            content[*offset as usize..end as usize].fill(0);
                            let first = offset.div_ceil(BS);
                            let last = end / BS;
                            blocks.retain(|b| *b < first || *b >= last);
                        }
                    }
                }
                Ok(Effect::Unit)
            }
            Op::Unlink(p) => {
                let parent = self.walk(p.parent())?;
                let id = self.lookup(parent, p.name())?.ok_or(ENOENT)?;
                if self.node(id).is_dir() {
                    return Err(EISDIR);
                }
                self.entries_mut(parent).remove(p.name());
                self.drop_link(id);
                Ok(Effect::Unit)
            }
            Op::Rmdir(p) => {
                let parent = self.walk(p.parent())?;
                let id = self.lookup(parent, p.name())?.ok_or(ENOENT)?;
                if !self.node(id).is_dir() {
                    return Err(ENOTDIR);
                }
                if !self.entries(id)?.is_empty() {
                    return Err(ENOTEMPTY);
                }
                self.entries_mut(parent).remove(p.name());
                self.drop_link(id);
                Ok(Effect::Unit)
            }
            Op::Rename(from, to, mode) => self.rename(from, to, *mode),
            Op::Link(from, to) => {
                let id = self.walk(&from.0)?;
                let parent = self.walk(to.parent())?;
                if self.node(id).is_dir() {
                    return Err(EPERM);
                }
                if self.lookup(parent, to.name())?.is_some() {
                    return Err(EEXIST);
                }
                self.entries_mut(parent).insert(to.name().to_vec(), id);
                self.node_mut(id).nlink += 1;
                Ok(Effect::Linked(id))
            }
            Op::SetXattr {
                path,
                name,
                len,
                seed,
                mode,
            } => {
                let id = self.walk(&path.0)?;
                let name = XATTR_NAMES[usize::from(*name)];
                if name.len() + len > XATTR_MAX_TOTAL {
                    return Err(E2BIG);
                }
                let xattrs = &mut self.node_mut(id).xattrs;
                match (xattrs.contains_key(name), mode) {
                    (true, XMode::Create) => return Err(EEXIST),
                    (false, XMode::Replace) => return Err(ENODATA),
                    _ => {}
                }
                xattrs.insert(name.to_vec(), pattern(*len, *seed));
                Ok(Effect::Unit)
            }
            Op::RemoveXattr(path, name) => {
                let id = self.walk(&path.0)?;
                let name = XATTR_NAMES[usize::from(*name)];
                self.node_mut(id)
                    .xattrs
                    .remove(name)
                    .map(|_| Effect::Unit)
                    .ok_or(ENODATA)
            }
            Op::Fsync(p) => self.walk(&p.0).map(|_| Effect::Unit),
            Op::Open(p) => {
                let id = self.walk(&p.0)?;
                if self.node(id).is_dir() {
                    return Err(EISDIR);
                }
                if self.handles.len() >= MAX_HANDLES {
                    return Ok(Effect::Skip);
                }
                self.handles.push(id);
                Ok(Effect::Unit)
            }
            Op::Close(h) => {
                if self.handles.is_empty() {
                    return Ok(Effect::Skip);
                }
                let id = self.handles.remove(usize::from(*h) % self.handles.len());
                if self.node(id).nlink == 0 && !self.handles.contains(&id) {
                    self.inodes.remove(&id);
                }
                Ok(Effect::Unit)
            }
            Op::LinkHandle(h, to) => {
                let Some(id) = self.handle(*h) else {
                    return Ok(Effect::Skip);
                };
                let parent = self.walk(to.parent())?;
                if self.node(id).nlink == 0 {
                    return Err(ENOENT);
                }
                if self.lookup(parent, to.name())?.is_some() {
                    return Err(EEXIST);
                }
                self.entries_mut(parent).insert(to.name().to_vec(), id);
                self.node_mut(id).nlink += 1;
                Ok(Effect::Linked(id))
            }
            Op::Reopen | Op::CrashReopen => {
                self.drop_handles();
                Ok(Effect::Unit)
            }
            Op::Sync | Op::Checkpoint => Ok(Effect::Unit),
        }
    }

    /// rename(2) / renameat2(2). Where several errors apply the order is Linux's
    /// (do_renameat2): ENOTDIR/ENOENT of the source, ENOTDIR of the target's directory,
    /// EEXIST (NOREPLACE) / ENOENT (EXCHANGE), then EINVAL for a directory moved below
    /// itself.
    fn rename(&mut self, from: &P, to: &P, mode: RenameMode) -> Result<Effect, i32> {
        let sp = self.walk(from.parent())?;
        let dp = self.walk(to.parent())?;
        let (sname, dname) = (from.name(), to.name());
        let source = self.lookup(sp, sname)?.ok_or(ENOENT)?;
        let target = self.lookup(dp, dname)?;
        match (mode, target) {
            (RenameMode::Exchange, None) => return Err(ENOENT),
            (RenameMode::NoReplace, Some(_)) => return Err(EEXIST),
            _ => {}
        }
        let source_dir = self.node(source).is_dir();
        if source_dir && sp != dp && self.is_ancestor(source, dp) {
            return Err(EINVAL);
        }
        match (mode, target) {
            (RenameMode::Exchange, None) | (RenameMode::NoReplace, Some(_)) => {
                unreachable!("refused above")
            }
            (RenameMode::Exchange, Some(target)) => {
                if self.node(target).is_dir() && sp != dp && self.is_ancestor(target, sp) {
                    return Err(EINVAL);
                }
                self.entries_mut(sp).insert(sname.to_vec(), target);
                self.entries_mut(dp).insert(dname.to_vec(), source);
                if self.node(source).is_dir() {
                    self.set_parent(source, dp);
                }
                if self.node(target).is_dir() {
                    self.set_parent(target, sp);
                }
                Ok(Effect::Unit)
            }
            (_, Some(target)) => {
                if target == source {
                    return Ok(Effect::Unit);
                }
                match (source_dir, self.node(target).is_dir()) {
                    (true, false) => return Err(ENOTDIR),
                    (false, true) => return Err(EISDIR),
                    (true, true) if !self.entries(target)?.is_empty() => return Err(ENOTEMPTY),
                    _ => {}
                }
                self.entries_mut(sp).remove(sname);
                self.entries_mut(dp).insert(dname.to_vec(), source);
                self.drop_link(target);
                if source_dir {
                    self.set_parent(source, dp);
                }
                Ok(Effect::Unit)
            }
            (_, None) => {
                self.entries_mut(sp).remove(sname);
                self.entries_mut(dp).insert(dname.to_vec(), source);
                if source_dir {
                    self.set_parent(source, dp);
                }
                Ok(Effect::Unit)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The system under test
// ---------------------------------------------------------------------------------------

/// A MemDevice that can be detached, so a file system "crashed" with `mem::forget` keeps
/// only this small wrapper alive rather than the whole image.
#[derive(Debug)]
struct Disk {
    mem: Mutex<Option<Arc<MemDevice>>>,
    size: u64,
}

impl Disk {
    fn new(mem: MemDevice) -> Arc<Self> {
        let size = mem.size();
        Arc::new(Self {
            mem: Mutex::new(Some(Arc::new(mem))),
            size,
        })
    }
    fn mem(&self) -> io::Result<Arc<MemDevice>> {
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| io::Error::other("device detached (crashed)"))
    }
    fn detach(&self) {
        *self.mem.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl BlockDevice for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem()?.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.mem()?.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.mem()?.sync()
    }
    fn size(&self) -> u64 {
        self.size
    }
}

struct Sut {
    disk: Arc<Disk>,
    fs: Option<Fs>,
    options: OpenOptions,
    /// Inodes retained, in the order of the model's handles.
    handles: Vec<u64>,
}

fn fs_walk(fs: &Fs, comps: &[u8]) -> Result<u64, Error> {
    let mut ino = ROOT_INO;
    for c in comps {
        ino = fs.lookup(ino, NAMES[usize::from(*c)])?.ino;
    }
    Ok(ino)
}

impl Sut {
    fn new(small_cache: bool, small_journal: bool) -> Result<Self, String> {
        let disk = Disk::new(MemDevice::new(DEVICE_BYTES));
        let format_options = FormatOptions {
            journal_blocks: small_journal.then_some(libfs::mkfs::MIN_JOURNAL_BLOCKS),
            ..FormatOptions::default()
        };
        format(disk.clone(), &format_options).map_err(|e| format!("format: {e}"))?;
        let options = if small_cache {
            OpenOptions {
                cache_bytes: 64 << 10,
                inode_cache: 4,
                ..OpenOptions::default()
            }
        } else {
            OpenOptions::default()
        };
        let fs = Fs::open_device(disk.clone(), &options).map_err(|e| format!("open: {e}"))?;
        Ok(Self {
            disk,
            fs: Some(fs),
            options,
            handles: Vec::new(),
        })
    }

    fn fs(&self) -> &Fs {
        self.fs.as_ref().expect("file system is open")
    }

    fn reopen(&mut self) -> Result<(), String> {
        self.handles.clear();
        let fs = self.fs.take().expect("file system is open");
        fs.close().map_err(|e| format!("close: {e}"))?;
        self.fs = Some(
            Fs::open_device(self.disk.clone(), &self.options)
                .map_err(|e| format!("reopen: {e}"))?,
        );
        Ok(())
    }

    /// Sync, copy the image, abandon the file system without closing it, and recover
    /// from the copy.
    fn crash_reopen(&mut self) -> Result<(), String> {
        self.handles.clear();
        let fs = self.fs.take().expect("file system is open");
        fs.sync().map_err(|e| format!("sync before crash: {e}"))?;
        let image = self.disk.mem().map_err(|e| e.to_string())?.snapshot();
        self.disk.detach();
        std::mem::forget(fs);
        self.disk = Disk::new(MemDevice::from_bytes(image));
        // The crashed image is consistent as it is (fsck replays the journal in memory).
        fsck(self.disk.clone(), "of the crashed image")?;
        self.fs = Some(
            Fs::open_device(self.disk.clone(), &self.options)
                .map_err(|e| format!("recovery open: {e}"))?,
        );
        Ok(())
    }

    fn handle(&self, h: u8) -> Option<u64> {
        (!self.handles.is_empty()).then(|| self.handles[usize::from(h) % self.handles.len()])
    }

    fn data_target(&self, t: &T) -> Result<Option<u64>, Error> {
        let ino = match t {
            T::Path(p) => fs_walk(self.fs(), &p.0)?,
            T::Handle(h) => match self.handle(*h) {
                Some(ino) => ino,
                None => return Ok(None),
            },
        };
        Ok((!self.fs().getattr(ino)?.is_symlink()).then_some(ino))
    }

    fn apply(&mut self, op: &Op) -> Result<Effect, Error> {
        let fs = self.fs.as_ref().expect("file system is open");
        match op {
            Op::Create(p) => {
                let parent = fs_walk(fs, p.parent())?;
                Ok(Effect::New(fs.create(parent, p.name(), 0o644, 0, 0)?.ino))
            }
            Op::Mkdir(p) => {
                let parent = fs_walk(fs, p.parent())?;
                Ok(Effect::New(fs.mkdir(parent, p.name(), 0o755, 0, 0)?.ino))
            }
            Op::Symlink(p, t) => {
                let parent = fs_walk(fs, p.parent())?;
                let target = symlink_target(*t);
                Ok(Effect::New(
                    fs.symlink(parent, p.name(), &target, 0, 0)?.ino,
                ))
            }
            Op::Write {
                path,
                offset,
                len,
                seed,
            } => {
                let Some(ino) = self.data_target(path)? else {
                    return Ok(Effect::Skip);
                };
                Ok(Effect::Wrote(fs.write_at(
                    ino,
                    *offset,
                    &pattern(*len, *seed),
                )?))
            }
            Op::Scatter {
                path,
                start,
                count,
                seed,
            } => {
                let Some(ino) = self.data_target(path)? else {
                    return Ok(Effect::Skip);
                };
                for i in 0..*count {
                    let data = pattern(BLOCK_SIZE, seed.wrapping_add(i as u8));
                    let n = fs.write_at(ino, (start + 2 * i) * BS, &data)?;
                    if n != BLOCK_SIZE {
                        return Err(Error::Invalid(format!("TEST: scatter wrote {n} bytes")));
                    }
                }
                Ok(Effect::Unit)
            }
            Op::Truncate(p, size) => {
                let Some(ino) = self.data_target(p)? else {
                    return Ok(Effect::Skip);
                };
                let attr = fs.setattr(
                    ino,
                    &SetAttr {
                        size: Some(*size),
                        ..SetAttr::default()
                    },
                )?;
                if attr.size != *size {
                    return Err(Error::Invalid(format!(
                        "TEST: setattr returned size {} for {size}",
                        attr.size
                    )));
                }
                Ok(Effect::Unit)
            }
            Op::Fallocate {
                path,
                offset,
                len,
                mode,
            } => {
                let Some(ino) = self.data_target(path)? else {
                    return Ok(Effect::Skip);
                };
                let mode = FallocateMode {
                    keep_size: *mode != Falloc::Plain,
                    punch_hole: *mode == Falloc::Punch,
                };
                fs.fallocate(ino, *offset, *len, mode)?;
                Ok(Effect::Unit)
            }
            Op::Unlink(p) => {
                let parent = fs_walk(fs, p.parent())?;
                fs.unlink(parent, p.name())?;
                Ok(Effect::Unit)
            }
            Op::Rmdir(p) => {
                let parent = fs_walk(fs, p.parent())?;
                fs.rmdir(parent, p.name())?;
                Ok(Effect::Unit)
            }
            Op::Rename(from, to, mode) => {
                let sp = fs_walk(fs, from.parent())?;
                let dp = fs_walk(fs, to.parent())?;
                fs.rename(sp, from.name(), dp, to.name(), *mode)?;
                Ok(Effect::Unit)
            }
            Op::Link(from, to) => {
                let ino = fs_walk(fs, &from.0)?;
                let parent = fs_walk(fs, to.parent())?;
                Ok(Effect::Linked(fs.link(ino, parent, to.name())?.ino))
            }
            Op::SetXattr {
                path,
                name,
                len,
                seed,
                mode,
            } => {
                let ino = fs_walk(fs, &path.0)?;
                let mode = match mode {
                    XMode::Any => XattrMode::Any,
                    XMode::Create => XattrMode::Create,
                    XMode::Replace => XattrMode::Replace,
                };
                fs.setxattr(
                    ino,
                    XATTR_NAMES[usize::from(*name)],
                    &pattern(*len, *seed),
                    mode,
                )?;
                Ok(Effect::Unit)
            }
            Op::RemoveXattr(path, name) => {
                let ino = fs_walk(fs, &path.0)?;
                fs.removexattr(ino, XATTR_NAMES[usize::from(*name)])?;
                Ok(Effect::Unit)
            }
            Op::Fsync(p) => {
                let ino = fs_walk(fs, &p.0)?;
                fs.fsync(ino)?;
                Ok(Effect::Unit)
            }
            Op::Open(p) => {
                let attr = fs.getattr(fs_walk(fs, &p.0)?)?;
                if attr.is_dir() {
                    return Err(Error::IsDir);
                }
                if self.handles.len() >= MAX_HANDLES {
                    return Ok(Effect::Skip);
                }
                fs.retain(attr.ino)?;
                self.handles.push(attr.ino);
                Ok(Effect::Unit)
            }
            Op::Close(h) => {
                if self.handles.is_empty() {
                    return Ok(Effect::Skip);
                }
                let ino = self.handles.remove(usize::from(*h) % self.handles.len());
                fs.release(ino)?;
                Ok(Effect::Unit)
            }
            Op::LinkHandle(h, to) => {
                let Some(ino) = self.handle(*h) else {
                    return Ok(Effect::Skip);
                };
                let parent = fs_walk(fs, to.parent())?;
                Ok(Effect::Linked(fs.link(ino, parent, to.name())?.ino))
            }
            Op::Sync => fs.sync().map(|_| Effect::Unit),
            Op::Checkpoint => fs.checkpoint().map(|_| Effect::Unit),
            Op::Reopen => self
                .reopen()
                .map(|_| Effect::Unit)
                .map_err(|e| Error::Invalid(format!("TEST: {e}"))),
            Op::CrashReopen => self
                .crash_reopen()
                .map(|_| Effect::Unit)
                .map_err(|e| Error::Invalid(format!("TEST: {e}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

struct Checker {
    model: Model,
    sut: Sut,
    /// Model inode -> libfs inode number, for live inodes.
    inos: BTreeMap<Id, u64>,
}

impl Checker {
    fn new(small_cache: bool, small_journal: bool) -> Result<Self, String> {
        Ok(Self {
            model: Model::new(),
            sut: Sut::new(small_cache, small_journal)?,
            inos: BTreeMap::from([(ROOT, ROOT_INO)]),
        })
    }

    fn step(&mut self, index: usize, op: &Op) -> Result<(), String> {
        let expected = self.model.apply(op);
        let got = self.sut.apply(op);
        record(op, &expected);
        match (&expected, &got) {
            (Ok(e), Ok(g)) => self.compare_effects(*e, *g)?,
            (Err(e), Err(g)) if *e == g.errno() => {}
            _ => {
                return Err(format!(
                    "op #{index} {op:?}: model says {:?}, libfs says {:?}",
                    expected.map_err(errno_name),
                    got.map_err(|e| format!("{} ({e})", errno_name(e.errno())))
                ))
            }
        }
        self.forget_freed()?;
        if let (
            Op::Write {
                path, offset, len, ..
            },
            Ok(Effect::Wrote(_)),
        ) = (op, &got)
        {
            self.check_window(path, *offset, *len)
                .map_err(|e| format!("after op #{index} {op:?}: {e}"))?;
        }
        let full =
            index % 8 == 7 || index == usize::MAX || matches!(op, Op::Reopen | Op::CrashReopen);
        self.check_state(full)
            .map_err(|e| format!("after op #{index} {op:?}: {e}"))
    }

    fn compare_effects(&mut self, expected: Effect, got: Effect) -> Result<(), String> {
        match (expected, got) {
            (Effect::New(id), Effect::New(ino)) => {
                if let Some((other, _)) = self.inos.iter().find(|(_, i)| **i == ino) {
                    return Err(format!(
                        "new inode {ino} is still in use by model inode {other}"
                    ));
                }
                self.inos.insert(id, ino);
                Ok(())
            }
            (Effect::Linked(id), Effect::Linked(ino)) => {
                ensure!(
                    self.inos.get(&id) == Some(&ino),
                    "link returned inode {ino}, expected {:?}",
                    self.inos.get(&id)
                );
                Ok(())
            }
            (e, g) if e == g => Ok(()),
            (e, g) => Err(format!("model effect {e:?}, libfs effect {g:?}")),
        }
    }

    /// Inodes the model freed must be gone in libfs too.
    fn forget_freed(&mut self) -> Result<(), String> {
        let freed: Vec<(Id, u64)> = self
            .inos
            .iter()
            .filter(|(id, _)| !self.model.inodes.contains_key(id))
            .map(|(id, ino)| (*id, *ino))
            .collect();
        for (id, ino) in freed {
            match self.sut.fs().getattr(ino) {
                Err(Error::NotFound) => {}
                other => {
                    return Err(format!(
                        "inode {ino} (model {id}) lost its last link but getattr gives {other:?}"
                    ))
                }
            }
            self.inos.remove(&id);
        }
        Ok(())
    }

    fn check_window(&self, target: &T, offset: u64, len: usize) -> Result<(), String> {
        let Ok(Some(id)) = self.model.data_target(target) else {
            return Ok(());
        };
        let Node::File(content) = &self.model.node(id).node else {
            return Ok(());
        };
        let ino = self.inos[&id];
        let start = offset.saturating_sub(100);
        let end = (offset + len as u64 + 100).min(content.len() as u64);
        if end <= start {
            return Ok(());
        }
        let mut buf = vec![0xa5u8; (end - start) as usize];
        let n = self
            .sut
            .fs()
            .read_at(ino, start, &mut buf)
            .map_err(|e| format!("read_at: {e}"))?;
        ensure!(n == buf.len(), "read {n} bytes of {}", buf.len());
        if let Some(at) = (0..buf.len()).find(|i| buf[*i] != content[start as usize + i]) {
            return Err(format!(
                "inode {ino}: byte {} is {:#x}, expected {:#x}",
                start as usize + at,
                buf[at],
                content[start as usize + at]
            ));
        }
        Ok(())
    }

    /// Compares the whole tree; file contents too when `contents`.
    fn check_state(&self, contents: bool) -> Result<(), String> {
        let fs = self.sut.fs();
        let model = &self.model;
        let mut seen = BTreeSet::new();
        let mut dirs = vec![(ROOT, "/".to_string())];
        let mut physical: Vec<(u64, u64, u64)> = Vec::new();
        let statfs = fs.statfs().map_err(|e| format!("statfs: {e}"))?;
        while let Some((id, path)) = dirs.pop() {
            let ino = self.inos[&id];
            let mut listing = Vec::new();
            fs.readdir(ino, 0, |entry| {
                listing.push(entry);
                true
            })
            .map_err(|e| format!("readdir {path}: {e}"))?;
            ensure!(
                listing.len() >= 2 && listing[0].name == b"." && listing[1].name == b"..",
                "readdir {path}: does not start with . and .."
            );
            ensure!(listing[0].ino == ino, "{path}: . is {}", listing[0].ino);
            let parent_ino = self.inos[&model.parent_of(id)];
            ensure!(
                listing[1].ino == parent_ino,
                "{path}: .. is {}, expected {parent_ino}",
                listing[1].ino
            );
            let entries = model.entries(id).map_err(errno_name)?;
            let mut got = BTreeMap::new();
            for entry in &listing[2..] {
                let name = String::from_utf8_lossy(&entry.name).to_string();
                ensure!(
                    got.insert(entry.name.clone(), (entry.ino, entry.kind))
                        .is_none(),
                    "readdir {path}: {name} listed twice"
                );
            }
            let want: Vec<&Vec<u8>> = entries.keys().collect();
            let have: Vec<&Vec<u8>> = got.keys().collect();
            ensure!(
                want == have,
                "readdir {path}: names {:?}, expected {:?}",
                lossy(&have),
                lossy(&want)
            );
            for (name, child) in entries {
                let child_path = format!("{path}{}", String::from_utf8_lossy(name));
                let (entry_ino, kind) = got[name];
                let want_ino = *self
                    .inos
                    .get(child)
                    .ok_or_else(|| format!("{child_path}: model inode {child} has no number"))?;
                ensure!(
                    entry_ino == want_ino,
                    "{child_path}: entry points at inode {entry_ino}, expected {want_ino}"
                );
                let inode = model.node(*child);
                ensure!(
                    kind == inode.kind(),
                    "{child_path}: entry type {kind:o}, expected {:o}",
                    inode.kind()
                );
                let attr = fs
                    .lookup(ino, name)
                    .map_err(|e| format!("lookup {child_path}: {e}"))?;
                ensure!(
                    attr.ino == want_ino,
                    "lookup {child_path}: inode {}",
                    attr.ino
                );
                if inode.is_dir() {
                    dirs.push((*child, format!("{child_path}/")));
                }
                if seen.insert(*child) {
                    self.check_inode(*child, &child_path, contents, &mut physical)?;
                }
            }
        }
        self.check_inode(ROOT, "/", contents, &mut physical)?;
        seen.insert(ROOT);
        // Unlinked inodes kept alive by an open handle.
        for id in &model.handles {
            if model.node(*id).nlink == 0 && seen.insert(*id) {
                self.check_inode(*id, &format!("(orphan {id})"), contents, &mut physical)?;
            }
        }
        ensure!(
            seen.len() == model.inodes.len(),
            "model has {} inodes but {} are reachable",
            model.inodes.len(),
            seen.len()
        );
        let used_inodes = statfs.total_inodes - statfs.free_inodes;
        ensure!(
            used_inodes == seen.len() as u64,
            "statfs: {used_inodes} inodes in use, expected {}",
            seen.len()
        );
        physical.sort_unstable();
        for pair in physical.windows(2) {
            ensure!(
                pair[0].0 + pair[0].1 <= pair[1].0,
                "device blocks {}+{} (inode {}) and {}+{} (inode {}) overlap",
                pair[0].0,
                pair[0].1,
                pair[0].2,
                pair[1].0,
                pair[1].1,
                pair[1].2
            );
        }
        if let Some(last) = physical.last() {
            ensure!(
                last.0 + last.1 <= statfs.total_blocks,
                "extent past the device end"
            );
        }
        let mapped: u64 = physical.iter().map(|p| p.1).sum();
        ensure!(
            statfs.free_blocks + mapped <= statfs.total_blocks,
            "statfs: {} free blocks + {mapped} mapped > {} total",
            statfs.free_blocks,
            statfs.total_blocks
        );
        Ok(())
    }

    fn check_inode(
        &self,
        id: Id,
        path: &str,
        contents: bool,
        physical: &mut Vec<(u64, u64, u64)>,
    ) -> Result<(), String> {
        let fs = self.sut.fs();
        let inode = self.model.node(id);
        let ino = self.inos[&id];
        let attr = fs
            .getattr(ino)
            .map_err(|e| format!("getattr {path} ({ino}): {e}"))?;
        ensure!(
            attr.mode & S_IFMT == inode.kind(),
            "{path}: mode {:o}",
            attr.mode
        );
        let nlink = self.model.nlink(id);
        ensure!(
            attr.nlink == nlink,
            "{path}: nlink {}, expected {nlink}",
            attr.nlink
        );
        let size = match &inode.node {
            Node::File(data) => data.len() as u64,
            Node::Dir { entries, .. } => entries.len() as u64,
            Node::Symlink(target) => target.len() as u64,
        };
        ensure!(
            attr.size == size,
            "{path}: size {}, expected {size}",
            attr.size
        );
        if !inode.is_dir() {
            ensure!(
                attr.blocks == inode.blocks.len() as u64,
                "{path}: {} blocks, expected {}",
                attr.blocks,
                inode.blocks.len()
            );
            let extents = fs
                .extents(ino)
                .map_err(|e| format!("extents {path}: {e}"))?;
            let mut mapped = BTreeSet::new();
            let mut previous_end = 0;
            for e in &extents {
                ensure!(
                    e.length > 0 && e.logical >= previous_end,
                    "{path}: extents unsorted, overlapping or empty: {extents:?}"
                );
                previous_end = e.logical + e.length;
                mapped.extend(e.logical..e.logical + e.length);
                physical.push((e.physical, e.length, ino));
            }
            ensure!(
                mapped == inode.blocks,
                "{path}: mapped blocks {:?}, expected {:?}",
                ranges(&mapped),
                ranges(&inode.blocks)
            );
        }
        match &inode.node {
            Node::File(data) if contents => {
                let mut buf = vec![0xa5u8; data.len() + 10];
                let n = fs
                    .read_at(ino, 0, &mut buf)
                    .map_err(|e| format!("read {path}: {e}"))?;
                ensure!(n == data.len(), "{path}: read {n} bytes of {}", data.len());
                if let Some(at) = (0..n).find(|i| buf[*i] != data[*i]) {
                    return Err(format!(
                        "{path}: byte {at} is {:#x}, expected {:#x}",
                        buf[at], data[at]
                    ));
                }
                let n = fs
                    .read_at(ino, data.len() as u64, &mut buf[..10])
                    .map_err(|e| format!("read {path} at end: {e}"))?;
                ensure!(n == 0, "{path}: read at end of file gives {n} bytes");
            }
            Node::Symlink(target) => {
                let got = fs
                    .readlink(ino)
                    .map_err(|e| format!("readlink {path}: {e}"))?;
                ensure!(got == *target, "{path}: symlink target differs");
            }
            _ => {}
        }
        let mut names = fs
            .listxattr(ino)
            .map_err(|e| format!("listxattr {path}: {e}"))?;
        names.sort();
        let want: Vec<&Vec<u8>> = inode.xattrs.keys().collect();
        ensure!(
            names.iter().collect::<Vec<_>>() == want,
            "{path}: xattrs {:?}, expected {:?}",
            lossy(&names.iter().collect::<Vec<_>>()),
            lossy(&want)
        );
        for (name, value) in &inode.xattrs {
            let got = fs
                .getxattr(ino, name)
                .map_err(|e| format!("getxattr {path}: {e}"))?;
            ensure!(got == *value, "{path}: xattr value differs");
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), String> {
        self.check_state(true)?;
        self.sut.reopen()?;
        self.model.drop_handles();
        self.forget_freed()?;
        self.check_state(true)?;
        let fs = self.sut.fs.take().expect("file system is open");
        fs.close().map_err(|e| format!("close: {e}"))?;
        fsck(self.sut.disk.clone(), "at the end")
    }
}

/// Runs fsck on an image that no file system has open.
fn fsck(device: Arc<Disk>, when: &str) -> Result<(), String> {
    let report = libfs::fsck::check(device).map_err(|e| format!("fsck {when}: {e}"))?;
    ensure!(report.is_clean(), "fsck {when}: {report}");
    Ok(())
}

fn lossy(names: &[&Vec<u8>]) -> Vec<String> {
    names
        .iter()
        .map(|n| String::from_utf8_lossy(n).to_string())
        .collect()
}

/// A block set as ranges, for messages.
fn ranges(blocks: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        match out.last_mut() {
            Some(last) if last.1 == *b => last.1 += 1,
            _ => out.push((*b, b + 1)),
        }
    }
    out
}

fn errno_name(errno: i32) -> String {
    let name = match errno {
        ENOENT => "ENOENT",
        EEXIST => "EEXIST",
        ENOTDIR => "ENOTDIR",
        EISDIR => "EISDIR",
        ENOTEMPTY => "ENOTEMPTY",
        EINVAL => "EINVAL",
        EPERM => "EPERM",
        ENODATA => "ENODATA",
        E2BIG => "E2BIG",
        ENAMETOOLONG => "ENAMETOOLONG",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// Outcome counts per operation kind, printed with MODEL_STATS=1 (to see what the
/// generated sequences exercise).
static STATS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

fn record(op: &Op, outcome: &Result<Effect, i32>) {
    if std::env::var_os("MODEL_STATS").is_none() {
        return;
    }
    let kind = format!("{op:?}");
    let kind = kind.split(['(', ' ']).next().unwrap_or("?");
    let outcome = match outcome {
        Ok(Effect::Skip) => "skip".to_string(),
        Ok(_) => "ok".to_string(),
        Err(e) => errno_name(*e),
    };
    *STATS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(format!("{kind:12} {outcome}"))
        .or_default() += 1;
}

fn print_stats() {
    if std::env::var_os("MODEL_STATS").is_some() {
        for (key, count) in STATS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            eprintln!("{key:30} {count}");
        }
    }
}

fn run(case: &Case) -> Result<(), String> {
    let mut checker = Checker::new(case.small_cache, case.small_journal)?;
    if case.prologue {
        for op in prologue() {
            checker
                .step(usize::MAX, &op)
                .map_err(|e| format!("prologue: {e}"))?;
        }
    }
    for (index, op) in case.ops.iter().enumerate() {
        checker.step(index, op)?;
    }
    checker.finish()
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        // Failures are reported as a shrunk sequence; no regression file is written
        // next to the sources.
        failure_persistence: None,
        max_shrink_iters: 4096,
        max_shrink_time: 180_000,
        ..ProptestConfig::default()
    }
}

/// Removes operations while the case still fails (chunks of halving size, to a fixpoint),
/// after proptest's own shrinking: a sequence shrunk by proptest keeps operations that
/// merely shrank into harmless ones.
fn minimize(case: &Case) -> (Case, String) {
    let mut best = case.clone();
    let mut message = match run(&best) {
        Err(message) => message,
        Ok(()) => return (best, "(the failure did not reproduce)".into()),
    };
    let attempt = |candidate: Case, best: &mut Case, message: &mut String| -> bool {
        match run(&candidate) {
            Err(m) => {
                *best = candidate;
                *message = m;
                true
            }
            Ok(()) => false,
        }
    };
    for flag in 0..3 {
        let mut candidate = best.clone();
        if flag == 0 && candidate.small_cache {
            candidate.small_cache = false;
        } else if flag == 1 && candidate.prologue {
            candidate.prologue = false;
        } else if flag == 2 && candidate.small_journal {
            candidate.small_journal = false;
        } else {
            continue;
        }
        attempt(candidate, &mut best, &mut message);
    }
    let mut chunk = best.ops.len().div_ceil(2).max(1);
    loop {
        let mut index = 0;
        let mut removed = false;
        while index < best.ops.len() {
            let mut candidate = best.clone();
            let end = (index + chunk).min(candidate.ops.len());
            candidate.ops.drain(index..end);
            if attempt(candidate, &mut best, &mut message) {
                removed = true;
            } else {
                index += chunk;
            }
        }
        if chunk == 1 && !removed {
            break;
        }
        if !removed {
            chunk = chunk.div_ceil(2);
        }
    }
    (best, message)
}

fn describe(case: &Case) -> String {
    let mut out = format!(
        "small_cache: {}, small_journal: {}, prologue: {} ({:?})\n",
        case.small_cache,
        case.small_journal,
        case.prologue,
        if case.prologue {
            prologue()
        } else {
            Vec::new()
        }
    );
    for (index, op) in case.ops.iter().enumerate() {
        out.push_str(&format!("  #{index}: {op:?}\n"));
    }
    out
}

#[test]
fn libfs_matches_posix_model() {
    let mut runner = proptest::test_runner::TestRunner::new(config());
    let result = runner.run(&case(), |case| {
        run(&case).map_err(TestCaseError::fail)?;
        Ok(())
    });
    match result {
        Ok(()) => {}
        Err(proptest::test_runner::TestError::Fail(_, case)) => {
            let (minimal, message) = minimize(&case);
            panic!(
                "libfs and the model disagree.\nMinimal sequence ({} ops):\n{}{message}",
                minimal.ops.len(),
                describe(&minimal)
            );
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn zz_print_stats() {
    // Runs after the property when tests are run one at a time (--test-threads=1).
    print_stats();
}

/// The POSIX cases the error mapping promises, spelled out: each operation's expected
/// outcome is asserted for the model and libfs must then agree with the model (state
/// included).
#[test]
fn posix_edge_cases() {
    use RenameMode::{Exchange, NoReplace, Replace};
    let p = |comps: &[u8]| P(comps.to_vec());
    let (a, b, c, d) = (0u8, 1u8, 2u8, 3u8);
    let mut checker = Checker::new(false, false).expect("checker");
    let mut index = 0;
    let mut expect = |op: Op, want: Result<(), i32>| {
        let got = checker.model.clone().apply(&op).map(|_| ());
        assert_eq!(got, want, "model outcome of {op:?}");
        if let Err(message) = checker.step(index, &op) {
            panic!("{message}");
        }
        index += 1;
    };
    expect(Op::Mkdir(p(&[a])), Ok(()));
    expect(Op::Mkdir(p(&[a])), Err(EEXIST));
    expect(Op::Create(p(&[a])), Err(EEXIST));
    expect(Op::Create(p(&[a, c])), Ok(()));
    expect(Op::Create(p(&[d, c])), Err(ENOENT));
    expect(Op::Create(p(&[a, c, d])), Err(ENOTDIR));
    // A rename onto another link of the same inode does nothing.
    expect(Op::Link(p(&[a, c]), p(&[a, d])), Ok(()));
    expect(Op::Rename(p(&[a, c]), p(&[a, d]), Replace), Ok(()));
    expect(Op::Link(p(&[a]), p(&[b])), Err(EPERM));
    // A directory cannot move into its own subtree.
    expect(Op::Rename(p(&[a]), p(&[a, b]), Replace), Err(EINVAL));
    expect(Op::Mkdir(p(&[a, b])), Ok(()));
    expect(Op::Mkdir(p(&[a, b, a])), Ok(()));
    expect(Op::Rename(p(&[a]), p(&[a, b, a, c]), Replace), Err(EINVAL));
    expect(Op::Rename(p(&[a]), p(&[a, b, a]), Exchange), Err(EINVAL));
    expect(Op::Rename(p(&[a, b]), p(&[a]), Exchange), Err(EINVAL));
    expect(Op::Rename(p(&[a, b]), p(&[a]), Replace), Err(ENOTEMPTY));
    // Type mismatches and non-empty targets.
    expect(Op::Mkdir(p(&[b])), Ok(()));
    expect(Op::Create(p(&[b, c])), Ok(()));
    expect(Op::Rename(p(&[b]), p(&[a, b]), Replace), Err(ENOTEMPTY));
    expect(Op::Rename(p(&[a, b, a]), p(&[b, c]), Replace), Err(ENOTDIR));
    expect(Op::Rename(p(&[b, c]), p(&[a, b]), Replace), Err(EISDIR));
    expect(Op::Rmdir(p(&[b])), Err(ENOTEMPTY));
    expect(Op::Unlink(p(&[b])), Err(EISDIR));
    expect(Op::Rmdir(p(&[b, c])), Err(ENOTDIR));
    expect(Op::Unlink(p(&[b, d])), Err(ENOENT));
    expect(Op::Rename(p(&[b, d]), p(&[c]), Replace), Err(ENOENT));
    // A directory over an empty directory, across parents.
    expect(Op::Mkdir(p(&[b, a])), Ok(()));
    expect(Op::Rename(p(&[a, b, a]), p(&[b, a]), Replace), Ok(()));
    // NOREPLACE and EXCHANGE.
    expect(Op::Rename(p(&[b]), p(&[d]), NoReplace), Ok(()));
    expect(Op::Rename(p(&[d]), p(&[a]), NoReplace), Err(EEXIST));
    expect(Op::Rename(p(&[d]), p(&[c]), Exchange), Err(ENOENT));
    expect(Op::Rename(p(&[d]), p(&[a]), Exchange), Ok(()));
    // /a = {c: file G, a: dir}, /d = {c, d: links of file F, b: empty dir}.
    expect(Op::Rename(p(&[a, c]), p(&[d, b]), Exchange), Ok(()));
    // A file over a file drops the target's link; the last link frees it.
    expect(Op::Rename(p(&[d, b]), p(&[d, d]), Replace), Ok(()));
    expect(Op::Unlink(p(&[d, c])), Ok(()));
    expect(Op::Rmdir(p(&[a, c])), Ok(()));
    expect(Op::Rmdir(p(&[a, a])), Ok(()));
    expect(Op::Reopen, Ok(()));
    checker.finish().expect("final state");
}
