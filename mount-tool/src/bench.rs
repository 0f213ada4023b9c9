//! `exofs bench fs`: libfs against the raw device (the same image file, the same sizes),
//! in one run, reported as ratios.
//!
//! Phases, each timed including the final fdatasync for writes, with the page cache of
//! the image dropped (POSIX_FADV_DONTNEED after a sync, then a pause for the host to
//! finish writing back) before every read phase so both sides read from the device:
//!   sequential write and read of SIZE in 1 MiB requests; random 4 KiB reads and writes
//!   inside those SIZE bytes; then create / stat / unlink of FILES small files, against
//!   the host file system holding the image as the reference.

use clap::{Args, Subcommand};
use libfs::device::{AlignedBuffer, DIRECT_ALIGN};
use libfs::{FileDevice, FormatOptions, Fs, OpenOptions, ROOT_INO};
use std::error::Error;
use std::fs::{File, OpenOptions as StdOpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

#[derive(Subcommand, Debug)]
pub enum Which {
    /// File-system throughput: libfs vs the raw image file.
    Fs(FsArgs),
    /// B-tree lookups: pread, io_uring, in-kernel chain, batched chains, mmap walk.
    Chain(crate::bench_chain::ChainArgs),
    /// File-system workloads through FUSE mounts: exofs vs fuse2fs vs kernel ext4 on a loop device.
    Mount(crate::bench_mount::MountArgs),
    /// SQLite rowid lookups through a mount: chains, batched chains, SQLite itself (on the
    /// mount and on the host), a user-space pread walk.
    Sqlite(crate::bench_sqlite::SqliteArgs),
}

#[derive(Args, Debug)]
pub struct FsArgs {
    /// Image file to use (created; overwritten).
    image: PathBuf,
    /// Bytes for the sequential phases.
    #[arg(long, default_value = "1G", value_parser = crate::size::parse_size)]
    size: u64,
    /// Random 4 KiB operations per random phase.
    #[arg(long, default_value_t = 20_000)]
    random_ops: u64,
    /// Files for the create / stat / unlink phase.
    #[arg(long, default_value_t = 100_000)]
    files: u64,
    /// Rounds of the data phases (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Fs(args) => bench_fs(&args),
        Which::Chain(args) => crate::bench_chain::bench_chain(&args),
        Which::Mount(args) => crate::bench_mount::bench_mount(&args),
        Which::Sqlite(args) => crate::bench_sqlite::bench_sqlite(&args),
    }
}

pub(crate) const CHUNK: usize = 1 << 20;
pub(crate) const PAGE: u64 = 4096;

/// One measured figure.
struct Row {
    workload: &'static str,
    unit: &'static str,
    raw: f64,
    exofs: f64,
}

/// A tiny deterministic generator (xorshift64*), so both sides see the same offsets.
pub(crate) struct Offsets(pub(crate) u64);

impl Offsets {
    pub(crate) fn next(&mut self, pages: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % pages) * PAGE
    }
}

/// How long to let the host finish writing back before a read phase. Measured here: the
/// first cold read of 1 GiB right after writing it ran at 530 MiB/s, the same read
/// three seconds later at 1900-2000 MiB/s — the virtual disk's host was still flushing.
pub(crate) const SETTLE: Duration = Duration::from_secs(3);

/// Syncs, drops the image's pages from the page cache and waits for the device to
/// settle, so the next phase reads from the device under the same conditions for both
/// sides.
pub(crate) fn drop_cache(fd: i32) -> Result<()> {
    // SAFETY: plain syscalls on a descriptor the caller keeps open.
    let rc = unsafe {
        libc::fdatasync(fd);
        libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED)
    };
    if rc != 0 {
        return Err(format!("posix_fadvise failed: {rc}").into());
    }
    std::thread::sleep(SETTLE);
    Ok(())
}

pub(crate) fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

pub(crate) fn per_s(ops: u64, elapsed: Duration) -> f64 {
    ops as f64 / elapsed.as_secs_f64()
}

pub(crate) fn pattern(seed: u64) -> Vec<u8> {
    (0..CHUNK)
        .map(|i| (i as u64).wrapping_mul(31).wrapping_add(seed) as u8)
        .collect()
}

