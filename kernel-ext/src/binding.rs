//! The binding: the driver's maps for one file system, the files registered in them, the
//! programs bound to them, and the chain runner.
//!
//! Layer: kernel-ext, top. Used by mount-tool (`exofs prog|chain|stats`, the mount
//! daemon) and by linked applications (through libfs's `File::chain`).
//!
//! Interface: [`Binding::open`] creates (or, if pinned by an earlier process, opens) the
//! maps under `<bpffs>/exofs/<fs-uuid>/maps/`; [`Binding::bind`] links an application
//! object into the driver ([`crate::binder`]), loads it and pins it as `progs/<name>`
//! (and its batch variant as `batch/<name>`);
//! [`Binding::run`] and [`Binding::run_batch`] run chains over the caller's read-only
//! mapping of the device; [`Binding::register`] / [`Binding::unregister`] manage files.
//!
//! Invariants (DESIGN "The binding"):
//! - A chain names each file by the generation the binding PUBLISHED with its extents;
//!   callers never supply generations. Publishing reads extents and generation in one
//!   libfs snapshot, writes the chunks, then the file's entry, then deletes chunks no
//!   longer used; it never writes a generation older than one already seen.
//! - libfs reports every extent change before it can commit (and so before freed blocks
//!   can be reused). The listener writes the new generation into the file's entry at once
//!   for changes that free or move blocks (truncate, punch, delete, relocate), so every
//!   chain that named the old one gets STALE, even mid-walk (the driver re-checks after
//!   each copy); any change marks the file for re-publishing before its next chain.
//! - Each chain holds a libfs epoch pin while it runs: blocks freed after it started are
//!   not reused until it ends.
//! - Lock order: the listener runs under the Fs lock and takes the registry lock; the
//!   runner never calls into the Fs while holding the registry lock.
//! - Dropping the binding unregisters its files; pinned objects stay only while programs
//!   are pinned (`exofs prog load`), and [`Binding::unload`] of the last program removes
//!   every pin and the directory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use exofs_abi::chain::{
    stats, status, BatchCtx, ChainCtx, ChainFile, BATCH_NO_FAULT, BATCH_SCRATCH_SIZE, BLOCK_SIZE,
    MAX_BATCH, MAX_CHAIN_FILES, MAX_HOPS, SCRATCH_SIZE,
};
use exofs_abi::extents::{ExtentKey, FileInfo, FileKey, MAP_EXTENTS, MAP_FILES};
use exofs_abi::policy::{
    PolicyGrant, PolicyKey, KIND_SPEAKER, MAP_POLICY, MODE_KEY, SUBJECT_CGROUP, SUBJECT_GID,
    SUBJECT_UID,
};
use libfs::{ChangeKind, ExtentChange, ExtentListener, Fs};

use crate::binder::{self, BindError};
use crate::extent_map::{self, ChunkError};
use crate::loader::{Linker, LoadError, MapHandle, SyscallProgram, ALIAS_SECTION, SYSCALL_SECTION};
use crate::sys::{self, SysError};

/// The driver's single-chain program.
pub const CHAIN_PROGRAM: &str = "exofs_chain";
/// The driver's batch program.
pub const BATCH_PROGRAM: &str = "exofs_chain_batch";
/// Directory, beside `progs/`, of the pins of the programs' batch variants (bpffs refuses
/// dots in names, so `progs/<name>.batch` is not possible).
const BATCH_PIN_DIR: &str = "batch";
/// Where bpffs is mounted.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` (statfs f_type of a bpffs mount).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Attempts of one chain when it finds a file stale or unregistered (re-publishing it
/// in between).
const MAX_ATTEMPTS: u32 = 8;
/// Maps that are pinned, by the driver's name, under `maps/` with the pin's name.
const PINNED_MAPS: &[(&str, &str)] = &[
    (MAP_FILES, "files"),
    (MAP_EXTENTS, "extents"),
    (MAP_POLICY, "policy"),
    (stats::MAP_STATS, "stats"),
];

/// Why a binding operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Fs(#[from] libfs::Error),
    #[error("cannot register inode {ino}: {source}")]
    Chunk {
        ino: u64,
        #[source]
        source: ChunkError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no program `{0}` is bound (see `exofs prog list`)")]
    NoProgram(String),
    #[error("a program called `{0}` is already bound")]
    Exists(String),
    #[error("invalid program name `{0}`: use 1-64 characters of [A-Za-z0-9_-]")]
    BadName(String),
    #[error("invalid chain: {0}")]
    Invalid(String),
}

impl BindingError {
    /// True when the caller lacks the privilege for BPF (CAP_BPF, CAP_PERFMON) or for
    /// mounting bpffs (CAP_SYS_ADMIN): EPERM from bpf(2) or from mount.
    pub fn is_permission_denied(&self) -> bool {
        match self {
            Self::Sys(err) | Self::Load(LoadError::Sys(err)) => err.is_permission_denied(),
            Self::Io { source, .. } => source.raw_os_error() == Some(libc::EPERM),
            _ => false,
        }
    }
}

type Result<T, E = BindingError> = std::result::Result<T, E>;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BindingError + '_ {
    move |source| BindingError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How to open a binding.
