//! The trusted driver's context validation, in the kernel: forged chain and batch contexts
//! run through BPF_PROG_TEST_RUN on the real driver (bound with the linked-list example).
//!
//! Needs root (CAP_BPF + CAP_PERFMON): set up once, the target panics with the reason if
//! it cannot load BPF (scripts/fuzz.sh skips this target, loudly, when not root).
//!
//! The world, set up once: an image file (unlinked at once; the open file system keeps
//! it) with
//! - PUBLIC, a linked list of 12 one-block nodes (keys 1..=12, values 7 * key), a hole,
//!   then one more block: registered, granted to uid 1000 and to this process's uid 0 (8
//!   hops, batches of 32), gid 2000 (4 hops, batches of 2) and cgroup 77 (64 hops, 32);
//! - SECRET, blocks of the byte 0xA5 interleaved on the device with PUBLIC's: registered
//!   but granted to nobody;
//! - UNREGISTERED, the same secret bytes: granted to uid 1000 but never registered.
//!
//! This process is the registered daemon (the policy's speaker), so the subject named in
//! the context counts when the context says so (SUBJECT_NAMED); otherwise its own ids
//! (root, granted nothing) do. Every block of the secret files, read at any
//! alignment, is the word SECRET; a `next` that reads one with SECRET as its key answers
//! SECRET as the value.
//!
//! Input: byte 0 is a mode (bit 0: batch context; bit 1: the scratch key is SECRET; bit 2:
//! tame: each file slot names PUBLIC, SECRET, UNREGISTERED (by the low bits of its ino)
//! at their generation or the next one, the subject is uid 1000, gid 2000, cgroup 77 or
//! as given, offsets fall inside 128 KiB, a resumed hop is below 8 and the block it may
//! wait for lies on the device; bit 3: keep the context's map_len; bit 4: unmap the
//! mapping's pages first, so that NO_FAULT hops miss; bit 5: run the DIRECT variant, which
//! reads through the binding's (the registered daemon's) mapping and checks this process
//! (uid 0, granted PUBLIC and holding a ticket for it); bit 6, with bit 5: keep the
//! mapping, subject and flag fields, which a direct program must refuse). The rest
//! is the context's bytes (zero-padded). map_addr is always this process's mapping of
//! the device: it names the caller's own memory, which a caller can read without the
//! driver (the daemon sets it, an ioctl caller never does), so forging it proves nothing.
//!
//! Asserted for every context: the test run succeeds (no syscall error); the program's
//! return value and every status is one of the ABI's; hops never exceed the clamped hop
//! limit; nothing but status, hops, scratch (and a batch's per-lookup results and done)
//! changes, except that a MISSING chain or lookup (only with NO_FAULT, naming a block of
//! the device, or TABLE_ONLY on a direct program, naming none) may say where to resume: then its hops are the resumed hop's number,
//! and if it does not, its scratch is untouched; a chain or lookup that is neither DONE
//! nor MISSING gives its scratch back untouched; no scratch ever gains the SECRET word; a context the driver must refuse before the walk
//! (file count, read length, batch count) is refused with INVALID and no hop; and a chain
//! that got past the policy names only files the policy grants its subject (checked
//! against the policy as written here, for the hops and batch size asked).
#![no_main]

use exofs_abi::chain::{
    status, BatchCtx, BatchLookup, ChainCtx, ChainFile, BATCH_SCRATCH_SIZE, BLOCK_SIZE, MAX_BATCH,
    MAX_CHAIN_FILES, MAX_HOPS, NO_FAULT, SUBJECT_NAMED, TABLE_ONLY,
};
use exofs_abi::policy::PolicyGrant;
use kernel_ext::binding::{
    Binding, BindingOptions, BoundProgram, DeviceMapping, PolicyEntry, Subject,
};
use libfs::{FileDevice, FormatOptions, Fs, OpenOptions, ROOT_INO};
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

