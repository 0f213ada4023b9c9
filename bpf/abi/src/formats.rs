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
