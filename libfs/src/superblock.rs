//! Superblock: validation, finding the journal (also when block 0 is torn), and
//! journaled updates of the mutable fields (orphan list head, state, mount count).

use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::*;
use crate::fs::Inner;
use crate::journal::Journal;

/// Where the journal is: from the superblock, or, when block 0 fails its checks (a torn
/// home write whose good image is still in the log), from the journal header that mkfs
/// always puts at block JOURNAL_START.
pub(crate) fn locate_journal(
    device: &dyn BlockDevice,
    read_only: bool,
) -> Result<(u64, u64, Option<String>)> {
    let mut raw = [0u8; BLOCK_SIZE];
    device.read_at(&mut raw, 0)?;
    match check_superblock(&raw, device.size(), read_only) {
        Ok(sb) => Ok((sb.journal_start.get(), sb.journal_blocks.get(), None)),
        Err(e @ Error::Corrupt { .. }) => {
            let device_blocks = device.size() / BLOCK_SIZE_U64;
            match Journal::recorded_size(device, JOURNAL_START) {
                Ok(blocks)
                    if blocks >= crate::mkfs::MIN_JOURNAL_BLOCKS
                        && JOURNAL_START + blocks < device_blocks =>
                {
                    log::warn!("{e}; looking for a good copy in the journal");
                    Ok((
                        JOURNAL_START,
                        blocks,
                        Some(format!("{e}; a good copy came from the journal")),
                    ))
                }
                _ => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Validates a superblock read from `raw` against the device size.
pub(crate) fn check_superblock(
    raw: &[u8; BLOCK_SIZE],
    device_size: u64,
    read_only: bool,
) -> Result<Superblock> {
    verify_block(raw, MAGIC_SUPER, 0, "superblock")?;
    let sb: Superblock = read_struct(raw, 0, "superblock")?;
    let version = sb.format_version.get();
    if version != FORMAT_VERSION {
        return Err(Error::Unsupported(format!(
            "format version {version}, this build reads {FORMAT_VERSION}"
        )));
    }
    let unknown = sb.feature_incompat.get() & !FEATURE_INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(Error::Unsupported(format!(
            "unknown incompatible features {unknown:#x}"
        )));
    }
    let unknown = sb.feature_ro_compat.get() & !FEATURE_RO_COMPAT_KNOWN;
    if unknown != 0 && !read_only {
        return Err(Error::Unsupported(format!(
            "unknown read-only-compatible features {unknown:#x}: open read-only"
        )));
    }
    if sb.block_size.get() != BLOCK_SIZE as u32 {
        return Err(Error::corrupt(
            0,
            format!("superblock: block size {}", sb.block_size.get()),
        ));
    }
    let total = sb.total_blocks.get();
    if total
        .checked_mul(BLOCK_SIZE_U64)
        .is_none_or(|bytes| bytes > device_size)
    {
        return Err(Error::corrupt(
            0,
            format!("superblock: {total} blocks do not fit a device of {device_size} bytes"),
        ));
    }
    // Regions must follow one another in order and end before the data area.
    let regions = [
        ("journal", sb.journal_start.get(), sb.journal_blocks.get()),
        (
            "block bitmap",
            sb.bitmap_start.get(),
            sb.bitmap_blocks.get(),
        ),
        (
            "inode bitmap",
            sb.inode_bitmap_start.get(),
            sb.inode_bitmap_blocks.get(),
        ),
        (
            "inode table",
            sb.inode_table_start.get(),
            sb.inode_table_blocks.get(),
        ),
    ];
    let mut next = 1;
    for (name, start, len) in regions {
        if start != next || len == 0 || start.checked_add(len).is_none() {
            return Err(Error::corrupt(
                0,
                format!("superblock: {name} region at {start}+{len} is misplaced"),
            ));
        }
        next = start + len;
    }
    if sb.data_start.get() != next || next >= total {
        return Err(Error::corrupt(
            0,
            format!("superblock: data area starts at {}", sb.data_start.get()),
        ));
    }
    if sb.journal_blocks.get() < crate::mkfs::MIN_JOURNAL_BLOCKS {
        return Err(Error::corrupt(
            0,
            format!(
                "superblock: journal of {} blocks is too small",
                sb.journal_blocks.get()
            ),
        ));
    }
    let inodes = sb.inode_count.get();
    if sb.orphan_head.get() >= inodes {
        return Err(Error::corrupt(
            0,
            format!(
                "superblock: orphan list head {} is not an inode",
                sb.orphan_head.get()
            ),
        ));
    }
    if sb.bitmap_blocks.get() != total.div_ceil(BITMAP_BITS_PER_BLOCK)
        || sb.inode_bitmap_blocks.get() != inodes.div_ceil(BITMAP_BITS_PER_BLOCK)
        || sb.inode_table_blocks.get() != inodes.div_ceil(INODES_PER_BLOCK as u64)
        || inodes < 2
    {
        return Err(Error::corrupt(
            0,
            "superblock: region sizes disagree with block and inode counts",
        ));
    }
    Ok(sb)
}

impl Inner {
    pub(crate) fn superblock(&mut self) -> Result<Superblock> {
        let raw = self.meta.journal.read(0)?;
        verify_block(&raw, MAGIC_SUPER, 0, "superblock")?;
        read_struct(&raw[..], 0, "superblock")
    }

    pub(crate) fn update_superblock(&mut self, change: impl FnOnce(&mut Superblock)) -> Result<()> {
        let mut sb = self.superblock()?;
        change(&mut sb);
        let mut block = *self.meta.journal.read(0)?;
        write_struct(&mut block, &sb);
        seal_block(&mut block, MAGIC_SUPER, 0);
        self.meta.journal.write(0, block)
    }
}
