//! `exofs bench chain`: B-tree lookups through many paths, in one run, warm and cold.
//!
//! Paths (DESIGN "Performance method"): `pread` (libfs `read_at` per hop),
//! `pread_direct` (an O_DIRECT read per hop: XRP's baseline), `io_uring` (one io_uring
//! read per hop, translated through the file's extents in user space), `io_uring_32` and
//! `io_uring_32_direct` (32 lookups in flight through one io_uring, buffered or
//! O_DIRECT: the strongest user-space peer out of core; bench_walks.rs), `chain` (one
//! in-kernel chain per lookup), `chain_batch` (32 lookups per kernel call; blocks not in
//! memory are read concurrently between calls), `chain_pipelined` (32 lookups in flight,
//! each going on as soon as its own missing block is in: `Binding::run_pipelined`), `mmap` (a user-space walk over a private
//! mapping of the device: the memory limit) and `mmap_random` (the same, MADV_RANDOM). Every path must return the
//! same answers; the run fails otherwise. Cold phases drop the image's page cache (and
//! every mapping of it) first.
//!
//! Out of core: with `--cache-budget SIZE` the measured phases run in a memory cgroup
//! limited to SIZE (budget.rs), the cold phases become out-of-core ones ("ooc": each from
//! the steady state of bench_ooc.rs), and each reports the disk's reads and bytes per
//! lookup, its read amplification, and the best rate the device allows for its misses
//! (measured in the same run). The index should be many times the budget (`--index-size
//! 4G --cache-budget 256M`): an index that fits measures the page cache, not the disk.
//!
//! The index is streamed to the image node by node (`FullBtree::stream`): a 4 GiB index
//! needs no 4 GiB of memory.

use clap::Args;
use exofs_abi::chain::status;
use exofs_abi::formats::btree;
use kernel_ext::binding::{
    BatchItem, BatchRequest, Binding, BindingOptions, BoundProgram, ChainRequest, DeviceMapping,
};
use kernel_ext::index::FullBtree;
use kernel_ext::{examples, index};
use libfs::{Extent, FileDevice, FormatOptions, Fs, OpenOptions, ROOT_INO};
use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

#[derive(Args, Debug)]
pub struct ChainArgs {
    /// B-tree depth (hops per lookup), 1..=8.
    #[arg(long, default_value_t = 6)]
    pub(crate) depth: u32,
    /// Node size: 512 or 4096.
    #[arg(long, default_value_t = 4096)]
    pub(crate) node_size: usize,
    /// Threads per path.
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// Lookups per warm phase (cold phases run a tenth, at least 500).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) lookups: usize,
    /// Index size to aim for (the tree is full: the size follows from depth and fanout).
    /// Default: 64M, or 16 times the --cache-budget (out of core means the index is many
    /// times the memory it may use).
    #[arg(long, value_parser = crate::size::parse_size)]
    pub(crate) index_size: Option<u64>,
    /// Image file to build the index in (created; removed afterwards).
    #[arg(long, default_value = "/tmp/exofs-bench-chain.img")]
    pub(crate) image: PathBuf,
    /// Only these paths (comma-separated), e.g. chain,mmap.
    #[arg(long, value_delimiter = ',')]
    pub(crate) paths: Vec<String>,
    /// Only warm or cold phases.
    #[arg(long)]
    pub(crate) mode: Option<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Draw the last mode's lookups/s per path (beside the device's limit, out of core)
    /// as an SVG chart here.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// Run the measured phases in a memory cgroup of this many bytes (e.g. 256M), made
    /// and removed by the bench, and count the disk's reads of each phase.
    #[arg(long, value_parser = crate::size::parse_size)]
    pub(crate) cache_budget: Option<u64>,
    /// Through an exofs FUSE mount, as an unprivileged user: FUSE pread per hop, FUSE
    /// mmap, the chain ioctl and the batch ioctl (see bench_via_mount.rs).
    #[arg(long)]
    pub(crate) via_mount: bool,
    /// With --via-mount: rounds of every phase, the paths taking turns; the table shows
    /// each phase's median round.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// The user the --via-mount lookups run as.
    #[arg(long, default_value = "nobody")]
    pub(crate) user: String,
    /// (Internal: one --via-mount phase, run as the user, on this file of the mount.)
    #[arg(long, hide = true)]
    pub(crate) client: Option<PathBuf>,
    #[arg(long, hide = true, default_value = "")]
    pub(crate) client_path: String,
    #[arg(long, hide = true, default_value = "warm")]
    pub(crate) client_mode: String,
    #[arg(long, hide = true, default_value_t = 1)]
    pub(crate) client_seed: u64,
    #[arg(long, hide = true, default_value_t = 1)]
    pub(crate) client_keys: u64,
}

