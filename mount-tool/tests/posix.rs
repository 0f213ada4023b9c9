//! POSIX behaviour through a real exofs FUSE mount, beyond what `mount.rs` covers:
//! permissions as an unprivileged user (EACCES, EPERM), fallocate, mmap (read and shared
//! write), many processes at once, and a random read/write/truncate/mmap workload of
//! 100,000 operations compared with an in-memory model.
//!
//! Needs root (to mount and to create the test user) and /dev/fuse; without them each
//! test prints a SKIPPED line.

mod common;

use common::{can_mount, run_as, test_user, text, Mounted};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;

/// Runs `sh -c SCRIPT` as the test user.
fn sh_as(uid: u32, gid: u32, script: &str) -> Output {
    run_as(uid, gid, Path::new("/bin/sh"), &["-c", script])
}

fn assert_fails_with(out: &Output, message: &str, what: &str) {
    assert!(!out.status.success(), "{what} succeeded: {}", text(out));
    assert!(text(out).contains(message), "{what}: {}", text(out));
}

#[test]
fn permissions_as_an_unprivileged_user() {
    if !can_mount("permissions_as_an_unprivileged_user") {
        return;
    }
    let (uid, gid) = test_user();
    let m = Mounted::new("perms", "64M");
    m.mount_with("allow_other,default_permissions");
    let dir = m.dir();
    fs::create_dir(m.path("private")).expect("mkdir");
    fs::set_permissions(m.path("private"), fs::Permissions::from_mode(0o700)).expect("chmod");
    fs::write(m.path("private/secret"), b"root only").expect("write");
    fs::write(m.path("rootfile"), b"readable").expect("write");
    fs::set_permissions(m.path("rootfile"), fs::Permissions::from_mode(0o644)).expect("chmod");
    fs::create_dir(m.path("shared")).expect("mkdir");
    fs::set_permissions(m.path("shared"), fs::Permissions::from_mode(0o777)).expect("chmod");

    // EACCES: search, read, write and create without the permission bits.
    let out = sh_as(uid, gid, &format!("cat {dir}/private/secret"));
    assert_fails_with(&out, "Permission denied", "reading inside a 0700 directory");
    let out = sh_as(uid, gid, &format!("echo x > {dir}/rootfile"));
    assert_fails_with(&out, "Permission denied", "writing root's 0644 file");
    let out = sh_as(uid, gid, &format!("touch {dir}/new"));
    assert_fails_with(
        &out,
        "Permission denied",
        "creating in root's 0755 directory",
    );
    let out = sh_as(uid, gid, &format!("rm {dir}/rootfile"));
    assert_fails_with(&out, "Permission denied", "unlinking from root's directory");
    // EPERM: changing what only the owner (or root) may change.
    let out = sh_as(uid, gid, &format!("chmod 666 {dir}/rootfile"));
    assert_fails_with(&out, "Operation not permitted", "chmod of root's file");
    let out = sh_as(uid, gid, &format!("chown {uid} {dir}/rootfile"));
    assert_fails_with(&out, "Operation not permitted", "chown of root's file");
    let out = sh_as(uid, gid, &format!("touch -c -d 2001-01-01 {dir}/rootfile"));
    assert_fails_with(
        &out,
        "Operation not permitted",
        "setting root's file's mtime",
    );

    // What the user may do: read, and own what it creates.
    let out = sh_as(uid, gid, &format!("cat {dir}/rootfile"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "readable",
        "{}",
        text(&out)
    );
    let out = sh_as(
        uid,
        gid,
        &format!("echo mine > {dir}/shared/mine && chmod 600 {dir}/shared/mine && touch -d 2001-01-01 {dir}/shared/mine"),
    );
    assert!(out.status.success(), "{}", text(&out));
    let meta = fs::metadata(m.path("shared/mine")).expect("stat");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (uid, gid, 0o600)
    );
    assert_eq!(meta.mtime(), 978_307_200);
    m.umount();
    m.fsck_clean();
}

