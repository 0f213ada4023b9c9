//! `exofs bench chain --via-mount`: B-tree lookups through an exofs FUSE mount, run by an
//! unprivileged user (`--user`, default nobody), the way an application without any
//! privilege reaches the index:
//!   fuse_pread   one pread per hop on the file on the mount (a FUSE read only when
//!                the page cache does not have the node);
//!   fuse_direct  one pread per hop with O_DIRECT: one FUSE round trip per hop, what
//!                the chain ioctl saves;
//!   fuse_mmap    a shared read mapping of the file on the mount, walked in place;
//!   ioctl_chain  the chain ioctl: one FUSE round trip per lookup, however many hops;
//!   ioctl_batch  the batch ioctl: 32 lookups per round trip;
//!   direct_chain the user runs the program's direct variant itself: one bpf(2) call per
//!                lookup, no daemon in the data path (exofs-client, `Via::Direct`);
//!   direct_batch the same, 32 lookups per call.
//!
//! Method: the index is built as for `bench chain`; the image is mounted with a policy
//! granting the user the index and the program. Each phase runs in a child process
//! with the user's uid (this same binary, `--client`), which prints its timings. Warm
//! phases follow an untimed pass over the same keys; before each cold phase the mount is
//! remounted (a fresh daemon, whose device mapping is empty) and the caches dropped as
//! `bench mount` drops them (sync, drop_caches, a pause for the host's write-back).
//! Every phase runs `--rounds` times, the paths taking turns (each round starts with the
//! next path); the table shows each phase's median round, and the ratio the goal is
//! about (ioctl_chain against fuse_direct) is printed for every round.
//!
//! Out of core (`--cache-budget`): this process enters a memory cgroup of that size before
//! it mounts, so the daemon, the clients and every page cache they fill (the FUSE file's
//! and the device's) share the budget; the index is 16 times it by default. The cold
//! mode becomes `ooc`: before each phase a fresh daemon and dropped caches, then the
//! client makes an untimed warm-up of half as many lookups with other keys (the upper
//! levels settle in the budget, as a long-running application's would), then the timed
//! lookups. The daemon's own block cache (anonymous memory, which the budget must also
//! hold) is an eighth of the budget.

use crate::bench_chain::{index_keys, ChainArgs, Phase};
use exofs_abi::chain::status;
use exofs_abi::formats::Lookup;
use kernel_ext::binding::DeviceMapping;
use kernel_ext::index;
use std::error::Error;
use std::ffi::CString;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

pub const PATHS: [&str; 7] = [
    "fuse_pread",
    "fuse_direct",
    "fuse_mmap",
    "ioctl_chain",
    "ioctl_batch",
    "direct_chain",
    "direct_batch",
];
const PROGRAM: &str = "bench_btree";

/// The mount and everything it needs; unmounted and removed on drop.
pub(crate) struct Mount {
    image: PathBuf,
    pub(crate) dir: PathBuf,
    bpffs: PathBuf,
    policy: PathBuf,
    /// The daemon's own block cache (`-o cache=`; its hot-block table, `-o hot=`, gets
    /// half as much), when under a budget.
    cache: Option<u64>,
    /// The program loaded at each mount, and its object.
    program: &'static str,
    object: &'static str,
    /// Mount options besides allow_other, the policy and the cache.
    options: &'static str,
}

impl Mount {
    /// Prepares a mount of `image` (mounted by [`Mount::up`]) with a private bpffs and
    /// `policy` as its policy file; under a budget, the daemon's block cache is an eighth
    /// of it and its hot-block table a sixteenth (memory inside the budget: anonymous, and
    /// map values charged to the daemon's cgroup). Otherwise the table has its default
    /// size.
    pub(crate) fn new(
        image: &Path,
        policy: &str,
        budget: Option<u64>,
        (program, object): (&'static str, &'static str),
        options: &'static str,
    ) -> Result<Self> {
        let base = std::env::temp_dir().join(format!("exofs-bench-mount-{}", std::process::id()));
        let mount = Mount {
            image: image.to_owned(),
            dir: base.with_extension("mnt"),
            bpffs: base.with_extension("bpffs"),
            policy: base.with_extension("toml"),
            cache: budget.map(|budget| (budget / 8).max(1 << 20)),
            program,
            object,
            options,
        };
        std::fs::create_dir_all(&mount.dir)?;
        std::fs::create_dir_all(&mount.bpffs)?;
        nix::mount::mount(
            Some("bpf"),
            &mount.bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )?;
        std::fs::write(&mount.policy, policy)?;
        Ok(mount)
    }

