//! The binding's guarantees under change: pins live exactly as long as programs, a file
//! that changes during a walk makes the chain STALE, and (the leak test) no chain ever
//! returns bytes of a block that was given to another file.
//!
//! Needs root (BPF, bpffs mounts); without it each test prints a SKIPPED line.

mod common;

use common::{compile_c, lookup_scratch, write_fragmented, BpfFs};
use exofs_abi::chain::status;
use exofs_abi::policy::PolicyGrant;
use kernel_ext::binding::{
    BatchItem, BatchRequest, BindingError, BindingOptions, ChainRequest, NamedSubject, PolicyEntry,
    Subject,
};
use kernel_ext::store::Store;
use kernel_ext::{examples, index};
use libfs::{FallocateMode, SetAttr, ROOT_INO};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The subject a speaker names.
fn named(uid: u32, gid: u32, cgroup: u64) -> Option<NamedSubject> {
    Some(NamedSubject { uid, gid, cgroup })
}

#[test]
fn pins_live_as_long_as_programs() {
    let Some(bpffs) = BpfFs::mount("pins") else {
        return;
    };
    let (_image, fs) = common::image("pins", 32 << 20);
    let options = BindingOptions {
        pin: true,
        bpffs: bpffs.dir.clone(),
        ..BindingOptions::default()
    };
    let Some(binding) = common::binding("pins", &fs, &options) else {
        return;
    };
    let dir = binding.pin_dir().expect("pinning").to_owned();
    binding.bind("list", examples::LINKED_LIST).expect("bind");
    for pin in [
        "maps/files",
        "maps/extents",
        "maps/stats",
        "progs/list",
        "batch/list",
    ] {
        assert!(dir.join(pin).exists(), "{pin} is pinned");
    }
    assert!(matches!(
        binding.bind("list", examples::LINKED_LIST),
        Err(BindingError::Exists(_))
    ));
    assert!(matches!(
        binding.bind("../x", examples::LINKED_LIST),
        Err(BindingError::BadName(_))
    ));
    let pairs: Vec<(u64, u64)> = (1..=5).map(|k| (k, k * 11)).collect();
    let ino = write_fragmented(&fs, "list", &index::build_list(&pairs, 1), 2);
    drop(binding);
    assert!(
        dir.join("progs/list").exists(),
        "a pinned program outlives its binding"
    );

    // Another binding (as another process would) finds the program and the maps.
    let binding = common::binding("pins", &fs, &options).expect("reopen");
    assert_eq!(
        binding.program_names().expect("list"),
        vec!["list".to_owned()]
    );
    let program = binding.program("list").expect("pinned program");
    let outcome = binding
        .run(&program, &ChainRequest::new(ino, 0, &lookup_scratch(4)))
        .expect("run");
    assert_eq!((outcome.status, outcome.hops), (status::DONE, 4));
    assert!(binding.stats().expect("stats").chains >= 1);
    binding.unload("list").expect("unload");
    assert!(
        !dir.exists(),
        "the last unload removes every pin: {}",
        dir.display()
    );
    assert!(matches!(
        binding.unload("list"),
        Err(BindingError::NoProgram(_))
    ));
    drop(binding);
    assert!(!dir.exists());
}

/// The mount daemon and `exofs prog` are two processes over the same pins: a program the
/// other one unloads, or loads again under the same name, is seen at the next lookup,
/// although the daemon looks at the pins only when the programs' generation moves.
#[test]
fn programs_changed_by_another_process_are_seen_at_once() {
    let Some(bpffs) = BpfFs::mount("replace") else {
        return;
    };
    let (_image, fs) = common::image("replace", 32 << 20);
    let options = BindingOptions {
        pin: true,
        bpffs: bpffs.dir.clone(),
        ..BindingOptions::default()
    };
    let Some(daemon) = common::binding("replace", &fs, &options) else {
        return;
    };
    daemon.hold().expect("hold");
    let cli = Store::attach(fs.uuid(), &bpffs.dir).expect("attach to the held pins");

    cli.bind("p", examples::LINKED_LIST).expect("bind");
    let first = daemon.program("p").expect("pinned by the other store");
    assert!(Arc::ptr_eq(&first, &daemon.program("p").expect("again")));

    cli.unload("p").expect("unload");
    assert!(matches!(
        daemon.program("p"),
        Err(BindingError::NoProgram(_))
    ));
    cli.bind("p", examples::BTREE).expect("bind again");
    let second = daemon.program("p").expect("the new program");
    assert!(!Arc::ptr_eq(&first, &second), "the old program was kept");

    // A pin removed by hand, not through a store, is not seen until the next change
    // made through one (the documented cost of not looking at the pin every time).
    let dir = daemon.pin_dir().expect("pinning").to_owned();
    std::fs::remove_file(dir.join("progs/p")).expect("remove the pin");
    std::fs::remove_file(dir.join("batch/p")).expect("remove the batch pin");
    assert!(Arc::ptr_eq(
        &second,
        &daemon.program("p").expect("remembered")
    ));
    cli.bind("q", examples::LINKED_LIST).expect("bind another");
    assert!(matches!(
        daemon.program("p"),
        Err(BindingError::NoProgram(_))
    ));

    daemon.remove_all_pins().expect("remove the pins");
    assert!(!dir.exists());
}