/// Every 8 bytes of the secret files, at any alignment.
const SECRET: u64 = u64::from_ne_bytes([SECRET_BYTE; 8]);
const SECRET_BYTE: u8 = 0xA5;
const SUBJECT_UID: u32 = 1000;
const SUBJECT_GID: u32 = 2000;
const SUBJECT_CGROUP: u64 = 77;
const LIST_NODES: u64 = 12;
const TAME_OFFSETS: u64 = 128 << 10;

/// The policy as written: (subject, file, max_hops, max_batch).
#[derive(Debug, Clone, Copy)]
struct Rule {
    subject: Subject,
    ino: u64,
    max_hops: u32,
    max_batch: u32,
}

struct World {
    /// Holds the maps and programs (and the file system) for the whole run.
    _binding: Binding,
    program: Arc<BoundProgram>,
    mapping: DeviceMapping,
    public: ChainFile,
    secret: ChainFile,
    unregistered: ChainFile,
    rules: Vec<Rule>,
}

fn setup() -> World {
    let path = std::env::temp_dir().join(format!("exofs-fuzz-driver-{}.img", std::process::id()));
    let device = FileDevice::create(&path, 16 << 20).expect("create the image");
    libfs::format(Arc::new(device), &FormatOptions::default()).expect("format the image");
    let fs = Arc::new(Fs::open(&path, &OpenOptions::default()).expect("open the image"));
    // The file system keeps the image open; nothing is left behind when the fuzzer exits.
    std::fs::remove_file(&path).expect("unlink the image");

    let create = |name: &[u8]| fs.create(ROOT_INO, name, 0o644, 0, 0).expect("create").ino;
    let (public, secret, unregistered) = (
        create(b"public"),
        create(b"secret"),
        create(b"unregistered"),
    );
    let pairs: Vec<(u64, u64)> = (1..=LIST_NODES).map(|key| (key, key * 7)).collect();
    let list = kernel_ext::index::build_list(&pairs, 5);
    let secret_block = [SECRET_BYTE; BLOCK_SIZE];
    // Interleaved, so that every public block has secret neighbours on the device.
    for (index, block) in list.chunks(BLOCK_SIZE).enumerate() {
        let at = index as u64 * BLOCK_SIZE as u64;
        fs.write_at(secret, at, &secret_block)
            .expect("write secret");
        fs.write_at(public, at, block).expect("write public");
        fs.write_at(unregistered, at, &secret_block)
            .expect("write unregistered");
    }
    // A hole, then one more block.
    fs.write_at(
        public,
        (LIST_NODES + 4) * BLOCK_SIZE as u64,
        &[0x11; BLOCK_SIZE],
    )
    .expect("write past a hole");
    fs.sync().expect("sync");

    // A hot-block table that nobody fills: direct programs honour TABLE_ONLY, and every
    // hop they take with it stops unless it resumes a stop.
    let options = BindingOptions {
        pin: false,
        hot_bytes: 1 << 20,
        ..BindingOptions::default()
    };
    let binding = Binding::open(fs.clone(), &options).unwrap_or_else(|err| {
        panic!("the driver target needs root (CAP_BPF + CAP_PERFMON): {err}")
    });
    binding.serve_direct().expect("become the daemon");
    let public = binding.register(public).expect("register public");
    let secret = binding.register(secret).expect("register secret");
    let unregistered = ChainFile {
        ino: unregistered,
        generation: fs.getattr(unregistered).expect("getattr").generation,
    };
    // This process (uid 0) may run direct chains over PUBLIC: a grant and a ticket.
    binding.grant_ticket(0, public.ino).expect("ticket");
    let rules = vec![
        Rule {
            subject: Subject::Uid(0),
            ino: public.ino,
            max_hops: 8,
            max_batch: 32,
        },
        Rule {
            subject: Subject::Uid(SUBJECT_UID),
            ino: public.ino,
            max_hops: 8,
            max_batch: 32,
        },
        Rule {
            subject: Subject::Gid(SUBJECT_GID),
            ino: public.ino,
            max_hops: 4,
            max_batch: 2,
        },
        Rule {
            subject: Subject::Cgroup(SUBJECT_CGROUP),
            ino: public.ino,
            max_hops: 64,
            max_batch: 32,
        },
        Rule {
            subject: Subject::Uid(SUBJECT_UID),
            ino: unregistered.ino,
            max_hops: 64,
            max_batch: 32,
        },
    ];
    let entries: Vec<PolicyEntry> = rules
        .iter()
        .map(|rule| PolicyEntry {
            subject: rule.subject,
            ino: rule.ino,
            program: "fuzz_list".to_owned(),
            grant: PolicyGrant {
                max_hops: rule.max_hops,
                max_batch: rule.max_batch,
            },
        })
        .collect();
    binding.load_policy(&entries).expect("load the policy");
    let program = binding
        .bind("fuzz_list", kernel_ext::examples::LINKED_LIST)
        .expect("bind the linked-list example");
    let mapping = DeviceMapping::map(&fs).expect("map the device");
    World {
        _binding: binding,
        program,
        mapping,
        public,
        secret,
        unregistered,
        rules,
    }
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(setup)
}

