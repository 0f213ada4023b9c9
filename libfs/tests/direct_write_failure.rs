//! A write that fails after it was queued (write-behind) is not lost silently: sync
//! reports it, the file system turns read-only, and what was synced before is intact.
//!
//! The failure is made with RLIMIT_FSIZE (writes past the limit fail with EFBIG), which
//! is per process: this binary holds this one test only.

mod common;

use libfs::{format, BlockDevice, FileDevice, FormatOptions, Fs, OpenOptions, ROOT_INO};
use std::path::PathBuf;
use std::sync::Arc;

const MIB: usize = 1 << 20;

fn set_file_size_limit(limit: libc::rlim_t) {
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct; no memory is kept.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) }, 0);
}

#[test]
fn failed_write_behind_is_reported_and_loses_nothing_synced() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("exofs-direct-failure-{}.img", std::process::id()));
    let device = FileDevice::create(&path, 64 << 20).expect("create image");
    if !device.writes_direct() {
        let _ = std::fs::remove_file(&path);
        let why = format!("{} refuses O_DIRECT", path.display());
        common::skip(
            "failed_write_behind_is_reported_and_loses_nothing_synced",
            &why,
        );
        return;
    }
    // SAFETY: ignoring SIGXFSZ (sent with EFBIG) is process-wide and harmless here.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };

    // The device alone: the queued write returns, then every sync and write reports it.
    set_file_size_limit(32 << 20);
    device
        .write_at(&vec![7u8; MIB], 40 << 20)
        .expect("the write is queued, not yet made");
    let err = device
        .sync()
        .expect_err("sync must report the failed write");
    let message = err.to_string();
    assert!(
        message.contains(&format!("at {}", 40 << 20)) && message.contains("too large"),
        "unclear error: {message}"
    );
    assert!(
        device.write_at(&vec![1u8; 4096], 0).is_err(),
        "later writes fail"
    );
    assert!(device.settle().is_err(), "settle reports it too");
    drop(device);
    set_file_size_limit(libc::RLIM_INFINITY);

    // Through the file system: synced data, then a file whose blocks lie past the limit.
    let device = Arc::new(FileDevice::create(&path, 64 << 20).expect("reopen image"));
    format(device.clone(), &FormatOptions::default()).expect("format");
    drop(device);
    let fs = Fs::open(&path, &OpenOptions::default()).expect("open");
    let kept = fs
        .create(ROOT_INO, b"kept", 0o644, 0, 0)
        .expect("create")
        .ino;
    let kept_data: Vec<u8> = (0..2 * MIB).map(|i| (i % 253) as u8).collect();
    fs.write_at(kept, 0, &kept_data).expect("write kept");
    fs.sync().expect("sync");
    let last = fs
        .extents(kept)
        .expect("extents")
        .iter()
        .map(|e| e.physical + e.length)
        .max();
    let limit = last.expect("kept has blocks") * libfs::BLOCK_SIZE as u64;
    set_file_size_limit(limit);
    let lost = fs
        .create(ROOT_INO, b"lost", 0o644, 0, 0)
        .expect("create")
        .ino;
    let written = fs.write_at(lost, 0, &vec![9u8; 4 * MIB]);
    let synced = fs.fsync(lost);
    assert!(
        written.is_err() || synced.is_err(),
        "data written past the limit was reported as durable"
    );
    assert!(
        fs.write_at(kept, 0, b"more").is_err(),
        "the file system must stop taking writes after losing one"
    );
    drop(fs);
    set_file_size_limit(libc::RLIM_INFINITY);

    let device = Arc::new(FileDevice::open(&path, false).expect("open read-only"));
    let report = libfs::fsck::check(device).expect("fsck");
    assert!(report.problems.is_empty(), "fsck: {:?}", report.problems);
    let fs = Fs::open(&path, &OpenOptions::default()).expect("reopen");
    let attr = fs.lookup(ROOT_INO, b"kept").expect("kept is there");
    let mut buf = vec![0u8; 2 * MIB];
    assert_eq!(fs.read_at(attr.ino, 0, &mut buf).expect("read"), 2 * MIB);
    assert!(buf == kept_data, "synced data changed");
    fs.close().expect("close");
    std::fs::remove_file(&path).expect("remove image");
}