#[test]
fn a_change_during_the_walk_is_stale() {
    let Some((_image, fs, binding)) = common::setup("stale", 64 << 20) else {
        return;
    };
    let list = binding.bind("list", examples::LINKED_LIST).expect("bind");
    let pairs: Vec<(u64, u64)> = (1..=60).map(|k| (k, k * 7)).collect();
    let mut bytes = index::build_list(&pairs, 9);
    bytes.resize(200 * 4096, 0);
    let ino = write_fragmented(&fs, "list", &bytes, 4);
    let stop = AtomicBool::new(false);
    let (mut stale_mid_walk, mut done) = (0u64, 0u64);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Blocks 150..160 are not part of the list: every punch bumps the generation.
            let punch = FallocateMode {
                keep_size: true,
                punch_hole: true,
            };
            while !stop.load(Ordering::Relaxed) {
                fs.write_at(ino, 150 * 4096, &[1u8; 10 * 4096])
                    .expect("write");
                fs.fallocate(ino, 150 * 4096, 10 * 4096, punch)
                    .expect("punch");
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let request = ChainRequest::new(ino, 0, &lookup_scratch(60));
        while Instant::now() < deadline && stale_mid_walk < 10 {
            let outcome = binding.run_once(&list, &request).expect("run");
            match outcome.status {
                status::STALE => {
                    assert_eq!(
                        outcome.scratch, request.scratch,
                        "a stale chain returns nothing"
                    );
                    if outcome.hops > 0 {
                        stale_mid_walk += 1;
                    }
                }
                status::DONE => {
                    assert_eq!(outcome.hops, 60);
                    assert_eq!(
                        &outcome.scratch[8..24],
                        &[&1u64.to_le_bytes()[..], &420u64.to_le_bytes()[..]].concat()[..]
                    );
                    done += 1;
                }
                other => panic!("unexpected status {other}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    println!("stale mid-walk: {stale_mid_walk}, done: {done}");
    assert!(
        stale_mid_walk >= 10,
        "changes during walks were seen as stale ({stale_mid_walk})"
    );
    assert!(done > 0, "chains between changes complete");
}

/// First word of every block of the leak test's data files.
const DATA_MAGIC: u64 = 0x4154_4144_5846_5845; // "EXFXDATA"
/// Every byte of the marker files' blocks.
const MARKER: u8 = 0x4d;
const DATA_FILES: usize = 6;
const DATA_BLOCKS: u64 = 48;

/// A block of data file `tag`: magic, tag, version, block number, then filler.
fn data_block(tag: u64, version: u64, block: u64) -> Vec<u8> {
    let mut bytes = vec![0x11u8; 4096];
    for (i, word) in [DATA_MAGIC, tag, version, block].iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
    }
    bytes
}

fn physical_blocks(fs: &libfs::Fs, ino: u64) -> BTreeSet<u64> {
    fs.extents(ino)
        .unwrap_or_default()
        .iter()
        .flat_map(|e| e.physical..e.physical + e.length)
        .collect()
}

/// Threads run chains over data files while another truncates, deletes and rewrites them
/// and fills the freed blocks with marker files. A chain's result (the first 32 bytes of
/// the block it read) must always be a block of the file it named: a marker, or another
/// file's tag, is a leak. Runs EXOFS_LEAK_SECONDS (default 60) seconds.
#[test]
fn no_chain_ever_returns_another_files_block() {
    leak_test("leak", false);
}

/// The leak test with direct chains: the chain threads drop to an unprivileged user
/// (their own credentials: a raw setresuid changes only the calling thread's) and run the
/// program's direct variant, which reads through this process's mapping as the
/// registered daemon's; the data files (never the markers) are granted to that user, and
/// the grants follow the files as they are recreated.
#[test]
fn no_direct_chain_ever_returns_another_files_block() {
    leak_test("leak-direct", true);
}

/// The program of the leak tests: the first 32 bytes of the block at the offset.
const PEEK: &str = "int next(struct exofs_hop_state *s) {
     __u64 *out = (__u64 *)s->scratch;
     if (s->data_len < 32)
         return EXOFS_NEXT_ABORT;
     for (int i = 0; i < 4; i++)
         out[i] = *(__u64 *)&s->data[i * 8];
     return EXOFS_NEXT_DONE;
 }";

/// Direct hops are served from the hot-block table once the daemon has copied their
/// blocks in, and a block written through the file system is what the very next direct
/// chain sees: the write empties the block's slot before it returns.
#[test]
fn the_hot_block_table_serves_direct_hops_and_follows_every_write() {
    let Some((_image, fs, binding)) = common::setup_hot("hot", 16 << 20, 1 << 20) else {
        return;
    };
    binding.serve_direct().expect("become the daemon");
    let peek = compile_c("peek-hot", PEEK);
    let peek = binding.bind("peek", &peek).expect("bind peek");
    const BLOCKS: u64 = 8;
    let ino = fs
        .create(ROOT_INO, b"hot", 0o644, 0, 0)
        .expect("create")
        .ino;
    let write_all = |version: u64| {
        for block in 0..BLOCKS {
            fs.write_at(ino, block * 4096, &data_block(7, version, block))
                .expect("write");
        }
    };
    write_all(0);
    binding
        .load_policy(&[PolicyEntry {
            subject: Subject::Uid(LEAK_USER),
            ino,
            program: "peek".to_owned(),
            grant: PolicyGrant {
                max_hops: 8,
                max_batch: 32,
            },
        }])
        .expect("policy");
    let hits = || binding.stats().expect("stats").hot_hits;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // SAFETY: a raw setresuid changes this thread's credentials only.
            let dropped =
                unsafe { libc::syscall(libc::SYS_setresuid, LEAK_USER, LEAK_USER, LEAK_USER) };
            assert_eq!(dropped, 0, "drop to uid {LEAK_USER}");
            let version_of = |block: u64| {
                let (chain_status, scratch) =
                    direct_peek(&binding, &peek, ino, block * 4096).expect("registered");
                assert_eq!(chain_status, status::DONE, "block {block}");
                let word =
                    |i: usize| u64::from_le_bytes(scratch[i * 8..i * 8 + 8].try_into().expect("8"));
                assert_eq!((word(0), word(1), word(3)), (DATA_MAGIC, 7, block));
                word(2)
            };
            for version in 0..20u64 {
                // Until every block comes from the table.
                for block in 0..BLOCKS {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    loop {
                        let before = hits();
                        assert_eq!(version_of(block), version, "block {block}");
                        if hits() > before {
                            break;
                        }
                        assert!(Instant::now() < deadline, "block {block} is never served");
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                write_all(version + 1);
                for block in 0..BLOCKS {
                    assert_eq!(
                        version_of(block),
                        version + 1,
                        "block {block} read old bytes after a write"
                    );
                }
            }
        });
    });
}