    fn exofs(&self, args: &[&str]) -> Result<()> {
        let out = Command::new(std::env::current_exe()?)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(args)
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "exofs {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        Ok(())
    }

    /// Direct hops served from the hot-block table and direct hops in all, so far
    /// (`exofs stats`).
    pub(crate) fn hot_counts(&self) -> Result<(u64, u64)> {
        let out = Command::new(std::env::current_exe()?)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(["stats", Self::path(&self.dir)?])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|line| line.strip_prefix("hot hits"))
            .ok_or("exofs stats printed no hot-block line")?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [hits, "of", all, ..] => Ok((hits.parse()?, all.parse()?)),
            _ => Err(format!("exofs stats: unexpected line `hot hits{line}`").into()),
        }
    }

    fn path(path: &Path) -> Result<&str> {
        path.to_str().ok_or_else(|| "non-UTF-8 path".into())
    }

    /// Mounts (a fresh daemon) and loads the program.
    pub(crate) fn up(&self) -> Result<()> {
        let mut options = format!("allow_other,policy={}", Self::path(&self.policy)?);
        if !self.options.is_empty() {
            options.push(',');
            options.push_str(self.options);
        }
        if let Some(cache) = self.cache {
            // The table is kernel memory the budget cannot reclaim: half the cache's size.
            options.push_str(&format!(",cache={cache},hot={}", cache / 2));
        }
        let (image, dir) = (Self::path(&self.image)?, Self::path(&self.dir)?);
        self.exofs(&["mount", image, dir, "-o", &options])?;
        self.exofs(&["prog", "load", dir, self.program, self.object])
    }

    pub(crate) fn down(&self) -> Result<()> {
        self.exofs(&["umount", Self::path(&self.dir)?])
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(err) = self.down() {
            log::warn!("unmounting the bench mount: {err}");
            // Detached, so that the daemon exits and leaves the budget's cgroup.
            if let Ok(target) = CString::new(self.dir.as_os_str().as_encoded_bytes()) {
                // SAFETY: a live NUL-terminated path.
                unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            }
        }
        if let Ok(target) = CString::new(self.bpffs.as_os_str().as_encoded_bytes()) {
            // SAFETY: a live NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.bpffs);
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::remove_file(&self.policy);
    }
}