/// Kernel outcomes as coverage: libFuzzer counts every non-zero byte of this section as a
/// feature (its "extra counters"), so a new (program, status, hops) is a new input worth
/// keeping, although the kernel's own branches are invisible to it.
#[used]
#[link_section = "__libfuzzer_extra_counters"]
static OUTCOMES: [AtomicU8; 2 * 16 * 66] = [const { AtomicU8::new(0) }; 2 * 16 * 66];

fn record(batch: bool, status: i32, hops: u32) {
    let status = usize::try_from(status).map_or(15, |s| s.min(15));
    let index = (usize::from(batch) * 16 + status) * 66 + (hops as usize).min(65);
    OUTCOMES[index].store(1, Ordering::Relaxed);
}

/// Whether to print each outcome (EXOFS_FUZZ_TRACE set), to see what a seed reaches.
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("EXOFS_FUZZ_TRACE").is_some())
}

/// A context of type T from `bytes`, zero-padded or cut.
fn context<T: aya::Pod>(bytes: &[u8]) -> T {
    let mut padded = bytes.to_vec();
    padded.resize(std::mem::size_of::<T>(), 0);
    exofs_abi::bytes::read(&padded).expect("exact size")
}

/// Shared header fields of both contexts.
struct Header<'a> {
    files: &'a mut [ChainFile; MAX_CHAIN_FILES],
    file_count: &'a mut u32,
    hop_limit: &'a mut u32,
    read_len: &'a mut u32,
    subject_uid: &'a mut u32,
    subject_gid: &'a mut u32,
    subject_cgroup: &'a mut u64,
    map_addr: &'a mut u64,
    map_len: &'a mut u64,
    flags: &'a mut u32,
}

/// Applies the mode's taming and the real mapping to a context's header, then, for a
/// direct run, what a direct context may not name (see `direct_fields`). Returns whether
/// the context as it will be sent names any of that.
fn prepare(world: &World, mode: u8, mut header: Header<'_>) -> bool {
    tame(world, mode, &mut header);
    direct_fields(
        mode,
        (header.map_addr, header.map_len),
        (
            header.subject_uid,
            header.subject_gid,
            header.subject_cgroup,
        ),
        header.flags,
    )
}

/// The real mapping and the mode's taming (see `prepare`).
fn tame(world: &World, mode: u8, header: &mut Header<'_>) {
    let (addr, len) = world.mapping.range();
    *header.map_addr = addr;
    if mode & 8 == 0 {
        *header.map_len = len;
    }
    if mode & 4 == 0 {
        return;
    }
    // Mostly valid, sometimes just outside the limits.
    *header.file_count %= MAX_CHAIN_FILES as u32 + 2;
    *header.hop_limit %= MAX_HOPS + 8;
    *header.read_len %= BLOCK_SIZE as u32 + 8;
    for file in header.files.iter_mut() {
        let real = match file.ino & 3 {
            0 => world.public,
            1 => world.secret,
            2 => world.unregistered,
            _ => continue,
        };
        let bump = (file.ino >> 2) & 1;
        *file = ChainFile {
            ino: real.ino,
            generation: real.generation + bump,
        };
    }
    match *header.subject_uid & 3 {
        0 => {
            (
                *header.subject_uid,
                *header.subject_gid,
                *header.subject_cgroup,
            ) = (SUBJECT_UID, 0, 0)
        }
        1 => {
            (
                *header.subject_uid,
                *header.subject_gid,
                *header.subject_cgroup,
            ) = (0, SUBJECT_GID, 0)
        }
        2 => {
            (
                *header.subject_uid,
                *header.subject_gid,
                *header.subject_cgroup,
            ) = (0, 0, SUBJECT_CGROUP)
        }
        _ => {}
    }
}