/// A device whose block reads take 300 µs longer, after the bytes are read: a fill of
/// the hot-block table then holds old bytes for that long, the window in which a write
/// can return before the fill writes its slot.
#[derive(Debug)]
struct SlowReads(Arc<dyn libfs::BlockDevice>);

impl libfs::BlockDevice for SlowReads {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)?;
        if buf.len() == 4096 {
            std::thread::sleep(Duration::from_micros(300));
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.0.raw_fd()
    }
    fn settle(&self) -> std::io::Result<()> {
        self.0.settle()
    }
}

/// Writes racing the daemon's filler: once a write of a block has returned, no direct
/// chain reads an older version of it from the table, however the fill that copied the
/// block interleaved with the write (its reads are slowed to make the race likely).
#[test]
fn no_direct_chain_reads_a_block_older_than_the_last_write_that_returned() {
    let slow = |device| Arc::new(SlowReads(device)) as Arc<dyn libfs::BlockDevice>;
    let Some((_image, fs, binding)) = common::setup_hot_over("hot-race", 16 << 20, 1 << 20, slow)
    else {
        return;
    };
    binding.serve_direct().expect("become the daemon");
    let peek = compile_c("peek-hot-race", PEEK);
    let peek = binding.bind("peek", &peek).expect("bind peek");
    const BLOCKS: u64 = 4;
    let ino = fs
        .create(ROOT_INO, b"race", 0o644, 0, 0)
        .expect("create")
        .ino;
    let write_all = |version: u64| {
        for block in 0..BLOCKS {
            fs.write_at(ino, block * 4096, &data_block(9, version, block))
                .expect("write");
        }
    };
    write_all(0);
    binding
        .load_policy(&[PolicyEntry {
            subject: Subject::Uid(LEAK_USER),
            ino,
            program: "peek".to_owned(),
            grant: PolicyGrant {
                max_hops: 8,
                max_batch: 32,
            },
        }])
        .expect("policy");
    let (written, stop, reads) = (AtomicU64::new(0), AtomicBool::new(false), AtomicU64::new(0));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // SAFETY: a raw setresuid changes this thread's credentials only.
            let dropped =
                unsafe { libc::syscall(libc::SYS_setresuid, LEAK_USER, LEAK_USER, LEAK_USER) };
            assert_eq!(dropped, 0, "drop to uid {LEAK_USER}");
            while !stop.load(Ordering::SeqCst) {
                for block in 0..BLOCKS {
                    let floor = written.load(Ordering::SeqCst);
                    let (chain_status, scratch) =
                        direct_peek(&binding, &peek, ino, block * 4096).expect("registered");
                    assert_eq!(chain_status, status::DONE, "block {block}");
                    let version = u64::from_le_bytes(scratch[16..24].try_into().expect("8 bytes"));
                    assert!(
                        version >= floor,
                        "block {block}: version {version} read after version {floor} was written"
                    );
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        scope.spawn(|| {
            for version in 1..=300 {
                write_all(version);
                written.store(version, Ordering::SeqCst);
                // Time for the filler to copy the blocks in before the next write.
                std::thread::sleep(Duration::from_millis(1));
            }
            stop.store(true, Ordering::SeqCst);
        });
    });
    let stats = binding.stats().expect("stats");
    println!(
        "{} reads, {} of {} direct hops from the hot-block table",
        reads.into_inner(),
        stats.hot_hits,
        stats.hot_hits + stats.hot_misses
    );
    assert!(stats.hot_hits > 0, "the hot-block table served no hop");
}

