//! Direct chains: this process runs the mount's programs in the kernel itself, with no
//! daemon in the data path (docs/MOUNT.md "Direct chains").
//!
//! One `IOC_DIRECT` ioctl on the file (a FUSE round trip) tells which pins to open and
//! how the driver names the file; from then on every chain is one BPF_PROG_TEST_RUN of the
//! program's direct variant. The driver reads the device through the mount daemon's
//! mapping and checks the policy on this process (uid, gid, cgroup): nothing in the
//! context names a task, an address or a mapping. What was discovered is cached per
//! (file, program); a STALE or NOT_REGISTERED answer (the file changed) discovers again.

use exofs_abi::chain::{
    status, BatchCtx, BatchLookup, ChainCtx, ChainFile, BATCH_SCRATCH_SIZE, BLOCK_SIZE, MAX_BATCH,
    SCRATCH_SIZE,
};
use exofs_abi::ioctl::{DirectIoctl, IOC_DIRECT};
use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::{issue, program_field, Answer, BatchAnswer, Chain};

/// Runs of a chain or batch when the file keeps changing under it (each after a new
/// discovery).
const ATTEMPTS: u32 = 8;

/// Why the direct path could not answer.
#[derive(Debug)]
pub(crate) enum DirectError {
    /// It is not available here (no such ioctl, pins that cannot be opened or run): the
    /// daemon's ioctl may still serve the request.
    Unavailable(io::Error),
    /// A refusal or a malformed request, which the ioctl would give too.
    Failed(io::Error),
}

impl DirectError {
    pub(crate) fn into_io(self) -> io::Error {
        match self {
            Self::Unavailable(err) | Self::Failed(err) => err,
        }
    }
}

/// What a discovery gave: the opened pins and the file as the driver names it.
#[derive(Debug)]
pub(crate) struct Direct {
    chain: OwnedFd,
    batch: OwnedFd,
    file: ChainFile,
    max_hops: u32,
}

/// One file's discoveries, by program name.
pub(crate) type Programs = Vec<(String, Arc<Direct>)>;

/// Where discoveries are kept.
#[derive(Clone, Copy)]
pub(crate) enum Memo<'a> {
    /// In the process-wide cache, by (device, inode): a statx per call finds the entry.
    Process,
    /// In a [`crate::Handle`], which is one file: no statx.
    Handle(&'a Mutex<Programs>),
}

