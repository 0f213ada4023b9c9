//! Crash consistency: random operation sequences on a [`RecordingDevice`], then a
//! simulated power failure after every single write of the trace (and at some points
//! with unsynced writes reordered, dropped or torn), recovery, and checks:
//!
//! - `Fs::open_device` succeeds (journal replay) and fsck finds the image clean;
//! - the recovered namespace, sizes, link counts, symlink targets and xattrs equal the
//!   model's state at some operation boundary at or after the last completed
//!   sync / fsync / checkpoint (metadata commits whole operations atomically);
//! - every byte of every recovered file is a byte that file held at one of those
//!   boundaries (in-place overwrites are not journaled, so old or new bytes may show,
//!   per byte): never the 0xEE the data area held before formatting, never another
//!   file's bytes (every write carries bytes unique to its file and write);
//! - the recovered file system takes new work and reopens clean.
//!
//! Tuning: EXOFS_CRASH_SEQUENCES (default 500) sequences from seed EXOFS_CRASH_FIRST_SEED
//! (default 0); EXOFS_CRASH_SEED runs that one seed only (and prints its operations).

use libfs::crashsim::{Crash, Event, RecordingDevice, Reorder};
use libfs::{
    format, BlockDevice, FallocateMode, FormatOptions, Fs, MemDevice, OpenOptions, RenameMode,
    SetAttr, XattrMode, ROOT_INO,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

const IMAGE_BYTES: u64 = 4 << 20;
const GARBAGE: u8 = 0xEE;
/// Files stay below this size and the model below DATA_BUDGET bytes in all, so that no
/// operation runs out of space (or commits part way to make room).
const MAX_FILE: u64 = 96 * 1024;
const DATA_BUDGET: usize = 1 << 20;
const MAX_NODES: usize = 150;
const BLOCK: u64 = 4096;

fn format_options() -> FormatOptions {
    FormatOptions {
        journal_blocks: Some(64),
        inodes: Some(256),
        ..Default::default()
    }
}

fn open_options() -> OpenOptions {
    OpenOptions {
        read_only: false,
        cache_bytes: 256 << 10,
        inode_cache: 256,
    }
}

/// Runs fsck on an image (the file system must not be open on it).
fn fsck(device: Arc<dyn BlockDevice>) -> Result<(), String> {
    let report = libfs::fsck::check(device).map_err(|e| format!("fsck failed: {e}"))?;
    if report.is_clean() {
        Ok(())
    } else {
        let lines: Vec<String> = report.problems.iter().map(|p| format!("  {p}")).collect();
        Err(format!("fsck found problems:\n{}", lines.join("\n")))
    }
}

// ---------------------------------------------------------------------------------------
// The model

type Id = u32;
const ROOT: Id = 0;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Body {
    File(Arc<Vec<u8>>),
    Dir,
    Symlink(Vec<u8>),
}

#[derive(Clone, Debug)]
struct Node {
    body: Body,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Permission bits and owner.
    perm: u32,
    uid: u32,
}

impl Node {
    fn new(body: Body) -> Self {
        let perm = match body {
            Body::File(_) => 0o644,
            Body::Dir => 0o755,
            Body::Symlink(_) => 0o777,
        };
        Self {
            body,
            xattrs: BTreeMap::new(),
            perm,
            uid: 0,
        }
    }
    fn is_dir(&self) -> bool {
        self.body == Body::Dir
    }
    fn is_file(&self) -> bool {
        matches!(self.body, Body::File(_))
    }
}

/// What the file system should hold after a prefix of the operations.
#[derive(Clone, Debug, Default)]
struct Model {
    nodes: BTreeMap<Id, Node>,
    /// Entries of each directory.
    dirs: BTreeMap<Id, BTreeMap<Vec<u8>, Id>>,
    /// Parent of each directory.
    parent: BTreeMap<Id, Id>,
}

impl Model {
    fn new() -> Self {
        let mut model = Self::default();
        model.nodes.insert(ROOT, Node::new(Body::Dir));
        model.dirs.insert(ROOT, BTreeMap::new());
        model.parent.insert(ROOT, ROOT);
        model
    }

    fn links(&self) -> HashMap<Id, u32> {
        let mut links = HashMap::new();
        for entries in self.dirs.values() {
            for id in entries.values() {
                *links.entry(*id).or_insert(0) += 1;
            }
        }
        links
    }

    fn link_count(&self, id: Id) -> usize {
        self.dirs
            .values()
            .map(|entries| entries.values().filter(|x| **x == id).count())
            .sum()
    }

    fn content(&self, id: Id) -> Option<&Arc<Vec<u8>>> {
        match &self.nodes.get(&id)?.body {
            Body::File(data) => Some(data),
            _ => None,
        }
    }

    fn content_mut(&mut self, id: Id) -> &mut Vec<u8> {
        match self.nodes.get_mut(&id).map(|n| &mut n.body) {
            Some(Body::File(data)) => Arc::make_mut(data),
            _ => panic!("model: {id} is not a file"),
        }
    }

    fn data_bytes(&self) -> usize {
        self.nodes
            .values()
            .map(|n| match &n.body {
                Body::File(d) => d.len(),
                _ => 0,
            })
            .sum()
    }

    /// True if `x` is `dir` or lies below it.
    fn is_within(&self, x: Id, dir: Id) -> bool {
        let mut at = x;
        for _ in 0..=self.nodes.len() {
            if at == dir {
                return true;
            }
            if at == ROOT {
                return false;
            }
            at = self.parent[&at];
        }
        panic!("model: parent loop");
    }
}

// ---------------------------------------------------------------------------------------
// Operations

#[derive(Clone, Debug)]
enum Op {
    Create {
        dir: Id,
        name: Vec<u8>,
    },
    Mkdir {
        dir: Id,
        name: Vec<u8>,
    },
    Symlink {
        dir: Id,
        name: Vec<u8>,
        target: Vec<u8>,
    },
    Write {
        file: Id,
        offset: u64,
        data: Arc<Vec<u8>>,
    },
    Truncate {
        file: Id,
        size: u64,
    },
    Fallocate {
        file: Id,
        offset: u64,
        len: u64,
        keep_size: bool,
    },
    Punch {
        file: Id,
        offset: u64,
        len: u64,
    },
    Unlink {
        dir: Id,
        name: Vec<u8>,
    },
    Rmdir {
        dir: Id,
        name: Vec<u8>,
    },
    Rename {
        dir: Id,
        name: Vec<u8>,
        to_dir: Id,
        to_name: Vec<u8>,
        mode: RenameMode,
    },
    Link {
        file: Id,
        dir: Id,
        name: Vec<u8>,
    },
    SetXattr {
        node: Id,
        name: Vec<u8>,
        value: Vec<u8>,
    },
    RemoveXattr {
        node: Id,
        name: Vec<u8>,
    },
    Retain {
        file: Id,
    },
    Release {
        file: Id,
    },
    Chmod {
        node: Id,
        perm: u32,
        uid: u32,
    },
    Fsync {
        node: Id,
    },
    Sync,
    Checkpoint,
    Close,
}

impl Op {
    /// Whether the operation makes everything before it durable.
    fn is_sync(&self) -> bool {
        matches!(
            self,
            Op::Fsync { .. } | Op::Sync | Op::Checkpoint | Op::Close
        )
    }

    fn describe(&self) -> String {
        let name = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
        match self {
            Op::Write { file, offset, data } => {
                format!(
                    "Write {{ file: {file}, offset: {offset}, len: {} }}",
                    data.len()
                )
            }
            Op::Symlink {
                dir,
                name: n,
                target,
            } => format!(
                "Symlink {{ dir: {dir}, name: {}, target_len: {} }}",
                name(n),
                target.len()
            ),
            Op::SetXattr {
                node,
                name: n,
                value,
            } => format!(
                "SetXattr {{ node: {node}, name: {}, value_len: {} }}",
                name(n),
                value.len()
            ),
            Op::Create { dir, name: n } => format!("Create {{ dir: {dir}, name: {} }}", name(n)),
            Op::Mkdir { dir, name: n } => format!("Mkdir {{ dir: {dir}, name: {} }}", name(n)),
            Op::Unlink { dir, name: n } => format!("Unlink {{ dir: {dir}, name: {} }}", name(n)),
            Op::Rmdir { dir, name: n } => format!("Rmdir {{ dir: {dir}, name: {} }}", name(n)),
            Op::Link { file, dir, name: n } => {
                format!("Link {{ file: {file}, dir: {dir}, name: {} }}", name(n))
            }
            Op::Rename {
                dir,
                name: n,
                to_dir,
                to_name,
                mode,
            } => format!(
                "Rename {{ dir: {dir}, name: {}, to_dir: {to_dir}, to_name: {}, mode: {mode:?} }}",
                name(n),
                name(to_name)
            ),
            Op::RemoveXattr { node, name: n } => {
                format!("RemoveXattr {{ node: {node}, name: {} }}", name(n))
            }
            other => format!("{other:?}"),
        }
    }
}

/// A byte that identifies file `id`'s write number `counter` at file offset `pos`:
/// 1..=0xEC, so never 0 (holes) nor the garbage byte.
fn pattern(id: Id, counter: u32, pos: u64) -> u8 {
    let mut z = (u64::from(id) << 48) ^ (u64::from(counter) << 28) ^ pos;
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    1 + (z % 0xEC) as u8
}

fn pattern_bytes(id: Id, counter: u32, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern(id, counter, offset + i))
        .collect()
}

