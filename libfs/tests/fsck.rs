//! fsck: clean images stay clean, and each kind of hand-made damage is found (and mended
//! when it is safe to).

use libfs::format::{
    self, DiskInode, Superblock, BITMAP_BITS_PER_BLOCK, BITMAP_DATA_OFFSET, BLOCK_SIZE,
    BTREE_KIND_DIRECTORY, INODES_PER_BLOCK, INODE_FLAG_ORPHAN, INODE_SIZE, MAGIC_BITMAP,
    MAGIC_BTREE, MAGIC_SUPER,
};
use libfs::fsck::{self, ProblemKind, Report};
use libfs::{FallocateMode, FormatOptions, Fs, MemDevice, OpenOptions, RenameMode, ROOT_INO};
use libfs::{SetAttr, XattrMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::sync::Arc;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

const BLOCK: u64 = BLOCK_SIZE as u64;

fn fresh(size: u64) -> Arc<MemDevice> {
    let device = Arc::new(MemDevice::new(size));
    libfs::format(device.clone(), &FormatOptions::default()).expect("format");
    device
}

fn open(device: &Arc<MemDevice>) -> Fs {
    Fs::open_device(device.clone(), &OpenOptions::default()).expect("open")
}

fn check(device: &Arc<MemDevice>) -> Report {
    fsck::check(device.clone()).expect("check")
}

fn repair(device: &Arc<MemDevice>) -> Report {
    fsck::repair(device.clone()).expect("repair")
}

fn lines(report: &Report) -> String {
    report
        .problems
        .iter()
        .map(|p| format!("{p}\n"))
        .collect::<String>()
}

fn assert_clean(report: &Report) {
    assert!(
        report.is_clean(),
        "expected clean, found:\n{}",
        lines(report)
    );
}

/// The lines of one kind of problem.
fn kind_lines(report: &Report, kind: ProblemKind) -> Vec<String> {
    report.of_kind(kind).map(|p| p.to_string()).collect()
}

/// Repairs, expects a clean image afterwards, and a second repair with nothing to do.
fn repair_until_clean(device: &Arc<MemDevice>) -> Report {
    let report = repair(device);
    assert!(report.repaired > 0, "nothing repaired:\n{}", lines(&report));
    assert_eq!(report.repaired, report.problems.len(), "{}", lines(&report));
    assert_clean(&check(device));
    let again = repair(device);
    assert_eq!(again.repaired, 0);
    assert_clean(&again);
    report
}

fn superblock(bytes: &[u8]) -> Superblock {
    Superblock::read_from_prefix(bytes).expect("superblock").0
}

fn block_mut(bytes: &mut [u8], nr: u64) -> &mut [u8; BLOCK_SIZE] {
    let start = (nr * BLOCK) as usize;
    <&mut [u8; BLOCK_SIZE]>::try_from(&mut bytes[start..start + BLOCK_SIZE]).expect("block")
}

/// Sets or clears a bit of a bitmap region by hand, resealing the block.
fn set_bit(bytes: &mut [u8], region_start: u64, bit: u64, value: bool) {
    let nr = region_start + bit / BITMAP_BITS_PER_BLOCK;
    let local = bit % BITMAP_BITS_PER_BLOCK;
    let block = block_mut(bytes, nr);
    let byte = &mut block[BITMAP_DATA_OFFSET + (local / 8) as usize];
    if value {
        *byte |= 1 << (local % 8);
    } else {
        *byte &= !(1 << (local % 8));
    }
    format::seal_block(block, MAGIC_BITMAP, nr);
}

fn set_block_bit(bytes: &mut [u8], block: u64, value: bool) {
    let start = superblock(bytes).bitmap_start.get();
    set_bit(bytes, start, block, value);
}

fn inode_offset(bytes: &[u8], ino: u64) -> usize {
    let sb = superblock(bytes);
    let nr = sb.inode_table_start.get() + ino / INODES_PER_BLOCK as u64;
    (nr * BLOCK) as usize + (ino as usize % INODES_PER_BLOCK) * INODE_SIZE
}

fn read_inode(bytes: &[u8], ino: u64) -> DiskInode {
    let at = inode_offset(bytes, ino);
    DiskInode::read_from_bytes(&bytes[at..at + INODE_SIZE]).expect("inode")
}

/// Changes an inode by hand and recomputes its crc.
fn edit_inode(bytes: &mut [u8], ino: u64, edit: impl FnOnce(&mut DiskInode)) {
    let mut inode = read_inode(bytes, ino);
    edit(&mut inode);
    inode.crc = U32::new(inode.compute_crc(ino));
    let at = inode_offset(bytes, ino);
    bytes[at..at + INODE_SIZE].copy_from_slice(inode.as_bytes());
}

/// Changes the superblock by hand and reseals it.
fn edit_superblock(bytes: &mut [u8], edit: impl FnOnce(&mut Superblock)) {
    let mut sb = superblock(bytes);
    edit(&mut sb);
    let block = block_mut(bytes, 0);
    block[..size_of::<Superblock>()].copy_from_slice(sb.as_bytes());
    format::seal_block(block, MAGIC_SUPER, 0);
}

fn device_of(bytes: Vec<u8>) -> Arc<MemDevice> {
    Arc::new(MemDevice::from_bytes(bytes))
}

/// A file of `blocks` full blocks.
fn file_with_blocks(fs: &Fs, name: &[u8], blocks: usize) -> u64 {
    let attr = fs.create(ROOT_INO, name, 0o644, 0, 0).expect("create");
    let data = vec![0x5a; blocks * BLOCK_SIZE];
    fs.write_at(attr.ino, 0, &data).expect("write");
    attr.ino
}

/// Every kind of operation, leaving a consistent (closed) image.
fn busy_image() -> Arc<MemDevice> {
    let device = fresh(64 << 20);
    let fs = open(&device);
    // A file of many extents: every other block, so none merge (an extent tree).
    let many = fs.create(ROOT_INO, b"many", 0o644, 0, 0).expect("create");
    for i in 0..400u64 {
        fs.write_at(many.ino, i * 2 * BLOCK, &[i as u8; 100])
            .expect("write");
    }
    assert!(fs.extents(many.ino).expect("extents").len() > 5);
    file_with_blocks(&fs, b"big", 600);
    // A directory of 2000 entries, some with data.
    let big = fs.mkdir(ROOT_INO, b"big-dir", 0o755, 0, 0).expect("mkdir");
    let mut inos = Vec::new();
    for i in 0..2000 {
        let name = format!("file-{i:05}");
        let attr = fs
            .create(big.ino, name.as_bytes(), 0o644, 0, 0)
            .expect("create");
        if i % 50 == 0 {
            fs.write_at(attr.ino, 0, &vec![1u8; 5000]).expect("write");
        }
        inos.push(attr.ino);
    }
    // Hard links, symlinks, special files.
    let links = fs.mkdir(ROOT_INO, b"links", 0o755, 0, 0).expect("mkdir");
    for (i, ino) in inos.iter().take(30).enumerate() {
        fs.link(*ino, links.ino, format!("l{i}").as_bytes())
            .expect("link");
        fs.link(*ino, ROOT_INO, format!("root-l{i}").as_bytes())
            .expect("link");
    }
    fs.symlink(links.ino, b"short", b"../big", 0, 0)
        .expect("symlink");
    fs.symlink(links.ino, b"long", &[b'x'; BLOCK_SIZE], 0, 0)
        .expect("symlink");
    fs.mknod(links.ino, b"fifo", libfs::format::S_IFIFO | 0o644, 0, 0, 0)
        .expect("mknod");
    // Xattrs: enough for a multi-node tree, on a file and a directory.
    for i in 0..60 {
        let name = format!("user.attr{i}");
        fs.setxattr(many.ino, name.as_bytes(), &[i as u8; 200], XattrMode::Any)
            .expect("setxattr");
        fs.setxattr(big.ino, name.as_bytes(), b"v", XattrMode::Any)
            .expect("setxattr");
    }
    fs.removexattr(big.ino, b"user.attr3").expect("removexattr");
    // Unlinks (of singly and multiply linked files) and renames of every kind.
    for i in (0..2000).step_by(4) {
        fs.unlink(big.ino, format!("file-{i:05}").as_bytes())
            .expect("unlink");
    }
    fs.unlink(links.ino, b"l1").expect("unlink link");
    let sub = fs.mkdir(big.ino, b"sub", 0o755, 0, 0).expect("mkdir");
    fs.mkdir(sub.ino, b"deeper", 0o755, 0, 0).expect("mkdir");
    fs.rename(big.ino, b"sub", links.ino, b"moved", RenameMode::Replace)
        .expect("rename dir");
    fs.rename(
        big.ino,
        b"file-00001",
        links.ino,
        b"l2",
        RenameMode::Replace,
    )
    .expect("rename over a link");
    fs.rename(
        big.ino,
        b"file-00002",
        ROOT_INO,
        b"many",
        RenameMode::Exchange,
    )
    .expect("exchange");
    fs.mkdir(ROOT_INO, b"empty", 0o755, 0, 0).expect("mkdir");
    fs.rmdir(ROOT_INO, b"empty").expect("rmdir");
    // Truncate, fallocate, punch.
    fs.setattr(
        many.ino,
        &SetAttr {
            size: Some(300 * BLOCK),
            ..SetAttr::default()
        },
    )
    .expect("truncate");
    let pre = fs.create(ROOT_INO, b"pre", 0o644, 0, 0).expect("create");
    fs.fallocate(pre.ino, 0, 64 * BLOCK, FallocateMode::default())
        .expect("fallocate");
    fs.write_at(pre.ino, 10 * BLOCK + 7, b"written")
        .expect("write");
    let keep = FallocateMode {
        keep_size: true,
        punch_hole: false,
    };
    fs.fallocate(pre.ino, 64 * BLOCK, 16 * BLOCK, keep)
        .expect("fallocate past the end");
    let punch = FallocateMode {
        keep_size: true,
        punch_hole: true,
    };
    fs.fallocate(pre.ino, 20 * BLOCK, 8 * BLOCK, punch)
        .expect("punch");
    fs.close().expect("close");
    device
}

#[test]
fn fresh_image_is_clean() {
    let device = fresh(16 << 20);
    let report = check(&device);
    assert_clean(&report);
    assert_eq!((report.files, report.directories), (0, 1));
    let sb = superblock(&device.snapshot());
    assert_eq!(report.used_blocks, sb.data_start.get() + 1);
}

#[test]
fn busy_image_is_clean_and_repair_leaves_it_alone() {
    let device = busy_image();
    let report = check(&device);
    assert_clean(&report);
    assert!(report.files > 1500, "{report:?}");
    assert_eq!(report.directories, 5);
    let before = device.snapshot();
    let repaired = repair(&device);
    assert_clean(&repaired);
    assert_eq!(repaired.repaired, 0);
    assert!(device.snapshot() == before, "repair of a clean image wrote");
}

#[test]
fn crashed_image_with_journal_and_orphan_is_clean() {
    let device = busy_image();
    let fs = open(&device);
    let ino = file_with_blocks(&fs, b"open-then-unlinked", 40);
    fs.retain(ino).expect("retain");
    fs.unlink(ROOT_INO, b"open-then-unlinked").expect("unlink");
    fs.mkdir(ROOT_INO, b"after", 0o755, 0, 0).expect("mkdir");
    fs.sync().expect("sync");
    // A crash: the journal holds committed transactions, the superblock is dirty and
    // the orphan list holds the open unlinked file.
    let crashed = device_of(device.snapshot());
    std::mem::forget(fs);
    let bytes = crashed.snapshot();
    assert_eq!(superblock(&bytes).orphan_head.get(), ino);
    assert_clean(&check(&crashed));
    // Once opened, the orphan is freed and everything is still consistent.
    open(&crashed).close().expect("close");
    assert_clean(&check(&crashed));
}

#[test]
fn cleared_bitmap_bit_is_free_but_used_and_repaired() {
    let device = fresh(16 << 20);
    let fs = open(&device);
    let ino = file_with_blocks(&fs, b"data", 3);
    let extent = fs.extents(ino).expect("extents")[0];
    fs.close().expect("close");
    let target = extent.physical + 1;
    let mut bytes = device.snapshot();
    set_block_bit(&mut bytes, target, false);
    let device = device_of(bytes);
    let report = check(&device);
    let found = kind_lines(&report, ProblemKind::FreeButUsed);
    assert_eq!(found.len(), 1, "{}", lines(&report));
    assert!(
        found[0].starts_with(&format!("block {target}:")),
        "{}",
        found[0]
    );
    assert!(found[0].contains(&format!("inode {ino} extent at file block 1")));
    assert!(report.problems.iter().all(|p| p.repairable));
    repair_until_clean(&device);
    let fs = open(&device);
    let mut back = vec![0u8; 3 * BLOCK_SIZE];
    fs.read_at(ino, 0, &mut back).expect("read");
    assert!(back.iter().all(|b| *b == 0x5a));
}

#[test]
fn set_bitmap_bits_are_leaked_blocks_in_runs_and_repaired() {
    let device = fresh(16 << 20);
    let total = superblock(&device.snapshot()).total_blocks.get();
    let mut bytes = device.snapshot();
    for block in total - 64..total - 10 {
        set_block_bit(&mut bytes, block, true);
    }
    set_block_bit(&mut bytes, total - 1, true);
    let device = device_of(bytes);
    let report = check(&device);
    let found = kind_lines(&report, ProblemKind::LeakedBlock);
    assert_eq!(
        found,
        vec![
            format!(
                "blocks {}..={}: leaked (marked used, referenced by nothing)",
                total - 64,
                total - 11
            ),
            format!(
                "block {}: leaked (marked used, referenced by nothing)",
                total - 1
            ),
        ]
    );
    repair_until_clean(&device);
}

#[test]
fn changed_nlink_is_a_wrong_link_count_and_repaired() {
    let device = fresh(16 << 20);
    let fs = open(&device);
    let ino = file_with_blocks(&fs, b"f", 1);
    let dir = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).expect("mkdir").ino;
    fs.link(ino, dir, b"g").expect("link");
    fs.close().expect("close");
    let mut bytes = device.snapshot();
    edit_inode(&mut bytes, ino, |i| i.nlink = U32::new(3));
    edit_inode(&mut bytes, dir, |i| i.nlink = U32::new(7));
    let device = device_of(bytes);
    let report = check(&device);
    let found = kind_lines(&report, ProblemKind::WrongLinkCount);
    assert_eq!(found.len(), 2, "{}", lines(&report));
    assert!(found.contains(&format!(
        "inode {ino}: wrong link count (nlink 3, 2 entries name it)"
    )));
    assert!(found
        .iter()
        .any(|l| l.starts_with(&format!("inode {dir}:"))));
    repair_until_clean(&device);
    let fs = open(&device);
    assert_eq!(fs.getattr(ino).expect("getattr").nlink, 2);
    assert_eq!(fs.getattr(dir).expect("getattr").nlink, 2);
}

