//! Corruption: random bit flips (and worse) in the metadata of a populated image. Every
//! damaged image must be handled without a panic: open may fail, and if it opens, every
//! lookup, readdir, read and write returns Ok or Err. Damage to checksummed metadata must
//! be detected: by fsck, by open, or by a read reporting an error. Nothing may be silently
//! accepted.
//!
//! Two images: a cleanly closed one (the log holds no live transaction, so every log
//! block after the journal header is unused and left alone), and a crashed one whose log
//! holds committed transactions. A flip in a live log block, or in a home block a live
//! transaction rewrites, may be repaired silently by replay: there the image must then
//! read exactly as before the flip.
//!
//! Kinds of damage: flipped bits (must be detected); whole blocks zeroed, randomised or
//! replaced by another metadata block (must be detected); and flips followed by a fresh
//! checksum ("resealed"), which only the structural checks can catch: those must not
//! panic, and whatever opens must stay usable without panics.
//!
//! Tuning: EXOFS_CORRUPTION_ITERATIONS (default 3000) per image, seed
//! EXOFS_CORRUPTION_SEED (default 1).

use libfs::btree::{self, NodeStore, Tree};
use libfs::format::{
    read_struct, seal_block, Block, DiskInode, JournalCommit, JournalDescriptor, JournalHeader,
    Superblock, BLOCK_SIZE, BTREE_KIND_DIRECTORY, BTREE_KIND_EXTENTS, BTREE_KIND_XATTR,
    INODES_PER_BLOCK, INODE_FLAG_EXTENT_TREE, INODE_SIZE, MAGIC_JOURNAL_COMMIT,
    MAGIC_JOURNAL_DESCRIPTOR, S_IFDIR, S_IFMT,
};
use libfs::{
    format, Error, FallocateMode, FormatOptions, Fs, MemDevice, OpenOptions, RenameMode, SetAttr,
    XattrMode, ROOT_INO,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

const IMAGE_BYTES: u64 = 8 << 20;
const BLOCK: u64 = BLOCK_SIZE as u64;
/// A file never reads more than this (a damaged size may claim petabytes).
const READ_CAP: u64 = 4 << 20;
/// One damaged image must be examined well within this.
const HANG_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

fn open_options() -> OpenOptions {
    OpenOptions {
        read_only: false,
        cache_bytes: 1 << 20,
        inode_cache: 512,
    }
}

fn block_of(image: &[u8], nr: u64) -> Block {
    let mut block = [0u8; BLOCK_SIZE];
    let at = (nr * BLOCK) as usize;
    block.copy_from_slice(&image[at..at + BLOCK_SIZE]);
    block
}

fn put_block(image: &mut [u8], nr: u64, block: &Block) {
    let at = (nr * BLOCK) as usize;
    image[at..at + BLOCK_SIZE].copy_from_slice(block);
}

// ---------------------------------------------------------------------------------------
// The populated images

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen()).collect()
}

