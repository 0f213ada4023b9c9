//! exofs-client: run chained lookups over a file of an exofs mount from an ordinary,
//! unprivileged process. Open the file on the mount, then call [`chain`] or
//! [`chain_batch`] with the name of a program loaded with `exofs prog load`. If the
//! mount's policy grants it to you, the program runs in the kernel, one of two ways
//! ([`Via`]):
//! - directly: this process runs the program's direct variant itself (one system call per
//!   chain or batch, however many hops; the daemon is asked once per file and program,
//!   and again after the file changes);
//! - through the daemon: one FUSE round trip per call, the daemon runs the chain.
//!
//! By default ([`Via::Auto`]) a call goes directly when it can and falls back to the
//! daemon otherwise (a daemon without direct chains, pins this process cannot open, or a
//! grant the kernel cannot see, such as one to a supplementary group).
//!
//! ```no_run
//! use exofs_abi::formats::Lookup;
//! let file = std::fs::File::open("/mnt/exofs/index")?;
//! let ask = Lookup::ask(4243);
//! let answer = exofs_client::chain(&file, &exofs_client::Chain::new("btree", 0, &ask))?;
//! if answer.is_done() && Lookup::from_scratch(&answer.scratch).is_found() {
//!     println!("value {}", Lookup::from_scratch(&answer.scratch).value);
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! The wire format is `exofs_abi::ioctl` (the same structs as `include/exofs.h` for C).
//! Errors are the ioctl's errno as `std::io::Error`: PermissionDenied (EACCES) when the
//! policy refuses, NotFound (ENOENT) for an unknown program, InvalidInput (EINVAL).

use direct::{Memo, Programs};
use exofs_abi::chain::{status, BATCH_SCRATCH_SIZE, BLOCK_SIZE, MAX_BATCH, SCRATCH_SIZE};
use exofs_abi::ioctl::{
    self, BatchIoctl, ChainIoctl, IoctlLookup, PolicyReload, IOC_CHAIN, IOC_CHAIN_BATCH,
    IOC_POLICY_RELOAD,
};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::Mutex;

mod direct;
pub mod sqlite;

/// How a chain reaches the kernel (see the crate documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Via {
    /// Directly when possible, else through the daemon.
    #[default]
    Auto,
    /// Directly only: an error if that is not possible.
    Direct,
    /// Through the daemon's ioctl only.
    Daemon,
}

/// One chain to run.
#[derive(Debug, Clone)]
pub struct Chain<'a> {
    /// The program's name.
    pub program: &'a str,
    /// Byte offset of the first hop in the file.
    pub start: u64,
    /// Hops at most (0: as many as the caller's grant allows).
    pub hop_limit: u32,
    /// Bytes copied per hop.
    pub read_len: u32,
    /// The program's scratch (at most SCRATCH_SIZE bytes; the rest starts zeroed).
    pub scratch: &'a [u8],
    /// Which way to run it.
    pub via: Via,
}

impl<'a> Chain<'a> {
    /// A chain of `program` from `start` with `scratch`: whole blocks, as many hops as
    /// the caller's grant allows.
    pub fn new(program: &'a str, start: u64, scratch: &'a [u8]) -> Self {
        Self {
            program,
            start,
            hop_limit: 0,
            read_len: BLOCK_SIZE as u32,
            scratch,
            via: Via::Auto,
        }
    }
}

/// What a chain returned.
#[derive(Debug, Clone)]
pub struct Answer {
    /// A `exofs_abi::chain::status` value (DONE when the program answered).
    pub status: i32,
    pub hops: u32,
    /// The scratch as the program left it.
    pub scratch: [u8; SCRATCH_SIZE],
}

impl Answer {
    /// Whether the program ran to its answer.
    pub fn is_done(&self) -> bool {
        self.status == status::DONE
    }
}

/// What one lookup of a batch returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchAnswer {
    pub status: i32,
    pub hops: u32,
    pub scratch: [u8; BATCH_SCRATCH_SIZE],
}

fn program_field(name: &str) -> io::Result<[u8; ioctl::PROGRAM_NAME_SIZE]> {
    ioctl::program_field(name).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("program name `{name}` is too long for the ioctl"),
        )
    })
}

