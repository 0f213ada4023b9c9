//! The binding: the driver's maps for one file system, the files registered in them, the
//! programs bound to them, and the chain runner.
//!
//! Layer: kernel-ext, top. Used by mount-tool (`exofs prog|chain|stats`, the mount
//! daemon) and by linked applications (through libfs's `File::chain`).
//!
//! Interface: [`Binding::open`] opens the file system's [`Store`] (its maps under
//! `<bpffs>/exofs/<fs-uuid>/maps/`, created or, if pinned by an earlier process, opened);
//! through it, `bind` links an application object into the driver ([`crate::binder`]),
//! loads it and pins it as `progs/<name>` (and its batch variant as `batch/<name>`);
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
//!   are pinned (`exofs prog load`) or a holder keeps them (the mount daemon, see
//!   [`Store::hold`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use exofs_abi::chain::{
    status, BatchCtx, ChainCtx, ChainFile, BATCH_SCRATCH_SIZE, BLOCK_SIZE, MAX_BATCH,
    MAX_CHAIN_FILES, MAX_HOPS, NO_FAULT, SCRATCH_SIZE, SUBJECT_NAMED,
};
use exofs_abi::extents::{ExtentKey, FileInfo, FileKey};
use libfs::{ChangeKind, ExtentChange, ExtentListener, Fs};

use crate::binder::BindError;
use crate::extent_map::{self, ChunkError};
use crate::hot::{Filler, HotTable, HotWrites};
use crate::loader::LoadError;
use crate::store::Maps;
pub use crate::store::{pin_dir, BoundProgram, PolicyEntry, Stats, Store, Subject, DEFAULT_BPFFS};
use crate::sys::{self, SysError};

/// Attempts of one chain when it finds a file stale or unregistered (re-publishing it
/// in between).
const MAX_ATTEMPTS: u32 = 8;
/// Misses one chain (or lookup) may have: past them it runs with faults allowed (a
/// single chain) or ends as MISSING (a batch), so that a block that keeps going out of
/// memory under a tight budget cannot keep it going for ever.
const MAX_MISSES: u32 = 4 * MAX_HOPS;
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
    #[error("{0}: not pinned; is the file system mounted (`exofs mount`)?")]
    NotPinned(PathBuf),
    #[error("invalid chain: {0}")]
    Invalid(String),
    #[error("registering as the daemon: {0}")]
    Register(&'static str),
    #[error("the device mapping serves direct chains and cannot be replaced")]
    Serving,
    #[error("the hot-block table: {0}")]
    Hot(String),
    #[error("{0}: another mount daemon holds these pins (a mount of the same file system, or of a copy with its uuid); unmount it first")]
    Held(PathBuf),
    #[error("{0}: not a directory owned by this user; remove it (someone else may have made it to plant pins)")]
    NotPrivate(PathBuf),
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

mod mapping;
mod pipeline;

pub use mapping::DeviceMapping;

pub(crate) type Result<T, E = BindingError> = std::result::Result<T, E>;

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BindingError + '_ {
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
    /// Bytes of blocks the hot-block table holds (`crate::hot`), when this binding
    /// creates the maps; a table is filled only by a daemon that serves it
    /// ([`Binding::serve_hot`]). 0 makes a table of one slot, never filled.
    pub hot_bytes: u64,
}