/// Formats and fills an image: a fragmented file (multi-level extent tree), a directory
/// with a multi-level entry tree, xattrs (one tree of several leaves), a symlink, nested
/// directories. Returns the device with the file system still open.
fn populate() -> (Arc<MemDevice>, Fs) {
    let device = Arc::new(MemDevice::from_bytes(vec![0xEE; IMAGE_BYTES as usize]));
    let options = FormatOptions {
        journal_blocks: Some(64),
        inodes: Some(512),
        ..Default::default()
    };
    format(device.clone(), &options).expect("format");
    let fs = Fs::open_device(device.clone(), &open_options()).expect("open");
    // 400 single-block extents: an extent tree with internal nodes.
    let frag = fs
        .create(ROOT_INO, b"frag", 0o644, 1, 2)
        .expect("create")
        .ino;
    for i in 0..400u64 {
        let data = pattern(i, 4096);
        fs.write_at(frag, 2 * i * BLOCK, &data).expect("write");
    }
    assert!(fs.extents(frag).expect("extents").len() > 300);
    // A few files with a handful of extents (inline and just past inline).
    for f in 0..6u64 {
        let name = format!("file{f}");
        let ino = fs
            .create(ROOT_INO, name.as_bytes(), 0o600, 0, 0)
            .expect("create")
            .ino;
        for e in 0..(f + 2) {
            fs.write_at(
                ino,
                3 * e * BLOCK + f * 100,
                &pattern(100 + f * 10 + e, 5000),
            )
            .expect("write");
        }
        fs.setxattr(ino, b"user.tag", name.as_bytes(), XattrMode::Any)
            .expect("setxattr");
    }
    // A big directory: 600 entries, 150 inodes, the rest hard links.
    let big = fs.mkdir(ROOT_INO, b"big", 0o755, 0, 0).expect("mkdir").ino;
    let mut inos = Vec::new();
    for i in 0..600u64 {
        let name = format!("entry-with-a-longer-name-{i:04}");
        if i < 150 {
            let ino = fs
                .create(big, name.as_bytes(), 0o644, 0, 0)
                .expect("create")
                .ino;
            if i % 10 == 0 {
                fs.write_at(ino, 0, &pattern(1000 + i, 700)).expect("write");
            }
            inos.push(ino);
        } else {
            fs.link(inos[(i as usize * 7) % inos.len()], big, name.as_bytes())
                .expect("link");
        }
    }
    // Many xattrs on one inode: a multi-leaf xattr tree.
    for i in 0..40u64 {
        let name = format!("user.attr{i}");
        fs.setxattr(
            big,
            name.as_bytes(),
            &pattern(2000 + i, 400),
            XattrMode::Any,
        )
        .expect("setxattr");
    }
    let sub = fs.mkdir(ROOT_INO, b"sub", 0o700, 0, 0).expect("mkdir").ino;
    let deeper = fs.mkdir(sub, b"deeper", 0o755, 0, 0).expect("mkdir").ino;
    fs.symlink(deeper, b"link", b"../../frag", 0, 0)
        .expect("symlink");
    fs.create(deeper, b"empty", 0o644, 0, 0).expect("create");
    let pre = fs
        .create(sub, b"prealloc", 0o644, 0, 0)
        .expect("create")
        .ino;
    let keep = FallocateMode {
        keep_size: true,
        punch_hole: false,
    };
    fs.fallocate(pre, 0, 20 * BLOCK, keep).expect("fallocate");
    (device, fs)
}

/// The closed image.
fn closed_image() -> Vec<u8> {
    let (device, fs) = populate();
    fs.close().expect("close");
    device.snapshot()
}

/// An image whose log holds committed transactions: changes after a checkpoint, synced,
/// then the power fails (the snapshot is taken before the file system is dropped).
fn live_journal_image() -> Vec<u8> {
    let (device, fs) = populate();
    fs.checkpoint().expect("checkpoint");
    let frag = fs.lookup(ROOT_INO, b"frag").expect("frag").ino;
    fs.write_at(frag, 1001 * BLOCK, &pattern(5000, 9000))
        .expect("write");
    let big = fs.lookup(ROOT_INO, b"big").expect("big").ino;
    for i in 0..30u64 {
        let name = format!("late-{i}");
        fs.create(big, name.as_bytes(), 0o644, 0, 0)
            .expect("create");
    }
    fs.sync().expect("sync");
    fs.unlink(big, b"entry-with-a-longer-name-0003")
        .expect("unlink");
    fs.setxattr(frag, b"user.late", b"value", XattrMode::Any)
        .expect("setxattr");
    fs.sync().expect("sync");
    let image = device.snapshot();
    std::mem::forget(fs);
    image
}

// ---------------------------------------------------------------------------------------
// Where the metadata lives

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Region {
    Superblock,
    JournalHeader,
    JournalLog,
    BlockBitmap,
    InodeBitmap,
    InodeTable,
    DirTree,
    ExtentTree,
    XattrTree,
}