/// The user's (uid, gid), from `id`.
pub(crate) fn user_ids(user: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, user]).output()?;
        if !out.status.success() {
            return Err(format!("no user `{user}`").into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// The parent: mounts the index built by `bench chain` and runs each phase as the user.
pub fn run(args: &ChainArgs, image: &Path, key_count: u64, depth: u32) -> Result<Vec<Phase>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("--via-mount mounts and loads BPF: run it as root".into());
    }
    let (uid, gid) = user_ids(&args.user)?;
    // Entered first, left last: the daemon and the clients are its children.
    let _budget = match args.cache_budget {
        Some(budget) => Some(crate::budget::MemoryCgroup::enter(budget)?),
        None => None,
    };
    let mount = Mount::new(
        image,
        &policy_granting(uid, "/index", PROGRAM),
        args.cache_budget,
        (PROGRAM, "example:btree"),
        "hot=128M",
    )?;
    mount.up()?;
    let file = mount.dir.join("index");
    let paths: Vec<&'static str> = PATHS
        .iter()
        .copied()
        .filter(|p| args.paths.is_empty() || args.paths.iter().any(|q| q == p))
        .collect();
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    let mut rounds: Vec<Vec<Phase>> = Vec::new();
    let mut seed = 1u64;
    let cold = if args.cache_budget.is_some() {
        "ooc"
    } else {
        "cold"
    };
    for mode in ["warm", cold] {
        if args
            .mode
            .as_deref()
            .is_some_and(|wanted| wanted != mode && !(wanted == "cold" && mode == "ooc"))
        {
            continue;
        }
        let lookups = if mode == "warm" {
            args.lookups
        } else {
            (args.lookups / 10).max(500)
        };
        rounds.extend(run_rounds(
            &mount,
            &paths,
            mode,
            args.rounds,
            &mut seed,
            &mut |path, seed, _| {
                let before = mount.hot_counts()?;
                let phase = client_phase(
                    &file, path, mode, lookups, seed, key_count, depth, args, uid, gid,
                )?;
                let after = mount.hot_counts()?;
                if path.starts_with("direct") {
                    let (hits, all) = (after.0 - before.0, after.1 - before.1);
                    eprintln!(
                        "{path} {mode}: {hits} of {all} direct hops from the hot-block table ({:.1}%)",
                        100.0 * hits as f64 / all.max(1) as f64
                    );
                }
                Ok(phase)
            },
        )?);
    }
    drop(mount);
    print_rounds(&rounds, args.rounds);
    let mut medians = Vec::new();
    for mode in ["warm", cold] {
        medians.extend(median_phases(&mut rounds, &paths, mode));
    }
    Ok(medians)
}

/// Runs one phase of `path` with its seed, in round `round` (from 0).
pub(crate) type RunPhase<'a> = dyn FnMut(&'static str, u64, usize) -> Result<Phase> + 'a;

