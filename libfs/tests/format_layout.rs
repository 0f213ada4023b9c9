//! Guards docs/FORMAT.md: formats images on a `MemDevice` and decodes them from the raw
//! bytes at the offsets the document gives. crc32c, FNV-1a, the sizing rules, the B+tree
//! walk and journal replay are re-implemented here from the document alone; libfs's
//! zerocopy structs are used only to check their sizes and field offsets against the
//! document's tables.
//!
//! If a check fails, the code and the document disagree: find out which one is right
//! before changing either.

#![allow(clippy::unwrap_used)]

use libfs::format as fmt;
use libfs::{BlockDevice, Error, FormatOptions, Fs, MemDevice, OpenOptions, ROOT_INO};
use std::mem::{offset_of, size_of};
use std::sync::Arc;

// ---------------------------------------------------------------------------------------
// Constants as FORMAT.md states them.

const BS: usize = 4096;
const BS64: u64 = 4096;
/// Bits per bitmap block: (4096 - 16) * 8.
const BITMAP_BITS: u64 = 32640;
const INODE_SIZE: usize = 256;
const INODES_PER_BLOCK: u64 = 16;
const DESCRIPTOR_CAPACITY: usize = 508;
const INLINE_EXTENTS: usize = 5;

const MAGIC_SUPER: &[u8; 4] = b"EXSB";
const MAGIC_JOURNAL_HEADER: &[u8; 4] = b"EXJH";
const MAGIC_DESCRIPTOR: &[u8; 4] = b"EXJD";
const MAGIC_COMMIT: &[u8; 4] = b"EXJC";
const MAGIC_BITMAP: &[u8; 4] = b"EXBM";
const MAGIC_BTREE: &[u8; 4] = b"EXBT";

const KIND_EXTENTS: u16 = 1;
const KIND_DIRECTORY: u16 = 2;
const KIND_XATTR: u16 = 3;

const FLAG_EXTENT_TREE: u32 = 1;
const FLAG_ORPHAN: u32 = 2;

/// Superblock field offsets (FORMAT.md, "Superblock").
mod sb {
    pub const FORMAT_VERSION: usize = 16;
    pub const FEATURE_COMPAT: usize = 20;
    pub const FEATURE_RO_COMPAT: usize = 24;
    pub const FEATURE_INCOMPAT: usize = 28;
    pub const UUID: usize = 32;
    pub const BLOCK_SIZE: usize = 48;
    pub const STATE: usize = 52;
    pub const TOTAL_BLOCKS: usize = 56;
    pub const JOURNAL_START: usize = 64;
    pub const JOURNAL_BLOCKS: usize = 72;
    pub const BITMAP_START: usize = 80;
    pub const BITMAP_BLOCKS: usize = 88;
    pub const INODE_BITMAP_START: usize = 96;
    pub const INODE_BITMAP_BLOCKS: usize = 104;
    pub const INODE_TABLE_START: usize = 112;
    pub const INODE_TABLE_BLOCKS: usize = 120;
    pub const INODE_COUNT: usize = 128;
    pub const DATA_START: usize = 136;
    pub const ORPHAN_HEAD: usize = 144;
    pub const CREATED_NS: usize = 152;
    pub const MOUNT_COUNT: usize = 160;
    pub const LABEL: usize = 168;
    pub const RESERVED: usize = 200;
    pub const SIZE: usize = 256;
}

/// Inode field offsets (FORMAT.md, "Inode").
mod ino {
    pub const MODE: usize = 0;
    pub const UID: usize = 4;
    pub const GID: usize = 8;
    pub const FLAGS: usize = 12;
    pub const NLINK: usize = 16;
    pub const CRC: usize = 20;
    pub const SIZE: usize = 24;
    pub const GENERATION: usize = 32;
    pub const ATIME: usize = 40;
    pub const MTIME: usize = 48;
    pub const CTIME: usize = 56;
    pub const CRTIME: usize = 64;
    pub const BLOCKS: usize = 72;
    pub const PARENT: usize = 80;
    pub const XATTR_ROOT: usize = 88;
    pub const NEXT_ORPHAN: usize = 96;
    pub const TREE_ROOT: usize = 104;
    pub const RDEV: usize = 112;
    pub const EXTENT_COUNT: usize = 116;
    pub const RESERVED: usize = 120;
    pub const EXTENTS: usize = 128;
    pub const RESERVED2: usize = 248;
}

// ---------------------------------------------------------------------------------------
// Primitives, from the document's definitions.