/// A metadata block to damage.
#[derive(Debug, Clone, Copy)]
struct Target {
    block: u64,
    region: Region,
    /// A live transaction's replay may overwrite the damage (journal blocks, and home
    /// blocks the log rewrites).
    healable: bool,
}

/// NodeStore over an image, for `btree::walk`.
struct ImageStore<'a>(&'a [u8]);

impl NodeStore for ImageStore<'_> {
    fn read(&mut self, block: u64) -> libfs::Result<Arc<Block>> {
        if (block + 1) * BLOCK > self.0.len() as u64 {
            return Err(Error::corrupt(block, "past the end"));
        }
        Ok(Arc::new(block_of(self.0, block)))
    }
    fn write(&mut self, _: u64, _: &Block) -> libfs::Result<()> {
        Err(Error::ReadOnly)
    }
    fn alloc(&mut self) -> libfs::Result<u64> {
        Err(Error::ReadOnly)
    }
    fn free(&mut self, _: u64) -> libfs::Result<()> {
        Err(Error::ReadOnly)
    }
}

/// The live log blocks of an image and the home blocks their transactions target.
fn live_log(image: &[u8], sb: &Superblock) -> (Vec<u64>, HashSet<u64>) {
    let start = sb.journal_start.get();
    let header: JournalHeader =
        read_struct(&block_of(image, start), start, "header").expect("journal header");
    let capacity = sb.journal_blocks.get() - 1;
    let mut seq = header.tail_seq.get();
    let mut at = header.tail_index.get();
    let mut blocks = Vec::new();
    let mut homes = HashSet::new();
    'transactions: loop {
        let mut images = 0;
        let first = at;
        loop {
            if at >= capacity {
                break 'transactions;
            }
            let nr = start + 1 + at;
            let block = block_of(image, nr);
            if libfs::format::verify_block(&block, MAGIC_JOURNAL_DESCRIPTOR, nr, "d").is_err() {
                break 'transactions;
            }
            let d: JournalDescriptor = read_struct(&block, nr, "d").expect("descriptor");
            if d.seq.get() != seq {
                break 'transactions;
            }
            let count = d.count.get() as usize;
            homes.extend(d.targets[..count].iter().map(|t| t.get()));
            images += count;
            at += 1 + count as u64;
            if d.more.get() == 0 {
                break;
            }
        }
        let nr = start + 1 + at;
        let block = block_of(image, nr);
        if libfs::format::verify_block(&block, MAGIC_JOURNAL_COMMIT, nr, "c").is_err() {
            break;
        }
        let c: JournalCommit = read_struct(&block, nr, "c").expect("commit");
        if c.seq.get() != seq || c.total.get() as usize != images {
            break;
        }
        at += 1;
        blocks.extend((first..at).map(|i| start + 1 + i));
        seq += 1;
    }
    (blocks, homes)
}