// ---------------------------------------------------------------------------------------
// One random sequence

/// What a run leaves for the crash checks.
struct Recorded {
    device: Arc<RecordingDevice>,
    tight: bool,
    nospace: usize,
    ops: Vec<Op>,
    /// What happened to each operation ("" when it succeeded).
    notes: Vec<String>,
    /// states[t]: the model after operation t (t = 0: the open, before any operation).
    states: Vec<Model>,
    /// Trace position (events) after operation t.
    end_event: Vec<usize>,
    sync_op: Vec<bool>,
}

struct Runner {
    rng: StdRng,
    device: Arc<RecordingDevice>,
    fs: Option<Fs>,
    model: Model,
    ino: HashMap<Id, u64>,
    open: HashMap<Id, usize>,
    next_id: Id,
    counter: u32,
    big_dir: Option<Id>,
    /// Space is short: operations may fail with ENOSPC (and must then change nothing).
    tight: bool,
    /// Operations that failed with ENOSPC or wrote short.
    nospace: usize,
    rec_ops: Vec<Op>,
    notes: Vec<String>,
    states: Vec<Model>,
    end_event: Vec<usize>,
    sync_op: Vec<bool>,
}

impl Runner {
    fn new(seed: u64) -> Self {
        let device = Arc::new(RecordingDevice::new(IMAGE_BYTES, GARBAGE));
        format(device.clone(), &format_options()).expect("format");
        let fs = Fs::open_device(device.clone(), &open_options()).expect("open");
        let mut ino = HashMap::new();
        ino.insert(ROOT, ROOT_INO);
        Self {
            rng: StdRng::seed_from_u64(seed),
            device,
            fs: Some(fs),
            model: Model::new(),
            ino,
            open: HashMap::new(),
            next_id: 1,
            counter: 0,
            big_dir: None,
            tight: false,
            nospace: 0,
            rec_ops: Vec::new(),
            notes: Vec::new(),
            states: Vec::new(),
            end_event: Vec::new(),
            sync_op: Vec::new(),
        }
    }

    fn fs(&self) -> &Fs {
        self.fs.as_ref().expect("file system open")
    }

    /// Setup before recording: sometimes a directory large enough for a multi-level
    /// entry tree, a few files with data, and sometimes a preallocated filler that
    /// leaves little free space.
    fn setup(&mut self) {
        let big = self.rng.gen_bool(0.35);
        let tight = self.rng.gen_bool(0.25);
        if big {
            self.make_big_dir();
        }
        for _ in 0..self.rng.gen_range(0..4) {
            if let Some(op) = self.gen_create() {
                self.apply(op);
            }
            if let Some(op) = self.gen_write(false) {
                self.apply(op);
            }
        }
        if tight {
            self.fill_device();
        }
        self.start_recording();
    }

    /// A directory with enough entries (files and hard links) for a multi-level tree.
    fn make_big_dir(&mut self) {
        let dir = self.next_id;
        self.apply(Op::Mkdir {
            dir: ROOT,
            name: b"big".to_vec(),
        });
        self.big_dir = Some(dir);
        let entries = self.rng.gen_range(200..=320);
        let files = self.rng.gen_range(20..=50);
        let mut made = Vec::new();
        for i in 0..entries {
            let name = format!("e{i:03}").into_bytes();
            if i < files {
                made.push(self.next_id);
                self.apply(Op::Create { dir, name });
            } else {
                let file = made[self.rng.gen_range(0..made.len())];
                self.apply(Op::Link { file, dir, name });
            }
        }
    }

    /// Fills the device but for a few dozen blocks with an unwritten preallocation.
    fn fill_device(&mut self) {
        let file = self.next_id;
        self.apply(Op::Create {
            dir: ROOT,
            name: b"filler".to_vec(),
        });
        let free = self.fs().statfs().expect("statfs").free_blocks;
        let keep = self.rng.gen_range(8..160);
        if free > keep {
            self.apply(Op::Fallocate {
                file,
                offset: 0,
                len: (free - keep) * BLOCK,
                keep_size: true,
            });
        }
        self.tight = true;
        if std::env::var("EXOFS_CRASH_DEBUG").is_ok() {
            eprintln!(
                "filler: free before {free}, keep {keep}, now {:?}",
                self.fs().statfs()
            );
        }
    }

    /// Starts the recording from a closed image: the first recorded event is the open.
    fn start_recording(&mut self) {
        let fs = self.fs.take().expect("open");
        fs.close().expect("close after setup");
        self.device.restart_recording();
        self.fs = Some(Fs::open_device(self.device.clone(), &open_options()).expect("reopen"));
        self.states.push(self.model.clone());
        self.end_event.push(self.device.event_count());
        self.sync_op.push(true);
    }

    fn run(mut self, ops: usize) -> Recorded {
        self.setup();
        for _ in 0..ops {
            let op = self.gen_op();
            self.record(op);
        }
        self.finish()
    }

    /// Closes the file system (a recorded operation) and hands over the recording.
    fn finish(mut self) -> Recorded {
        self.record(Op::Close);
        Recorded {
            tight: self.tight,
            nospace: self.nospace,
            device: self.device,
            ops: self.rec_ops,
            notes: self.notes,
            states: self.states,
            end_event: self.end_event,
            sync_op: self.sync_op,
        }
    }

    fn record(&mut self, op: Op) {
        self.rec_ops.push(op.clone());
        let sync = op.is_sync();
        let note = self.apply(op);
        self.notes.push(note);
        self.states.push(self.model.clone());
        self.end_event.push(self.device.event_count());
        self.sync_op.push(sync);
    }

    // --- choosing -------------------------------------------------------------------

    fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            None
        } else {
            Some(items[self.rng.gen_range(0..items.len())].clone())
        }
    }

    fn ids(&self, want: impl Fn(&Node) -> bool) -> Vec<Id> {
        self.model
            .nodes
            .iter()
            .filter(|(_, n)| want(n))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Every linked entry: (directory, name, id).
    fn entries(&self) -> Vec<(Id, Vec<u8>, Id)> {
        self.model
            .dirs
            .iter()
            .flat_map(|(dir, entries)| {
                entries
                    .iter()
                    .map(move |(name, id)| (*dir, name.clone(), *id))
            })
            .collect()
    }

    fn random_name(&mut self, dir: Id) -> Vec<u8> {
        if Some(dir) == self.big_dir {
            format!("e{:03}", self.rng.gen_range(0..360)).into_bytes()
        } else {
            format!("n{}", self.rng.gen_range(0..10)).into_bytes()
        }
    }

    /// A name not used in `dir`, or None after a few tries.
    fn free_name(&mut self, dir: Id) -> Option<Vec<u8>> {
        for _ in 0..8 {
            let name = self.random_name(dir);
            if !self.model.dirs[&dir].contains_key(&name) {
                return Some(name);
            }
        }
        None
    }

    fn random_dir(&mut self) -> Id {
        let dirs = self.ids(Node::is_dir);
        self.pick(&dirs).unwrap_or(ROOT)
    }

    fn room(&self) -> bool {
        self.model.nodes.len() < MAX_NODES
    }

    fn gen_create(&mut self) -> Option<Op> {
        let dir = self.random_dir();
        let name = self.free_name(dir)?;
        self.room().then_some(Op::Create { dir, name })
    }

    fn random_len(&mut self) -> u64 {
        match self.rng.gen_range(0..6) {
            0 => self.rng.gen_range(1..64),
            1 => BLOCK,
            2 => BLOCK * self.rng.gen_range(2..8),
            3 => self.rng.gen_range(1..3 * BLOCK),
            4 => self.rng.gen_range(1..10 * BLOCK),
            _ => self.rng.gen_range(100..1000),
        }
    }

    fn random_offset(&mut self, size: u64) -> u64 {
        match self.rng.gen_range(0..5) {
            0 => 0,
            1 => size,
            2 => self.rng.gen_range(0..MAX_FILE / BLOCK) * BLOCK,
            3 => self.rng.gen_range(0..=size),
            _ => self.rng.gen_range(0..MAX_FILE),
        }
    }

    /// A write: in place (inside the current size) or anywhere.
    fn gen_write(&mut self, in_place: bool) -> Option<Op> {
        let files = self.ids(Node::is_file);
        let file = self.pick(&files)?;
        let size = self.model.content(file).map_or(0, |c| c.len() as u64);
        let (offset, len) = if in_place {
            if size == 0 {
                return None;
            }
            let offset = self.rng.gen_range(0..size);
            let len = self.random_len().min(size - offset);
            (offset, len)
        } else {
            if self.model.data_bytes() > DATA_BUDGET {
                return None;
            }
            let offset = self.random_offset(size).min(MAX_FILE - 1);
            let len = self.random_len().min(MAX_FILE - offset);
            (offset, len)
        };
        self.counter += 1;
        let data = pattern_bytes(file, self.counter, offset, len as usize);
        Some(Op::Write {
            file,
            offset,
            data: Arc::new(data),
        })
    }

    fn gen_op(&mut self) -> Op {
        if self.tight && self.rng.gen_bool(0.3) {
            // Short of space: mostly allocate.
            let files = self.ids(Node::is_file);
            if let Some(file) = self.pick(&files) {
                let offset = self.rng.gen_range(0..MAX_FILE / 2);
                let len = self.rng.gen_range(1..MAX_FILE / 2);
                if self.rng.gen_bool(0.3) {
                    let keep_size = self.rng.gen_bool(0.5);
                    return Op::Fallocate {
                        file,
                        offset,
                        len,
                        keep_size,
                    };
                }
                self.counter += 1;
                let data = pattern_bytes(file, self.counter, offset, len as usize);
                return Op::Write {
                    file,
                    offset,
                    data: Arc::new(data),
                };
            }
        }
        loop {
            let op = match self.rng.gen_range(0..100) {
                0..=7 => self.gen_create(),
                8..=10 => {
                    let dir = self.random_dir();
                    let name = self.free_name(dir);
                    name.filter(|_| self.room())
                        .map(|name| Op::Mkdir { dir, name })
                }
                11..=13 => {
                    let dir = self.random_dir();
                    let len = match self.rng.gen_range(0..4) {
                        0 => 4096,
                        1 => self.rng.gen_range(1..4096),
                        _ => self.rng.gen_range(1..64),
                    };
                    self.counter += 1;
                    let target = pattern_bytes(self.next_id, self.counter, 0, len);
                    self.free_name(dir)
                        .filter(|_| self.room())
                        .map(|name| Op::Symlink { dir, name, target })
                }
                14..=31 => self.gen_write(false),
                32..=41 => self.gen_write(true),
                42..=46 => {
                    let files = self.ids(Node::is_file);
                    let size = match self.rng.gen_range(0..4) {
                        0 => 0,
                        1 => self.rng.gen_range(0..MAX_FILE / BLOCK) * BLOCK,
                        _ => self.rng.gen_range(0..MAX_FILE),
                    };
                    self.pick(&files)
                        .filter(|_| self.model.data_bytes() < DATA_BUDGET)
                        .map(|file| Op::Truncate { file, size })
                }
                47..=50 => {
                    let files = self.ids(Node::is_file);
                    let offset = self.rng.gen_range(0..MAX_FILE - 1);
                    let len = self.random_len().min(MAX_FILE - offset);
                    let keep_size = self.rng.gen_bool(0.5);
                    self.pick(&files)
                        .filter(|_| self.model.data_bytes() < DATA_BUDGET)
                        .map(|file| Op::Fallocate {
                            file,
                            offset,
                            len,
                            keep_size,
                        })
                }
                51..=54 => {
                    let files = self.ids(Node::is_file);
                    let file = self.pick(&files);
                    file.map(|file| {
                        let size = self.model.content(file).map_or(0, |c| c.len() as u64);
                        let offset = self.rng.gen_range(0..=size);
                        let len = self.random_len();
                        Op::Punch { file, offset, len }
                    })
                }
                55..=60 => {
                    let candidates: Vec<_> = self
                        .entries()
                        .into_iter()
                        .filter(|(_, _, id)| !self.model.nodes[id].is_dir())
                        .collect();
                    self.pick(&candidates)
                        .map(|(dir, name, _)| Op::Unlink { dir, name })
                }
                61..=62 => {
                    let candidates: Vec<_> = self
                        .entries()
                        .into_iter()
                        .filter(|(_, _, id)| {
                            self.model.dirs.get(id).is_some_and(BTreeMap::is_empty)
                        })
                        .collect();
                    self.pick(&candidates)
                        .map(|(dir, name, _)| Op::Rmdir { dir, name })
                }
                63..=70 => self.gen_rename(),
                71..=74 => {
                    let files = self.ids(Node::is_file);
                    let dir = self.random_dir();
                    let name = self.free_name(dir);
                    match (self.pick(&files), name) {
                        (Some(file), Some(name)) if self.model.link_count(file) > 0 => {
                            Some(Op::Link { file, dir, name })
                        }
                        _ => None,
                    }
                }
                75..=79 => {
                    let nodes = self.ids(|_| true);
                    let node = self.pick(&nodes);
                    let name = format!("user.x{}", self.rng.gen_range(0..4)).into_bytes();
                    let len = match self.rng.gen_range(0..3) {
                        0 => 0,
                        1 => self.rng.gen_range(1..40),
                        _ => self.rng.gen_range(40..900),
                    };
                    self.counter += 1;
                    let value = pattern_bytes(0, self.counter, 0, len);
                    node.map(|node| Op::SetXattr { node, name, value })
                }
                80..=81 => {
                    let with: Vec<(Id, Vec<u8>)> = self
                        .model
                        .nodes
                        .iter()
                        .flat_map(|(id, n)| n.xattrs.keys().map(move |k| (*id, k.clone())))
                        .collect();
                    self.pick(&with)
                        .map(|(node, name)| Op::RemoveXattr { node, name })
                }
                82..=83 => {
                    let files: Vec<Id> = self
                        .ids(Node::is_file)
                        .into_iter()
                        .filter(|id| self.model.link_count(*id) > 0)
                        .collect();
                    self.pick(&files).map(|file| Op::Retain { file })
                }
                84..=86 => {
                    let open: Vec<Id> = self.open.keys().copied().collect();
                    self.pick(&open).map(|file| Op::Release { file })
                }
                87..=89 => {
                    let nodes = self.ids(|_| true);
                    self.pick(&nodes).map(|node| Op::Fsync { node })
                }
                90..=93 => {
                    let nodes = self.ids(|_| true);
                    let perm = self.rng.gen_range(0..0o7777);
                    let uid = self.rng.gen_range(0..3);
                    self.pick(&nodes).map(|node| Op::Chmod { node, perm, uid })
                }
                94..=98 => Some(Op::Sync),
                _ => Some(Op::Checkpoint),
            };
            if let Some(op) = op {
                return op;
            }
        }
    }

    fn gen_rename(&mut self) -> Option<Op> {
        let entries = self.entries();
        let (dir, name, source) = self.pick(&entries)?;
        let to_dir = self.random_dir();
        let to_name = self.random_name(to_dir);
        if to_dir == dir && to_name == name {
            return None;
        }
        let target = self.model.dirs[&to_dir].get(&to_name).copied();
        let model = &self.model;
        let moves_ok =
            |moved: Id, into: Id| !model.nodes[&moved].is_dir() || !model.is_within(into, moved);
        let mode = match target {
            None => {
                if self.rng.gen_bool(0.5) {
                    RenameMode::NoReplace
                } else {
                    RenameMode::Replace
                }
            }
            Some(target) if self.rng.gen_bool(0.3) => {
                if dir != to_dir && !(moves_ok(source, to_dir) && moves_ok(target, dir)) {
                    return None;
                }
                if source == target {
                    return None;
                }
                RenameMode::Exchange
            }
            Some(target) => {
                let (s, t) = (&model.nodes[&source], &model.nodes[&target]);
                if s.is_dir() != t.is_dir() {
                    return None;
                }
                if t.is_dir() && !model.dirs[&target].is_empty() {
                    return None;
                }
                RenameMode::Replace
            }
        };
        if dir != to_dir && !moves_ok(source, to_dir) {
            return None;
        }
        Some(Op::Rename {
            dir,
            name,
            to_dir,
            to_name,
            mode,
        })
    }

    // --- applying -------------------------------------------------------------------

    fn new_node(&mut self, dir: Id, name: &[u8], body: Body, ino: u64) -> Id {
        let id = self.next_id;
        self.next_id += 1;
        if body == Body::Dir {
            self.model.dirs.insert(id, BTreeMap::new());
            self.model.parent.insert(id, dir);
        }
        self.model.nodes.insert(id, Node::new(body));
        self.model
            .dirs
            .get_mut(&dir)
            .expect("dir")
            .insert(name.to_vec(), id);
        self.ino.insert(id, ino);
        id
    }

    /// Drops a node that has no link left and is not open.
    fn forget_if_unused(&mut self, id: Id) {
        if self.model.link_count(id) == 0 && !self.open.contains_key(&id) {
            self.model.nodes.remove(&id);
            self.model.dirs.remove(&id);
            self.model.parent.remove(&id);
            self.ino.remove(&id);
        }
    }

    /// Removes entry `name` of `dir` (its target loses a link).
    fn remove_entry(&mut self, dir: Id, name: &[u8]) -> Id {
        let id = self
            .model
            .dirs
            .get_mut(&dir)
            .and_then(|e| e.remove(name))
            .expect("entry");
        self.forget_if_unused(id);
        id
    }

    /// Runs an operation on the file system and the model; returns a note for the log.
    fn apply(&mut self, op: Op) -> String {
        let before = self.nospace;
        match self.apply_fs(&op) {
            Ok(()) if self.nospace > before => "  -> short write".into(),
            Ok(()) => String::new(),
            Err(libfs::Error::NoSpace) if self.tight => {
                self.nospace += 1;
                "  -> ENOSPC".into()
            }
            Err(e) => panic!("operation {} failed: {e}", op.describe()),
        }
    }

    fn apply_fs(&mut self, op: &Op) -> libfs::Result<()> {
        let ino = |runner: &Self, id: &Id| runner.ino[id];
        match op.clone() {
            Op::Create { dir, name } => {
                let attr = self.fs().create(ino(self, &dir), &name, 0o644, 0, 0)?;
                self.new_node(dir, &name, Body::File(Arc::new(Vec::new())), attr.ino);
            }
            Op::Mkdir { dir, name } => {
                let attr = self.fs().mkdir(ino(self, &dir), &name, 0o755, 0, 0)?;
                self.new_node(dir, &name, Body::Dir, attr.ino);
            }
            Op::Symlink { dir, name, target } => {
                let attr = self.fs().symlink(ino(self, &dir), &name, &target, 0, 0)?;
                self.new_node(dir, &name, Body::Symlink(target), attr.ino);
            }
            Op::Write { file, offset, data } => {
                let n = self.fs().write_at(ino(self, &file), offset, &data)?;
                if n != data.len() {
                    assert!(
                        self.tight && n < data.len(),
                        "write of {} returned {n}",
                        data.len()
                    );
                    self.nospace += 1;
                }
                let data = &data[..n];
                let content = self.model.content_mut(file);
                let end = offset as usize + data.len();
                if content.len() < end {
                    content.resize(end, 0);
                }
                content[offset as usize..end].copy_from_slice(data);
            }
            Op::Truncate { file, size } => {
                let changes = SetAttr {
                    size: Some(size),
                    ..SetAttr::default()
                };
                self.fs().setattr(ino(self, &file), &changes)?;
                self.model.content_mut(file).resize(size as usize, 0);
            }
            Op::Fallocate {
                file,
                offset,
                len,
                keep_size,
            } => {
                let mode = FallocateMode {
                    keep_size,
                    punch_hole: false,
                };
                self.fs().fallocate(ino(self, &file), offset, len, mode)?;
                let content = self.model.content_mut(file);
                let end = (offset + len) as usize;
                if !keep_size && content.len() < end {
                    content.resize(end, 0);
                }
            }
            Op::Punch { file, offset, len } => {
                let mode = FallocateMode {
                    keep_size: true,
                    punch_hole: true,
                };
                self.fs().fallocate(ino(self, &file), offset, len, mode)?;
                let content = self.model.content_mut(file);
                let end = ((offset + len) as usize).min(content.len());
                if (offset as usize) < end {
                    content[offset as usize..end].fill(0);
                }
            }
            Op::Unlink { dir, name } => {
                self.fs().unlink(ino(self, &dir), &name)?;
                self.remove_entry(dir, &name);
            }
            Op::Rmdir { dir, name } => {
                self.fs().rmdir(ino(self, &dir), &name)?;
                self.remove_entry(dir, &name);
            }
            Op::Rename {
                dir,
                name,
                to_dir,
                to_name,
                mode,
            } => {
                self.fs()
                    .rename(ino(self, &dir), &name, ino(self, &to_dir), &to_name, mode)?;
                let source = self.model.dirs[&dir][&name];
                let target = self.model.dirs[&to_dir].get(&to_name).copied();
                match (mode, target) {
                    (RenameMode::Exchange, Some(target)) => {
                        self.model
                            .dirs
                            .get_mut(&dir)
                            .expect("dir")
                            .insert(name, target);
                        self.model
                            .dirs
                            .get_mut(&to_dir)
                            .expect("dir")
                            .insert(to_name, source);
                        if self.model.nodes[&target].is_dir() {
                            self.model.parent.insert(target, dir);
                        }
                    }
                    (_, Some(target)) if target == source => {}
                    _ => {
                        self.model.dirs.get_mut(&dir).expect("dir").remove(&name);
                        let replaced = self
                            .model
                            .dirs
                            .get_mut(&to_dir)
                            .expect("dir")
                            .insert(to_name, source);
                        if let Some(replaced) = replaced {
                            self.forget_if_unused(replaced);
                        }
                    }
                }
                if self.model.nodes[&source].is_dir()
                    && !(matches!((mode, target), (_, Some(t)) if t == source))
                {
                    self.model.parent.insert(source, to_dir);
                }
            }
            Op::Link { file, dir, name } => {
                self.fs().link(ino(self, &file), ino(self, &dir), &name)?;
                self.model
                    .dirs
                    .get_mut(&dir)
                    .expect("dir")
                    .insert(name, file);
            }
            Op::SetXattr { node, name, value } => {
                self.fs()
                    .setxattr(ino(self, &node), &name, &value, XattrMode::Any)?;
                let node = self.model.nodes.get_mut(&node).expect("node");
                node.xattrs.insert(name, value);
            }
            Op::RemoveXattr { node, name } => {
                self.fs().removexattr(ino(self, &node), &name)?;
                let node = self.model.nodes.get_mut(&node).expect("node");
                node.xattrs.remove(&name);
            }
            Op::Retain { file } => {
                self.fs().retain(ino(self, &file))?;
                *self.open.entry(file).or_insert(0) += 1;
            }
            Op::Release { file } => {
                self.fs().release(ino(self, &file))?;
                let count = self.open.get_mut(&file).expect("open");
                *count -= 1;
                if *count == 0 {
                    self.open.remove(&file);
                    self.forget_if_unused(file);
                }
            }
            Op::Chmod { node, perm, uid } => {
                let changes = SetAttr {
                    mode: Some(perm),
                    uid: Some(uid),
                    ..SetAttr::default()
                };
                self.fs().setattr(ino(self, &node), &changes)?;
                let node = self.model.nodes.get_mut(&node).expect("node");
                node.perm = perm;
                node.uid = uid;
            }
            Op::Fsync { node } => self.fs().fsync(ino(self, &node))?,
            Op::Sync => self.fs().sync()?,
            Op::Checkpoint => self.fs().checkpoint()?,
            Op::Close => self.fs.take().expect("open").close()?,
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Reading a recovered file system

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug)]
struct SeenNode {
    kind: Kind,
    perm: u32,
    uid: u32,
    size: u64,
    nlink: u32,
    /// File contents or symlink target.
    data: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Debug, Default)]
