//! On-disk format v1: every structure that reaches the device, byte by byte.
//!
//! Layer: bottom (no I/O here). Everything is little-endian; no `usize` on disk; sizes are
//! asserted at compile time. docs/FORMAT.md is the normative description and
//! `tests/format_layout.rs` checks a fresh image against it.
//!
//! Every metadata block except inode-table blocks starts with a [`BlockHeader`]
//! (magic, crc32c, its own block number) so that a misdirected or torn write is caught.
//! Inode-table blocks hold 16 inodes that each carry their own crc32c.

use crate::error::{Error, Result};
use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of every block, in bytes.
pub const BLOCK_SIZE: usize = 4096;
/// Same, as u64 for offset arithmetic.
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;
/// Version of this format (independent from the crate version).
pub const FORMAT_VERSION: u32 = 1;

/// A block's bytes.
pub type Block = [u8; BLOCK_SIZE];

/// Magic numbers of metadata blocks ("EXSB", "EXJH", ... read as ASCII in a hex dump).
pub const MAGIC_SUPER: u32 = u32::from_le_bytes(*b"EXSB");
pub const MAGIC_JOURNAL_HEADER: u32 = u32::from_le_bytes(*b"EXJH");
pub const MAGIC_JOURNAL_DESCRIPTOR: u32 = u32::from_le_bytes(*b"EXJD");
pub const MAGIC_JOURNAL_COMMIT: u32 = u32::from_le_bytes(*b"EXJC");
pub const MAGIC_BITMAP: u32 = u32::from_le_bytes(*b"EXBM");
pub const MAGIC_BTREE: u32 = u32::from_le_bytes(*b"EXBT");

// Feature flags. An image with an unknown incompat bit is refused; an unknown ro_compat
// bit allows read-only opens only; unknown compat bits are ignored.
/// Known compat features (none yet).
pub const FEATURE_COMPAT_KNOWN: u32 = 0;
/// Known ro_compat features (none yet).
pub const FEATURE_RO_COMPAT_KNOWN: u32 = 0;
/// Known incompat features (none yet).
pub const FEATURE_INCOMPAT_KNOWN: u32 = 0;

/// Superblock `state`: cleanly closed.
pub const STATE_CLEAN: u32 = 0;
/// Superblock `state`: open read-write (or crashed while open).
pub const STATE_DIRTY: u32 = 1;

/// The root directory's inode number. Inode 0 is never used (it means "none").
pub const ROOT_INO: u64 = 1;

/// Longest name of a directory entry, in bytes.
pub const NAME_MAX: usize = 255;
/// Longest symlink target, in bytes (one block).
pub const SYMLINK_MAX: usize = BLOCK_SIZE;

/// Header that starts every metadata block except inode-table blocks (16 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BlockHeader {
    /// Block type magic (`MAGIC_*`).
    pub magic: U32,
    /// crc32c of the whole block with this field read as zero.
    pub crc: U32,
    /// The block's own number: catches misdirected writes.
    pub block_nr: U64,
}
const _: () = assert!(size_of::<BlockHeader>() == 16);

/// Offset of the crc field inside a block header.
const CRC_OFFSET: usize = 4;

/// crc32c of a block with its crc field read as zero.
pub fn block_crc(block: &Block) -> u32 {
    let crc = crc32c::crc32c(&block[..CRC_OFFSET]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &block[CRC_OFFSET + 4..])
}

