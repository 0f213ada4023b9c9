//! On-disk layouts of the example application functions (bpf/examples): what their
//! `next` reads, what their scratch holds, and what user-space builders and reference
//! walks write and read. Every integer is little-endian. `include/exofs_examples.h` has
//! the same layouts for C.
//!
//! The examples share one scratch layout ([`Lookup`]): the key in, `found` and `value`
//! out; and every lookup starts at byte 0 of the file.

/// Scratch of every example: `key` in; `found` (0 or 1) and `value` out.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lookup {
    pub key: u64,
    pub found: u64,
    pub value: u64,
}

impl Lookup {
    /// Bytes of a lookup in a scratch.
    pub const SIZE: usize = 24;

    /// The scratch bytes asking for `key` (little-endian, as the examples read them).
    pub fn ask(key: u64) -> [u8; Self::SIZE] {
        let mut bytes = [0u8; Self::SIZE];
        bytes[..8].copy_from_slice(&key.to_le_bytes());
        bytes
    }

    /// The lookup a scratch holds (its first SIZE bytes; missing bytes read as zero).
    pub fn from_scratch(scratch: &[u8]) -> Self {
        let word = |index: usize| {
            let mut bytes = [0u8; 8];
            if let Some(source) = scratch.get(index * 8..index * 8 + 8) {
                bytes.copy_from_slice(source);
            }
            u64::from_le_bytes(bytes)
        };
        Self {
            key: word(0),
            found: word(1),
            value: word(2),
        }
    }

    /// Whether the lookup found its key.
    pub fn is_found(&self) -> bool {
        self.found == 1
    }
}

/// B-tree nodes: a 16-byte header, then `count` entries of (key u64, value u64) sorted by
/// key. In a leaf (level 0) the value is the key's value; in an inner node it is the byte
/// offset, in the same file, of the child whose smallest key is `key`. A node is 512 or
/// 4096 bytes and starts at a multiple of its size, so it never crosses a block. The root
/// is at byte 0, where a lookup starts; a hop may read more than the node (up to the end
/// of its block), never less.
pub mod btree {
    /// `BtreeHeader::magic`.
    pub const MAGIC: u32 = 0x4254_5845; // "EXTB"
    /// Bytes of the node header.
    pub const HEADER_SIZE: usize = 16;
    /// Bytes of one entry.
    pub const ENTRY_SIZE: usize = 16;
    /// Node sizes the examples support.
    pub const NODE_SIZES: [usize; 2] = [512, 4096];

    /// Entries a node of `node_size` bytes holds at most.
    pub const fn capacity(node_size: usize) -> usize {
        (node_size - HEADER_SIZE) / ENTRY_SIZE
    }

    /// The node header.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct BtreeHeader {
        pub magic: u32,
        /// 0 for a leaf; a node's children are one level lower.
        pub level: u16,
        /// Entries in use.
        pub count: u16,
        /// Bytes of this node (512 or 4096).
        pub node_size: u32,
        pub reserved: u32,
    }

    const _: () = assert!(core::mem::size_of::<BtreeHeader>() == HEADER_SIZE);
}

/// Hash chains: a header at byte 0 ([`hash::Header`]), a bucket array of u64 entry
/// offsets (0 = empty bucket) from byte [`hash::BUCKETS_OFFSET`], then entries of
/// [`hash::Entry`] (each inside one block). A lookup starts at byte 0: hop 0 reads the
/// header and hashes the key to its bucket, hop 1 reads the bucket's slot, each later hop
/// one entry.
pub mod hash {
    /// `Header::magic`.
    pub const MAGIC: u64 = 0x4853_4148_5846_5845; // "EXFXHASH"
    /// Byte offset of bucket 0 in the file.
    pub const BUCKETS_OFFSET: u64 = 4096;
    /// End of a chain, in [`Entry::next`] or an empty bucket.
    pub const END: u64 = 0;

    /// The file's header, at byte 0.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Header {
        pub magic: u64,
        /// Buckets (at least 1).
        pub buckets: u64,
    }

    /// One entry of a chain.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Entry {
        /// Byte offset of the next entry of the chain, or [`END`].
        pub next: u64,
        pub key: u64,
        pub value: u64,
    }

    /// The bucket of `key` among `buckets` (FNV-1a over the key's 8 little-endian bytes).
    pub const fn bucket_of(key: u64, buckets: u64) -> u64 {
        let bytes = key.to_le_bytes();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut i = 0;
        while i < 8 {
            hash ^= bytes[i] as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            i += 1;
        }
        hash % buckets
    }

    /// Byte offset of the slot of bucket `bucket`.
    pub const fn slot_offset(bucket: u64) -> u64 {
        BUCKETS_OFFSET + bucket * 8
    }
}