const PATHS: [&str; 10] = [
    "pread",
    "pread_direct",
    "io_uring",
    "io_uring_32",
    "io_uring_32_direct",
    "chain",
    "chain_batch",
    "chain_pipelined",
    "mmap",
    "mmap_random",
];
/// Lookups the io_uring walks keep in flight.
const IN_FLIGHT: usize = 32;
/// Lookups handed to one `run_batch` call (four kernel calls of 32 per round). Out of
/// core, interleaved: 128 gave 3.55-3.59x pread, 64 gave 3.3x, 256 no more than 128.
const BATCH_WINDOW: usize = 128;

/// One measured phase.
pub(crate) struct Phase {
    pub(crate) path: &'static str,
    pub(crate) mode: &'static str,
    pub(crate) lookups: usize,
    pub(crate) elapsed: Duration,
    /// Per-lookup latencies in ns (for batches: the call's time, for each lookup in it).
    pub(crate) latencies: Vec<u64>,
    pub(crate) cpu: Duration,
    /// The disk's reads during the phase (with --cache-budget).
    pub(crate) disk: Option<crate::budget::DiskCount>,
    /// Out of core: distinct blocks the phase's lookups needed that were not in memory
    /// when it started.
    pub(crate) needed: Option<u64>,
}

impl Phase {
    pub(crate) fn per_sec(&self) -> f64 {
        self.lookups as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn percentile_us(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let index = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
        sorted.get(index).copied().unwrap_or(0) as f64 / 1000.0
    }
}

/// User + system CPU time of this process.
pub(crate) fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    // SAFETY: zero-initialized and filled by the kernel.
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Device block of a file block, through the file's extents.
fn translate(extents: &[Extent], block: u64) -> Option<u64> {
    let index = extents.partition_point(|e| e.logical <= block);
    let extent = extents.get(index.checked_sub(1)?)?;
    (block < extent.logical + extent.length).then(|| extent.physical + block - extent.logical)
}

fn device_offset(extents: &[Extent], offset: u64) -> std::result::Result<u64, String> {
    let block = translate(extents, offset / 4096)
        .ok_or_else(|| format!("offset {offset} is not mapped"))?;
    Ok(block * 4096 + offset % 4096)
}

/// What the phases share.
struct Setup {
    fs: Arc<Fs>,
    ino: u64,
    extents: Vec<Extent>,
    node_size: usize,
    depth: u32,
    device_fd: i32,
    image: PathBuf,
}

/// Expected answer of a key (the index maps key k to k * 7 + 1).
pub(crate) fn value_of(key: u64) -> u64 {
    key.wrapping_mul(7) + 1
}

/// A thread's latencies and wrong answers, or what went wrong.
type ThreadResult = std::result::Result<(Vec<u64>, usize), String>;

/// Runs `lookups` over `threads` threads, each calling `body(thread, range)` which returns
/// its latencies and its count of wrong answers.
fn run_threads(
    threads: usize,
    lookups: usize,
    body: &(dyn Fn(usize, std::ops::Range<usize>) -> ThreadResult + Sync),
) -> Result<(Duration, Vec<u64>, Duration)> {
    let cpu_before = cpu_time();
    let start = Instant::now();
    let per = lookups.div_ceil(threads);
    let results: Vec<ThreadResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let range = (t * per).min(lookups)..((t + 1) * per).min(lookups);
                scope.spawn(move || body(t, range))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a bench thread panicked".to_owned()))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    let mut latencies = Vec::with_capacity(lookups);
    let mut wrong = 0;
    for result in results {
        let (mut l, w) = result?;
        latencies.append(&mut l);
        wrong += w;
    }
    if wrong > 0 {
        return Err(format!("{wrong} lookups returned a wrong answer").into());
    }
    Ok((elapsed, latencies, cpu))
}

fn check(key: u64, answer: &index::Answer, depth: u32) -> usize {
    usize::from(answer.value != Some(value_of(key)) || answer.hops != depth)
}

fn words(scratch: &[u8]) -> (u64, u64) {
    let word =
        |i: usize| u64::from_le_bytes(scratch[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    (word(1), word(2))
}

/// The lookup's answer from a chain's status, hops and scratch (the example B-tree's
/// `next` leaves found, then value, in the scratch's second and third words).
fn answer_of(ended: i32, hops: u32, scratch: &[u8]) -> index::Answer {
    let (found, value) = words(scratch);
    index::Answer {
        value: (ended == status::DONE && found == 1).then_some(value),
        hops,
    }
}

fn phase_user(
    setup: &Setup,
    path: &str,
    keys: &[u64],
    threads: usize,
) -> Result<(Duration, Vec<u64>, Duration)> {
    let map = match path {
        "mmap" => Some(DeviceMapping::map_private(&setup.fs)?),
        "mmap_random" => {
            let map = DeviceMapping::map_private(&setup.fs)?;
            map.advise(libc::MADV_RANDOM)?;
            Some(map)
        }
        _ => None,
    };
    let translate = |offset: u64| device_offset(&setup.extents, offset);
    let body = |_: usize, range: std::ops::Range<usize>| -> ThreadResult {
        let mut latencies = Vec::with_capacity(range.len());
        let mut wrong = 0;
        if let Some(direct) = match path {
            "io_uring_32" => Some(false),
            "io_uring_32_direct" => Some(true),
            _ => None,
        } {
            let image = crate::bench_walks::open_image(&setup.image, direct)?;
            let keys = &keys[range];
            let fd = std::os::fd::AsRawFd::as_raw_fd(&image);
            let walked = crate::bench_walks::in_flight_walk(
                fd,
                direct,
                &translate,
                setup.node_size,
                keys,
                IN_FLIGHT,
            )?;
            for (key, (answer, ns)) in keys.iter().zip(walked) {
                latencies.push(ns);
                wrong += check(*key, &answer, setup.depth);
            }
            return Ok((latencies, wrong));
        }
        let mut direct = if path == "pread_direct" {
            Some(crate::bench_walks::DirectReader::open(&setup.image)?)
        } else {
            None
        };
        let mut ring = if path == "io_uring" {
            Some(io_uring::IoUring::new(8).map_err(|e| e.to_string())?)
        } else {
            None
        };
        for key in &keys[range] {
            let start = Instant::now();
            let answer = match path {
                "pread" => index::btree_lookup(
                    &mut |offset, buf: &mut [u8]| {
                        setup
                            .fs
                            .read_at(setup.ino, offset, buf)
                            .map_err(|e| e.to_string())
                    },
                    setup.node_size,
                    *key,
                )
                .map_err(|e| e.to_string())?,
                "pread_direct" => {
                    let direct = direct.as_mut().ok_or("no O_DIRECT reader")?;
                    index::btree_lookup(
                        &mut |offset, buf: &mut [u8]| direct.read(translate(offset)?, buf),
                        setup.node_size,
                        *key,
                    )
                    .map_err(|e| e.to_string())?
                }
                "io_uring" => {
                    let ring = ring.as_mut().ok_or("no ring")?;
                    index::btree_lookup(
                        &mut |offset, buf: &mut [u8]| {
                            let at = device_offset(&setup.extents, offset)?;
                            let read = io_uring::opcode::Read::new(
                                io_uring::types::Fd(setup.device_fd),
                                buf.as_mut_ptr(),
                                buf.len() as u32,
                            )
                            .offset(at)
                            .build();
                            // SAFETY: `buf` outlives the submission: we wait for its
                            // completion before returning.
                            unsafe { ring.submission().push(&read) }.map_err(|e| e.to_string())?;
                            ring.submit_and_wait(1).map_err(|e| e.to_string())?;
                            let cqe = ring.completion().next().ok_or("no completion")?;
                            usize::try_from(cqe.result())
                                .map_err(|_| format!("read: errno {}", -cqe.result()))
                        },
                        setup.node_size,
                        *key,
                    )
                    .map_err(|e| e.to_string())?
                }
                _ => {
                    let bytes = map.as_ref().ok_or("no mapping")?.bytes();
                    index::btree_lookup(
                        &mut |offset, buf: &mut [u8]| {
                            let at = device_offset(&setup.extents, offset)? as usize;
                            let source = bytes.get(at..at + buf.len()).ok_or("past the device")?;
                            buf.copy_from_slice(source);
                            Ok(buf.len())
                        },
                        setup.node_size,
                        *key,
                    )
                    .map_err(|e| e.to_string())?
                }
            };
            latencies.push(start.elapsed().as_nanos() as u64);
            wrong += check(*key, &answer, setup.depth);
        }
        Ok((latencies, wrong))
    };
    run_threads(threads, keys.len(), &body)
}

fn phase_chain(
    setup: &Setup,
    binding: &Binding,
    program: &BoundProgram,
    batched: bool,
    keys: &[u64],
    threads: usize,
) -> Result<(Duration, Vec<u64>, Duration)> {
    let scratch = |key: u64| {
        let mut s = [0u8; 24];
        s[..8].copy_from_slice(&key.to_le_bytes());
        s
    };
    let body = |_: usize, range: std::ops::Range<usize>| -> ThreadResult {
        let mut latencies = Vec::with_capacity(range.len());
        let mut wrong = 0;
        let keys = &keys[range];
        if batched {
            let mut request = BatchRequest::new(setup.ino);
            request.read_len = setup.node_size as u32;
            request.overlap_misses = true;
            for group in keys.chunks(BATCH_WINDOW) {
                let items: Vec<BatchItem> = group
                    .iter()
                    .map(|k| BatchItem::new(0, &scratch(*k)))
                    .collect();
                let start = Instant::now();
                let (outcomes, _) = binding
                    .run_batch(program, &request, &items)
                    .map_err(|e| e.to_string())?;
                let ns = start.elapsed().as_nanos() as u64;
                for (key, outcome) in group.iter().zip(outcomes) {
                    latencies.push(ns);
                    let answer = answer_of(outcome.status, outcome.hops, &outcome.scratch);
                    wrong += check(*key, &answer, setup.depth);
                }
            }
        } else {
            for key in keys {
                let mut request = ChainRequest::new(setup.ino, 0, &scratch(*key));
                request.read_len = setup.node_size as u32;
                let start = Instant::now();
                let outcome = binding.run(program, &request).map_err(|e| e.to_string())?;
                latencies.push(start.elapsed().as_nanos() as u64);
                let answer = answer_of(outcome.status, outcome.hops, &outcome.scratch);
                wrong += check(*key, &answer, setup.depth);
            }
        }
        Ok((latencies, wrong))
    };
    run_threads(threads, keys.len(), &body)
}

/// `n` random keys of an index of `count` keys (0, 2, 4, ...), from `seed` (xorshift64*):
/// the same keys for every path that uses the same seed.
pub(crate) fn index_keys(seed: u64, count: u64, n: usize) -> Vec<u64> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            2 * (state.wrapping_mul(0x2545_f491_4f6c_dd1d) % count)
        })
        .collect()
}