/// Stamps a metadata block's header: magic, its number, and the crc over all of it.
pub fn seal_block(block: &mut Block, magic: u32, block_nr: u64) {
    block[0..4].copy_from_slice(&magic.to_le_bytes());
    block[8..16].copy_from_slice(&block_nr.to_le_bytes());
    let crc = block_crc(block);
    block[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Checks a metadata block's header; `what` names the expected block type in errors.
pub fn verify_block(block: &Block, magic: u32, block_nr: u64, what: &str) -> Result<()> {
    let found_magic = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    if found_magic != magic {
        return Err(Error::corrupt(
            block_nr,
            format!("{what}: bad magic {found_magic:#010x}, expected {magic:#010x}"),
        ));
    }
    let stored = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
    let computed = block_crc(block);
    if stored != computed {
        return Err(Error::corrupt(
            block_nr,
            format!("{what}: bad checksum {stored:#010x}, computed {computed:#010x}"),
        ));
    }
    let found_nr = u64::from_le_bytes(block[8..16].try_into().unwrap_or([0; 8]));
    if found_nr != block_nr {
        return Err(Error::corrupt(
            block_nr,
            format!("{what}: block claims to be block {found_nr}"),
        ));
    }
    Ok(())
}

/// Block 0. Describes the geometry of the image.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Superblock {
    /// magic = MAGIC_SUPER, block_nr = 0.
    pub header: BlockHeader,
    /// FORMAT_VERSION.
    pub format_version: U32,
    /// Features an old implementation may ignore.
    pub feature_compat: U32,
    /// Features an old implementation may read but not write.
    pub feature_ro_compat: U32,
    /// Features an old implementation must refuse.
    pub feature_incompat: U32,
    /// Identifies the file system (names its bpffs directory, among others).
    pub uuid: [u8; 16],
    /// BLOCK_SIZE.
    pub block_size: U32,
    /// STATE_CLEAN or STATE_DIRTY.
    pub state: U32,
    /// Blocks in the image, including this one.
    pub total_blocks: U64,
    /// First block of the journal (its header block).
    pub journal_start: U64,
    /// Blocks in the journal, header included.
    pub journal_blocks: U64,
    /// First block of the block-allocation bitmap.
    pub bitmap_start: U64,
    /// Blocks of the block-allocation bitmap.
    pub bitmap_blocks: U64,
    /// First block of the inode-allocation bitmap.
    pub inode_bitmap_start: U64,
    /// Blocks of the inode-allocation bitmap.
    pub inode_bitmap_blocks: U64,
    /// First block of the inode table.
    pub inode_table_start: U64,
    /// Blocks of the inode table.
    pub inode_table_blocks: U64,
    /// Inode slots, slot 0 included: inode numbers 1..inode_count-1 are usable (0 means none).
    pub inode_count: U64,
    /// First block available to files and trees.
    pub data_start: U64,
    /// Head of the orphan list: inodes with no links still to be freed (0 = empty).
    pub orphan_head: U64,
    /// When the image was made, ns since the Unix epoch.
    pub created_ns: I64,
    /// Times the image was opened read-write.
    pub mount_count: U64,
    /// Volume label, NUL-padded.
    pub label: [u8; 32],
    /// Zero.
    pub reserved: [u8; 56],
}
const _: () = assert!(size_of::<Superblock>() == 256);

/// Inode `mode` file-type bits (as in POSIX `st_mode`).
pub const S_IFMT: u32 = 0o170000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFIFO: u32 = 0o010000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFSOCK: u32 = 0o140000;

/// Inode `flags`: the extent map lives in a B+tree rooted at `tree_root` (else inline).
pub const INODE_FLAG_EXTENT_TREE: u32 = 1;
/// Inode `flags`: the inode is on the orphan list.
pub const INODE_FLAG_ORPHAN: u32 = 2;

/// Inline extents an inode holds before it moves its map to a B+tree.
pub const INLINE_EXTENTS: usize = 5;
/// Size of an inode in the inode table.
pub const INODE_SIZE: usize = 256;
/// Inodes per inode-table block.
pub const INODES_PER_BLOCK: usize = BLOCK_SIZE / INODE_SIZE;

/// One extent: `length` blocks of the file from `logical` on live at `physical` on.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DiskExtent {
    /// First file block (file offset / BLOCK_SIZE).
    pub logical: U64,
    /// First device block.
    pub physical: U64,
    /// Number of blocks; 0 marks an unused inline slot.
    pub length: U32,
    /// EXTENT_FLAG_*.
    pub flags: U32,
}
const _: () = assert!(size_of::<DiskExtent>() == 24);

/// Extent flag: allocated but never written; reads as zeros (fallocate).
pub const EXTENT_FLAG_UNWRITTEN: u32 = 1;

