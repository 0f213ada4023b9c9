//! Chain runner (first cut): registers libfs files in the driver's maps and runs
//! `exofs_chain` over the caller's read-only mapping of the device.
//!
//! Interface: [`Chains::load`], [`Chains::register`], [`DeviceMapping::map`],
//! [`Chains::run`]. Still to come (issue 3): keeping registrations current from
//! `Fs::subscribe`, epoch pins around runs, pinned maps, batches, and the binder that links
//! an application's `next` in place of the built-in linked-list walk.

use crate::extent_map::{self, ChunkError};
use crate::loader::{LoadError, MapHandle, Object, SyscallProgram};
use crate::sys;
use exofs_abi::chain::{ChainCtx, ChainFile, MAX_CHAIN_FILES, SCRATCH_SIZE};
use exofs_abi::extents::{ExtentKey, FileInfo, FileKey, MAP_EXTENTS, MAP_FILES};
use libfs::Fs;

/// Name of the chain program in the driver.
pub const CHAIN_PROGRAM: &str = "exofs_chain";

/// Why a chain could not run.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error(transparent)]
    Fs(#[from] libfs::Error),
    #[error("cannot register the file: {0}")]
    Chunk(#[from] ChunkError),
    #[error("the driver lacks {0}")]
    Missing(&'static str),
    #[error("{0}")]
    Invalid(String),
}

/// A read-only shared mapping of a whole device: what the driver copies blocks from.
#[derive(Debug)]
pub struct DeviceMapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl DeviceMapping {
    /// Maps the device of `fs` read-only.
    pub fn map(fs: &Fs) -> Result<Self, ChainError> {
        let fd = fs
            .device()
            .raw_fd()
            .ok_or(ChainError::Missing("a device file descriptor"))?;
        let len = fs.device().size() as usize;
        // SAFETY: a fresh shared read-only mapping of a descriptor the Fs keeps open; the
        // kernel picks the address; we only hand the address to the kernel and unmap once.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(ChainError::Invalid(format!(
                "cannot map the device: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Self { addr, len })
    }
}

impl Drop for DeviceMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// The loaded driver and its maps.
#[derive(Debug)]
pub struct Chains {
    object: Object,
}

/// One chain to run.
#[derive(Debug, Clone)]
pub struct ChainRequest {
    pub files: Vec<ChainFile>,
    pub start_file: u32,
    pub start_offset: u64,
    pub read_len: u32,
    pub hop_limit: u32,
    pub scratch: [u8; SCRATCH_SIZE],
}

impl Chains {
    /// Loads the trusted driver (needs CAP_BPF + CAP_PERFMON).
    pub fn load() -> Result<Self, ChainError> {
        let object = Object::load(crate::DRIVER_ELF)?;
        Ok(Self { object })
    }

    fn map(&self, name: &'static str) -> Result<&MapHandle, ChainError> {
        self.object.map(name).ok_or(ChainError::Missing(name))
    }

    fn program(&self) -> Result<&SyscallProgram, ChainError> {
        self.object
            .program(CHAIN_PROGRAM)
            .ok_or(ChainError::Missing(CHAIN_PROGRAM))
    }

    /// Publishes the current extents of `ino` and returns what a chain must name it by.
    pub fn register(&self, fs: &Fs, ino: u64) -> Result<ChainFile, ChainError> {
        let attr = fs.getattr(ino)?;
        let chunked = extent_map::chunk(&fs.extents(ino)?)?;
        let extents = self.map(MAP_EXTENTS)?;
        for (chunk, value) in &chunked.chunks {
            extents.set(&ExtentKey { ino, chunk: *chunk }, value, sys::BPF_ANY)?;
        }
        let info = FileInfo {
            generation: attr.generation,
            size: attr.size,
            chunk_shift: chunked.chunk_shift,
            flags: 0,
        };
        self.map(MAP_FILES)?
            .set(&FileKey { ino }, &info, sys::BPF_ANY)?;
        Ok(ChainFile {
            ino,
            generation: attr.generation,
        })
    }

    /// Runs one chain over `mapping`; returns the context as the driver left it.
    pub fn run(
        &self,
        mapping: &DeviceMapping,
        request: &ChainRequest,
    ) -> Result<ChainCtx, ChainError> {
        if request.files.is_empty() || request.files.len() > MAX_CHAIN_FILES {
            return Err(ChainError::Invalid(format!(
                "a chain names 1..={MAX_CHAIN_FILES} files"
            )));
        }
        let mut ctx = ChainCtx::default();
        ctx.files[..request.files.len()].copy_from_slice(&request.files);
        ctx.file_count = request.files.len() as u32;
        ctx.hop_limit = request.hop_limit;
        ctx.start_file = request.start_file;
        ctx.read_len = request.read_len;
        ctx.start_offset = request.start_offset;
        ctx.map_addr = mapping.addr as u64;
        ctx.map_len = mapping.len as u64;
        ctx.scratch = request.scratch;
        self.program()?.test_run_pod(&mut ctx)?;
        Ok(ctx)
    }
}