/// The fanout whose full tree of `depth` levels is closest to `target` bytes.
fn pick_fanout(depth: u32, node_size: usize, target: u64) -> usize {
    let nodes = |f: u64| (0..depth).map(|level| f.pow(level)).sum::<u64>();
    (2..=btree::capacity(node_size) as u64)
        .take_while(|f| f.checked_pow(depth).is_some_and(|keys| keys <= 50_000_000))
        .min_by_key(|f| (nodes(*f) * node_size as u64).abs_diff(target))
        .unwrap_or(2) as usize
}

pub fn bench_chain(args: &ChainArgs) -> Result<()> {
    if !(1..=8).contains(&args.depth) || !btree::NODE_SIZES.contains(&args.node_size) {
        return Err("--depth must be 1..=8 and --node-size 512 or 4096".into());
    }
    if let Some(file) = &args.client {
        return crate::bench_via_mount::client(args, file);
    }
    let threads = args.threads.max(1);
    let paths: Vec<&'static str> = PATHS
        .iter()
        .copied()
        .filter(|p| args.paths.is_empty() || args.paths.iter().any(|q| q == p))
        .collect();
    let modes: Vec<&'static str> = ["warm", "cold"]
        .into_iter()
        .filter(|m| args.mode.as_deref().is_none_or(|wanted| wanted == *m))
        .collect();

    // The index: a full tree, keys 0, 2, 4, ... (value 7k + 1).
    let index_size = args
        .index_size
        .unwrap_or_else(|| args.cache_budget.map_or(64 << 20, |budget| 16 * budget));
    let tree = FullBtree {
        depth: args.depth,
        fanout: pick_fanout(args.depth, args.node_size, index_size),
        node_size: args.node_size,
    };
    if let Some(budget) = args.cache_budget {
        if tree.bytes() < 16 * budget {
            eprintln!(
                "warning: the index ({:.0} MiB) is less than 16 times the cache budget \
                 ({:.0} MiB): much of it will fit, and the figures are not out of core",
                tree.bytes() as f64 / (1 << 20) as f64,
                budget as f64 / (1 << 20) as f64
            );
        }
    }
    let count = tree.keys();
    let image_size = (tree.bytes() * 5 / 4 + (64 << 20)).next_multiple_of(1 << 20);
    let device = FileDevice::create(&args.image, image_size)?;
    libfs::format(Arc::new(device), &FormatOptions::default())?;
    let fs = Arc::new(Fs::open(&args.image, &OpenOptions::default())?);
    let ino = fs.create(ROOT_INO, b"index", 0o644, 0, 0)?.ino;
    let mut written = 0u64;
    tree.stream(
        |i| (2 * i, value_of(2 * i)),
        1 << 20,
        &mut |bytes: &[u8]| {
            fs.write_at(ino, written, bytes)?;
            written += bytes.len() as u64;
            Ok::<(), libfs::Error>(())
        },
        &mut |done, total| progress("building the index", done, total),
    )?;
    fs.sync()?;
    eprintln!();
    if args.via_mount {
        drop(fs);
        let phases = crate::bench_via_mount::run(args, &args.image, count, tree.depth);
        std::fs::remove_file(&args.image)?;
        return report(args, &phases?, 1, ("fuse_pread", "fuse_mmap"), None);
    }
    let extents = fs.extents(ino)?;
    println!(
        "index: {} keys, depth {}, {}-byte nodes (fanout {}), {:.1} MiB in {} extents; \
         {threads} thread(s)",
        count,
        tree.depth,
        args.node_size,
        tree.fanout,
        tree.bytes() as f64 / (1 << 20) as f64,
        extents.len()
    );
    let device_fd = fs.device().raw_fd().ok_or("the device has no descriptor")?;
    let setup = Setup {
        fs: fs.clone(),
        ino,
        extents,
        node_size: args.node_size,
        depth: tree.depth,
        device_fd,
        image: args.image.clone(),
    };
    let options = BindingOptions {
        pin: false,
        ..BindingOptions::default()
    };
    let mut binding = Binding::open(fs.clone(), &options)?;
    let program = binding.bind("bench_btree", examples::BTREE)?;
    // From here on the page cache this process fills is bounded (left on drop).
    let budget = match args.cache_budget {
        Some(bytes) => {
            let cgroup = crate::budget::MemoryCgroup::enter(bytes)?;
            let disk = crate::budget::DiskReads::of(&args.image)?;
            println!(
                "cache budget: {:.0} MiB in {} (index {:.1}x the budget)",
                bytes as f64 / (1 << 20) as f64,
                cgroup.dir().display(),
                tree.bytes() as f64 / bytes as f64
            );
            Some((cgroup, disk, bytes))
        }
        None => None,
    };
    // Out of core: a mapping to ask which blocks are in memory, and the device's limit.
    let ooc = match &budget {
        Some(_) => {
            let first = setup.extents.first().map_or(0, |e| e.physical);
            let blocks = first..first + tree.bytes() / 4096;
            eprintln!("measuring the device: O_DIRECT 4 KiB random reads at QD1 and QD32");
            let limit =
                crate::bench_ooc::device_limit(&args.image, blocks, Duration::from_millis(1500))?;
            println!(
                "device: {:.0} IOPS at QD1, {:.0} at QD32 (O_DIRECT 4 KiB random reads of the index)",
                limit.qd1, limit.qd32
            );
            Some((DeviceMapping::map_private(&fs)?, limit))
        }
        None => None,
    };

    let mut seed = 0;
    let mut random_keys = |n: usize| -> Vec<u64> {
        seed += 1;
        index_keys(seed, count, n)
    };
    let mut phases: Vec<Phase> = Vec::new();
    for mode in &modes {
        let lookups = if *mode == "warm" {
            args.lookups
        } else {
            (args.lookups / 10).max(500)
        };
        let mode: &'static str = if *mode == "cold" && ooc.is_some() {
            "ooc"
        } else {
            mode
        };
        if let (Some((mapping, _)), Some((_, disk, bytes))) = (&ooc, &budget) {
            let run = OutOfCore {
                setup: &setup,
                program: &program,
                tree: &tree,
                budget: *bytes,
                disk,
                mapping,
                threads,
            };
            phases.extend(run.phases(&mut binding, &paths, lookups, &mut random_keys)?);
            continue;
        }
        for path in &paths {
            let keys = random_keys(lookups);
            eprintln!("{path} {mode}: {lookups} lookups");
            if mode == "warm" {
                // One untimed pass over the same keys fills the page cache and mappings.
                measure(&setup, &binding, &program, path, &keys, threads)?;
            } else {
                binding.remap()?;
                crate::bench::drop_cache(device_fd)?;
            }
            let before = budget.as_ref().map(|(_, disk, _)| disk.now()).transpose()?;
            let (elapsed, latencies, cpu) =
                measure(&setup, &binding, &program, path, &keys, threads)?;
            let disk = match (&budget, before) {
                (Some((_, disk, _)), Some(before)) => Some(disk.now()? - before),
                _ => None,
            };
            phases.push(Phase {
                path,
                mode,
                lookups,
                elapsed,
                latencies,
                cpu,
                disk,
                needed: None,
            });
        }
    }
    let limit = ooc.as_ref().map(|(_, limit)| *limit);
    drop(ooc);
    drop(budget);
    drop(program);
    drop(binding);
    drop(setup);
    drop(fs);
    std::fs::remove_file(&args.image)?;
    report(args, &phases, threads, ("pread", "mmap"), limit)
}