#[test]
fn entry_naming_a_freed_inode_is_dangling_and_removed() {
    let device = fresh(16 << 20);
    let fs = open(&device);
    let victim = fs
        .create(ROOT_INO, b"victim", 0o644, 0, 0)
        .expect("create")
        .ino;
    fs.create(ROOT_INO, b"kept", 0o644, 0, 0).expect("create");
    fs.close().expect("close");
    let mut bytes = device.snapshot();
    let at = inode_offset(&bytes, victim);
    bytes[at..at + INODE_SIZE].fill(0);
    let start = superblock(&bytes).inode_bitmap_start.get();
    set_bit(&mut bytes, start, victim, false);
    let device = device_of(bytes);
    let report = check(&device);
    let found = kind_lines(&report, ProblemKind::DanglingEntry);
    assert_eq!(
        found,
        vec![format!(
            "inode {ROOT_INO}: dangling entry (entry \"victim\" names inode {victim}, which is free)"
        )],
        "{}",
        lines(&report)
    );
    assert_eq!(report.problems.len(), 1, "{}", lines(&report));
    repair_until_clean(&device);
    let fs = open(&device);
    assert!(fs.lookup(ROOT_INO, b"victim").is_err());
    fs.lookup(ROOT_INO, b"kept").expect("kept");
    assert_eq!(fs.getattr(ROOT_INO).expect("root").size, 1);
}