struct Seen {
    dirs: BTreeMap<u64, BTreeMap<Vec<u8>, u64>>,
    nodes: BTreeMap<u64, SeenNode>,
    /// Files with more than the inline number of extents (coverage).
    extent_trees: usize,
}

/// Reads the whole namespace and every file of an open file system.
fn collect(fs: &Fs) -> Result<Seen, String> {
    let mut seen = Seen::default();
    let mut queue = vec![ROOT_INO];
    while let Some(dir) = queue.pop() {
        if seen.dirs.contains_key(&dir) {
            return Err(format!("directory inode {dir} reachable twice"));
        }
        let list = fs
            .list_dir(dir)
            .map_err(|e| format!("readdir of inode {dir}: {e}"))?;
        let mut entries = BTreeMap::new();
        for entry in list {
            if entries.insert(entry.name.clone(), entry.ino).is_some() {
                return Err(format!("directory {dir}: duplicate name {:?}", entry.name));
            }
            let looked = fs
                .lookup(dir, &entry.name)
                .map_err(|e| format!("lookup of {:?} in {dir}: {e}", entry.name))?;
            if looked.ino != entry.ino {
                return Err(format!("lookup and readdir disagree in {dir}"));
            }
            if seen.nodes.contains_key(&entry.ino) {
                continue;
            }
            let attr = fs
                .getattr(entry.ino)
                .map_err(|e| format!("getattr {}: {e}", entry.ino))?;
            let kind = if attr.is_dir() {
                Kind::Dir
            } else if attr.is_file() {
                Kind::File
            } else if attr.is_symlink() {
                Kind::Symlink
            } else {
                Kind::Other
            };
            if entry.kind != attr.mode & 0o170000 {
                return Err(format!("entry {:?}: type differs from inode", entry.name));
            }
            let data = match kind {
                Kind::File => {
                    let mut data = vec![0u8; attr.size as usize];
                    let n = fs
                        .read_at(entry.ino, 0, &mut data)
                        .map_err(|e| format!("read of inode {}: {e}", entry.ino))?;
                    if n != data.len() {
                        return Err(format!("inode {}: short read", entry.ino));
                    }
                    let extents = fs
                        .extents(entry.ino)
                        .map_err(|e| format!("extents of {}: {e}", entry.ino))?;
                    if extents.len() > 5 {
                        seen.extent_trees += 1;
                    }
                    data
                }
                Kind::Symlink => fs
                    .readlink(entry.ino)
                    .map_err(|e| format!("readlink {}: {e}", entry.ino))?,
                Kind::Dir => {
                    queue.push(entry.ino);
                    Vec::new()
                }
                Kind::Other => Vec::new(),
            };
            let mut xattrs = BTreeMap::new();
            for name in fs
                .listxattr(entry.ino)
                .map_err(|e| format!("listxattr {}: {e}", entry.ino))?
            {
                let value = fs
                    .getxattr(entry.ino, &name)
                    .map_err(|e| format!("getxattr {}: {e}", entry.ino))?;
                xattrs.insert(name, value);
            }
            seen.nodes.insert(
                entry.ino,
                SeenNode {
                    kind,
                    perm: attr.mode & 0o7777,
                    uid: attr.uid,
                    size: attr.size,
                    nlink: attr.nlink,
                    data,
                    xattrs,
                },
            );
        }
        seen.dirs.insert(dir, entries);
    }
    let root = fs.getattr(ROOT_INO).map_err(|e| format!("root: {e}"))?;
    let root_xattrs = fs
        .listxattr(ROOT_INO)
        .map_err(|e| format!("listxattr root: {e}"))?
        .into_iter()
        .map(|name| {
            let value = fs.getxattr(ROOT_INO, &name);
            value.map(|v| (name, v))
        })
        .collect::<Result<BTreeMap<_, _>, _>>()
        .map_err(|e| format!("getxattr root: {e}"))?;
    seen.nodes.insert(
        ROOT_INO,
        SeenNode {
            kind: Kind::Dir,
            perm: root.mode & 0o7777,
            uid: root.uid,
            size: root.size,
            nlink: root.nlink,
            data: Vec::new(),
            xattrs: root_xattrs,
        },
    );
    Ok(seen)
}