/// Lookups per path and round out of core.
const ROUND_LOOKUPS: usize = 256;

/// The out-of-core phases of a run (bench_ooc.rs says what they start from).
struct OutOfCore<'a> {
    setup: &'a Setup,
    program: &'a BoundProgram,
    tree: &'a FullBtree,
    budget: u64,
    disk: &'a crate::budget::DiskReads,
    mapping: &'a DeviceMapping,
    threads: usize,
}

impl OutOfCore<'_> {
    /// Measures every path out of core, `lookups` each. The paths share one steady
    /// state and take turns in rounds of ROUND_LOOKUPS lookups, in a rotating order:
    /// this host's disk drifts by half its speed over seconds, and paths measured one
    /// after the other measured the drift. The plain mmap walk goes last, alone and
    /// shorter: its read-around ruins the steady state (and runs at tens of lookups/s).
    fn phases(
        &self,
        binding: &mut Binding,
        paths: &[&'static str],
        lookups: usize,
        random_keys: &mut dyn FnMut(usize) -> Vec<u64>,
    ) -> Result<Vec<Phase>> {
        let (together, alone): (Vec<&'static str>, Vec<&'static str>) =
            paths.iter().partition(|path| **path != "mmap");
        let mut phases: Vec<Phase> = together.iter().map(|path| Phase::empty(path)).collect();
        if !together.is_empty() {
            self.settle(binding)?;
            for path in &together {
                eprintln!("{path} ooc: {lookups} untimed lookups (warm-up)");
                self.measure(binding, path, &random_keys(lookups))?;
            }
            let rounds = lookups.div_ceil(ROUND_LOOKUPS);
            for round in 0..rounds {
                eprint!("\rooc: round {} of {rounds}", round + 1);
                let count = ROUND_LOOKUPS.min(lookups - round * ROUND_LOOKUPS);
                for turn in 0..together.len() {
                    let index = (round + turn) % together.len();
                    let keys = random_keys(count);
                    let measured = self.measure(binding, together[index], &keys)?;
                    phases[index].add(measured);
                }
            }
            eprintln!();
        }
        for path in alone {
            let count = lookups.min(ROUND_LOOKUPS);
            eprintln!("{path} ooc: {count} lookups, alone");
            self.settle(binding)?;
            self.measure(binding, path, &random_keys(count / 2))?;
            let mut phase = Phase::empty(path);
            phase.add(self.measure(binding, path, &random_keys(count))?);
            phases.push(phase);
        }
        Ok(phases)
    }

    /// The steady state's start: nothing in memory, then the upper levels that fit in a
    /// quarter of the budget.
    fn settle(&self, binding: &mut Binding) -> Result<()> {
        binding.remap()?;
        crate::bench::drop_cache(self.setup.device_fd)?;
        let upper = crate::bench_ooc::levels_that_fit(self.tree, self.budget / 4);
        crate::bench_ooc::preload(&self.setup.image, &self.setup.extents, upper)?;
        Ok(())
    }

    /// One measured run of `keys` through `path`, with the blocks they need that were
    /// not in memory and the disk's reads.
    fn measure(&self, binding: &Binding, path: &'static str, keys: &[u64]) -> Result<Phase> {
        let blocks = crate::bench_ooc::needed_blocks(self.tree, &self.setup.extents, keys)?;
        let needed = crate::bench_ooc::not_cached(self.mapping, &blocks)?;
        let before = self.disk.now()?;
        let (elapsed, latencies, cpu) =
            measure(self.setup, binding, self.program, path, keys, self.threads)?;
        Ok(Phase {
            path,
            mode: "ooc",
            lookups: keys.len(),
            elapsed,
            latencies,
            cpu,
            disk: Some(self.disk.now()? - before),
            needed: Some(needed),
        })
    }
}