#[derive(Debug, Clone)]
pub struct BindingOptions {
    /// Pin maps and programs under `<bpffs>/exofs/<uuid>/` (mounting bpffs there if it is
    /// not mounted). Without pinning, everything lives as long as the binding.
    pub pin: bool,
    /// The bpffs mount point.
    pub bpffs: PathBuf,
}

impl Default for BindingOptions {
    fn default() -> Self {
        Self {
            pin: true,
            bpffs: PathBuf::from(DEFAULT_BPFFS),
        }
    }
}

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
    pub fn map(fs: &Fs) -> Result<Self> {
        Self::map_with(fs, libc::MAP_SHARED)
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
        let len = fs.device().size() as usize;
        // SAFETY: a fresh read-only mapping of a descriptor the Fs keeps open; the kernel
        // picks the address; it is only read, and unmapped once.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, flags, fd, 0) };
        if addr == libc::MAP_FAILED {
            return Err(BindingError::Invalid(format!(
                "cannot map the device: {}",
                std::io::Error::last_os_error()
            )));
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
    /// (MADV_POPULATE_READ waits for its own read only). Each readahead covers the
    /// READ_AROUND-aligned window around its block, as the kernel's own read-around on a
    /// page fault does: a fault inside a chain gets its neighbours for free, and a batch
    /// that asked for the single block lost to it (measured: 2.2x pread cold, against
    /// 3.7x for single chains).
    pub fn bring_in(&self, fs: &Fs, blocks: &[u64]) -> Result<()> {
        const READ_AROUND: u64 = 128 << 10;
        let Some(fd) = fs.device().raw_fd() else {
            return Ok(());
        };
        let mut windows: Vec<u64> = blocks
            .iter()
            .map(|o| o / READ_AROUND * READ_AROUND)
            .collect();
        windows.sort_unstable();
        windows.dedup();
        let window_len = |start: u64| READ_AROUND.min((self.len as u64).saturating_sub(start));
        for start in &windows {
            // SAFETY: advice on a descriptor the Fs keeps open; no memory is passed.
            unsafe {
                libc::posix_fadvise(
                    fd,
                    *start as i64,
                    window_len(*start) as i64,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
        }
        for start in &windows {
            // SAFETY: the window lies inside this mapping (clipped to its length);
            // populating only reads the file into the mapping's page tables.
            let ret = unsafe {
                libc::madvise(
                    self.addr.cast::<u8>().add(*start as usize).cast(),
                    window_len(*start) as usize,
                    libc::MADV_POPULATE_READ,
                )
            };
            if ret != 0 {
                return Err(BindingError::Invalid(format!(
                    "cannot read the device at byte {start}: {}",
                    std::io::Error::last_os_error()
                )));
            }
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

/// A registered file, as the binding tracks it.
#[derive(Debug, Default)]
struct Registered {
    /// Changes reported by libfs so far.
    changes: u64,
    /// Value of `changes` when the published extents were read.
    published_changes: Option<u64>,
    /// Generation published with the extents (what chains name).
    published_generation: u64,
    /// Newest generation libfs reported.
    latest_generation: u64,
    /// Chunk numbers in the extents map.
    chunks: BTreeSet<u64>,
}

impl Registered {
    fn is_current(&self) -> bool {
        self.published_changes == Some(self.changes)
            && self.published_generation >= self.latest_generation
    }
}

/// The maps shared by every program of a binding, and what is registered in them.
struct Maps {
    files: MapHandle,
    extents: MapHandle,
    policy: MapHandle,
    stats: MapHandle,
    /// Every map of the driver, by its name in the driver (for relocation).
    all: BTreeMap<String, MapHandle>,
    registry: Mutex<HashMap<u64, Registered>>,
}

impl Maps {
    fn registry(&self) -> MutexGuard<'_, HashMap<u64, Registered>> {
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes a file's entry and chunks from the maps.
    fn remove(&self, ino: u64, chunks: &BTreeSet<u64>) -> Result<()> {
        self.files.delete(&FileKey { ino })?;
        for chunk in chunks {
            self.extents.delete(&ExtentKey { ino, chunk: *chunk })?;
        }
        Ok(())
    }
}

/// Listens to libfs for the binding (see the module's invariants).
struct Listener {
    maps: Arc<Maps>,
}

impl ExtentListener for Listener {
    fn extents_changed(&self, change: &ExtentChange) {
        let mut registry = self.maps.registry();
        let Some(entry) = registry.get_mut(&change.ino) else {
            return;
        };
        entry.changes += 1;
        let frees = matches!(
            change.kind,
            ChangeKind::Truncate | ChangeKind::Punch | ChangeKind::Delete | ChangeKind::Relocate
        );
        if !frees || change.generation <= entry.latest_generation {
            return;
        }
        entry.latest_generation = change.generation;
        let key = FileKey { ino: change.ino };
        let bumped = match self.maps.files.get::<FileKey, FileInfo>(&key) {
            Ok(Some(info)) => self.maps.files.set(
                &key,
                &FileInfo {
                    generation: change.generation,
                    ..info
                },
                sys::BPF_EXIST,
            ),
            Ok(None) => Ok(()),
            Err(err) => Err(err),
        };
        if let Err(err) = bumped {
            // The entry must not keep the old generation: without it, chains get
            // NOT_REGISTERED until the file is published again.
            log::error!(
                "inode {}: cannot bump the generation ({err}); removing it",
                change.ino
            );
            if let Err(err) = self.maps.files.delete(&key) {
                log::error!("inode {}: cannot remove it either: {err}", change.ino);
            }
        }
    }
}

/// A program bound into the driver, loaded, ready to run chains: the driver's single-chain
/// and batch programs, each linked with the application's `next`.
#[derive(Debug)]
pub struct BoundProgram {
    name: String,
    program: SyscallProgram,
    batch: SyscallProgram,
}

impl BoundProgram {
    /// The program's name (its pin name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Instructions of the single-chain program after linking, if this process loaded it.
    pub fn insn_count(&self) -> Option<usize> {
        self.program.insn_count()
    }

    /// The single-chain program.
    pub fn chain_program(&self) -> &SyscallProgram {
        &self.program
    }
}

/// One chain to run.
#[derive(Debug, Clone)]
pub struct ChainRequest {
    /// Inodes of the files the chain may read (1..=MAX_CHAIN_FILES).
    pub files: Vec<u64>,
    /// Index in `files` of the first hop's file.
    pub start_file: u32,
    /// Byte offset of the first hop.
    pub start: u64,
    /// Bytes copied per hop (1..=BLOCK_SIZE, clipped at the end of the block).
    pub read_len: u32,
    /// Hops at most (clamped to MAX_HOPS).
    pub hop_limit: u32,
    /// The application's scratch.
    pub scratch: [u8; SCRATCH_SIZE],
    /// The (uid, gid) the policy is checked for; honoured only when this process is the
    /// policy's registered speaker (the mount daemon), else the caller's own ids count.
    pub subject: Option<(u32, u32)>,
}

impl ChainRequest {
    /// A chain over one file from `start`, reading whole blocks, with `scratch`.
    pub fn new(ino: u64, start: u64, scratch: &[u8]) -> Self {
        let mut request = Self {
            files: vec![ino],
            start_file: 0,
            start,
            read_len: BLOCK_SIZE as u32,
            hop_limit: MAX_HOPS,
            scratch: [0; SCRATCH_SIZE],
            subject: None,
        };
        let len = scratch.len().min(SCRATCH_SIZE);
        request.scratch[..len].copy_from_slice(&scratch[..len]);
        request
    }
}

/// What a chain returned.
#[derive(Debug, Clone)]
pub struct ChainOutcome {
    /// A `status::*` value.
    pub status: i32,
    /// Hops taken by the last attempt.
    pub hops: u32,
    /// The scratch as `next` left it (only when `status` is DONE; else the request's).
    pub scratch: [u8; SCRATCH_SIZE],
    /// Attempts repeated because a file changed (STALE) or was not yet published.
    pub retries: u32,
}

/// Whom a policy grant is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    Uid(u32),
    Gid(u32),
    /// A cgroup, by id (the inode number of its directory in the cgroup2 mount).
    Cgroup(u64),
}

/// One grant of the kernel policy: `subject` may run chains over `ino`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyEntry {
    pub subject: Subject,
    pub ino: u64,
    pub grant: PolicyGrant,
}

impl PolicyEntry {
    fn key(&self) -> PolicyKey {
        let (kind, id) = match self.subject {
            Subject::Uid(uid) => (SUBJECT_UID, u64::from(uid)),
            Subject::Gid(gid) => (SUBJECT_GID, u64::from(gid)),
            Subject::Cgroup(id) => (SUBJECT_CGROUP, id),
        };
        PolicyKey {
            kind,
            _pad: 0,
            id,
            ino: self.ino,
        }
    }
}

/// One lookup of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchItem {
    /// Index in the batch's files of the first hop's file.
    pub start_file: u32,
    /// Byte offset of the first hop.
    pub start: u64,
    /// The first BATCH_SCRATCH_SIZE bytes of the lookup's scratch.
    pub scratch: [u8; BATCH_SCRATCH_SIZE],
}

impl BatchItem {
    /// A lookup from `start` in the first file with `scratch` (at most 32 bytes).
    pub fn new(start: u64, scratch: &[u8]) -> Self {
        let mut item = Self {
            start_file: 0,
            start,
            scratch: [0; BATCH_SCRATCH_SIZE],
        };
        let len = scratch.len().min(BATCH_SCRATCH_SIZE);
        item.scratch[..len].copy_from_slice(&scratch[..len]);
        item
    }
}

/// How to run a batch.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    /// Inodes of the files the lookups may read.
    pub files: Vec<u64>,
    /// Bytes copied per hop.
    pub read_len: u32,
    /// Hops at most per lookup.
    pub hop_limit: u32,
    /// Never wait for the disk inside the kernel: lookups that need a block not in memory
    /// stop; the binding reads all such blocks of the batch concurrently, then runs those
    /// lookups again (DESIGN "Batches"). Pays off on cold data.
    pub overlap_misses: bool,
    /// As [`ChainRequest::subject`].
    pub subject: Option<(u32, u32)>,
}

impl BatchRequest {
    /// Whole-block reads over one file, the hop limit at its maximum, faults waited for.
    pub fn new(ino: u64) -> Self {
        Self {
            files: vec![ino],
            read_len: BLOCK_SIZE as u32,
            hop_limit: MAX_HOPS,
            overlap_misses: false,
            subject: None,
        }
    }
}

/// What one lookup of a batch returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    pub status: i32,
    pub hops: u32,
    /// The scratch as `next` left it (DONE), else as given.
    pub scratch: [u8; BATCH_SCRATCH_SIZE],
}

/// Counters of a batch run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounters {
    /// Calls into the kernel.
    pub calls: u32,
    /// Blocks read in by user space between calls (overlapped mode).
    pub prefetched: u32,
    /// Lookups repeated because a file changed.
    pub retries: u32,
}