/// Compares everything but file contents; returns the id -> inode map on a match.
fn compare(model: &Model, seen: &Seen) -> Result<HashMap<Id, u64>, String> {
    let links = model.links();
    let mut to_ino: HashMap<Id, u64> = HashMap::new();
    let mut to_id: HashMap<u64, Id> = HashMap::new();
    to_ino.insert(ROOT, ROOT_INO);
    to_id.insert(ROOT_INO, ROOT);
    let mut queue = vec![ROOT];
    let mut checked = BTreeSet::new();
    while let Some(dir) = queue.pop() {
        let want = &model.dirs[&dir];
        let have = &seen.dirs[&to_ino[&dir]];
        let want_names: Vec<&Vec<u8>> = want.keys().collect();
        let have_names: Vec<&Vec<u8>> = have.keys().collect();
        if want_names != have_names {
            let missing: Vec<String> = want
                .keys()
                .filter(|n| !have.contains_key(*n))
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect();
            let extra: Vec<String> = have
                .keys()
                .filter(|n| !want.contains_key(*n))
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect();
            return Err(format!(
                "directory {dir}: missing {missing:?}, unexpected {extra:?}"
            ));
        }
        for (name, id) in want {
            let ino = have[name];
            match (to_ino.get(id), to_id.get(&ino)) {
                (None, None) => {
                    to_ino.insert(*id, ino);
                    to_id.insert(ino, *id);
                }
                (Some(i), Some(d)) if *i == ino && *d == *id => continue,
                _ => {
                    return Err(format!(
                        "entry {:?} of {dir}: hard links disagree",
                        String::from_utf8_lossy(name)
                    ))
                }
            }
            if checked.insert(*id) {
                check_node(model, &links, *id, &seen.nodes[&ino])?;
                if model.nodes[id].is_dir() {
                    queue.push(*id);
                }
            }
        }
    }
    check_node(model, &links, ROOT, &seen.nodes[&ROOT_INO])?;
    Ok(to_ino)
}