impl Phase {
    /// A phase with nothing measured yet.
    fn empty(path: &'static str) -> Self {
        Self {
            path,
            mode: "ooc",
            lookups: 0,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
            cpu: Duration::ZERO,
            disk: Some(crate::budget::DiskCount::default()),
            needed: Some(0),
        }
    }

    /// Adds the lookups of `other` (of the same path) to this phase.
    fn add(&mut self, mut other: Phase) {
        self.lookups += other.lookups;
        self.elapsed += other.elapsed;
        self.latencies.append(&mut other.latencies);
        self.cpu += other.cpu;
        self.disk = match (self.disk, other.disk) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.needed = match (self.needed, other.needed) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }
}

/// One progress line on stderr, rewritten in place.
fn progress(what: &str, done: u64, total: u64) {
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    eprint!(
        "\r{what}: {:.0} of {:.0} MiB ({:.0}%)",
        mib(done),
        mib(total),
        100.0 * done as f64 / total.max(1) as f64
    );
}

fn phase_pipelined(
    setup: &Setup,
    binding: &Binding,
    program: &BoundProgram,
    keys: &[u64],
    threads: usize,
) -> Result<(Duration, Vec<u64>, Duration)> {
    let body = |_: usize, range: std::ops::Range<usize>| -> ThreadResult {
        let keys = &keys[range];
        let mut request = BatchRequest::new(setup.ino);
        request.read_len = setup.node_size as u32;
        let items: Vec<BatchItem> = keys
            .iter()
            .map(|key| BatchItem::new(0, &key.to_le_bytes()))
            .collect();
        let (outcomes, _) = binding
            .run_pipelined(program, &request, &items, IN_FLIGHT)
            .map_err(|e| e.to_string())?;
        let mut latencies = Vec::with_capacity(keys.len());
        let mut wrong = 0;
        for (key, (outcome, latency)) in keys.iter().zip(outcomes) {
            latencies.push(latency.as_nanos() as u64);
            let answer = answer_of(outcome.status, outcome.hops, &outcome.scratch);
            wrong += check(*key, &answer, setup.depth);
        }
        Ok((latencies, wrong))
    };
    run_threads(threads, keys.len(), &body)
}