/// Chain statistics summed over CPUs (see `exofs_abi::chain::stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub chains: u64,
    pub hops: u64,
    pub done: u64,
    pub stale: u64,
    pub rejected: u64,
    pub denied: u64,
    pub aborted: u64,
}

/// The binding of one file system (see the module documentation).
pub struct Binding {
    fs: Arc<Fs>,
    maps: Arc<Maps>,
    listener: Arc<dyn ExtentListener>,
    mapping: DeviceMapping,
    /// `<bpffs>/exofs/<uuid>` when pinning.
    pin_dir: Option<PathBuf>,
    programs: Mutex<BTreeMap<String, Arc<BoundProgram>>>,
}

impl std::fmt::Debug for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binding")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

/// The pin directory of the file system with `uuid` under `bpffs`.
pub fn pin_dir(bpffs: &Path, uuid: [u8; 16]) -> PathBuf {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    bpffs.join("exofs").join(hex)
}

/// Mounts bpffs at `path` unless one is mounted there already.
fn ensure_bpffs(path: &Path) -> Result<()> {
    let is_bpffs = nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::FsType(BPF_FS_MAGIC as _))
        .unwrap_or(false);
    if is_bpffs {
        return Ok(());
    }
    fs::create_dir_all(path).map_err(io_error(path))?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| BindingError::Io {
        path: path.to_owned(),
        source: std::io::Error::from_raw_os_error(errno as i32),
    })
}

