//! `exofs bench mount`: file-system workloads through a mount, exofs against fuse2fs and
//! against kernel ext4 on a loop device (the ceiling), side by side in one run.
//!
//! Layer: a benchmark program on top of the whole stack; it only uses the mounts the way
//! an application would (open, read, write, fsync, stat, unlink), never libfs directly.
//!
//! Interface: `bench_mount(&MountArgs)` prints a table (and optionally JSON) of, per
//! workload, the three figures and the ratios exofs/fuse2fs and exofs/ext4. The goals
//! it checks: every workload at least as fast as fuse2fs, sequential ones at least 70%
//! of kernel ext4.
//!
//! Invariants:
//! - Every target gets an image of the same size, as a file in the same directory (the
//!   same backing), the same inode count and the same workloads with the same offsets.
//! - Whatever a target set up (image, mount, loop device, fuse2fs process, mount point)
//!   is undone by its `Target` guard, on success, on error and on panic.
//! - Read phases start from cold caches: a sync, then every clean page, dentry and inode
//!   dropped, then a pause for the host to finish writing back.
//! - All targets are mounted at once; the data workloads run in `--rounds` rounds in
//!   which the targets take turns, and the table shows each figure's median. The
//!   small-file workloads run once per target, after the rounds.

use crate::bench::{mib_per_s, pattern, per_s, Offsets, CHUNK, PAGE, SETTLE};
use clap::Args;
use libfs::{FileDevice, FormatOptions};
use std::error::Error;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Work directory for the images and mount points (created).
    #[arg(long, default_value = "/var/tmp/exofs-bench-mount")]
    dir: PathBuf,
    /// Size of each image.
    #[arg(long, default_value = "1G", value_parser = crate::size::parse_size)]
    size: u64,
    /// Bytes for the sequential phases (the file the random phases work in).
    #[arg(long, default_value = "256M", value_parser = crate::size::parse_size)]
    seq: u64,
    /// Random 4 KiB operations per random phase.
    #[arg(long, default_value_t = 20_000)]
    random_ops: u64,
    /// Small files for the create / stat / unlink phases.
    #[arg(long, default_value_t = 100_000)]
    files: u64,
    /// Rounds of the four data workloads, the targets taking turns (the table shows
    /// medians). The small-file workloads run once: fuse2fs needs about 25 minutes for
    /// them.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Only these targets (comma-separated): exofs, fuse2fs, ext4.
    #[arg(long, value_delimiter = ',', default_value = "exofs,fuse2fs,ext4")]
    targets: Vec<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const TARGETS: [&str; 3] = ["exofs", "fuse2fs", "ext4"];

/// Workloads in the order they run, with their units; figures follow this order.
const WORKLOADS: [(&str, &str); 7] = [
    ("sequential write 1 MiB", "MiB/s"),
    ("sequential read 1 MiB", "MiB/s"),
    ("random write 4 KiB", "IOPS"),
    ("random read 4 KiB", "IOPS"),
    ("create 100 B files", "files/s"),
    ("stat", "files/s"),
    ("unlink", "files/s"),
];
/// The data workloads (sequential and random), which run in rounds; the small-file
/// workloads follow them.
const DATA: usize = 4;
/// The sequential workloads, held to a fraction of kernel ext4.
const SEQUENTIAL: usize = 2;
const SEQUENTIAL_GOAL_VS_EXT4: f64 = 0.7;
const SMALL_FILE_BYTES: usize = 100;
/// Seed of the random offsets: every target sees the same pages in the same order.
const OFFSET_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// The programs a target needs besides this one.
fn tools_needed(target: &str) -> &'static [&'static str] {
    match target {
        "fuse2fs" => &["fuse2fs", "mkfs.ext4"],
        "ext4" => &["mkfs.ext4", "losetup"],
        _ => &[],
    }
}

/// `name` in PATH or in the sbin directories (root's tools are often outside a user's PATH).
fn find_tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| format!("{name} not found").into())
}