/// A file by (device, inode); each has its programs' discoveries.
type Key = (u64, u64);
type Cache = HashMap<Key, Programs>;

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn key_of(file: &impl AsFd) -> io::Result<Key> {
    let mut stat = std::mem::MaybeUninit::<libc::statx>::uninit();
    // SAFETY: statx with AT_EMPTY_PATH reads the descriptor itself and writes a whole
    // statx on success. AT_STATX_DONT_SYNC: the device and inode numbers never change,
    // so FUSE need not ask the daemon for fresh attributes (an fstat did, now and then).
    let ret = unsafe {
        libc::statx(
            file.as_fd().as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            libc::STATX_INO,
            stat.as_mut_ptr(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful statx.
    let stat = unsafe { stat.assume_init() };
    let device = u64::from(stat.stx_dev_major) << 32 | u64::from(stat.stx_dev_minor);
    Ok((device, stat.stx_ino))
}

/// The discovery of `program` over `file` kept in `memo`, or a new one (`fresh`: always
/// new).
fn discovered(
    file: &impl AsFd,
    program: &str,
    fresh: bool,
    memo: Memo<'_>,
) -> Result<Arc<Direct>, DirectError> {
    match memo {
        Memo::Process => {
            let key = key_of(file).map_err(DirectError::Failed)?;
            let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
            remembered(cache.entry(key).or_default(), file, program, fresh)
        }
        Memo::Handle(programs) => {
            let mut programs = programs.lock().unwrap_or_else(|p| p.into_inner());
            remembered(&mut programs, file, program, fresh)
        }
    }
}

fn remembered(
    programs: &mut Programs,
    file: &impl AsFd,
    program: &str,
    fresh: bool,
) -> Result<Arc<Direct>, DirectError> {
    let known = programs.iter().position(|(name, _)| name == program);
    if let (Some(at), false) = (known, fresh) {
        return Ok(programs[at].1.clone());
    }
    let direct = Arc::new(discover(file, program)?);
    match known {
        Some(at) => programs[at].1 = direct.clone(),
        None => programs.push((program.to_owned(), direct.clone())),
    }
    Ok(direct)
}

fn discover(file: &impl AsFd, program: &str) -> Result<Direct, DirectError> {
    let mut request = DirectIoctl {
        program: program_field(program).map_err(DirectError::Failed)?,
        ..DirectIoctl::default()
    };
    // SAFETY: IOC_DIRECT encodes size_of::<DirectIoctl>().
    if let Err(err) = unsafe { issue(file, IOC_DIRECT, &mut request) } {
        return Err(match err.raw_os_error() {
            // A daemon without direct chains (or without a kernel binding).
            Some(libc::ENOTTY | libc::EOPNOTSUPP | libc::ENAMETOOLONG) => {
                DirectError::Unavailable(err)
            }
            _ => DirectError::Failed(err),
        });
    }
    let open = |field: &[u8]| {
        let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(&field[..end]));
        obj_get(&path).map_err(|err| {
            DirectError::Unavailable(io::Error::new(
                err.kind(),
                format!("opening the pin {}: {err}", path.display()),
            ))
        })
    };
    Ok(Direct {
        chain: open(&request.chain_pin)?,
        batch: open(&request.batch_pin)?,
        file: ChainFile {
            ino: request.ino,
            generation: request.generation,
        },
        max_hops: request.max_hops,
    })
}

/// Whether the file changed since it was discovered (discover again and retry).
fn changed(status: i32) -> bool {
    matches!(status, status::STALE | status::NOT_REGISTERED)
}

/// Whether an answer from a discovery made earlier may be out of date rather than final:
/// the ticket may have gone with the handle it was taken through (another handle of this
/// process on the file is open), or the daemon may have been replaced by a new one.
/// Discover again once, through the descriptor at hand, before believing it.
fn maybe_outdated(status: i32) -> bool {
    matches!(status, status::DENIED | status::NO_DAEMON)
}

/// Runs `chain` directly.
pub(crate) fn chain(
    file: &impl AsFd,
    chain: &Chain<'_>,
    memo: Memo<'_>,
) -> Result<Answer, DirectError> {
    let mut fresh = false;
    for _ in 0..ATTEMPTS {
        let direct = discovered(file, chain.program, fresh, memo)?;
        let mut ctx = ChainCtx {
            file_count: 1,
            hop_limit: if chain.hop_limit == 0 {
                direct.max_hops
            } else {
                chain.hop_limit
            },
            read_len: chain.read_len,
            start_offset: chain.start,
            ..ChainCtx::default()
        };
        ctx.files[0] = direct.file;
        ctx.scratch[..chain.scratch.len()].copy_from_slice(chain.scratch);
        test_run(&direct.chain, bytes_of_mut(&mut ctx)).map_err(DirectError::Unavailable)?;
        // (The chain program's return value is its status, also in the context.)
        if changed(ctx.status) || (maybe_outdated(ctx.status) && !fresh) {
            fresh = true;
            continue;
        }
        return Ok(Answer {
            status: ctx.status,
            hops: ctx.hops,
            scratch: ctx.scratch,
        });
    }
    Err(DirectError::Failed(io::Error::new(
        io::ErrorKind::Interrupted,
        format!("the file kept changing during {ATTEMPTS} attempts"),
    )))
}

/// Runs a batch directly: the answers, in order.
pub(crate) fn batch(
    file: &impl AsFd,
    program: &str,
    hop_limit: u32,
    lookups: &[(u64, &[u8])],
    memo: Memo<'_>,
) -> Result<Vec<BatchAnswer>, DirectError> {
    let mut answers = Vec::with_capacity(lookups.len());
    for group in lookups.chunks(MAX_BATCH) {
        let mut fresh = false;
        let mut pending: Vec<usize> = (0..group.len()).collect();
        let mut done: Vec<Option<BatchAnswer>> = vec![None; group.len()];
        for _ in 0..ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            let direct = discovered(file, program, fresh, memo)?;
            let mut ctx = BatchCtx {
                file_count: 1,
                hop_limit: if hop_limit == 0 {
                    direct.max_hops
                } else {
                    hop_limit
                },
                read_len: BLOCK_SIZE as u32,
                count: pending.len() as u32,
                ..BatchCtx::default()
            };
            ctx.files[0] = direct.file;
            for (slot, &index) in ctx.lookups.iter_mut().zip(&pending) {
                let (start, scratch) = group[index];
                *slot = BatchLookup {
                    start_offset: start,
                    ..BatchLookup::default()
                };
                slot.scratch[..scratch.len()].copy_from_slice(scratch);
            }
            let refused = test_run(&direct.batch, bytes_of_mut(&mut ctx))
                .map_err(DirectError::Unavailable)?;
            if refused != status::DONE && maybe_outdated(refused) && !fresh {
                fresh = true;
                continue;
            }
            let mut again = Vec::new();
            for (slot, &index) in ctx.lookups.iter().zip(&pending) {
                if refused != status::DONE {
                    // The driver refused the whole call (policy, arguments, no daemon)
                    // and wrote no lookup.
                    done[index] = Some(BatchAnswer {
                        status: refused,
                        hops: 0,
                        scratch: slot.scratch,
                    });
                    continue;
                }
                if changed(slot.status) || (maybe_outdated(slot.status) && !fresh) {
                    again.push(index);
                } else {
                    done[index] = Some(BatchAnswer {
                        status: slot.status,
                        hops: slot.hops,
                        scratch: slot.scratch,
                    });
                }
            }
            pending = again;
            fresh = true;
        }
        if !pending.is_empty() {
            return Err(DirectError::Failed(io::Error::new(
                io::ErrorKind::Interrupted,
                format!("the file kept changing during {ATTEMPTS} attempts"),
            )));
        }
        answers.extend(done.into_iter().flatten());
    }
    Ok(answers)
}

/// `BPF_OBJ_GET`: opens a pinned object (read and write: what the kernel asks of a
/// program's pin).
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the pin path"))?;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let mut attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_PROG_TEST_RUN` of a syscall program on `ctx` (read, and written back in place):
/// the program's return value.
fn test_run(program: &OwnedFd, ctx: &mut [u8]) -> io::Result<i32> {
    #[repr(C)]
    #[derive(Default)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    let mut attr = TestRun {
        prog_fd: program.as_raw_fd() as u32,
        ctx_size_in: ctx.len() as u32,
        ctx_in: ctx.as_mut_ptr() as u64,
        ..TestRun::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(attr.retval as i32)
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, correctly laid out bpf_attr prefix for `cmd`, of the size
    // passed; the kernel reads (and for test runs, writes through the pointers in) it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The bytes of a context.
fn bytes_of_mut<T: Copy>(value: &mut T) -> &mut [u8] {
    // SAFETY: the ABI's contexts are #[repr(C)] integers and byte arrays without padding
    // (their sizes are asserted in exofs-abi); the slice borrows `value`.
    unsafe {
        std::slice::from_raw_parts_mut(
            std::ptr::from_mut(value).cast::<u8>(),
            std::mem::size_of::<T>(),
        )
    }
}

const _: () = assert!(SCRATCH_SIZE >= BATCH_SCRATCH_SIZE);