/// `rounds` rounds of a phase of every path in `mode`, the paths taking turns (each round
/// starts with the next path); before each phase but a warm one, a fresh daemon and
/// dropped caches. `seed` moves on by one per phase.
pub(crate) fn run_rounds(
    mount: &Mount,
    paths: &[&'static str],
    mode: &str,
    rounds: usize,
    seed: &mut u64,
    phase: &mut RunPhase<'_>,
) -> Result<Vec<Vec<Phase>>> {
    let mut all = Vec::new();
    for round in 0..rounds {
        let mut phases = Vec::new();
        for turn in 0..paths.len() {
            let path = paths[(round + turn) % paths.len()];
            if mode != "warm" {
                mount.down()?;
                crate::bench_mount::drop_all_caches()?;
                mount.up()?;
            }
            *seed += 1;
            phases.push(phase(path, *seed, round)?);
        }
        all.push(phases);
    }
    Ok(all)
}

/// Per path, in the order of `paths`, its median round in `mode` (taken out of `rounds`).
pub(crate) fn median_phases(
    rounds: &mut [Vec<Phase>],
    paths: &[&'static str],
    mode: &str,
) -> Vec<Phase> {
    let mut medians = Vec::new();
    for path in paths {
        let mut runs: Vec<Phase> = rounds
            .iter_mut()
            .flat_map(|round| {
                let at = round.iter().position(|p| p.path == *path && p.mode == mode);
                at.map(|at| round.swap_remove(at))
            })
            .collect();
        runs.sort_by(|a, b| a.per_sec().total_cmp(&b.per_sec()));
        let middle = runs.len() / 2;
        if let Some(median) = runs.into_iter().nth(middle) {
            medians.push(median);
        }
    }
    medians
}

/// Each round's rates, and its ratio of the chain ioctl to one FUSE round trip per hop.
/// `rounds` holds `per_mode` rounds of each mode run, in order.
fn print_rounds(rounds: &[Vec<Phase>], per_mode: usize) {
    for (index, round) in rounds.iter().enumerate() {
        let rate = |path: &str| round.iter().find(|p| p.path == path).map(Phase::per_sec);
        let rates: Vec<String> = round
            .iter()
            .map(|p| format!("{} {:.0}", p.path, p.per_sec()))
            .collect();
        let mode = round.first().map_or("", |p| p.mode);
        let number = index % per_mode + 1;
        let ratio = match (rate("ioctl_chain"), rate("fuse_direct")) {
            (Some(chain), Some(direct)) => {
                format!("; ioctl_chain / fuse_direct {:.2}", chain / direct)
            }
            _ => String::new(),
        };
        println!("{mode} round {number}: {}{ratio}", rates.join(", "));
    }
}

/// Runs one phase in a child process as `uid`/`gid`, and reads its timings.
#[allow(clippy::too_many_arguments)]
fn client_phase(
    file: &Path,
    path: &'static str,
    mode: &'static str,
    lookups: usize,
    seed: u64,
    key_count: u64,
    depth: u32,
    args: &ChainArgs,
    uid: u32,
    gid: u32,
) -> Result<Phase> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(["bench", "chain", "--client"])
        .arg(file)
        .args(["--client-path", path, "--client-mode", mode])
        .args(["--lookups", &lookups.to_string()])
        .args(["--client-seed", &seed.to_string()])
        .args(["--client-keys", &key_count.to_string()])
        .args(["--depth", &depth.to_string()])
        .args(["--node-size", &args.node_size.to_string()])
        .uid(uid)
        .gid(gid);
    run_client(command, path, mode, lookups)
}

/// A policy granting `uid` the file `path` and `program`, with every cap at its widest.
pub(crate) fn policy_granting(uid: u32, path: &str, program: &str) -> String {
    format!(
        "[[subject]]\nuid = {uid}\n\n[[subject.grant]]\npaths = [\"{path}\"]\n\
         programs = [\"{program}\"]\nmax_hops = 64\nmax_batch = 32\n"
    )
}

/// Runs a client `command` (a child as the user) and reads its phase: "elapsed_ns cpu_ns"
/// then one latency in ns per line.
pub(crate) fn run_client(
    mut command: Command,
    path: &'static str,
    mode: &'static str,
    lookups: usize,
) -> Result<Phase> {
    let out = command.output()?;
    if !out.status.success() {
        return Err(format!(
            "the {path} client failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let mut head = lines
        .next()
        .ok_or("no output from the client")?
        .split_whitespace();
    let mut number = || -> Result<u64> { Ok(head.next().ok_or("short client output")?.parse()?) };
    let (elapsed, cpu) = (
        Duration::from_nanos(number()?),
        Duration::from_nanos(number()?),
    );
    let latencies = lines
        .map(str::parse)
        .collect::<std::result::Result<Vec<u64>, _>>()?;
    Ok(Phase {
        path,
        mode,
        lookups,
        elapsed,
        latencies,
        cpu,
        disk: None,
        needed: None,
    })
}

/// The client (`bench chain --client FILE`, run as the unprivileged user): one phase,
/// printed as "elapsed_ns cpu_ns" then one latency in ns per line.
pub fn client(args: &ChainArgs, file: &Path) -> Result<()> {
    let keys = index_keys(args.client_seed, args.client_keys, args.lookups);
    let direct = if args.client_path == "fuse_direct" {
        libc::O_DIRECT
    } else {
        0
    };
    let index = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(direct)
        .open(file)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    // Chains go through a handle, as an application that looks up many times would.
    let handle = exofs_client::Handle::new(&index);
    let node_size = args.node_size;
    let map = if args.client_path == "fuse_mmap" {
        Some(DeviceMapping::map_file(&index)?)
    } else {
        None
    };
    let lookup = |key: u64| -> Result<index::Answer> {
        match args.client_path.as_str() {
            "fuse_pread" | "fuse_direct" => Ok(index::btree_lookup(
                &mut |offset, buf: &mut [u8]| index.read_at(buf, offset).map_err(|e| e.to_string()),
                node_size,
                key,
            )?),
            "fuse_mmap" => {
                let bytes = map.as_ref().ok_or("no mapping")?.bytes();
                Ok(index::btree_lookup(
                    &mut |offset, buf: &mut [u8]| {
                        let at = offset as usize;
                        let source = bytes.get(at..at + buf.len()).ok_or("past the end")?;
                        buf.copy_from_slice(source);
                        Ok(buf.len())
                    },
                    node_size,
                    key,
                )?)
            }
            "ioctl_chain" | "direct_chain" => {
                let ask = Lookup::ask(key);
                let mut chain = exofs_client::Chain::new(PROGRAM, 0, &ask);
                chain.read_len = node_size as u32;
                chain.via = if args.client_path == "direct_chain" {
                    exofs_client::Via::Direct
                } else {
                    exofs_client::Via::Daemon
                };
                let answer = handle.chain(&chain)?;
                let found = Lookup::from_scratch(&answer.scratch);
                Ok(index::Answer {
                    value: (answer.is_done() && found.is_found()).then_some(found.value),
                    hops: answer.hops,
                })
            }
            other => Err(format!("unknown client path {other}").into()),
        }
    };
    let check = |key: u64, answer: &index::Answer| -> Result<()> {
        if answer.value != Some(crate::bench_chain::value_of(key)) || answer.hops != args.depth {
            return Err(format!("key {key}: wrong answer {answer:?}").into());
        }
        Ok(())
    };
    let mut run = |keys: &[u64], latencies: &mut Vec<u64>| -> Result<()> {
        if let Some(via) = match args.client_path.as_str() {
            "ioctl_batch" => Some(exofs_client::Via::Daemon),
            "direct_batch" => Some(exofs_client::Via::Direct),
            _ => None,
        } {
            for group in keys.chunks(32) {
                let asks: Vec<[u8; Lookup::SIZE]> = group.iter().map(|k| Lookup::ask(*k)).collect();
                let lookups: Vec<(u64, &[u8])> = asks.iter().map(|a| (0, &a[..])).collect();
                let start = Instant::now();
                let answers = handle.chain_batch(PROGRAM, 0, &lookups, via)?;
                let ns = start.elapsed().as_nanos() as u64;
                for (key, answer) in group.iter().zip(answers) {
                    let found = Lookup::from_scratch(&answer.scratch);
                    let value =
                        (answer.status == status::DONE && found.is_found()).then_some(found.value);
                    check(
                        *key,
                        &index::Answer {
                            value,
                            hops: answer.hops,
                        },
                    )?;
                    latencies.push(ns);
                }
            }
            return Ok(());
        }
        for key in keys {
            let start = Instant::now();
            let answer = lookup(*key)?;
            latencies.push(start.elapsed().as_nanos() as u64);
            check(*key, &answer)?;
        }
        Ok(())
    };
    timed_phase(
        &args.client_mode,
        &keys,
        // Out of core: other keys, half as many: the upper levels settle in the budget.
        || index_keys(!args.client_seed, args.client_keys, keys.len() / 2),
        &mut run,
    )
}

/// Runs lookups of the keys given, pushing each one's latency in ns.
pub(crate) type RunKeys<'a, K> = dyn FnMut(&[K], &mut Vec<u64>) -> Result<()> + 'a;

/// A client's phase: the untimed pass its mode asks for (warm: the same keys; ooc: the
/// keys `other_keys` gives), then `run` over `keys`, timed, printed for [`run_client`].
pub(crate) fn timed_phase<K>(
    mode: &str,
    keys: &[K],
    other_keys: impl FnOnce() -> Vec<K>,
    run: &mut RunKeys<'_, K>,
) -> Result<()> {
    match mode {
        "warm" => run(keys, &mut Vec::new())?,
        "ooc" => run(&other_keys(), &mut Vec::new())?,
        _ => {}
    }
    let mut latencies = Vec::with_capacity(keys.len());
    let cpu_before = crate::bench_chain::cpu_time();
    let start = Instant::now();
    run(keys, &mut latencies)?;
    let elapsed = start.elapsed();
    let cpu = crate::bench_chain::cpu_time().saturating_sub(cpu_before);
    let mut out = format!("{} {}\n", elapsed.as_nanos(), cpu.as_nanos());
    for latency in latencies {
        out.push_str(&latency.to_string());
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}