/// The subject the policy is checked for: the one the context names with SUBJECT_NAMED
/// (this process is the daemon), else this process's own (uid 0, gid 0, a cgroup no rule
/// names).
fn named_subject(flags: u32, named: (u32, u32, u64)) -> (u32, u32, u64) {
    if flags & SUBJECT_NAMED != 0 {
        named
    } else {
        (0, 0, 0)
    }
}

/// Whether the policy as written lets the subject run `hops` hops (and `batch` lookups)
/// over the first `file_count` files: each file needs a grant for the uid, the gid or
/// the cgroup (0 names none) that covers both. The driver may be stricter, never laxer.
fn granted(
    world: &World,
    files: &[ChainFile],
    subject: (u32, u32, u64),
    hops: u32,
    batch: u32,
) -> bool {
    let (uid, gid, cgroup) = subject;
    files.iter().all(|file| {
        world.rules.iter().any(|rule| {
            let whom = match rule.subject {
                Subject::Uid(id) => id == uid,
                Subject::Gid(id) => id == gid,
                Subject::Cgroup(id) => cgroup != 0 && id == cgroup,
            };
            whom && rule.ino == file.ino && hops <= rule.max_hops && batch <= rule.max_batch
        })
    })
}

const STATUSES: std::ops::RangeInclusive<i32> = status::DONE..=status::NO_DAEMON;

/// Mode bits: run the direct variant; with it, keep the fields it must refuse.
const DIRECT: u8 = 32;
const KEEP_FORBIDDEN: u8 = 64;

/// For a direct run without KEEP_FORBIDDEN: clears what a direct context may not name.
/// Returns whether the context (as it will be sent) names any of it.
fn direct_fields(
    mode: u8,
    map: (&mut u64, &mut u64),
    subject: (&mut u32, &mut u32, &mut u64),
    flags: &mut u32,
) -> bool {
    if mode & DIRECT != 0 && mode & KEEP_FORBIDDEN == 0 {
        (*map.0, *map.1) = (0, 0);
        (*subject.0, *subject.1, *subject.2) = (0, 0, 0);
        *flags &= !(NO_FAULT | SUBJECT_NAMED);
    }
    *map.0 != 0
        || *map.1 != 0
        || *subject.0 != 0
        || *subject.1 != 0
        || *subject.2 != 0
        || *flags & (NO_FAULT | SUBJECT_NAMED) != 0
}

/// Words of `after` that differ from `before` and are SECRET.
fn gained_secret(before: &[u8], after: &[u8]) -> bool {
    before.chunks(8).zip(after.chunks(8)).any(|(was, now)| {
        was != now
            && now.len() == 8
            && u64::from_ne_bytes(now.try_into().unwrap_or([0; 8])) == SECRET
    })
}

