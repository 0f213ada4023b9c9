//! libfs: the exofs library file system.
//!
//! A file system in user space that owns its on-disk format, allocator and journal, and
//! publishes per-file extent maps (with generations, change notifications and reuse
//! epochs) for a kernel-side binding.
//!
//! Layers, bottom up (calls go downward only): [`device`] -> [`cache`] -> [`journal`] ->
//! [`alloc`] -> [`inode`] / [`extent`] / [`btree`] -> [`dir`] / [`xattr`] -> `data` ->
//! [`fs`] (the API) and [`handle`] (std::io). [`mod@format`] holds every on-disk structure;
//! [`fsck`] checks an image independently of the write path.
//!
//! ```no_run
//! use libfs::{Fs, OpenOptions, FormatOptions, FileDevice};
//! use std::io::{Read, Write};
//! use std::sync::Arc;
//!
//! let device = FileDevice::create("disk.img".as_ref(), 64 << 20)?;
//! libfs::format(Arc::new(device), &FormatOptions::default())?;
//! let fs = Arc::new(Fs::open("disk.img".as_ref(), &OpenOptions::default())?);
//! let mut file = libfs::File::create(&fs, "/hello.txt".as_ref())?;
//! file.write_all(b"hello")?;
//! file.sync_all()?;
//! drop(file);
//! let mut text = String::new();
//! libfs::File::open(&fs, "/hello.txt".as_ref())?.read_to_string(&mut text)?;
//! assert_eq!(text, "hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod alloc;
mod attr;
pub mod btree;
pub mod cache;
pub mod chain;
pub mod crashsim;
mod data;
pub mod device;
pub mod dir;
mod direct;
pub mod error;
pub mod events;
pub mod extent;
pub mod format;
pub mod fs;
pub mod fsck;
pub mod handle;
pub mod inode;
pub mod journal;
pub mod mkfs;
mod namei;
mod orphan;
mod superblock;
pub mod xattr;

pub use alloc::EpochPin;
pub use chain::{ChainLookup, ChainProgram, ChainResult};
pub use device::{BlockDevice, FileDevice, MemDevice};
pub use error::{Error, Result};
pub use events::{ChangeKind, ExtentChange, ExtentListener};
pub use format::{BLOCK_SIZE, ROOT_INO};
pub use fs::{
    Attr, DirEntry, FallocateMode, Fs, OpenOptions, RenameMode, SetAttr, SetTime, StatFs,
};
pub use handle::File;
pub use inode::Extent;
pub use mkfs::{format, FormatOptions, Geometry};
pub use xattr::SetMode as XattrMode;