fn check_node(
    model: &Model,
    links: &HashMap<Id, u32>,
    id: Id,
    seen: &SeenNode,
) -> Result<(), String> {
    let node = &model.nodes[&id];
    let fail = |what: String| Err(format!("node {id}: {what}"));
    if (node.perm, node.uid) != (seen.perm, seen.uid) {
        return fail(format!(
            "mode {:o} uid {} != expected {:o} uid {}",
            seen.perm, seen.uid, node.perm, node.uid
        ));
    }
    if node.xattrs != seen.xattrs {
        return fail(format!(
            "xattrs {:?} != expected {:?}",
            seen.xattrs.keys().collect::<Vec<_>>(),
            node.xattrs.keys().collect::<Vec<_>>()
        ));
    }
    match &node.body {
        Body::File(data) => {
            if seen.kind != Kind::File {
                return fail(format!("{:?}, expected a file", seen.kind));
            }
            if seen.size != data.len() as u64 {
                return fail(format!("size {} != {}", seen.size, data.len()));
            }
            if seen.nlink != links[&id] {
                return fail(format!("nlink {} != {}", seen.nlink, links[&id]));
            }
        }
        Body::Symlink(target) => {
            if seen.kind != Kind::Symlink || seen.data != *target {
                return fail("symlink target differs".into());
            }
        }
        Body::Dir => {
            let entries = &model.dirs[&id];
            let subdirs = entries.values().filter(|c| model.nodes[c].is_dir()).count() as u32;
            if seen.kind != Kind::Dir {
                return fail(format!("{:?}, expected a directory", seen.kind));
            }
            if seen.size != entries.len() as u64 {
                return fail(format!(
                    "dir size {} != {} entries",
                    seen.size,
                    entries.len()
                ));
            }
            if seen.nlink != 2 + subdirs {
                return fail(format!("dir nlink {} != {}", seen.nlink, 2 + subdirs));
            }
        }
    }
    Ok(())
}

/// Every byte of file `id` must be a byte the file held at one of the candidate states.
fn check_data(candidates: &[Model], matched: &Model, id: Id, data: &[u8]) -> Result<(), String> {
    let Some(expected) = matched.content(id) else {
        return Ok(());
    };
    if expected.as_slice() == data {
        return Ok(());
    }
    let versions: Vec<&Arc<Vec<u8>>> = candidates.iter().filter_map(|m| m.content(id)).collect();
    for (pos, byte) in data.iter().enumerate() {
        let ok = versions
            .iter()
            .any(|v| v.get(pos).copied().unwrap_or(0) == *byte);
        if !ok {
            let end = (pos + 16).min(data.len());
            let what = if *byte == GARBAGE {
                "garbage (the pre-format fill byte)"
            } else {
                "a byte this file never held"
            };
            return Err(format!(
                "file {id}: byte {pos} is {byte:#04x}, {what}; found {:02x?}, expected {:02x?}",
                &data[pos..end],
                &expected.get(pos..end.min(expected.len())).unwrap_or(&[]),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Crash checks

#[derive(Default)]
struct Stats {
    crash_points: usize,
    reordered: usize,
    replayed: usize,
    double_crashes: usize,
    extent_trees: usize,
    writes: usize,
    tight_sequences: usize,
    nospace_ops: usize,
}

struct Checker<'a> {
    seed: u64,
    rec: &'a Recorded,
    /// Trace position just after each write.
    write_end: Vec<usize>,
    stats: Stats,
}

impl<'a> Checker<'a> {
    fn new(seed: u64, rec: &'a Recorded) -> Self {
        let write_end = rec
            .device
            .events()
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Event::Write { .. }))
            .map(|(at, _)| at + 1)
            .collect();
        Self {
            seed,
            rec,
            write_end,
            stats: Stats::default(),
        }
    }

    /// (last completed sync operation, operation in progress) for a failure after
    /// `writes` writes.
    fn bounds(&self, writes: usize) -> (usize, usize) {
        let at = if writes == 0 {
            0
        } else {
            self.write_end[writes - 1]
        };
        let ends = &self.rec.end_event;
        let synced = (0..ends.len())
            .filter(|t| self.rec.sync_op[*t] && ends[*t] <= at)
            .max()
            .unwrap_or(0);
        let current = (0..ends.len())
            .find(|t| ends[*t] >= at)
            .unwrap_or(ends.len() - 1);
        (synced, current.max(synced))
    }

    fn run(&mut self) -> Result<(), String> {
        let writes = self.rec.device.write_count();
        self.stats.writes = writes;
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x5EED_C4A5);
        for n in 0..=writes {
            let (synced, current) = self.bounds(n);
            let crash = Crash::clean(n);
            let exercise = rng.gen_ratio(1, 8);
            let double = rng.gen_ratio(1, 12);
            self.check_crash(&crash, synced, current, exercise, double)?;
            if self.rec.device.durable_writes_at(n) < n {
                let seed = rng.gen();
                let reorder = if rng.gen_bool(0.5) {
                    Reorder::DropWrites { seed }
                } else {
                    Reorder::DropSectors { seed }
                };
                let torn_last = rng.gen_bool(0.5).then(|| rng.gen_range(0..8));
                let crash = Crash {
                    writes: n,
                    reorder,
                    torn_last,
                };
                self.stats.reordered += 1;
                self.check_crash(&crash, synced, current, false, false)?;
            }
        }
        // The clean close leaves exactly the final state.
        let last = self.rec.states.len() - 1;
        let image = self.rec.device.durable_image();
        self.check_image(image, last, last, true)
            .map_err(|e| format!("after the final close: {e}"))
    }

    fn check_crash(
        &mut self,
        crash: &Crash,
        synced: usize,
        current: usize,
        exercise: bool,
        double: bool,
    ) -> Result<(), String> {
        self.stats.crash_points += 1;
        let image = self.rec.device.crash_image_at(crash);
        let context = |e: String| {
            format!(
                "crash {crash:?} (state must be one after operations {synced}..={current}): {e}"
            )
        };
        if double {
            self.check_double_crash(image.clone(), synced, current)
                .map_err(|e| context(format!("during recovery: {e}")))?;
        }
        self.check_image(image, synced, current, exercise)
            .map_err(context)
    }

    /// Opens, compares with the candidate states, closes and runs fsck.
    fn check_image(
        &mut self,
        image: Vec<u8>,
        synced: usize,
        current: usize,
        exercise: bool,
    ) -> Result<(), String> {
        let device = Arc::new(MemDevice::from_bytes(image));
        // fsck replays the journal in memory: the crashed image must check clean as is.
        fsck(device.clone()).map_err(|e| format!("before recovery: {e}"))?;
        let fs = Fs::open_device(device.clone(), &open_options())
            .map_err(|e| format!("open (journal replay) failed: {e}"))?;
        if fs.journal_stats().replayed_transactions > 0 {
            self.stats.replayed += 1;
        }
        let result = self.verify(&fs, synced, current);
        let result = result.and_then(|()| if exercise { exercise_fs(&fs) } else { Ok(None) });
        let closed = fs.close().map_err(|e| format!("close after recovery: {e}"));
        let written = result?;
        closed?;
        fsck(device.clone())?;
        if let Some(written) = written {
            let fs = Fs::open_device(device.clone(), &open_options())
                .map_err(|e| format!("reopen after new work: {e}"))?;
            let attr = fs
                .lookup(ROOT_INO, b"after-crash")
                .map_err(|e| format!("new file lost: {e}"))?;
            let mut back = vec![0u8; attr.size as usize];
            fs.read_at(attr.ino, 0, &mut back)
                .map_err(|e| format!("read new file: {e}"))?;
            if back != written {
                return Err("file written after recovery reads back wrong".into());
            }
            fs.close().map_err(|e| format!("close: {e}"))?;
            fsck(device)?;
        }
        Ok(())
    }

    fn verify(&mut self, fs: &Fs, synced: usize, current: usize) -> Result<(), String> {
        let seen = collect(fs)?;
        self.stats.extent_trees += seen.extent_trees;
        let candidates = &self.rec.states[synced..=current];
        let mut mismatches = Vec::new();
        let mut matched = None;
        for (i, model) in candidates.iter().enumerate().rev() {
            match compare(model, &seen) {
                Ok(map) => {
                    matched = Some((model, map));
                    break;
                }
                Err(e) => mismatches.push(format!("  state {}: {e}", synced + i)),
            }
        }
        let Some((model, map)) = matched else {
            mismatches.reverse();
            return Err(format!(
                "the recovered namespace matches no allowed state:\n{}",
                mismatches.join("\n")
            ));
        };
        for (id, ino) in map {
            if let Some(node) = seen.nodes.get(&ino).filter(|n| n.kind == Kind::File) {
                check_data(candidates, model, id, &node.data)?;
            }
        }
        Ok(())
    }

    /// Recovery itself interrupted: replays on a recording device, then crashes after
    /// every write of the recovery (and its close) and checks each image.
    fn check_double_crash(
        &mut self,
        image: Vec<u8>,
        synced: usize,
        current: usize,
    ) -> Result<(), String> {
        let device = Arc::new(RecordingDevice::from_image(image));
        let fs = Fs::open_device(device.clone(), &open_options())
            .map_err(|e| format!("open failed: {e}"))?;
        fs.close().map_err(|e| format!("close failed: {e}"))?;
        for n in 0..device.write_count() {
            self.stats.double_crashes += 1;
            let image = device.crash_image_at(&Crash::clean(n));
            self.check_image(image, synced, current, false)
                .map_err(|e| format!("second crash after {n} recovery writes: {e}"))?;
        }
        Ok(())
    }
}

fn after_crash_data() -> Vec<u8> {
    (0..10_000u32).map(|i| (i % 199) as u8 + 1).collect()
}

/// New work on a recovered file system: create, write, mkdir, remove something.
fn exercise_fs(fs: &Fs) -> Result<Option<Vec<u8>>, String> {
    // A full device may refuse new work (ENOSPC), but nothing else may fail.
    let failed = |what: &str, e: libfs::Error| match e {
        libfs::Error::NoSpace | libfs::Error::NoInodes => Ok(None),
        e => Err(format!("{what} after recovery: {e}")),
    };
    let attr = match fs.create(ROOT_INO, b"after-crash", 0o644, 0, 0) {
        Ok(attr) => attr,
        Err(e) => return failed("create", e),
    };
    let data = after_crash_data();
    let written = match fs.write_at(attr.ino, 0, &data) {
        Ok(n) => data[..n].to_vec(),
        Err(libfs::Error::NoSpace) => Vec::new(),
        Err(e) => return failed("write", e),
    };
    if let Err(e) = fs.mkdir(ROOT_INO, b"after-dir", 0o755, 0, 0) {
        failed("mkdir", e)?;
    }
    let entries = fs
        .list_dir(ROOT_INO)
        .map_err(|e| format!("readdir after recovery: {e}"))?;
    if let Some(entry) = entries
        .iter()
        .find(|e| e.kind == 0o100000 && e.name != b"after-crash")
    {
        fs.unlink(ROOT_INO, &entry.name)
            .map_err(|e| format!("unlink after recovery: {e}"))?;
    }
    fs.sync().map_err(|e| format!("sync after recovery: {e}"))?;
    Ok(Some(written))
}

// ---------------------------------------------------------------------------------------

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run_seed(seed: u64) -> Result<Stats, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let ops = rng.gen_range(10..=40);
    let recorded = std::panic::catch_unwind(|| Runner::new(seed).run(ops)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("seed {seed}: the operation sequence itself failed: {msg}")
    })?;
    let mut checker = Checker::new(seed, &recorded);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| checker.run()))
        .unwrap_or_else(|_| Err("panicked (see the panic message above)".into()));
    match result {
        Ok(()) => {
            let mut stats = checker.stats;
            stats.tight_sequences = usize::from(recorded.tight);
            stats.nospace_ops = recorded.nospace;
            Ok(stats)
        }
        Err(e) => {
            let ops: Vec<String> = recorded
                .ops
                .iter()
                .enumerate()
                .map(|(i, op)| format!("  {:>3} {}{}", i + 1, op.describe(), recorded.notes[i]))
                .collect();
            Err(format!(
                "seed {seed} failed (rerun: EXOFS_CRASH_SEED={seed}): {e}\noperations (1-based; 0 is the open):\n{}",
                ops.join("\n")
            ))
        }
    }
}