/// An inode as stored in the inode table (256 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DiskInode {
    /// File type and permission bits (POSIX st_mode); 0 means the slot is free.
    pub mode: U32,
    /// Owner.
    pub uid: U32,
    /// Group.
    pub gid: U32,
    /// INODE_FLAG_*.
    pub flags: U32,
    /// Number of directory entries naming this inode (a directory counts "." and its
    /// subdirectories' "..").
    pub nlink: U32,
    /// crc32c of these 256 bytes with this field read as zero, seeded with the inode number.
    pub crc: U32,
    /// Size in bytes.
    pub size: U64,
    /// Changes whenever blocks of the file may be freed or moved, and when the inode
    /// number is reused; never goes back.
    pub generation: U64,
    /// Last access, ns since the Unix epoch.
    pub atime_ns: I64,
    /// Last data change.
    pub mtime_ns: I64,
    /// Last inode change.
    pub ctime_ns: I64,
    /// Creation.
    pub crtime_ns: I64,
    /// Data blocks mapped by the file's extents (extent-tree, directory and xattr tree
    /// blocks are not counted).
    pub blocks: U64,
    /// Directories: inode number of the parent. Others: 0.
    pub parent: U64,
    /// Root block of the extended-attribute B+tree, or 0.
    pub xattr_root: U64,
    /// Next inode on the orphan list, or 0.
    pub next_orphan: U64,
    /// Directories: root block of the entry B+tree. Files with INODE_FLAG_EXTENT_TREE:
    /// root block of the extent B+tree. Otherwise 0.
    pub tree_root: U64,
    /// Device number for character and block special files.
    pub rdev: U32,
    /// Number of extents (inline ones, or in the tree).
    pub extent_count: U32,
    /// Zero.
    pub reserved: [u8; 8],
    /// Inline extents, sorted by `logical`, unused slots zero (used without the tree flag).
    pub extents: [DiskExtent; INLINE_EXTENTS],
    /// Zero.
    pub reserved2: [u8; 8],
}
const _: () = assert!(size_of::<DiskInode>() == INODE_SIZE);

impl DiskInode {
    /// crc32c of the inode with its crc field read as zero, seeded with its number.
    pub fn compute_crc(&self, ino: u64) -> u32 {
        let mut copy = *self;
        copy.crc = U32::new(0);
        crc32c::crc32c_append(crc32c::crc32c(&ino.to_le_bytes()), copy.as_bytes())
    }

    /// A zeroed (free) inode.
    pub fn zeroed() -> Self {
        Self::read_from_bytes(&[0u8; INODE_SIZE]).unwrap_or_else(|_| unreachable!())
    }
}

/// Bits one bitmap block holds (after its header).
pub const BITMAP_BITS_PER_BLOCK: u64 = ((BLOCK_SIZE - size_of::<BlockHeader>()) * 8) as u64;
/// Byte offset of the bits in a bitmap block.
pub const BITMAP_DATA_OFFSET: usize = size_of::<BlockHeader>();

/// First block of the journal region: where replay starts.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct JournalHeader {
    /// magic = MAGIC_JOURNAL_HEADER.
    pub header: BlockHeader,
    /// Sequence number of the first transaction to replay.
    pub tail_seq: U64,
    /// Index (0-based, within the journal region after this header) where that
    /// transaction's first descriptor lies.
    pub tail_index: U64,
    /// Blocks of the journal region, header included (a copy of the superblock's, so the
    /// log can be found when block 0 is torn).
    pub journal_blocks: U64,
}
const _: () = assert!(size_of::<JournalHeader>() == 40);

/// Where mkfs always puts the journal header, so recovery can find it without block 0.
pub const JOURNAL_START: u64 = 1;

/// Block numbers one descriptor block lists.
pub const DESCRIPTOR_CAPACITY: usize = (BLOCK_SIZE - 32) / 8;

/// Starts a transaction, or continues it: lists where the `count` block images that
/// follow it belong.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct JournalDescriptor {
    /// magic = MAGIC_JOURNAL_DESCRIPTOR; block_nr = the journal block it lies in.
    pub header: BlockHeader,
    /// Transaction sequence number.
    pub seq: U64,
    /// Block images following this descriptor (1..=DESCRIPTOR_CAPACITY).
    pub count: U32,
    /// 1 if another descriptor of the same transaction follows the images, else 0
    /// (a commit block follows).
    pub more: U32,
    /// Home block numbers of the images, in order.
    pub targets: [U64; DESCRIPTOR_CAPACITY],
}
const _: () = assert!(size_of::<JournalDescriptor>() == BLOCK_SIZE);