/// CRC-32C (Castagnoli): reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF.
fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// Continues a finished crc32c over more bytes: crc32c_append(crc32c(a), b) == crc32c(a ++ b).
fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &byte in data {
        c ^= u32::from(byte);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn name_key(name: &[u8], collision: u64) -> u64 {
    ((fnv1a64(name) >> 18) << 16) | collision
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn lei64(b: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// crc of a metadata block: crc32c of the 4096 bytes with bytes 4..8 read as zero.
fn block_crc(block: &[u8]) -> u32 {
    let mut copy = block.to_vec();
    copy[4..8].fill(0);
    crc32c(&copy)
}

/// Whether a block carries a valid header of this magic for this block number.
fn header_ok(block: &[u8], magic: &[u8; 4], nr: u64) -> bool {
    &block[0..4] == magic && le32(block, 4) == block_crc(block) && le64(block, 8) == nr
}

fn check_header(block: &[u8], magic: &[u8; 4], nr: u64) {
    assert_eq!(&block[0..4], magic, "magic of block {nr}");
    assert_eq!(le32(block, 4), block_crc(block), "crc of block {nr}");
    assert_eq!(le64(block, 8), nr, "self number of block {nr}");
}

fn read_block(dev: &dyn BlockDevice, nr: u64) -> Vec<u8> {
    let mut block = vec![0u8; BS];
    dev.read_at(&mut block, nr * BS64).unwrap();
    block
}

fn write_block(dev: &dyn BlockDevice, nr: u64, block: &[u8]) {
    dev.write_at(block, nr * BS64).unwrap();
}

// ---------------------------------------------------------------------------------------
// Decoders.

/// The superblock fields a reader needs, decoded by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Super {
    total_blocks: u64,
    journal_start: u64,
    journal_blocks: u64,
    bitmap_start: u64,
    bitmap_blocks: u64,
    inode_bitmap_start: u64,
    inode_bitmap_blocks: u64,
    inode_table_start: u64,
    inode_table_blocks: u64,
    inode_count: u64,
    data_start: u64,
}

fn read_super(dev: &dyn BlockDevice) -> (Vec<u8>, Super) {
    let raw = read_block(dev, 0);
    check_header(&raw, MAGIC_SUPER, 0);
    let s = Super {
        total_blocks: le64(&raw, sb::TOTAL_BLOCKS),
        journal_start: le64(&raw, sb::JOURNAL_START),
        journal_blocks: le64(&raw, sb::JOURNAL_BLOCKS),
        bitmap_start: le64(&raw, sb::BITMAP_START),
        bitmap_blocks: le64(&raw, sb::BITMAP_BLOCKS),
        inode_bitmap_start: le64(&raw, sb::INODE_BITMAP_START),
        inode_bitmap_blocks: le64(&raw, sb::INODE_BITMAP_BLOCKS),
        inode_table_start: le64(&raw, sb::INODE_TABLE_START),
        inode_table_blocks: le64(&raw, sb::INODE_TABLE_BLOCKS),
        inode_count: le64(&raw, sb::INODE_COUNT),
        data_start: le64(&raw, sb::DATA_START),
    };
    (raw, s)
}

/// Region layout per the sizing rules of FORMAT.md.
fn expected_layout(device_bytes: u64, inodes: Option<u64>, journal: Option<u64>) -> Super {
    let total_blocks = device_bytes / BS64;
    let journal_blocks = journal.unwrap_or((total_blocks / 64).clamp(64, 16384));
    let inode_count = inodes
        .unwrap_or(total_blocks / 4)
        .max(64)
        .div_ceil(INODES_PER_BLOCK)
        * INODES_PER_BLOCK;
    let journal_start = 1;
    let bitmap_start = journal_start + journal_blocks;
    let bitmap_blocks = total_blocks.div_ceil(BITMAP_BITS);
    let inode_bitmap_start = bitmap_start + bitmap_blocks;
    let inode_bitmap_blocks = inode_count.div_ceil(BITMAP_BITS);
    let inode_table_start = inode_bitmap_start + inode_bitmap_blocks;
    let inode_table_blocks = inode_count / INODES_PER_BLOCK;
    Super {
        total_blocks,
        journal_start,
        journal_blocks,
        bitmap_start,
        bitmap_blocks,
        inode_bitmap_start,
        inode_bitmap_blocks,
        inode_table_start,
        inode_table_blocks,
        inode_count,
        data_start: inode_table_start + inode_table_blocks,
    }
}

/// Bit `bit` of the bitmap region at `start`: block start + bit / 32640, byte
/// 16 + (bit % 32640) / 8, bit (bit % 8) counted from the least significant.
fn bitmap_bit(dev: &dyn BlockDevice, start: u64, bit: u64) -> bool {
    let block = read_block(dev, start + bit / BITMAP_BITS);
    let local = bit % BITMAP_BITS;
    block[16 + (local / 8) as usize] & (1 << (local % 8)) != 0
}

/// Every set bit of a bitmap region, checking each block's header.
fn bitmap_set_bits(dev: &dyn BlockDevice, start: u64, blocks: u64) -> Vec<u64> {
    let mut set = Vec::new();
    for index in 0..blocks {
        let block = read_block(dev, start + index);
        check_header(&block, MAGIC_BITMAP, start + index);
        for (byte_index, byte) in block[16..].iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    set.push(index * BITMAP_BITS + byte_index as u64 * 8 + bit);
                }
            }
        }
    }
    set
}

/// The 256 bytes of inode `n`: block inode_table_start + n / 16, offset (n % 16) * 256.
fn inode_raw(dev: &dyn BlockDevice, s: &Super, n: u64) -> Vec<u8> {
    let block = read_block(dev, s.inode_table_start + n / INODES_PER_BLOCK);
    let at = (n % INODES_PER_BLOCK) as usize * INODE_SIZE;
    block[at..at + INODE_SIZE].to_vec()
}

/// crc32c(n as u64 LE ++ the inode with its crc field read as zero).
fn inode_crc(n: u64, raw: &[u8]) -> u32 {
    let mut bytes = n.to_le_bytes().to_vec();
    bytes.extend_from_slice(raw);
    bytes[8 + ino::CRC..8 + ino::CRC + 4].fill(0);
    crc32c(&bytes)
}

/// An extent: logical, physical, length, flags.
type RawExtent = (u64, u64, u32, u32);

/// The used inline extents of an inode (extents[0..extent_count)).
fn inline_extents(raw: &[u8]) -> Vec<RawExtent> {
    let count = le32(raw, ino::EXTENT_COUNT) as usize;
    assert!(count <= INLINE_EXTENTS);
    let extents: Vec<RawExtent> = (0..INLINE_EXTENTS)
        .map(|i| {
            let at = ino::EXTENTS + 24 * i;
            (
                le64(raw, at),
                le64(raw, at + 8),
                le32(raw, at + 16),
                le32(raw, at + 20),
            )
        })
        .collect();
    for unused in &extents[count..] {
        assert_eq!(*unused, (0, 0, 0, 0), "unused inline slots are zero");
    }
    extents[..count].to_vec()
}

/// A B+tree node's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NodeHeader {
    level: u16,
    count: u16,
    value_start: u16,
    kind: u16,
    owner: u64,
}

fn node_header(block: &[u8]) -> NodeHeader {
    NodeHeader {
        level: le16(block, 16),
        count: le16(block, 18),
        value_start: le16(block, 20),
        kind: le16(block, 22),
        owner: le64(block, 24),
    }
}

/// Every (key, value) of the tree rooted at `root`, in key order, checking every node the
/// way FORMAT.md says a reader must; `nodes` receives each node block.
fn tree_entries(
    dev: &dyn BlockDevice,
    root: u64,
    kind: u16,
    owner: u64,
    nodes: &mut Vec<u64>,
) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    walk_node(dev, root, kind, owner, None, nodes, &mut out);
    for pair in out.windows(2) {
        assert!(
            pair[0].0 < pair[1].0,
            "keys strictly increase across the tree"
        );
    }
    out
}

fn walk_node(
    dev: &dyn BlockDevice,
    nr: u64,
    kind: u16,
    owner: u64,
    level: Option<u16>,
    nodes: &mut Vec<u64>,
    out: &mut Vec<(u64, Vec<u8>)>,
) {
    let block = read_block(dev, nr);
    check_header(&block, MAGIC_BTREE, nr);
    nodes.push(nr);
    let h = node_header(&block);
    assert_eq!((h.kind, h.owner), (kind, owner), "node {nr} kind and owner");
    assert!(h.level < 16);
    if let Some(level) = level {
        assert_eq!(h.level, level, "node {nr} level");
        assert!(h.count > 0, "only the root may be empty");
    }
    let count = usize::from(h.count);
    assert!(32 + 16 * count <= BS);
    if h.level == 0 {
        let value_start = usize::from(h.value_start);
        assert!(
            (32 + 16 * count..=BS).contains(&value_start),
            "node {nr} value_start"
        );
        for i in 0..count {
            let at = 32 + 16 * i;
            let (key, offset, length) = (
                le64(&block, at),
                usize::from(le16(&block, at + 8)),
                usize::from(le16(&block, at + 10)),
            );
            assert_eq!(le32(&block, at + 12), 0, "slot reserved field");
            assert!(length <= 1024);
            assert!(offset >= value_start && offset + length <= BS);
            out.push((key, block[offset..offset + length].to_vec()));
        }
    } else {
        assert_eq!(h.value_start, 0, "internal nodes have value_start 0");
        assert!(count > 0);
        for i in 0..count {
            let at = 32 + 16 * i;
            let child = le64(&block, at + 8);
            assert!(child != 0 && child != nr);
            walk_node(dev, child, kind, owner, Some(h.level - 1), nodes, out);
        }
    }
}

