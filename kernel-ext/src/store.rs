//! The store: one file system's driver maps and the programs bound to them, without the
//! file system itself. It is what `exofs prog` needs on a mounted image, whose file system
//! (and the registration of its files) belongs to the mount daemon; a [`Binding`] is a
//! store plus the file system.
//!
//! Layer: kernel-ext, below [`crate::binding`]. Interface: [`Store::open`] creates (or
//! opens the pinned) maps; [`Store::attach`] opens the pinned maps of a mounted file
//! system and fails if there are none; [`Store::bind`], [`Store::program`],
//! [`Store::unload`] manage programs; [`Store::load_policy`], [`Store::stats`].
//!
//! Invariants:
//! - Pins live under `<bpffs>/exofs/<fs-uuid>/`: `maps/{files,extents,policy,stats}`,
//!   `maps/generation`, `progs/<name>`, `batch/<name>` (root's alone), and the direct
//!   variants `direct/<name>`, `direct-batch/<name>`, which every user may open (mode
//!   0666: BPF_OBJ_GET of a program needs read and write permission): the driver denies
//!   whatever the policy does not grant (see docs/MOUNT.md "Direct chains"). Maps are
//!   pinned before the first program.
//! - Each bound program has its own instance of the driver's `EXOFS_PROGRAM` map, holding
//!   its name's tag, by which the kernel policy grants it.
//! - Every pin or unpin of a program through a store bumps `maps/generation` afterwards;
//!   a store looks at a program's pin again only when that count moved.
//! - Without a holder, the last program's unload removes every pin and the directory. A
//!   holder (the mount daemon, [`Store::hold`]) marks the directory with `held/`: the maps
//!   stay pinned while it lives, and [`Store::remove_all_pins`] removes everything at
//!   unmount.
//!
//! [`Binding`]: crate::binding::Binding

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use exofs_abi::chain::{
    programs, stats, RegisterCtx, TicketKey, MAP_DAEMON, MAP_PROGRAM, MAP_TICKETS,
};
use exofs_abi::extents::{ExtentKey, FileKey, MAP_EXTENTS, MAP_FILES};
use exofs_abi::hot::{MAP_HOT, MAP_HOT_INDEX, MAP_HOT_WANTED};
use exofs_abi::policy::{
    program_tag, PolicyGrant, PolicyKey, MAP_POLICY, MODE_KEY, SUBJECT_CGROUP, SUBJECT_GID,
    SUBJECT_UID,
};

use crate::binder;
use crate::binding::{io_error, BindingError, BindingOptions, Result};
use crate::loader::{
    Kfuncs, Linker, LoadError, MapHandle, SyscallProgram, ALIAS_SECTION, SYSCALL_SECTION,
};
use crate::sys;

/// Directory, beside `progs/`, of the pins of the programs' batch variants (bpffs refuses
/// dots in names, so `progs/<name>.batch` is not possible).
const BATCH_PIN_DIR: &str = "batch";
/// Directories, beside `progs/`, of the pins of the direct variants, open to every user.
pub const DIRECT_PIN_DIR: &str = "direct";
pub const DIRECT_BATCH_PIN_DIR: &str = "direct-batch";
/// Every directory of program pins, `progs/` first.
const PROGRAM_PIN_DIRS: [&str; 4] = ["progs", BATCH_PIN_DIR, DIRECT_PIN_DIR, DIRECT_BATCH_PIN_DIR];
/// Mode of the direct variants' pins.
const DIRECT_PIN_MODE: u32 = 0o666;
/// Where bpffs is mounted.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` (statfs f_type of a bpffs mount).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Maps that are pinned, by the driver's name, under `maps/` with the pin's name.
const PINNED_MAPS: &[(&str, &str)] = &[
    (MAP_FILES, "files"),
    (MAP_EXTENTS, "extents"),
    (MAP_POLICY, "policy"),
    (stats::MAP_STATS, "stats"),
    // Every process that binds programs must link them to the one daemon entry.
    (MAP_DAEMON, "daemon"),
    (MAP_TICKETS, "tickets"),
    // The hot-block table: programs bound by another process read the daemon's.
    (MAP_HOT, "hot"),
    (MAP_HOT_INDEX, "hot-index"),
    (MAP_HOT_WANTED, "hot-wanted"),
];

