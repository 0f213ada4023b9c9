//! Capacity tests: running out of blocks and inodes, reusing freed space, and the large
//! end of the scale (a file of 100,000 extents, a directory of 100,000 entries).
//!
//! Every failure must leave the image exactly as the operations that succeeded made it:
//! checked by comparing the whole tree with an expectation, before and after a reopen,
//! and with `libfs::fsck`.

use libfs::{
    format, BlockDevice, Error, FallocateMode, FileDevice, FormatOptions, Fs, MemDevice,
    OpenOptions, SetAttr, XattrMode, BLOCK_SIZE, ROOT_INO,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const BS: u64 = BLOCK_SIZE as u64;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn mem_image(bytes: u64, options: &FormatOptions) -> Arc<MemDevice> {
    let device = Arc::new(MemDevice::new(bytes));
    format(device.clone(), options).expect("format");
    device
}

fn open(device: &Arc<dyn BlockDevice>) -> Fs {
    Fs::open_device(device.clone(), &OpenOptions::default()).expect("open")
}

/// Deterministic contents.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(seed | 1) >> 2) as u8 ^ (seed as u8) ^ (i >> 12) as u8)
        .collect()
}

/// Runs fsck on a closed image and fails the test with its problems unless clean.
fn assert_fsck_clean(device: &Arc<dyn BlockDevice>, when: &str) {
    let report = libfs::fsck::check(device.clone()).expect("fsck runs");
    let problems: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
    assert!(
        report.is_clean(),
        "fsck {when}: {} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// What the tree should hold: path -> contents (None for a directory).
type Tree = BTreeMap<String, Option<Vec<u8>>>;

/// Reads the whole tree.
fn read_tree(fs: &Fs) -> Tree {
    let mut tree = Tree::new();
    let mut stack = vec![(ROOT_INO, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for entry in fs.list_dir(dir).expect("list_dir") {
            let path = format!("{prefix}/{}", String::from_utf8_lossy(&entry.name));
            let attr = fs.getattr(entry.ino).expect("getattr");
            assert_eq!(
                attr.mode & libfs::format::S_IFMT,
                entry.kind,
                "{path}: type"
            );
            if attr.is_dir() {
                stack.push((entry.ino, path.clone()));
                tree.insert(path, None);
            } else {
                let mut data = vec![0u8; attr.size as usize];
                let n = fs.read_at(entry.ino, 0, &mut data).expect("read");
                assert_eq!(n, data.len(), "{path}: short read");
                tree.insert(path, Some(data));
            }
        }
    }
    tree
}

fn assert_tree(fs: &Fs, want: &Tree, when: &str) {
    let got = read_tree(fs);
    let got_names: Vec<&String> = got.keys().collect();
    let want_names: Vec<&String> = want.keys().collect();
    assert_eq!(got_names, want_names, "{when}: names differ");
    for (path, data) in want {
        match (data, &got[path]) {
            (None, None) => {}
            (Some(want), Some(got)) => {
                assert_eq!(got.len(), want.len(), "{when}: {path}: size");
                if let Some(at) = (0..got.len()).find(|i| got[*i] != want[*i]) {
                    panic!(
                        "{when}: {path}: byte {at} is {:#x}, expected {:#x}",
                        got[at], want[at]
                    );
                }
            }
            _ => panic!("{when}: {path}: type differs"),
        }
    }
}

fn apply_write(content: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if content.len() < end {
        content.resize(end, 0);
    }
    content[offset as usize..end].copy_from_slice(data);
}

fn expect_nospace<T: std::fmt::Debug>(result: libfs::Result<T>, what: &str) {
    match result {
        Err(e @ (Error::NoSpace | Error::NoInodes)) => {
            assert_eq!(e.errno(), libc::ENOSPC, "{what}: errno of {e}");
        }
        other => panic!("{what}: expected ENOSPC, got {other:?}"),
    }
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("exofs-capacity-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// ENOSPC
// ---------------------------------------------------------------------------------------

/// Fills a 4 MiB image through fragmented writes (holes, partial overwrites, appends,
/// writes straddling mapped and unmapped blocks) until it is full, then runs metadata
/// operations into ENOSPC. After every failure the image must hold exactly what
/// succeeded: compared at once, after a reopen, and by fsck. Deleting everything must
/// give back every block and inode, and the space must be writable again.
fn fill_round(seed: u64) {
    let when = |what: &str| format!("seed {seed}: {what}");
    let device: Arc<dyn BlockDevice> = mem_image(4 << 20, &FormatOptions::default());
    let fs = open(&device);
    let initial = fs.statfs().expect("statfs");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tree = Tree::new();
    let dir = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).expect("mkdir");
    tree.insert("/d".into(), None);
    let mut files = Vec::new();
    for i in 0..(3 + seed % 6) {
        let (parent, prefix) = if i % 2 == 0 {
            (ROOT_INO, "")
        } else {
            (dir.ino, "/d")
        };
        let name = format!("f{i}");
        let attr = fs
            .create(parent, name.as_bytes(), 0o644, 0, 0)
            .expect("create");
        let path = format!("{prefix}/{name}");
        tree.insert(path.clone(), Some(Vec::new()));
        files.push((path, attr.ino));
    }

    let mut failures = 0;
    let mut shorts = 0;
    let mut writes = 0u64;
    while failures < 12 {
        writes += 1;
        assert!(writes < 100_000, "{}", when("the image never filled up"));
        let (path, ino) = files.choose(&mut rng).expect("files").clone();
        let size = tree[&path].as_ref().map_or(0, Vec::len) as u64;
        let (offset, len) = match rng.gen_range(0..10) {
            0..=5 => (
                rng.gen_range(0..((size / BS) * 2 + 8).min(2048)) * BS,
                rng.gen_range(1..=3usize) * BLOCK_SIZE,
            ),
            6 | 7 => (size, rng.gen_range(1..65536)),
            _ => (rng.gen_range(0..size + 65536), rng.gen_range(1..20000)),
        };
        let data = pattern(len, writes);
        match fs.write_at(ino, offset, &data) {
            Ok(n) => {
                assert!(n > 0, "{}", when("write of {len} bytes returned 0"));
                let content = tree.get_mut(&path).and_then(Option::as_mut).expect("file");
                apply_write(content, offset, &data[..n]);
                if n < len {
                    shorts += 1;
                    failures += 1;
                    // The device filled part way; the rest cannot be written.
                    expect_nospace(
                        fs.write_at(ino, offset + n as u64, &data[n..]),
                        &when("write after a short write"),
                    );
                }
            }
            Err(e) => {
                expect_nospace::<()>(Err(e), &when("write"));
                failures += 1;
            }
        }
        if failures > 0 && writes.is_multiple_of(7) {
            // Everything written so far reads back.
            assert_tree(&fs, &tree, &when("while full"));
        }
    }
    assert_tree(&fs, &tree, &when("after filling"));
    let full = fs.statfs().expect("statfs");
    assert!(
        full.free_blocks < 16,
        "{}",
        when(&format!("{} blocks still free", full.free_blocks))
    );

    // Metadata operations on a full device.
    let mut made_dirs = 0;
    for i in 0..200 {
        let name = format!("m{i}");
        match fs.mkdir(ROOT_INO, name.as_bytes(), 0o755, 0, 0) {
            Ok(_) => {
                made_dirs += 1;
                tree.insert(format!("/{name}"), None);
            }
            Err(e) => {
                expect_nospace::<()>(Err(e), &when("mkdir"));
                assert!(matches!(
                    fs.lookup(ROOT_INO, name.as_bytes()),
                    Err(Error::NotFound)
                ));
                break;
            }
        }
    }
    assert!(made_dirs < 200, "{}", when("mkdir never failed"));
    for i in 0..1000 {
        let name = format!("e{i}");
        match fs.create(dir.ino, name.as_bytes(), 0o644, 0, 0) {
            Ok(_) => {
                tree.insert(format!("/d/{name}"), Some(Vec::new()));
            }
            Err(e) => {
                expect_nospace::<()>(Err(e), &when("create"));
                assert!(matches!(
                    fs.lookup(dir.ino, name.as_bytes()),
                    Err(Error::NotFound)
                ));
                break;
            }
        }
    }
    let (_, xattr_ino) = &files[0];
    let mut xattrs = 0;
    for i in 0..1000 {
        let name = format!("user.attr{i}");
        match fs.setxattr(*xattr_ino, name.as_bytes(), &[7u8; 600], XattrMode::Create) {
            Ok(()) => xattrs += 1,
            Err(e) => {
                expect_nospace::<()>(Err(e), &when("setxattr"));
                break;
            }
        }
    }
    assert_eq!(
        fs.listxattr(*xattr_ino).expect("listxattr").len(),
        xattrs,
        "{}",
        when("xattrs")
    );
    // A symlink needs a data block.
    expect_nospace(
        fs.symlink(ROOT_INO, b"link", b"target", 0, 0),
        &when("symlink"),
    );
    // Preallocation past the end of a file needs blocks.
    for keep_size in [false, true] {
        let (path, ino) = &files[files.len() - 1];
        let size = tree[path].as_ref().map_or(0, Vec::len) as u64;
        let mode = FallocateMode {
            keep_size,
            punch_hole: false,
        };
        expect_nospace(fs.fallocate(*ino, size, 1 << 20, mode), &when("fallocate"));
        let attr = fs.getattr(*ino).expect("getattr");
        assert_eq!(attr.size, size, "{}", when("size after a failed fallocate"));
    }
    // Punching a hole may split an extent (and need a tree node): done or ENOSPC.
    let punch = FallocateMode {
        keep_size: true,
        punch_hole: true,
    };
    let mut punched = 0;
    for (path, ino) in &files {
        let content = tree.get_mut(path).and_then(Option::as_mut).expect("file");
        let offset = (content.len() as u64 / 3).next_multiple_of(BS) + 100;
        let len = 2 * BS + 200;
        match fs.fallocate(*ino, offset, len, punch) {
            Ok(()) => {
                punched += 1;
                let end = (offset + len).min(content.len() as u64);
                if end > offset {
                    content[offset as usize..end as usize].fill(0);
                }
            }
            Err(e) => expect_nospace::<()>(Err(e), &when("punch")),
        }
    }
    assert_tree(&fs, &tree, &when("after metadata ENOSPC"));

    fs.close().expect("close");
    assert_fsck_clean(&device, &when("after ENOSPC"));
    let fs = open(&device);
    assert_tree(&fs, &tree, &when("after reopen"));

    // Delete everything: every block and inode comes back.
    let mut paths: Vec<String> = tree.keys().cloned().collect();
    paths.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for path in &paths {
        let (parent_path, name) = path.rsplit_once('/').expect("path");
        let parent = if parent_path.is_empty() {
            ROOT_INO
        } else {
            fs.resolve(parent_path.as_ref()).expect("parent").ino
        };
        if tree[path].is_none() {
            fs.rmdir(parent, name.as_bytes()).expect("rmdir");
        } else {
            fs.unlink(parent, name.as_bytes()).expect("unlink");
        }
    }
    fs.sync().expect("sync");
    fs.checkpoint().expect("checkpoint");
    let empty = fs.statfs().expect("statfs");
    assert_eq!(
        (empty.free_blocks, empty.free_inodes),
        (initial.free_blocks, initial.free_inodes),
        "{}",
        when("free blocks and inodes after deleting everything")
    );
    // The space is writable again, all of it, by one contiguous file.
    let big = fs.create(ROOT_INO, b"big", 0o644, 0, 0).expect("create");
    let chunk = pattern(1 << 20, seed);
    let mut written = 0u64;
    loop {
        match fs.write_at(big.ino, written, &chunk) {
            Ok(n) => {
                written += n as u64;
                if n < chunk.len() {
                    break;
                }
            }
            Err(e) => {
                expect_nospace::<()>(Err(e), &when("refill"));
                break;
            }
        }
    }
    assert_eq!(
        written / BS,
        initial.free_blocks,
        "{}",
        when("a refill after deleting everything uses every free block")
    );
    fs.close().expect("close");
    assert_fsck_clean(&device, &when("after refill"));
    eprintln!(
        "fill seed {seed}: {writes} writes, {shorts} short, {made_dirs} dirs, {xattrs} xattrs and {punched} punches on a full device"
    );
}

#[test]
fn enospc_leaves_no_partial_metadata() {
    for seed in 0..40 {
        fill_round(seed);
    }
}

/// Writes over a fragmented file (mapped blocks alternating with holes) when only `k`
/// blocks are free, for many `k`: the write stops part way with a short count at some
/// hole, possibly just when the extent tree needs a new node. Whatever was reported
/// written must be there, and nothing else may have changed (no leaked or lost blocks).
#[test]
fn short_write_at_enospc_keeps_metadata_whole() {
    for free in 0..140u64 {
        let when = |what: &str| format!("{free} blocks free: {what}");
        let device: Arc<dyn BlockDevice> = mem_image(4 << 20, &FormatOptions::default());
        let fs = open(&device);
        let initial = fs.statfs().expect("statfs");
        let mut tree = Tree::new();
        // A file of 300 single-block extents (blocks 0, 2, 4, ...): an extent tree.
        let sparse = fs.create(ROOT_INO, b"sparse", 0o644, 0, 0).expect("create");
        let mut content = Vec::new();
        for i in 0..300u64 {
            let data = pattern(BLOCK_SIZE, i + 1);
            assert_eq!(
                fs.write_at(sparse.ino, 2 * i * BS, &data).expect("write"),
                BLOCK_SIZE
            );
            apply_write(&mut content, 2 * i * BS, &data);
        }
        // Fill the rest of the device, then give `free` blocks back.
        let filler = fs.create(ROOT_INO, b"filler", 0o644, 0, 0).expect("create");
        let chunk = pattern(256 << 10, 77);
        let mut filled = 0u64;
        loop {
            match fs.write_at(filler.ino, filled, &chunk) {
                Ok(n) if n == chunk.len() => filled += n as u64,
                Ok(n) => {
                    filled += n as u64;
                    break;
                }
                Err(e) => {
                    expect_nospace::<()>(Err(e), &when("filling"));
                    break;
                }
            }
        }
        let kept = filled - (free * BS).min(filled);
        fs.setattr(
            filler.ino,
            &SetAttr {
                size: Some(kept),
                ..SetAttr::default()
            },
        )
        .expect("truncate");
        fs.checkpoint().expect("checkpoint");
        tree.insert(
            "/filler".into(),
            Some(chunk.repeat(4 << 20 >> 18)[..kept as usize].to_vec()),
        );

        // Fill the holes in one write.
        let data = pattern(600 * BLOCK_SIZE, 1234);
        match fs.write_at(sparse.ino, 0, &data) {
            Ok(n) => {
                assert!(
                    n >= BLOCK_SIZE,
                    "{}",
                    when("short count below the first mapped block")
                );
                apply_write(&mut content, 0, &data[..n]);
                if n < data.len() {
                    expect_nospace(
                        fs.write_at(sparse.ino, n as u64, &data[n..]),
                        &when("write after the short write"),
                    );
                }
            }
            Err(e) => expect_nospace::<()>(Err(e), &when("write")),
        }
        tree.insert("/sparse".into(), Some(content));
        assert_tree(&fs, &tree, &when("after the short write"));
        fs.close().expect("close");
        assert_fsck_clean(&device, &when("after the short write"));
        let fs = open(&device);
        assert_tree(&fs, &tree, &when("reopened"));
        fs.unlink(ROOT_INO, b"sparse").expect("unlink");
        fs.unlink(ROOT_INO, b"filler").expect("unlink");
        fs.checkpoint().expect("checkpoint");
        assert_eq!(
            fs.statfs().expect("statfs").free_blocks,
            initial.free_blocks,
            "{}",
            when("blocks leaked")
        );
        fs.close().expect("close");
    }
}

/// Creates files and directories until the inodes run out: ENOSPC (NoInodes), nothing
/// half made, links (which need no inode) still work, and freed inodes are reused.
#[test]
fn inode_exhaustion_leaves_no_partial_metadata() {
    let device: Arc<dyn BlockDevice> = mem_image(
        8 << 20,
        &FormatOptions {
            inodes: Some(320),
            ..FormatOptions::default()
        },
    );
    let fs = open(&device);
    let initial = fs.statfs().expect("statfs");
    let mut tree = Tree::new();
    let mut dirs = vec![(ROOT_INO, String::new())];
    let mut made = 0u64;
    let mut first_file = None;
    loop {
        let (parent, prefix) = dirs[made as usize % dirs.len()].clone();
        let name = format!("n{made}");
        let path = format!("{prefix}/{name}");
        let result = match made % 5 {
            0 => fs.mkdir(parent, name.as_bytes(), 0o755, 0, 0),
            4 => fs.symlink(parent, name.as_bytes(), b"somewhere", 0, 0),
            _ => fs.create(parent, name.as_bytes(), 0o644, 0, 0),
        };
        match result {
            Ok(attr) => {
                made += 1;
                if attr.is_dir() {
                    dirs.push((attr.ino, path.clone()));
                    tree.insert(path, None);
                } else if attr.is_symlink() {
                    tree.insert(path, Some(b"somewhere".to_vec()));
                } else {
                    let data = pattern(100, made);
                    assert_eq!(fs.write_at(attr.ino, 0, &data).expect("write"), 100);
                    first_file.get_or_insert((attr.ino, path.clone()));
                    tree.insert(path, Some(data));
                }
            }
            Err(e) => {
                assert!(matches!(e, Error::NoInodes), "expected NoInodes, got {e:?}");
                expect_nospace::<()>(Err(e), "create when out of inodes");
                assert!(matches!(
                    fs.lookup(parent, name.as_bytes()),
                    Err(Error::NotFound)
                ));
                break;
            }
        }
    }
    assert_eq!(made, initial.free_inodes, "every free inode was used");
    assert_eq!(fs.statfs().expect("statfs").free_inodes, 0);
    expect_nospace(fs.mkdir(ROOT_INO, b"x", 0o755, 0, 0), "mkdir");
    expect_nospace(fs.create(ROOT_INO, b"x", 0o644, 0, 0), "create");
    expect_nospace(fs.symlink(ROOT_INO, b"x", b"t", 0, 0), "symlink");
    assert!(matches!(fs.lookup(ROOT_INO, b"x"), Err(Error::NotFound)));
    // A hard link needs no inode.
    let (file_ino, file_path) = first_file.expect("a file was made");
    fs.link(file_ino, ROOT_INO, b"hardlink").expect("link");
    let content = tree[&file_path].clone();
    tree.insert("/hardlink".into(), content);
    assert_tree(&fs, &tree, "out of inodes");

    fs.close().expect("close");
    assert_fsck_clean(&device, "out of inodes");
    let fs = open(&device);
    assert_tree(&fs, &tree, "out of inodes, reopened");
    // A freed inode is reusable at once.
    fs.unlink(ROOT_INO, b"hardlink").expect("unlink");
    tree.remove("/hardlink");
    let (parent_path, name) = file_path.rsplit_once('/').expect("path");
    let parent = if parent_path.is_empty() {
        ROOT_INO
    } else {
        fs.resolve(parent_path.as_ref()).expect("parent").ino
    };
    fs.unlink(parent, name.as_bytes()).expect("unlink");
    tree.remove(&file_path);
    let again = fs.create(ROOT_INO, b"again", 0o644, 0, 0).expect("create");
    assert_eq!(again.ino, file_ino, "the only free inode is reused");
    tree.insert("/again".into(), Some(Vec::new()));
    expect_nospace(fs.create(ROOT_INO, b"again2", 0o644, 0, 0), "create");
    assert_tree(&fs, &tree, "after reuse");
    fs.close().expect("close");
    assert_fsck_clean(&device, "after inode reuse");
}

/// Fill, delete, fill again, several times: freed blocks become reusable (the write
/// path checkpoints when space is short), and an epoch pin holds them back until it is
/// dropped.
#[test]
fn deleting_files_frees_space_for_reuse() {
    let device: Arc<dyn BlockDevice> = mem_image(4 << 20, &FormatOptions::default());
    let fs = open(&device);
    let initial = fs.statfs().expect("statfs");
    let fill = |fs: &Fs, round: u64| -> u64 {
        let mut total = 0u64;
        for i in 0.. {
            let name = format!("r{round}-{i}");
            let attr = match fs.create(ROOT_INO, name.as_bytes(), 0o644, 0, 0) {
                Ok(attr) => attr,
                Err(e) => {
                    expect_nospace::<()>(Err(e), "create");
                    return total;
                }
            };
            let data = pattern(300 << 10, round * 1000 + i);
            match fs.write_at(attr.ino, 0, &data) {
                Ok(n) => {
                    total += n as u64;
                    let mut back = vec![0u8; n];
                    fs.read_at(attr.ino, 0, &mut back).expect("read");
                    assert!(back == data[..n], "round {round} file {i}: contents");
                    if n < data.len() {
                        return total;
                    }
                }
                Err(e) => {
                    expect_nospace::<()>(Err(e), "write");
                    return total;
                }
            }
        }
        total
    };
    let remove_all = |fs: &Fs| {
        for entry in fs.list_dir(ROOT_INO).expect("list") {
            fs.unlink(ROOT_INO, &entry.name).expect("unlink");
        }
        assert!(fs.list_dir(ROOT_INO).expect("list").is_empty());
    };
    let first = fill(&fs, 0);
    assert!(first > 3 << 20, "only {first} bytes fit in the first fill");
    for round in 1..6 {
        remove_all(&fs);
        if round % 2 == 0 {
            fs.sync().expect("sync");
        }
        // No explicit checkpoint: the write path must make the freed blocks reusable.
        let again = fill(&fs, round);
        assert!(
            again + 64 * BS >= first,
            "round {round}: {again} bytes fit after deleting, {first} the first time"
        );
    }
    remove_all(&fs);
    fs.checkpoint().expect("checkpoint");
    assert_eq!(
        fs.statfs().expect("statfs").free_blocks,
        initial.free_blocks
    );

    // While a pin is held, blocks freed after it are not reused.
    let file = fs.create(ROOT_INO, b"pinned", 0o644, 0, 0).expect("create");
    let size = (initial.free_blocks - 32) * BS;
    let data = pattern(size as usize, 99);
    assert_eq!(fs.write_at(file.ino, 0, &data).expect("write"), data.len());
    let pin = fs.pin_epoch();
    fs.unlink(ROOT_INO, b"pinned").expect("unlink");
    fs.checkpoint().expect("checkpoint");
    let other = fs.create(ROOT_INO, b"other", 0o644, 0, 0).expect("create");
    let n = match fs.write_at(other.ino, 0, &data) {
        Ok(n) => n as u64,
        Err(e) => {
            expect_nospace::<()>(Err(e), "write while pinned");
            0
        }
    };
    assert!(
        n <= 32 * BS,
        "{n} bytes written while the freed blocks were pinned"
    );
    drop(pin);
    fs.setattr(
        other.ino,
        &SetAttr {
            size: Some(0),
            ..SetAttr::default()
        },
    )
    .expect("truncate");
    assert_eq!(fs.write_at(other.ino, 0, &data).expect("write"), data.len());
    let mut back = vec![0u8; data.len()];
    assert_eq!(
        fs.read_at(other.ino, 0, &mut back).expect("read"),
        data.len()
    );
    assert!(back == data, "contents after the pin was dropped");
    fs.close().expect("close");
    assert_fsck_clean(&device, "after reuse rounds");
}

// ---------------------------------------------------------------------------------------
// Scale
// ---------------------------------------------------------------------------------------

/// A file of 100,000 extents: single blocks at every other block offset.
#[test]
fn file_with_100k_extents() {
    const EXTENTS: u64 = 100_000;
    let dir = TempDir::new("extents");
    let image = dir.path().join("extents.img");
    let device: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::create(&image, 640 << 20).expect("image"));
    format(device.clone(), &FormatOptions::default()).expect("format");
    let fs = open(&device);
    let file = fs.create(ROOT_INO, b"sparse", 0o644, 0, 0).expect("create");
    let before = fs.statfs().expect("statfs");
    let block_data = |i: u64| pattern(BLOCK_SIZE, i + 1);
    let started = Instant::now();
    for i in 0..EXTENTS {
        let n = fs
            .write_at(file.ino, 2 * i * BS, &block_data(i))
            .expect("write");
        assert_eq!(n, BLOCK_SIZE);
    }
    eprintln!(
        "100k extents: {} single-block writes in {:.2?}",
        EXTENTS,
        started.elapsed()
    );
    let check = |fs: &Fs, when: &str| {
        let started = Instant::now();
        let extents = fs.extents(file.ino).expect("extents");
        assert_eq!(extents.len() as u64, EXTENTS, "{when}: extent count");
        let mut physical = HashSet::new();
        for (i, e) in extents.iter().enumerate() {
            assert_eq!(
                (e.logical, e.length, e.unwritten),
                (2 * i as u64, 1, false),
                "{when}: extent {i}"
            );
            assert!(physical.insert(e.physical), "{when}: block shared");
        }
        let attr = fs.getattr(file.ino).expect("getattr");
        assert_eq!(attr.size, (2 * EXTENTS - 1) * BS, "{when}: size");
        assert_eq!(attr.blocks, EXTENTS, "{when}: blocks");
        let mut rng = StdRng::seed_from_u64(7);
        let mut buf = vec![0u8; 2 * BLOCK_SIZE];
        for _ in 0..2000 {
            let i = rng.gen_range(0..EXTENTS - 1);
            let n = fs.read_at(file.ino, 2 * i * BS, &mut buf).expect("read");
            assert_eq!(n, buf.len());
            assert!(
                buf[..BLOCK_SIZE] == block_data(i),
                "{when}: block {}",
                2 * i
            );
            assert!(
                buf[BLOCK_SIZE..].iter().all(|b| *b == 0),
                "{when}: hole at block {} is not zero",
                2 * i + 1
            );
        }
        eprintln!(
            "100k extents: checked ({when}) in {:.2?}",
            started.elapsed()
        );
    };
    check(&fs, "written");
    fs.close().expect("close");
    let fs = open(&device);
    check(&fs, "reopened");
    let started = Instant::now();
    fs.setattr(
        file.ino,
        &SetAttr {
            size: Some(0),
            ..SetAttr::default()
        },
    )
    .expect("truncate");
    eprintln!("100k extents: truncate to 0 in {:.2?}", started.elapsed());
    assert!(fs.extents(file.ino).expect("extents").is_empty());
    let attr = fs.getattr(file.ino).expect("getattr");
    assert_eq!((attr.size, attr.blocks), (0, 0));
    // Freed blocks (data and the extent tree) count as free at once.
    assert_eq!(
        fs.statfs().expect("statfs").free_blocks,
        before.free_blocks,
        "free blocks after truncating to 0"
    );
    fs.checkpoint().expect("checkpoint");
    assert_eq!(fs.statfs().expect("statfs").free_blocks, before.free_blocks);
    fs.close().expect("close");
    assert_fsck_clean(&device, "after truncating 100k extents");
}

/// A directory of 100,000 entries: creates and lookups stay O(log n), readdir returns
/// every entry once (also while entries are removed between batches), reopen, remove
/// all.
#[test]
fn directory_with_100k_entries() {
    const ENTRIES: usize = 100_000;
    let dir = TempDir::new("entries");
    let image = dir.path().join("entries.img");
    let device: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::create(&image, 512 << 20).expect("image"));
    format(
        device.clone(),
        &FormatOptions {
            inodes: Some(ENTRIES as u64 + 1024),
            ..FormatOptions::default()
        },
    )
    .expect("format");
    let fs = open(&device);
    let big = fs.mkdir(ROOT_INO, b"big", 0o755, 0, 0).expect("mkdir");
    let name = |i: usize| format!("entry-{i:06}-{}", i.wrapping_mul(2_654_435_761) % 9973);
    let mut inos = Vec::with_capacity(ENTRIES);
    let started = Instant::now();
    let mut lap = Instant::now();
    let mut laps = Vec::new();
    for i in 0..ENTRIES {
        let attr = fs
            .create(big.ino, name(i).as_bytes(), 0o644, 0, 0)
            .expect("create");
        inos.push(attr.ino);
        if (i + 1) % 10_000 == 0 {
            laps.push(lap.elapsed());
            if i + 1 == 10_000 {
                let lookup_started = Instant::now();
                let mut rng = StdRng::seed_from_u64(10);
                for _ in 0..20_000 {
                    let j = rng.gen_range(0..=i);
                    assert_eq!(
                        fs.lookup(big.ino, name(j).as_bytes()).expect("lookup").ino,
                        inos[j]
                    );
                }
                eprintln!(
                    "100k entries: 20k lookups at 10k entries in {:.2?}",
                    lookup_started.elapsed()
                );
            }
            lap = Instant::now();
        }
    }
    let create_time = started.elapsed();
    eprintln!(
        "100k entries: {ENTRIES} creates in {create_time:.2?} ({:.1} us each); per 10k: {:?}",
        create_time.as_secs_f64() * 1e6 / ENTRIES as f64,
        laps.iter()
            .map(|d| format!("{:.0}ms", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
    );
    // O(log n): the last 30k creates are not much slower than the first 30k (a cost
    // linear in the directory size would make them about 9 times slower).
    let first: std::time::Duration = laps[..3].iter().sum();
    let last: std::time::Duration = laps[7..].iter().sum();
    assert!(
        last < first * 5 + std::time::Duration::from_millis(500),
        "creates slow down with the directory size: {laps:?}"
    );
    assert_eq!(
        fs.getattr(big.ino).expect("getattr").size,
        ENTRIES as u64,
        "directory size counts entries"
    );
    assert_eq!(
        inos.iter().collect::<HashSet<_>>().len(),
        ENTRIES,
        "distinct inodes"
    );

    let lookups = |fs: &Fs, when: &str| {
        let mut rng = StdRng::seed_from_u64(11);
        let started = Instant::now();
        for _ in 0..20_000 {
            let i = rng.gen_range(0..ENTRIES);
            let attr = fs.lookup(big.ino, name(i).as_bytes()).expect("lookup");
            assert_eq!(attr.ino, inos[i], "{when}: lookup {}", name(i));
        }
        for i in 0..1000 {
            assert!(
                matches!(
                    fs.lookup(big.ino, format!("absent-{i}").as_bytes()),
                    Err(Error::NotFound)
                ),
                "{when}: absent name found"
            );
        }
        eprintln!(
            "100k entries: 21k lookups ({when}) in {:.2?}",
            started.elapsed()
        );
    };
    lookups(&fs, "created");

    let full_listing = |fs: &Fs, when: &str| -> Vec<(Vec<u8>, u64)> {
        let mut names = Vec::new();
        fs.readdir(big.ino, 0, |entry| {
            names.push((entry.name, entry.ino));
            true
        })
        .expect("readdir");
        assert_eq!(&names[0].0, b".", "{when}");
        assert_eq!(names[1], (b"..".to_vec(), ROOT_INO), "{when}");
        names.drain(..2);
        let unique: HashSet<&Vec<u8>> = names.iter().map(|(n, _)| n).collect();
        assert_eq!(unique.len(), names.len(), "{when}: readdir repeats names");
        names
    };
    let listed = full_listing(&fs, "created");
    assert_eq!(listed.len(), ENTRIES);
    let by_name: BTreeMap<Vec<u8>, u64> = listed.into_iter().collect();
    for (i, ino) in inos.iter().enumerate() {
        assert_eq!(by_name.get(name(i).as_bytes()), Some(ino), "listing of {i}");
    }

    // readdir in batches while entries are removed and added between them: every entry
    // present throughout comes back exactly once, and nothing comes back twice.
    let mut rng = StdRng::seed_from_u64(5);
    let mut removed = vec![false; ENTRIES];
    let mut seen: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    let mut cursor = 0;
    let mut added = 0usize;
    loop {
        let mut batch = Vec::new();
        fs.readdir(big.ino, cursor, |entry| {
            batch.push(entry);
            batch.len() < 1000
        })
        .expect("readdir");
        let Some(last) = batch.last() else { break };
        cursor = last.next;
        for entry in batch {
            if entry.name != b"." && entry.name != b".." {
                *seen.entry(entry.name).or_default() += 1;
            }
        }
        for _ in 0..150 {
            let i = rng.gen_range(0..ENTRIES);
            if !removed[i] {
                fs.unlink(big.ino, name(i).as_bytes()).expect("unlink");
                removed[i] = true;
            }
        }
        for _ in 0..20 {
            fs.create(big.ino, format!("added-{added}").as_bytes(), 0o644, 0, 0)
                .expect("create");
            added += 1;
        }
    }
    assert!(
        seen.values().all(|count| *count == 1),
        "readdir returned an entry twice"
    );
    let kept = removed.iter().filter(|r| !**r).count();
    for (i, gone) in removed.iter().enumerate() {
        if !gone {
            assert!(
                seen.contains_key(name(i).as_bytes()),
                "entry {} present throughout was not returned",
                name(i)
            );
        }
    }
    for key in seen.keys() {
        assert!(
            key.starts_with(b"entry-") || key.starts_with(b"added-"),
            "unknown name returned"
        );
    }
    eprintln!(
        "100k entries: {} removed and {added} added during readdir",
        ENTRIES - kept
    );
    for k in 0..added {
        fs.unlink(big.ino, format!("added-{k}").as_bytes())
            .expect("unlink of an added entry");
    }

    fs.close().expect("close");
    let fs = open(&device);
    let listed = full_listing(&fs, "reopened");
    assert_eq!(listed.len(), kept, "entries after reopen");
    assert_eq!(fs.getattr(big.ino).expect("getattr").size, kept as u64);
    let mut rng = StdRng::seed_from_u64(12);
    for _ in 0..5000 {
        let i = rng.gen_range(0..ENTRIES);
        match fs.lookup(big.ino, name(i).as_bytes()) {
            Ok(attr) => {
                assert!(!removed[i], "removed {} still found", name(i));
                assert_eq!(attr.ino, inos[i]);
            }
            Err(Error::NotFound) => assert!(removed[i], "{} lost", name(i)),
            Err(e) => panic!("lookup: {e}"),
        }
    }
    let started = Instant::now();
    for (i, gone) in removed.iter().enumerate() {
        if !gone {
            fs.unlink(big.ino, name(i).as_bytes()).expect("unlink");
        }
    }
    eprintln!(
        "100k entries: removed the remaining {kept} in {:.2?}",
        started.elapsed()
    );
    assert!(fs.list_dir(big.ino).expect("list").is_empty());
    assert_eq!(fs.getattr(big.ino).expect("getattr").size, 0);
    fs.rmdir(ROOT_INO, b"big")
        .expect("rmdir of the emptied directory");
    let stat = fs.statfs().expect("statfs");
    assert_eq!(
        stat.total_inodes - stat.free_inodes,
        1,
        "only the root is left"
    );
    fs.close().expect("close");
    assert_fsck_clean(&device, "after 100k entries");
}

/// Link counts stop at LINK_MAX: hard links to one file, subdirectories of one
/// directory (each adds a ".." link), and a directory renamed into a full parent
/// (POSIX rename: EMLINK when the parent's link count would exceed LINK_MAX).
#[test]
fn link_count_limits() {
    use libfs::fs::LINK_MAX;
    let dir = TempDir::new("links");
    let image = dir.path().join("links.img");
    let device: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::create(&image, 512 << 20).expect("image"));
    format(
        device.clone(),
        &FormatOptions {
            inodes: Some(u64::from(LINK_MAX) + 1024),
            ..FormatOptions::default()
        },
    )
    .expect("format");
    let fs = open(&device);
    let started = Instant::now();
    let file = fs.create(ROOT_INO, b"file", 0o644, 0, 0).expect("create");
    let links = fs.mkdir(ROOT_INO, b"links", 0o755, 0, 0).expect("mkdir");
    for i in 1..LINK_MAX {
        fs.link(file.ino, links.ino, format!("l{i}").as_bytes())
            .expect("link");
    }
    assert_eq!(fs.getattr(file.ino).expect("getattr").nlink, LINK_MAX);
    match fs.link(file.ino, links.ino, b"one-too-many") {
        Err(e @ Error::TooManyLinks) => assert_eq!(e.errno(), libc::EMLINK),
        other => panic!("link past LINK_MAX: {other:?}"),
    }
    assert!(matches!(
        fs.lookup(links.ino, b"one-too-many"),
        Err(Error::NotFound)
    ));

    let parent = fs.mkdir(ROOT_INO, b"parent", 0o755, 0, 0).expect("mkdir");
    for i in 2..LINK_MAX {
        fs.mkdir(parent.ino, format!("d{i}").as_bytes(), 0o755, 0, 0)
            .expect("mkdir");
    }
    assert_eq!(fs.getattr(parent.ino).expect("getattr").nlink, LINK_MAX);
    match fs.mkdir(parent.ino, b"one-too-many", 0o755, 0, 0) {
        Err(e @ Error::TooManyLinks) => assert_eq!(e.errno(), libc::EMLINK),
        other => panic!("mkdir past LINK_MAX: {other:?}"),
    }
    // A file may still be added: it adds no link to the directory.
    fs.create(parent.ino, b"file", 0o644, 0, 0).expect("create");
    eprintln!(
        "link limits: {} links and {} subdirectories in {:.2?}",
        LINK_MAX - 1,
        LINK_MAX - 2,
        started.elapsed()
    );
    fs.close().expect("close");
    assert_fsck_clean(&device, "at LINK_MAX");
    let fs = open(&device);
    assert_eq!(fs.getattr(file.ino).expect("getattr").nlink, LINK_MAX);
    assert_eq!(fs.getattr(parent.ino).expect("getattr").nlink, LINK_MAX);
    assert_eq!(
        fs.list_dir(links.ino).expect("list").len() as u32,
        LINK_MAX - 1
    );

    // Moving one more directory in would push the parent past LINK_MAX.
    let extra = fs.mkdir(ROOT_INO, b"extra", 0o755, 0, 0).expect("mkdir");
    let result = fs.rename(
        ROOT_INO,
        b"extra",
        parent.ino,
        b"extra",
        libfs::RenameMode::Replace,
    );
    let nlink = fs.getattr(parent.ino).expect("getattr").nlink;
    assert!(
        matches!(result, Err(Error::TooManyLinks)) && nlink == LINK_MAX,
        "rename of a directory into a parent at LINK_MAX: {result:?}, parent nlink {nlink}"
    );
    assert_eq!(
        fs.lookup(ROOT_INO, b"extra").expect("still in place").ino,
        extra.ino
    );
    fs.close().expect("close");
}
