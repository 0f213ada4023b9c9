//! `exofs mount` and `exofs umount`.
//!
//! `exofs mount IMAGE MOUNTPOINT [-f] [-o OPTIONS]` serves the image over FUSE (fuser,
//! without libfuse; mounting needs root). Without `-f` it starts itself again in the
//! foreground, detached in a new session, and returns once the mount is up (or prints
//! why it failed); with `-f` it stays in the foreground and logs to stderr.
//!
//! Stopping: SIGTERM or SIGINT to the daemon, `exofs umount MOUNTPOINT`, or a plain
//! `umount` all end the session; the daemon then releases every handle and checkpoints
//! the journal before it exits. `exofs umount` waits until the daemon has let go of the
//! image. After a kill -9, the next mount replays the journal.

use crate::chains::ChainService;
use crate::fuse::ExofsFuse;
use fuser::{Config, MountOption, SessionACL};
use kernel_ext::binding::{Binding, BindingOptions};
use kernel_ext::hot::HotWrites;
use libfs::{FileDevice, Fs, OpenOptions};
use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// The line a background daemon writes to its parent once the mount is up.
const READY: &str = "ready";
/// Environment variable telling a foreground daemon to report readiness on stdout.
const REPORT_READY: &str = "EXOFS_REPORT_READY";

/// Bytes of blocks in the hot-block table when `-o hot` is not given: about 16k blocks,
/// taken from memory the kernel does not reclaim (map values).
pub const DEFAULT_HOT: u64 = 64 << 20;

/// Parsed `-o` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub read_only: bool,
    /// Every user may use the mount (root's mount is otherwise root's alone); what each
    /// may do is decided by the permission checks.
    pub allow_other: bool,
    /// The kernel checks permissions before the daemon does (FUSE `default_permissions`).
    /// On unless `no_default_permissions`: the daemon checks every request either way.
    pub default_permissions: bool,
    /// Metadata cache budget in bytes.
    pub cache: Option<u64>,
    /// Bytes of blocks in the hot-block table direct chains read (`-o hot=SIZE`; 0: no
    /// table; default [`DEFAULT_HOT`]).
    pub hot: Option<u64>,
    /// The policy file (absolute): who may run chains on which files.
    pub policy: Option<PathBuf>,
    /// Where a background daemon logs (appended); without it only `-f` logs (stderr).
    pub log: Option<PathBuf>,
    /// Where bpffs is mounted (overrides `--bpffs`; for fstab lines).
    pub bpffs: Option<PathBuf>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            allow_other: false,
            default_permissions: true,
            cache: None,
            hot: None,
            policy: None,
            log: None,
            bpffs: None,
        }
    }
}

impl MountOptions {
    /// Parses a comma-separated option list; names the option that is wrong.
    pub fn parse(list: &str) -> Result<Self> {
        let mut options = Self::default();
        for option in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = match option.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (option, None),
            };
            match (name, value) {
                ("ro", None) => options.read_only = true,
                ("rw", None) => options.read_only = false,
                ("allow_other", None) => options.allow_other = true,
                ("default_permissions", None) => options.default_permissions = true,
                ("no_default_permissions", None) => options.default_permissions = false,
                ("cache", Some(size)) => {
                    options.cache = Some(
                        crate::size::parse_size(size)
                            .map_err(|e| format!("-o cache={size}: {e}"))?,
                    );
                }
                ("hot", Some(size)) => {
                    options.hot = Some(
                        crate::size::parse_size(size).map_err(|e| format!("-o hot={size}: {e}"))?,
                    );
                }
                ("policy", Some(file)) => {
                    let path = absolute(file, "policy")?;
                    crate::policy::load(&path)?;
                    options.policy = Some(path);
                }
                ("log", Some(file)) => options.log = Some(absolute(file, "log")?),
                ("bpffs", Some(dir)) => options.bpffs = Some(absolute(dir, "bpffs")?),
                // Options mount(8) and fstab pass that mean nothing here.
                (
                    "dev" | "suid" | "exec" | "auto" | "noauto" | "nouser" | "async" | "defaults"
                    | "nofail" | "_netdev" | "relatime" | "noatime",
                    None,
                ) => {}
                _ if name.starts_with("x-") => {}
                _ => return Err(format!("unknown mount option `{option}`").into()),
            }
        }
        Ok(options)
    }
}