/// A directory entry value: ino u64, file_type u8, name_len u8, name.
fn decode_dirent(value: &[u8]) -> (u64, u8, Vec<u8>) {
    let name_len = usize::from(value[9]);
    assert_eq!(value.len(), 10 + name_len, "entry value length");
    (le64(value, 0), value[8], value[10..].to_vec())
}

/// One replayable transaction.
#[derive(Debug, Clone)]
struct Transaction {
    seq: u64,
    /// Log index of its first descriptor.
    index: u64,
    /// (home block, image) in log order.
    images: Vec<(u64, Vec<u8>)>,
}

/// Transaction `seq` at log index `index`, or None where replay stops (FORMAT.md,
/// "Replay").
fn read_transaction(
    dev: &dyn BlockDevice,
    s: &Super,
    index: u64,
    seq: u64,
) -> Option<(Transaction, u64)> {
    let capacity = s.journal_blocks - 1;
    let log = |i: u64| (i < capacity).then(|| read_block(dev, s.journal_start + 1 + i));
    let mut at = index;
    let mut crc = 0;
    let mut images = Vec::new();
    loop {
        let descriptor = log(at)?;
        if !header_ok(&descriptor, MAGIC_DESCRIPTOR, s.journal_start + 1 + at) {
            return None;
        }
        let count = le32(&descriptor, 24) as usize;
        if le64(&descriptor, 16) != seq || count == 0 || count > DESCRIPTOR_CAPACITY {
            return None;
        }
        crc = crc32c_append(crc, &descriptor);
        at += 1;
        for i in 0..count {
            let image = log(at)?;
            crc = crc32c_append(crc, &image);
            images.push((le64(&descriptor, 32 + 8 * i), image));
            at += 1;
        }
        if le32(&descriptor, 28) == 0 {
            break;
        }
    }
    let commit = log(at)?;
    if !header_ok(&commit, MAGIC_COMMIT, s.journal_start + 1 + at)
        || le64(&commit, 16) != seq
        || le32(&commit, 24) as usize != images.len()
        || le32(&commit, 28) != crc
    {
        return None;
    }
    for (home, _) in &images {
        assert!(
            *home < s.total_blocks,
            "a committed target outside the image is corruption"
        );
    }
    Some((Transaction { seq, index, images }, at + 1))
}

/// Every transaction replay applies, in order.
fn replay_transactions(dev: &dyn BlockDevice, s: &Super) -> Vec<Transaction> {
    let header = read_block(dev, s.journal_start);
    check_header(&header, MAGIC_JOURNAL_HEADER, s.journal_start);
    let (mut seq, mut index) = (le64(&header, 16), le64(&header, 24));
    let mut out = Vec::new();
    while let Some((transaction, next)) = read_transaction(dev, s, index, seq) {
        out.push(transaction);
        index = next;
        seq += 1;
    }
    out
}

fn replayed_by_libfs(bytes: Vec<u8>) -> u64 {
    let dev = Arc::new(MemDevice::from_bytes(bytes));
    let fs = Fs::open_device(dev, &OpenOptions::read_only()).unwrap();
    let n = fs.journal_stats().replayed_transactions;
    fs.close().unwrap();
    n
}

fn fresh(size: u64, options: &FormatOptions) -> Arc<MemDevice> {
    let dev = Arc::new(MemDevice::new(size));
    libfs::format(dev.clone(), options).unwrap();
    dev
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn primitives_match_their_test_vectors() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(
        crc32c_append(crc32c(b"1234"), b"56789"),
        crc32c(b"123456789")
    );
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"hello"), 0xa430_d846_80aa_bd0b);
    assert_eq!(name_key(b"hello", 0), 0x290c_3611_a02a_0000);
    assert_eq!(name_key(b"hello", 0), 2_957_798_504_605_024_256);
    assert_eq!(libfs::dir::fnv1a64(b"hello"), fnv1a64(b"hello"));
    assert_eq!(libfs::dir::key_base(b"hello"), name_key(b"hello", 0));
    // Keys stay below 2^62 so that key + 3 (a readdir cursor) fits an i64.
    assert!(name_key(&[0xff; 8], 0xffff) < 1 << 62);
    assert_eq!((u64::MAX >> 18) << 16 | 0xffff, (1 << 62) - 1);
}

#[test]
fn constants_and_magics() {
    for (bytes, value, name) in [
        (MAGIC_SUPER, fmt::MAGIC_SUPER, "super"),
        (
            MAGIC_JOURNAL_HEADER,
            fmt::MAGIC_JOURNAL_HEADER,
            "journal header",
        ),
        (
            MAGIC_DESCRIPTOR,
            fmt::MAGIC_JOURNAL_DESCRIPTOR,
            "descriptor",
        ),
        (MAGIC_COMMIT, fmt::MAGIC_JOURNAL_COMMIT, "commit"),
        (MAGIC_BITMAP, fmt::MAGIC_BITMAP, "bitmap"),
        (MAGIC_BTREE, fmt::MAGIC_BTREE, "btree"),
    ] {
        assert_eq!(u32::from_le_bytes(*bytes), value, "{name}");
    }
    // The u32 values the document lists.
    assert_eq!(fmt::MAGIC_SUPER, 0x4253_5845);
    assert_eq!(fmt::MAGIC_JOURNAL_HEADER, 0x484A_5845);
    assert_eq!(fmt::MAGIC_JOURNAL_DESCRIPTOR, 0x444A_5845);
    assert_eq!(fmt::MAGIC_JOURNAL_COMMIT, 0x434A_5845);
    assert_eq!(fmt::MAGIC_BITMAP, 0x4D42_5845);
    assert_eq!(fmt::MAGIC_BTREE, 0x5442_5845);

    assert_eq!(fmt::BLOCK_SIZE, BS);
    assert_eq!(fmt::FORMAT_VERSION, 1);
    assert_eq!(fmt::BITMAP_BITS_PER_BLOCK, BITMAP_BITS);
    assert_eq!(fmt::BITMAP_DATA_OFFSET, 16);
    assert_eq!(fmt::INODE_SIZE, INODE_SIZE);
    assert_eq!(fmt::INODES_PER_BLOCK as u64, INODES_PER_BLOCK);
    assert_eq!(fmt::INLINE_EXTENTS, INLINE_EXTENTS);
    assert_eq!(fmt::DESCRIPTOR_CAPACITY, DESCRIPTOR_CAPACITY);
    assert_eq!(fmt::BTREE_MAX_VALUE, 1024);
    assert_eq!(fmt::XATTR_MAX_TOTAL, 1020);
    assert_eq!(fmt::NAME_MAX, 255);
    assert_eq!(fmt::SYMLINK_MAX, 4096);
    assert_eq!(fmt::ROOT_INO, 1);
    assert_eq!((fmt::STATE_CLEAN, fmt::STATE_DIRTY), (0, 1));
    assert_eq!(
        (fmt::INODE_FLAG_EXTENT_TREE, fmt::INODE_FLAG_ORPHAN),
        (FLAG_EXTENT_TREE, FLAG_ORPHAN)
    );
    assert_eq!(fmt::EXTENT_FLAG_UNWRITTEN, 1);
    assert_eq!(
        (
            fmt::BTREE_KIND_EXTENTS,
            fmt::BTREE_KIND_DIRECTORY,
            fmt::BTREE_KIND_XATTR
        ),
        (KIND_EXTENTS, KIND_DIRECTORY, KIND_XATTR)
    );
    assert_eq!(
        (
            fmt::FEATURE_COMPAT_KNOWN,
            fmt::FEATURE_RO_COMPAT_KNOWN,
            fmt::FEATURE_INCOMPAT_KNOWN
        ),
        (0, 0, 0)
    );
    assert_eq!(
        [
            fmt::S_IFIFO,
            fmt::S_IFCHR,
            fmt::S_IFDIR,
            fmt::S_IFBLK,
            fmt::S_IFREG,
            fmt::S_IFLNK,
            fmt::S_IFSOCK
        ]
        .map(|m| m >> 12),
        [1, 2, 4, 6, 8, 10, 12]
    );
    assert_eq!(libfs::mkfs::MIN_BLOCKS, 512);
}

