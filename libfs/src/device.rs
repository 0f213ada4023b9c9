//! Device layer: an image file or a block device, addressed by byte offset.
//!
//! Interface: [`BlockDevice`] (positional read/write, `sync` = fdatasync, size).
//! Implementations: [`FileDevice`] (image file or block device, with an advisory lock so
//! that a second read-write open fails) and [`MemDevice`] (memory, for tests).
//! Nothing above this layer touches a file descriptor.
//!
//! Large aligned writes (file data, in practice) bypass the host's page cache and are
//! written behind: see [`FileDevice`] and the `direct` module.

use crate::direct::DirectWriter;
pub use crate::direct::{AlignedBuffer, DIRECT_ALIGN, DIRECT_MIN};
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Positional I/O on a device. Writes are durable only after `sync` returns.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// The file descriptor, for devices backed by one (the kernel binding maps it).
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// Waits until every completed write is in the file behind [`Self::raw_fd`], so that
    /// reads past this interface (a mapping of the descriptor) see it. Reports a write
    /// that failed after it returned.
    fn settle(&self) -> io::Result<()> {
        Ok(())
    }
}

/// An image file or a block device.
///
/// Writes of [`DIRECT_MIN`] bytes or more at aligned offsets are written behind, with
/// O_DIRECT (the `direct` module says why and what still holds). Smaller writes
/// (metadata, the journal, random 4 KiB data) stay buffered. Where O_DIRECT is refused
/// (tmpfs), every write is buffered.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    /// The write-behind queue, when writable and O_DIRECT is available.
    direct: Option<DirectWriter>,
    size: u64,
    path: PathBuf,
}

impl FileDevice {
    /// Opens `path`. A writable open takes an exclusive advisory lock and a read-only
    /// one a shared lock, so a second read-write open (or a read-only open while a
    /// writer has it) fails with [`Error::Busy`] instead of corrupting the image.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| io_context(e, format!("cannot open {}", path.display())))?;
        let lock = if writable {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a valid descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::Busy(format!(
                    "{} is already open read-write (by exofs mount, fsck or an application)",
                    path.display()
                )));
            }
            return Err(io_context(err, format!("cannot lock {}", path.display())));
        }
        let size = device_size(&file)
            .map_err(|e| io_context(e, format!("cannot size {}", path.display())))?;
        let direct = if writable {
            Self::direct_writer(&file, path)?
        } else {
            None
        };
        Ok(Self {
            file,
            direct,
            size,
            path: path.to_path_buf(),
        })
    }

    /// The write-behind queue for `path`, or None where O_DIRECT is refused.
    fn direct_writer(file: &File, path: &Path) -> Result<Option<DirectWriter>> {
        let Ok(direct) = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        else {
            return Ok(None);
        };
        let context = |e| io_context(e, format!("cannot start writing {}", path.display()));
        let buffered = file.try_clone().map_err(context)?;
        let writer = DirectWriter::start(direct, buffered, path.display().to_string());
        Ok(Some(writer.map_err(context)?))
    }

    /// Creates (or opens) an image file and sets its size; block devices keep theirs.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_context(e, format!("cannot create {}", path.display())))?;
        let meta = file.metadata()?;
        if meta.file_type().is_file() {
            file.set_len(size)
                .map_err(|e| io_context(e, format!("cannot resize {}", path.display())))?;
        }
        drop(file);
        Self::open(path, true)
    }

    /// Path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when large aligned writes bypass the host page cache.
    pub fn writes_direct(&self) -> bool {
        self.direct.is_some()
    }
}

fn io_context(e: io::Error, what: String) -> Error {
    Error::Io(io::Error::new(e.kind(), format!("{what}: {e}")))
}

fn device_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut f = file;
        f.seek(SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}

impl BlockDevice for FileDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = &self.direct {
            direct.wait_for(offset, buf.len() as u64);
        }
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = &self.direct {
            if DirectWriter::accepts(buf, offset) {
                return direct.write(buf, offset);
            }
            direct.check()?;
            direct.wait_for(offset, buf.len() as u64);
        }
        self.file.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.settle()?;
        // fdatasync on the buffered descriptor covers the direct one: the same file.
        self.file.sync_data()
    }
    fn settle(&self) -> io::Result<()> {
        self.direct.as_ref().map_or(Ok(()), DirectWriter::settle)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}

/// A device in memory. Every write is immediately "durable".
#[derive(Debug)]
pub struct MemDevice {
    bytes: Mutex<Vec<u8>>,
}

impl MemDevice {
    /// A zeroed device of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self::from_bytes(vec![0; size as usize])
    }
    /// A device holding these bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: Mutex::new(bytes),
        }
    }
    /// A copy of the contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub(crate) fn check_range(offset: u64, len: usize, size: u64) -> io::Result<usize> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(offset as usize),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("access of {len} bytes at {offset} is past the device end ({size})"),
        )),
    }
}

impl BlockDevice for MemDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.lock();
        let start = check_range(offset, buf.len(), bytes.len() as u64)?;
        buf.copy_from_slice(&bytes[start..start + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.lock();
        let start = check_range(offset, buf.len(), bytes.len() as u64)?;
        bytes[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
}