#[test]
fn fallocate_mmap_and_many_processes() {
    if !can_mount("fallocate_mmap_and_many_processes") {
        return;
    }
    let m = Mounted::new("fmm", "128M");
    m.mount();

    // fallocate: reserve without growing, then punch a hole that reads as zeros.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("alloc"))
        .expect("create");
    file.write_all_at(&[5u8; 64 << 10], 0).expect("write");
    // SAFETY: a valid descriptor; plain integer arguments.
    let kept = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 1 << 20) };
    assert_eq!(kept, 0, "fallocate: {}", std::io::Error::last_os_error());
    let meta = file.metadata().expect("stat");
    assert_eq!(meta.len(), 64 << 10, "KEEP_SIZE keeps the size");
    assert!(
        meta.blocks() * 512 >= 1 << 20,
        "blocks reserved: {}",
        meta.blocks()
    );
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: as above.
    let punched = unsafe { libc::fallocate(file.as_raw_fd(), mode, 8192, 16384) };
    assert_eq!(punched, 0, "punch: {}", std::io::Error::last_os_error());
    let mut back = vec![0u8; 64 << 10];
    file.read_exact_at(&mut back, 0).expect("read");
    assert!(back[..8192].iter().all(|&b| b == 5));
    assert!(
        back[8192..24576].iter().all(|&b| b == 0),
        "the hole reads as zeros"
    );
    assert!(back[24576..].iter().all(|&b| b == 5));
    // SAFETY: as above; the default mode grows the file.
    let grown = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, 200_000) };
    assert_eq!(grown, 0, "fallocate: {}", std::io::Error::last_os_error());
    assert_eq!(file.metadata().expect("stat").len(), 200_000);

    // mmap: a shared writable mapping reaches the file; a read mapping sees writes.
    let len = 3 * 4096 + 100;
    file.set_len(len as u64).expect("truncate");
    let map = Mapping::new(&file, len, true);
    map.bytes()[4000..4200].fill(0xee);
    map.sync();
    drop(map);
    let mut part = [0u8; 200];
    file.read_exact_at(&mut part, 4000).expect("read");
    assert_eq!(part, [0xee; 200], "written through the mapping");
    file.write_all_at(b"written", 12_000).expect("write");
    let map = Mapping::new(&file, len, false);
    assert_eq!(&map.bytes()[12_000..12_007], b"written");
    drop(map);
    drop(file);

    // Many processes at once: appenders never overwrite each other, creators all land.
    const PROCESSES: usize = 6;
    const LINES: usize = 300;
    let log = m.path("log");
    let shared = m.path("many");
    fs::create_dir(&shared).expect("mkdir");
    let children: Vec<_> = (0..PROCESSES)
        .map(|p| {
            let script = format!(
                "i=0; while [ $i -lt {LINES} ]; do echo \"process {p} line $i\" >> {log}; \
                 echo $i > {dir}/p{p}-$i; i=$((i+1)); done",
                log = log.display(),
                dir = shared.display()
            );
            std::process::Command::new("/bin/sh")
                .args(["-c", &script])
                .spawn()
                .expect("sh")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().expect("wait").success());
    }
    let lines = fs::read_to_string(&log).expect("read log");
    let mut seen = std::collections::BTreeSet::new();
    for line in lines.lines() {
        assert!(line.starts_with("process "), "a torn line: {line:?}");
        assert!(seen.insert(line.to_owned()), "a line twice: {line}");
    }
    assert_eq!(seen.len(), PROCESSES * LINES, "every appended line, once");
    assert_eq!(
        fs::read_dir(&shared).expect("readdir").count(),
        PROCESSES * LINES
    );
    m.umount();
    m.fsck_clean();
}