/// Asserts field offsets: `offsets!(Type; field => offset, ...)`.
macro_rules! offsets {
    ($ty:ty; $($field:ident => $at:expr),* $(,)?) => {
        $(assert_eq!(
            offset_of!($ty, $field),
            $at,
            concat!(stringify!($ty), ".", stringify!($field))
        );)*
    };
}

#[test]
fn struct_sizes_and_field_offsets_match_the_tables() {
    use fmt::*;
    assert_eq!(size_of::<BlockHeader>(), 16);
    offsets!(BlockHeader; magic => 0, crc => 4, block_nr => 8);

    assert_eq!(size_of::<Superblock>(), sb::SIZE);
    offsets!(Superblock;
        header => 0, format_version => sb::FORMAT_VERSION,
        feature_compat => sb::FEATURE_COMPAT, feature_ro_compat => sb::FEATURE_RO_COMPAT,
        feature_incompat => sb::FEATURE_INCOMPAT, uuid => sb::UUID,
        block_size => sb::BLOCK_SIZE, state => sb::STATE, total_blocks => sb::TOTAL_BLOCKS,
        journal_start => sb::JOURNAL_START, journal_blocks => sb::JOURNAL_BLOCKS,
        bitmap_start => sb::BITMAP_START, bitmap_blocks => sb::BITMAP_BLOCKS,
        inode_bitmap_start => sb::INODE_BITMAP_START,
        inode_bitmap_blocks => sb::INODE_BITMAP_BLOCKS,
        inode_table_start => sb::INODE_TABLE_START,
        inode_table_blocks => sb::INODE_TABLE_BLOCKS, inode_count => sb::INODE_COUNT,
        data_start => sb::DATA_START, orphan_head => sb::ORPHAN_HEAD,
        created_ns => sb::CREATED_NS, mount_count => sb::MOUNT_COUNT, label => sb::LABEL,
        reserved => sb::RESERVED,
    );

    assert_eq!(size_of::<DiskInode>(), INODE_SIZE);
    offsets!(DiskInode;
        mode => ino::MODE, uid => ino::UID, gid => ino::GID, flags => ino::FLAGS,
        nlink => ino::NLINK, crc => ino::CRC, size => ino::SIZE,
        generation => ino::GENERATION, atime_ns => ino::ATIME, mtime_ns => ino::MTIME,
        ctime_ns => ino::CTIME, crtime_ns => ino::CRTIME, blocks => ino::BLOCKS,
        parent => ino::PARENT, xattr_root => ino::XATTR_ROOT,
        next_orphan => ino::NEXT_ORPHAN, tree_root => ino::TREE_ROOT, rdev => ino::RDEV,
        extent_count => ino::EXTENT_COUNT, reserved => ino::RESERVED,
        extents => ino::EXTENTS, reserved2 => ino::RESERVED2,
    );

    assert_eq!(size_of::<DiskExtent>(), 24);
    offsets!(DiskExtent; logical => 0, physical => 8, length => 16, flags => 20);
    assert_eq!(size_of::<JournalHeader>(), 40);
    offsets!(JournalHeader; header => 0, tail_seq => 16, tail_index => 24, journal_blocks => 32);
    assert_eq!(size_of::<JournalDescriptor>(), BS);
    offsets!(JournalDescriptor; header => 0, seq => 16, count => 24, more => 28, targets => 32);
    assert_eq!(size_of::<JournalCommit>(), 32);
    offsets!(JournalCommit; header => 0, seq => 16, total => 24, images_crc => 28);
    assert_eq!(size_of::<BtreeNodeHeader>(), 32);
    offsets!(BtreeNodeHeader;
        header => 0, level => 16, count => 18, value_start => 20, kind => 22, owner => 24);
    assert_eq!(size_of::<BtreeChild>(), 16);
    offsets!(BtreeChild; key => 0, child => 8);
    assert_eq!(size_of::<BtreeSlot>(), 16);
    offsets!(BtreeSlot; key => 0, offset => 8, length => 10, reserved => 12);
    assert_eq!(size_of::<ExtentValue>(), 16);
    offsets!(ExtentValue; physical => 0, length => 8, flags => 12);
    assert_eq!(size_of::<DirEntryHeader>(), 10);
    offsets!(DirEntryHeader; ino => 0, file_type => 8, name_len => 9);
    assert_eq!(size_of::<XattrHeader>(), 4);
    offsets!(XattrHeader; name_len => 0, reserved => 1, value_len => 2);
}