/// Issues `request` with its struct, checking the return value.
///
/// # Safety
/// `request` must be an exofs ioctl number whose size is `size_of::<T>()`.
unsafe fn issue<T>(file: &impl AsFd, request: u32, value: &mut T) -> io::Result<i32> {
    // SAFETY: the caller pairs the request with its struct: the kernel copies exactly
    // size_of::<T>() bytes in and out of `value`.
    let rc = unsafe {
        libc::ioctl(
            file.as_fd().as_raw_fd(),
            request as libc::Ioctl,
            std::ptr::from_mut(value),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Runs one chain over `file` (open on an exofs mount), the way `chain.via` says. A chain
/// the policy denies is an error (PermissionDenied) whichever way it ran.
///
/// What a direct chain discovers is kept per process, by the file's device and inode,
/// which costs a statx per call; a [`Handle`] keeps it with the file instead.
pub fn chain(file: &impl AsFd, chain: &Chain<'_>) -> io::Result<Answer> {
    run_chain(file, chain, Memo::Process)
}

fn run_chain(file: &impl AsFd, chain: &Chain<'_>, memo: Memo<'_>) -> io::Result<Answer> {
    if chain.scratch.len() > SCRATCH_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "scratch of {} bytes; at most {SCRATCH_SIZE}",
                chain.scratch.len()
            ),
        ));
    }
    match chain.via {
        Via::Daemon => daemon_chain(file, chain),
        Via::Direct => match direct::chain(file, chain, memo) {
            Ok(answer) if answer.status == status::DENIED => Err(denied()),
            Ok(answer) => Ok(answer),
            Err(err) => Err(err.into_io()),
        },
        Via::Auto => match direct::chain(file, chain, memo) {
            Ok(answer) if answer.status != status::DENIED => Ok(answer),
            // Denied in the kernel, which sees uid, gid and cgroup only: the daemon also
            // honours supplementary groups.
            Ok(_) | Err(direct::DirectError::Unavailable(_)) => daemon_chain(file, chain),
            Err(err) => Err(err.into_io()),
        },
    }
}

fn denied() -> io::Error {
    io::Error::from_raw_os_error(libc::EACCES)
}

fn daemon_chain(file: &impl AsFd, chain: &Chain<'_>) -> io::Result<Answer> {
    if chain.scratch.len() > SCRATCH_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "scratch of {} bytes; at most {SCRATCH_SIZE}",
                chain.scratch.len()
            ),
        ));
    }
    let mut request = ChainIoctl {
        program: program_field(chain.program)?,
        start: chain.start,
        hop_limit: chain.hop_limit,
        read_len: chain.read_len,
        ..ChainIoctl::default()
    };
    request.scratch[..chain.scratch.len()].copy_from_slice(chain.scratch);
    // SAFETY: IOC_CHAIN encodes size_of::<ChainIoctl>().
    unsafe { issue(file, IOC_CHAIN, &mut request) }?;
    Ok(Answer {
        status: request.status,
        hops: request.hops,
        scratch: request.scratch,
    })
}

/// Runs independent lookups over `file`, up to MAX_BATCH per call: each is a start
/// offset and the first bytes (at most BATCH_SCRATCH_SIZE) of its scratch. `hop_limit`
/// caps every lookup (0: the grant's maximum). Directly when possible ([`Via::Auto`]).
pub fn chain_batch(
    file: &impl AsFd,
    program: &str,
    hop_limit: u32,
    lookups: &[(u64, &[u8])],
) -> io::Result<Vec<BatchAnswer>> {
    chain_batch_via(file, program, hop_limit, lookups, Via::Auto)
}

/// [`chain_batch`], the way `via` says. A batch the policy denies is an error
/// (PermissionDenied).
pub fn chain_batch_via(
    file: &impl AsFd,
    program: &str,
    hop_limit: u32,
    lookups: &[(u64, &[u8])],
    via: Via,
) -> io::Result<Vec<BatchAnswer>> {
    run_batch(file, program, hop_limit, lookups, via, Memo::Process)
}

fn run_batch(
    file: &impl AsFd,
    program: &str,
    hop_limit: u32,
    lookups: &[(u64, &[u8])],
    via: Via,
    memo: Memo<'_>,
) -> io::Result<Vec<BatchAnswer>> {
    if let Some((_, scratch)) = lookups.iter().find(|(_, s)| s.len() > BATCH_SCRATCH_SIZE) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "batch scratch of {} bytes; at most {BATCH_SCRATCH_SIZE}",
                scratch.len()
            ),
        ));
    }
    let any_denied = |answers: &[BatchAnswer]| answers.iter().any(|a| a.status == status::DENIED);
    match via {
        Via::Daemon => daemon_batch(file, program, hop_limit, lookups),
        Via::Direct => match direct::batch(file, program, hop_limit, lookups, memo) {
            Ok(answers) if any_denied(&answers) => Err(denied()),
            Ok(answers) => Ok(answers),
            Err(err) => Err(err.into_io()),
        },
        Via::Auto => match direct::batch(file, program, hop_limit, lookups, memo) {
            Ok(answers) if !any_denied(&answers) => Ok(answers),
            Ok(_) | Err(direct::DirectError::Unavailable(_)) => {
                daemon_batch(file, program, hop_limit, lookups)
            }
            Err(err) => Err(err.into_io()),
        },
    }
}

