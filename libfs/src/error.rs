//! Errors of every libfs layer, and their POSIX errno.
//!
//! Corruption is a value naming the block and what was wrong; library code never panics
//! on what it reads from a device.

use std::io;

/// The result type of libfs.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything libfs can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A metadata block does not hold what the format says it must.
    #[error("corrupt metadata in block {block}: {what}")]
    Corrupt { block: u64, what: String },
    /// The image uses a feature this version cannot handle.
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// The device is already open read-write by another process (or this one).
    #[error("device busy: {0}")]
    Busy(String),
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("no space left on device")]
    NoSpace,
    #[error("no free inodes left on device")]
    NoInodes,
    #[error("file name too long")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("read-only file system")]
    ReadOnly,
    #[error("file too large")]
    TooBig,
    #[error("too many links")]
    TooManyLinks,
    #[error("no such attribute")]
    NoAttr,
    #[error("attribute value too large: {0}")]
    AttrTooBig(String),
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    #[error("not a symbolic link")]
    NotSymlink,
    /// An operation panicked (a bug, an arithmetic overflow, a device that panicked);
    /// everything it changed was rolled back and the file system carries on.
    #[error("{operation} panicked and was rolled back: {message}")]
    Panicked {
        operation: &'static str,
        message: String,
    },
    /// The file system takes no more changes until it is reopened: a commit failed part
    /// way, or a panic struck where a rollback cannot be trusted. Names what happened.
    #[error("file system stopped, read-only until reopened: {0}")]
    Stopped(String),
}

impl Error {
    /// Shorthand for a corruption report.
    pub fn corrupt(block: u64, what: impl Into<String>) -> Self {
        Error::Corrupt {
            block,
            what: what.into(),
        }
    }

    /// The POSIX errno a file system interface should return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::Corrupt { .. } => libc::EUCLEAN,
            Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::Busy(_) => libc::EBUSY,
            Error::NotFound => libc::ENOENT,
            Error::Exists => libc::EEXIST,
            Error::NotDir => libc::ENOTDIR,
            Error::IsDir => libc::EISDIR,
            Error::NotEmpty => libc::ENOTEMPTY,
            Error::NoSpace | Error::NoInodes => libc::ENOSPC,
            Error::NameTooLong => libc::ENAMETOOLONG,
            Error::Invalid(_) => libc::EINVAL,
            Error::ReadOnly => libc::EROFS,
            Error::TooBig => libc::EFBIG,
            Error::TooManyLinks => libc::EMLINK,
            Error::NoAttr => libc::ENODATA,
            Error::AttrTooBig(_) => libc::E2BIG,
            Error::NotPermitted(_) => libc::EPERM,
            Error::NotSymlink => libc::EINVAL,
            Error::Panicked { .. } | Error::Stopped(_) => libc::EIO,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(inner) => inner,
            other => io::Error::from_raw_os_error(other.errno()),
        }
    }
}
