//! The mount daemon's chain service: the chain ioctls (`exofs_abi::ioctl`) on files of
//! the mount, checked against the mount's policy and run through the daemon's kernel
//! binding.
//!
//! Layer: mount-tool, called by the FUSE layer (`fuse.rs`) for ioctls; below it the
//! kernel binding (kernel-ext) and libfs.
//!
//! Enforcement happens twice (DESIGN "Policy"):
//! - here, for every request: the caller's uid, groups and cgroup must have a grant that
//!   covers the file, the program, the hops and the batch size; a refusal is EACCES,
//!   counted (`stats::REFUSED`) and logged;
//! - in the driver, for every chain: the daemon is the policy's registered speaker and
//!   names the caller as the subject; the kernel grants are the policy's paths compiled
//!   to inode numbers. A kernel denial is EACCES too (counted by the driver as DENIED).
//!
//! Invariants:
//! - The compiled policy (paths resolved to inodes, here and in the kernel map) is
//!   recompiled before a request whenever the namespace changed since (any create, link,
//!   unlink, rename...), so a file moved out of a granted directory is not granted to the
//!   next request.
//! - Without a policy file the policy is empty: every request is refused (default deny).

use crate::access::Credentials;
use crate::policy::{self, Policy, Who};
pub use crate::request::Refusal;
use crate::request::{
    decode_batch, decode_chain, decode_direct, struct_bytes, BatchCall, ChainCall,
};
use exofs_abi::chain::status;
use exofs_abi::ioctl::{self, PolicyReload};
use exofs_abi::policy::PolicyGrant;
use kernel_ext::binding::{
    BatchItem, BatchRequest, Binding, BindingError, ChainRequest, NamedSubject, PolicyEntry,
    Subject,
};
use kernel_ext::hot::HotWrites;
use libfs::Fs;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Recompiles the policy in the background after names change, so that the kernel's
/// grants follow renames and deletions without waiting for the next ioctl (direct chains
/// send none). Changes that come together are compiled once: the thread waits
/// [`REFRESH_DELAY`] after a change before compiling, so a flood of name operations
/// (failed ones included) costs at most one compilation per delay, and never a FUSE
/// worker's time.
pub struct PolicyRefresher {
    state: Arc<(Mutex<Refresh>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Refresh {
    pending: bool,
    stop: bool,
}

/// How long the refresher lets name changes gather.
pub const REFRESH_DELAY: std::time::Duration = std::time::Duration::from_millis(2);

impl PolicyRefresher {
    /// Starts the thread; it ends when the service is gone or the refresher is dropped.
    pub fn start(service: &Arc<ChainService>) -> std::io::Result<Self> {
        let state = Arc::new((Mutex::new(Refresh::default()), Condvar::new()));
        let (shared, service) = (state.clone(), Arc::downgrade(service));
        let thread = std::thread::Builder::new()
            .name("exofs-policy".into())
            .spawn(move || loop {
                {
                    let (lock, wake) = &*shared;
                    let mut refresh = lock.lock().unwrap_or_else(|p| p.into_inner());
                    while !refresh.pending && !refresh.stop {
                        refresh = wake.wait(refresh).unwrap_or_else(|p| p.into_inner());
                    }
                    if refresh.stop {
                        return;
                    }
                    refresh.pending = false;
                }
                std::thread::sleep(REFRESH_DELAY);
                match service.upgrade() {
                    Some(service) => service.refresh_policy(),
                    None => return,
                }
            })?;
        Ok(Self {
            state,
            thread: Some(thread),
        })
    }

    /// Names changed: compile again soon.
    pub fn poke(&self) {
        let (lock, wake) = &*self.state;
        lock.lock().unwrap_or_else(|p| p.into_inner()).pending = true;
        wake.notify_one();
    }
}

impl Drop for PolicyRefresher {
    fn drop(&mut self) {
        let (lock, wake) = &*self.state;
        lock.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the policy check allows a request: the subject to name to the kernel, the hop
/// limit to run with (the one asked, or for 0 the most the grants allow), and the largest
/// batch the caller's grants allow at that many hops.
#[derive(Debug, Clone, Copy)]
struct Decision {
    subject: NamedSubject,
    hops: u32,
    max_batch: u32,
}

/// Who sent a FUSE request.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A subject of the policy, resolved: a cgroup by its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Resolved {
    Uid(u32),
    Gid(u32),
    Cgroup(u64),
}

/// One grant with its paths resolved to inode numbers.
#[derive(Debug)]
struct CompiledGrant {
    who: Resolved,
    inos: HashSet<u64>,
    programs: Vec<String>,
    max_hops: u32,
    max_batch: u32,
}

/// The policy as enforced: the file it came from, its grants compiled at `namespace`.
#[derive(Debug, Default)]
struct Compiled {
    policy: Policy,
    /// The namespace generation the grants were compiled at (None: never).
    namespace: Option<u64>,
    /// Shared with the requests deciding on them, which hold no lock meanwhile (they may
    /// read /proc).
    grants: Arc<Vec<CompiledGrant>>,
}

/// The daemon's chain service (see the module documentation).
#[derive(Debug)]
pub struct ChainService {
    binding: Binding,
    policy_path: Option<PathBuf>,
    compiled: Mutex<Compiled>,
    /// Bumped by the FUSE layer on every change of the namespace.
    namespace: Arc<AtomicU64>,
    /// The mount's owner: may reload the policy, as root may.
    owner: u32,
    /// Where cgroup2 is mounted, to resolve callers' and subjects' cgroups.
    cgroup2: Option<PathBuf>,
    /// Tickets in the kernel (uid, inode) and how many open handles hold each.
    tickets: Mutex<HashMap<(u32, u64), u32>>,
}

impl ChainService {
    /// The service over `binding` (which it holds: maps pinned until it is dropped) with
    /// the policy read from `policy_path` (none: deny everything).
    pub fn new(
        binding: Binding,
        hot: Option<&Arc<HotWrites>>,
        policy_path: Option<PathBuf>,
        namespace: Arc<AtomicU64>,
    ) -> Result<Self, String> {
        let policy = match &policy_path {
            Some(path) => policy::load(path)?,
            None => Policy::default(),
        };
        binding.hold().map_err(|e| e.to_string())?;
        // Before the registration: no direct chain may read a table an earlier daemon
        // left.
        if let Some(writes) = hot {
            binding.serve_hot(writes).map_err(|e| e.to_string())?;
        }
        // The daemon is the policy's speaker, and direct chains read its mapping.
        binding
            .serve_direct()
            .map_err(|e| format!("registering the daemon with the driver: {e}"))?;
        let service = Self {
            binding,
            policy_path,
            compiled: Mutex::new(Compiled {
                policy,
                ..Compiled::default()
            }),
            namespace,
            // SAFETY: getuid has no preconditions.
            owner: unsafe { libc::getuid() },
            cgroup2: cgroup2_mount(),
            tickets: Mutex::new(HashMap::new()),
        };
        drop(service.compiled_now().map_err(|r| r.reason)?);
        Ok(service)
    }

    fn fs(&self) -> &Arc<Fs> {
        self.binding.fs()
    }

    fn lock(&self) -> MutexGuard<'_, Compiled> {
        self.compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The compiled grants, recompiled first (and the kernel's grants replaced) if the
    /// namespace changed since they were compiled.
    fn compiled_now(&self) -> Result<Arc<Vec<CompiledGrant>>, Refusal> {
        let mut compiled = self.lock();
        let namespace = self.namespace.load(Ordering::Acquire);
        if compiled.namespace == Some(namespace) {
            return Ok(compiled.grants.clone());
        }
        let grants = self.compile(&compiled.policy);
        let mut kernel: HashMap<(Resolved, u64, &str), PolicyGrant> = HashMap::new();
        for grant in &grants {
            for ino in &grant.inos {
                for program in &grant.programs {
                    let entry = kernel.entry((grant.who, *ino, program)).or_default();
                    entry.max_hops = entry.max_hops.max(grant.max_hops);
                    entry.max_batch = entry.max_batch.max(grant.max_batch);
                }
            }
        }
        let entries: Vec<PolicyEntry> = kernel
            .into_iter()
            .map(|((who, ino, program), grant)| PolicyEntry {
                subject: match who {
                    Resolved::Uid(uid) => Subject::Uid(uid),
                    Resolved::Gid(gid) => Subject::Gid(gid),
                    Resolved::Cgroup(id) => Subject::Cgroup(id),
                },
                ino,
                program: program.to_owned(),
                grant,
            })
            .collect();
        self.binding
            .load_policy(&entries)
            .map_err(|err| Refusal::new(libc::EIO, format!("loading the kernel policy: {err}")))?;
        compiled.grants = Arc::new(grants);
        compiled.namespace = Some(namespace);
        Ok(compiled.grants.clone())
    }

    /// Resolves every grant's paths to the regular files they cover now.
    fn compile(&self, policy: &Policy) -> Vec<CompiledGrant> {
        let mut compiled = Vec::new();
        for subject in &policy.subjects {
            let who = match &subject.who {
                Who::Uid(uid) => Resolved::Uid(*uid),
                Who::Gid(gid) => Resolved::Gid(*gid),
                Who::Cgroup(path) => match std::fs::metadata(path) {
                    Ok(metadata) => Resolved::Cgroup(metadata.ino()),
                    Err(err) => {
                        log::warn!(
                            "policy: cgroup {}: {err}; its grants are skipped",
                            path.display()
                        );
                        continue;
                    }
                },
            };
            for grant in &subject.grants {
                let mut inos = HashSet::new();
                for path in &grant.paths {
                    self.files_under(Path::new(path), &mut inos);
                }
                compiled.push(CompiledGrant {
                    who,
                    inos,
                    programs: grant.programs.clone(),
                    max_hops: grant.max_hops,
                    max_batch: grant.max_batch,
                });
            }
        }
        compiled
    }

    /// Adds the regular files at `path` (a file, or every file under a directory).
    fn files_under(&self, path: &Path, inos: &mut HashSet<u64>) {
        let Ok(attr) = self.fs().resolve(path) else {
            return;
        };
        let mut pending = vec![attr];
        let mut seen = HashSet::new();
        while let Some(attr) = pending.pop() {
            if attr.is_file() {
                inos.insert(attr.ino);
            } else if attr.is_dir() && seen.insert(attr.ino) {
                let Ok(entries) = self.fs().list_dir(attr.ino) else {
                    continue;
                };
                for entry in entries {
                    if let Ok(child) = self.fs().getattr(entry.ino) {
                        pending.push(child);
                    }
                }
            }
        }
    }

    /// The caller's supplementary groups and cgroup id, from /proc.
    fn identify(&self, caller: &Caller) -> (Vec<u32>, u64) {
        // The same reading of /proc as the permission checks: believed only if it names
        // the request's fsuid and fsgid.
        let groups = Credentials::of_request(caller.uid, caller.gid, caller.pid)
            .groups()
            .to_vec();
        let cgroup = self
            .cgroup2
            .as_ref()
            .and_then(|mount| {
                let text = std::fs::read_to_string(format!("/proc/{}/cgroup", caller.pid)).ok()?;
                let relative = text.lines().find_map(|line| line.strip_prefix("0::"))?;
                let dir = mount.join(relative.trim_start_matches('/'));
                std::fs::metadata(dir).ok().map(|m| m.ino())
            })
            .unwrap_or(0);
        (groups, cgroup)
    }

    /// Checks a request against the compiled policy (see [`Decision`]). A refusal is
    /// logged and counted (`stats::REFUSED`).
    fn check(
        &self,
        caller: &Caller,
        ino: u64,
        program: &str,
        hops: u32,
        batch: u32,
    ) -> Result<Decision, Refusal> {
        self.decide(caller, ino, program, hops, batch)
            .inspect_err(|refusal| {
                if refusal.errno == libc::EACCES {
                    log::warn!("chain refused: {}", refusal.reason);
                    if let Err(err) = self.binding.count_refused() {
                        log::error!("counting a refusal: {err}");
                    }
                }
            })
    }

    fn decide(
        &self,
        caller: &Caller,
        ino: u64,
        program: &str,
        hops: u32,
        batch: u32,
    ) -> Result<Decision, Refusal> {
        let grants = self.compiled_now()?;
        // /proc is read only when a grant could match through it.
        let needs_proc = grants.iter().any(|g| match g.who {
            Resolved::Uid(_) => false,
            Resolved::Gid(gid) => gid != caller.gid,
            Resolved::Cgroup(_) => true,
        });
        let (groups, cgroup) = if needs_proc {
            self.identify(caller)
        } else {
            (Vec::new(), 0)
        };
        let matches = |who: &Resolved| match who {
            Resolved::Uid(uid) => *uid == caller.uid,
            Resolved::Gid(gid) => *gid == caller.gid || groups.contains(gid),
            Resolved::Cgroup(id) => *id == cgroup && cgroup != 0,
        };
        let mine: Vec<&CompiledGrant> = grants.iter().filter(|g| matches(&g.who)).collect();
        let refuse = |reason: String| {
            Err(Refusal::new(
                libc::EACCES,
                format!(
                    "uid {} (pid {}), inode {ino}, program `{program}`: {reason}",
                    caller.uid, caller.pid
                ),
            ))
        };
        if mine.is_empty() {
            return refuse("the policy grants this caller nothing".into());
        }
        let for_file: Vec<&CompiledGrant> = mine
            .iter()
            .copied()
            .filter(|g| g.inos.contains(&ino))
            .collect();
        if for_file.is_empty() {
            return refuse("the file is not granted".into());
        }
        let for_program: Vec<&CompiledGrant> = for_file
            .iter()
            .copied()
            .filter(|g| g.programs.iter().any(|p| p == program))
            .collect();
        let Some(widest) = for_program.iter().max_by_key(|g| (g.max_hops, g.max_batch)) else {
            return refuse("the program is not granted for this file".into());
        };
        let hops = if hops == 0 { widest.max_hops } else { hops };
        if let Some(grant) = for_program
            .iter()
            .find(|g| hops <= g.max_hops && batch <= g.max_batch)
        {
            let gid = match grant.who {
                Resolved::Gid(gid) => gid,
                _ => caller.gid,
            };
            let subject = NamedSubject {
                uid: caller.uid,
                gid,
                cgroup,
            };
            let max_batch = for_program
                .iter()
                .filter(|g| hops <= g.max_hops)
                .map(|g| g.max_batch)
                .max()
                .unwrap_or(batch);
            return Ok(Decision {
                subject,
                hops,
                max_batch,
            });
        }
        if hops > widest.max_hops {
            return refuse(format!("{hops} hops exceed max_hops {}", widest.max_hops));
        }
        refuse(format!(
            "a batch of {batch} exceeds max_batch {}",
            widest.max_batch
        ))
    }

    /// A kernel denial of a request the daemon allowed: the driver counted it (DENIED);
    /// logged here.
    fn kernel_denied(caller: &Caller, ino: u64, what: &str) -> Refusal {
        let reason = format!(
            "uid {} (pid {}), inode {ino}: the kernel policy denied the {what}",
            caller.uid, caller.pid
        );
        log::warn!("chain denied: {reason}");
        Refusal::new(libc::EACCES, reason)
    }

    fn run_error(err: BindingError) -> Refusal {
        match err {
            BindingError::NoProgram(name) => {
                Refusal::new(libc::ENOENT, format!("no program `{name}`"))
            }
            BindingError::BadName(name) => {
                Refusal::new(libc::EINVAL, format!("invalid program name `{name}`"))
            }
            err => Refusal::new(libc::EIO, err.to_string()),
        }
    }

    /// Recompiles the policy now if the namespace changed: the kernel's grants must follow
    /// names before the next direct chain, which never asks the daemon (see
    /// [`PolicyRefresher`]).
    pub fn refresh_policy(&self) {
        if let Err(refusal) = self.compiled_now() {
            log::error!("recompiling the policy: {}", refusal.reason);
        }
    }

    /// `IOC_DIRECT` on inode `ino`: checks the grant (as for a chain of the grant's hops),
    /// registers the file and answers with its identity and the program's direct pins.
    pub fn direct(&self, caller: &Caller, ino: u64, input: &[u8]) -> Result<Vec<u8>, Refusal> {
        let (mut request, program) = decode_direct(input)?;
        let Decision {
            hops: max_hops,
            max_batch,
            ..
        } = self.check(caller, ino, &program, 0, 1)?;
        let pins = self
            .binding
            .direct_pins(&program)
            .map_err(Self::run_error)?
            .ok_or_else(|| Refusal::new(libc::EOPNOTSUPP, "the programs are not pinned"))?;
        let file = self.binding.register(ino).map_err(Self::run_error)?;
        request.ino = file.ino;
        request.generation = file.generation;
        request.max_hops = max_hops;
        request.max_batch = max_batch;
        for (field, path) in [
            (&mut request.chain_pin, &pins.0),
            (&mut request.batch_pin, &pins.1),
        ] {
            let bytes = path.as_os_str().as_encoded_bytes();
            if bytes.len() >= field.len() {
                return Err(Refusal::new(
                    libc::ENAMETOOLONG,
                    format!("pin path {} is too long", path.display()),
                ));
            }
            field.fill(0);
            field[..bytes.len()].copy_from_slice(bytes);
        }
        Ok(struct_bytes(&request))
    }

    /// `IOC_CHAIN` on inode `ino`: the answer's bytes, or a refusal.
    pub fn chain(&self, caller: &Caller, ino: u64, input: &[u8]) -> Result<Vec<u8>, Refusal> {
        let ChainCall {
            mut request,
            program,
        } = decode_chain(input)?;
        let name = program.as_str();
        let outcome = self
            .check(caller, ino, name, request.hop_limit, 1)
            .and_then(
                |Decision {
                     subject,
                     hops: hop_limit,
                     ..
                 }| {
                    let program = self.binding.program(name).map_err(Self::run_error)?;
                    let mut chain = ChainRequest::new(ino, request.start, &request.scratch);
                    chain.hop_limit = hop_limit;
                    chain.read_len = request.read_len;
                    chain.subject = Some(subject);
                    self.binding.run(&program, &chain).map_err(Self::run_error)
                },
            );
        let outcome = match outcome {
            Ok(outcome) if outcome.status == status::DENIED => {
                Err(Self::kernel_denied(caller, ino, "chain"))
            }
            other => other,
        }?;
        request.status = outcome.status;
        request.hops = outcome.hops;
        request.scratch = outcome.scratch;
        Ok(struct_bytes(&request))
    }

    /// `IOC_CHAIN_BATCH` on inode `ino`.
    pub fn chain_batch(&self, caller: &Caller, ino: u64, input: &[u8]) -> Result<Vec<u8>, Refusal> {
        let BatchCall {
            mut request,
            program,
            count,
        } = decode_batch(input)?;
        let name = program.as_str();
        let result = self
            .check(caller, ino, name, request.hop_limit, request.count)
            .and_then(
                |Decision {
                     subject,
                     hops: hop_limit,
                     ..
                 }| {
                    let program = self.binding.program(name).map_err(Self::run_error)?;
                    let mut batch = BatchRequest::new(ino);
                    batch.hop_limit = hop_limit;
                    batch.read_len = request.read_len;
                    batch.subject = Some(subject);
                    // Misses are read together and resumed (DESIGN "How a chain's misses
                    // are served"), never waited for one at a time inside the kernel.
                    batch.overlap_misses = true;
                    let items: Vec<BatchItem> = request.lookups[..count]
                        .iter()
                        .map(|lookup| BatchItem::new(lookup.start, &lookup.scratch))
                        .collect();
                    self.binding
                        .run_batch(&program, &batch, &items)
                        .map_err(Self::run_error)
                },
            );
        let result = match result {
            Ok((outcomes, _)) if outcomes.iter().all(|o| o.status == status::DENIED) => {
                Err(Self::kernel_denied(caller, ino, "batch"))
            }
            other => other,
        };
        let (outcomes, _) = result?;
        request.done = 0;
        for (slot, outcome) in request.lookups.iter_mut().zip(&outcomes) {
            slot.status = outcome.status;
            slot.hops = outcome.hops;
            slot.scratch = outcome.scratch;
            request.done += u32::from(outcome.status == status::DONE);
        }
        Ok(struct_bytes(&request))
    }

    /// `IOC_POLICY_RELOAD`: (0, empty answer) when the new policy is in force, (1, the
    /// mistakes) when the file has some and the old policy stays.
    pub fn reload_policy(&self, caller: &Caller) -> Result<(i32, Vec<u8>), Refusal> {
        if caller.uid != 0 && caller.uid != self.owner {
            return Err(Refusal::new(
                libc::EPERM,
                format!(
                    "uid {}: only root or the mount's owner reloads the policy",
                    caller.uid
                ),
            ));
        }
        let Some(path) = &self.policy_path else {
            return Err(Refusal::new(
                libc::EINVAL,
                "the mount has no policy file (-o policy=FILE)",
            ));
        };
        let mut answer = PolicyReload::default();
        match policy::load(path) {
            Ok(policy) => {
                {
                    let mut compiled = self.lock();
                    compiled.policy = policy;
                    compiled.namespace = None;
                }
                drop(self.compiled_now()?);
                log::info!("policy reloaded from {}", path.display());
                Ok((0, struct_bytes(&answer)))
            }
            Err(mistakes) => {
                log::warn!("policy reload refused:\n{mistakes}");
                let bytes = mistakes.as_bytes();
                let len = bytes.len().min(ioctl::MESSAGE_SIZE - 1);
                answer.message[..len].copy_from_slice(&bytes[..len]);
                Ok((1, struct_bytes(&answer)))
            }
        }
    }

    /// One more handle of `uid` holds a ticket for `ino` (it asked for the file with
    /// IOC_DIRECT): the kernel lets `uid` run direct chains over it while any does.
    pub fn take_ticket(&self, uid: u32, ino: u64) -> Result<(), Refusal> {
        let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let holders = tickets.entry((uid, ino)).or_insert(0);
        if *holders == 0 {
            self.binding
                .grant_ticket(uid, ino)
                .map_err(|err| Refusal::new(libc::EIO, format!("granting a ticket: {err}")))?;
        }
        *holders += 1;
        Ok(())
    }

    /// A handle that held a ticket of `uid` for `ino` closed; the last one takes the
    /// ticket out of the kernel.
    pub fn drop_ticket(&self, uid: u32, ino: u64) {
        let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let Some(holders) = tickets.get_mut(&(uid, ino)) else {
            return;
        };
        *holders -= 1;
        if *holders == 0 {
            tickets.remove(&(uid, ino));
            if let Err(err) = self.binding.revoke_ticket(uid, ino) {
                log::error!("revoking the ticket of uid {uid} for inode {ino}: {err}");
            }
        }
    }

    /// Takes `ino` out of the kernel maps (its last handle closed).
    pub fn forget_file(&self, ino: u64) {
        if let Err(err) = self.binding.unregister(ino) {
            log::error!("unregistering inode {ino}: {err}");
        }
    }

    /// Removes every pin (programs included): at unmount. The files are unregistered when
    /// the service is dropped.
    pub fn remove_pins(&self) -> Result<(), BindingError> {
        self.binding.remove_all_pins()
    }
}

/// Where cgroup2 is mounted (the unified hierarchy), from /proc/self/mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fs_type = after.split_whitespace().next()?;
        let mount_point = before.split_whitespace().nth(4)?;
        (fs_type == "cgroup2").then(|| PathBuf::from(mount_point.replace("\\040", " ")))
    })
}