#[test]
fn crash_at_every_write() {
    let started = Instant::now();
    let seeds: Vec<u64> = match std::env::var("EXOFS_CRASH_SEED") {
        Ok(seed) => vec![seed.parse().expect("EXOFS_CRASH_SEED must be a number")],
        Err(_) => {
            let first = env_number("EXOFS_CRASH_FIRST_SEED", 0);
            let count = env_number("EXOFS_CRASH_SEQUENCES", 500);
            (first..first + count).collect()
        }
    };
    let next = AtomicUsize::new(0);
    let totals = Mutex::new(Stats::default());
    let failures = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(seed) = seeds.get(i).copied() else {
                    return;
                };
                match run_seed(seed) {
                    Ok(stats) => {
                        let mut t = totals.lock().expect("totals");
                        t.crash_points += stats.crash_points;
                        t.reordered += stats.reordered;
                        t.replayed += stats.replayed;
                        t.double_crashes += stats.double_crashes;
                        t.extent_trees += stats.extent_trees;
                        t.writes += stats.writes;
                        t.tight_sequences += stats.tight_sequences;
                        t.nospace_ops += stats.nospace_ops;
                    }
                    Err(e) => {
                        eprintln!("{e}\n");
                        failures.lock().expect("failures").push((seed, e));
                    }
                }
            });
        }
    });
    let t = totals.into_inner().expect("totals");
    let failures = failures.into_inner().expect("failures");
    eprintln!(
        "crash test: {} sequences, {} writes recorded, {} crash images checked ({} with \
         reordered/dropped/torn writes, {} with a journal replay, {} crashes during recovery), \
         {} files seen with > 5 extents; {} sequences short of space, {} ENOSPC or short \
         writes; {:.1}s",
        seeds.len(),
        t.writes,
        t.crash_points + t.double_crashes,
        t.reordered,
        t.replayed,
        t.double_crashes,
        t.extent_trees,
        t.tight_sequences,
        t.nospace_ops,
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        let failed: Vec<u64> = failures.iter().map(|(s, _)| *s).collect();
        panic!(
            "{} of {} sequences failed: seeds {failed:?}; first failure:\n{}",
            failures.len(),
            seeds.len(),
            failures[0].1
        );
    }
}

// ---------------------------------------------------------------------------------------
// The checker itself must catch what it is there to catch.

/// Index of the first write after `events` trace events.
fn writes_before(device: &RecordingDevice, events: usize) -> usize {
    device.events()[..events]
        .iter()
        .filter(|e| matches!(e, Event::Write { .. }))
        .count()
}

/// Physical block of the first block of `/name` in an image.
fn first_block_of(image: &[u8], name: &[u8]) -> u64 {
    let device = Arc::new(MemDevice::from_bytes(image.to_vec()));
    let fs = Fs::open_device(device, &OpenOptions::read_only()).expect("open read-only");
    let ino = fs.lookup(ROOT_INO, name).expect("lookup").ino;
    let extents = fs.extents(ino).expect("extents");
    extents[0].physical
}