/// Every metadata block of an image worth damaging, and the kinds of tree that have a
/// tree of more than one level.
fn targets(image: &[u8]) -> (Vec<Target>, HashSet<Region>) {
    let sb: Superblock = read_struct(&block_of(image, 0), 0, "sb").expect("superblock");
    let (live, homes) = live_log(image, &sb);
    let mut out = Vec::new();
    let mut deep = HashSet::new();
    let mut add = |block: u64, region: Region| {
        out.push(Target {
            block,
            region,
            // The journal header is healable too: when it is damaged the log is
            // replayed from its start (FORMAT.md 9.6), which loses nothing.
            healable: region == Region::JournalLog
                || region == Region::JournalHeader
                || homes.contains(&block),
        })
    };
    add(0, Region::Superblock);
    add(sb.journal_start.get(), Region::JournalHeader);
    for block in live {
        add(block, Region::JournalLog);
    }
    let range = |start: u64, len: u64| start..start + len;
    for block in range(sb.bitmap_start.get(), sb.bitmap_blocks.get()) {
        add(block, Region::BlockBitmap);
    }
    for block in range(sb.inode_bitmap_start.get(), sb.inode_bitmap_blocks.get()) {
        add(block, Region::InodeBitmap);
    }
    let table = sb.inode_table_start.get();
    for block in range(table, sb.inode_table_blocks.get()) {
        add(block, Region::InodeTable);
    }
    // Trees, from the inodes (as the image holds them: a live transaction may change
    // some, which is fine: those blocks are healable or still trees).
    for ino in 1..sb.inode_count.get() {
        let nr = table + ino / INODES_PER_BLOCK as u64;
        let offset = (ino as usize % INODES_PER_BLOCK) * INODE_SIZE;
        let block = block_of(image, nr);
        let disk: DiskInode = read_struct(&block[offset..], nr, "inode").expect("inode");
        if disk.mode.get() == 0 {
            continue;
        }
        let mut trees = Vec::new();
        if disk.mode.get() & S_IFMT == S_IFDIR {
            trees.push((BTREE_KIND_DIRECTORY, disk.tree_root.get(), Region::DirTree));
        } else if disk.flags.get() & INODE_FLAG_EXTENT_TREE != 0 {
            trees.push((BTREE_KIND_EXTENTS, disk.tree_root.get(), Region::ExtentTree));
        }
        if disk.xattr_root.get() != 0 {
            trees.push((BTREE_KIND_XATTR, disk.xattr_root.get(), Region::XattrTree));
        }
        for (kind, root, region) in trees {
            let tree = Tree {
                root,
                kind,
                owner: ino,
            };
            let mut nodes = Vec::new();
            btree::walk(
                &mut ImageStore(image),
                &tree,
                &mut |block| nodes.push(block),
                &mut |_, _| Ok(()),
            )
            .expect("walk a tree of the undamaged image");
            if nodes.len() > 1 {
                deep.insert(region);
            }
            for block in nodes {
                add(block, region);
            }
        }
    }
    (out, deep)
}

// ---------------------------------------------------------------------------------------
// Reading everything

/// A digest of what the API shows: path -> description.
type Digest = BTreeMap<String, String>;

/// Reads the whole tree (bounded: a damaged image may claim anything). Errors are
/// returned, never panics.
fn digest(fs: &Fs) -> libfs::Result<Digest> {
    let mut out = Digest::new();
    let mut queue = vec![(ROOT_INO, String::new())];
    let mut seen_dirs = HashSet::new();
    let mut budget = 20_000usize;
    while let Some((dir, path)) = queue.pop() {
        if !seen_dirs.insert(dir) {
            return Err(Error::corrupt(0, format!("directory {dir} reached twice")));
        }
        let attr = fs.getattr(dir)?;
        out.insert(format!("{path}/"), describe(fs, &attr)?);
        for entry in fs.list_dir(dir)? {
            budget = budget
                .checked_sub(1)
                .ok_or(Error::corrupt(0, "too many entries"))?;
            let name = String::from_utf8_lossy(&entry.name).into_owned();
            let child = format!("{path}/{name}");
            let looked = fs.lookup(dir, &entry.name)?;
            if looked.ino != entry.ino {
                return Err(Error::corrupt(0, "lookup and readdir disagree"));
            }
            if looked.is_dir() {
                queue.push((entry.ino, child));
            } else {
                out.insert(child, describe(fs, &looked)?);
            }
        }
    }
    Ok(out)
}

fn describe(fs: &Fs, attr: &libfs::Attr) -> libfs::Result<String> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    if attr.is_file() {
        let mut at = 0;
        let end = attr.size.min(READ_CAP);
        let mut buf = vec![0u8; 256 << 10];
        while at < end {
            let want = ((end - at) as usize).min(buf.len());
            let n = fs.read_at(attr.ino, at, &mut buf[..want])?;
            if n == 0 {
                break;
            }
            buf[..n].hash(&mut hasher);
            at += n as u64;
        }
        fs.extents(attr.ino)?.len().hash(&mut hasher);
    } else if attr.is_symlink() {
        fs.readlink(attr.ino)?.hash(&mut hasher);
    }
    let mut xattrs = Vec::new();
    for name in fs.listxattr(attr.ino)? {
        let value = fs.getxattr(attr.ino, &name)?;
        xattrs.push((name, value));
    }
    xattrs.hash(&mut hasher);
    Ok(format!(
        "ino {} mode {:o} uid {} gid {} nlink {} size {} blocks {} content {:016x}",
        attr.ino,
        attr.mode,
        attr.uid,
        attr.gid,
        attr.nlink,
        attr.size,
        attr.blocks,
        hasher.finish()
    ))
}