/// A shared mapping of a whole file, unmapped on drop.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: usize, writable: bool) -> Self {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of `len` bytes of an open file; checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Self { addr, len }
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes(&self) -> &mut [u8] {
        // SAFETY: the mapping is live for `len` bytes while `self` is; the tests use one
        // view at a time, and only writable mappings are written.
        unsafe { std::slice::from_raw_parts_mut(self.addr.cast::<u8>(), self.len) }
    }

    fn sync(&self) {
        // SAFETY: the live mapping.
        let rc = unsafe { libc::msync(self.addr, self.len, libc::MS_SYNC) };
        assert_eq!(rc, 0, "msync: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Operations of the random workload (at least this many; EXOFS_MODEL_OPS overrides).
const MODEL_OPS: usize = 100_000;
const MODEL_FILES: usize = 4;
const MODEL_MAX_SIZE: usize = 512 << 10;

#[test]
fn random_workload_matches_a_model() {
    if !can_mount("random_workload_matches_a_model") {
        return;
    }
    let ops: usize = std::env::var("EXOFS_MODEL_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MODEL_OPS);
    let seed: u64 = std::env::var("EXOFS_MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("random_workload_matches_a_model: seed {seed} (EXOFS_MODEL_SEED), {ops} operations");
    let mut rng = StdRng::seed_from_u64(seed);
    let m = Mounted::new("model", "128M");
    m.mount();
    let open = |i: usize| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(m.path(&format!("f{i}")))
            .expect("open")
    };
    let files: Vec<File> = (0..MODEL_FILES).map(open).collect();
    let mut model: Vec<Vec<u8>> = vec![Vec::new(); MODEL_FILES];
    let mut counts = [0usize; 7];
    for op in 0..ops {
        let which = rng.gen_range(0..MODEL_FILES);
        let (file, data) = (&files[which], &mut model[which]);
        let kind = rng.gen_range(0..20);
        let context = || format!("seed {seed}, operation {op}, file f{which}");
        match kind {
            // Writes, mostly small, sometimes past the end (a hole in between).
            0..=7 => {
                let offset = rng.gen_range(0..MODEL_MAX_SIZE - 16384);
                let len = if rng.gen_bool(0.8) {
                    rng.gen_range(1..512)
                } else {
                    rng.gen_range(1..16384)
                };
                let byte: u8 = rng.gen();
                let bytes = vec![byte; len];
                file.write_all_at(&bytes, offset as u64)
                    .unwrap_or_else(|e| panic!("write: {e} ({})", context()));
                if data.len() < offset + len {
                    data.resize(offset + len, 0);
                }
                data[offset..offset + len].copy_from_slice(&bytes);
                counts[0] += 1;
            }
            8..=12 => {
                let offset = rng.gen_range(0..MODEL_MAX_SIZE);
                let len = rng.gen_range(1..16384);
                let mut back = vec![0u8; len];
                let got = read_full(file, &mut back, offset as u64);
                let end = data.len().min(offset + len).max(offset.min(data.len()));
                let expected = &data[offset.min(data.len())..end];
                assert_eq!(
                    &back[..got],
                    expected,
                    "read at {offset}+{len} ({})",
                    context()
                );
                counts[1] += 1;
            }
            13 => {
                let size = rng.gen_range(0..MODEL_MAX_SIZE);
                file.set_len(size as u64)
                    .unwrap_or_else(|e| panic!("truncate: {e} ({})", context()));
                data.resize(size, 0);
                counts[2] += 1;
            }
            14..=15 if !data.is_empty() => {
                let map = Mapping::new(file, data.len(), false);
                let start = rng.gen_range(0..data.len());
                let end = (start + rng.gen_range(1..8192)).min(data.len());
                assert_eq!(
                    &map.bytes()[start..end],
                    &data[start..end],
                    "mmap read ({})",
                    context()
                );
                counts[3] += 1;
            }
            16..=17 if !data.is_empty() => {
                let map = Mapping::new(file, data.len(), true);
                let start = rng.gen_range(0..data.len());
                let end = (start + rng.gen_range(1..8192)).min(data.len());
                let byte: u8 = rng.gen();
                map.bytes()[start..end].fill(byte);
                map.sync();
                data[start..end].fill(byte);
                counts[4] += 1;
            }
            18 if !data.is_empty() => {
                let offset = rng.gen_range(0..data.len()) & !4095;
                let len = rng.gen_range(1..4) * 4096;
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                // SAFETY: a valid descriptor; plain integer arguments.
                let rc =
                    unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
                assert_eq!(
                    rc,
                    0,
                    "punch: {} ({})",
                    std::io::Error::last_os_error(),
                    context()
                );
                let end = (offset + len).min(data.len());
                data[offset..end].fill(0);
                counts[5] += 1;
            }
            _ => {
                file.sync_all()
                    .unwrap_or_else(|e| panic!("fsync: {e} ({})", context()));
                counts[6] += 1;
            }
        }
        if op % 20_000 == 19_999 {
            compare_all(
                &files,
                &model,
                &format!("seed {seed}, after operation {op}"),
            );
        }
    }
    eprintln!(
        "writes {}, reads {}, truncates {}, mmap reads {}, mmap writes {}, punches {}, fsyncs {}",
        counts[0], counts[1], counts[2], counts[3], counts[4], counts[5], counts[6]
    );
    assert!(
        counts.iter().all(|&n| n > 0) || ops < 1000,
        "every kind ran: {counts:?}"
    );
    compare_all(&files, &model, &format!("seed {seed}, at the end"));
    drop(files);
    m.umount();
    m.fsck_clean();
    m.mount();
    let files: Vec<File> = (0..MODEL_FILES).map(open).collect();
    compare_all(&files, &model, &format!("seed {seed}, after remounting"));
    drop(files);
    m.umount();
}

/// Reads until `buf` is full or the file ends; the count.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match file
            .read_at(&mut buf[done..], offset + done as u64)
            .expect("read")
        {
            0 => break,
            n => done += n,
        }
    }
    done
}

fn compare_all(files: &[File], model: &[Vec<u8>], when: &str) {
    for (i, (file, data)) in files.iter().zip(model).enumerate() {
        assert_eq!(
            file.metadata().expect("stat").len(),
            data.len() as u64,
            "f{i} size, {when}"
        );
        let mut back = vec![0u8; data.len()];
        assert_eq!(read_full(file, &mut back, 0), data.len(), "f{i}, {when}");
        if back != *data {
            let first = back.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
            panic!("f{i} differs from the model at byte {first}, {when}");
        }
    }
}
