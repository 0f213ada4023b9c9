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
    SCRATCH_SIZE, TABLE_ONLY,
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

/// Where a lookup of a direct batch stands: where it resumes (after a stop at a block
/// the table lacks) and with which scratch.
#[derive(Clone, Copy)]
struct Cursor {
    start_file: u32,
    start_offset: u64,
    start_hop: u32,
    /// Anything but u64::MAX: the resumed hop may read the daemon's mapping.
    missing: u64,
    scratch: [u8; BATCH_SCRATCH_SIZE],
    /// The file (and generation) the resume point was read from; None: from the start.
    file: Option<ChainFile>,
    /// Stops so far: past [`MAX_STOPS`] the lookup runs without TABLE_ONLY.
    stops: u32,
}

impl Cursor {
    fn new((start, scratch): (u64, &[u8])) -> Self {
        let mut cursor = Self {
            start_file: 0,
            start_offset: start,
            start_hop: 0,
            missing: u64::MAX,
            scratch: [0; BATCH_SCRATCH_SIZE],
            file: None,
            stops: 0,
        };
        cursor.scratch[..scratch.len()].copy_from_slice(scratch);
        cursor
    }
}

/// Stops of one lookup after which it runs without TABLE_ONLY (waiting for its blocks
/// one at a time, but surely ending): a lookup stops at most once per hop unless the
/// table keeps losing its blocks (writes, a table smaller than the working set) or a
/// program fans out (a stop with other branches pending restarts the lookup).
const MAX_STOPS: u32 = 16;

/// Batches of fewer lookups run without TABLE_ONLY: there is too little to overlap.
const MIN_OVERLAPPED: usize = 4;

/// Rounds of a direct batch at most: a safety net (a lookup stops at most MAX_STOPS
/// times, and restarts at most ATTEMPTS times).
const MAX_ROUNDS: u32 = 2 * (MAX_STOPS + 1) * (ATTEMPTS + 1);

/// How long a direct batch waits after a round that left many lookups at blocks the
/// daemon's hot-block table does not hold: time for the daemon to notice them and start
/// their reads together (it looks every 100 µs while blocks are wanted).
const FILL_WAIT: std::time::Duration = std::time::Duration::from_micros(200);