impl Default for BindingOptions {
    fn default() -> Self {
        Self {
            pin: true,
            bpffs: PathBuf::from(DEFAULT_BPFFS),
            hot_bytes: 0,
        }
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

/// The subject the mount daemon names for a chain it runs on behalf of a FUSE caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamedSubject {
    pub uid: u32,
    pub gid: u32,
    /// The cgroup id (0: none).
    pub cgroup: u64,
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
    /// The subject the policy is checked for; honoured only when this process is the
    /// policy's registered speaker (the mount daemon), else the caller's own ids count.
    pub subject: Option<NamedSubject>,
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
    pub subject: Option<NamedSubject>,
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

/// Where a lookup of a batch runs from: its item, or the hop a miss stopped it at.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    start_file: u32,
    start: u64,
    hop: u32,
    scratch: [u8; BATCH_SCRATCH_SIZE],
    /// The block (device offset) the lookup may wait for, having just been read into the
    /// page cache; u64::MAX for none.
    wait: u64,
    /// For a lookup resumed after a miss: the files (with their generations) it ran
    /// over. It may resume only over the same ones; see [`Cursor::over`].
    files: Option<[ChainFile; MAX_CHAIN_FILES]>,
}

impl From<&BatchItem> for Cursor {
    fn from(item: &BatchItem) -> Self {
        Self {
            start_file: item.start_file,
            start: item.start,
            hop: 0,
            scratch: item.scratch,
            wait: u64::MAX,
            files: None,
        }
    }
}

impl Cursor {
    /// This cursor, to run over `files` as registered now. A lookup stopped by a miss
    /// resumes at its hop only if no file changed since: its scratch holds offsets read
    /// from the old file, which the driver would otherwise follow in the new one (under
    /// the new generation it has no reason to say STALE). Otherwise the lookup starts
    /// again from its item.
    fn over(self, files: &[ChainFile; MAX_CHAIN_FILES], item: &BatchItem) -> Self {
        match self.files {
            Some(resumed) if resumed != *files => Cursor::from(item),
            _ => self,
        }
    }
}

/// One lookup as a batch call left it.
#[derive(Debug, Clone, Copy)]
struct CalledLookup {
    outcome: BatchOutcome,
    /// With status MISSING: the device offset of the block that was not in memory, and
    /// where to run the lookup from once it is in (allowed to wait for that block).
    missing: u64,
    resume: Cursor,
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

/// The binding of one file system (see the module documentation): its [`Store`] (maps and
/// programs, reached through `Deref`), the file system, and the device mapping chains read.
pub struct Binding {
    store: Store,
    fs: Arc<Fs>,
    listener: Arc<dyn ExtentListener>,
    mapping: DeviceMapping,
    /// Whether direct chains read `mapping` (see [`Binding::serve_direct`]).
    serving: std::sync::atomic::AtomicBool,
    /// The hot-block table's filler, while this binding serves one
    /// ([`Binding::serve_hot`]).
    hot: std::sync::Mutex<Option<(Arc<HotTable>, Filler)>>,
}

impl std::ops::Deref for Binding {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.store
    }
}

impl std::fmt::Debug for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binding")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Binding {
    /// Opens the binding of `fs`: its [`Store`] (the pinned maps of an earlier process if
    /// there are any), a mapping of its device, and a listener for its changes. A
    /// read-write `fs` is this process's alone, so file entries left in the maps by a
    /// process that died are removed first. Needs CAP_BPF + CAP_PERFMON (root), and
    /// CAP_SYS_ADMIN to mount bpffs.
    pub fn open(fs: Arc<Fs>, options: &BindingOptions) -> Result<Self> {
        let store = Store::open(fs.uuid(), options)?;
        if !fs.is_read_only() {
            // Only with the pin directory's lock: the maps may be another holder's (a
            // mount of a copy of this image, with its uuid), which this must not clear.
            store.lock()?;
            store.clear_files()?;
        }
        // Map first: a failure must not leave a listener subscribed with no binding.
        let mapping = DeviceMapping::map(&fs)?;
        let listener: Arc<dyn ExtentListener> = Arc::new(Listener {
            maps: store.maps.clone(),
        });
        fs.subscribe(listener.clone());
        Ok(Self {
            store,
            fs,
            listener,
            mapping,
            serving: std::sync::atomic::AtomicBool::new(false),
            hot: std::sync::Mutex::new(None),
        })
    }