#[test]
fn entry_of_the_wrong_type_is_dangling_and_retyped() {
    let device = fresh(16 << 20);
    let fs = open(&device);
    let ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).expect("create").ino;
    fs.close().expect("close");
    let mut bytes = device.snapshot();
    // Turn the file into a fifo: its entry now says the wrong type.
    edit_inode(&mut bytes, ino, |i| {
        i.mode = U32::new(libfs::format::S_IFIFO | 0o644)
    });
    let device = device_of(bytes);
    let report = check(&device);
    let found = kind_lines(&report, ProblemKind::DanglingEntry);
    assert_eq!(found.len(), 1, "{}", lines(&report));
    assert!(found[0].contains(&format!("inode {ino} as a regular file, but it is a fifo")));
    repair_until_clean(&device);
    let fs = open(&device);
    let entries = fs.list_dir(ROOT_INO).expect("readdir");
    assert_eq!(entries[0].kind, libfs::format::S_IFIFO);
}

#[test]
fn shared_block_is_double_allocated_and_not_repaired() {
    let device = fresh(16 << 20);
    let fs = open(&device);
    let a = file_with_blocks(&fs, b"a", 1);
    let b = file_with_blocks(&fs, b"b", 1);
    let shared = fs.extents(a).expect("extents")[0].physical;
    let orphaned = fs.extents(b).expect("extents")[0].physical;
    fs.close().expect("close");
    let mut bytes = device.snapshot();
    edit_inode(&mut bytes, b, |i| i.extents[0].physical = U64::new(shared));
    let device = device_of(bytes);
    let report = check(&device);
    let found = kind_lines(&report, ProblemKind::DoubleAllocated);
    assert_eq!(
        found,
        vec![format!(
            "block {shared}: double-allocated (inode {a} extent at file block 0, inode {b} extent at file block 0)"
        )],
        "{}",
        lines(&report)
    );
    assert!(report
        .of_kind(ProblemKind::DoubleAllocated)
        .all(|p| !p.repairable));
    // b's old block is leaked, but not freed while the double allocation stands.
    let leaked = kind_lines(&report, ProblemKind::LeakedBlock);
    assert_eq!(leaked.len(), 1);
    assert!(leaked[0].starts_with(&format!("block {orphaned}:")));
    let repaired = repair(&device);
    assert_eq!(repaired.repaired, 0);
    let after = check(&device);
    assert_eq!(after.problems, report.problems);
}