/// `file` made absolute (the daemon reads it again on `policy reload`).
fn absolute(file: &str, option: &str) -> Result<PathBuf> {
    if file.is_empty() {
        return Err(format!("-o {option}=: give a file").into());
    }
    Ok(std::path::absolute(file).map_err(|e| format!("-o {option}={file}: {e}"))?)
}

/// `exofs mount`.
pub fn mount(
    image: &Path,
    mountpoint: &Path,
    foreground: bool,
    options: &str,
    bpffs: &Path,
) -> Result<()> {
    let parsed = MountOptions::parse(options)?;
    if !mountpoint.is_dir() {
        return Err(format!("{}: not a directory", mountpoint.display()).into());
    }
    let bpffs = parsed.bpffs.as_deref().unwrap_or(bpffs);
    if foreground {
        return serve(image, mountpoint, &parsed, bpffs);
    }
    spawn_daemon(image, mountpoint, &parsed, bpffs)
}

/// The options again as `-o` text, with files made absolute (the daemon starts in its
/// own session; its working directory is the same, but absolute paths read better in
/// `ps`).
fn option_text(options: &MountOptions) -> String {
    let mut list = Vec::new();
    if options.read_only {
        list.push("ro".to_owned());
    }
    if options.allow_other {
        list.push("allow_other".to_owned());
    }
    if !options.default_permissions {
        list.push("no_default_permissions".to_owned());
    }
    if let Some(cache) = options.cache {
        list.push(format!("cache={cache}"));
    }
    if let Some(hot) = options.hot {
        list.push(format!("hot={hot}"));
    }
    if let Some(policy) = &options.policy {
        list.push(format!("policy={}", policy.display()));
    }
    if let Some(log) = &options.log {
        list.push(format!("log={}", log.display()));
    }
    if let Some(bpffs) = &options.bpffs {
        list.push(format!("bpffs={}", bpffs.display()));
    }
    list.join(",")
}

/// Starts `exofs mount -f` detached and waits for it to report the mount up.
fn spawn_daemon(
    image: &Path,
    mountpoint: &Path,
    options: &MountOptions,
    bpffs: &Path,
) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    command
        .arg("--bpffs")
        .arg(bpffs)
        .arg("mount")
        .arg(image)
        .arg(mountpoint)
        .arg("-f")
        .env(REPORT_READY, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let options = option_text(options);
    if !options.is_empty() {
        command.arg("-o").arg(options);
    }
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal and
    // process group so that it outlives this command.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().ok_or("no pipe to the daemon")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() == READY {
        // Reaped by a thread of its own: a caller that lives on (the benchmarks mount
        // in-process) would otherwise keep the daemon, once it exits, as a zombie.
        std::thread::spawn(move || child.wait());
        return Ok(());
    }
    let status = child.wait()?;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
    }
    Err(format!("the mount daemon failed ({status}): {}", stderr.trim()).into())
}

/// SIGTERM and SIGINT, the signals that stop the daemon cleanly.
fn stop_signals() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    set
}

/// Starts a thread that waits for the stop signals (blocked everywhere else) and
/// unmounts, which ends the session.
fn stop_on_signals(mut unmounter: fuser::SessionUnmounter) -> Result<()> {
    let set = stop_signals();
    std::thread::Builder::new()
        .name("exofs-signals".into())
        .spawn(move || {
            if let Ok(signal) = set.wait() {
                log::info!("{signal}: unmounting");
                if let Err(err) = unmounter.unmount() {
                    log::error!("unmount: {err}");
                }
            }
        })?;
    Ok(())
}