/// Ends a transaction. It is valid only if `images_crc` matches its images.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct JournalCommit {
    /// magic = MAGIC_JOURNAL_COMMIT; block_nr = the journal block it lies in.
    pub header: BlockHeader,
    /// Transaction sequence number.
    pub seq: U64,
    /// Total images in the transaction.
    pub total: U32,
    /// crc32c over every descriptor and image of the transaction, in journal order.
    pub images_crc: U32,
}
const _: () = assert!(size_of::<JournalCommit>() == 32);

/// Header of a B+tree node (32 bytes), followed by entries.
///
/// Internal nodes: `count` entries of ([`BtreeChild`]) sorted by key; child i holds keys
/// from key i up to (not including) key i + 1, and the first key is a lower bound for the
/// whole node. Leaves: `count` slots of [`BtreeSlot`] sorted by key right after the
/// header, and the values they point to packed at the end of the block, growing downwards.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BtreeNodeHeader {
    /// magic = MAGIC_BTREE.
    pub header: BlockHeader,
    /// 0 for a leaf; a node at level n has children at level n - 1.
    pub level: U16,
    /// Entries in the node.
    pub count: U16,
    /// Leaves: lowest byte offset used by values (BLOCK_SIZE when empty).
    pub value_start: U16,
    /// BTREE_KIND_*.
    pub kind: U16,
    /// Inode that owns the tree (for fsck).
    pub owner: U64,
}
const _: () = assert!(size_of::<BtreeNodeHeader>() == 32);

/// B+tree kinds.
pub const BTREE_KIND_EXTENTS: u16 = 1;
pub const BTREE_KIND_DIRECTORY: u16 = 2;
pub const BTREE_KIND_XATTR: u16 = 3;

/// An internal node's entry.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BtreeChild {
    pub key: U64,
    pub child: U64,
}
const _: () = assert!(size_of::<BtreeChild>() == 16);

/// A leaf's slot.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BtreeSlot {
    pub key: U64,
    /// Byte offset of the value in the block.
    pub offset: U16,
    /// Value length in bytes.
    pub length: U16,
    /// Zero.
    pub reserved: U32,
}
const _: () = assert!(size_of::<BtreeSlot>() == 16);

/// Largest value a B+tree leaf stores (so any full leaf splits into two that fit).
pub const BTREE_MAX_VALUE: usize = 1024;

/// Value of an extent-tree entry (key = logical block).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ExtentValue {
    pub physical: U64,
    pub length: U32,
    pub flags: U32,
}
const _: () = assert!(size_of::<ExtentValue>() == 16);

/// Header of a directory-entry value (key = name hash, see `dir`), followed by the name.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DirEntryHeader {
    /// Inode the entry names.
    pub ino: U64,
    /// File type (the S_IFMT bits of the inode's mode, shifted right by 12).
    pub file_type: u8,
    /// Name length in bytes (1..=255).
    pub name_len: u8,
}
const _: () = assert!(size_of::<DirEntryHeader>() == 10);

/// Header of an xattr value (key = name hash), followed by the name then the value.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct XattrHeader {
    /// Name length in bytes (full name, with its namespace prefix).
    pub name_len: u8,
    /// Zero.
    pub reserved: u8,
    /// Value length in bytes.
    pub value_len: U16,
}
const _: () = assert!(size_of::<XattrHeader>() == 4);

/// Largest xattr name + value that fits one B+tree value.
pub const XATTR_MAX_TOTAL: usize = BTREE_MAX_VALUE - size_of::<XattrHeader>();

/// Reads a structure from the start of a byte slice, or names what was wrong.
pub fn read_struct<T: FromBytes + KnownLayout + Immutable + Copy>(
    bytes: &[u8],
    block: u64,
    what: &str,
) -> Result<T> {
    T::read_from_prefix(bytes)
        .map(|(value, _)| value)
        .map_err(|_| Error::corrupt(block, format!("{what}: truncated")))
}

/// Writes a structure at the start of a byte slice.
pub fn write_struct<T: IntoBytes + Immutable>(bytes: &mut [u8], value: &T) {
    let raw = value.as_bytes();
    bytes[..raw.len()].copy_from_slice(raw);
}