    /// Serves the hot-block table to direct chains (`crate::hot`): empties it, has
    /// `writes` (the device this binding's file system writes through) empty a block's
    /// slot after every write of it, and starts the thread that copies the blocks direct
    /// hops want into slots. Before [`Binding::serve_direct`]: no direct chain may read a
    /// slot left by an earlier daemon.
    pub fn serve_hot(&self, writes: &Arc<HotWrites>) -> Result<()> {
        if !std::ptr::addr_eq(Arc::as_ptr(self.fs.device()), Arc::as_ptr(writes)) {
            return Err(BindingError::Hot(
                "the file system does not write through the HotWrites given".into(),
            ));
        }
        if self.serving.load(std::sync::atomic::Ordering::Acquire) {
            return Err(BindingError::Serving);
        }
        let table = Arc::new(HotTable::open(self.store.maps.clone())?);
        // Writes empty slots from now on; then the table is emptied of whatever an
        // earlier daemon left; only then is it filled.
        writes
            .attach(table.clone())
            .map_err(|_| BindingError::Hot("this device already serves a table".into()))?;
        table.clear()?;
        let filler = Filler::start(table.clone(), self.fs.device().clone())
            .map_err(|err| BindingError::Hot(format!("starting its filler: {err}")))?;
        *self.hot.lock().unwrap_or_else(|p| p.into_inner()) = Some((table, filler));
        Ok(())
    }