/// Directory, beside `maps/`, whose presence says a holder (the mount daemon) owns the
/// pins: unloading the last program then leaves the maps pinned.
const HELD_MARKER: &str = "held";
/// Pin, under `maps/`, of the programs' generation (see [`Generation`]).
const GENERATION_PIN: &str = "generation";

/// A count of changes to the pinned programs, shared by every process using the pins: a
/// one-entry mmap-able array map pinned as `maps/generation`. Whoever pins or unpins a
/// program bumps it after the change; [`Store::program`] looks at the pins again only
/// when it moved. Read through a shared mapping, it costs no system call: a stat of the
/// pin on every chain request was 17% of the mount daemon's time per ioctl (perf).
struct Generation {
    map: std::os::fd::OwnedFd,
    counter: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
}

// SAFETY: the counter is an atomic in a shared mapping that lives as long as the value.
unsafe impl Send for Generation {}
// SAFETY: as above; every access goes through the atomic.
unsafe impl Sync for Generation {}

impl Generation {
    /// Opens the counter pinned at `path`, or creates one (pinned by [`Store::hold`] or
    /// with the first program).
    fn open_or_create(path: &Path) -> Result<Self> {
        let map = if path.exists() {
            sys::obj_get(path)?
        } else {
            let spec = sys::MapSpec {
                map_type: sys::BPF_MAP_TYPE_ARRAY,
                key_size: 4,
                value_size: 8,
                max_entries: 1,
                map_flags: sys::BPF_F_MMAPABLE,
            };
            sys::map_create(&spec, "exofs_progs_gen", None)?
        };
        // SAFETY: a shared read-write mapping of the map's one value (the kernel maps the
        // page-aligned value area of BPF_F_MMAPABLE arrays); unmapped once, in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                COUNTER_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io_error(path)(std::io::Error::last_os_error()));
        }
        let counter = std::ptr::NonNull::new(addr.cast())
            .ok_or_else(|| io_error(path)(std::io::Error::other("mmap returned a null address")))?;
        Ok(Self { map, counter })
    }

    fn atomic(&self) -> &std::sync::atomic::AtomicU64 {
        // SAFETY: the mapping is page-aligned, readable and writable, and outlives `self`.
        unsafe { self.counter.as_ref() }
    }

    fn get(&self) -> u64 {
        self.atomic().load(std::sync::atomic::Ordering::Acquire)
    }

    fn bump(&self) {
        self.atomic()
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn pin(&self, path: &Path) -> Result<()> {
        Ok(sys::obj_pin(self.map.as_fd(), path)?)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // SAFETY: the mapping made in open_or_create, not used after this.
        unsafe { libc::munmap(self.counter.as_ptr().cast(), COUNTER_LEN) };
    }
}

/// Bytes mapped for the counter (the kernel rounds the mapping up to a page).
const COUNTER_LEN: usize = std::mem::size_of::<u64>();

/// A program this process knows, and the [`Generation`] at which its pin was last seen to
/// be this program (`None`: not checked yet, or not pinned).
struct Known {
    bound: Arc<BoundProgram>,
    checked: Option<u64>,
}

/// A registered file, as the binding tracks it.
#[derive(Debug, Default)]
pub(crate) struct Registered {
    /// Changes reported by libfs so far.
    pub(crate) changes: u64,
    /// Value of `changes` when the published extents were read.
    pub(crate) published_changes: Option<u64>,
    /// Generation published with the extents (what chains name).
    pub(crate) published_generation: u64,
    /// Newest generation libfs reported.
    pub(crate) latest_generation: u64,
    /// Chunk numbers in the extents map.
    pub(crate) chunks: BTreeSet<u64>,
}

impl Registered {
    pub(crate) fn is_current(&self) -> bool {
        self.published_changes == Some(self.changes)
            && self.published_generation >= self.latest_generation
    }
}

/// The maps shared by every program of a binding, and what is registered in them.
pub(crate) struct Maps {
    pub(crate) files: MapHandle,
    pub(crate) extents: MapHandle,
    pub(crate) policy: MapHandle,
    pub(crate) stats: MapHandle,
    pub(crate) tickets: MapHandle,
    /// Every map of the driver, by its name in the driver (for relocation).
    pub(crate) all: BTreeMap<String, MapHandle>,
    pub(crate) registry: Mutex<HashMap<u64, Registered>>,
}

