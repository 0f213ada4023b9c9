//! A panic in the middle of an operation never gets its partial changes committed.
//!
//! `PanicDevice` panics on the Nth device call (read, write or sync) after it is armed;
//! with a metadata cache of a few blocks, reads happen all through an operation. For each
//! operation of a script (create, write, truncate, rename, unlink, mkdir, rmdir, symlink,
//! setxattr, removexattr, fallocate, and operations followed by a sync), N sweeps every
//! device call the operation makes, each time on a fresh copy of the image the script
//! has reached. After each panic:
//!   - the operation returned an error (the panic did not escape): `Panicked` when it was
//!     rolled back, `Stopped` naming the panic when the file system stopped instead;
//!   - rolled back: the visible tree equals the model before the operation, a sync commits
//!     nothing partial (fsck is clean), the operation then succeeds when retried, and a
//!     close and reopen shows the model after it, fsck clean;
//!   - stopped: every later change fails with `Stopped`; reopened, fsck is clean and the
//!     tree is the model before or after the operation (a commit the panic cut short may
//!     or may not have become durable).
//!
//! A second test subscribes an extent listener that panics.

use libfs::format::{S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use libfs::{
    format, Attr, BlockDevice, Error, ExtentChange, ExtentListener, FallocateMode, FormatOptions,
    Fs, MemDevice, OpenOptions, RenameMode, SetAttr, XattrMode, BLOCK_SIZE, ROOT_INO,
};
use std::collections::BTreeMap;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Once};

const DEVICE_BYTES: u64 = 4 << 20;
/// Files of the setup, in a directory of their own: enough of them that the directory
/// is a tree of several nodes and their inodes fill many blocks of the inode table.
static MANY: LazyLock<Vec<String>> =
    LazyLock::new(|| (0..400).map(|i| format!("/many/f{i:03}")).collect());
/// Marks the panics this test injects, so the panic hook keeps quiet about them.
const INJECTED: &str = "injected panic";

/// Keeps the hundreds of injected panics off stderr; any other panic is still printed.
fn silence_injected_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("");
            // The test's own failures quote the injected panic; they do not start with it.
            if !message.starts_with(INJECTED) {
                default(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------------------
// A device that panics on its Nth call

#[derive(Debug)]
struct PanicDevice {
    inner: MemDevice,
    /// Calls since `arm`.
    calls: AtomicU64,
    /// The call that panics (counted from 1); 0 when disarmed.
    panic_at: AtomicU64,
    fired: AtomicBool,
}

impl PanicDevice {
    fn new(image: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            inner: MemDevice::from_bytes(image),
            calls: AtomicU64::new(0),
            panic_at: AtomicU64::new(0),
            fired: AtomicBool::new(false),
        })
    }

    fn arm(&self, call: u64) {
        self.calls.store(0, Ordering::SeqCst);
        self.fired.store(false, Ordering::SeqCst);
        self.panic_at.store(call, Ordering::SeqCst);
    }

    /// Disarms; true if the panic happened.
    fn disarm(&self) -> bool {
        self.panic_at.store(0, Ordering::SeqCst);
        self.fired.load(Ordering::SeqCst)
    }

    fn count(&self, what: &str) {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if call == self.panic_at.load(Ordering::SeqCst) {
            self.panic_at.store(0, Ordering::SeqCst);
            self.fired.store(true, Ordering::SeqCst);
            panic!("{INJECTED} at device call {call} ({what})");
        }
    }
}

impl BlockDevice for PanicDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.count("read");
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.count("write");
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.count("sync");
        self.inner.sync()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
}

/// A metadata cache of four blocks and few cached inodes, so operations read as they go.
fn small_cache() -> OpenOptions {
    OpenOptions {
        cache_bytes: 4 * BLOCK_SIZE,
        inode_cache: 16,
        ..OpenOptions::default()
    }
}

fn open(device: &Arc<PanicDevice>) -> Fs {
    Fs::open_device(device.clone(), &small_cache()).expect("open")
}

fn fsck_is_clean(device: &PanicDevice, context: &str) {
    let copy = Arc::new(MemDevice::from_bytes(device.inner.snapshot()));
    let report = libfs::fsck::check(copy).expect("fsck runs");
    assert!(report.is_clean(), "{context}: fsck: {report}");
}

// ---------------------------------------------------------------------------------------
// The model: every path with what it holds

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: Kind,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

type Model = BTreeMap<String, Node>;

fn node(kind: Kind) -> Node {
    Node {
        kind,
        xattrs: BTreeMap::new(),
    }
}