/// Runs a program to completion; its output is returned, or shown in the error.
fn run(command: &mut Command) -> Result<String> {
    let output = command.stdin(Stdio::null()).output()?;
    if !output.status.success() {
        return Err(format!(
            "{:?} failed ({}): {}",
            command,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn is_mounted(mount_point: &Path) -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let wanted = mount_point.to_string_lossy();
    Ok(mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(wanted.as_ref())))
}

/// One file system under test, and what has been set up for it so far: dropping it
/// undoes all of that, in reverse order.
#[derive(Debug)]
struct Target {
    name: &'static str,
    image: PathBuf,
    mount_point: PathBuf,
    mounted: bool,
    /// The foreground fuse2fs daemon: kept as a child so we know when it has exited.
    fuse2fs: Option<Child>,
    loop_device: Option<String>,
}

impl Target {
    /// Makes the image and mounts it. `inodes` is the same for every target so that the
    /// small-file phases fit (ext4 defaults to one per 16 KiB, too few for 100k files in
    /// 1 GiB).
    fn set_up(name: &'static str, args: &MountArgs, inodes: u64) -> Result<Self> {
        let mut target = Target {
            name,
            image: args.dir.join(format!("{name}.img")),
            mount_point: args.dir.join(format!("{name}.mnt")),
            mounted: false,
            fuse2fs: None,
            loop_device: None,
        };
        std::fs::create_dir_all(&target.mount_point)?;
        if is_mounted(&target.mount_point)? {
            return Err(format!(
                "{} is already mounted (left over from an earlier run?)",
                target.mount_point.display()
            )
            .into());
        }
        ignore_missing(std::fs::remove_file(&target.image))?;
        if name == "exofs" {
            let device = FileDevice::create(&target.image, args.size)?;
            let options = FormatOptions {
                inodes: Some(inodes),
                ..FormatOptions::default()
            };
            libfs::format(Arc::new(device), &options)?;
            let bpffs = Path::new(kernel_ext::binding::DEFAULT_BPFFS);
            crate::mount::mount(&target.image, &target.mount_point, false, "", bpffs)?;
            target.mounted = true;
            return Ok(target);
        }
        File::create(&target.image)?.set_len(args.size)?;
        // Inode tables and journal written now, so that kernel ext4 does not zero them
        // in the background (ext4lazyinit) while it is being measured.
        run(Command::new(find_tool("mkfs.ext4")?)
            .args(["-q", "-F", "-N", &inodes.to_string()])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&target.image))?;
        if name == "fuse2fs" {
            target.mount_fuse2fs()?;
        } else {
            let device = run(Command::new(find_tool("losetup")?)
                .args(["--find", "--show"])
                .arg(&target.image))?;
            target.loop_device = Some(device.clone());
            nix::mount::mount(
                Some(device.as_str()),
                &target.mount_point,
                Some("ext4"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| format!("mount {device} on {}: {e}", target.mount_point.display()))?;
            target.mounted = true;
        }
        Ok(target)
    }

    /// Starts fuse2fs in the foreground (`-f`) as our child and waits for its mount.
    fn mount_fuse2fs(&mut self) -> Result<()> {
        let child = Command::new(find_tool("fuse2fs")?)
            .arg(&self.image)
            .arg(&self.mount_point)
            .args(["-o", "rw", "-f"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        let child = self.fuse2fs.insert(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&self.mount_point)? {
            if let Some(status) = child.try_wait()? {
                return Err(format!("fuse2fs exited before mounting ({status})").into());
            }
            if Instant::now() > deadline {
                return Err("fuse2fs did not mount within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.mounted = true;
        Ok(())
    }

    /// Unmounts, waits for the daemon, detaches the loop device, removes the files.
    /// Tries every step even after one failed, and returns the first failure.
    fn release(&mut self) -> Result<()> {
        let mut first_error: Option<Box<dyn Error>> = None;
        let mut note = |result: Result<()>| {
            if let Err(err) = result {
                first_error.get_or_insert(err);
            }
        };
        if std::mem::take(&mut self.mounted) {
            note(if self.name == "exofs" {
                // Waits until the daemon has checkpointed and let go of the image.
                crate::mount::umount(&self.mount_point)
            } else {
                unmount(&self.mount_point)
            });
        }
        if let Some(child) = self.fuse2fs.take() {
            note(wait_for_exit(child));
        }
        if let Some(device) = self.loop_device.take() {
            let losetup = find_tool("losetup").unwrap_or_else(|_| PathBuf::from("losetup"));
            note(run(Command::new(losetup).args(["-d", &device])).map(drop));
        }
        note(ignore_missing(std::fs::remove_file(&self.image)));
        note(ignore_missing(std::fs::remove_dir(&self.mount_point)));
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Err(err) = self.release() {
            eprintln!("{}: cleaning up: {err}", self.name);
        }
    }
}

/// Removing what is already gone is fine.
fn ignore_missing(result: std::io::Result<()>) -> Result<()> {
    match result {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => Ok(other?),
    }
}

/// umount(2), retried while busy (a daemon may still be answering the last release);
/// as a last resort detached lazily, so that nothing stays mounted.
fn unmount(mount_point: &Path) -> Result<()> {
    use nix::mount::{umount2, MntFlags};
    for _ in 0..50 {
        match umount2(mount_point, MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) => std::thread::sleep(Duration::from_millis(100)),
            result => return Ok(result?),
        }
    }
    umount2(mount_point, MntFlags::MNT_DETACH)?;
    Err(format!("{} stayed busy: detached lazily", mount_point.display()).into())
}

/// fuse2fs exits once unmounted, after writing back what it held; killed if it hangs.
fn wait_for_exit(mut child: Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            // Anything but a clean exit means it stopped on its own (a signal, an
            // error): the figures of that run are not to be trusted.
            if status.success() {
                return Ok(());
            }
            return Err(format!("fuse2fs ended with {status}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()?;
    Err("fuse2fs did not exit within 60 s of the unmount: killed".into())
}

/// Writes back everything, drops the page, dentry and inode caches (all file systems at
/// once, so the FUSE daemons' image files too) and waits for the host as bench fs does.
pub(crate) fn drop_all_caches() -> Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3")?;
    std::thread::sleep(SETTLE);
    Ok(())
}

fn timed(work: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    work()?;
    Ok(start.elapsed())
}

/// The data workloads on a mounted file system, in `WORKLOADS` order.
fn data_workloads(name: &str, root: &Path, args: &MountArgs) -> Result<[f64; DATA]> {
    let seq_path = root.join("seq");
    let chunks = || {
        (0..args.seq)
            .step_by(CHUNK)
            .map(|o| CHUNK.min((args.seq - o) as usize))
    };
    eprintln!("{name}: sequential, {} MiB ...", args.seq >> 20);
    // mkfs's writes (ext4's zeroed inode tables and journal are ~100 MiB) and the last
    // target's go to the device first, not into this target's first timed phase.
    drop_all_caches()?;
    let data = pattern(3);
    let seq_write = timed(|| {
        let mut file = File::create(&seq_path)?;
        for length in chunks() {
            file.write_all(&data[..length])?;
        }
        Ok(file.sync_all()?)
    })?;
    drop_all_caches()?;
    let mut buffer = vec![0u8; CHUNK];
    let seq_read = timed(|| {
        let mut file = File::open(&seq_path)?;
        for length in chunks() {
            file.read_exact(&mut buffer[..length])?;
        }
        Ok(())
    })?;

    eprintln!("{name}: random 4 KiB, {} ops each way ...", args.random_ops);
    let random = |write: bool| {
        let file = OpenOptions::new().read(true).write(write).open(&seq_path)?;
        let mut offsets = Offsets(OFFSET_SEED);
        let mut page = vec![0x5au8; PAGE as usize];
        timed(|| {
            for _ in 0..args.random_ops {
                let offset = offsets.next(args.seq / PAGE);
                if write {
                    file.write_all_at(&page, offset)?;
                } else {
                    file.read_exact_at(&mut page, offset)?;
                }
            }
            if write {
                file.sync_all()?;
            }
            Ok(())
        })
    };
    let random_write = random(true)?;
    drop_all_caches()?;
    let random_read = random(false)?;
    Ok([
        mib_per_s(args.seq, seq_write),
        mib_per_s(args.seq, seq_read),
        per_s(args.random_ops, random_write),
        per_s(args.random_ops, random_read),
    ])
}

/// The small-file workloads: create, stat, unlink.
fn small_file_workloads(name: &str, root: &Path, args: &MountArgs) -> Result<[f64; 3]> {
    eprintln!("{name}: create, stat, unlink of {} files ...", args.files);
    let many = root.join("many");
    std::fs::create_dir(&many).map_err(|e| format!("{}: {e}", many.display()))?;
    let each_file = |operation: &dyn Fn(PathBuf) -> std::io::Result<()>| {
        timed(|| {
            for i in 0..args.files {
                operation(many.join(format!("file-{i:08}")))?;
            }
            Ok(())
        })
    };
    let contents = [0x61u8; SMALL_FILE_BYTES];
    let create = each_file(&|path| File::create(path)?.write_all(&contents))?;
    let stat = each_file(&|path| std::fs::symlink_metadata(path).map(drop))?;
    let unlink = each_file(&|path| std::fs::remove_file(path))?;
    std::fs::remove_dir(&many)?;
    Ok([
        per_s(args.files, create),
        per_s(args.files, stat),
        per_s(args.files, unlink),
    ])
}

pub fn bench_mount(args: &MountArgs) -> Result<()> {
    if let Some(unknown) = args.targets.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        return Err(format!("unknown target {unknown:?}: use exofs, fuse2fs, ext4").into());
    }
    if args.seq < CHUNK as u64 || !args.seq.is_multiple_of(PAGE) {
        return Err("--seq must be a multiple of 4 KiB and at least 1 MiB".into());
    }
    // The sequential file, a 4 KiB block per small file, and an eighth for metadata.
    if args.seq + args.files * PAGE + args.size / 8 > args.size {
        return Err("--size is too small for --seq and --files".into());
    }
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("exofs bench mount needs root: it mounts and drops the caches".into());
    }
    std::fs::create_dir_all(&args.dir)?;
    // Enough inodes for the small files plus room; never fewer than ext4's default.
    let inodes = (args.files + 1024).max(args.size / 16384);
    let mut failed = Vec::new();
    let mut targets = Vec::new();
    for name in TARGETS {
        if !args.targets.iter().any(|t| t == name) {
            continue;
        }
        let missing: Vec<&str> = tools_needed(name)
            .iter()
            .copied()
            .filter(|tool| find_tool(tool).is_err())
            .collect();
        if !missing.is_empty() {
            eprintln!("{name}: skipped: {} not found", missing.join(", "));
            continue;
        }
        eprintln!(
            "{name}: making a {} MiB image and mounting it ...",
            args.size >> 20
        );
        match Target::set_up(name, args, inodes) {
            Ok(target) => targets.push((target, Vec::new())),
            Err(err) => {
                eprintln!("{name}: failed, left out of the results: {err}");
                failed.push(name);
            }
        }
    }
    // The targets take turns, each round starting with the next one, so that none is
    // always measured first or right after the same neighbour.
    for round in 0..args.rounds {
        for turn in 0..targets.len() {
            let index = (round + turn) % targets.len();
            let (target, rounds): &mut (Target, Vec<[f64; DATA]>) = &mut targets[index];
            if failed.contains(&target.name) {
                continue;
            }
            eprintln!(
                "{}: round {} of {} ...",
                target.name,
                round + 1,
                args.rounds
            );
            match data_workloads(target.name, &target.mount_point, args) {
                Ok(figures) => rounds.push(figures),
                Err(err) => {
                    eprintln!("{}: failed, left out of the results: {err}", target.name);
                    failed.push(target.name);
                }
            }
        }
    }
    let mut results: Vec<TargetFigures> = Vec::new();
    for (mut target, rounds) in targets {
        if failed.contains(&target.name) {
            continue;
        }
        let outcome = small_file_workloads(target.name, &target.mount_point, args);
        eprintln!("{}: unmounting ...", target.name);
        let released = target.release();
        match outcome.and_then(|small| released.map(|()| small)) {
            Ok(small) => results.push(TargetFigures {
                name: target.name,
                rounds,
                small,
            }),
            Err(err) => {
                eprintln!("{}: failed, left out of the results: {err}", target.name);
                failed.push(target.name);
            }
        }
    }
    // Only removed when empty: the directory may be the user's.
    std::fs::remove_dir(&args.dir).ok();
    report(args, &results)?;
    if !failed.is_empty() {
        return Err(format!("failed: {}", failed.join(", ")).into());
    }
    Ok(())
}

/// One target's figures: the data workloads per round, the small-file workloads once.
struct TargetFigures {
    name: &'static str,
    rounds: Vec<[f64; DATA]>,
    small: [f64; 3],
}

impl TargetFigures {
    /// The figure of `workload` in the table: the median over the rounds for the data
    /// workloads.
    fn figure(&self, workload: usize) -> f64 {
        match workload.checked_sub(DATA) {
            None => crate::bench::medians(&self.rounds)[workload],
            Some(small) => self.small[small],
        }
    }
}

/// Prints the table and writes the JSON file, if asked for.
fn report(args: &MountArgs, results: &[TargetFigures]) -> Result<()> {
    let of = |target: &str| results.iter().find(|r| r.name == target);
    let figure = |target: &str, workload: usize| of(target).map(|r| r.figure(workload));
    let ratio =
        |workload: usize, base: &str| Some(figure("exofs", workload)? / figure(base, workload)?);
    let text = |value: Option<f64>, precision: usize| {
        value.map_or("-".to_owned(), |v| format!("{v:.precision$}"))
    };
    // "met" only when every check of the workload could be made and passed.
    let goal = |workload: usize| {
        let mut checks = vec![ratio(workload, "fuse2fs").map(|r| r >= 1.0)];
        if workload < SEQUENTIAL {
            checks.push(ratio(workload, "ext4").map(|r| r >= SEQUENTIAL_GOAL_VS_EXT4));
        }
        if checks.contains(&Some(false)) {
            "missed"
        } else if checks.contains(&None) {
            "-"
        } else {
            "met"
        }
    };
    println!(
        "exofs bench mount: {} MiB images in {}, {} MiB sequential, {} random ops, {} files; \
         data workloads: medians of {} rounds",
        args.size >> 20,
        args.dir.display(),
        args.seq >> 20,
        args.random_ops,
        args.files,
        args.rounds
    );
    println!(
        "{:<24} {:>8} {:>12} {:>12} {:>12} {:>10} {:>10} {:>7}",
        "workload", "unit", "exofs", "fuse2fs", "ext4", "vs fuse2fs", "vs ext4", "goal"
    );
    for (workload, (label, unit)) in WORKLOADS.iter().enumerate() {
        println!(
            "{:<24} {:>8} {:>12} {:>12} {:>12} {:>10} {:>10} {:>7}",
            label,
            unit,
            text(figure("exofs", workload), 1),
            text(figure("fuse2fs", workload), 1),
            text(figure("ext4", workload), 1),
            text(ratio(workload, "fuse2fs"), 2),
            text(ratio(workload, "ext4"), 2),
            goal(workload)
        );
    }
    // Each round's ratios, so the spread behind the medians shows.
    if let Some(exofs) = of("exofs") {
        for base in ["fuse2fs", "ext4"] {
            let Some(base_figures) = of(base) else {
                continue;
            };
            for (workload, (label, _)) in WORKLOADS.iter().enumerate().take(DATA) {
                let ratios: Vec<String> = exofs
                    .rounds
                    .iter()
                    .zip(&base_figures.rounds)
                    .map(|(e, b)| format!("{:.2}", e[workload] / b[workload]))
                    .collect();
                println!("  vs {base:<8} {label:<24} by round: {}", ratios.join(" "));
            }
        }
    }
    if let Some(path) = &args.json {
        let json = |value: Option<f64>| value.map_or("null".to_owned(), |v| format!("{v:.3}"));
        let items: Vec<String> = WORKLOADS
            .iter()
            .enumerate()
            .map(|(workload, (label, unit))| {
                format!(
                    "{{\"workload\":\"{label}\",\"unit\":\"{unit}\",\"exofs\":{},\"fuse2fs\":{},\
                     \"ext4\":{},\"exofs_vs_fuse2fs\":{},\"exofs_vs_ext4\":{},\"goal\":\"{}\"}}",
                    json(figure("exofs", workload)),
                    json(figure("fuse2fs", workload)),
                    json(figure("ext4", workload)),
                    json(ratio(workload, "fuse2fs")),
                    json(ratio(workload, "ext4")),
                    goal(workload)
                )
            })
            .collect();
        std::fs::write(
            path,
            format!(
                "{{\"size\":{},\"seq\":{},\"random_ops\":{},\"files\":{},\"rounds\":{},\
                 \"results\":[{}]}}\n",
                args.size,
                args.seq,
                args.random_ops,
                args.files,
                args.rounds,
                items.join(",")
            ),
        )?;
    }
    Ok(())
}