impl Maps {
    pub(crate) fn registry(&self) -> MutexGuard<'_, HashMap<u64, Registered>> {
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes a file's entry and chunks from the maps.
    pub(crate) fn remove(&self, ino: u64, chunks: &BTreeSet<u64>) -> Result<()> {
        self.files.delete(&FileKey { ino })?;
        for chunk in chunks {
            self.extents.delete(&ExtentKey { ino, chunk: *chunk })?;
        }
        Ok(())
    }
}

/// A program bound into the driver, loaded, ready to run chains: the driver's single-chain
/// and batch programs and their direct variants, each linked with the application's
/// `next`.
#[derive(Debug)]
pub struct BoundProgram {
    name: String,
    pub(crate) program: SyscallProgram,
    pub(crate) batch: SyscallProgram,
    direct: SyscallProgram,
    direct_batch: SyscallProgram,
    /// Inode number of its pin (`progs/<name>`), when pinned: tells a program loaded
    /// again under the same name from this one.
    pin_ino: Option<u64>,
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

    /// The batch program (context [`exofs_abi::chain::BatchCtx`]).
    pub fn batch_program(&self) -> &SyscallProgram {
        &self.batch
    }

    /// The direct single-chain program (reads through the registered daemon's mapping).
    pub fn direct_program(&self) -> &SyscallProgram {
        &self.direct
    }

    /// The direct batch program.
    pub fn direct_batch_program(&self) -> &SyscallProgram {
        &self.direct_batch
    }
}

/// Whom a policy grant is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    Uid(u32),
    Gid(u32),
    /// A cgroup, by id (the inode number of its directory in the cgroup2 mount).
    Cgroup(u64),
}

/// One grant of the kernel policy: `subject` may run chains of the program named
/// `program` over `ino`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEntry {
    pub subject: Subject,
    pub ino: u64,
    pub program: String,
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
            program: program_tag(&self.program),
        }
    }
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
    /// Requests the mount daemon refused before they reached the kernel.
    pub refused: u64,
    /// Denials by reason: no grant for the subject (uid, gid, cgroup) and program on a
    /// file; more hops, or a bigger batch, than the grant allows.
    pub denied_no_grant: u64,
    pub denied_hops: u64,
    pub denied_batch: u64,
    /// Direct calls refused for naming a mapping or a subject (or asking for NO_FAULT).
    pub direct_invalid: u64,
    /// Direct chains denied because the caller's uid holds no ticket for a file.
    pub denied_no_ticket: u64,
    /// Direct hops served from the hot-block table, and those that read the daemon's
    /// mapping instead.
    pub hot_hits: u64,
    pub hot_misses: u64,
}

/// One file system's driver maps and bound programs (see the module documentation).
pub struct Store {
    pub(crate) maps: Arc<Maps>,
    /// `<bpffs>/exofs/<uuid>` when pinning.
    pin_dir: Option<PathBuf>,
    programs: Mutex<BTreeMap<String, Known>>,
    /// The programs' generation, when pinning.
    generation: Option<Generation>,
    /// Serialises [`Store::count_refused`] (a read-modify-write).
    refused_lock: Mutex<()>,
    /// The driver's `exofs_register`, never pinned: whoever runs it becomes the daemon.
    register: SyscallProgram,
    /// The holder's lock on the pin directory (see [`Store::hold`]).
    holder: Mutex<Option<nix::fcntl::Flock<fs::File>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
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

/// The pin of a program's variant in `dir` (`batch`, `direct`...): `<pin dir>/<dir>/<name>`
/// for `progs/<name>`.
fn variant_pin(path: &Path, dir: &str) -> PathBuf {
    let name = path.file_name().unwrap_or_default();
    let pin_dir = path.parent().and_then(Path::parent).unwrap_or(path);
    pin_dir.join(dir).join(name)
}

/// The pin of a program's batch variant.
fn batch_pin(path: &Path) -> PathBuf {
    variant_pin(path, BATCH_PIN_DIR)
}

/// One level of the pin tree, checked before anything in it is used: bpffs's root is
/// world-writable (sticky), so `<bpffs>/exofs` (or anything under it) could have been
/// made by another user, to fill with pins of their choosing, or be a symlink elsewhere.
/// Makes `dir` if it does not exist (and `create`); then it must be a real directory (not
/// a symlink) owned by this user, and is made writable by no one else (whatever the umask
/// made it) and readable and searchable by all (the direct pins inside must be
/// reachable). Callers go top down, so each level's parent is already known to be ours.
fn private_dir(dir: &Path, create: bool) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            if !create {
                return Ok(());
            }
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(io_error(dir)(err)),
            }
        }
        Err(err) => return Err(io_error(dir)(err)),
    }
    check_private(dir)
}