/// Linked lists: nodes of [`list::Node`] (each inside one block); the head node is at
/// byte 0, where a lookup starts.
pub mod list {
    /// End of the list, in [`Node::next`].
    pub const END: u64 = u64::MAX;

    /// One node.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Node {
        /// Byte offset of the next node, or [`END`].
        pub next: u64,
        pub key: u64,
        pub value: u64,
    }
}

const _: () = assert!(core::mem::size_of::<Lookup>() == 24);
const _: () = assert!(core::mem::size_of::<hash::Entry>() == 24);
const _: () = assert!(core::mem::size_of::<list::Node>() == 24);

/// SQLite rowid lookups (the `sqlite_rowid` example): a chain walks a table B-tree of an
/// SQLite database file, from the table's root page down to the leaf that holds the rowid,
/// then along the record's overflow pages if the column's bytes are there, and returns one
/// column of the row. The file format is SQLite's own (sqlite.org/fileformat2.html); page
/// `n` starts at byte `(n - 1) * page_size`, so a lookup starts at the root page's offset.
///
/// The scratch is a [`Lookup`](self::Lookup) of this module: the caller fills rowid,
/// column (its index in the record), page size and usable size (from the database header,
/// which the caller reads: the page size is 512..=4096, the usable size at least 480); the
/// chain fills kind, length and the value. A batch (32 bytes of scratch per lookup)
/// returns integers, reals, NULLs and lengths, but no text or blob bytes.
///
/// While it skips along overflow pages, a walk also keeps the pages it visited (to catch
/// a cycle) in the bytes. A batched lookup resumed after a miss gets only its first 32
/// bytes back: it then walks again from its leaf. Each resumption on a new overflow page
/// costs the pages before it again, so a batch that misses on every page reaches the hop
/// limit (64) for a column about 8 overflow pages into its record; a single chain keeps
/// its whole scratch and reaches 49 overflow pages.
pub mod sqlite {
    /// Scratch offset of the text or blob bytes.
    pub const BYTES_OFFSET: usize = 32;
    /// Text or blob bytes a single chain returns at most (`length` is the true length).
    pub const MAX_BYTES: usize = 200;
    /// Bytes of the database header at the start of page 1.
    pub const HEADER_SIZE: usize = 100;
    /// The largest page size served: a page must fit in one block.
    pub const MAX_PAGE_SIZE: usize = 4096;
    /// The smallest usable size SQLite allows.
    pub const MIN_USABLE: usize = 480;

    /// B-tree page types (the first byte of a page's B-tree header).
    pub const PAGE_INTERIOR_INDEX: u8 = 0x02;
    pub const PAGE_INTERIOR_TABLE: u8 = 0x05;
    pub const PAGE_LEAF_INDEX: u8 = 0x0a;
    pub const PAGE_LEAF_TABLE: u8 = 0x0d;

    /// `kind`: what the lookup found.
    pub mod kind {
        /// No row with that rowid.
        pub const NOT_FOUND: u8 = 0;
        pub const NULL: u8 = 1;
        /// `value` is the integer (i64).
        pub const INTEGER: u8 = 2;
        /// `value` holds the f64's bits.
        pub const REAL: u8 = 3;
        /// `length` bytes of text, the first `MAX_BYTES` of them at `BYTES_OFFSET`.
        pub const TEXT: u8 = 4;
        pub const BLOB: u8 = 5;
        /// The record has fewer columns than asked for: the column was added by ALTER
        /// TABLE after the row was written, and its default applies.
        pub const ABSENT: u8 = 6;
    }

    /// `phase`: where a walk is (internal; 0 when a lookup starts), and one flag the
    /// caller may set.
    pub mod phase {
        /// Descending the table B-tree.
        pub const DESCEND: u8 = 0;
        /// On overflow pages, skipping `progress` more bytes before the value.
        pub const SKIP: u8 = 1;
        /// On overflow pages, `progress` bytes of the value gathered so far.
        pub const GATHER: u8 = 2;
        /// In (a flag, kept): return a text's or blob's kind and length, not its bytes,
        /// and so walk no overflow page for them. What a batch sets: its lookups have 32
        /// bytes of scratch, no room for the bytes.
        pub const LENGTH_ONLY: u8 = 0x80;
    }