fn run_chain(world: &World, mode: u8, bytes: &[u8]) {
    let mut ctx: ChainCtx = context(bytes);
    let forbidden = prepare(
        world,
        mode,
        Header {
            files: &mut ctx.files,
            file_count: &mut ctx.file_count,
            hop_limit: &mut ctx.hop_limit,
            read_len: &mut ctx.read_len,
            subject_uid: &mut ctx.subject_uid,
            subject_gid: &mut ctx.subject_gid,
            subject_cgroup: &mut ctx.subject_cgroup,
            map_addr: &mut ctx.map_addr,
            map_len: &mut ctx.map_len,
            flags: &mut ctx.flags,
        },
    );
    if mode & 4 != 0 {
        ctx.start_offset %= TAME_OFFSETS;
        ctx.start_file %= MAX_CHAIN_FILES as u32 + 1;
        (ctx.start_hop, ctx.missing) = tame_resume(world, ctx.start_hop, ctx.missing);
    }
    unmap_if_asked(world, mode);
    if mode & 2 != 0 {
        ctx.scratch[..8].copy_from_slice(&SECRET.to_ne_bytes());
    }
    let direct = mode & DIRECT != 0;
    let program = if direct {
        world.program.direct_program()
    } else {
        world.program.chain_program()
    };
    let sent = ctx;
    let returned = program
        .test_run_pod(&mut ctx)
        .unwrap_or_else(|err| panic!("the test run failed: {err}\n{sent:?}"));
    record(false, ctx.status, ctx.hops);
    if trace() {
        eprintln!(
            "chain: status {} hops {} scratch {:?}",
            ctx.status,
            ctx.hops,
            &ctx.scratch[..24]
        );
    }
    assert_eq!(
        returned as i32, ctx.status,
        "the return value is the status"
    );
    if direct && forbidden {
        assert_eq!(
            (ctx.status, ctx.hops),
            (status::INVALID, 0),
            "a direct context named a mapping, a subject or a flag: {sent:?}"
        );
    }
    assert!(STATUSES.contains(&ctx.status), "status {}", ctx.status);
    let hop_limit = sent.hop_limit.min(MAX_HOPS);
    assert!(
        ctx.hops <= hop_limit,
        "{} hops with a limit of {}",
        ctx.hops,
        sent.hop_limit
    );
    let mut unchanged = ctx;
    (unchanged.status, unchanged.hops, unchanged.scratch) = (sent.status, sent.hops, sent.scratch);
    if ctx.status == status::MISSING {
        // Where to resume: the missed block, and the hop that needs it.
        missing_is_sane(world, mode, sent.flags, ctx.missing);
        assert!(
            ctx.start_hop < hop_limit && ctx.start_file < sent.file_count,
            "resume at hop {} of file {}: {sent:?}",
            ctx.start_hop,
            ctx.start_file
        );
        resume_is_sane(
            (sent.start_file, sent.start_offset, sent.start_hop),
            (ctx.start_file, ctx.start_offset, ctx.start_hop),
            ctx.hops,
            (&sent.scratch, &ctx.scratch),
        );
        (
            unchanged.start_file,
            unchanged.start_offset,
            unchanged.start_hop,
            unchanged.missing,
        ) = (
            sent.start_file,
            sent.start_offset,
            sent.start_hop,
            sent.missing,
        );
    }
    assert_eq!(unchanged, sent, "the driver changed an input field");
    if ctx.status != status::DONE && ctx.status != status::MISSING {
        assert_eq!(
            ctx.scratch, sent.scratch,
            "status {}: the scratch must come back untouched",
            ctx.status
        );
    }
    assert!(
        !gained_secret(&sent.scratch, &ctx.scratch),
        "SECRET leaked into the scratch: {sent:?}"
    );
    let file_count = sent.file_count as usize;
    if !(1..=MAX_CHAIN_FILES).contains(&file_count)
        || !(1..=BLOCK_SIZE as u32).contains(&sent.read_len)
    {
        assert_eq!(
            (ctx.status, ctx.hops),
            (status::INVALID, 0),
            "malformed context"
        );
        return;
    }
    if ctx.status != status::DENIED && ctx.status != status::INVALID {
        let subject = named_subject(
            sent.flags,
            (sent.subject_uid, sent.subject_gid, sent.subject_cgroup),
        );
        assert!(
            granted(world, &sent.files[..file_count], subject, hop_limit, 1),
            "status {}: a chain the policy does not grant ran: {sent:?}",
            ctx.status
        );
    }
}