/// The kernel binding's chain service, if BPF is available here. Without a policy file a
/// mount serves files without chains when BPF is missing; with one, that is an error.
fn chain_service(
    fs: &Arc<Fs>,
    writes: &Arc<HotWrites>,
    options: &MountOptions,
    bpffs: &Path,
    namespace: &Arc<AtomicU64>,
) -> Result<Option<Arc<ChainService>>> {
    let hot_bytes = options.hot.unwrap_or(DEFAULT_HOT);
    let binding_options = BindingOptions {
        pin: true,
        bpffs: bpffs.to_owned(),
        hot_bytes,
    };
    let binding = match Binding::open(fs.clone(), &binding_options) {
        Ok(binding) => binding,
        Err(err) if options.policy.is_none() => {
            log::warn!("no kernel binding ({err}): chain ioctls answer EOPNOTSUPP");
            return Ok(None);
        }
        Err(err) => return Err(format!("the kernel binding for the policy: {err}").into()),
    };
    let hot = (hot_bytes > 0).then_some(writes);
    let service = ChainService::new(binding, hot, options.policy.clone(), namespace.clone())?;
    Ok(Some(Arc::new(service)))
}

/// The daemon: mounts, serves until unmounted, then checkpoints and closes.
fn serve(image: &Path, mountpoint: &Path, options: &MountOptions, bpffs: &Path) -> Result<()> {
    // Blocked before any thread starts (threads inherit the mask: the hot-block table's
    // filler, fuser's workers), so that only the waiting thread takes them; one that
    // comes during start-up waits for it.
    stop_signals().thread_block()?;
    let mut open = if options.read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::default()
    };
    if let Some(cache) = options.cache {
        open.cache_bytes = usize::try_from(cache)?;
    }
    // Every write goes through `writes`, which keeps the hot-block table current.
    let named = |e: libfs::Error| format!("{}: {e}", image.display());
    let device = FileDevice::open(image, !options.read_only).map_err(named)?;
    let writes = Arc::new(HotWrites::new(Arc::new(device)));
    let fs = Arc::new(Fs::open_device(writes.clone(), &open).map_err(named)?);
    let namespace = Arc::new(AtomicU64::new(0));
    let chains = chain_service(&fs, &writes, options, bpffs, &namespace)?;
    let mut mount_options = vec![
        MountOption::FSName(image.display().to_string()),
        MountOption::Subtype("exofs".into()),
    ];
    if options.read_only {
        mount_options.push(MountOption::RO);
    }
    if options.default_permissions {
        mount_options.push(MountOption::DefaultPermissions);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(std::thread::available_parallelism().map_or(2, |n| n.get()));
    if !options.read_only {
        commit_periodically(&fs)?;
    }
    let served = ExofsFuse::new(
        fs.clone(),
        chains.clone(),
        namespace,
        options.default_permissions,
    )
    .map_err(|e| format!("starting the policy refresher: {e}"))?;
    let mut session = fuser::Session::new(served, mountpoint, &config).map_err(|e| {
        format!(
            "mounting {} on {}: {e}",
            image.display(),
            mountpoint.display()
        )
    })?;
    stop_on_signals(session.unmount_callable())?;
    if std::env::var_os(REPORT_READY).is_some() {
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{READY}")?;
        stdout.flush()?;
        detach_output(options.log.as_deref())?;
    }
    log::info!("{} mounted on {}", image.display(), mountpoint.display());
    log_what_the_options_give_away(options);
    session.run()?;
    // The session ended (unmounted): the file system's `destroy` has checkpointed.
    if let Some(chains) = chains {
        if let Err(err) = chains.remove_pins() {
            log::error!("removing the pinned maps and programs: {err}");
        }
    }
    drop(fs);
    Ok(())
}