#[test]
fn flipped_byte_in_a_btree_node_is_a_bad_checksum() {
    let device = fresh(32 << 20);
    let fs = open(&device);
    let dir = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).expect("mkdir").ino;
    for i in 0..2000 {
        fs.create(dir, format!("entry-{i}").as_bytes(), 0o644, 0, 0)
            .expect("create");
    }
    fs.close().expect("close");
    let mut bytes = device.snapshot();
    let root = read_inode(&bytes, dir).tree_root.get();
    let sb = superblock(&bytes);
    // A leaf of the directory's tree (not its root).
    let leaf = (sb.data_start.get()..sb.total_blocks.get())
        .find(|&nr| {
            let b = &bytes[(nr * BLOCK) as usize..((nr + 1) * BLOCK) as usize];
            nr != root
                && b[0..4] == MAGIC_BTREE.to_le_bytes()
                && b[16..18] == [0, 0]
                && b[22..24] == BTREE_KIND_DIRECTORY.to_le_bytes()
                && b[24..32] == dir.to_le_bytes()
        })
        .expect("a leaf");
    bytes[(leaf * BLOCK) as usize + 3000] ^= 0x10;
    let device = device_of(bytes);
    let report = check(&device);
    let found = kind_lines(&report, ProblemKind::BadChecksum);
    assert_eq!(found.len(), 1, "{}", lines(&report));
    assert!(
        found[0].starts_with(&format!("block {leaf} (inode {dir}): bad checksum")),
        "{}",
        found[0]
    );
    // Only the entries of the lost leaf are unreachable (the walk goes on past the
    // damaged node): reported, but nothing is freed while a tree cannot be read.
    let lost = report.of_kind(ProblemKind::LeakedInode).count();
    assert!(lost > 0 && lost < 200, "{lost} inodes lost");
    assert_eq!(report.problems.len(), lost + 1, "{}", lines(&report));
    assert!(report.problems.iter().all(|p| !p.repairable));
    let repaired = repair(&device);
    assert_eq!(repaired.repaired, 0);
    assert_eq!(check(&device).problems, report.problems);
}