/// New work on a (possibly damaged) file system: every call returns, Ok or Err.
fn exercise(fs: &Fs, rng: &mut StdRng) -> Vec<Error> {
    let mut errors = Vec::new();
    let mut note = |r: libfs::Result<()>| {
        if let Err(e) = r {
            errors.push(e);
        }
    };
    let data = pattern(rng.gen(), rng.gen_range(1..40_000));
    match fs.create(ROOT_INO, b"new-file", 0o644, 0, 0) {
        Ok(attr) => {
            note(
                fs.write_at(attr.ino, rng.gen_range(0..100_000), &data)
                    .map(|_| ()),
            );
            note(fs.setxattr(attr.ino, b"user.new", b"x", XattrMode::Any));
        }
        Err(e) => note(Err(e)),
    }
    note(fs.mkdir(ROOT_INO, b"new-dir", 0o755, 0, 0).map(|_| ()));
    if let Ok(frag) = fs.lookup(ROOT_INO, b"frag") {
        note(
            fs.write_at(frag.ino, rng.gen_range(0..900) * BLOCK, &data)
                .map(|_| ()),
        );
        let shrink = SetAttr {
            size: Some(rng.gen_range(0..frag.size.max(1))),
            ..SetAttr::default()
        };
        note(fs.setattr(frag.ino, &shrink).map(|_| ()));
        let punch = FallocateMode {
            keep_size: true,
            punch_hole: true,
        };
        note(fs.fallocate(frag.ino, rng.gen_range(0..100) * BLOCK, 50 * BLOCK, punch));
        note(fs.removexattr(frag.ino, b"user.late"));
    }
    if let Ok(big) = fs.lookup(ROOT_INO, b"big") {
        for i in 0..20 {
            let name = format!("entry-with-a-longer-name-{:04}", rng.gen_range(0..600));
            let to = format!("renamed-{i}");
            note(fs.rename(
                big.ino,
                name.as_bytes(),
                ROOT_INO,
                to.as_bytes(),
                RenameMode::Replace,
            ));
            let name = format!("entry-with-a-longer-name-{:04}", rng.gen_range(0..600));
            note(fs.unlink(big.ino, name.as_bytes()));
        }
        note(fs.setxattr(big.ino, b"user.attr7", b"changed", XattrMode::Any));
        note(fs.removexattr(big.ino, b"user.attr8"));
    }
    note(fs.unlink(ROOT_INO, b"file3"));
    note(fs.rmdir(ROOT_INO, b"sub"));
    note(fs.sync());
    errors
}

// ---------------------------------------------------------------------------------------
// Damage

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Damage {
    /// 1 to 4 random bits flipped.
    Flip,
    /// Flipped, then the checksum recomputed (only structural checks can notice).
    Resealed,
    /// A field set to a boundary value (0, 1, all ones, the device size, ...), then the
    /// checksum recomputed.
    Forged,
    /// The block zeroed.
    Zeroed,
    /// The block replaced by random bytes.
    Random,
    /// The block replaced by another metadata block (a misdirected write).
    Misdirected,
}

impl Damage {
    /// Whether the checksums must catch it.
    fn must_detect(self) -> bool {
        !matches!(self, Damage::Resealed | Damage::Forged)
    }
}