/// Mostly a small resumed hop, and mostly a block of the device (or none) to wait for.
fn tame_resume(world: &World, start_hop: u32, missing: u64) -> (u32, u64) {
    let len = world.mapping.range().1;
    let missing = if missing & 1 == 0 {
        u64::MAX
    } else {
        (missing >> 1) % len / BLOCK_SIZE as u64 * BLOCK_SIZE as u64
    };
    (start_hop % 8, missing)
}

/// Mode bit 4: zaps the mapping's page tables (the pages stay in the page cache), so
/// that the hops of a NO_FAULT chain miss and MISSING is exercised.
fn unmap_if_asked(world: &World, mode: u8) {
    if mode & 16 != 0 {
        world
            .mapping
            .advise(libc::MADV_DONTNEED)
            .expect("madvise(MADV_DONTNEED)");
    }
}

/// A MISSING chain or lookup that says where to resume has walked up to that hop; one
/// that does not (a fan-out branch was pending), or that missed its first hop, leaves
/// its scratch as it was given.
fn resume_is_sane(
    sent: (u32, u64, u32),
    resume: (u32, u64, u32),
    hops: u32,
    (sent_scratch, scratch): (&[u8], &[u8]),
) {
    if resume != sent {
        assert_eq!(
            hops, resume.2,
            "MISSING: resume at hop {resume:?}, {hops} hops"
        );
    } else {
        assert_eq!(
            sent_scratch, scratch,
            "MISSING without a resume point: the scratch changed"
        );
    }
}

/// A MISSING chain or lookup: from a privileged program only with NO_FAULT, `missing`
/// naming a block of the device; from a direct program only with TABLE_ONLY (this
/// world's table has slots but is never filled), `missing` 0 (no device offset told).
fn missing_is_sane(world: &World, mode: u8, flags: u32, missing: u64) {
    if mode & DIRECT != 0 {
        assert!(
            flags & TABLE_ONLY != 0,
            "a direct MISSING without TABLE_ONLY"
        );
        assert_eq!(missing, 0, "a direct MISSING told a device offset");
        return;
    }
    assert!(flags & NO_FAULT != 0, "MISSING without NO_FAULT");
    assert_eq!(
        missing % BLOCK_SIZE as u64,
        0,
        "missing is a block's offset"
    );
    assert!(missing < world.mapping.range().1, "missing past the device");
}