/// Checks everything a fresh image holds, from raw bytes; returns its superblock.
fn check_fresh_image(dev: &dyn BlockDevice, expected: &Super, label: &[u8]) -> Vec<u8> {
    let (raw, s) = read_super(dev);
    assert_eq!(&s, expected, "region layout");

    // Superblock: magic, crc by hand, fixed fields, zero tail.
    assert_eq!(&raw[0..4], b"EXSB");
    assert_eq!(le32(&raw, 0), 0x4253_5845);
    let mut zeroed = raw.clone();
    zeroed[4..8].fill(0);
    assert_eq!(le32(&raw, 4), crc32c(&zeroed));
    assert_eq!(
        le32(&raw, 4),
        crc32c_append(crc32c_append(crc32c(&raw[..4]), &[0; 4]), &raw[8..])
    );
    assert_eq!(le64(&raw, 8), 0);
    assert_eq!(le32(&raw, sb::FORMAT_VERSION), 1);
    assert_eq!(le32(&raw, sb::FEATURE_COMPAT), 0);
    assert_eq!(le32(&raw, sb::FEATURE_RO_COMPAT), 0);
    assert_eq!(le32(&raw, sb::FEATURE_INCOMPAT), 0);
    assert_eq!(le32(&raw, sb::BLOCK_SIZE), 4096);
    assert_eq!(le32(&raw, sb::STATE), 0, "clean after format");
    assert_eq!(le64(&raw, sb::ORPHAN_HEAD), 0);
    assert_eq!(
        le64(&raw, sb::MOUNT_COUNT),
        1,
        "format opens the image once"
    );
    let created = lei64(&raw, sb::CREATED_NS);
    assert!(
        created > 1_600_000_000_000_000_000,
        "created_ns is ns since the epoch"
    );
    let mut want_label = [0u8; 32];
    want_label[..label.len()].copy_from_slice(label);
    assert_eq!(&raw[sb::LABEL..sb::LABEL + 32], &want_label);
    assert!(raw[sb::RESERVED..sb::SIZE].iter().all(|b| *b == 0));
    assert!(
        raw[sb::SIZE..].iter().all(|b| *b == 0),
        "rest of block 0 is zero"
    );

    // Journal header: empty log (tail_index 0).
    let header = read_block(dev, s.journal_start);
    check_header(&header, MAGIC_JOURNAL_HEADER, s.journal_start);
    assert_eq!(le64(&header, 24), 0, "tail_index");
    assert_eq!(le64(&header, 32), s.journal_blocks, "journal_blocks copy");
    assert!(header[40..].iter().all(|b| *b == 0));
    assert!(
        replay_transactions(dev, &s).is_empty(),
        "a cleanly closed image has nothing to replay"
    );

    // Block bitmap: exactly the metadata blocks and the root directory's leaf (the first
    // data block) are allocated; padding bits past total_blocks are zero.
    let mut want: Vec<u64> = (0..s.data_start).collect();
    want.push(s.data_start);
    assert_eq!(bitmap_set_bits(dev, s.bitmap_start, s.bitmap_blocks), want);
    assert!(bitmap_bit(dev, s.bitmap_start, s.data_start - 1));
    assert!(bitmap_bit(dev, s.bitmap_start, s.data_start));
    assert!(!bitmap_bit(dev, s.bitmap_start, s.data_start + 1));
    // Inode bitmap: inode 0 (never used) and the root.
    assert_eq!(
        bitmap_set_bits(dev, s.inode_bitmap_start, s.inode_bitmap_blocks),
        vec![0, 1]
    );

    // Inode table: slot 0 zero, the root in slot 1, the rest of the table zero.
    assert!(inode_raw(dev, &s, 0).iter().all(|b| *b == 0));
    let root = inode_raw(dev, &s, ROOT_INO);
    assert_eq!(le32(&root, ino::CRC), inode_crc(1, &root));
    assert_eq!(
        le32(&root, ino::CRC),
        crc32c_append(crc32c(&1u64.to_le_bytes()), &{
            let mut r = root.clone();
            r[20..24].fill(0);
            r
        })
    );
    assert_eq!(le32(&root, ino::MODE), 0o40755);
    assert_eq!(le32(&root, ino::UID), 0);
    assert_eq!(le32(&root, ino::GID), 0);
    assert_eq!(le32(&root, ino::FLAGS), 0);
    assert_eq!(le32(&root, ino::NLINK), 2);
    assert_eq!(le64(&root, ino::SIZE), 0);
    assert_eq!(le64(&root, ino::GENERATION), 1);
    for field in [ino::ATIME, ino::MTIME, ino::CTIME, ino::CRTIME] {
        assert!(lei64(&root, field) >= created);
    }
    assert_eq!(le64(&root, ino::BLOCKS), 0);
    assert_eq!(le64(&root, ino::PARENT), 1);
    assert_eq!(le64(&root, ino::XATTR_ROOT), 0);
    assert_eq!(le64(&root, ino::NEXT_ORPHAN), 0);
    assert_eq!(le32(&root, ino::RDEV), 0);
    assert_eq!(le32(&root, ino::EXTENT_COUNT), 0);
    assert!(root[ino::RESERVED..].iter().all(|b| *b == 0));
    let table_block = read_block(dev, s.inode_table_start);
    assert!(table_block[2 * INODE_SIZE..].iter().all(|b| *b == 0));
    for block in s.inode_table_start + 1..s.data_start {
        assert!(
            read_block(dev, block).iter().all(|b| *b == 0),
            "inode block {block}"
        );
    }

    // The root directory's tree: an empty leaf at the first data block.
    let leaf_nr = le64(&root, ino::TREE_ROOT);
    assert_eq!(leaf_nr, s.data_start);
    let leaf = read_block(dev, leaf_nr);
    assert_eq!(&leaf[0..4], b"EXBT");
    assert_eq!(le32(&leaf, 4), block_crc(&leaf));
    assert_eq!(le64(&leaf, 8), leaf_nr);
    assert_eq!(
        node_header(&leaf),
        NodeHeader {
            level: 0,
            count: 0,
            value_start: 4096,
            kind: KIND_DIRECTORY,
            owner: 1,
        }
    );
    assert!(leaf[32..].iter().all(|b| *b == 0));
    raw
}

#[test]
fn default_format_of_64_mib() {
    let size = 64 << 20;
    let dev = Arc::new(MemDevice::new(size));
    let geometry = libfs::format(dev.clone(), &FormatOptions::default()).unwrap();
    let expected = expected_layout(size, None, None);
    // The numbers the document's example gives.
    assert_eq!(
        expected,
        Super {
            total_blocks: 16384,
            journal_start: 1,
            journal_blocks: 256,
            bitmap_start: 257,
            bitmap_blocks: 1,
            inode_bitmap_start: 258,
            inode_bitmap_blocks: 1,
            inode_table_start: 259,
            inode_table_blocks: 256,
            inode_count: 4096,
            data_start: 515,
        }
    );
    let raw = check_fresh_image(&*dev, &expected, b"");
    assert_eq!(geometry.data_start, expected.data_start);
    assert_eq!(geometry.inode_count, expected.inode_count);
    // Random version-4 UUID.
    let uuid = &raw[sb::UUID..sb::UUID + 16];
    assert_eq!(uuid[6] >> 4, 4);
    assert_eq!(uuid[8] >> 6, 0b10);
}

#[test]
fn format_with_explicit_options() {
    let size = 48 << 20;
    let uuid: [u8; 16] = *b"0123456789abcdef";
    let options = FormatOptions {
        inodes: Some(1000),
        journal_blocks: Some(100),
        label: "exofs-label".into(),
        uuid: Some(uuid),
    };
    let dev = fresh(size, &options);
    let expected = expected_layout(size, Some(1000), Some(100));
    assert_eq!(expected.inode_count, 1008, "rounded up to a multiple of 16");
    assert_eq!(expected.inode_table_blocks, 63);
    let raw = check_fresh_image(&*dev, &expected, b"exofs-label");
    assert_eq!(&raw[sb::UUID..sb::UUID + 16], &uuid);
}