/// The pin of a program's batch variant: `<pin dir>/batch/<name>` for `progs/<name>`.
fn batch_pin(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default();
    let pin_dir = path.parent().and_then(Path::parent).unwrap_or(path);
    pin_dir.join(BATCH_PIN_DIR).join(name)
}

fn check_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(BindingError::BadName(name.to_owned()))
    }
}

impl Binding {
    /// Opens the binding of `fs`: the pinned maps of an earlier process if there are any,
    /// else new maps (pinned if `options.pin`). Needs CAP_BPF + CAP_PERFMON (root), and
    /// CAP_SYS_ADMIN to mount bpffs.
    pub fn open(fs: Arc<Fs>, options: &BindingOptions) -> Result<Self> {
        let pin_dir = if options.pin {
            ensure_bpffs(&options.bpffs)?;
            Some(pin_dir(&options.bpffs, fs.uuid()))
        } else {
            None
        };
        let maps_dir = pin_dir.as_ref().map(|dir| dir.join("maps"));
        let mut linker = Linker::parse(crate::DRIVER_ELF, &[(SYSCALL_SECTION, ALIAS_SECTION)])?;
        let mut all = BTreeMap::new();
        for (name, definition) in linker.take_maps() {
            let pinned = PINNED_MAPS
                .iter()
                .find(|(driver, _)| *driver == name)
                .and_then(|(_, pin)| maps_dir.as_ref().map(|dir| dir.join(pin)))
                .filter(|path| path.exists());
            let handle = match &pinned {
                Some(path) => MapHandle::open_pinned(path, &name, &definition)?,
                None => MapHandle::create(&name, &definition)?,
            };
            all.insert(name, handle);
        }
        drop(linker);
        let take = |all: &mut BTreeMap<String, MapHandle>, name: &str| {
            all.remove(name)
                .ok_or_else(|| LoadError::Elf(format!("the driver has no map {name}")))
        };
        let files = take(&mut all, MAP_FILES)?;
        let extents = take(&mut all, MAP_EXTENTS)?;
        let stats_map = take(&mut all, stats::MAP_STATS)?;
        let policy = take(&mut all, MAP_POLICY)?;
        let maps = Arc::new(Maps {
            files,
            extents,
            policy,
            stats: stats_map,
            all,
            registry: Mutex::new(HashMap::new()),
        });
        // Map first: a failure must not leave a listener subscribed with no binding.
        let mapping = DeviceMapping::map(&fs)?;
        let listener: Arc<dyn ExtentListener> = Arc::new(Listener { maps: maps.clone() });
        fs.subscribe(listener.clone());
        Ok(Self {
            fs,
            maps,
            listener,
            mapping,
            pin_dir,
            programs: Mutex::new(BTreeMap::new()),
        })
    }

    /// Replaces the device mapping with a fresh one: its pages are no longer mapped here,
    /// so dropping the page cache afterwards really makes the next chains cold.
    pub fn remap(&mut self) -> Result<()> {
        self.mapping = DeviceMapping::map(&self.fs)?;
        Ok(())
    }