/// Two hops: the block at the offset, then the next block, whose first 32 bytes it
/// returns with the hop it was read at.
const FOLLOW: &str = "int next(struct exofs_hop_state *s) {
     __u64 *out = (__u64 *)s->scratch;
     if (s->data_len < 32)
         return EXOFS_NEXT_ABORT;
     if (s->hop == 0) {
         s->next_file[0] = s->file;
         s->next_offset[0] = s->offset + 4096;
         s->next_count = 1;
         return EXOFS_NEXT_CONTINUE;
     }
     for (int i = 0; i < 4; i++)
         out[i] = *(__u64 *)&s->data[i * 8];
     return EXOFS_NEXT_DONE;
 }";

/// A direct batch with TABLE_ONLY stops each lookup at a block the hot-block table lacks
/// (MISSING, with a resume point and no device offset), and a lookup resumed with
/// `missing` set reads that one block from the daemon's mapping and stops again at the
/// next. With a filled table the batch runs through; without a table worth the name the
/// flag changes nothing.
#[test]
fn a_table_only_direct_batch_stops_at_blocks_the_table_lacks_and_resumes() {
    // A table nobody fills, one the daemon fills, and none (one slot).
    let unfilled = BindingOptions {
        pin: false,
        hot_bytes: 1 << 20,
        ..BindingOptions::default()
    };
    let (_unfilled_image, unfilled_fs) = common::image("table-only-unfilled", 16 << 20);
    let Some(unfilled) = common::binding("table-only", &unfilled_fs, &unfilled) else {
        return;
    };
    let Some((_image, fs, filled)) = common::setup_hot("table-only", 16 << 20, 1 << 20) else {
        return;
    };
    let Some((_plain_image, plain_fs, plain)) = common::setup("table-only-plain", 16 << 20) else {
        return;
    };
    const LOOKUPS: u64 = 8;
    let mut served = Vec::new();
    for (fs, binding) in [
        (&unfilled_fs, &unfilled),
        (&fs, &filled),
        (&plain_fs, &plain),
    ] {
        binding.serve_direct().expect("become the daemon");
        let follow = compile_c("follow-table-only", FOLLOW);
        let follow = binding.bind("follow", &follow).expect("bind follow");
        let ino = fs
            .create(ROOT_INO, b"blocks", 0o644, 0, 0)
            .expect("create")
            .ino;
        for block in 0..=LOOKUPS {
            fs.write_at(ino, block * 4096, &data_block(5, 0, block))
                .expect("write");
        }
        binding
            .load_policy(&[PolicyEntry {
                subject: Subject::Uid(LEAK_USER),
                ino,
                program: "follow".to_owned(),
                grant: PolicyGrant {
                    max_hops: 8,
                    max_batch: 32,
                },
            }])
            .expect("policy");
        let file = binding.register(ino).expect("register");
        binding.grant_ticket(LEAK_USER, ino).expect("ticket");
        served.push((follow, file));
    }
    type Lookups = [exofs_abi::chain::BatchLookup; exofs_abi::chain::MAX_BATCH];
    let batch = |(follow, file): &(Arc<kernel_ext::binding::BoundProgram>, _),
                 lookups: &Lookups| {
        let mut ctx = exofs_abi::chain::BatchCtx {
            file_count: 1,
            hop_limit: 8,
            read_len: 32,
            count: LOOKUPS as u32,
            flags: exofs_abi::chain::TABLE_ONLY,
            lookups: *lookups,
            ..Default::default()
        };
        ctx.files[0] = *file;
        let status = follow
            .direct_batch_program()
            .test_run_pod(&mut ctx)
            .expect("run the direct batch");
        assert_eq!(status, status::DONE as u32);
        ctx
    };
    let mut fresh: Lookups = Default::default();
    for (block, lookup) in fresh.iter_mut().take(LOOKUPS as usize).enumerate() {
        lookup.start_offset = block as u64 * 4096;
    }
    let word = |scratch: &[u8], i: usize| {
        u64::from_le_bytes(scratch[i * 8..i * 8 + 8].try_into().expect("8"))
    };
    let answered = |ctx: &exofs_abi::chain::BatchCtx| {
        for (block, lookup) in ctx.lookups.iter().take(LOOKUPS as usize).enumerate() {
            assert_eq!(lookup.status, status::DONE, "lookup {block}");
            assert_eq!(lookup.hops, 2, "lookup {block}");
            assert_eq!(
                (word(&lookup.scratch, 0), word(&lookup.scratch, 3)),
                (DATA_MAGIC, block as u64 + 1),
                "lookup {block}"
            );
        }
    };
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // SAFETY: a raw setresuid changes this thread's credentials only.
            let dropped =
                unsafe { libc::syscall(libc::SYS_setresuid, LEAK_USER, LEAK_USER, LEAK_USER) };
            assert_eq!(dropped, 0, "drop to uid {LEAK_USER}");
            // The unfilled table: every lookup stops at hop 0, then (resumed) at hop 1.
            let mut lookups = fresh;
            for hop in 0..2u32 {
                let ctx = batch(&served[0], &lookups);
                for (block, lookup) in ctx.lookups.iter().take(LOOKUPS as usize).enumerate() {
                    assert_eq!(
                        lookup.status,
                        status::MISSING,
                        "lookup {block} at hop {hop}"
                    );
                    assert_eq!(lookup.missing, 0, "a device offset was told");
                    assert_eq!(lookup.start_hop, hop, "lookup {block}");
                    assert_eq!(
                        lookup.start_offset,
                        (block as u64 + u64::from(hop)) * 4096,
                        "lookup {block}"
                    );
                }
                lookups = ctx.lookups;
                // Resumed with `missing` u64::MAX: it stops again at once.
                let mut unnamed = lookups;
                for lookup in unnamed.iter_mut() {
                    lookup.missing = u64::MAX;
                }
                let again = batch(&served[0], &unnamed);
                assert!(again.lookups[..LOOKUPS as usize]
                    .iter()
                    .all(|lookup| lookup.status == status::MISSING && lookup.start_hop == hop));
            }
            let ctx = batch(&served[0], &lookups);
            answered(&ctx);

            // The daemon fills its table with the wanted blocks: no stop any more.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let ctx = batch(&served[1], &fresh);
                if ctx.done == LOOKUPS as u32 {
                    answered(&ctx);
                    break;
                }
                let mut lookups = ctx.lookups;
                for lookup in lookups.iter_mut().filter(|l| l.status == status::MISSING) {
                    lookup.missing = 0;
                }
                assert!(Instant::now() < deadline, "the table never held the blocks");
                std::thread::sleep(Duration::from_millis(2));
                batch(&served[1], &lookups);
            }
            // Without a table, the flag changes nothing.
            answered(&batch(&served[2], &fresh));
        });
    });
}