#[test]
fn sizing_rules_across_sizes() {
    // (device bytes, inodes, journal blocks)
    let cases: [(u64, Option<u64>, Option<u64>); 5] = [
        (2 << 20, None, None),                // the minimum: 512 blocks
        ((3 << 20) + 1000, None, None),       // a partial last block is ignored
        (5 << 20, Some(10), Some(16)),        // inodes raised to 64; smallest journal
        (1 << 30, None, None),                // 9 block-bitmap blocks, 3 inode-bitmap blocks
        (256 << 20, Some(540_000), Some(64)), // metadata bits span two bitmap blocks
    ];
    for (size, inodes, journal) in cases {
        let options = FormatOptions {
            inodes,
            journal_blocks: journal,
            ..FormatOptions::default()
        };
        let dev = fresh(size, &options);
        let expected = expected_layout(size, inodes, journal);
        let (_, s) = read_super(&*dev);
        assert_eq!(s, expected, "{size} bytes");
        if size == 256 << 20 {
            assert!(s.data_start > BITMAP_BITS && s.bitmap_blocks == 3);
            // Bit b lives in bitmap block b / 32640.
            let block1 = read_block(&*dev, s.bitmap_start + 1);
            let local = s.data_start - BITMAP_BITS; // root leaf, set
            assert!(block1[16 + (local / 8) as usize] & (1 << (local % 8)) != 0);
            let local = local + 1; // free
            assert!(block1[16 + (local / 8) as usize] & (1 << (local % 8)) == 0);
            assert!(block1[16..]
                .iter()
                .take((local / 8) as usize)
                .all(|b| *b == 0xff));
        }
        let mut want: Vec<u64> = (0..=s.data_start).collect();
        if size == 1 << 30 {
            assert_eq!((s.bitmap_blocks, s.inode_bitmap_blocks), (9, 3));
        }
        assert_eq!(
            bitmap_set_bits(&*dev, s.bitmap_start, s.bitmap_blocks),
            want
        );
        want.truncate(2);
        assert_eq!(
            bitmap_set_bits(&*dev, s.inode_bitmap_start, s.inode_bitmap_blocks),
            want
        );
    }
    // Too small: refused.
    let dev = Arc::new(MemDevice::new((2 << 20) - 4096));
    assert!(libfs::format(dev, &FormatOptions::default()).is_err());
}

