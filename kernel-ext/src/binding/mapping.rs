//! The device mapping chains read through: a read-only shared mapping of the whole
//! device, MADV_RANDOM so that a fault never reads around a miss, and the ways user space
//! brings missing blocks into the page cache (see `binding.rs` and DESIGN "How a chain's
//! misses are served").

use super::{BindingError, Result};
use libfs::Fs;

/// A read-only shared mapping of a whole device: what the driver copies blocks from.
#[derive(Debug)]
pub struct DeviceMapping {
    addr: *mut libc::c_void,
    len: usize,
    /// The device opened again, POSIX_FADV_RANDOM: the descriptor misses are read
    /// through. The advice belongs to this open file alone; on the device's own
    /// descriptor a 4 KiB read next to cached blocks was taken for a sequential stream
    /// and read ahead (6.6 KiB per miss out of core, against 4.0 here).
    fetch: Option<std::fs::File>,
    /// Replaced by inaccessible memory (see [`DeviceMapping::retire`]): never unmapped.
    retired: std::sync::atomic::AtomicBool,
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
        let mut mapping = Self::map_with(fs, libc::MAP_SHARED)?;
        mapping
            .advise(libc::MADV_RANDOM)
            .map_err(|err| BindingError::Invalid(format!("madvise(MADV_RANDOM): {err}")))?;
        let fd = fs
            .device()
            .raw_fd()
            .ok_or_else(|| BindingError::Invalid("the device has no file descriptor".into()))?;
        let fetch = std::fs::File::open(format!("/proc/self/fd/{fd}"))
            .map_err(|err| BindingError::Invalid(format!("cannot open the device again: {err}")))?;
        // SAFETY: advice on a descriptor this function owns; no memory is passed.
        let ret = unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&fetch),
                0,
                0,
                libc::POSIX_FADV_RANDOM,
            )
        };
        if ret != 0 {
            return Err(BindingError::Invalid(format!(
                "posix_fadvise(POSIX_FADV_RANDOM): {}",
                std::io::Error::from_raw_os_error(ret)
            )));
        }
        mapping.fetch = Some(fetch);
        Ok(mapping)
    }

    /// The descriptor misses are read through (see `fetch`): None for a mapping that
    /// chains do not read.
    pub fn fetch_fd(&self) -> Option<std::os::fd::RawFd> {
        self.fetch.as_ref().map(std::os::fd::AsRawFd::as_raw_fd)
    }

    /// Reads the block at device offset `start` into the page cache (one 4 KiB buffered
    /// read, no read-ahead), for a chain that missed it to go on. Only its first byte is
    /// copied out: the read of the page is the same, and the copy of a page fresh from
    /// the disk (not in the CPU's caches) was 5% of an out-of-core chain's time.
    pub fn fetch(&self, start: u64) -> Result<()> {
        let block = libfs::BLOCK_SIZE as u64;
        let start = start / block * block;
        let file = self
            .fetch
            .as_ref()
            .ok_or_else(|| BindingError::Invalid("this mapping reads nothing in".into()))?;
        let mut buffer = [0u8; 1];
        std::os::unix::fs::FileExt::read_at(file, &mut buffer, start).map_err(|err| {
            BindingError::Invalid(format!("cannot read the device at byte {start}: {err}"))
        })?;
        Ok(())
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
        Ok(Self {
            addr,
            len,
            fetch: None,
            retired: std::sync::atomic::AtomicBool::new(false),
        })
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

    /// Starts reading the blocks at device offsets `blocks` into the page cache, each
    /// alone (posix_fadvise WILLNEED on the POSIX_FADV_RANDOM descriptor returns once the
    /// reads are issued): a batch's misses go to the disk together, and each lookup then
    /// waits for its own block only.
    pub fn read_ahead(&self, blocks: &[u64]) {
        const BLOCK: u64 = libfs::BLOCK_SIZE as u64;
        let Some(fd) = self.fetch_fd() else {
            return;
        };
        for offset in blocks {
            let start = offset / BLOCK * BLOCK;
            if start >= self.len as u64 {
                continue;
            }
            // SAFETY: advice on a descriptor this mapping owns; no memory is passed. A
            // failure only means the lookup waits for its block inside the kernel.
            unsafe {
                libc::posix_fadvise(fd, start as i64, BLOCK as i64, libc::POSIX_FADV_WILLNEED)
            };
        }
    }
}

impl DeviceMapping {
    /// Replaces the mapping, in place, by inaccessible anonymous memory that stays
    /// reserved until the process exits: a reader still copying from it (a direct hop
    /// that started before the daemon unregistered) faults instead of finding whatever
    /// this process would map at these addresses next.
    pub fn retire(&self) -> Result<()> {
        if self.retired.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        // SAFETY: MAP_FIXED over exactly this mapping's range, which this value owns;
        // nothing in this process reads it (only the kernel does, through the driver).
        let addr = unsafe {
            libc::mmap(
                self.addr,
                self.len,
                libc::PROT_NONE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(BindingError::Invalid(format!(
                "retiring the device mapping: {}",
                std::io::Error::last_os_error()
            )));
        }
        self.retired
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

impl Drop for DeviceMapping {
    fn drop(&mut self) {
        if self.retired.load(std::sync::atomic::Ordering::Acquire) {
            // Reserved for good (see `retire`): at most the device's size of address
            // space, no memory.
            return;
        }
        // SAFETY: unmaps exactly the mapping made in `map`, once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