/// The raw side: the image file itself, no file system. Its sequential writes go
/// through O_DIRECT where the file takes it, as libfs's large writes do (libfs
/// `direct`), so that the reference is the device rather than the host's page cache.
fn raw_phases(path: &Path, args: &FsArgs) -> Result<[f64; 4]> {
    let file = StdOpenOptions::new().read(true).write(true).open(path)?;
    let direct = StdOpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok();
    let fd = file.as_raw_fd();
    // O_DIRECT wants an aligned buffer.
    let mut data = AlignedBuffer::new(CHUNK);
    data[..CHUNK].copy_from_slice(&pattern(1)[..CHUNK]);
    let start = Instant::now();
    for offset in (0..args.size).step_by(CHUNK) {
        let chunk = &data[..CHUNK.min((args.size - offset) as usize)];
        match &direct {
            Some(direct) if chunk.len().is_multiple_of(DIRECT_ALIGN) => {
                direct.write_all_at(chunk, offset)?
            }
            _ => file.write_all_at(chunk, offset)?,
        }
    }
    file.sync_data()?;
    let seq_write = mib_per_s(args.size, start.elapsed());
    drop_cache(fd)?;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    for offset in (0..args.size).step_by(CHUNK) {
        file.read_exact_at(&mut buf[..CHUNK.min((args.size - offset) as usize)], offset)?;
    }
    let seq_read = mib_per_s(args.size, start.elapsed());
    let (random_read, random_write) = random_phases(
        args,
        fd,
        |offset, page, write| {
            if write {
                file.write_all_at(page, offset)
            } else {
                file.read_exact_at(page, offset)
            }
            .map_err(Into::into)
        },
        || file.sync_data().map_err(Into::into),
    )?;
    Ok([seq_write, seq_read, random_read, random_write])
}

fn random_phases(
    args: &FsArgs,
    fd: i32,
    mut io: impl FnMut(u64, &mut [u8], bool) -> Result<()>,
    sync: impl Fn() -> Result<()>,
) -> Result<(f64, f64)> {
    let pages = args.size / PAGE;
    let mut page = vec![0u8; PAGE as usize];
    drop_cache(fd)?;
    let mut offsets = Offsets(0x9e37_79b9_7f4a_7c15);
    let start = Instant::now();
    for _ in 0..args.random_ops {
        io(offsets.next(pages), &mut page, false)?;
    }
    let read = per_s(args.random_ops, start.elapsed());
    page.fill(0x5a);
    let start = Instant::now();
    for _ in 0..args.random_ops {
        io(offsets.next(pages), &mut page, true)?;
    }
    sync()?;
    let write = per_s(args.random_ops, start.elapsed());
    Ok((read, write))
}

/// The libfs side: a fresh file system on the same image file.
fn exofs_phases(path: &Path, args: &FsArgs, with_metadata: bool) -> Result<([f64; 4], [f64; 3])> {
    libfs::format(
        Arc::new(FileDevice::open(path, true)?),
        &FormatOptions::default(),
    )?;
    let fs = Fs::open(path, &OpenOptions::default())?;
    let fd = fs.device().raw_fd().ok_or("image has no file descriptor")?;
    let file = fs.create(ROOT_INO, b"bench.dat", 0o644, 0, 0)?.ino;
    let data = pattern(2);
    let start = Instant::now();
    for offset in (0..args.size).step_by(CHUNK) {
        fs.write_at(
            file,
            offset,
            &data[..CHUNK.min((args.size - offset) as usize)],
        )?;
    }
    fs.fsync(file)?;
    let seq_write = mib_per_s(args.size, start.elapsed());
    drop_cache(fd)?;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    for offset in (0..args.size).step_by(CHUNK) {
        let want = CHUNK.min((args.size - offset) as usize);
        if fs.read_at(file, offset, &mut buf[..want])? != want {
            return Err("short read from the benchmark file".into());
        }
    }
    let seq_read = mib_per_s(args.size, start.elapsed());
    let (random_read, random_write) = random_phases(
        args,
        fd,
        |offset, page, write| {
            if write {
                fs.write_at(file, offset, page)?;
            } else {
                fs.read_at(file, offset, page)?;
            }
            Ok(())
        },
        || fs.fsync(file).map_err(Into::into),
    )?;
    let metadata = if with_metadata {
        exofs_metadata(&fs, args.files)?
    } else {
        [0.0; 3]
    };
    fs.close()?;
    Ok(([seq_write, seq_read, random_read, random_write], metadata))
}

fn exofs_metadata(fs: &Fs, files: u64) -> Result<[f64; 3]> {
    let dir = fs.mkdir(ROOT_INO, b"many", 0o755, 0, 0)?.ino;
    let name = |i: u64| format!("file-{i:08}");
    let start = Instant::now();
    for i in 0..files {
        fs.create(dir, name(i).as_bytes(), 0o644, 0, 0)?;
    }
    fs.sync()?;
    let create = per_s(files, start.elapsed());
    let start = Instant::now();
    for i in 0..files {
        fs.lookup(dir, name(i).as_bytes())?;
    }
    let stat = per_s(files, start.elapsed());
    let start = Instant::now();
    for i in 0..files {
        fs.unlink(dir, name(i).as_bytes())?;
    }
    fs.sync()?;
    let unlink = per_s(files, start.elapsed());
    Ok([create, stat, unlink])
}