/// Says in the mount's log what its options give away.
fn log_what_the_options_give_away(options: &MountOptions) {
    if !options.default_permissions {
        log::warn!(
            "no_default_permissions: the kernel does not check permissions on this mount; \
             the daemon alone decides each request, on the caller's ids, supplementary \
             groups and capabilities read from /proc (a caller it cannot see there gets \
             no capabilities and unknown groups). Given away: the kernel's check as \
             a second line; names are not cached, so every path component and every \
             access(2) is a round trip to the daemon"
        );
    }
    if options.allow_other {
        log::info!(
            "allow_other: every user may use this mount; permissions decide what each may do"
        );
    }
}

/// How often the daemon commits the journal when nothing else did (as ext4's default
/// `commit=5`): a crash loses at most this much of what was not fsynced.
const COMMIT_INTERVAL: Duration = Duration::from_secs(5);

/// Starts a thread that commits every COMMIT_INTERVAL while the file system is open.
fn commit_periodically(fs: &Arc<Fs>) -> Result<()> {
    let fs = Arc::downgrade(fs);
    std::thread::Builder::new()
        .name("exofs-commit".into())
        .spawn(move || loop {
            std::thread::sleep(COMMIT_INTERVAL);
            let Some(fs) = fs.upgrade() else {
                return;
            };
            if let Err(err) = fs.sync() {
                log::error!("periodic commit: {err}");
            }
        })?;
    Ok(())
}

/// Replaces stdout (the parent's pipe) and stderr: the parent stops reading once it has
/// the ready line. Logs go to `log` (appended) if given, else nowhere.
fn detach_output(log: Option<&Path>) -> Result<()> {
    let target = match log {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("-o log={}: {e}", path.display()))?,
        None => std::fs::OpenOptions::new().write(true).open("/dev/null")?,
    };
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    nix::unistd::dup2(null.as_raw_fd(), 1)?;
    nix::unistd::dup2(target.as_raw_fd(), 2)?;
    Ok(())
}

/// `mount.exofs SOURCE DIR [-sfnv] [-o OPTIONS]`: what mount(8) runs for `mount -t exofs`
/// and for fstab lines of type exofs (install with `ln -s $(which exofs)
/// /sbin/mount.exofs`). `-f` (fake) does nothing, `-s` (sloppy) ignores unknown options,
/// `-n` and `-v` are accepted; the daemon runs in the background as for `exofs mount`.
pub fn helper(args: &[String]) -> Result<()> {
    let mut positional = Vec::new();
    let mut options = String::new();
    let (mut fake, mut sloppy) = (false, false);
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "-o" => options = rest.next().ok_or("-o needs a value")?.clone(),
            "-t" => {
                rest.next().ok_or("-t needs a value")?;
            }
            flags if flags.starts_with('-') && flags.len() > 1 => {
                for flag in flags[1..].chars() {
                    match flag {
                        'f' => fake = true,
                        's' => sloppy = true,
                        'n' | 'v' => {}
                        other => return Err(format!("unknown flag -{other}").into()),
                    }
                }
            }
            _ => positional.push(arg.clone()),
        }
    }
    let [source, dir] = positional.as_slice() else {
        return Err("usage: mount.exofs SOURCE DIR [-sfnv] [-o OPTIONS]".into());
    };
    if sloppy {
        options = options
            .split(',')
            .filter(|option| MountOptions::parse(option).is_ok())
            .collect::<Vec<_>>()
            .join(",");
    }
    MountOptions::parse(&options)?;
    if fake {
        return Ok(());
    }
    let bpffs = Path::new(kernel_ext::binding::DEFAULT_BPFFS);
    mount(Path::new(source), Path::new(dir), false, &options, bpffs)
}