    /// The file system.
    pub fn fs(&self) -> &Arc<Fs> {
        &self.fs
    }

    /// The pin directory, if pinning.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    fn programs(&self) -> MutexGuard<'_, BTreeMap<String, Arc<BoundProgram>>> {
        self.programs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pins the shared maps (before the first program is pinned) where they are not.
    fn ensure_map_pins(&self) -> Result<()> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        for sub in ["maps", "progs", BATCH_PIN_DIR] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(io_error(&path))?;
        }
        for (driver_name, pin) in PINNED_MAPS {
            let path = dir.join("maps").join(pin);
            if !path.exists() {
                let handle = match *driver_name {
                    MAP_FILES => &self.maps.files,
                    MAP_EXTENTS => &self.maps.extents,
                    MAP_POLICY => &self.maps.policy,
                    _ => &self.maps.stats,
                };
                handle.pin(&path)?;
            }
        }
        Ok(())
    }

    fn prog_pin(&self, name: &str) -> Option<PathBuf> {
        self.pin_dir
            .as_ref()
            .map(|dir| dir.join("progs").join(name))
    }

    /// Links the application object `app_elf` into the driver, loads the result and (when
    /// pinning) pins it as `progs/<name>`.
    pub fn bind(&self, name: &str, app_elf: &[u8]) -> Result<Arc<BoundProgram>> {
        check_name(name)?;
        let pin = self.prog_pin(name);
        if self.programs().contains_key(name) || pin.as_ref().is_some_and(|p| p.exists()) {
            return Err(BindingError::Exists(name.to_owned()));
        }
        let app = binder::extract(app_elf)?;
        let mut driver = Linker::parse(crate::DRIVER_ELF, &[(SYSCALL_SECTION, ALIAS_SECTION)])?;
        let definitions = driver.take_maps();
        let mut relocations = Vec::new();
        for (map_name, definition) in &definitions {
            let handle = match map_name.as_str() {
                MAP_FILES => &self.maps.files,
                MAP_EXTENTS => &self.maps.extents,
                MAP_POLICY => &self.maps.policy,
                stats::MAP_STATS => &self.maps.stats,
                other => self.maps.all.get(other).ok_or_else(|| {
                    LoadError::Elf(format!("the driver's map {other} was not created"))
                })?,
            };
            relocations.push((map_name.as_str(), handle.as_fd().as_raw_fd(), definition));
        }
        driver.relocate(relocations.into_iter())?;
        let license = driver.linked(CHAIN_PROGRAM)?.license;
        let insns = binder::link_into_driver(&driver, CHAIN_PROGRAM, &app)?;
        let program = SyscallProgram::load_insns(name, &insns, &license)?;
        let insns = binder::link_into_driver(&driver, BATCH_PROGRAM, &app)?;
        let batch = SyscallProgram::load_insns(name, &insns, &license)?;
        if let Some(path) = &pin {
            self.ensure_map_pins()?;
            program.pin(path)?;
            let batch_path = batch_pin(path);
            if let Err(err) = batch.pin(&batch_path) {
                let _ = fs::remove_file(path);
                return Err(err.into());
            }
        }
        let bound = Arc::new(BoundProgram {
            name: name.to_owned(),
            program,
            batch,
        });
        self.programs().insert(name.to_owned(), bound.clone());
        Ok(bound)
    }

    /// The program bound as `name`, by this process or pinned by another.
    pub fn program(&self, name: &str) -> Result<Arc<BoundProgram>> {
        check_name(name)?;
        if let Some(bound) = self.programs().get(name) {
            return Ok(bound.clone());
        }
        let Some(path) = self.prog_pin(name).filter(|path| path.exists()) else {
            return Err(BindingError::NoProgram(name.to_owned()));
        };
        let bound = Arc::new(BoundProgram {
            name: name.to_owned(),
            program: SyscallProgram::from_pin(&path, name)?,
            batch: SyscallProgram::from_pin(&batch_pin(&path), name)?,
        });
        self.programs().insert(name.to_owned(), bound.clone());
        Ok(bound)
    }

    /// Names of the bound programs (pinned ones included).
    pub fn program_names(&self) -> Result<Vec<String>> {
        let mut names: BTreeSet<String> = self.programs().keys().cloned().collect();
        if let Some(dir) = self.pin_dir.as_ref().map(|dir| dir.join("progs")) {
            if dir.exists() {
                for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
                    let entry = entry.map_err(io_error(&dir))?;
                    names.insert(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Unbinds `name`: removes its pin. The last program's unload removes the maps' pins
    /// and the directory too.
    pub fn unload(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let had = self.programs().remove(name).is_some();
        let pinned = match self.prog_pin(name) {
            Some(path) if path.exists() => {
                fs::remove_file(&path).map_err(io_error(&path))?;
                let batch = batch_pin(&path);
                if batch.exists() {
                    fs::remove_file(&batch).map_err(io_error(&batch))?;
                }
                true
            }
            _ => false,
        };
        if !had && !pinned {
            return Err(BindingError::NoProgram(name.to_owned()));
        }
        self.remove_pins_if_unused()
    }

    /// Removes every pin if no program is pinned any more.
    fn remove_pins_if_unused(&self) -> Result<()> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        let progs = dir.join("progs");
        if progs.exists()
            && fs::read_dir(&progs)
                .map_err(io_error(&progs))?
                .next()
                .is_some()
        {
            return Ok(());
        }
        for (_, pin) in PINNED_MAPS {
            let path = dir.join("maps").join(pin);
            if path.exists() {
                fs::remove_file(&path).map_err(io_error(&path))?;
            }
        }
        for sub in ["maps", "progs", BATCH_PIN_DIR] {
            let path = dir.join(sub);
            if path.exists() {
                fs::remove_dir(&path).map_err(io_error(&path))?;
            }
        }
        if dir.exists() {
            fs::remove_dir(dir).map_err(io_error(dir))?;
        }
        if let Some(parent) = dir.parent() {
            // The shared `exofs` directory goes when the last file system's does.
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }

    /// Registers `ino` (publishing its extents) and returns what a chain names it by.
    pub fn register(&self, ino: u64) -> Result<ChainFile> {
        self.maps.registry().entry(ino).or_default();
        self.publish(ino)
    }

    /// Registers the files of a chain or batch (1..=MAX_CHAIN_FILES of them), in context
    /// order.
    fn register_all(&self, inos: &[u64]) -> Result<[ChainFile; MAX_CHAIN_FILES]> {
        if inos.is_empty() || inos.len() > MAX_CHAIN_FILES {
            return Err(BindingError::Invalid(format!(
                "a chain or batch names 1..={MAX_CHAIN_FILES} files, not {}",
                inos.len()
            )));
        }
        let mut files = [ChainFile::default(); MAX_CHAIN_FILES];
        for (slot, ino) in inos.iter().enumerate() {
            files[slot] = self.register(*ino)?;
        }
        Ok(files)
    }

    /// After a STALE or NOT_REGISTERED chain: publish these files again before the next
    /// attempt (whatever changed was reported, and a file removed from the map behind our
    /// back must come back).
    fn publish_again(&self, inos: &[u64]) {
        let mut registry = self.maps.registry();
        for ino in inos {
            if let Some(entry) = registry.get_mut(ino) {
                entry.published_changes = None;
            }
        }
    }

    /// Publishes the current extents of a registered file, unless they are current.
    fn publish(&self, ino: u64) -> Result<ChainFile> {
        loop {
            let changes = {
                let registry = self.maps.registry();
                let entry = registry.get(&ino).ok_or_else(|| {
                    BindingError::Invalid(format!("inode {ino} is not registered"))
                })?;
                if entry.is_current() {
                    return Ok(ChainFile {
                        ino,
                        generation: entry.published_generation,
                    });
                }
                entry.changes
            };
            let (extents, attr) = match self.fs.extent_snapshot(ino) {
                Ok(snapshot) => snapshot,
                Err(err) => {
                    self.unregister(ino)?;
                    return Err(err.into());
                }
            };
            let chunked = extent_map::chunk(&extents)
                .map_err(|source| BindingError::Chunk { ino, source })?;
            let mut registry = self.maps.registry();
            let Some(entry) = registry.get_mut(&ino) else {
                continue;
            };
            if entry.changes != changes || attr.generation < entry.latest_generation {
                // A change raced with the snapshot: read it again.
                continue;
            }
            for (chunk, value) in &chunked.chunks {
                self.maps
                    .extents
                    .set(&ExtentKey { ino, chunk: *chunk }, value, sys::BPF_ANY)?;
            }
            let info = FileInfo {
                generation: attr.generation,
                size: attr.size,
                chunk_shift: chunked.chunk_shift,
                flags: 0,
            };
            self.maps.files.set(&FileKey { ino }, &info, sys::BPF_ANY)?;
            let new_chunks: BTreeSet<u64> = chunked.chunks.keys().copied().collect();
            for stale in entry.chunks.difference(&new_chunks) {
                self.maps
                    .extents
                    .delete(&ExtentKey { ino, chunk: *stale })?;
            }
            entry.chunks = new_chunks;
            entry.published_changes = Some(changes);
            entry.published_generation = attr.generation;
            entry.latest_generation = attr.generation;
            return Ok(ChainFile {
                ino,
                generation: attr.generation,
            });
        }
    }

    /// Removes `ino` from the maps.
    pub fn unregister(&self, ino: u64) -> Result<()> {
        let mut registry = self.maps.registry();
        if let Some(entry) = registry.remove(&ino) {
            self.maps.remove(ino, &entry.chunks)?;
        }
        Ok(())
    }

    /// Runs one chain of `program`, re-publishing and retrying (up to 8 attempts) when a
    /// file changed under it.
    pub fn run(&self, program: &BoundProgram, request: &ChainRequest) -> Result<ChainOutcome> {
        self.run_attempts(program, request, MAX_ATTEMPTS)
    }

    /// Runs one chain once: a STALE status comes back to the caller (who may run it again;
    /// the binding re-publishes the file first).
    pub fn run_once(&self, program: &BoundProgram, request: &ChainRequest) -> Result<ChainOutcome> {
        self.run_attempts(program, request, 1)
    }

    fn run_attempts(
        &self,
        program: &BoundProgram,
        request: &ChainRequest,
        attempts: u32,
    ) -> Result<ChainOutcome> {
        let (map_addr, map_len) = self.mapping.range();
        let mut retries = 0;
        loop {
            let mut ctx = ChainCtx {
                files: self.register_all(&request.files)?,
                ..ChainCtx::default()
            };
            ctx.file_count = request.files.len() as u32;
            ctx.start_file = request.start_file;
            ctx.start_offset = request.start;
            ctx.read_len = request.read_len;
            ctx.hop_limit = request.hop_limit;
            ctx.map_addr = map_addr;
            ctx.map_len = map_len;
            ctx.scratch = request.scratch;
            if let Some((uid, gid)) = request.subject {
                (ctx.subject_uid, ctx.subject_gid) = (uid, gid);
            }
            {
                let _pin = self.fs.pin_epoch();
                program.program.test_run_pod(&mut ctx)?;
            }
            let again = matches!(ctx.status, status::STALE | status::NOT_REGISTERED);
            if again {
                self.publish_again(&request.files);
            }
            if !again || retries + 1 >= attempts {
                return Ok(ChainOutcome {
                    status: ctx.status,
                    hops: ctx.hops,
                    scratch: ctx.scratch,
                    retries,
                });
            }
            retries += 1;
        }
    }

    /// Runs `items` as batches of up to MAX_BATCH lookups per call. Lookups that find a
    /// file changed are run again (up to 8 times); with `overlap_misses`, lookups stopped
    /// by a block not in memory are run again once all such blocks are read in.
    pub fn run_batch(
        &self,
        program: &BoundProgram,
        request: &BatchRequest,
        items: &[BatchItem],
    ) -> Result<(Vec<BatchOutcome>, BatchCounters)> {
        let mut outcomes: Vec<BatchOutcome> = items
            .iter()
            .map(|item| BatchOutcome {
                status: status::INVALID,
                hops: 0,
                scratch: item.scratch,
            })
            .collect();
        let mut counters = BatchCounters::default();
        let mut pending: Vec<usize> = (0..items.len()).collect();
        let mut stale_rounds = 0;
        let (map_addr, map_len) = self.mapping.range();
        while !pending.is_empty() {
            let files = self.register_all(&request.files)?;
            let mut missing: Vec<u64> = Vec::new();
            let mut again: Vec<usize> = Vec::new();
            let mut stale = false;
            for group in pending.chunks(MAX_BATCH) {
                let mut ctx = BatchCtx {
                    files,
                    file_count: request.files.len() as u32,
                    hop_limit: request.hop_limit,
                    read_len: request.read_len,
                    count: group.len() as u32,
                    map_addr,
                    map_len,
                    flags: if request.overlap_misses {
                        BATCH_NO_FAULT
                    } else {
                        0
                    },
                    ..BatchCtx::default()
                };
                for (slot, index) in group.iter().enumerate() {
                    let item = &items[*index];
                    ctx.lookups[slot].start_file = item.start_file;
                    ctx.lookups[slot].start_offset = item.start;
                    ctx.lookups[slot].scratch = item.scratch;
                }
                {
                    let _pin = self.fs.pin_epoch();
                    let ret = program.batch.test_run_pod(&mut ctx)?;
                    if ret as i32 == status::DENIED {
                        for index in group {
                            outcomes[*index].status = status::DENIED;
                        }
                        counters.calls += 1;
                        continue;
                    }
                    if ret as i32 != status::DONE {
                        return Err(BindingError::Invalid(format!(
                            "the batch program refused the batch (status {})",
                            ret as i32
                        )));
                    }
                }
                counters.calls += 1;
                for (slot, index) in group.iter().enumerate() {
                    let lookup = &ctx.lookups[slot];
                    outcomes[*index] = BatchOutcome {
                        status: lookup.status,
                        hops: lookup.hops,
                        scratch: lookup.scratch,
                    };
                    match lookup.status {
                        status::MISSING => {
                            missing.push(lookup.missing);
                            again.push(*index);
                        }
                        status::STALE | status::NOT_REGISTERED => {
                            stale = true;
                            again.push(*index);
                        }
                        _ => {}
                    }
                }
            }
            if stale {
                stale_rounds += 1;
                counters.retries += again.len() as u32;
                if stale_rounds >= MAX_ATTEMPTS {
                    break;
                }
                self.publish_again(&request.files);
            }
            missing.sort_unstable();
            missing.dedup();
            counters.prefetched += missing.len() as u32;
            self.mapping.bring_in(&self.fs, &missing)?;
            pending = again;
        }
        Ok((outcomes, counters))
    }

    /// Replaces the kernel policy: enforcement on (every chain denied unless each of its
    /// files has a grant for the subject), exactly `entries`, and `speaker`, the process
    /// allowed to name the subject of its chains (the mount daemon). The mode entry goes
    /// in first and old grants go before new ones are added, so a reload is never more
    /// permissive than either policy.
    pub fn load_policy(&self, entries: &[PolicyEntry], speaker: Option<u32>) -> Result<()> {
        let map = &self.maps.policy;
        map.set(&MODE_KEY, &PolicyGrant::default(), sys::BPF_ANY)?;
        let mut wanted: HashMap<PolicyKey, PolicyGrant> = entries
            .iter()
            .map(|entry| (entry.key(), entry.grant))
            .collect();
        if let Some(pid) = speaker {
            let key = PolicyKey {
                kind: KIND_SPEAKER,
                _pad: 0,
                id: u64::from(pid),
                ino: 0,
            };
            wanted.insert(key, PolicyGrant::default());
        }
        wanted.insert(MODE_KEY, PolicyGrant::default());
        for key in map.keys::<PolicyKey>()? {
            if !wanted.contains_key(&key) {
                map.delete(&key)?;
            }
        }
        for (key, grant) in &wanted {
            map.set(key, grant, sys::BPF_ANY)?;
        }
        Ok(())
    }

    /// Removes the kernel policy: chains are open again (a privileged application's own).
    pub fn clear_policy(&self) -> Result<()> {
        let map = &self.maps.policy;
        for key in map.keys::<PolicyKey>()? {
            if key != MODE_KEY {
                map.delete(&key)?;
            }
        }
        map.delete(&MODE_KEY)?;
        Ok(())
    }

    /// The statistics map, summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        let mut counts = [0u64; stats::COUNT as usize];
        for (index, count) in counts.iter_mut().enumerate() {
            *count = self.maps.stats.sum_percpu_u64(index as u32)?;
        }
        Ok(Stats {
            chains: counts[stats::CHAINS as usize],
            hops: counts[stats::HOPS as usize],
            done: counts[stats::DONE as usize],
            stale: counts[stats::STALE as usize],
            rejected: counts[stats::REJECTED as usize],
            denied: counts[stats::DENIED as usize],
            aborted: counts[stats::ABORTED as usize],
        })
    }

    /// Unregisters every file, stops listening, and removes the pins if no program is
    /// pinned. Also done on drop (where errors can only be logged).
    pub fn close(self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&self) -> Result<()> {
        self.fs.unsubscribe(&self.listener);
        let entries: Vec<(u64, BTreeSet<u64>)> = self
            .maps
            .registry()
            .drain()
            .map(|(ino, entry)| (ino, entry.chunks))
            .collect();
        for (ino, chunks) in entries {
            self.maps.remove(ino, &chunks)?;
        }
        self.remove_pins_if_unused()
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            log::error!("closing the kernel binding: {err}");
        }
    }
}

/// A bound program together with its binding: what libfs's `File::chain` runs.
#[derive(Debug, Clone, Copy)]
pub struct Bound<'a> {
    pub binding: &'a Binding,
    pub program: &'a BoundProgram,
}