/// Fails unless `dir` is a directory (not a symlink) owned by this process's user; makes
/// it mode 0755 (see `private_dir`).
fn check_private(dir: &Path) -> Result<()> {
    let metadata = fs::symlink_metadata(dir).map_err(io_error(dir))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if !metadata.is_dir() || metadata.uid() != euid {
        return Err(BindingError::NotPrivate(dir.to_owned()));
    }
    if metadata.mode() & 0o7777 != 0o755 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_error(dir))?;
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    if exofs_abi::ioctl::is_valid_program_name(name) {
        Ok(())
    } else {
        Err(BindingError::BadName(name.to_owned()))
    }
}

impl Store {
    /// Opens the store of the file system `uuid`: the pinned maps of an earlier process if
    /// there are any, else new maps (pinned, with the first program, if `options.pin`).
    /// Needs CAP_BPF + CAP_PERFMON (root), and CAP_SYS_ADMIN to mount bpffs.
    pub fn open(uuid: [u8; 16], options: &BindingOptions) -> Result<Self> {
        Self::open_maps(uuid, options, false)
    }

    /// Opens the pinned maps of `uuid`, which a holder (the mount daemon) keeps pinned:
    /// fails if they are not pinned rather than creating maps nobody else uses.
    pub fn attach(uuid: [u8; 16], bpffs: &Path) -> Result<Self> {
        let options = BindingOptions {
            pin: true,
            bpffs: bpffs.to_owned(),
            hot_bytes: 0,
        };
        Self::open_maps(uuid, &options, true)
    }

    fn open_maps(uuid: [u8; 16], options: &BindingOptions, pinned_only: bool) -> Result<Self> {
        let pin_dir = if options.pin {
            ensure_bpffs(&options.bpffs)?;
            Some(pin_dir(&options.bpffs, uuid))
        } else {
            None
        };
        let maps_dir = pin_dir.as_ref().map(|dir| dir.join("maps"));
        if let (Some(dir), Some(maps)) = (&pin_dir, &maps_dir) {
            // Top down, before any pin in them is opened (see `private_dir`).
            if let Some(parent) = dir.parent() {
                private_dir(parent, !pinned_only)?;
            }
            private_dir(dir, !pinned_only)?;
            private_dir(maps, !pinned_only)?;
        }
        let generation = match &maps_dir {
            Some(dir) => {
                let path = dir.join(GENERATION_PIN);
                if pinned_only && !path.exists() {
                    return Err(BindingError::NotPinned(path));
                }
                Some(Generation::open_or_create(&path)?)
            }
            None => None,
        };
        let mut linker = Linker::parse(
            crate::DRIVER_ELF,
            &[(SYSCALL_SECTION, ALIAS_SECTION)],
            Kfuncs::Resolve,
        )?;
        let definitions = linker.take_maps();
        let mut all = BTreeMap::new();
        for (name, definition) in &definitions {
            let pin = PINNED_MAPS
                .iter()
                .find(|(driver, _)| driver == name)
                .and_then(|(_, pin)| maps_dir.as_ref().map(|dir| dir.join(pin)));
            let handle = match &pin {
                Some(path) if path.exists() => MapHandle::open_pinned(path, name, definition)?,
                Some(path) if pinned_only => {
                    return Err(BindingError::NotPinned(path.to_owned()));
                }
                // The hot-block table has as many slots as the options ask for.
                _ if name == MAP_HOT => MapHandle::create_with_entries(
                    name,
                    definition,
                    crate::hot::slots_for(options.hot_bytes),
                )?,
                _ => MapHandle::create(name, definition)?,
            };
            all.insert(name.clone(), handle);
        }
        // The registration program, linked to these maps.
        linker.relocate(definitions.iter().map(|(name, definition)| {
            (name.as_str(), all[name].as_fd().as_raw_fd(), definition)
        }))?;
        let linked = linker.linked(programs::REGISTER)?;
        let register =
            SyscallProgram::load_insns(programs::REGISTER, &linked.insns, &linked.license)?;
        drop(linker);
        let take = |all: &mut BTreeMap<String, MapHandle>, name: &str| {
            all.remove(name)
                .ok_or_else(|| LoadError::Elf(format!("the driver has no map {name}")))
        };
        let files = take(&mut all, MAP_FILES)?;
        let extents = take(&mut all, MAP_EXTENTS)?;
        let stats_map = take(&mut all, stats::MAP_STATS)?;
        let policy = take(&mut all, MAP_POLICY)?;
        let tickets = take(&mut all, MAP_TICKETS)?;
        let maps = Arc::new(Maps {
            files,
            extents,
            policy,
            stats: stats_map,
            tickets,
            all,
            registry: Mutex::new(HashMap::new()),
        });
        Ok(Self {
            maps,
            pin_dir,
            programs: Mutex::new(BTreeMap::new()),
            generation,
            refused_lock: Mutex::new(()),
            register,
            holder: Mutex::new(None),
        })
    }