#[test]
fn bad_inode_checksum_is_reported() {
    let device = fresh(16 << 20);
    let fs = open(&device);
    let ino = file_with_blocks(&fs, b"f", 2);
    fs.close().expect("close");
    let mut bytes = device.snapshot();
    let at = inode_offset(&bytes, ino);
    bytes[at + 40] ^= 1;
    let device = device_of(bytes);
    let report = check(&device);
    let found = kind_lines(&report, ProblemKind::BadChecksum);
    assert_eq!(found.len(), 1, "{}", lines(&report));
    assert!(found[0].contains(&format!("(inode {ino})")), "{}", found[0]);
    // Its blocks look leaked but are not freed: the inode may still own them.
    assert!(report
        .of_kind(ProblemKind::LeakedBlock)
        .all(|p| !p.repairable));
}

#[test]
fn unlisted_orphan_is_a_leaked_inode_and_freed() {
    let device = fresh(16 << 20);
    let fs = open(&device);
    let ino = file_with_blocks(&fs, b"gone", 12);
    fs.retain(ino).expect("retain");
    fs.unlink(ROOT_INO, b"gone").expect("unlink");
    fs.checkpoint().expect("checkpoint");
    let mut bytes = device.snapshot();
    std::mem::forget(fs);
    // Lose the orphan list: the inode is now referenced by nothing.
    edit_superblock(&mut bytes, |sb| sb.orphan_head = U64::new(0));
    edit_inode(&mut bytes, ino, |i| {
        i.flags = U32::new(i.flags.get() & !INODE_FLAG_ORPHAN)
    });
    let device = device_of(bytes);
    let report = check(&device);
    let found = kind_lines(&report, ProblemKind::LeakedInode);
    assert_eq!(found.len(), 1, "{}", lines(&report));
    assert!(found[0].starts_with(&format!("inode {ino}: leaked inode")));
    assert_eq!(report.problems.len(), 1, "{}", lines(&report));
    let used = report.used_blocks;
    repair_until_clean(&device);
    assert_eq!(check(&device).used_blocks, used - 12);
    let fs = open(&device);
    assert!(fs.getattr(ino).is_err());
    assert_eq!(fs.statfs().expect("statfs").free_inodes, {
        let sb = superblock(&device.snapshot());
        sb.inode_count.get() - 2
    });
}

#[test]
fn wrong_size_blocks_and_parent_are_repaired() {
    let device = fresh(16 << 20);
    let fs = open(&device);
    let file = file_with_blocks(&fs, b"f", 4);
    let dir = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).expect("mkdir").ino;
    fs.create(dir, b"x", 0o644, 0, 0).expect("create");
    fs.close().expect("close");
    let mut bytes = device.snapshot();
    edit_inode(&mut bytes, file, |i| i.blocks = U64::new(9));
    edit_inode(&mut bytes, dir, |i| {
        i.size = U64::new(5);
        i.parent = U64::new(dir);
    });
    let device = device_of(bytes);
    let report = check(&device);
    for (kind, ino) in [
        (ProblemKind::WrongBlockCount, file),
        (ProblemKind::WrongSize, dir),
        (ProblemKind::BadParent, dir),
    ] {
        let found = kind_lines(&report, kind);
        assert_eq!(found.len(), 1, "{kind:?}: {}", lines(&report));
        assert!(
            found[0].starts_with(&format!("inode {ino}:")),
            "{}",
            found[0]
        );
    }
    repair_until_clean(&device);
}

/// Makes a damaged block pass its checksums again, so that only the structural checks
/// can catch the damage: headers are resealed, inode-table blocks get every inode's crc
/// recomputed.
fn reseal_block(bytes: &mut [u8], sb: &Superblock, nr: u64) {
    let table = sb.inode_table_start.get();
    let block = block_mut(bytes, nr);
    if nr >= table && nr < sb.data_start.get() {
        for slot in 0..INODES_PER_BLOCK {
            let raw = &mut block[slot * INODE_SIZE..(slot + 1) * INODE_SIZE];
            if raw.iter().all(|b| *b == 0) {
                continue;
            }
            let ino = (nr - table) * INODES_PER_BLOCK as u64 + slot as u64;
            let mut inode = DiskInode::read_from_bytes(raw).expect("inode");
            inode.crc = U32::new(inode.compute_crc(ino));
            raw.copy_from_slice(inode.as_bytes());
        }
    } else {
        let magic = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        format::seal_block(block, magic, nr);
    }
}