/// The unprivileged user of the direct leak test.
const LEAK_USER: u32 = 65534;

fn leak_test(name: &str, direct: bool) {
    let seconds: u64 = std::env::var("EXOFS_LEAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    // Direct chains as the mount daemon serves them: through its hot-block table, which
    // holds every data block here, filled as chains ask for blocks and emptied as the
    // writer rewrites them.
    let setup = if direct {
        common::setup_hot(name, 24 << 20, 8 << 20)
    } else {
        common::setup(name, 24 << 20)
    };
    let Some((_image, fs, binding)) = setup else {
        return;
    };
    if direct {
        binding.serve_direct().expect("become the daemon");
    }
    let grant_all = |inos: &[u64]| {
        if !direct {
            return;
        }
        let entries: Vec<PolicyEntry> = inos
            .iter()
            .map(|&ino| PolicyEntry {
                subject: Subject::Uid(LEAK_USER),
                ino,
                program: "peek".to_owned(),
                grant: PolicyGrant {
                    max_hops: 8,
                    max_batch: 32,
                },
            })
            .collect();
        binding.load_policy(&entries).expect("policy");
    };
    let peek = compile_c(&format!("peek-{name}"), PEEK);
    let peek = binding.bind("peek", &peek).expect("bind peek");
    let write_file = |name: &str, tag: u64, version: u64| {
        let ino = fs
            .create(ROOT_INO, name.as_bytes(), 0o644, 0, 0)
            .or_else(|_| fs.lookup(ROOT_INO, name.as_bytes()))
            .expect("create")
            .ino;
        for block in 0..DATA_BLOCKS {
            fs.write_at(ino, block * 4096, &data_block(tag, version, block))
                .expect("write data");
        }
        ino
    };
    let inos: Mutex<Vec<u64>> = Mutex::new(
        (0..DATA_FILES)
            .map(|tag| write_file(&format!("data{tag}"), tag as u64, 0))
            .collect(),
    );
    grant_all(&inos.lock().expect("inos"));
    let stop = AtomicBool::new(false);
    let (chains, done, leaks, reused, churns) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    std::thread::scope(|scope| {
        for thread in 0..2u64 {
            let (binding, peek, inos, stop) = (&binding, &peek, &inos, &stop);
            let (chains, done, leaks) = (&chains, &done, &leaks);
            scope.spawn(move || {
                if direct {
                    // SAFETY: a raw setresuid changes this thread's credentials only.
                    let dropped = unsafe {
                        libc::syscall(libc::SYS_setresuid, LEAK_USER, LEAK_USER, LEAK_USER)
                    };
                    assert_eq!(dropped, 0, "drop to uid {LEAK_USER}");
                    // SAFETY: geteuid has no preconditions.
                    assert_eq!(unsafe { libc::geteuid() }, LEAK_USER);
                }
                let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ thread;
                while !stop.load(Ordering::Relaxed) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let tag = (state % DATA_FILES as u64) as usize;
                    let block = (state >> 20) % DATA_BLOCKS;
                    let ino = inos.lock().expect("inos")[tag];
                    chains.fetch_add(1, Ordering::Relaxed);
                    let outcome = if direct {
                        direct_peek(binding, peek, ino, block * 4096)
                    } else {
                        let mut request = ChainRequest::new(ino, block * 4096, &[]);
                        request.read_len = 32;
                        binding
                            .run(peek, &request)
                            .ok()
                            .map(|outcome| (outcome.status, outcome.scratch))
                    };
                    let Some((chain_status, scratch)) = outcome else {
                        continue; // deleted under us: nothing was read
                    };
                    if chain_status != status::DONE {
                        continue;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    let word = |i: usize| {
                        u64::from_le_bytes(scratch[i * 8..i * 8 + 8].try_into().expect("8"))
                    };
                    let own = word(0) == DATA_MAGIC && word(1) == tag as u64;
                    if !own {
                        leaks.fetch_add(1, Ordering::Relaxed);
                        eprintln!(
                            "LEAK: data{tag} (inode {ino}) block {block} returned {:x?}",
                            &scratch[..32]
                        );
                    }
                }
            });
        }
        let (fs, inos, stop, reused, churns) = (&fs, &inos, &stop, &reused, &churns);
        let grant_all = &grant_all;
        scope.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let mut version = 1u64;
            // Every block a data file ever had: a marker file getting one shows reuse.
            let mut ever_data: BTreeSet<u64> = BTreeSet::new();
            while Instant::now() < deadline {
                let tag = (version % DATA_FILES as u64) as usize;
                let name = format!("data{tag}");
                let ino = inos.lock().expect("inos")[tag];
                ever_data.extend(physical_blocks(fs, ino));
                match version % 3 {
                    0 => {
                        fs.setattr(
                            ino,
                            &SetAttr {
                                size: Some(0),
                                ..SetAttr::default()
                            },
                        )
                        .expect("truncate");
                        write_file(&name, tag as u64, version);
                    }
                    1 => {
                        fs.unlink(ROOT_INO, name.as_bytes()).expect("unlink");
                        let ino = write_file(&name, tag as u64, version);
                        let mut inos = inos.lock().expect("inos");
                        inos[tag] = ino;
                        grant_all(&inos);
                    }
                    _ => {
                        let punch = FallocateMode {
                            keep_size: true,
                            punch_hole: true,
                        };
                        fs.fallocate(ino, 0, DATA_BLOCKS * 4096, punch)
                            .expect("punch");
                        write_file(&name, tag as u64, version);
                    }
                }
                fs.checkpoint().expect("checkpoint");
                fs.reclaim();
                // Fill what was freed with marker files, then delete them.
                let marker = format!("marker{}", version % 4);
                let _ = fs.unlink(ROOT_INO, marker.as_bytes());
                let mino = fs
                    .create(ROOT_INO, marker.as_bytes(), 0o644, 0, 0)
                    .expect("marker")
                    .ino;
                for block in 0..DATA_BLOCKS {
                    if fs.write_at(mino, block * 4096, &[MARKER; 4096]).is_err() {
                        break; // full: the marker has what it could get
                    }
                }
                if !physical_blocks(fs, mino).is_disjoint(&ever_data) {
                    reused.fetch_add(1, Ordering::Relaxed);
                }
                churns.fetch_add(1, Ordering::Relaxed);
                version += 1;
            }
            stop.store(true, Ordering::Relaxed);
        });
    });
    let (chains, done, leaks, reused, churns) = (
        chains.into_inner(),
        done.into_inner(),
        leaks.into_inner(),
        reused.into_inner(),
        churns.into_inner(),
    );
    let stats = binding.stats().expect("stats");
    println!(
        "leak test ({}), {seconds} s: {chains} chains, {done} done, {} stale in the kernel, \
         {churns} rewrites, {reused} with blocks reused by marker files, {} of {} direct \
         hops from the hot-block table; leaks: {leaks}",
        if direct {
            "direct, unprivileged"
        } else {
            "privileged"
        },
        stats.stale,
        stats.hot_hits,
        stats.hot_hits + stats.hot_misses
    );
    if direct {
        assert!(
            stats.hot_hits > 0,
            "the hot-block table served hops ({})",
            stats.hot_hits
        );
    }
    assert!(done > 1000, "chains ran ({done} done)");
    assert!(
        reused > 0,
        "freed blocks were reused by marker files ({reused})"
    );
    assert_eq!(leaks, 0, "chains returned blocks of other files");
}

