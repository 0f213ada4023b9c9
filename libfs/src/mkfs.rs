//! Making a file system: the layout of a fresh image (see docs/FORMAT.md).
//!
//! `format` writes the superblock, an empty journal, both bitmaps (with the fixed
//! metadata regions allocated) and a zeroed inode table, then opens the result through
//! the ordinary path to create the root directory.

use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::*;
use crate::fs::{Fs, OpenOptions};
use crate::journal::Journal;
use std::sync::Arc;
use zerocopy::little_endian::{I64, U32, U64};
use zerocopy::FromZeros;

/// Smallest image: 2 MiB.
pub const MIN_BLOCKS: u64 = 512;
/// Smallest journal, header included.
pub const MIN_JOURNAL_BLOCKS: u64 = 16;
/// Longest volume label in bytes.
pub const LABEL_MAX: usize = 32;

/// Choices for [`format()`]; `None` picks a default from the size.
#[derive(Debug, Clone, Default)]
pub struct FormatOptions {
    /// Inodes (default: one per 16 KiB).
    pub inodes: Option<u64>,
    /// Journal blocks (default: 1/64 of the image, 64..=16384).
    pub journal_blocks: Option<u64>,
    pub label: String,
    /// Default: random.
    pub uuid: Option<[u8; 16]>,
}

/// Where the regions of an image lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub total_blocks: u64,
    pub journal_start: u64,
    pub journal_blocks: u64,
    pub bitmap_start: u64,
    pub bitmap_blocks: u64,
    pub inode_bitmap_start: u64,
    pub inode_bitmap_blocks: u64,
    pub inode_table_start: u64,
    pub inode_table_blocks: u64,
    pub inode_count: u64,
    pub data_start: u64,
}

impl Geometry {
    /// Lays out an image of `total_blocks`.
    pub fn new(total_blocks: u64, options: &FormatOptions) -> Result<Self> {
        if total_blocks < MIN_BLOCKS {
            return Err(Error::Invalid(format!(
                "image of {} KiB is too small: at least {} KiB",
                total_blocks * 4,
                MIN_BLOCKS * 4
            )));
        }
        let journal_blocks = options
            .journal_blocks
            .unwrap_or((total_blocks / 64).clamp(64, 16384));
        if journal_blocks < MIN_JOURNAL_BLOCKS {
            return Err(Error::Invalid(format!(
                "journal of {journal_blocks} blocks: at least {MIN_JOURNAL_BLOCKS}"
            )));
        }
        if options.label.len() > LABEL_MAX {
            return Err(Error::Invalid(format!(
                "label longer than {LABEL_MAX} bytes"
            )));
        }
        let inode_count = options
            .inodes
            .unwrap_or(total_blocks / 4)
            .max(64)
            .next_multiple_of(INODES_PER_BLOCK as u64);
        let journal_start = 1;
        let bitmap_start = journal_start + journal_blocks;
        let bitmap_blocks = total_blocks.div_ceil(BITMAP_BITS_PER_BLOCK);
        let inode_bitmap_start = bitmap_start + bitmap_blocks;
        let inode_bitmap_blocks = inode_count.div_ceil(BITMAP_BITS_PER_BLOCK);
        let inode_table_start = inode_bitmap_start + inode_bitmap_blocks;
        let inode_table_blocks = inode_count / INODES_PER_BLOCK as u64;
        let data_start = inode_table_start + inode_table_blocks;
        if data_start + 16 > total_blocks {
            return Err(Error::Invalid(format!(
                "metadata ({data_start} blocks) leaves no room for data in {total_blocks} blocks"
            )));
        }
        Ok(Self {
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
            data_start,
        })
    }
}

fn random_uuid() -> [u8; 16] {
    let mut uuid = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into a 16-byte buffer we own.
    let got = unsafe { libc::getrandom(uuid.as_mut_ptr().cast(), uuid.len(), 0) };
    if got != 16 {
        let nanos = crate::fs::now_ns().to_le_bytes();
        uuid[..8].copy_from_slice(&nanos);
        uuid[8..].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4
    uuid[8] = (uuid[8] & 0x3f) | 0x80; // variant 1
    uuid
}

/// Writes a bitmap region with bits [0, set_below) set.
fn write_bitmap(device: &dyn BlockDevice, start: u64, blocks: u64, set_below: u64) -> Result<()> {
    for index in 0..blocks {
        let mut block = [0u8; BLOCK_SIZE];
        let first = index * BITMAP_BITS_PER_BLOCK;
        for bit in first..set_below.min(first + BITMAP_BITS_PER_BLOCK) {
            let local = bit - first;
            block[BITMAP_DATA_OFFSET + (local / 8) as usize] |= 1 << (local % 8);
        }
        seal_block(&mut block, MAGIC_BITMAP, start + index);
        device.write_at(&block, (start + index) * BLOCK_SIZE_U64)?;
    }
    Ok(())
}

/// Makes a file system on `device` (all of it) and returns its geometry.
pub fn format(device: Arc<dyn BlockDevice>, options: &FormatOptions) -> Result<Geometry> {
    let geometry = Geometry::new(device.size() / BLOCK_SIZE_U64, options)?;
    let g = &geometry;
    let zeros = vec![0u8; 256 * BLOCK_SIZE];
    let mut block = g.inode_table_start;
    while block < g.data_start {
        let count = (g.data_start - block).min(256);
        device.write_at(
            &zeros[..(count as usize) * BLOCK_SIZE],
            block * BLOCK_SIZE_U64,
        )?;
        block += count;
    }
    write_bitmap(&*device, g.bitmap_start, g.bitmap_blocks, g.data_start)?;
    write_bitmap(&*device, g.inode_bitmap_start, g.inode_bitmap_blocks, 1)?;
    let uuid = options.uuid.unwrap_or_else(random_uuid);
    let first_seq = u64::from_le_bytes(random_uuid()[..8].try_into().unwrap_or([1; 8])) >> 1;
    Journal::format(&*device, g.journal_start, g.journal_blocks, first_seq)?;

    let mut sb = Superblock::new_zeroed();
    sb.format_version = U32::new(FORMAT_VERSION);
    sb.uuid = uuid;
    sb.block_size = U32::new(BLOCK_SIZE as u32);
    sb.state = U32::new(STATE_CLEAN);
    sb.total_blocks = U64::new(g.total_blocks);
    sb.journal_start = U64::new(g.journal_start);
    sb.journal_blocks = U64::new(g.journal_blocks);
    sb.bitmap_start = U64::new(g.bitmap_start);
    sb.bitmap_blocks = U64::new(g.bitmap_blocks);
    sb.inode_bitmap_start = U64::new(g.inode_bitmap_start);
    sb.inode_bitmap_blocks = U64::new(g.inode_bitmap_blocks);
    sb.inode_table_start = U64::new(g.inode_table_start);
    sb.inode_table_blocks = U64::new(g.inode_table_blocks);
    sb.inode_count = U64::new(g.inode_count);
    sb.data_start = U64::new(g.data_start);
    sb.created_ns = I64::new(crate::fs::now_ns());
    let label = options.label.as_bytes();
    sb.label[..label.len()].copy_from_slice(label);
    let mut raw = [0u8; BLOCK_SIZE];
    write_struct(&mut raw, &sb);
    seal_block(&mut raw, MAGIC_SUPER, 0);
    device.write_at(&raw, 0)?;
    device.sync()?;

    let fs = Fs::open_device(device, &OpenOptions::default())?;
    fs.make_root()?;
    fs.close()?;
    Ok(geometry)
}