    /// Makes the calling process the daemon of these maps (see `exofs_abi::chain::programs`
    /// and the driver's `daemon` module): the policy's speaker, whose device mapping
    /// (`map_addr`, `map_len`, which must stay mapped while direct chains may run) direct
    /// chains read.
    pub fn register_daemon(&self, map_addr: u64, map_len: u64) -> Result<()> {
        let mut ctx = RegisterCtx {
            map_addr,
            map_len,
            ..RegisterCtx::default()
        };
        self.register.test_run_pod(&mut ctx)?;
        if ctx.status != 0 {
            return Err(BindingError::Register(exofs_abi::chain::status::name(
                ctx.status,
            )));
        }
        Ok(())
    }

    /// Removes every file entry and extent chunk from the maps: what a process that owns
    /// the file system exclusively does first, since entries left by a process that died
    /// could describe extents that have changed since.
    pub(crate) fn clear_files(&self) -> Result<()> {
        for key in self.maps.files.keys::<FileKey>()? {
            self.maps.files.delete(&key)?;
        }
        for key in self.maps.extents.keys::<ExtentKey>()? {
            self.maps.extents.delete(&key)?;
        }
        for key in self.maps.tickets.keys::<TicketKey>()? {
            self.maps.tickets.delete(&key)?;
        }
        // A dead daemon's hot-block table: slots are unreachable without their index.
        self.clear_hot_index()
    }

    /// Lets `uid` run direct chains over `ino` (on top of the policy's grant): what the
    /// mount daemon does when `uid` asks for the file through a handle it opened.
    pub fn grant_ticket(&self, uid: u32, ino: u64) -> Result<()> {
        let key = TicketKey { uid, _pad: 0, ino };
        Ok(self.maps.tickets.set(&key, &1u64, sys::BPF_ANY)?)
    }

    /// Takes `uid`'s ticket for `ino` back (its last handle that asked for it closed).
    pub fn revoke_ticket(&self, uid: u32, ino: u64) -> Result<()> {
        let key = TicketKey { uid, _pad: 0, ino };
        self.maps.tickets.delete(&key)?;
        Ok(())
    }

    /// Pins the maps now and keeps them pinned until [`Store::remove_all_pins`], whatever
    /// programs come and go: the mount daemon holds them so `exofs prog load` on the
    /// mounted image links programs to the maps it registers files in.
    ///
    /// One holder at a time: the holder keeps an exclusive flock on the pin directory for
    /// as long as the store lives (the kernel drops it when the process dies), and a
    /// second one (another mount of the same file system, or of a copy with the same
    /// uuid) is refused with [`BindingError::Held`] rather than take over the daemon
    /// entry, the policy and the registered files of the first.
    pub fn hold(&self) -> Result<()> {
        self.lock()?;
        self.ensure_map_pins()?;
        if let Some(dir) = &self.pin_dir {
            let marker = dir.join(HELD_MARKER);
            if !marker.exists() {
                fs::create_dir(&marker).map_err(io_error(&marker))?;
            }
        }
        // Tickets are the holder's: none of a daemon that died may outlive it (on a
        // read-only image nothing else clears the maps).
        for key in self.maps.tickets.keys::<TicketKey>()? {
            self.maps.tickets.delete(&key)?;
        }
        // So is the hot-block table: a dead daemon's slots may hold blocks the image no
        // longer holds (it may have been changed since), and this daemon may not serve
        // a table at all. Without index entries no slot is read.
        self.clear_hot_index()
    }