#[test]
fn files_directories_and_xattrs_decoded_by_hand() {
    let dev = fresh(64 << 20, &FormatOptions::default());
    let fs = Fs::open_device(dev.clone(), &OpenOptions::default()).unwrap();
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let hello = fs.create(ROOT_INO, b"hello", 0o644, 1000, 100).unwrap();
    assert_eq!(fs.write_at(hello.ino, 0, &data).unwrap(), data.len());
    fs.setxattr(hello.ino, b"user.color", b"blue", libfs::XattrMode::Any)
        .unwrap();
    let sub = fs.mkdir(ROOT_INO, b"sub", 0o750, 0, 0).unwrap();
    let link = fs.symlink(ROOT_INO, b"link", b"hello", 0, 0).unwrap();
    let frag = fs.create(ROOT_INO, b"frag", 0o600, 0, 0).unwrap();
    for block in [0u64, 2, 4, 6, 8, 10] {
        fs.write_at(frag.ino, block * BS64, &[block as u8 + 1; BS])
            .unwrap();
    }
    let gone = fs.create(ROOT_INO, b"gone", 0o644, 0, 0).unwrap();
    fs.unlink(ROOT_INO, b"gone").unwrap();
    // readdir cursors: an entry's `next` is its key + 3.
    let listed: Vec<(Vec<u8>, u64)> = fs
        .list_dir(ROOT_INO)
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.next))
        .collect();
    fs.close().unwrap();

    let dev: &dyn BlockDevice = &*dev;
    let (_, s) = read_super(dev);
    let block_bits = bitmap_set_bits(dev, s.bitmap_start, s.bitmap_blocks);
    let inode_bits = bitmap_set_bits(dev, s.inode_bitmap_start, s.inode_bitmap_blocks);
    let mut owned_blocks: Vec<u64> = (0..s.data_start).collect();
    let mut nodes = Vec::new();

    // Root directory: 4 entries, sorted by key; key = (fnv >> 18) << 16 | 0.
    let root = inode_raw(dev, &s, ROOT_INO);
    assert_eq!(le32(&root, ino::CRC), inode_crc(ROOT_INO, &root));
    assert_eq!(le64(&root, ino::SIZE), 4, "directory size = entry count");
    assert_eq!(le32(&root, ino::NLINK), 3, "2 + one subdirectory");
    let root_leaf_nr = le64(&root, ino::TREE_ROOT);
    let entries = tree_entries(dev, root_leaf_nr, KIND_DIRECTORY, ROOT_INO, &mut nodes);
    let mut want = vec![
        (name_key(b"hello", 0), hello.ino, 8u8, b"hello".to_vec()),
        (name_key(b"sub", 0), sub.ino, 4, b"sub".to_vec()),
        (name_key(b"link", 0), link.ino, 10, b"link".to_vec()),
        (name_key(b"frag", 0), frag.ino, 8, b"frag".to_vec()),
    ];
    want.sort();
    let got: Vec<_> = entries
        .iter()
        .map(|(key, value)| {
            let (n, file_type, name) = decode_dirent(value);
            (*key, n, file_type, name)
        })
        .collect();
    assert_eq!(got, want);
    let mut want_listed: Vec<_> = want.iter().map(|w| (w.3.clone(), w.0 + 3)).collect();
    want_listed.sort_by_key(|w| w.1);
    assert_eq!(listed, want_listed);

    // The leaf's bytes: slots after the header, values packed down from the block end
    // in slot order.
    let leaf = read_block(dev, root_leaf_nr);
    let h = node_header(&leaf);
    assert_eq!(
        (h.level, h.count, h.kind, h.owner),
        (0, 4, KIND_DIRECTORY, 1)
    );
    let mut cursor = BS;
    for (i, (key, n, file_type, name)) in want.iter().enumerate() {
        let slot = 32 + 16 * i;
        let length = 10 + name.len();
        cursor -= length;
        assert_eq!(le64(&leaf, slot), *key);
        assert_eq!(usize::from(le16(&leaf, slot + 8)), cursor);
        assert_eq!(usize::from(le16(&leaf, slot + 10)), length);
        assert_eq!(le64(&leaf, cursor), *n);
        assert_eq!(leaf[cursor + 8], *file_type);
        assert_eq!(usize::from(leaf[cursor + 9]), name.len());
        assert_eq!(&leaf[cursor + 10..cursor + length], &name[..]);
    }
    assert_eq!(usize::from(h.value_start), cursor);

    // "hello": one inline extent, data blocks zero past the end of the file.
    let raw = inode_raw(dev, &s, hello.ino);
    assert_eq!(le32(&raw, ino::CRC), inode_crc(hello.ino, &raw));
    assert_eq!(le32(&raw, ino::MODE), 0o100644);
    assert_eq!((le32(&raw, ino::UID), le32(&raw, ino::GID)), (1000, 100));
    assert_eq!(le32(&raw, ino::NLINK), 1);
    assert_eq!(le64(&raw, ino::SIZE), 10_000);
    assert_eq!(le64(&raw, ino::PARENT), 0);
    assert_eq!(le32(&raw, ino::FLAGS) & FLAG_EXTENT_TREE, 0);
    assert_eq!(le64(&raw, ino::TREE_ROOT), 0);
    let extents = inline_extents(&raw);
    assert_eq!(extents.len(), 1);
    let (logical, physical, length, flags) = extents[0];
    assert_eq!((logical, length, flags), (0, 3, 0));
    assert_eq!(le64(&raw, ino::BLOCKS), 3, "blocks = data blocks mapped");
    let mut content = vec![0u8; 3 * BS];
    dev.read_at(&mut content, physical * BS64).unwrap();
    assert_eq!(&content[..10_000], &data[..]);
    assert!(content[10_000..].iter().all(|b| *b == 0));
    owned_blocks.extend(physical..physical + 3);

    // Its xattr tree: key = (fnv(full name) >> 18) << 16, value = header, name, value.
    let xattr_root = le64(&raw, ino::XATTR_ROOT);
    let xattrs = tree_entries(dev, xattr_root, KIND_XATTR, hello.ino, &mut nodes);
    assert_eq!(xattrs.len(), 1);
    let (key, value) = &xattrs[0];
    assert_eq!(*key, name_key(b"user.color", 0));
    assert_eq!((value[0], value[1], le16(value, 2)), (10, 0, 4));
    assert_eq!(&value[4..], b"user.colorblue");

    // "sub": an empty directory.
    let raw = inode_raw(dev, &s, sub.ino);
    assert_eq!(le32(&raw, ino::CRC), inode_crc(sub.ino, &raw));
    assert_eq!(le32(&raw, ino::MODE), 0o40750);
    assert_eq!(le32(&raw, ino::NLINK), 2);
    assert_eq!(le64(&raw, ino::PARENT), ROOT_INO);
    assert_eq!(le64(&raw, ino::SIZE), 0);
    assert_eq!(
        le64(&raw, ino::BLOCKS),
        0,
        "directory tree blocks are not counted"
    );
    assert!(tree_entries(
        dev,
        le64(&raw, ino::TREE_ROOT),
        KIND_DIRECTORY,
        sub.ino,
        &mut nodes
    )
    .is_empty());

    // "link": the target is the file's data.
    let raw = inode_raw(dev, &s, link.ino);
    assert_eq!(le32(&raw, ino::MODE), 0o120777);
    assert_eq!(le64(&raw, ino::SIZE), 5);
    let extents = inline_extents(&raw);
    assert_eq!(extents.len(), 1);
    let target = read_block(dev, extents[0].1);
    assert_eq!(&target[..5], b"hello");
    assert!(target[5..].iter().all(|b| *b == 0));
    assert_eq!(le64(&raw, ino::BLOCKS), 1);
    owned_blocks.push(extents[0].1);

    // "frag": six extents, so its map is an extent tree (key = logical block).
    let raw = inode_raw(dev, &s, frag.ino);
    assert_eq!(le32(&raw, ino::CRC), inode_crc(frag.ino, &raw));
    assert_eq!(le32(&raw, ino::FLAGS), FLAG_EXTENT_TREE);
    assert_eq!(le32(&raw, ino::EXTENT_COUNT), 6);
    assert!(raw[ino::EXTENTS..ino::RESERVED2].iter().all(|b| *b == 0));
    assert_eq!(le64(&raw, ino::SIZE), 11 * BS64);
    assert_eq!(
        le64(&raw, ino::BLOCKS),
        6,
        "the extent tree's node is not counted"
    );
    let tree = tree_entries(
        dev,
        le64(&raw, ino::TREE_ROOT),
        KIND_EXTENTS,
        frag.ino,
        &mut nodes,
    );
    assert_eq!(
        tree.iter().map(|e| e.0).collect::<Vec<_>>(),
        [0, 2, 4, 6, 8, 10]
    );
    for (logical, value) in &tree {
        assert_eq!(value.len(), 16);
        let (physical, length, flags) = (le64(value, 0), le32(value, 8), le32(value, 12));
        assert_eq!((length, flags), (1, 0));
        assert_eq!(read_block(dev, physical), vec![*logical as u8 + 1; BS]);
        owned_blocks.push(physical);
    }

    // "gone": a free slot keeps only its generation (and a valid crc).
    let raw = inode_raw(dev, &s, gone.ino);
    assert_eq!(le32(&raw, ino::MODE), 0);
    assert!(le64(&raw, ino::GENERATION) > 1);
    assert_eq!(le32(&raw, ino::CRC), inode_crc(gone.ino, &raw));
    let mut rest = raw.clone();
    rest[ino::GENERATION..ino::GENERATION + 8].fill(0);
    rest[ino::CRC..ino::CRC + 4].fill(0);
    assert!(rest.iter().all(|b| *b == 0));

    // Bitmaps: exactly the owned blocks and the live inodes.
    owned_blocks.extend(&nodes);
    owned_blocks.sort_unstable();
    assert_eq!(block_bits, owned_blocks);
    let mut live = vec![0, ROOT_INO, hello.ino, sub.ino, link.ino, frag.ino];
    live.sort_unstable();
    assert_eq!(inode_bits, live);
    assert!(!inode_bits.contains(&gone.ino));
}