/// Flips bits of a block; for `Resealed`, fixes the checksum afterwards (the block's
/// header crc, or the crc of every inode of an inode-table block).
fn damage(image: &mut [u8], target: &Target, all: &[Target], kind: Damage, rng: &mut StdRng) {
    let nr = target.block;
    let mut block = block_of(image, nr);
    match kind {
        Damage::Flip | Damage::Resealed => {
            // Resealed damage aims at the header and the first entries, where the
            // structure lies; plain flips anywhere.
            let span = if kind == Damage::Resealed && rng.gen_bool(0.7) {
                256
            } else {
                BLOCK_SIZE
            };
            for _ in 0..rng.gen_range(1..=4) {
                let bit = rng.gen_range(0..span * 8);
                block[bit / 8] ^= 1 << (bit % 8);
            }
        }
        Damage::Forged => {
            // A 2-, 4- or 8-byte field: in a live inode slot of an inode-table block,
            // else in the first 512 bytes (headers, slots, child entries).
            let base = if target.region == Region::InodeTable {
                let live: Vec<usize> = (0..INODES_PER_BLOCK)
                    .filter(|s| {
                        block[s * INODE_SIZE..(s + 1) * INODE_SIZE]
                            .iter()
                            .any(|b| *b != 0)
                    })
                    .collect();
                match live.as_slice() {
                    [] => 0,
                    slots => slots[rng.gen_range(0..slots.len())] * INODE_SIZE,
                }
            } else {
                0
            };
            let width = [2usize, 4, 8][rng.gen_range(0..3)];
            let span = if target.region == Region::InodeTable {
                INODE_SIZE
            } else {
                512
            };
            let at = base + rng.gen_range(0..span / width) * width;
            let total = image.len() as u64 / BLOCK;
            let value: u64 = match rng.gen_range(0..10) {
                0 => 0,
                1 => 1,
                2 => u64::MAX,
                3 => u64::MAX >> 1,
                4 => u64::from(u32::MAX),
                5 => total,
                6 => total - 1,
                7 => 1 << 52,
                8 => rng.gen_range(0..total),
                _ => rng.gen(),
            };
            block[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
        }
        Damage::Zeroed => block = [0u8; BLOCK_SIZE],
        Damage::Random => rng.fill(&mut block[..]),
        Damage::Misdirected => {
            let other = all[rng.gen_range(0..all.len())].block;
            block = block_of(image, if other == nr { (nr + 1) % 64 } else { other });
        }
    }
    if matches!(kind, Damage::Resealed | Damage::Forged) {
        if target.region == Region::InodeTable {
            for slot in 0..INODES_PER_BLOCK {
                let ino = (nr - table_start(image)) * INODES_PER_BLOCK as u64 + slot as u64;
                let bytes = &mut block[slot * INODE_SIZE..(slot + 1) * INODE_SIZE];
                if ino == 0 || bytes.iter().all(|b| *b == 0) {
                    continue;
                }
                let disk: DiskInode = read_struct(bytes, nr, "inode").expect("inode");
                let crc = disk.compute_crc(ino);
                bytes[20..24].copy_from_slice(&crc.to_le_bytes());
            }
        } else {
            let original = block_of(image, nr);
            let magic = u32::from_le_bytes([original[0], original[1], original[2], original[3]]);
            seal_block(&mut block, magic, nr);
        }
    }
    put_block(image, nr, &block);
}

fn table_start(image: &[u8]) -> u64 {
    let sb: Superblock = read_struct(&block_of(image, 0), 0, "sb").expect("superblock");
    sb.inode_table_start.get()
}

/// What happened to one damaged image.
#[derive(Debug, Default)]
struct Outcome {
    /// Who noticed: "fsck", "open", "read", "write", "fsck after".
    detected_by: Vec<&'static str>,
    /// The API showed exactly the undamaged state (and nothing noticed).
    unchanged: bool,
}

/// Runs everything on a damaged image; panics propagate to the caller.
fn examine(image: Vec<u8>, reference: &Digest, rng: &mut StdRng, repair: bool) -> Outcome {
    let mut outcome = Outcome::default();
    let device = Arc::new(MemDevice::from_bytes(image));
    match libfs::fsck::check(device.clone()) {
        Ok(report) if report.is_clean() => {}
        _ => outcome.detected_by.push("fsck"),
    }
    match Fs::open_device(device.clone(), &open_options()) {
        Err(_) => outcome.detected_by.push("open"),
        Ok(fs) => {
            match digest(&fs) {
                Ok(seen) => outcome.unchanged = seen == *reference,
                Err(_) => outcome.detected_by.push("read"),
            }
            let errors = exercise(&fs, rng);
            if errors.iter().any(|e| matches!(e, Error::Corrupt { .. })) {
                outcome.detected_by.push("write");
            }
            if fs.close().is_err() {
                outcome.detected_by.push("close");
            }
        }
    }
    match libfs::fsck::check(device.clone()) {
        Ok(report) if report.is_clean() => {}
        _ => outcome.detected_by.push("fsck after"),
    }
    if repair {
        // Repair must not panic either, and what it leaves must open without one.
        let _ = libfs::fsck::repair(device.clone());
        if let Ok(fs) = Fs::open_device(device, &open_options()) {
            let _ = digest(&fs);
            let _ = fs.close();
        }
    }
    outcome
}

thread_local! {
    /// Where the last panic of this thread happened, and its message.
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    /// Panics are being caught and recorded (else they are reported as usual).
    static CAPTURING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Records panics (location and message) instead of printing them with a backtrace.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CAPTURING.with(|c| c.get()) {
                return default(info);
            }
            let message = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            LAST_PANIC.with(|p| *p.borrow_mut() = format!("{location}: {message}"));
        }));
    });
}