fn daemon_batch(
    file: &impl AsFd,
    program: &str,
    hop_limit: u32,
    lookups: &[(u64, &[u8])],
) -> io::Result<Vec<BatchAnswer>> {
    let name = program_field(program)?;
    let mut answers = Vec::with_capacity(lookups.len());
    for group in lookups.chunks(MAX_BATCH) {
        let mut request = BatchIoctl {
            program: name,
            hop_limit,
            read_len: BLOCK_SIZE as u32,
            count: group.len() as u32,
            ..BatchIoctl::default()
        };
        for (slot, (start, scratch)) in request.lookups.iter_mut().zip(group) {
            if scratch.len() > BATCH_SCRATCH_SIZE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "batch scratch of {} bytes; at most {BATCH_SCRATCH_SIZE}",
                        scratch.len()
                    ),
                ));
            }
            *slot = IoctlLookup {
                start: *start,
                ..IoctlLookup::default()
            };
            slot.scratch[..scratch.len()].copy_from_slice(scratch);
        }
        // SAFETY: IOC_CHAIN_BATCH encodes size_of::<BatchIoctl>().
        unsafe { issue(file, IOC_CHAIN_BATCH, &mut request) }?;
        answers.extend(
            request.lookups[..group.len()]
                .iter()
                .map(|lookup| BatchAnswer {
                    status: lookup.status,
                    hops: lookup.hops,
                    scratch: lookup.scratch,
                }),
        );
    }
    Ok(answers)
}

/// A file on an exofs mount, held for chains. It runs the same calls as [`chain`] and
/// [`chain_batch_via`], but keeps what direct chains discover about the file with it
/// rather than in the process-wide cache, so a call needs no statx to find it (about a
/// fifth of a warm direct lookup on a FUSE mount). For an application that opens its
/// file once and looks up many times.
///
/// ```no_run
/// use exofs_abi::formats::Lookup;
/// let index = exofs_client::Handle::open("/mnt/exofs/index")?;
/// let ask = Lookup::ask(4243);
/// let answer = index.chain(&exofs_client::Chain::new("btree", 0, &ask))?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Handle<F: AsFd = std::fs::File> {
    file: F,
    known: Mutex<Programs>,
}

impl Handle<std::fs::File> {
    /// Opens `path` (a file on an exofs mount) for reading.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Ok(Self::new(std::fs::File::open(path)?))
    }
}

impl<F: AsFd> Handle<F> {
    /// Holds `file`, open on an exofs mount.
    pub fn new(file: F) -> Self {
        Self {
            file,
            known: Mutex::new(Programs::new()),
        }
    }

    /// The file held.
    pub fn file(&self) -> &F {
        &self.file
    }

    /// [`chain`] over this file.
    pub fn chain(&self, chain: &Chain<'_>) -> io::Result<Answer> {
        run_chain(&self.file, chain, Memo::Handle(&self.known))
    }

    /// [`chain_batch_via`] over this file.
    pub fn chain_batch(
        &self,
        program: &str,
        hop_limit: u32,
        lookups: &[(u64, &[u8])],
        via: Via,
    ) -> io::Result<Vec<BatchAnswer>> {
        run_batch(
            &self.file,
            program,
            hop_limit,
            lookups,
            via,
            Memo::Handle(&self.known),
        )
    }
}

/// Asks the daemon of the mount that `file` (any file or directory on it, the root for
/// instance) belongs to to read its policy file again. Root or the mount's owner only.
/// A policy with mistakes is refused (InvalidInput, naming each) and the old one stays.
pub fn reload_policy(file: &impl AsFd) -> io::Result<()> {
    let mut answer = PolicyReload::default();
    // SAFETY: IOC_POLICY_RELOAD encodes size_of::<PolicyReload>().
    let refused = unsafe { issue(file, IOC_POLICY_RELOAD, &mut answer) }?;
    if refused == 0 {
        return Ok(());
    }
    let end = answer
        .message
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(answer.message.len());
    let message = String::from_utf8_lossy(&answer.message[..end]).into_owned();
    Err(io::Error::new(io::ErrorKind::InvalidInput, message))
}