    /// The scratch of a `sqlite_rowid` lookup (little-endian).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Lookup {
        /// In: the rowid sought.
        pub rowid: i64,
        /// In: the column's index in the record (the declared order, less the VIRTUAL
        /// generated columns before it: exofs_client::sqlite::Table::stored).
        pub column: u16,
        /// In: the database's page size (512..=4096).
        pub page_size: u16,
        /// In: the usable size (page size minus the header's reserved bytes).
        pub usable: u16,
        /// A [`phase`] value (0 when a lookup starts), with the caller's
        /// [`phase::LENGTH_ONLY`] flag.
        pub phase: u8,
        /// Out: a [`kind`] value.
        pub kind: u8,
        /// Out: the value's length in bytes (text and blob: the whole length).
        pub length: u32,
        /// Internal: bytes still to skip, or gathered, on overflow pages.
        pub progress: u32,
        /// Out: the integer, or the real's bits.
        pub value: u64,
        /// Out: the first bytes of a text or blob (single chains only).
        pub bytes: [u8; MAX_BYTES],
    }

    const _: () = assert!(core::mem::size_of::<Lookup>() == BYTES_OFFSET + MAX_BYTES);
    const _: () = assert!(core::mem::offset_of!(Lookup, bytes) == BYTES_OFFSET);
    const _: () = assert!(core::mem::size_of::<Lookup>() <= crate::chain::SCRATCH_SIZE);

    impl Lookup {
        /// Asks for `column` of the row `rowid`, in a database of this page and usable
        /// size.
        pub fn ask(rowid: i64, column: u16, page_size: u16, usable: u16) -> Self {
            Self {
                rowid,
                column,
                page_size,
                usable,
                phase: phase::DESCEND,
                kind: kind::NOT_FOUND,
                length: 0,
                progress: 0,
                value: 0,
                bytes: [0; MAX_BYTES],
            }
        }

        /// The same lookup, asking for lengths only ([`phase::LENGTH_ONLY`]).
        pub fn length_only(mut self) -> Self {
            self.phase |= phase::LENGTH_ONLY;
            self
        }

        /// The scratch bytes of this lookup.
        pub fn to_bytes(&self) -> [u8; core::mem::size_of::<Lookup>()] {
            let mut out = [0u8; core::mem::size_of::<Lookup>()];
            out[0..8].copy_from_slice(&self.rowid.to_le_bytes());
            out[8..10].copy_from_slice(&self.column.to_le_bytes());
            out[10..12].copy_from_slice(&self.page_size.to_le_bytes());
            out[12..14].copy_from_slice(&self.usable.to_le_bytes());
            out[14] = self.phase;
            out[15] = self.kind;
            out[16..20].copy_from_slice(&self.length.to_le_bytes());
            out[20..24].copy_from_slice(&self.progress.to_le_bytes());
            out[24..32].copy_from_slice(&self.value.to_le_bytes());
            out[BYTES_OFFSET..].copy_from_slice(&self.bytes);
            out
        }

        /// The lookup a scratch holds (missing bytes read as zero).
        pub fn from_scratch(scratch: &[u8]) -> Self {
            let mut all = [0u8; core::mem::size_of::<Lookup>()];
            let n = scratch.len().min(all.len());
            all[..n].copy_from_slice(&scratch[..n]);
            let u16_at = |at: usize| u16::from_le_bytes([all[at], all[at + 1]]);
            let u32_at =
                |at: usize| u32::from_le_bytes([all[at], all[at + 1], all[at + 2], all[at + 3]]);
            let mut value = [0u8; 8];
            value.copy_from_slice(&all[24..32]);
            let mut rowid = [0u8; 8];
            rowid.copy_from_slice(&all[0..8]);
            let mut bytes = [0u8; MAX_BYTES];
            bytes.copy_from_slice(&all[BYTES_OFFSET..]);
            Self {
                rowid: i64::from_le_bytes(rowid),
                column: u16_at(8),
                page_size: u16_at(10),
                usable: u16_at(12),
                phase: all[14],
                kind: all[15],
                length: u32_at(16),
                progress: u32_at(20),
                value: u64::from_le_bytes(value),
                bytes,
            }
        }

        /// The text or blob bytes returned (at most MAX_BYTES).
        pub fn returned_bytes(&self) -> &[u8] {
            &self.bytes[..(self.length as usize).min(MAX_BYTES)]
        }
    }
}