/// Random damage to metadata never panics, and repair converges: a second repair has
/// nothing left to do.
#[test]
fn random_damage_never_panics_and_repair_converges() {
    let base = {
        let device = fresh(8 << 20);
        let fs = open(&device);
        let dir = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).expect("mkdir").ino;
        for i in 0..300 {
            let attr = fs
                .create(dir, format!("n{i}").as_bytes(), 0o644, 0, 0)
                .expect("create");
            if i % 20 == 0 {
                for j in 0..8u64 {
                    fs.write_at(attr.ino, j * 2 * BLOCK, b"x").expect("write");
                }
                fs.setxattr(attr.ino, b"user.a", &[7; 300], XattrMode::Any)
                    .expect("setxattr");
            }
        }
        fs.close().expect("close");
        device.snapshot()
    };
    let sb = superblock(&base);
    let journal_end = sb.journal_start.get() + sb.journal_blocks.get();
    // Blocks worth damaging: bitmaps, inode table, and B+tree nodes.
    let targets: Vec<u64> = (journal_end..sb.total_blocks.get())
        .filter(|&nr| {
            nr < sb.data_start.get()
                || base[(nr * BLOCK) as usize..(nr * BLOCK) as usize + 4]
                    == MAGIC_BTREE.to_le_bytes()
        })
        .filter(|&nr| {
            // Skip all-zero inode-table blocks: flips there are rarely interesting.
            base[(nr * BLOCK) as usize..((nr + 1) * BLOCK) as usize]
                .iter()
                .any(|b| *b != 0)
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(7);
    for round in 0..150 {
        let mut bytes = base.clone();
        let nr = targets[rng.gen_range(0..targets.len())];
        let reseal = round % 2 == 0;
        let block = block_mut(&mut bytes, nr);
        for _ in 0..rng.gen_range(1..=4) {
            let at = if rng.gen_bool(0.7) {
                rng.gen_range(0..512)
            } else {
                rng.gen_range(0..BLOCK_SIZE)
            };
            block[at] ^= 1 << rng.gen_range(0..8);
        }
        if reseal {
            reseal_block(&mut bytes, &sb, nr);
        }
        let device = device_of(bytes);
        let report = check(&device);
        for problem in &report.problems {
            assert!(!problem.to_string().contains('\n'));
        }
        let first = repair(&device);
        let second = repair(&device);
        assert_eq!(
            second.repaired,
            0,
            "round {round}, block {nr}: first repair\n{}second\n{}",
            lines(&first),
            lines(&second)
        );
        assert!(
            second.problems.iter().all(|p| !p.repairable),
            "round {round}, block {nr}: left repairable\n{}",
            lines(&second)
        );
    }
}

#[test]
fn committed_but_unwritten_transaction_is_checked_through_the_journal() {
    let device = fresh(16 << 20);
    let fs = open(&device);
    fs.create(ROOT_INO, b"before", 0o644, 0, 0).expect("create");
    fs.checkpoint().expect("checkpoint");
    let checkpointed = device.snapshot();
    let dir = fs
        .mkdir(ROOT_INO, b"after", 0o755, 0, 0)
        .expect("mkdir")
        .ino;
    for i in 0..20 {
        fs.create(dir, format!("f{i}").as_bytes(), 0o644, 0, 0)
            .expect("create");
    }
    fs.sync().expect("sync");
    let committed = device.snapshot();
    std::mem::forget(fs);
    // A crash after the log write and before any home write: home blocks are those of
    // the checkpoint, the log holds the transaction.
    let sb = superblock(&checkpointed);
    let from = (sb.journal_start.get() * BLOCK) as usize;
    let to = ((sb.journal_start.get() + sb.journal_blocks.get()) * BLOCK) as usize;
    let mut bytes = checkpointed.clone();
    bytes[from..to].copy_from_slice(&committed[from..to]);
    let crashed = device_of(bytes);
    let report = check(&crashed);
    assert_clean(&report);
    assert_eq!((report.files, report.directories), (21, 2));
    // The check wrote nothing: the home blocks are still those of the checkpoint.
    assert!(crashed.snapshot()[to..] == checkpointed[to..]);
}

#[test]
fn orphan_flag_off_the_list_is_unclean() {
    let device = fresh(16 << 20);
    let fs = open(&device);
    let ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).expect("create").ino;
    fs.close().expect("close");
    let mut bytes = device.snapshot();
    edit_inode(&mut bytes, ino, |i| {
        i.flags = U32::new(i.flags.get() | INODE_FLAG_ORPHAN)
    });
    let report = check(&device_of(bytes));
    let found = kind_lines(&report, ProblemKind::Unclean);
    assert_eq!(
        found,
        vec![format!(
            "inode {ino}: unclean (orphan flag set, but not on the orphan list)"
        )]
    );
}

/// Random operations, with the image checked after each batch, after each reopen and
/// on crash copies: fsck is an oracle for the write path. `FSCK_SEEDS=200` runs longer.
#[test]
fn random_operations_keep_the_image_clean() {
    let seeds: u64 = std::env::var("FSCK_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    for seed in 0..seeds {
        random_operations(seed, 32 << 20);
    }
}

/// The same on a device small enough to fill up, through ENOSPC rollbacks and short
/// writes. Blocked by the data.rs bug of `short_write_on_a_full_device_leaks_no_blocks`.
#[test]
fn random_operations_on_a_full_device_keep_the_image_clean() {
    for seed in 0..12 {
        random_operations(1000 + seed, 3 << 20);
    }
}

