//! File handles: `std::io::{Read, Write, Seek}` over an inode of an open [`Fs`].
//!
//! A handle keeps its inode alive (see `Fs::retain`): a file unlinked while open stays
//! readable and writable until the last handle drops.

use crate::error::{Error, Result};
use crate::format::{S_IFMT, S_IFREG};
use crate::fs::{Attr, Fs, SetAttr};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

/// An open file with a position.
#[derive(Debug)]
pub struct File {
    fs: Arc<Fs>,
    ino: u64,
    position: u64,
    append: bool,
}

impl File {
    /// Runs a chained lookup of `program` over this file from byte `start` (see
    /// [`crate::chain`]): one kernel call, however many hops.
    pub fn chain(
        &self,
        program: &dyn crate::ChainProgram,
        start: u64,
        scratch: &mut [u8],
    ) -> Result<crate::ChainResult> {
        program.chain(self.ino, start, scratch)
    }

    /// Runs independent lookups of `program` over this file in batches.
    pub fn chain_batch(
        &self,
        program: &dyn crate::ChainProgram,
        lookups: &mut [crate::ChainLookup],
    ) -> Result<Vec<crate::ChainResult>> {
        program.chain_batch(self.ino, lookups)
    }

    /// Opens an existing file by path.
    pub fn open(fs: &Arc<Fs>, path: &Path) -> Result<File> {
        let attr = fs.resolve(path)?;
        if attr.is_dir() {
            return Err(Error::IsDir);
        }
        Self::from_ino(fs, attr.ino)
    }

    /// Creates a file (or truncates an existing one) by path, mode 0644, owned by root.
    pub fn create(fs: &Arc<Fs>, path: &Path) -> Result<File> {
        let parent = path
            .parent()
            .ok_or_else(|| Error::Invalid("path has no parent".into()))?;
        let name = path
            .file_name()
            .ok_or_else(|| Error::Invalid("path has no file name".into()))?;
        let parent = fs.resolve(parent)?;
        match fs.lookup(parent.ino, name.as_bytes()) {
            Ok(attr) if attr.mode & S_IFMT == S_IFREG => {
                fs.setattr(
                    attr.ino,
                    &SetAttr {
                        size: Some(0),
                        ..SetAttr::default()
                    },
                )?;
                Self::from_ino(fs, attr.ino)
            }
            Ok(_) => Err(Error::Exists),
            Err(Error::NotFound) => {
                let attr = fs.create(parent.ino, name.as_bytes(), 0o644, 0, 0)?;
                Self::from_ino(fs, attr.ino)
            }
            Err(e) => Err(e),
        }
    }

    /// A handle on inode `ino`.
    pub fn from_ino(fs: &Arc<Fs>, ino: u64) -> Result<File> {
        fs.retain(ino)?;
        Ok(File {
            fs: fs.clone(),
            ino,
            position: 0,
            append: false,
        })
    }

    /// Makes every write go to the end of the file (O_APPEND).
    pub fn set_append(&mut self, append: bool) {
        self.append = append;
    }

    pub fn ino(&self) -> u64 {
        self.ino
    }

    pub fn metadata(&self) -> Result<Attr> {
        self.fs.getattr(self.ino)
    }

    pub fn set_len(&self, size: u64) -> Result<()> {
        self.fs.setattr(
            self.ino,
            &SetAttr {
                size: Some(size),
                ..SetAttr::default()
            },
        )?;
        Ok(())
    }

    /// Makes the file's data and metadata durable.
    pub fn sync_all(&self) -> Result<()> {
        self.fs.fsync(self.ino)
    }

    /// Reads at an offset without moving the position.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.fs.read_at(self.ino, offset, buf)
    }

    /// Writes at an offset without moving the position.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<usize> {
        self.fs.write_at(self.ino, offset, buf)
    }

    /// The file system this handle belongs to.
    pub fn fs(&self) -> &Arc<Fs> {
        &self.fs
    }
}

impl Drop for File {
    fn drop(&mut self) {
        if let Err(e) = self.fs.release(self.ino) {
            log::error!("releasing inode {}: {e}", self.ino);
        }
    }
}

impl Read for File {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.fs.read_at(self.ino, self.position, buf)?;
        self.position += n as u64;
        Ok(n)
    }
}

impl Write for File {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.append {
            let (offset, n) = self.fs.append(self.ino, buf)?;
            self.position = offset + n as u64;
            return Ok(n);
        }
        let n = self.fs.write_at(self.ino, self.position, buf)?;
        self.position += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for File {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let base = match to {
            SeekFrom::Start(offset) => {
                self.position = offset;
                return Ok(offset);
            }
            SeekFrom::Current(delta) => (self.position, delta),
            SeekFrom::End(delta) => (self.fs.getattr(self.ino)?.size, delta),
        };
        let position = base.0.checked_add_signed(base.1).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )
        })?;
        self.position = position;
        Ok(position)
    }
}