    /// The hot-block table this binding serves, if any.
    pub fn hot_table(&self) -> Option<Arc<HotTable>> {
        self.hot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(table, _)| table.clone())
    }

    /// Makes this process the daemon of the binding's maps: the policy's speaker, and the
    /// process whose device mapping direct chains read (see `Store::register_daemon`).
    /// The mapping stays as it is from then on ([`Binding::remap`] is refused): a chain
    /// that read its address must never find something else there.
    pub fn serve_direct(&self) -> Result<()> {
        let (map_addr, map_len) = self.mapping.range();
        self.store.register_daemon(map_addr, map_len)?;
        self.serving
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Replaces the device mapping with a fresh one: its pages are no longer mapped here,
    /// so dropping the page cache afterwards really makes the next chains cold.
    pub fn remap(&mut self) -> Result<()> {
        if self.serving.load(std::sync::atomic::Ordering::Acquire) {
            return Err(BindingError::Serving);
        }
        self.mapping = DeviceMapping::map(&self.fs)?;
        Ok(())
    }

    /// The file system.
    pub fn fs(&self) -> &Arc<Fs> {
        &self.fs
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

    /// Runs the chain without waiting for the disk inside the kernel (NO_FAULT): a hop
    /// whose block is not in memory stops the chain (MISSING); the block is read into the
    /// page cache with one 4 KiB pread, and the chain resumes at that hop, allowed to wait
    /// for that block alone (a minor fault now): about what a pread of the block costs,
    /// plus a kernel call (docs/DESIGN.md "How a chain's misses are served"). Waiting
    /// for the disk inside the kernel instead (a fault in the chain) measured 0.71-0.91x
    /// pread per hop out of core here, against 0.81-0.99x this way, with a worse p99.
    /// Past MAX_MISSES misses (a budget so tight that blocks leave memory before they
    /// are used) the chain runs with faults allowed, so that it ends.
    fn run_attempts(
        &self,
        program: &BoundProgram,
        request: &ChainRequest,
        attempts: u32,
    ) -> Result<ChainOutcome> {
        self.settle()?;
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
            ctx.flags = NO_FAULT;
            let named = if let Some(subject) = request.subject {
                (ctx.subject_uid, ctx.subject_gid) = (subject.uid, subject.gid);
                ctx.subject_cgroup = subject.cgroup;
                SUBJECT_NAMED
            } else {
                0
            };
            ctx.flags |= named;
            let mut misses = 0;
            loop {
                {
                    let _pin = self.fs.pin_epoch();
                    program.program.test_run_pod(&mut ctx)?;
                }
                if ctx.status != status::MISSING {
                    break;
                }
                // The context now says where to resume, and `missing` names the block
                // the resumed chain may wait for.
                self.mapping.fetch(ctx.missing)?;
                misses += 1;
                if misses >= MAX_MISSES {
                    ctx.flags = named;
                }
            }
            let again = matches!(ctx.status, status::STALE | status::NOT_REGISTERED);
            if again {
                self.publish_again(&request.files);
            }
            if !again || retries + 1 >= attempts {
                // A chain that did not finish hands back the caller's scratch, not the
                // state of a resumed walk.
                let scratch = if ctx.status == status::DONE {
                    ctx.scratch
                } else {
                    request.scratch
                };
                return Ok(ChainOutcome {
                    status: ctx.status,
                    hops: ctx.hops,
                    scratch,
                    retries,
                });
            }
            retries += 1;
        }
    }

    /// Chains read the device through the mapping, past libfs: writes it accepted but
    /// has not made yet (its write-behind queue) must reach the file first.
    fn settle(&self) -> Result<()> {
        Ok(self.fs.device().settle().map_err(libfs::Error::from)?)
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
        let mut cursors: Vec<Cursor> = items.iter().map(Cursor::from).collect();
        let mut pending: Vec<usize> = (0..items.len()).collect();
        let mut stale_rounds = 0;
        let mut rounds = 0;
        self.settle()?;
        // Bounded: a block that keeps going out of memory under a tight budget ends its
        // lookup as MISSING rather than keep the batch going for ever.
        while !pending.is_empty() && rounds <= 4 * MAX_HOPS {
            rounds += 1;
            let files = self.register_all(&request.files)?;
            let mut missing: Vec<u64> = Vec::new();
            let mut again: Vec<usize> = Vec::new();
            let mut stale = false;
            for group in pending.chunks(MAX_BATCH) {
                let lookups: Vec<Cursor> = group
                    .iter()
                    .map(|index| cursors[*index].over(&files, &items[*index]))
                    .collect();
                let called = self.call_batch(program, request, &files, &lookups)?;
                counters.calls += 1;
                for (index, called) in group.iter().zip(called) {
                    outcomes[*index] = called.outcome;
                    match called.outcome.status {
                        status::DONE => {}
                        status::MISSING => {
                            missing.push(called.missing);
                            cursors[*index] = called.resume;
                            again.push(*index);
                        }
                        status::STALE | status::NOT_REGISTERED => {
                            stale = true;
                            cursors[*index] = Cursor::from(&items[*index]);
                            again.push(*index);
                        }
                        _ => {}
                    }
                    if called.outcome.status != status::DONE {
                        outcomes[*index].scratch = items[*index].scratch;
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
            // Each lookup then waits inside the kernel for its own block only (named in
            // its cursor) while the other reads go on. Measured against reading them all
            // with one io_uring submission and waiting in user space (then resuming with
            // minor faults): 25.6k against 20.5k lookups/s out of core, interleaved.
            self.mapping.read_ahead(&missing);
            pending = again;
        }
        Ok((outcomes, counters))
    }

    /// One kernel call of the batch program on up to MAX_BATCH `lookups` over `files`
    /// (registered): each lookup's outcome, and for MISSING the device offset of the
    /// block it lacked. A batch the kernel policy refuses comes back DENIED for all.
    fn call_batch(
        &self,
        program: &BoundProgram,
        request: &BatchRequest,
        files: &[ChainFile; MAX_CHAIN_FILES],
        lookups: &[Cursor],
    ) -> Result<Vec<CalledLookup>> {
        if lookups.is_empty() || lookups.len() > MAX_BATCH {
            return Err(BindingError::Invalid(format!(
                "a batch call runs 1..={MAX_BATCH} lookups, not {}",
                lookups.len()
            )));
        }
        let (map_addr, map_len) = self.mapping.range();
        let mut ctx = BatchCtx {
            files: *files,
            file_count: request.files.len() as u32,
            hop_limit: request.hop_limit,
            read_len: request.read_len,
            count: lookups.len() as u32,
            map_addr,
            map_len,
            flags: if request.overlap_misses { NO_FAULT } else { 0 },
            ..BatchCtx::default()
        };
        if let Some(subject) = request.subject {
            (ctx.subject_uid, ctx.subject_gid) = (subject.uid, subject.gid);
            ctx.subject_cgroup = subject.cgroup;
            ctx.flags |= SUBJECT_NAMED;
        }
        for (slot, cursor) in lookups.iter().enumerate() {
            ctx.lookups[slot].start_file = cursor.start_file;
            ctx.lookups[slot].start_offset = cursor.start;
            ctx.lookups[slot].start_hop = cursor.hop;
            ctx.lookups[slot].missing = cursor.wait;
            ctx.lookups[slot].scratch = cursor.scratch;
        }
        let ret = {
            let _pin = self.fs.pin_epoch();
            program.batch.test_run_pod(&mut ctx)?
        };
        if ret as i32 == status::DENIED {
            let denied = |cursor: &Cursor| CalledLookup {
                outcome: BatchOutcome {
                    status: status::DENIED,
                    hops: 0,
                    scratch: cursor.scratch,
                },
                missing: 0,
                resume: *cursor,
            };
            return Ok(lookups.iter().map(denied).collect());
        }
        if ret as i32 != status::DONE {
            return Err(BindingError::Invalid(format!(
                "the batch program refused the batch (status {})",
                ret as i32
            )));
        }
        Ok(ctx.lookups[..lookups.len()]
            .iter()
            .map(|lookup| CalledLookup {
                outcome: BatchOutcome {
                    status: lookup.status,
                    hops: lookup.hops,
                    scratch: lookup.scratch,
                },
                missing: lookup.missing,
                resume: Cursor {
                    start_file: lookup.start_file,
                    start: lookup.start_offset,
                    hop: lookup.start_hop,
                    scratch: lookup.scratch,
                    wait: lookup.missing,
                    files: Some(*files),
                },
            })
            .collect())
    }

    /// Unregisters every file, stops listening, and removes the pins if no program is
    /// pinned. Also done on drop (where errors can only be logged).
    pub fn close(self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&self) -> Result<()> {
        // No direct chain may read the mapping once it is gone: unregister first, then
        // put inaccessible memory where the mapping was (a hop that passed its check
        // before the unregistration may still be copying: it must fault, not find
        // whatever this process maps there next). `serving` is cleared only once that
        // is done, so a failure is tried again by the next shutdown (close, then drop).
        if self.serving.load(std::sync::atomic::Ordering::Acquire) {
            self.store.register_daemon(0, 0)?;
            self.mapping.retire()?;
            self.serving
                .store(false, std::sync::atomic::Ordering::Release);
        }
        // Stops the filler (its thread is joined), then empties the index: no later
        // daemon may find this one's slots.
        if let Some((table, filler)) = self.hot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            drop(filler);
            table.clear()?;
        }
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

#[cfg(test)]
mod cursor_tests {
    use super::*;

    #[test]
    fn a_lookup_resumes_only_over_the_files_it_missed_in() {
        let item = BatchItem::new(4096, &[7; 8]);
        let mut files = [ChainFile::default(); MAX_CHAIN_FILES];
        files[0] = ChainFile {
            ino: 12,
            generation: 3,
        };
        let resumed = Cursor {
            start_file: 0,
            start: 40960,
            hop: 4,
            scratch: [9; BATCH_SCRATCH_SIZE],
            wait: 8192,
            files: Some(files),
        };
        let same = resumed.over(&files, &item);
        assert_eq!((same.start, same.hop, same.wait), (40960, 4, 8192));
        // The file changed (a new generation): back to the item's start.
        let mut changed = files;
        changed[0].generation = 4;
        let restarted = resumed.over(&changed, &item);
        assert_eq!(
            (
                restarted.start,
                restarted.hop,
                restarted.wait,
                restarted.files
            ),
            (4096, 0, u64::MAX, None)
        );
        assert_eq!(restarted.scratch, item.scratch);
        // A lookup that never ran goes over whatever files are registered.
        let fresh = Cursor::from(&item).over(&changed, &item);
        assert_eq!((fresh.start, fresh.hop), (4096, 0));
    }
}