/// Runs a batch directly: the answers, in order.
///
/// Every lookup runs with TABLE_ONLY: a hop whose block is not in the daemon's hot-block
/// table stops its lookup (MISSING) instead of waiting for the disk there, one block at
/// a time. When a round has run every pending lookup, the daemon reads the round's
/// missing blocks together, and the stopped lookups resume at their hop, each allowed to
/// read its own block from the daemon's mapping (already in memory, or on its way). So a
/// batch's misses overlap, as the daemon's batch ioctl does with its own reads.
///
/// Before resuming, the batch waits [`FILL_WAIT`] if at least a quarter of the round's
/// lookups stopped: then the data is cold, and the reads must be under way before the
/// lookups wait for them. A few stops mean blocks the table does not hold but memory
/// does (a table smaller than the working set): those resume at once.
pub(crate) fn batch(
    file: &impl AsFd,
    program: &str,
    hop_limit: u32,
    lookups: &[(u64, &[u8])],
    memo: Memo<'_>,
) -> Result<Vec<BatchAnswer>, DirectError> {
    let mut cursors: Vec<Cursor> = lookups.iter().copied().map(Cursor::new).collect();
    let mut done: Vec<Option<BatchAnswer>> = vec![None; lookups.len()];
    let mut changes = vec![0u32; lookups.len()];
    let mut pending: Vec<usize> = (0..lookups.len()).collect();
    let mut fresh = false;
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        if rounds > MAX_ROUNDS {
            return Err(DirectError::Failed(io::Error::new(
                io::ErrorKind::Interrupted,
                format!("lookups still unfinished after {MAX_ROUNDS} rounds"),
            )));
        }
        let direct = discovered(file, program, fresh, memo)?;
        // A resume point read from another generation of the file (a new discovery since)
        // holds offsets into the old file: that lookup starts again.
        for &index in &pending {
            if cursors[index].file.is_some_and(|file| file != direct.file) {
                cursors[index] = Cursor::new(lookups[index]);
            }
        }
        let overlap = lookups.len() >= MIN_OVERLAPPED;
        let (table_only, faulting): (Vec<usize>, Vec<usize>) = pending
            .iter()
            .partition(|&&index| overlap && cursors[index].stops < MAX_STOPS);
        let mut again = Vec::new();
        let (mut missed, mut rediscover) = (0, false);
        let ran = pending.len();
        let groups = table_only
            .chunks(MAX_BATCH)
            .map(|group| (group, TABLE_ONLY))
            .chain(faulting.chunks(MAX_BATCH).map(|group| (group, 0)));
        for (group, flags) in groups {
            let mut ctx = BatchCtx {
                file_count: 1,
                hop_limit: if hop_limit == 0 {
                    direct.max_hops
                } else {
                    hop_limit
                },
                read_len: BLOCK_SIZE as u32,
                count: group.len() as u32,
                flags,
                ..BatchCtx::default()
            };
            ctx.files[0] = direct.file;
            for (slot, &index) in ctx.lookups.iter_mut().zip(group) {
                let cursor = &cursors[index];
                *slot = BatchLookup {
                    start_file: cursor.start_file,
                    start_offset: cursor.start_offset,
                    start_hop: cursor.start_hop,
                    missing: cursor.missing,
                    scratch: cursor.scratch,
                    ..BatchLookup::default()
                };
            }
            let refused = test_run(&direct.batch, bytes_of_mut(&mut ctx))
                .map_err(DirectError::Unavailable)?;
            if refused != status::DONE {
                if maybe_outdated(refused) && !fresh {
                    rediscover = true;
                    again.extend_from_slice(group);
                    continue;
                }
                // The driver refused the whole call (policy, arguments, no daemon) and
                // wrote no lookup: the caller gets its own scratch back.
                for &index in group {
                    done[index] = Some(BatchAnswer {
                        status: refused,
                        hops: 0,
                        scratch: Cursor::new(lookups[index]).scratch,
                    });
                }
                continue;
            }
            for (slot, &index) in ctx.lookups.iter().zip(group) {
                if slot.status == status::MISSING {
                    cursors[index] = Cursor {
                        start_file: slot.start_file,
                        start_offset: slot.start_offset,
                        start_hop: slot.start_hop,
                        // (0 from the driver: the device offset is not told.)
                        missing: 0,
                        scratch: slot.scratch,
                        file: Some(direct.file),
                        stops: cursors[index].stops + 1,
                    };
                    missed += 1;
                    again.push(index);
                } else if changed(slot.status) || (maybe_outdated(slot.status) && !fresh) {
                    // From the start, after a new discovery.
                    changes[index] += 1;
                    if changes[index] >= ATTEMPTS {
                        return Err(DirectError::Failed(io::Error::new(
                            io::ErrorKind::Interrupted,
                            format!("the file kept changing during {ATTEMPTS} attempts"),
                        )));
                    }
                    cursors[index] = Cursor::new(lookups[index]);
                    rediscover = true;
                    again.push(index);
                } else {
                    // A lookup that resumed has its caller's scratch in its own.
                    done[index] = Some(BatchAnswer {
                        status: slot.status,
                        hops: slot.hops,
                        scratch: if slot.status == status::DONE {
                            slot.scratch
                        } else {
                            Cursor::new(lookups[index]).scratch
                        },
                    });
                }
            }
        }
        again.sort_unstable();
        pending = again;
        fresh = rediscover;
        if missed > 0 && 4 * missed >= ran {
            std::thread::sleep(FILL_WAIT);
        }
    }
    Ok(done.into_iter().flatten().collect())
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