/// The same metadata workload on the host file system that holds the image.
fn host_metadata(beside: &Path, files: u64) -> Result<[f64; 3]> {
    let dir = beside.with_extension("bench-host-dir");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir(&dir)?;
    let name = |i: u64| dir.join(format!("file-{i:08}"));
    let start = Instant::now();
    for i in 0..files {
        File::create(name(i))?;
    }
    File::open(&dir)?.sync_all()?;
    let create = per_s(files, start.elapsed());
    let start = Instant::now();
    for i in 0..files {
        std::fs::symlink_metadata(name(i))?;
    }
    let stat = per_s(files, start.elapsed());
    let start = Instant::now();
    for i in 0..files {
        std::fs::remove_file(name(i))?;
    }
    File::open(&dir)?.sync_all()?;
    let unlink = per_s(files, start.elapsed());
    std::fs::remove_dir(&dir)?;
    Ok([create, stat, unlink])
}

/// The median of `values` (the upper middle one of an even count); 0 for none.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Per-column median of the rounds.
pub(crate) fn medians<const N: usize>(rounds: &[[f64; N]]) -> [f64; N] {
    std::array::from_fn(|column| median(rounds.iter().map(|r| r[column]).collect()))
}

fn bench_fs(args: &FsArgs) -> Result<()> {
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    if args.size < CHUNK as u64 || !args.size.is_multiple_of(PAGE) {
        return Err("--size must be a multiple of 4 KiB and at least 1 MiB".into());
    }
    // Room for the data file, 100k inodes (one per 16 KiB) and metadata.
    let image_size = (args.size + args.size / 4)
        .max(args.files * 16384 * 5 / 4)
        .max(64 << 20);
    {
        let file = File::create(&args.image)?;
        file.set_len(image_size)?;
    }
    // Rounds alternate the two sides so that neither always runs on a device still busy
    // with the other's writes; each figure is the median over the rounds.
    let mut raw_rounds = Vec::new();
    let mut exofs_rounds = Vec::new();
    let mut exofs_meta = [0.0; 3];
    for round in 0..args.rounds {
        eprintln!(
            "round {}/{}: raw image file, {} MiB ...",
            round + 1,
            args.rounds,
            args.size >> 20
        );
        raw_rounds.push(raw_phases(&args.image, args)?);
        let with_metadata = round == 0;
        if with_metadata {
            eprintln!(
                "round {}/{}: exofs, the same phases, then {} files ...",
                round + 1,
                args.rounds,
                args.files
            );
        } else {
            eprintln!(
                "round {}/{}: exofs, the same phases ...",
                round + 1,
                args.rounds
            );
        }
        let (figures, metadata) = exofs_phases(&args.image, args, with_metadata)?;
        exofs_rounds.push(figures);
        if with_metadata {
            exofs_meta = metadata;
        }
    }
    let raw = medians(&raw_rounds);
    let exofs = medians(&exofs_rounds);
    eprintln!("host file system: {} files ...", args.files);
    let host_meta = host_metadata(&args.image, args.files)?;
    let rows = [
        Row {
            workload: "sequential write 1 MiB",
            unit: "MiB/s",
            raw: raw[0],
            exofs: exofs[0],
        },
        Row {
            workload: "sequential read 1 MiB",
            unit: "MiB/s",
            raw: raw[1],
            exofs: exofs[1],
        },
        Row {
            workload: "random read 4 KiB",
            unit: "IOPS",
            raw: raw[2],
            exofs: exofs[2],
        },
        Row {
            workload: "random write 4 KiB",
            unit: "IOPS",
            raw: raw[3],
            exofs: exofs[3],
        },
        Row {
            workload: "create",
            unit: "files/s",
            raw: host_meta[0],
            exofs: exofs_meta[0],
        },
        Row {
            workload: "stat",
            unit: "files/s",
            raw: host_meta[1],
            exofs: exofs_meta[1],
        },
        Row {
            workload: "unlink",
            unit: "files/s",
            raw: host_meta[2],
            exofs: exofs_meta[2],
        },
    ];
    println!("exofs bench fs: {} MiB, {} random ops, {} files (reference: raw image file; host fs for metadata)", args.size >> 20, args.random_ops, args.files);
    println!(
        "{:<24} {:>8} {:>12} {:>12} {:>7}",
        "workload", "unit", "reference", "exofs", "ratio"
    );
    for row in &rows {
        println!(
            "{:<24} {:>8} {:>12.1} {:>12.1} {:>7.2}",
            row.workload,
            row.unit,
            row.raw,
            row.exofs,
            row.exofs / row.raw
        );
    }
    if let Some(path) = &args.json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| format!(
                "{{\"workload\":\"{}\",\"unit\":\"{}\",\"reference\":{:.1},\"exofs\":{:.1},\"ratio\":{:.3}}}",
                r.workload, r.unit, r.raw, r.exofs, r.exofs / r.raw
            ))
            .collect();
        std::fs::write(path, format!("{{\"results\":[{}]}}\n", items.join(",")))?;
    }
    std::fs::remove_file(&args.image)?;
    Ok(())
}