fn file_mut<'a>(model: &'a mut Model, path: &str) -> &'a mut Vec<u8> {
    match model.get_mut(path).map(|node| &mut node.kind) {
        Some(Kind::File(data)) => data,
        other => panic!("model: {path} is not a file: {other:?}"),
    }
}

/// Every path under (and including) `from` moves under `to`.
fn move_subtree(model: &mut Model, from: &str, to: &str) {
    model.retain(|path, _| path != to && !path.starts_with(&format!("{to}/")));
    let moved: Vec<String> = model
        .keys()
        .filter(|path| *path == from || path.starts_with(&format!("{from}/")))
        .cloned()
        .collect();
    for path in moved {
        let value = model.remove(&path).expect("listed");
        model.insert(format!("{to}{}", &path[from.len()..]), value);
    }
}

/// The tree as the file system shows it.
fn snapshot(fs: &Fs) -> libfs::Result<Model> {
    let mut model = Model::new();
    walk(fs, ROOT_INO, "", &mut model)?;
    Ok(model)
}

fn walk(fs: &Fs, dir: u64, prefix: &str, model: &mut Model) -> libfs::Result<()> {
    for entry in fs.list_dir(dir)? {
        let path = format!("{prefix}/{}", String::from_utf8_lossy(&entry.name));
        let attr = fs.getattr(entry.ino)?;
        let kind = match attr.mode & S_IFMT {
            S_IFDIR => Kind::Dir,
            S_IFREG => {
                let mut data = vec![0u8; attr.size as usize];
                let read = fs.read_at(attr.ino, 0, &mut data)?;
                data.truncate(read);
                Kind::File(data)
            }
            S_IFLNK => Kind::Symlink(fs.readlink(attr.ino)?),
            other => panic!("{path}: unexpected file type {other:#o}"),
        };
        let mut xattrs = BTreeMap::new();
        for name in fs.listxattr(attr.ino)? {
            let value = fs.getxattr(attr.ino, &name)?;
            xattrs.insert(name, value);
        }
        model.insert(path.clone(), Node { kind, xattrs });
        if attr.mode & S_IFMT == S_IFDIR {
            walk(fs, attr.ino, &path, model)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Operations

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(u32::from(seed) | 1).rotate_right(3) as u8 ^ seed)
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    /// A lookup: it changes nothing, so a panic in it has nothing to roll back.
    Lookup(&'static str),
    Create(&'static str),
    Mkdir(&'static str),
    Symlink(&'static str, &'static [u8]),
    Write(&'static str, u64, usize, u8),
    Truncate(&'static str, u64),
    /// Allocates without changing the size (reads as zeros either way).
    Fallocate(&'static str, u64, u64),
    Rename(&'static str, &'static str),
    Unlink(&'static str),
    Rmdir(&'static str),
    SetXattr(&'static str, &'static [u8], usize, u8),
    RemoveXattr(&'static str, &'static [u8]),
    /// The operation, then a sync: the panic may strike inside the commit.
    Synced(Box<Op>),
}

fn split(path: &str) -> (&str, &[u8]) {
    let at = path.rfind('/').expect("absolute path");
    let parent = if at == 0 { "/" } else { &path[..at] };
    (parent, &path.as_bytes()[at + 1..])
}

fn resolve(fs: &Fs, path: &str) -> libfs::Result<Attr> {
    fs.resolve(Path::new(path))
}

impl Op {
    /// Runs the operation; `armed` is called once the paths are resolved, just before
    /// the call that changes something (a panic in a lookup is the `Lookup` operation's).
    fn run(&self, fs: &Fs, armed: &dyn Fn()) -> libfs::Result<()> {
        let ino = |path: &str| resolve(fs, path).map(|attr| attr.ino);
        match self {
            Op::Lookup(path) => {
                armed();
                resolve(fs, path)?;
            }
            Op::Create(path) => {
                let (parent, name) = split(path);
                let parent = ino(parent)?;
                armed();
                fs.create(parent, name, 0o644, 0, 0)?;
            }
            Op::Mkdir(path) => {
                let (parent, name) = split(path);
                let parent = ino(parent)?;
                armed();
                fs.mkdir(parent, name, 0o755, 0, 0)?;
            }
            Op::Symlink(path, target) => {
                let (parent, name) = split(path);
                let parent = ino(parent)?;
                armed();
                fs.symlink(parent, name, target, 0, 0)?;
            }
            Op::Write(path, offset, len, seed) => {
                let file = ino(path)?;
                armed();
                let written = fs.write_at(file, *offset, &pattern(*len, *seed))?;
                assert_eq!(written, *len, "short write");
            }
            Op::Truncate(path, size) => {
                let changes = SetAttr {
                    size: Some(*size),
                    ..SetAttr::default()
                };
                let file = ino(path)?;
                armed();
                fs.setattr(file, &changes)?;
            }
            Op::Fallocate(path, offset, len) => {
                let mode = FallocateMode {
                    keep_size: true,
                    punch_hole: false,
                };
                let file = ino(path)?;
                armed();
                fs.fallocate(file, *offset, *len, mode)?;
            }
            Op::Rename(from, to) => {
                let (from_parent, from_name) = split(from);
                let (to_parent, to_name) = split(to);
                let (from_parent, to_parent) = (ino(from_parent)?, ino(to_parent)?);
                armed();
                fs.rename(
                    from_parent,
                    from_name,
                    to_parent,
                    to_name,
                    RenameMode::Replace,
                )?;
            }
            Op::Unlink(path) => {
                let (parent, name) = split(path);
                let parent = ino(parent)?;
                armed();
                fs.unlink(parent, name)?;
            }
            Op::Rmdir(path) => {
                let (parent, name) = split(path);
                let parent = ino(parent)?;
                armed();
                fs.rmdir(parent, name)?;
            }
            Op::SetXattr(path, name, len, seed) => {
                let value = pattern(*len, *seed);
                let file = ino(path)?;
                armed();
                fs.setxattr(file, name, &value, XattrMode::Any)?;
            }
            Op::RemoveXattr(path, name) => {
                let file = ino(path)?;
                armed();
                fs.removexattr(file, name)?;
            }
            Op::Synced(op) => {
                op.run(fs, armed)?;
                fs.sync()?;
            }
        }
        Ok(())
    }

    fn apply(&self, model: &mut Model) {
        match self {
            Op::Create(path) => {
                model.insert(path.to_string(), node(Kind::File(Vec::new())));
            }
            Op::Mkdir(path) => {
                model.insert(path.to_string(), node(Kind::Dir));
            }
            Op::Symlink(path, target) => {
                model.insert(path.to_string(), node(Kind::Symlink(target.to_vec())));
            }
            Op::Write(path, offset, len, seed) => {
                let data = file_mut(model, path);
                let (offset, end) = (*offset as usize, *offset as usize + len);
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[offset..end].copy_from_slice(&pattern(*len, *seed));
            }
            Op::Truncate(path, size) => file_mut(model, path).resize(*size as usize, 0),
            Op::Lookup(_) | Op::Fallocate(..) => {}
            Op::Rename(from, to) => move_subtree(model, from, to),
            Op::Unlink(path) | Op::Rmdir(path) => {
                model.remove(*path);
            }
            Op::SetXattr(path, name, len, seed) => {
                let node = model.get_mut(*path).expect("model: xattr target");
                node.xattrs.insert(name.to_vec(), pattern(*len, *seed));
            }
            Op::RemoveXattr(path, name) => {
                let node = model.get_mut(*path).expect("model: xattr target");
                node.xattrs.remove(*name);
            }
            Op::Synced(op) => op.apply(model),
        }
    }
}

/// What the images start with: a bit of everything, a file with an xattr tree.
fn setup() -> Vec<Op> {
    vec![
        Op::Mkdir("/d"),
        Op::Create("/d/f"),
        Op::Write("/d/f", 0, 3 * BLOCK_SIZE, 1),
        Op::Create("/g"),
        Op::Write("/g", 0, 10_000, 2),
        Op::SetXattr("/g", b"user.a", 100, 3),
        Op::Mkdir("/e"),
        Op::Create("/e/h"),
        Op::Write("/e/h", 0, 5000, 4),
        Op::Symlink("/s", b"d/f"),
    ]
    .into_iter()
    // Enough inodes, directory entries and extents that the metadata outgrows the cache.
    .chain(std::iter::once(Op::Mkdir("/many")))
    .chain(MANY.iter().map(|path| Op::Create(path)))
    .chain((0..24).map(|i| Op::Write("/e/h", 2 * i * BLOCK_SIZE as u64, 100, i as u8)))
    .collect()
}

/// The operations swept, each on the image the ones before it left.
fn script() -> Vec<Op> {
    vec![
        Op::Create("/d/new"),
        Op::Write("/d/new", 0, 9000, 5),
        Op::Write("/g", 10_000, 5000, 6),
        Op::Write("/g", 8 * BLOCK_SIZE as u64, BLOCK_SIZE, 7),
        Op::Truncate("/d/f", 5000),
        Op::Truncate("/e/h", 40_000),
        Op::Fallocate("/d/new", 0, 16 * BLOCK_SIZE as u64),
        Op::Mkdir("/d/sub"),
        Op::Rename("/d/new", "/e/moved"),
        Op::Rename("/e/h", "/g"),
        Op::SetXattr("/e/moved", b"user.big", 900, 8),
        Op::SetXattr("/e/moved", b"user.small", 10, 9),
        Op::RemoveXattr("/e/moved", b"user.big"),
        Op::Symlink("/e/link", b"../d/f"),
        Op::Unlink("/d/f"),
        Op::Rmdir("/d/sub"),
        Op::Rename("/e", "/d/e2"),
        Op::Create("/many/new"),
        Op::Rename("/many/f010", "/many/f350"),
        Op::Rename("/many/f200", "/d/from_many"),
        Op::Unlink("/many/f300"),
        Op::Unlink("/g"),
        Op::Truncate("/d/e2/moved", 0),
        Op::Write("/many/f040", 0, 6 * BLOCK_SIZE, 12),
        Op::Lookup("/many/f399"),
        Op::Synced(Box::new(Op::Create("/z"))),
        Op::Synced(Box::new(Op::Write("/z", 0, 3 * BLOCK_SIZE, 10))),
        Op::Synced(Box::new(Op::Unlink("/d/e2/moved"))),
    ]
}

fn fresh_image(ops: &[Op]) -> (Vec<u8>, Model) {
    let device = PanicDevice::new(vec![0; DEVICE_BYTES as usize]);
    let options = FormatOptions {
        // The shortest default journal: operations commit on their own now and then, so
        // panics also strike inside commits.
        journal_blocks: Some(64),
        inodes: Some(1024),
        ..FormatOptions::default()
    };
    format(device.clone(), &options).expect("format");
    let fs = open(&device);
    let mut model = Model::new();
    for op in ops {
        op.run(&fs, &|| {})
            .unwrap_or_else(|e| panic!("setup {op:?}: {e}"));
        op.apply(&mut model);
    }
    fs.close().expect("close");
    (device.inner.snapshot(), model)
}

/// A panic that escaped the file system: the error this test reports for it.
fn escaped(payload: &(dyn std::any::Any + Send)) -> String {
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_else(|| "?".into());
    format!("the panic escaped the file system: {message}")
}

#[test]
fn a_panic_at_any_device_call_commits_nothing_partial() {
    silence_injected_panics();
    let (mut image, mut model) = fresh_image(&setup());
    let (mut rolled_back, mut stopped) = (0, 0);
    let mut escapes = Vec::new();
    for op in script() {
        let before = model.clone();
        let mut after = model.clone();
        op.apply(&mut after);
        let mut call = 1;
        loop {
            let context = format!("{op:?}, panic at device call {call}");
            let device = PanicDevice::new(image.clone());
            // Armed right after the open: the caches are cold.
            let fs = open(&device);
            let outcome =
                panic::catch_unwind(AssertUnwindSafe(|| op.run(&fs, &|| device.arm(call))));
            if !device.disarm() {
                outcome
                    .unwrap_or_else(|payload| panic!("{context}: {}", escaped(&*payload)))
                    .unwrap_or_else(|e| panic!("{context}: without a panic: {e}"));
                assert_eq!(snapshot(&fs).expect("tree"), after, "{context}: done");
                fs.close().expect("close");
                fsck_is_clean(&device, &context);
                image = device.inner.snapshot();
                eprintln!("{op:?}: a panic at each of {} device calls", call - 1);
                break;
            }
            let error = match outcome {
                Ok(Ok(())) => panic!("{context}: the operation reported success"),
                Ok(Err(error)) => Ok(error),
                Err(payload) => Err(escaped(&*payload)),
            };
            if let Ok(Error::Stopped(reason)) = &error {
                stopped += 1;
                check_stopped(fs, &device, reason, &before, &after, &context);
                call += 1;
                continue;
            }
            // Rolled back (or, without the fix, escaped): the state checks come first and
            // an escape is only noted, so that a partial commit shows as what it is.
            assert_eq!(
                snapshot(&fs).expect("tree"),
                before,
                "{context}: the panicked operation left changes"
            );
            fs.sync().expect("sync after the rollback");
            fsck_is_clean(&device, &format!("{context}, synced"));
            match error {
                Ok(Error::Panicked { message, .. }) => {
                    assert!(message.contains(INJECTED), "{context}: {message}")
                }
                Ok(other) => panic!("{context}: expected Panicked, got {other:?}"),
                Err(escaped) => escapes.push(format!("{context}: {escaped}")),
            }
            rolled_back += 1;
            // The file system carries on.
            op.run(&fs, &|| {})
                .unwrap_or_else(|e| panic!("{context}: retried after the rollback: {e}"));
            assert_eq!(snapshot(&fs).expect("tree"), after, "{context}: retried");
            fs.close().expect("close");
            fsck_is_clean(&device, &format!("{context}, retried"));
            let fs = open(&device);
            assert_eq!(snapshot(&fs).expect("tree"), after, "{context}: reopened");
            drop(fs);
            call += 1;
        }
        model = after;
    }
    eprintln!("{rolled_back} panics rolled back, {stopped} stopped the file system");
    // The sweep must have hit both outcomes, or it tests less than it claims.
    assert!(rolled_back >= 40, "only {rolled_back} panics rolled back");
    assert!(
        stopped >= 15,
        "only {stopped} panics stopped the file system"
    );
    assert!(
        escapes.is_empty(),
        "{} panics escaped: {escapes:#?}",
        escapes.len()
    );
}

/// A file system stopped by a panic takes no more changes; reopened, it is consistent
/// and shows the operation either wholly or not at all.
fn check_stopped(
    fs: Fs,
    device: &Arc<PanicDevice>,
    reason: &str,
    before: &Model,
    after: &Model,
    context: &str,
) {
    assert!(reason.contains(INJECTED), "{context}: unclear: {reason}");
    match fs.mkdir(ROOT_INO, b"later", 0o755, 0, 0) {
        Err(Error::Stopped(later)) => {
            assert!(later.contains(INJECTED), "{context}: later: {later}")
        }
        other => panic!("{context}: a change after the stop: {other:?}"),
    }
    assert!(
        matches!(fs.sync(), Err(Error::Stopped(_))),
        "{context}: a sync after the stop must fail"
    );
    drop(fs);
    fsck_is_clean(device, context);
    let fs = open(device);
    let tree = snapshot(&fs).expect("tree");
    assert!(
        tree == *before || tree == *after,
        "{context}: reopened after the stop: {tree:#?}"
    );
    drop(fs);
    fsck_is_clean(device, &format!("{context}, reopened"));
}

// ---------------------------------------------------------------------------------------
// A listener that panics

#[derive(Debug)]
struct PanickingListener;

impl ExtentListener for PanickingListener {
    fn extents_changed(&self, change: &ExtentChange) {
        panic!("{INJECTED} in a listener, inode {}", change.ino);
    }
}

#[test]
fn a_panicking_listener_stops_the_file_system_and_nothing_is_committed() {
    silence_injected_panics();
    let (image, model) = fresh_image(&setup());
    let device = PanicDevice::new(image);
    let fs = open(&device);
    fs.subscribe(Arc::new(PanickingListener));
    let file = resolve(&fs, "/g").expect("/g").ino;

    // Told of the new extents part way, listeners may hold a map the rollback would
    // contradict: the file system stops instead.
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        fs.write_at(file, 64 * BLOCK_SIZE as u64, &pattern(BLOCK_SIZE, 11))
    }));
    let error = match outcome {
        Ok(result) => result.expect_err("the write must report the listener's panic"),
        Err(payload) => panic!("{}", escaped(&*payload)),
    };
    match &error {
        Error::Stopped(reason) => {
            assert!(
                reason.contains(INJECTED) && reason.contains("listeners"),
                "unclear: {reason}"
            );
        }
        other => panic!("expected Stopped, got {other:?}"),
    }
    assert_eq!(error.errno(), libc::EIO);
    match fs.create(ROOT_INO, b"later", 0o644, 0, 0) {
        Err(Error::Stopped(reason)) => assert!(reason.contains(INJECTED), "{reason}"),
        other => panic!("a change after the stop: {other:?}"),
    }
    assert!(
        fs.sync().is_err(),
        "a sync after the stop must not commit the write"
    );
    // Reads still work until the reopen.
    assert!(resolve(&fs, "/d/f").is_ok(), "lookups still work");
    drop(fs);

    fsck_is_clean(&device, "after the listener's panic");
    let fs = open(&device);
    assert_eq!(
        snapshot(&fs).expect("tree"),
        model,
        "the write the listener panicked on must not be committed"
    );
    // Reopened (without the listener), the file system takes changes again.
    fs.create(ROOT_INO, b"later", 0o644, 0, 0)
        .expect("create after the reopen");
    fs.close().expect("close");
    fsck_is_clean(&device, "after the reopen");
}