    /// Removes every entry of the hot-block table's index (`exofs_abi::hot`): no slot
    /// is read by a direct hop until the daemon that serves the table fills it again.
    pub(crate) fn clear_hot_index(&self) -> Result<()> {
        if let Some(index) = self.maps.all.get(MAP_HOT_INDEX) {
            for key in index.keys::<u64>()? {
                index.delete(&key)?;
            }
        }
        Ok(())
    }

    /// Takes the exclusive lock on the pin directory (see [`Store::hold`]), if pinning
    /// and not taken yet: before a process that owns the file system clears the maps,
    /// so that it never clears those of another holder.
    pub(crate) fn lock(&self) -> Result<()> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        let mut holder = self.holder.lock().unwrap_or_else(|p| p.into_inner());
        if holder.is_some() {
            return Ok(());
        }
        let lock = fs::File::open(dir).map_err(io_error(dir))?;
        let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| match errno {
                nix::errno::Errno::EWOULDBLOCK => BindingError::Held(dir.to_owned()),
                errno => io_error(dir)(std::io::Error::from_raw_os_error(errno as i32)),
            })?;
        *holder = Some(held);
        Ok(())
    }

    /// Whether a holder keeps the pins (see [`Store::hold`]).
    pub fn is_held(&self) -> bool {
        self.pin_dir
            .as_ref()
            .is_some_and(|dir| dir.join(HELD_MARKER).exists())
    }

    /// The pin directory, if pinning.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    fn programs(&self) -> MutexGuard<'_, BTreeMap<String, Known>> {
        self.programs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The map of the driver called `name` that every program of this store shares.
    fn shared_map(&self, name: &str) -> Result<&MapHandle> {
        Ok(match name {
            MAP_FILES => &self.maps.files,
            MAP_EXTENTS => &self.maps.extents,
            MAP_POLICY => &self.maps.policy,
            stats::MAP_STATS => &self.maps.stats,
            MAP_TICKETS => &self.maps.tickets,
            other => self.maps.all.get(other).ok_or_else(|| {
                LoadError::Elf(format!("the driver's map {other} was not created"))
            })?,
        })
    }

    /// Pins the shared maps (before the first program is pinned) where they are not.
    fn ensure_map_pins(&self) -> Result<()> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        if let Some(parent) = dir.parent() {
            private_dir(parent, true)?;
        }
        private_dir(dir, true)?;
        for sub in PROGRAM_PIN_DIRS.into_iter().chain(["maps"]) {
            private_dir(&dir.join(sub), true)?;
        }
        for (driver_name, pin) in PINNED_MAPS {
            let path = dir.join("maps").join(pin);
            if !path.exists() {
                self.shared_map(driver_name)?.pin(&path)?;
            }
        }
        let path = dir.join("maps").join(GENERATION_PIN);
        if let Some(generation) = self.generation.as_ref().filter(|_| !path.exists()) {
            generation.pin(&path)?;
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
        let mut driver = Linker::parse(
            crate::DRIVER_ELF,
            &[(SYSCALL_SECTION, ALIAS_SECTION)],
            Kfuncs::Resolve,
        )?;
        let definitions = driver.take_maps();
        let mut relocations = Vec::new();
        // This program's own instance of the program map: its tag, for the policy.
        let tag_map = match definitions
            .iter()
            .find(|(map_name, _)| map_name == MAP_PROGRAM)
        {
            Some((map_name, definition)) => {
                let map = MapHandle::create(map_name, definition)?;
                map.set(&0u32, &program_tag(name), sys::BPF_ANY)?;
                Some(map)
            }
            None => None,
        };
        for (map_name, definition) in &definitions {
            let handle = match map_name.as_str() {
                MAP_PROGRAM => tag_map.as_ref().ok_or_else(|| {
                    LoadError::Elf(format!("the driver's map {MAP_PROGRAM} was not created"))
                })?,
                shared => self.shared_map(shared)?,
            };
            relocations.push((map_name.as_str(), handle.as_fd().as_raw_fd(), definition));
        }
        driver.relocate(relocations.into_iter())?;
        let license = driver.linked(programs::CHAIN)?.license;
        let load = |entry: &str| -> Result<SyscallProgram> {
            let insns = binder::link_into_driver(&driver, entry, &app)?;
            Ok(SyscallProgram::load_insns(name, &insns, &license)?)
        };
        let program = load(programs::CHAIN)?;
        let batch = load(programs::BATCH)?;
        let direct = load(programs::DIRECT_CHAIN)?;
        let direct_batch = load(programs::DIRECT_BATCH)?;
        if let Some(path) = &pin {
            self.ensure_map_pins()?;
            let variants = [
                (&program, path.clone(), None),
                (&batch, batch_pin(path), None),
                (
                    &direct,
                    variant_pin(path, DIRECT_PIN_DIR),
                    Some(DIRECT_PIN_MODE),
                ),
                (
                    &direct_batch,
                    variant_pin(path, DIRECT_BATCH_PIN_DIR),
                    Some(DIRECT_PIN_MODE),
                ),
            ];
            for (index, (loaded, pin_path, mode)) in variants.iter().enumerate() {
                let pinned = loaded
                    .pin(pin_path)
                    .map_err(BindingError::from)
                    .and_then(|()| match mode {
                        Some(mode) => {
                            fs::set_permissions(pin_path, fs::Permissions::from_mode(*mode))
                                .map_err(io_error(pin_path))
                        }
                        None => Ok(()),
                    });
                if let Err(err) = pinned {
                    for (_, earlier, _) in &variants[..=index] {
                        let _ = fs::remove_file(earlier);
                    }
                    return Err(err);
                }
            }
        }
        let pin_ino = match &pin {
            Some(path) => Some(fs::metadata(path).map_err(io_error(path))?.ino()),
            None => None,
        };
        let bound = Arc::new(BoundProgram {
            name: name.to_owned(),
            program,
            batch,
            direct,
            direct_batch,
            pin_ino,
        });
        self.programs().insert(
            name.to_owned(),
            Known {
                bound: bound.clone(),
                checked: None,
            },
        );
        self.bump_generation();
        Ok(bound)
    }

    /// The program bound as `name`, by this process or pinned by another. When pinning,
    /// the pin decides: a program unloaded by another process is gone here too, and one
    /// loaded again under the same name replaces the one remembered. The pin is looked at
    /// only when the programs' [`Generation`] moved since it was last looked at, so the
    /// common case takes no system call.
    pub fn program(&self, name: &str) -> Result<Arc<BoundProgram>> {
        check_name(name)?;
        let Some(path) = self.prog_pin(name) else {
            return self
                .programs()
                .get(name)
                .map(|known| known.bound.clone())
                .ok_or_else(|| BindingError::NoProgram(name.to_owned()));
        };
        // Read before the pin is: a change after this read leaves `checked` behind.
        let generation = self.generation.as_ref().map(Generation::get);
        if let Some(known) = self.programs().get(name) {
            if generation.is_some() && known.checked == generation {
                return Ok(known.bound.clone());
            }
        }
        let pin_ino = match fs::metadata(&path) {
            Ok(metadata) => metadata.ino(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                self.programs().remove(name);
                return Err(BindingError::NoProgram(name.to_owned()));
            }
            Err(err) => return Err(io_error(&path)(err)),
        };
        if let Some(known) = self.programs().get_mut(name) {
            if known.bound.pin_ino == Some(pin_ino) {
                known.checked = generation;
                return Ok(known.bound.clone());
            }
        }
        let bound = Arc::new(BoundProgram {
            name: name.to_owned(),
            program: SyscallProgram::from_pin(&path, name)?,
            batch: SyscallProgram::from_pin(&batch_pin(&path), name)?,
            direct: SyscallProgram::from_pin(&variant_pin(&path, DIRECT_PIN_DIR), name)?,
            direct_batch: SyscallProgram::from_pin(
                &variant_pin(&path, DIRECT_BATCH_PIN_DIR),
                name,
            )?,
            pin_ino: Some(pin_ino),
        });
        let known = Known {
            bound: bound.clone(),
            checked: generation,
        };
        self.programs().insert(name.to_owned(), known);
        Ok(bound)
    }

    /// The pins of the direct variants of the program `name` (single chain, batch), or
    /// None when this store does not pin. Fails if no such program is bound.
    pub fn direct_pins(&self, name: &str) -> Result<Option<(PathBuf, PathBuf)>> {
        self.program(name)?;
        Ok(self.prog_pin(name).map(|path| {
            (
                variant_pin(&path, DIRECT_PIN_DIR),
                variant_pin(&path, DIRECT_BATCH_PIN_DIR),
            )
        }))
    }

    /// Tells every process using the pins that programs were pinned or unpinned.
    fn bump_generation(&self) {
        if let Some(generation) = &self.generation {
            generation.bump();
        }
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
                for dir in &PROGRAM_PIN_DIRS[1..] {
                    let variant = variant_pin(&path, dir);
                    if variant.exists() {
                        fs::remove_file(&variant).map_err(io_error(&variant))?;
                    }
                }
                self.bump_generation();
                true
            }
            _ => false,
        };
        if !had && !pinned {
            return Err(BindingError::NoProgram(name.to_owned()));
        }
        self.remove_pins_if_unused()
    }

    /// Removes every pin if no program is pinned any more and no holder keeps them.
    pub(crate) fn remove_pins_if_unused(&self) -> Result<()> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        let progs = dir.join("progs");
        let any_program = progs.exists()
            && fs::read_dir(&progs)
                .map_err(io_error(&progs))?
                .next()
                .is_some();
        if any_program || self.is_held() {
            return Ok(());
        }
        self.remove_all_pins()
    }

    /// Removes every pin (programs included) and the directory: the holder's last act.
    pub fn remove_all_pins(&self) -> Result<()> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        self.programs().clear();
        for sub in PROGRAM_PIN_DIRS {
            let path = dir.join(sub);
            if path.exists() {
                for entry in fs::read_dir(&path).map_err(io_error(&path))? {
                    let pin = entry.map_err(io_error(&path))?.path();
                    fs::remove_file(&pin).map_err(io_error(&pin))?;
                }
            }
        }
        self.bump_generation();
        let pinned_maps = PINNED_MAPS.iter().map(|(_, pin)| *pin);
        for pin in pinned_maps.chain([GENERATION_PIN]) {
            let path = dir.join("maps").join(pin);
            if path.exists() {
                fs::remove_file(&path).map_err(io_error(&path))?;
            }
        }
        for sub in PROGRAM_PIN_DIRS.into_iter().chain(["maps", HELD_MARKER]) {
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

    /// Replaces the kernel policy: enforcement on (every chain denied unless each of its
    /// files has a grant for the subject and the program), exactly `entries`. The mode
    /// entry goes in first and old grants go before new ones are added, so a reload is
    /// never more permissive than either policy. (Who may name a subject is not part of
    /// the policy: it is the registered daemon, see [`Store::register_daemon`].)
    pub fn load_policy(&self, entries: &[PolicyEntry]) -> Result<()> {
        let map = &self.maps.policy;
        map.set(&MODE_KEY, &PolicyGrant::default(), sys::BPF_ANY)?;
        let mut wanted: HashMap<PolicyKey, PolicyGrant> = entries
            .iter()
            .map(|entry| (entry.key(), entry.grant))
            .collect();
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
            refused: counts[stats::REFUSED as usize],
            denied_no_grant: counts[stats::DENIED_NO_GRANT as usize],
            denied_hops: counts[stats::DENIED_HOPS as usize],
            denied_batch: counts[stats::DENIED_BATCH as usize],
            direct_invalid: counts[stats::DIRECT_INVALID as usize],
            denied_no_ticket: counts[stats::DENIED_NO_TICKET as usize],
            hot_hits: counts[stats::HOT_HITS as usize],
            hot_misses: counts[stats::HOT_MISSES as usize],
        })
    }

    /// Counts one request the mount daemon refused (`stats::REFUSED`).
    pub fn count_refused(&self) -> Result<()> {
        let _serialised = self
            .refused_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(self.maps.stats.add_percpu_u64(stats::REFUSED, 1)?)
    }
}