/// A direct chain of `peek` over `ino` at `offset`, as an unprivileged caller runs it:
/// the daemon's part (registering the file, as the discovery ioctl does), then the
/// direct program with a context that names only the file. (status, scratch), or None if
/// the file could not be registered (deleted under us).
fn direct_peek(
    binding: &kernel_ext::binding::Binding,
    peek: &kernel_ext::binding::BoundProgram,
    ino: u64,
    offset: u64,
) -> Option<(i32, [u8; exofs_abi::chain::SCRATCH_SIZE])> {
    let file = binding.register(ino).ok()?;
    binding.grant_ticket(LEAK_USER, ino).expect("ticket");
    let mut ctx = exofs_abi::chain::ChainCtx {
        file_count: 1,
        hop_limit: 8,
        read_len: 32,
        start_offset: offset,
        ..Default::default()
    };
    ctx.files[0] = file;
    peek.direct_program()
        .test_run_pod(&mut ctx)
        .expect("run the direct program");
    Some((ctx.status, ctx.scratch))
}

/// The cgroup2 id of this process if it sits at the root of the unified hierarchy (id 1),
/// the one case this test can know without a cgroup2 mount.
fn root_cgroup_id() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().any(|line| line == "0::/").then_some(1)
}

#[test]
fn the_kernel_policy_denies_by_default_and_caps_hops() {
    let Some((_image, fs, binding)) = common::setup("policy", 64 << 20) else {
        return;
    };
    let list = binding.bind("list", examples::LINKED_LIST).expect("bind");
    let pairs: Vec<(u64, u64)> = (1..=20).map(|k| (k, k * 3)).collect();
    let allowed = write_fragmented(&fs, "allowed", &index::build_list(&pairs, 2), 3);
    let other = write_fragmented(&fs, "other", &index::build_list(&pairs, 4), 3);
    let run = |ino: u64, hops: u32, subject: Option<NamedSubject>| {
        let mut request = ChainRequest::new(ino, 0, &lookup_scratch(20));
        request.hop_limit = hops;
        request.subject = subject;
        binding.run(&list, &request).expect("run").status
    };
    // No policy: open.
    assert_eq!(run(other, 64, None), status::DONE);
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let grant = |subject, ino, max_hops| PolicyEntry {
        subject,
        ino,
        program: "list".to_owned(),
        grant: PolicyGrant {
            max_hops,
            max_batch: 8,
        },
    };
    binding
        .load_policy(&[grant(Subject::Uid(uid), allowed, 20)])
        .expect("policy");
    let denied_before = binding.stats().expect("stats").denied;
    assert_eq!(
        run(allowed, 20, None),
        status::DONE,
        "granted file, hops within the grant"
    );
    assert_eq!(
        run(allowed, 21, None),
        status::DENIED,
        "more hops than granted"
    );
    assert_eq!(
        run(other, 20, None),
        status::DENIED,
        "a file without a grant"
    );
    let mut two = ChainRequest::new(allowed, 0, &lookup_scratch(20));
    two.files.push(other);
    two.hop_limit = 20;
    assert_eq!(
        binding.run(&list, &two).expect("run").status,
        status::DENIED,
        "every file counts"
    );
    // Batches: the grant's batch size.
    let items: Vec<BatchItem> = (0..9)
        .map(|_| BatchItem::new(0, &lookup_scratch(20)))
        .collect();
    let mut batch = BatchRequest::new(allowed);
    batch.hop_limit = 20;
    let (outcomes, _) = binding
        .run_batch(&list, &batch, &items[..8])
        .expect("batch");
    assert!(outcomes.iter().all(|o| o.status == status::DONE));
    let (outcomes, _) = binding.run_batch(&list, &batch, &items).expect("batch");
    assert!(
        outcomes.iter().all(|o| o.status == status::DENIED),
        "9 > max_batch 8"
    );
    assert!(binding.stats().expect("stats").denied >= denied_before + 3 + 9);

    // A subject named in the request counts only for the registered speaker.
    binding
        .load_policy(&[grant(Subject::Uid(4242), other, 64)])
        .expect("policy");
    assert_eq!(
        run(other, 20, named(4242, 4242, 0)),
        status::DENIED,
        "not the speaker"
    );
    binding.serve_direct().expect("become the daemon");
    assert_eq!(
        run(other, 20, named(4242, 4242, 0)),
        status::DONE,
        "the speaker's subject"
    );
    assert_eq!(run(allowed, 20, named(4242, 4242, 0)), status::DENIED);
    assert_eq!(run(other, 20, named(4243, 4243, 0)), status::DENIED);
    // Group and cgroup grants.
    binding
        .load_policy(&[grant(Subject::Gid(777), other, 64)])
        .expect("policy");
    assert_eq!(
        run(other, 20, named(1, 777, 0)),
        status::DONE,
        "granted to the group"
    );
    binding
        .load_policy(&[grant(Subject::Cgroup(31337), other, 64)])
        .expect("policy");
    assert_eq!(
        run(other, 20, named(1, 1, 31337)),
        status::DONE,
        "granted to the cgroup the speaker names"
    );
    assert_eq!(run(other, 20, named(1, 1, 31338)), status::DENIED);
    assert_eq!(run(other, 20, named(1, 1, 0)), status::DENIED);
    let mut batch = BatchRequest::new(other);
    batch.hop_limit = 20;
    batch.subject = named(1, 1, 31337);
    let (outcomes, _) = binding
        .run_batch(&list, &batch, &items[..8])
        .expect("batch");
    assert!(
        outcomes.iter().all(|o| o.status == status::DONE),
        "a batch names its subject too"
    );
    batch.subject = named(1, 1, 31338);
    let (outcomes, _) = binding
        .run_batch(&list, &batch, &items[..8])
        .expect("batch");
    assert!(outcomes.iter().all(|o| o.status == status::DENIED));
    if let Some(cgroup) = root_cgroup_id() {
        binding
            .load_policy(&[grant(Subject::Cgroup(cgroup), other, 64)])
            .expect("policy");
        assert_eq!(run(other, 20, None), status::DONE, "granted to the cgroup");
        assert_eq!(run(allowed, 20, None), status::DENIED);
    } else {
        eprintln!("(cgroup grant not checked: this process is not in the cgroup2 root)");
    }
    binding.clear_policy().expect("clear");
    assert_eq!(run(allowed, 64, None), status::DONE, "open again");
}