impl Binding {
    /// `program` ready for [`libfs::File::chain`].
    pub fn with<'a>(&'a self, program: &'a BoundProgram) -> Bound<'a> {
        Bound {
            binding: self,
            program,
        }
    }
}

fn to_fs_error(err: BindingError) -> libfs::Error {
    match err {
        BindingError::Fs(err) => err,
        other => libfs::Error::Io(std::io::Error::other(other.to_string())),
    }
}

impl libfs::ChainProgram for Bound<'_> {
    fn chain(&self, ino: u64, start: u64, scratch: &mut [u8]) -> libfs::Result<libfs::ChainResult> {
        if scratch.len() > SCRATCH_SIZE {
            return Err(libfs::Error::Invalid(format!(
                "a chain's scratch is at most {SCRATCH_SIZE} bytes, not {}",
                scratch.len()
            )));
        }
        let request = ChainRequest::new(ino, start, scratch);
        let outcome = self
            .binding
            .run(self.program, &request)
            .map_err(to_fs_error)?;
        if outcome.status == status::DONE {
            scratch.copy_from_slice(&outcome.scratch[..scratch.len()]);
        }
        Ok(libfs::ChainResult {
            status: outcome.status,
            hops: outcome.hops,
        })
    }

    fn chain_batch(
        &self,
        ino: u64,
        lookups: &mut [libfs::ChainLookup],
    ) -> libfs::Result<Vec<libfs::ChainResult>> {
        if let Some(long) = lookups
            .iter()
            .find(|l| l.scratch.len() > BATCH_SCRATCH_SIZE)
        {
            return Err(libfs::Error::Invalid(format!(
                "a batched lookup's scratch is at most {BATCH_SCRATCH_SIZE} bytes, not {}",
                long.scratch.len()
            )));
        }
        let items: Vec<BatchItem> = lookups
            .iter()
            .map(|lookup| BatchItem::new(lookup.start, &lookup.scratch))
            .collect();
        let (outcomes, _) = self
            .binding
            .run_batch(self.program, &BatchRequest::new(ino), &items)
            .map_err(to_fs_error)?;
        Ok(lookups
            .iter_mut()
            .zip(outcomes)
            .map(|(lookup, outcome)| {
                if outcome.status == status::DONE {
                    let len = lookup.scratch.len();
                    lookup.scratch.copy_from_slice(&outcome.scratch[..len]);
                }
                libfs::ChainResult {
                    status: outcome.status,
                    hops: outcome.hops,
                }
            })
            .collect())
    }
}