fn measure(
    setup: &Setup,
    binding: &Binding,
    program: &BoundProgram,
    path: &str,
    keys: &[u64],
    threads: usize,
) -> Result<(Duration, Vec<u64>, Duration)> {
    match path {
        "chain" => phase_chain(setup, binding, program, false, keys, threads),
        "chain_batch" => phase_chain(setup, binding, program, true, keys, threads),
        "chain_pipelined" => phase_pipelined(setup, binding, program, keys, threads),
        _ => phase_user(setup, path, keys, threads),
    }
}

/// Prints the table (ratios against the `bases`: the pread and the mmap path; out of
/// core, the device's limit for each path's misses) and writes the JSON if asked.
fn report(
    args: &ChainArgs,
    phases: &[Phase],
    threads: usize,
    (pread, mmap): (&str, &str),
    limit: Option<crate::bench_ooc::DeviceLimit>,
) -> Result<()> {
    let with_disk = phases.iter().any(|p| p.disk.is_some());
    let with_limit = limit.is_some() && phases.iter().any(|p| p.needed.is_some());
    let mut header = format!(
        "{:<18} {:<5} {:>10} {:>8} {:>8} {:>9} {:>8} {:>8}",
        "path", "mode", "lookups/s", "p50 us", "p99 us", "cpu us/op", "vs pread", "vs mmap"
    );
    if with_disk {
        header += &format!(" {:>8} {:>7}", "reads/op", "KiB/op");
    }
    if with_limit {
        header += &format!(
            " {:>9} {:>5} {:>9} {:>8}",
            "misses/op", "amp", "limit/s", "of limit"
        );
    }
    println!("{header}");
    let rate = |path: &str, mode: &str| {
        phases
            .iter()
            .find(|p| p.path == path && p.mode == mode)
            .map(Phase::per_sec)
    };
    let figures: Vec<Figures> = phases
        .iter()
        .map(|phase| Figures::of(phase, limit))
        .collect();
    for (phase, figures) in phases.iter().zip(&figures) {
        let ratio = |base: &str| {
            rate(base, phase.mode).map_or("-".to_owned(), |b| format!("{:.2}", phase.per_sec() / b))
        };
        let mut line = format!(
            "{:<18} {:<5} {:>10.0} {:>8.1} {:>8.1} {:>9.2} {:>8} {:>8}",
            phase.path,
            phase.mode,
            phase.per_sec(),
            phase.percentile_us(0.5),
            phase.percentile_us(0.99),
            figures.cpu_us,
            ratio(pread),
            ratio(mmap),
        );
        if with_disk {
            line += &match (figures.reads, figures.kib) {
                (Some(reads), Some(kib)) => format!(" {reads:>8.2} {kib:>7.1}"),
                _ => format!(" {:>8} {:>7}", "-", "-"),
            };
        }
        if with_limit {
            let show = |v: Option<f64>, precision: usize| {
                v.map_or("-".to_owned(), |v| format!("{v:.precision$}"))
            };
            line += &format!(
                " {:>9} {:>5} {:>9} {:>8}",
                show(figures.misses, 2),
                show(figures.amplification, 2),
                show(figures.limit, 0),
                figures.limit.map_or("-".to_owned(), |l| format!(
                    "{:.0}%",
                    100.0 * phase.per_sec() / l
                )),
            );
        }
        println!("{line}");
    }
    if let Some(file) = &args.plot {
        let mode = phases.last().map_or("", |p| p.mode);
        let bars: Vec<crate::bench_plot::Bar> = phases
            .iter()
            .zip(&figures)
            .filter(|(phase, _)| phase.mode == mode)
            .map(|(phase, figures)| crate::bench_plot::Bar {
                path: phase.path.to_owned(),
                rate: phase.per_sec(),
                limit: figures.limit,
            })
            .collect();
        let title = format!(
            "B-tree lookups ({mode}), depth {}, {}-byte nodes, {threads} thread(s)",
            args.depth, args.node_size
        );
        crate::bench_plot::plot(file, &title, &bars)?;
        println!("plot: {}", file.display());
    }
    if let Some(path) = &args.json {
        let mut document = serde_json::json!({ "results": [] });
        if let Some(limit) = limit {
            document["device"] =
                serde_json::json!({ "qd1_iops": limit.qd1, "qd32_iops": limit.qd32 });
        }
        for (phase, figures) in phases.iter().zip(&figures) {
            document["results"]
                .as_array_mut()
                .ok_or("the results are a list")?
                .push(serde_json::json!({
                    "path": phase.path,
                    "mode": phase.mode,
                    "depth": args.depth,
                    "node_size": args.node_size,
                    "threads": threads,
                    "lookups": phase.lookups,
                    "lookups_per_sec": phase.per_sec(),
                    "p50_us": phase.percentile_us(0.5),
                    "p99_us": phase.percentile_us(0.99),
                    "cpu_us_per_lookup": figures.cpu_us,
                    "device_reads": phase.disk.map(|d| d.reads),
                    "device_bytes": phase.disk.map(|d| d.bytes),
                    "misses_per_lookup": figures.misses,
                    "read_amplification": figures.amplification,
                    "limit_lookups_per_sec": figures.limit,
                }));
        }
        std::fs::write(path, serde_json::to_string_pretty(&document)? + "\n")?;
    }
    Ok(())
}

