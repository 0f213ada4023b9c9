//! The BPF toolchain path end to end, on the real kernel: the Rust driver built with nightly
//! and bpf-linker, parsed with aya-obj, its map created and relocated, loaded as a sleepable
//! BPF_PROG_TYPE_SYSCALL program with raw bpf(2), run with BPF_PROG_TEST_RUN, reading this
//! process's memory (a read-only MAP_SHARED file mapping) with `bpf_copy_from_user`.
//!
//! Needs root (CAP_BPF + CAP_PERFMON). Without it every test prints a SKIPPED line and
//! passes; CI runs as root.

mod common;

use std::{
    ffi::CString,
    fs::{self, File},
    io::Write,
    os::unix::fs::FileExt,
    path::PathBuf,
    ptr::NonNull,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use exofs_abi::probe::{ProbeCtx, PROBE_OUT_LEN};
use kernel_ext::{
    loader::{LoadError, Object, SyscallProgram},
    sys, SysError, DRIVER_ELF, PROBE_PROGRAM, PROBE_STATS_MAP,
};

const PAGE: usize = 4096;

fn skip(test: &str, why: &str) {
    common::skip(
        test,
        &format!("{why} (these tests need root: CAP_BPF + CAP_PERFMON)"),
    );
}

/// Loads the driver, or `None` (after a SKIPPED line) when we lack the privilege.
fn load_driver(test: &str) -> Option<Object> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "not running as root");
        return None;
    }
    match Object::load(DRIVER_ELF) {
        Ok(obj) => Some(obj),
        Err(LoadError::Sys(err)) if err.is_permission_denied() => {
            skip(test, &format!("bpf(2) refused: {err}"));
            None
        }
        Err(err) => panic!("loading the driver failed: {err}"),
    }
}

fn stats(obj: &Object) -> u64 {
    let map = obj.map(PROBE_STATS_MAP).expect("stats map");
    map.get::<u32, u64>(&0)
        .expect("lookup")
        .expect("key 0 exists")
}

/// A temporary file of `len` pattern bytes, mapped read-only and shared; unmapped and
/// removed on drop.
struct MappedFile {
    path: PathBuf,
    file: File,
    addr: NonNull<libc::c_void>,
    len: usize,
}