fn random_operations(seed: u64, size: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let device = fresh(size);
    // Large writes fill a small device: ENOSPC part way through operations.
    let max_write = if size < (8 << 20) { 400_000 } else { 20_000 };
    let mut fs = open(&device);
    let mut dirs = vec![ROOT_INO];
    let mut names: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut open_files: Vec<u64> = Vec::new();
    // The last operations, for failure messages.
    let mut log: VecDeque<String> = VecDeque::new();
    let failed = |what: &str, log: &VecDeque<String>, report: &Report| {
        let ops: String = log.iter().map(|op| format!("  {op}\n")).collect();
        format!("seed {seed} {what}:\n{}after:\n{ops}", lines(report))
    };
    for batch in 0..12 {
        for _ in 0..150 {
            let op = if rng.gen_bool(0.05) {
                hold_or_release(&fs, &mut rng, &names, &mut open_files)
            } else {
                random_op(&fs, &mut rng, &mut dirs, &mut names, max_write)
            };
            if log.len() == 40 {
                log.pop_front();
            }
            log.push_back(op);
        }
        match batch % 3 {
            0 => {
                fs.sync().expect("sync");
                let report = check(&device_of(device.snapshot()));
                let what = format!("batch {batch} (crash copy)");
                assert!(report.is_clean(), "{}", failed(&what, &log, &report));
            }
            1 => {
                for ino in open_files.drain(..) {
                    fs.release(ino).expect("release");
                }
                fs.close().expect("close");
                let report = check(&device);
                let what = format!("batch {batch}");
                assert!(report.is_clean(), "{}", failed(&what, &log, &report));
                fs = open(&device);
            }
            _ => fs.checkpoint().expect("checkpoint"),
        }
    }
    fs.close().expect("close");
    assert_clean(&check(&device));
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> Option<&'a T> {
    (!items.is_empty()).then(|| &items[rng.gen_range(0..items.len())])
}

/// Opens (retains) a file, or releases one: unlinked open files sit on the orphan list
/// until released.
fn hold_or_release(
    fs: &Fs,
    rng: &mut StdRng,
    names: &[(u64, Vec<u8>)],
    open: &mut Vec<u64>,
) -> String {
    if !open.is_empty() && rng.gen_bool(0.5) {
        let ino = open.swap_remove(rng.gen_range(0..open.len()));
        fs.release(ino).expect("release");
        return format!("release {ino}");
    }
    let Some((parent, name)) = pick(rng, names).cloned() else {
        return "nothing to open".into();
    };
    let Some(attr) = regular_file(fs, parent, &name) else {
        return "not a file to open".into();
    };
    fs.retain(attr.ino).expect("retain");
    open.push(attr.ino);
    format!("retain {}", attr.ino)
}

/// The regular file `name` in `parent` names, if any: data operations go to regular
/// files only (`Fs::write_at` would also grow a symlink past SYMLINK_MAX).
fn regular_file(fs: &Fs, parent: u64, name: &[u8]) -> Option<libfs::Attr> {
    fs.lookup(parent, name).ok().filter(|attr| attr.is_file())
}

/// What an operation returned, for the log.
fn outcome<T: std::fmt::Debug>(result: &libfs::Result<T>) -> String {
    match result {
        Ok(value) => format!("ok {value:?}"),
        Err(e) => format!("error {e}"),
    }
}