#[derive(Default)]
struct Tally {
    runs: usize,
    detected: usize,
    /// Nothing noticed, and the API shows exactly the undamaged state.
    no_effect: usize,
    /// Nothing noticed, but the API shows something else (only possible for forged
    /// or resealed damage: those carry valid checksums).
    undetected_change: usize,
}

fn run_image(label: &str, image: &[u8], iterations: u64, seed: u64) -> Vec<String> {
    let started = Instant::now();
    let (targets, deep) = targets(image);
    for region in [Region::DirTree, Region::ExtentTree, Region::XattrTree] {
        assert!(
            deep.contains(&region),
            "{label}: no {region:?} with internal nodes"
        );
    }
    let reference = {
        let device = Arc::new(MemDevice::from_bytes(image.to_vec()));
        let report = libfs::fsck::check(device.clone()).expect("fsck of the undamaged image");
        assert!(report.is_clean(), "{label}: undamaged image: {report}");
        let fs = Fs::open_device(device, &open_options()).expect("open undamaged");
        let digest = digest(&fs).expect("read undamaged");
        std::mem::forget(fs);
        Arc::new(digest)
    };
    let mut by_region: HashMap<Region, Vec<Target>> = HashMap::new();
    for target in &targets {
        by_region.entry(target.region).or_default().push(*target);
    }
    let mut regions: Vec<Region> = by_region.keys().copied().collect();
    regions.sort();
    let mut tally: BTreeMap<(Region, Damage), Tally> = BTreeMap::new();
    // Failures grouped by (region, damage, verdict): count and first example.
    let mut failures: BTreeMap<(Region, Damage, String), (usize, String)> = BTreeMap::new();
    let mut hangs = 0;
    let only = std::env::var("EXOFS_CORRUPTION_ONLY")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    for iteration in 0..iterations {
        if only.is_some_and(|only| only != iteration) {
            continue;
        }
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(iteration));
        // Pick a region first so that small regions get their share.
        let region = regions[rng.gen_range(0..regions.len())];
        let candidates = &by_region[&region];
        let target = candidates[rng.gen_range(0..candidates.len())];
        let kind = match rng.gen_range(0..12) {
            0..=4 => Damage::Flip,
            5..=6 => Damage::Resealed,
            7..=9 => Damage::Forged,
            10 => Damage::Zeroed,
            _ if rng.gen_bool(0.5) => Damage::Random,
            _ => Damage::Misdirected,
        };
        let mut damaged = image.to_vec();
        damage(&mut damaged, &target, &targets, kind, &mut rng);
        if damaged == image {
            continue;
        }
        let repair = rng.gen_ratio(1, 4);
        let what = format!(
            "{label} iteration {iteration} (EXOFS_CORRUPTION_SEED={seed}): {kind:?} of block {} ({region:?})",
            target.block
        );
        // On a thread of its own with a deadline: damage must not make anything loop.
        let (send, receive) = std::sync::mpsc::channel();
        let shared = reference.clone();
        let mut thread_rng = StdRng::seed_from_u64(rng.gen());
        let capture = only.is_none();
        std::thread::spawn(move || {
            CAPTURING.with(|c| c.set(capture));
            let result = catch_unwind(AssertUnwindSafe(|| {
                examine(damaged, &shared, &mut thread_rng, repair)
            }))
            .map_err(|_| LAST_PANIC.with(|p| p.borrow().clone()));
            let _ = send.send(result);
        });
        let result = receive.recv_timeout(HANG_LIMIT).ok();
        let entry = tally.entry((region, kind)).or_default();
        entry.runs += 1;
        let mut fail = |verdict: String| {
            let group = failures
                .entry((region, kind, verdict))
                .or_insert_with(|| (0, what.clone()));
            group.0 += 1;
        };
        match result {
            None => {
                fail(format!("HANG: no result after {HANG_LIMIT:?}"));
                hangs += 1;
                if hangs >= 3 {
                    eprintln!("{label}: giving up after {hangs} hangs (their threads still spin)");
                    break;
                }
            }
            Some(Err(panic)) => fail(format!("PANIC at {panic}")),
            Some(Ok(outcome)) => {
                if !outcome.detected_by.is_empty() {
                    entry.detected += 1;
                } else if outcome.unchanged {
                    entry.no_effect += 1;
                } else {
                    entry.undetected_change += 1;
                }
                let silent = outcome.detected_by.is_empty();
                if kind.must_detect() && silent && !(target.healable && outcome.unchanged) {
                    fail(format!(
                        "not detected (open, reads, writes and fsck all fine; state {})",
                        if outcome.unchanged {
                            "unchanged"
                        } else {
                            "CHANGED"
                        }
                    ));
                }
            }
        }
    }
    eprintln!(
        "{label}: {iterations} damaged images, {} metadata blocks, {:.1}s",
        targets.len(),
        started.elapsed().as_secs_f64()
    );
    eprintln!("  region         damage       runs  detected  no-effect  undetected-change");
    for ((region, kind), t) in &tally {
        eprintln!(
            "  {:<14} {:<11} {:>5} {:>9} {:>10} {:>18}",
            format!("{region:?}"),
            format!("{kind:?}"),
            t.runs,
            t.detected,
            t.no_effect,
            t.undetected_change
        );
    }
    failures
        .into_iter()
        .map(|((region, kind, verdict), (count, first))| {
            format!("{count} x {kind:?} in {region:?}: {verdict}\n    first: {first}")
        })
        .collect()
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn check_images(label: &str, image: Vec<u8>) {
    install_panic_hook();
    let iterations = env_number("EXOFS_CORRUPTION_ITERATIONS", 3000);
    let seed = env_number("EXOFS_CORRUPTION_SEED", 1);
    let failures = run_image(label, &image, iterations, seed);
    if !failures.is_empty() {
        panic!(
            "{label}: damaged images failed, in {} groups:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

#[test]
fn damaged_closed_image() {
    check_images("closed image", closed_image());
}

#[test]
fn damaged_image_with_live_journal() {
    let image = live_journal_image();
    let sb: Superblock = read_struct(&block_of(&image, 0), 0, "sb").expect("superblock");
    let (live, _) = live_log(&image, &sb);
    assert!(
        !live.is_empty(),
        "the crashed image holds no live transaction"
    );
    check_images("image with a live journal", image);
}
