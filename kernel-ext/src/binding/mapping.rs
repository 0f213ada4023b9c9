//! The device mapping chains read through: a read-only shared mapping of the whole
//! device, MADV_RANDOM so that a fault never reads around a miss, and the ways user space
//! brings missing blocks into it (see `binding.rs` and DESIGN "Batches").

use super::{BindingError, Result};
use libfs::Fs;

/// A read-only shared mapping of a whole device: what the driver copies blocks from.
#[derive(Debug)]
pub struct DeviceMapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and only its address is shared (handed to the kernel).
unsafe impl Send for DeviceMapping {}
// SAFETY: as above.
unsafe impl Sync for DeviceMapping {}

impl DeviceMapping {
    /// Maps the device of `fs` read-only and shared: what the driver copies blocks from.
    /// Marked MADV_RANDOM: a page fault in it reads the missing block alone, never the
    /// read-around window (read_ahead_kb, 8 MiB on this machine's disk), which out of core
    /// read 800 times the blocks a lookup needed and evicted the rest of the index.
    pub fn map(fs: &Fs) -> Result<Self> {
        let mapping = Self::map_with(fs, libc::MAP_SHARED)?;
        mapping
            .advise(libc::MADV_RANDOM)
            .map_err(|err| BindingError::Invalid(format!("madvise(MADV_RANDOM): {err}")))?;
        Ok(mapping)
    }

    /// Gives the kernel `advice` (MADV_*) for the whole mapping.
    pub fn advise(&self, advice: libc::c_int) -> std::io::Result<()> {
        // SAFETY: advice on exactly this live mapping; it changes no memory.
        if unsafe { libc::madvise(self.addr, self.len, advice) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Maps the device of `fs` read-only and private (a user-space walk over the device).
    pub fn map_private(fs: &Fs) -> Result<Self> {
        Self::map_with(fs, libc::MAP_PRIVATE)
    }

    fn map_with(fs: &Fs, flags: libc::c_int) -> Result<Self> {
        let fd = fs
            .device()
            .raw_fd()
            .ok_or_else(|| BindingError::Invalid("the device has no file descriptor".into()))?;
        Self::map_fd(fd, fs.device().size() as usize, flags)
            .map_err(|err| BindingError::Invalid(format!("cannot map the device: {err}")))
    }

    /// Maps a whole open file read-only and shared (the same walk over a file on a
    /// mount, for instance).
    pub fn map_file(file: &std::fs::File) -> std::io::Result<Self> {
        let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
        Self::map_fd(std::os::fd::AsRawFd::as_raw_fd(file), len, libc::MAP_SHARED)
    }

    fn map_fd(fd: std::os::fd::RawFd, len: usize, flags: libc::c_int) -> std::io::Result<Self> {
        // SAFETY: a fresh read-only mapping of a descriptor the caller keeps open; the
        // kernel picks the address; it is only read, and unmapped once.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, flags, fd, 0) };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { addr, len })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is readable, `len` bytes long and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.addr.cast::<u8>(), self.len) }
    }

    /// The mapping's address and length.
    pub fn range(&self) -> (u64, u64) {
        (self.addr as u64, self.len as u64)
    }

    /// Brings the blocks at device offsets `blocks` into memory and into this mapping's
    /// page tables, reading them concurrently: readahead is started for every block
    /// first (posix_fadvise WILLNEED returns at once), then each is mapped in
    /// (MADV_POPULATE_READ waits for its own read only). Only the missing blocks are
    /// read: out of core, the 128 KiB windows read before read 18 times what a lookup
    /// needed.
    pub fn bring_in(&self, fs: &Fs, blocks: &[u64]) -> Result<()> {
        const BLOCK: u64 = libfs::BLOCK_SIZE as u64;
        let Some(fd) = fs.device().raw_fd() else {
            return Ok(());
        };
        let mut starts: Vec<u64> = blocks.iter().map(|o| o / BLOCK * BLOCK).collect();
        starts.sort_unstable();
        starts.dedup();
        let length = |start: u64| BLOCK.min((self.len as u64).saturating_sub(start));
        for start in &starts {
            // SAFETY: advice on a descriptor the Fs keeps open; no memory is passed.
            unsafe {
                libc::posix_fadvise(
                    fd,
                    *start as i64,
                    length(*start) as i64,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
        }
        for start in &starts {
            self.map_in(*start)?;
        }
        Ok(())
    }

    /// Maps the block at device offset `start` into this mapping's page tables, reading
    /// it first if it is not in memory (MADV_POPULATE_READ), so that the driver's copy
    /// that does not fault finds it.
    pub fn map_in(&self, start: u64) -> Result<()> {
        let block = libfs::BLOCK_SIZE as u64;
        if start >= self.len as u64 {
            return Err(BindingError::Invalid(format!(
                "device byte {start} is past the mapping ({} bytes)",
                self.len
            )));
        }
        let length = block.min(self.len as u64 - start) as usize;
        // SAFETY: the range lies inside this mapping (checked above); populating only
        // reads the file into the mapping's page tables.
        let ret = unsafe {
            libc::madvise(
                self.addr.cast::<u8>().add(start as usize).cast(),
                length,
                libc::MADV_POPULATE_READ,
            )
        };
        if ret != 0 {
            return Err(BindingError::Invalid(format!(
                "cannot read the device at byte {start}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

impl Drop for DeviceMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