impl MappedFile {
    fn new(len: usize) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "exofs-probe-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create temp file");
        let bytes: Vec<u8> = (0..len).map(pattern).collect();
        file.write_all(&bytes).expect("write temp file");
        file.sync_all().expect("sync");
        // SAFETY: a fresh read-only shared mapping of an open file; the kernel picks the
        // address. The mapping is unmapped exactly once, in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Self {
            path,
            file,
            addr: NonNull::new(addr).expect("mmap returned null"),
            len,
        }
    }

    fn addr(&self, offset: usize) -> u64 {
        assert!(offset <= self.len);
        self.addr.as_ptr() as u64 + offset as u64
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` is the mapping created in `new`, not unmapped before, and no
        // reference into it outlives `self`.
        unsafe { libc::munmap(self.addr.as_ptr(), self.len) };
        let _ = fs::remove_file(&self.path);
    }
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(131) ^ (i >> 8)) as u8
}

fn probe_ctx(addr: u64, len: u32) -> ProbeCtx {
    ProbeCtx {
        addr,
        len,
        _pad: 0,
        out: [0xAA; PROBE_OUT_LEN],
        copied: 0xdead,
        status: 0x7ead,
    }
}

fn run(prog: &SyscallProgram, addr: u64, len: u32) -> (ProbeCtx, u32) {
    let mut ctx = probe_ctx(addr, len);
    let ret = prog.test_run_pod(&mut ctx).expect("test run");
    (ctx, ret)
}

#[test]
fn probe_reads_the_callers_file_mapping() {
    let Some(obj) = load_driver("probe_reads_the_callers_file_mapping") else {
        return;
    };
    let prog = obj.program(PROBE_PROGRAM).expect("probe program");
    let file = MappedFile::new(2 * PAGE);
    assert_eq!(stats(&obj), 0);

    let mut runs = 0;
    // (offset, len): whole 64, short, clamped to 64, empty, unaligned in the second page
    // (never touched by this process: the page fault is served inside the program), and
    // a read ending exactly at the end of the mapping.
    for (offset, len) in [
        (0, 64u32),
        (7, 13),
        (100, 1000),
        (0, 0),
        (PAGE + 123, 64),
        (2 * PAGE - 64, 64),
    ] {
        let (ctx, ret) = run(prog, file.addr(offset), len);
        runs += 1;
        let n = (len as usize).min(PROBE_OUT_LEN);
        assert_eq!(ret, 0, "offset {offset} len {len}");
        assert_eq!(ctx.status, 0);
        assert_eq!(ctx.copied as usize, n);
        let expected: Vec<u8> = (offset..offset + n).map(pattern).collect();
        assert_eq!(&ctx.out[..n], &expected[..], "offset {offset} len {len}");
        assert!(ctx.out[n..].iter().all(|&b| b == 0), "tail must be zeroed");
        assert_eq!((ctx.addr, ctx.len), (file.addr(offset), len), "inputs kept");
    }
    assert_eq!(stats(&obj), runs);

    // Coherent with pwrite on the same file: the mapping shares the page cache.
    file.file.write_all_at(b"exofs!", 10).expect("pwrite");
    let (ctx, _) = run(prog, file.addr(10), 6);
    assert_eq!(&ctx.out[..6], b"exofs!");
    runs += 1;

    // A bad address: the helper fails, zeroes the buffer, and the probe reports it.
    let (ctx, ret) = run(prog, 8, 64);
    runs += 1;
    assert_eq!(ctx.status, -libc::EFAULT);
    assert_eq!(ret as i32, -libc::EFAULT);
    assert_eq!(ctx.copied, 0);
    assert!(ctx.out.iter().all(|&b| b == 0));

    // The counter counts every run, failed copies included.
    for _ in 0..1000 {
        run(prog, file.addr(0), 64);
    }
    runs += 1000;
    assert_eq!(stats(&obj), runs);
}

#[test]
fn context_size_is_checked() {
    let Some(obj) = load_driver("context_size_is_checked") else {
        return;
    };
    let prog = obj.program(PROBE_PROGRAM).expect("probe program");
    // Shorter than the largest offset the program touches: the kernel refuses the run.
    let mut short = [0u8; 16];
    let err = prog.test_run(&mut short).expect_err("short context");
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
    assert!(err.to_string().contains("BPF_PROG_TEST_RUN"), "{err}");
    // Longer than a syscall program's limit: refused before the call.
    let mut huge = vec![0u8; sys::MAX_SYSCALL_CTX + 1];
    assert!(matches!(
        prog.test_run(&mut huge),
        Err(SysError::Invalid { .. })
    ));
    // Wrong map key/value sizes are refused before the call.
    let map = obj.map(PROBE_STATS_MAP).expect("stats map");
    let mut value = [0u8; 4];
    assert!(matches!(
        map.lookup(&0u32.to_ne_bytes(), &mut value),
        Err(LoadError::MapAccess { .. })
    ));
}

#[test]
fn verifier_refusal_carries_the_log() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("verifier_refusal_carries_the_log", "not running as root");
        return;
    }
    // r0 = *(u64 *)(r10 + 8): a read above the frame pointer, out of the stack.
    // exit
    let insns = [0x0000_0000_0008_a079u64, 0x0000_0000_0000_0095];
    let license = CString::new("GPL").expect("license");
    let err = match SyscallProgram::load_insns("exofs_bad", &insns, &license) {
        Ok(_) => panic!("the verifier accepted an out-of-bounds stack read"),
        Err(err) if err.is_permission_denied() => {
            skip("verifier_refusal_carries_the_log", &err.to_string());
            return;
        }
        Err(err) => err,
    };
    let log = err.verifier_log().expect("a verifier error").to_owned();
    let text = err.to_string();
    eprintln!("{text}");
    assert_eq!(err.errno(), Some(libc::EACCES), "{text}");
    assert!(
        text.contains("BPF_PROG_LOAD") && text.contains("exofs_bad"),
        "{text}"
    );
    assert!(log.contains("R10"), "log names the frame pointer: {log}");
    assert!(
        text.contains(log.trim_end()),
        "the error's text holds the log"
    );
}

/// Pins the probe and its map on a private bpffs instance, reopens both from the pins
/// and runs the program through the reopened fd.
#[test]
fn pin_and_reopen() {
    let Some(obj) = load_driver("pin_and_reopen") else {
        return;
    };
    let Some(mount) = common::BpfFs::mount("pin_and_reopen") else {
        return;
    };
    let dir = mount.dir.clone();
    let prog = obj.program(PROBE_PROGRAM).expect("probe program");
    let map = obj.map(PROBE_STATS_MAP).expect("stats map");
    prog.pin(&dir.join("probe")).expect("pin program");
    map.pin(&dir.join("stats")).expect("pin map");

    let reopened = SyscallProgram::from_pin(&dir.join("probe"), "probe").expect("get program");
    let stats_again =
        kernel_ext::MapHandle::from_pin(&dir.join("stats"), "stats", map.spec()).expect("get map");
    let file = MappedFile::new(PAGE);
    let (ctx, _) = run(&reopened, file.addr(1), 5);
    assert_eq!(&ctx.out[..5], &(1..6).map(pattern).collect::<Vec<_>>()[..]);
    assert_eq!(stats_again.get::<u32, u64>(&0).expect("lookup"), Some(1));
    assert_eq!(stats(&obj), 1, "the same map through both handles");
}

/// Median of `runs` timings of `f`, with p10/p90/p99, in ns (after 1,000 warm-up calls).
fn timed(runs: usize, mut f: impl FnMut()) -> [u64; 4] {
    for _ in 0..1000 {
        f();
    }
    let mut ns: Vec<u64> = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f();
        ns.push(start.elapsed().as_nanos() as u64);
    }
    ns.sort_unstable();
    [
        ns[runs / 2],
        ns[runs / 10],
        ns[runs * 9 / 10],
        ns[runs * 99 / 100],
    ]
}

/// Latency of one BPF_PROG_TEST_RUN of the probe copying 64 warm bytes: median of 10,000
/// runs, printed next to two baselines measured the same way: an empty syscall program
/// (`r0 = 0; exit`) with the same 88-byte context, and getppid(2). Asserted only to be sane.
#[test]
fn probe_test_run_latency() {
    let Some(obj) = load_driver("probe_test_run_latency") else {
        return;
    };
    let prog = obj.program(PROBE_PROGRAM).expect("probe program");
    let file = MappedFile::new(PAGE);
    const RUNS: usize = 10_000;
    let mut ctx = probe_ctx(file.addr(64), 64);
    let probe = timed(RUNS, || {
        prog.test_run_pod(&mut ctx).expect("test run");
    });
    assert_eq!(ctx.copied, 64);

    let license = CString::new("GPL").expect("license");
    // r0 = 0; exit
    let empty = SyscallProgram::load_insns("exofs_empty", &[0xb7, 0x95], &license)
        .expect("load the empty program");
    let mut empty_ctx = probe_ctx(0, 0);
    let empty = timed(RUNS, || {
        empty.test_run_pod(&mut empty_ctx).expect("test run");
    });
    // SAFETY: getppid has no preconditions.
    let getppid = timed(RUNS, || unsafe {
        libc::getppid();
    });

    for (what, [median, p10, p90, p99]) in [
        ("probe, 64-byte copy", probe),
        ("empty syscall program, 88-byte ctx", empty),
        ("getppid(2)", getppid),
    ] {
        eprintln!(
            "latency {what}: median {median} ns, p10 {p10} ns, p90 {p90} ns, p99 {p99} ns \
             ({RUNS} runs)"
        );
    }
    assert!(probe[0] < 1_000_000, "median {} ns", probe[0]);
}
