//! The registered-file maps: `files` (one entry per registered file) and `extents`
//! (the file's extent map, cut into chunks of the file's logical address space).
//!
//! A chunk covers file blocks `[chunk << chunk_shift, (chunk + 1) << chunk_shift)` and
//! lists, sorted by `logical`, every extent that overlaps that range (an extent crossing
//! a chunk boundary appears in each chunk it touches). The binding picks, per file, the
//! largest `chunk_shift` for which no chunk holds more than [`EXTENTS_PER_CHUNK`]
//! extents, so the driver translates an offset with one map lookup and a bounded binary
//! search, whatever the file's size or fragmentation.

/// Extents one chunk holds.
pub const EXTENTS_PER_CHUNK: usize = 32;
/// Name of the `files` map (HashMap<FileKey, FileInfo>).
pub const MAP_FILES: &str = "EXOFS_FILES";
/// Name of the `extents` map (HashMap<ExtentKey, ExtentChunk>).
pub const MAP_EXTENTS: &str = "EXOFS_EXTENTS";

/// Key of the `files` map.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    /// libfs inode number.
    pub ino: u64,
}

/// Value of the `files` map.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// The file's generation: bumped (before any of its blocks can be reused) whenever
    /// blocks may be freed or moved. A chain re-checks it after each copy.
    pub generation: u64,
    /// File size in bytes: offsets at or past it are refused.
    pub size: u64,
    /// log2 of the blocks one chunk covers.
    pub chunk_shift: u32,
    /// Zero.
    pub flags: u32,
}

/// Key of the `extents` map.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExtentKey {
    pub ino: u64,
    /// Chunk index: file block >> chunk_shift.
    pub chunk: u64,
}

/// One extent: `length` blocks from file block `logical` live at device block `physical`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExtentEntry {
    pub logical: u64,
    pub physical: u64,
    pub length: u32,
    /// EXTENT_UNWRITTEN: allocated, never written; a chain refuses to read it.
    pub flags: u32,
}

/// `ExtentEntry::flags`: the blocks read as zeros (fallocated, never written).
pub const EXTENT_UNWRITTEN: u32 = 1;

/// Value of the `extents` map.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentChunk {
    /// Entries in use, sorted by `logical`.
    pub count: u32,
    pub reserved: u32,
    pub extents: [ExtentEntry; EXTENTS_PER_CHUNK],
}

impl Default for ExtentChunk {
    fn default() -> Self {
        Self {
            count: 0,
            reserved: 0,
            extents: [ExtentEntry::default(); EXTENTS_PER_CHUNK],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] structs of integers with no padding holes that matter for
    // map keys (every key field is a u64).
    unsafe impl aya::Pod for super::FileKey {}
    // SAFETY: as above, #[repr(C)] integers only.
    unsafe impl aya::Pod for super::FileInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExtentKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExtentChunk {}
}

const _: () = assert!(size_of::<FileKey>() == 8);
const _: () = assert!(size_of::<FileInfo>() == 24);
const _: () = assert!(size_of::<ExtentKey>() == 16);
const _: () = assert!(size_of::<ExtentEntry>() == 24);
const _: () = assert!(size_of::<ExtentChunk>() == 8 + 24 * EXTENTS_PER_CHUNK);