/// A phase's derived figures.
struct Figures {
    cpu_us: f64,
    reads: Option<f64>,
    kib: Option<f64>,
    /// Blocks needed and not in memory, per lookup.
    misses: Option<f64>,
    /// Device bytes over 4 KiB times the blocks needed and not in memory.
    amplification: Option<f64>,
    /// Lookups/s the device allows at the path's queue depth for those misses.
    limit: Option<f64>,
}

impl Figures {
    fn of(phase: &Phase, limit: Option<crate::bench_ooc::DeviceLimit>) -> Self {
        let per = |n: u64| n as f64 / phase.lookups as f64;
        let misses = phase.needed.map(per);
        Self {
            cpu_us: phase.cpu.as_secs_f64() * 1e6 / phase.lookups as f64,
            reads: phase.disk.map(|d| per(d.reads)),
            kib: phase.disk.map(|d| per(d.bytes) / 1024.0),
            misses,
            amplification: match (phase.disk, phase.needed) {
                (Some(disk), Some(needed)) if needed > 0 => {
                    Some(disk.bytes as f64 / (4096.0 * needed as f64))
                }
                _ => None,
            },
            limit: match (limit, misses) {
                (Some(limit), Some(misses)) if misses > 0.0 => {
                    Some(limit.iops_for(phase.path) / misses)
                }
                _ => None,
            },
        }
    }
}