/// A thread that runs chains for different callers (the daemon) never hands one caller's
/// block bytes to the next: the buffer is cleared when the subject changes.
#[test]
fn a_new_subject_never_sees_the_previous_block() {
    let Some((_image, fs, binding)) = common::setup("subjects", 32 << 20) else {
        return;
    };
    // `next` returns bytes 100..124 of the buffer, whatever the hop read.
    let tail = compile_c(
        "tail",
        "int next(struct exofs_hop_state *s) {
             __u64 *out = (__u64 *)s->scratch;
             for (int i = 0; i < 3; i++)
                 out[i] = *(__u64 *)&s->data[104 + i * 8];
             return EXOFS_NEXT_DONE;
         }",
    );
    let tail = binding.bind("tail", &tail).expect("bind");
    let secret = write_fragmented(&fs, "secret", &[0xAB; 4096], 1);
    let grants: Vec<PolicyEntry> = [1u32, 2]
        .iter()
        .map(|uid| PolicyEntry {
            subject: Subject::Uid(*uid),
            ino: secret,
            program: "tail".to_owned(),
            grant: PolicyGrant {
                max_hops: 64,
                max_batch: 32,
            },
        })
        .collect();
    binding.serve_direct().expect("become the daemon");
    binding.load_policy(&grants).expect("policy");
    let run = |uid: u32, read_len: u32| {
        let mut request = ChainRequest::new(secret, 0, &[]);
        request.read_len = read_len;
        request.subject = named(uid, uid, 0);
        let outcome = binding.run(&tail, &request).expect("run");
        assert_eq!(outcome.status, status::DONE);
        outcome.scratch[..24].to_vec()
    };
    assert_eq!(
        run(1, 4096),
        vec![0xAB; 24],
        "caller 1 reads the whole block"
    );
    assert_eq!(
        run(2, 8),
        vec![0; 24],
        "caller 2 reads 8 bytes and sees nothing of caller 1's"
    );
    assert_eq!(run(1, 8), vec![0; 24], "and back: cleared again");
    binding.clear_policy().expect("clear");
}