/// `exofs umount MOUNTPOINT`: unmounts and waits (up to a minute) until the daemon has
/// checkpointed and released the image.
pub fn umount(mountpoint: &Path) -> Result<()> {
    let mountpoint = mountpoint.canonicalize()?;
    let image = mounted_image(&mountpoint)?;
    nix::mount::umount2(&mountpoint, nix::mount::MntFlags::empty())
        .map_err(|e| format!("umount {}: {e}", mountpoint.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        // The daemon holds an exclusive lock on a read-write image until it exits.
        match Fs::open(&image, &OpenOptions::read_only()) {
            Err(libfs::Error::Busy(_)) => std::thread::sleep(Duration::from_millis(20)),
            _ => return Ok(()),
        }
    }
    Err(format!(
        "{}: the daemon still holds the image after 60 s",
        image.display()
    )
    .into())
}

/// One line of /proc/self/mounts.
struct MountEntry {
    source: PathBuf,
    mountpoint: PathBuf,
    fs_type: String,
}

impl MountEntry {
    /// Mounted without libfuse the type shows as plain `fuse`: the source, the image,
    /// tells an exofs mount apart.
    fn is_exofs(&self) -> bool {
        self.fs_type.starts_with("fuse") && is_exofs_image(&self.source)
    }
}

/// Every mount of this process's namespace, from /proc/self/mounts.
fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mounts")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some(MountEntry {
                source: PathBuf::from(unescape(fields.next()?)),
                mountpoint: PathBuf::from(unescape(fields.next()?)),
                fs_type: fields.next()?.to_owned(),
            })
        })
        .collect())
}

/// Every exofs mount as (image, mount point).
pub fn exofs_mounts() -> Result<Vec<(PathBuf, PathBuf)>> {
    Ok(mounts()?
        .into_iter()
        .filter(MountEntry::is_exofs)
        .map(|entry| (entry.source, entry.mountpoint))
        .collect())
}

/// The image of the exofs mount at `mountpoint`.
fn mounted_image(mountpoint: &Path) -> Result<PathBuf> {
    let entry = mounts()?
        .into_iter()
        .find(|entry| entry.mountpoint == mountpoint)
        .ok_or_else(|| format!("{} is not mounted", mountpoint.display()))?;
    if !entry.is_exofs() {
        return Err(format!(
            "{} is not an exofs mount ({} from {})",
            mountpoint.display(),
            entry.fs_type,
            entry.source.display()
        )
        .into());
    }
    Ok(entry.source)
}

/// Whether `path` starts with an exofs superblock (block 0 begins with its magic).
fn is_exofs_image(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|file| std::io::Read::read_exact(&mut &file, &mut magic))
        .is_ok()
        && u32::from_le_bytes(magic) == libfs::format::MAGIC_SUPER
}

/// /proc/mounts escapes spaces, tabs, newlines and backslashes as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Ok(code) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(code);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_name_what_is_wrong() {
        let parsed =
            MountOptions::parse("ro,allow_other,default_permissions,cache=16M").expect("parse");
        assert!(parsed.read_only && parsed.allow_other && parsed.default_permissions);
        assert_eq!(parsed.cache, Some(16 << 20));
        let err = MountOptions::parse("ro,bogus")
            .expect_err("bogus")
            .to_string();
        assert!(err.contains("`bogus`"), "{err}");
        let err = MountOptions::parse("cache=lots")
            .expect_err("bad size")
            .to_string();
        assert!(err.contains("cache=lots"), "{err}");
        let fstab = MountOptions::parse("defaults,noauto,nofail,x-systemd.automount,rw")
            .expect("fstab options");
        assert_eq!(fstab, MountOptions::default());
    }

    #[test]
    fn the_kernel_checks_permissions_unless_told_not_to() {
        assert!(MountOptions::default().default_permissions);
        assert!(
            MountOptions::parse("allow_other")
                .expect("parse")
                .default_permissions
        );
        let off = MountOptions::parse("no_default_permissions").expect("parse");
        assert!(!off.default_permissions);
        let again = MountOptions::parse(&option_text(&off)).expect("parse again");
        assert_eq!(again, off, "the daemon restarts with the check off");
    }

    #[test]
    fn options_survive_the_daemon_restart() {
        let parsed = MountOptions::parse(
            "ro,allow_other,default_permissions,cache=16M,log=/tmp/exofs.log,bpffs=/tmp/bpf",
        )
        .expect("parse");
        let again = MountOptions::parse(&option_text(&parsed)).expect("parse again");
        assert_eq!(again, parsed);
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