/// One random operation, described for the log; failures (ENOENT, ENOTEMPTY, ENOSPC,
/// ...) are fine, only the image must stay consistent.
fn random_op(
    fs: &Fs,
    rng: &mut StdRng,
    dirs: &mut Vec<u64>,
    names: &mut Vec<(u64, Vec<u8>)>,
    max_write: usize,
) -> String {
    let dir = *pick(rng, dirs).unwrap_or(&ROOT_INO);
    let name = format!("n{}", rng.gen_range(0..60)).into_bytes();
    let shown = String::from_utf8_lossy(&name).into_owned();
    let choice = rng.gen_range(0..16);
    let existing = pick(rng, names).cloned();
    let file = existing
        .as_ref()
        .and_then(|(parent, old)| regular_file(fs, *parent, old));
    match choice {
        0..=2 => {
            let result = fs.create(dir, &name, 0o644, 0, 0).map(|a| a.ino);
            if result.is_ok() {
                names.push((dir, name));
            }
            format!("create {dir}/{shown}: {}", outcome(&result))
        }
        3 => {
            let result = fs.mkdir(dir, &name, 0o755, 0, 0).map(|a| a.ino);
            if let Ok(ino) = result {
                dirs.push(ino);
                names.push((dir, name));
            }
            format!("mkdir {dir}/{shown}: {}", outcome(&result))
        }
        4 => {
            let Some((parent, old)) = existing else {
                return "no link".into();
            };
            let result = fs
                .lookup(parent, &old)
                .and_then(|attr| fs.link(attr.ino, dir, &name))
                .map(|a| a.ino);
            if result.is_ok() {
                names.push((dir, name));
            }
            format!(
                "link {parent}/{:?} as {dir}/{shown}: {}",
                String::from_utf8_lossy(&old),
                outcome(&result)
            )
        }
        5 | 6 => {
            let Some((parent, old)) = existing else {
                return "no unlink".into();
            };
            let result = fs.unlink(parent, &old).or_else(|_| fs.rmdir(parent, &old));
            format!(
                "unlink {parent}/{:?}: {}",
                String::from_utf8_lossy(&old),
                outcome(&result)
            )
        }
        7 | 8 => {
            let Some((parent, old)) = existing else {
                return "no rename".into();
            };
            let mode = match rng.gen_range(0..3) {
                0 => RenameMode::Replace,
                1 => RenameMode::NoReplace,
                _ => RenameMode::Exchange,
            };
            let result = fs.rename(parent, &old, dir, &name, mode);
            if result.is_ok() {
                names.push((dir, name));
            }
            format!(
                "rename {parent}/{:?} to {dir}/{shown} ({mode:?}): {}",
                String::from_utf8_lossy(&old),
                outcome(&result)
            )
        }
        9..=11 => {
            let Some(attr) = file else {
                return "no write".into();
            };
            let offset = rng.gen_range(0..64) * BLOCK + rng.gen_range(0..100);
            let len = rng.gen_range(1..max_write);
            let result = fs.write_at(attr.ino, offset, &vec![3u8; len]);
            let short = if result.as_ref().is_ok_and(|n| *n < len) {
                " (short)"
            } else {
                ""
            };
            format!(
                "write {} at {offset}+{len}: {}{short}",
                attr.ino,
                outcome(&result)
            )
        }
        12 => {
            let Some(attr) = file else {
                return "no truncate".into();
            };
            let size = rng.gen_range(0..40) * 3000;
            let change = SetAttr {
                size: Some(size),
                ..SetAttr::default()
            };
            let result = fs.setattr(attr.ino, &change).map(|a| a.size);
            format!("truncate {} to {size}: {}", attr.ino, outcome(&result))
        }
        13 => {
            let Some(attr) = file else {
                return "no fallocate".into();
            };
            let punch_hole = rng.gen_bool(0.4);
            let mode = FallocateMode {
                keep_size: punch_hole || rng.gen_bool(0.5),
                punch_hole,
            };
            let offset = rng.gen_range(0..64) * 2000;
            let len = rng.gen_range(1..max_write as u64 * 4);
            let result = fs.fallocate(attr.ino, offset, len, mode);
            format!(
                "fallocate {} {offset}+{len} {mode:?}: {}",
                attr.ino,
                outcome(&result)
            )
        }
        14 => {
            let Some((parent, old)) = existing else {
                return "no xattr".into();
            };
            let Ok(attr) = fs.lookup(parent, &old) else {
                return "no xattr target".into();
            };
            let key = format!("user.k{}", rng.gen_range(0..30));
            let result = if rng.gen_bool(0.7) {
                let value = vec![9u8; rng.gen_range(0..600)];
                fs.setxattr(attr.ino, key.as_bytes(), &value, XattrMode::Any)
            } else {
                fs.removexattr(attr.ino, key.as_bytes())
            };
            format!("xattr {} {key}: {}", attr.ino, outcome(&result))
        }
        _ => {
            // Symlinks are renamed and unlinked, but never written to (see
            // `regular_file`).
            let target = vec![b't'; rng.gen_range(1..5000)];
            let result = fs.symlink(dir, &name, &target, 0, 0).map(|a| a.ino);
            if result.is_ok() {
                names.push((dir, name));
            }
            format!(
                "symlink {dir}/{shown} ({} bytes): {}",
                target.len(),
                outcome(&result)
            )
        }
    }
}

/// Bug in `data.rs` (not fsck): when a write fills the device part way, `write_step`
/// has already allocated the next run when `extent::insert` fails with ENOSPC (the
/// sixth extent needs an extent-tree node), and `write_data` turns that error into a
/// short write, so the operation commits the allocation without the mapping: the run
/// is leaked. Un-ignore once `write_data` undoes a failed step.
#[test]
fn short_write_on_a_full_device_leaks_no_blocks() {
    let device = fresh(4 << 20);
    let fs = open(&device);
    // Five single-block extents: the inline map is full.
    let file = fs.create(ROOT_INO, b"f", 0o644, 0, 0).expect("create").ino;
    for i in 0..5u64 {
        fs.write_at(file, i * 2 * BLOCK, &[1; BLOCK_SIZE])
            .expect("write");
    }
    // Fill the device, then give back exactly two blocks.
    let filler = fs
        .create(ROOT_INO, b"filler", 0o644, 0, 0)
        .expect("create")
        .ino;
    let mut size = 0;
    while let Ok(n @ 1..) = fs.write_at(filler, size, &vec![2; 64 * BLOCK_SIZE]) {
        size += n as u64;
    }
    let change = SetAttr {
        size: Some(size - 2 * BLOCK),
        ..SetAttr::default()
    };
    fs.setattr(filler, &change).expect("truncate");
    fs.checkpoint().expect("checkpoint");
    assert_eq!(fs.statfs().expect("statfs").free_blocks, 2);
    // File blocks 8 (mapped), 9 and 10 (a hole): the hole takes the two free blocks,
    // then the sixth extent needs a tree node and no block is left for it.
    let written = fs.write_at(file, 8 * BLOCK, &vec![3; 3 * BLOCK_SIZE]);
    assert_eq!(written.expect("short write"), BLOCK_SIZE);
    fs.close().expect("close");
    // Fails today: "blocks 1022..=1023: leaked (marked used, referenced by nothing)".
    assert_clean(&check(&device));
}