fn run_batch(world: &World, mode: u8, bytes: &[u8]) {
    let mut ctx: BatchCtx = context(bytes);
    let forbidden = prepare(
        world,
        mode,
        Header {
            files: &mut ctx.files,
            file_count: &mut ctx.file_count,
            hop_limit: &mut ctx.hop_limit,
            read_len: &mut ctx.read_len,
            subject_uid: &mut ctx.subject_uid,
            subject_gid: &mut ctx.subject_gid,
            subject_cgroup: &mut ctx.subject_cgroup,
            map_addr: &mut ctx.map_addr,
            map_len: &mut ctx.map_len,
            flags: &mut ctx.flags,
        },
    );
    if mode & 4 != 0 {
        ctx.count %= MAX_BATCH as u32 + 2;
    }
    for lookup in ctx.lookups.iter_mut() {
        if mode & 4 != 0 {
            lookup.start_file %= MAX_CHAIN_FILES as u32 + 1;
            lookup.start_offset %= TAME_OFFSETS;
            (lookup.start_hop, lookup.missing) =
                tame_resume(world, lookup.start_hop, lookup.missing);
        }
        if mode & 2 != 0 {
            lookup.scratch[..8].copy_from_slice(&SECRET.to_ne_bytes());
        }
    }
    unmap_if_asked(world, mode);
    let direct = mode & DIRECT != 0;
    let program = if direct {
        world.program.direct_batch_program()
    } else {
        world.program.batch_program()
    };
    let sent = ctx;
    let returned = program
        .test_run_pod(&mut ctx)
        .unwrap_or_else(|err| panic!("the test run failed: {err}\n{sent:?}"));
    let returned = returned as i32;
    record(true, returned, 0);
    if trace() {
        eprintln!("batch: returned {returned}");
    }
    let count = sent.count as usize;
    let file_count = sent.file_count as usize;
    let malformed = !(1..=MAX_BATCH).contains(&count)
        || !(1..=MAX_CHAIN_FILES).contains(&file_count)
        || !(1..=BLOCK_SIZE as u32).contains(&sent.read_len);
    if returned != status::DONE {
        assert!(
            returned == status::INVALID || returned == status::DENIED,
            "the batch returned {returned}"
        );
        assert_eq!(ctx, sent, "a refused batch changed its context");
        if malformed || (direct && forbidden) {
            assert_eq!(returned, status::INVALID, "malformed batch");
        }
        return;
    }
    assert!(
        !(direct && forbidden),
        "a direct batch named a mapping, a subject or a flag: {sent:?}"
    );
    assert!(!malformed, "a malformed batch ran: {sent:?}");
    let hop_limit = sent.hop_limit.min(MAX_HOPS);
    let subject = named_subject(
        sent.flags,
        (sent.subject_uid, sent.subject_gid, sent.subject_cgroup),
    );
    assert!(
        granted(
            world,
            &sent.files[..file_count],
            subject,
            hop_limit,
            sent.count
        ),
        "a batch the policy does not grant ran: {sent:?}"
    );
    let mut done = 0;
    for (slot, (before, after)) in sent.lookups.iter().zip(&ctx.lookups).enumerate() {
        let after: &BatchLookup = after;
        if after.status != status::MISSING {
            assert_eq!(
                (
                    after.start_file,
                    after.start_offset,
                    after.start_hop,
                    after.missing
                ),
                (
                    before.start_file,
                    before.start_offset,
                    before.start_hop,
                    before.missing
                ),
                "lookup {slot}: an input field changed"
            );
        }
        if slot >= count {
            assert_eq!(
                (after.status, after.hops),
                (status::INVALID, 0),
                "lookup {slot} past the count"
            );
            assert_eq!(
                after.scratch, before.scratch,
                "lookup {slot} past the count"
            );
            continue;
        }
        record(true, after.status, after.hops);
        if trace() {
            eprintln!(
                "lookup {slot}: status {} hops {} scratch {:?}",
                after.status,
                after.hops,
                &after.scratch[..24]
            );
        }
        assert!(
            STATUSES.contains(&after.status),
            "lookup {slot}: status {}",
            after.status
        );
        if after.status == status::MISSING {
            missing_is_sane(world, mode, sent.flags, after.missing);
            assert!(
                after.start_hop < hop_limit && after.start_file < sent.file_count,
                "lookup {slot}: resume at hop {} of file {}",
                after.start_hop,
                after.start_file
            );
            resume_is_sane(
                (before.start_file, before.start_offset, before.start_hop),
                (after.start_file, after.start_offset, after.start_hop),
                after.hops,
                (&before.scratch, &after.scratch),
            );
        }
        assert!(
            after.hops <= hop_limit,
            "lookup {slot}: {} hops, limit {}",
            after.hops,
            sent.hop_limit
        );
        if after.status == status::DONE {
            done += 1;
        } else if after.status != status::MISSING {
            assert_eq!(
                after.scratch, before.scratch,
                "lookup {slot}: status {}, scratch changed",
                after.status
            );
        }
        assert!(
            !gained_secret(
                &before.scratch[..BATCH_SCRATCH_SIZE],
                &after.scratch[..BATCH_SCRATCH_SIZE]
            ),
            "lookup {slot}: SECRET leaked into the scratch: {sent:?}"
        );
    }
    assert_eq!(ctx.done, done, "done counts the DONE lookups");
    let mut header = ctx;
    (header.done, header.lookups) = (sent.done, sent.lookups);
    assert_eq!(
        header, sent,
        "the driver changed an input field of the batch"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let world = world();
    if mode & 1 == 0 {
        run_chain(world, mode, rest);
    } else {
        run_batch(world, mode, rest);
    }
});