#[test]
fn checker_detects_lost_and_foreign_data() {
    let mut runner = Runner::new(7);
    runner.start_recording();
    let (f, g) = (1, 2);
    let write = |file: Id, counter: u32, len: usize| Op::Write {
        file,
        offset: 0,
        data: Arc::new(pattern_bytes(file, counter, 0, len)),
    };
    for op in [
        Op::Create {
            dir: ROOT,
            name: b"f".to_vec(),
        },
        write(f, 1, 3 * 4096 + 100),
        Op::Fsync { node: f },
        Op::Create {
            dir: ROOT,
            name: b"g".to_vec(),
        },
        write(g, 2, 2 * 4096),
        Op::Sync,
    ] {
        runner.record(op);
    }
    let rec = runner.finish();
    let mut checker = Checker::new(7, &rec);
    let last = rec.states.len() - 1;
    let image = rec.device.durable_image();
    checker
        .check_image(image.clone(), last, last, true)
        .expect("the honest image passes");
    checker.run().expect("every crash point passes");

    // The fsync (operation 3) returned: an image from before its commit is a lost fsync.
    let before_fsync = writes_before(&rec.device, rec.end_event[2]);
    let lost = rec.device.crash_image_at(&Crash::clean(before_fsync));
    let err = checker
        .check_image(lost, 3, 3, false)
        .expect_err("lost fsync");
    assert!(err.contains("matches no allowed state"), "{err}");

    // Garbage in a file block.
    let f_block = first_block_of(&image, b"f") as usize * 4096;
    let mut garbage = image.clone();
    garbage[f_block..f_block + 4096].fill(GARBAGE);
    let err = checker
        .check_image(garbage, last, last, false)
        .expect_err("garbage");
    assert!(err.contains("garbage"), "{err}");

    // Another file's block.
    let g_block = first_block_of(&image, b"g") as usize * 4096;
    let mut foreign = image.clone();
    foreign.copy_within(g_block..g_block + 4096, f_block);
    let err = checker
        .check_image(foreign, last, last, false)
        .expect_err("foreign");
    assert!(err.contains("never held"), "{err}");

    // A zeroed block of synced data is lost data too.
    let mut zeroed = image;
    zeroed[f_block + 4096..f_block + 8192].fill(0);
    let err = checker
        .check_image(zeroed, last, last, false)
        .expect_err("zeroed");
    assert!(err.contains("never held"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Operations longer than one transaction

/// Truncating and deleting files of more than 2048 extents takes several transactions
/// (`data::truncate_blocks`): a crash part way must leave a consistent image in which a
/// truncated file is shorter (never holds blocks past its end) and a deleted file is
/// either whole or gone, its blocks freed by orphan recovery.
#[test]
fn crash_during_multi_step_truncate_and_delete() {
    const EXTENTS: u64 = 2100;
    let device = Arc::new(RecordingDevice::new(32 << 20, GARBAGE));
    format(device.clone(), &format_options()).expect("format");
    let fs = Fs::open_device(device.clone(), &open_options()).expect("open");
    let mut contents: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for (id, name) in [(1, b"a"), (2, b"b")] {
        let ino = fs.create(ROOT_INO, name, 0o644, 0, 0).expect("create").ino;
        let mut content = vec![0u8; ((2 * EXTENTS - 1) * BLOCK) as usize];
        for i in 0..EXTENTS {
            let offset = 2 * i * BLOCK;
            let data = pattern_bytes(id, i as u32, offset, BLOCK as usize);
            fs.write_at(ino, offset, &data).expect("write");
            content[offset as usize..(offset + BLOCK) as usize].copy_from_slice(&data);
        }
        assert!(fs.extents(ino).expect("extents").len() > 2048);
        contents.push((name.to_vec(), content));
    }
    let keep = pattern_bytes(3, 0, 0, 5 * BLOCK as usize + 99);
    let keep_ino = fs
        .create(ROOT_INO, b"keep", 0o644, 0, 0)
        .expect("create")
        .ino;
    fs.write_at(keep_ino, 0, &keep).expect("write");
    fs.close().expect("close");
    device.restart_recording();

    let fs = Fs::open_device(device.clone(), &open_options()).expect("open");
    let a = fs.lookup(ROOT_INO, b"a").expect("a").ino;
    // Keeps 21 extents: 2079 go, more than one step (2048) removes.
    let target = 40 * BLOCK + 777;
    let truncate = SetAttr {
        size: Some(target),
        ..SetAttr::default()
    };
    fs.setattr(a, &truncate).expect("truncate");
    fs.fsync(a).expect("fsync");
    // Trace positions: the truncate is durable from `truncated` on; the unlink starts
    // there and is durable from `unlinked` on.
    let truncated = device.event_count();
    fs.unlink(ROOT_INO, b"b").expect("unlink");
    fs.sync().expect("sync");
    let unlinked = device.event_count();
    fs.close().expect("close");
    let unlink_start = truncated;

    let events = device.events();
    let write_end: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Event::Write { .. }))
        .map(|(at, _)| at + 1)
        .collect();
    let (old_a, old_b) = (&contents[0].1, &contents[1].1);
    let check = |image: Vec<u8>, at: usize| -> Result<u64, String> {
        let device = Arc::new(MemDevice::from_bytes(image));
        fsck(device.clone()).map_err(|e| format!("before recovery: {e}"))?;
        let fs = Fs::open_device(device.clone(), &open_options())
            .map_err(|e| format!("open failed: {e}"))?;
        let seen = collect(&fs)?;
        let root = &seen.dirs[&ROOT_INO];
        let read = |name: &[u8]| root.get(name).map(|ino| &seen.nodes[ino]);
        // a: truncated in steps; whole until the first step commits.
        let a = read(b"a").ok_or("a is gone")?;
        let size = a.size;
        let old_size = old_a.len() as u64;
        let stepped = size % BLOCK == 0 && size >= target.div_ceil(BLOCK) * BLOCK;
        if at >= truncated && size != target {
            return Err(format!("a: size {size} after the fsync of its truncate"));
        }
        if size != target && size != old_size && !stepped {
            return Err(format!("a: size {size}, not a step of the truncate"));
        }
        let tail = target as usize..(target.div_ceil(BLOCK) * BLOCK) as usize;
        for (pos, byte) in a.data.iter().enumerate() {
            if *byte != old_a[pos] && !(tail.contains(&pos) && *byte == 0) {
                return Err(format!(
                    "a: byte {pos} is {byte:#04x}, not {:#04x}",
                    old_a[pos]
                ));
            }
        }
        // b: whole, or gone once its unlink began.
        match read(b"b") {
            None if at > unlink_start => {}
            None => return Err("b is gone before its unlink".into()),
            Some(_) if at >= unlinked => return Err("b is back after the sync".into()),
            Some(b) if b.data != *old_b => return Err("b changed".into()),
            Some(_) => {}
        }
        let k = read(b"keep").ok_or("keep is gone")?;
        if k.data != keep {
            return Err("keep changed".into());
        }
        if root.len() != 2 + usize::from(read(b"b").is_some()) {
            return Err(format!("root holds {} entries", root.len()));
        }
        fs.close().map_err(|e| format!("close: {e}"))?;
        fsck(device)?;
        Ok(size)
    };
    let mut rng = StdRng::seed_from_u64(99);
    let mut points = 0;
    let mut failures: Vec<String> = Vec::new();
    let mut sizes = BTreeSet::new();
    for n in 0..=write_end.len() {
        let at = if n == 0 { 0 } else { write_end[n - 1] };
        let seed = rng.gen();
        let crashes = [
            Crash::clean(n),
            Crash {
                writes: n,
                reorder: if n % 2 == 0 {
                    Reorder::DropWrites { seed }
                } else {
                    Reorder::DropSectors { seed }
                },
                torn_last: rng.gen_bool(0.5).then(|| rng.gen_range(0..8)),
            },
        ];
        for crash in crashes {
            points += 1;
            match check(device.crash_image_at(&crash), at) {
                Ok(size) => {
                    sizes.insert(size);
                }
                Err(e) => failures.push(format!("{crash:?} (trace position {at}): {e}")),
            }
        }
    }
    eprintln!(
        "multi-step truncate/delete: {} writes, {points} crash images checked, {} failed; \
         sizes of the truncated file seen: {sizes:?}",
        write_end.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {points} crash images failed (truncate fsynced at trace position {truncated}, \
         unlink from {unlink_start}, synced at {unlinked}); first and last:\n{}\n{}",
        failures.len(),
        failures[0],
        failures[failures.len() - 1]
    );
    assert!(
        sizes.len() > 2,
        "no crash fell between two steps of the truncate"
    );
}