#[test]
fn journal_transactions_decoded_and_replayed_by_hand() {
    let dev = fresh(64 << 20, &FormatOptions::default());
    let fs = Fs::open_device(dev.clone(), &OpenOptions::default()).unwrap();
    let file = fs.create(ROOT_INO, b"j", 0o644, 0, 0).unwrap();
    fs.write_at(file.ino, 0, b"journal").unwrap();
    fs.sync().unwrap();
    // What a crash would leave: the log holds the open's and the sync's transactions.
    let crashed = dev.snapshot();
    fs.close().unwrap();

    let image = MemDevice::from_bytes(crashed.clone());
    let (_, s) = read_super(&image);
    let transactions = replay_transactions(&image, &s);
    assert!(!transactions.is_empty());
    assert_eq!(transactions[0].index, 0);
    let header = read_block(&image, s.journal_start);
    assert_eq!(transactions[0].seq, le64(&header, 16));
    assert_eq!(
        replayed_by_libfs(crashed.clone()),
        transactions.len() as u64
    );

    // Replayed in order, the last image of each target is what the home block holds
    // (a MemDevice makes home writes at once).
    let mut last = std::collections::BTreeMap::new();
    for t in &transactions {
        for (home, image) in &t.images {
            last.insert(*home, image.clone());
        }
    }
    for (home, logged) in &last {
        assert_eq!(&read_block(&image, *home), logged, "home {home}");
    }
    // The superblock went through the log with state dirty and the mount counted.
    let sb_image = &last[&0];
    check_header(sb_image, MAGIC_SUPER, 0);
    assert_eq!(le32(sb_image, sb::STATE), 1);
    assert_eq!(le64(sb_image, sb::MOUNT_COUNT), 2);
    let inode_block = s.inode_table_start + file.ino / INODES_PER_BLOCK;
    assert!(last.contains_key(&inode_block));

    // A torn image in the last transaction: replay stops before it.
    let last_t = transactions.last().unwrap();
    let at = last_t.index + 1; // the first image of the last transaction
    let mut torn = crashed.clone();
    torn[((s.journal_start + 1 + at) * BS64) as usize + 100] ^= 0x40;
    let (n, libfs_n) = {
        let d = MemDevice::from_bytes(torn.clone());
        (replay_transactions(&d, &s).len(), replayed_by_libfs(torn))
    };
    assert_eq!(
        (n, libfs_n as usize),
        (transactions.len() - 1, transactions.len() - 1)
    );

    // A descriptor of another sequence (resealed, so only the seq is wrong): replay stops.
    let d = MemDevice::from_bytes(crashed);
    let mut first = read_block(&d, s.journal_start + 1);
    first[16] ^= 1;
    let crc = block_crc(&first);
    first[4..8].copy_from_slice(&crc.to_le_bytes());
    write_block(&d, s.journal_start + 1, &first);
    assert!(replay_transactions(&d, &s).is_empty());
    assert_eq!(replayed_by_libfs(d.snapshot()), 0);

    // After a clean close the header points past every transaction.
    let closed: &dyn BlockDevice = &*dev;
    let (_, s) = read_super(closed);
    assert!(replay_transactions(closed, &s).is_empty());
    let header = read_block(closed, s.journal_start);
    let old = read_block(closed, s.journal_start + 1);
    check_header(&old, MAGIC_DESCRIPTOR, s.journal_start + 1);
    assert!(
        le64(&old, 16) < le64(&header, 16),
        "stale log blocks have older sequences"
    );
}

#[test]
fn orphan_list_on_disk() {
    let dev = fresh(16 << 20, &FormatOptions::default());
    let fs = Fs::open_device(dev.clone(), &OpenOptions::default()).unwrap();
    let file = fs.create(ROOT_INO, b"open", 0o644, 0, 0).unwrap();
    fs.write_at(file.ino, 0, &[7; 3 * BS]).unwrap();
    fs.retain(file.ino).unwrap();
    fs.unlink(ROOT_INO, b"open").unwrap();
    fs.sync().unwrap();
    let crashed = dev.snapshot();
    fs.release(file.ino).unwrap();
    fs.close().unwrap();

    // The crash image after replay (homes are already written on a MemDevice).
    let image = Arc::new(MemDevice::from_bytes(crashed));
    let (raw, s) = read_super(&*image);
    assert_eq!(le64(&raw, sb::ORPHAN_HEAD), file.ino);
    assert_eq!(le32(&raw, sb::STATE), 1, "not cleanly closed");
    let inode = inode_raw(&*image, &s, file.ino);
    assert_eq!(le32(&inode, ino::NLINK), 0);
    assert_eq!(le32(&inode, ino::FLAGS) & FLAG_ORPHAN, FLAG_ORPHAN);
    assert_eq!(le64(&inode, ino::NEXT_ORPHAN), 0, "end of the list");
    let (_, physical, length, _) = inline_extents(&inode)[0];
    assert!(bitmap_bit(&*image, s.bitmap_start, physical));

    // The next read-write open frees it.
    let fs = Fs::open_device(image.clone(), &OpenOptions::default()).unwrap();
    fs.close().unwrap();
    let (raw, s) = read_super(&*image);
    assert_eq!(le64(&raw, sb::ORPHAN_HEAD), 0);
    assert_eq!(le32(&raw, sb::STATE), 0);
    assert_eq!(le32(&inode_raw(&*image, &s, file.ino), ino::MODE), 0);
    assert!(!bitmap_bit(&*image, s.inode_bitmap_start, file.ino));
    for block in physical..physical + u64::from(length) {
        assert!(!bitmap_bit(&*image, s.bitmap_start, block));
    }
}

/// Rewrites a superblock field and reseals the block by the documented crc rule.
fn patch_super(bytes: &[u8], at: usize, value: u32) -> Arc<MemDevice> {
    let dev = Arc::new(MemDevice::from_bytes(bytes.to_vec()));
    let mut block = read_block(&*dev, 0);
    block[at..at + 4].copy_from_slice(&value.to_le_bytes());
    let crc = block_crc(&block);
    block[4..8].copy_from_slice(&crc.to_le_bytes());
    write_block(&*dev, 0, &block);
    dev
}

#[test]
fn feature_flags_and_version_policy() {
    let base = fresh(16 << 20, &FormatOptions::default()).snapshot();
    let open = |dev: Arc<MemDevice>, read_only: bool| {
        let options = if read_only {
            OpenOptions::read_only()
        } else {
            OpenOptions::default()
        };
        Fs::open_device(dev, &options).map(|fs| fs.close().unwrap())
    };
    let unsupported = |r: Result<(), Error>| matches!(r, Err(Error::Unsupported(_)));

    // Resealing an unchanged superblock changes nothing.
    assert!(open(patch_super(&base, sb::FEATURE_COMPAT, 0), false).is_ok());
    // Unknown compat bits are ignored.
    assert!(open(patch_super(&base, sb::FEATURE_COMPAT, 1 << 31), false).is_ok());
    // Unknown ro_compat bits: read-only only.
    assert!(open(patch_super(&base, sb::FEATURE_RO_COMPAT, 1), true).is_ok());
    assert!(unsupported(open(
        patch_super(&base, sb::FEATURE_RO_COMPAT, 1),
        false
    )));
    // Unknown incompat bits: refused.
    assert!(unsupported(open(
        patch_super(&base, sb::FEATURE_INCOMPAT, 1),
        true
    )));
    assert!(unsupported(open(
        patch_super(&base, sb::FEATURE_INCOMPAT, 1),
        false
    )));
    // Another format version: refused.
    assert!(unsupported(open(
        patch_super(&base, sb::FORMAT_VERSION, 2),
        true
    )));
    // A wrong crc: corrupt.
    let dev = Arc::new(MemDevice::from_bytes(base.clone()));
    let mut block = read_block(&*dev, 0);
    block[sb::LABEL] = b'x';
    write_block(&*dev, 0, &block);
    assert!(matches!(
        open(dev, true),
        Err(Error::Corrupt { block: 0, .. })
    ));
    // A block size other than 4096: corrupt.
    assert!(matches!(
        open(patch_super(&base, sb::BLOCK_SIZE, 8192), true),
        Err(Error::Corrupt { block: 0, .. })
    ));
}
