//! Helpers shared by the command-line and mount tests: run `exofs` (as root or as an
//! unprivileged user), private bpffs mounts, and mounted images that clean up after
//! themselves.
#![allow(dead_code)] // each test crate uses its own part of this module

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Runs the `exofs` binary under test with `args`.
pub fn exofs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_exofs"))
        .args(args)
        .output()
        .expect("run exofs")
}

/// Standard output then standard error, as text.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[path = "../../../libfs/tests/common/skip.rs"]
mod skipping;
pub use skipping::skip;

/// Whether this process may mount FUSE file systems and load BPF (root and /dev/fuse);
/// skips `test` if not.
pub fn can_mount(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/fuse").exists() {
        skip(test, "FUSE mounts need root and /dev/fuse (CI has both)");
        return false;
    }
    true
}

/// A private bpffs mount, so tests never touch /sys/fs/bpf; unmounted (with everything
/// pinned in it) on drop.
pub struct BpfFs(pub PathBuf);

impl BpfFs {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("exofs-bpffs-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).expect("bpffs dir");
        let mounted = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .output()
            .expect("mount");
        assert!(mounted.status.success(), "mount bpffs: {}", text(&mounted));
        Self(dir)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("utf-8")
    }

    /// What is pinned, besides the kernel's own `.debug` entries.
    pub fn pinned(&self) -> Vec<String> {
        fs::read_dir(&self.0)
            .expect("bpffs")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| !name.ends_with(".debug"))
            .collect()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.0)
            .output()
            .is_ok_and(|out| out.status.success());
        if !unmounted {
            // Busy (a process still in it): detached now, gone when it lets go.
            let _ = Command::new("umount").arg("-l").arg(&self.0).output();
        }
        let _ = fs::remove_dir(&self.0);
    }
}

/// A fresh image, mount point and private bpffs; unmounts (lazily, if need be) and
/// removes them on drop.
pub struct Mounted {
    image: PathBuf,
    dir: PathBuf,
    bpffs: BpfFs,
}

impl Mounted {
    pub fn new(test: &str, size: &str) -> Self {
        let base = std::env::temp_dir().join(format!("exofs-mount-{}-{test}", std::process::id()));
        let dir = base.with_extension("mnt");
        let image = base.with_extension("img");
        fs::create_dir_all(&dir).expect("mount point");
        let made = exofs(&["mkfs", image.to_str().expect("utf-8"), "--size", size]);
        assert!(made.status.success(), "mkfs: {}", text(&made));
        Self {
            image,
            dir,
            bpffs: BpfFs::new(test),
        }
    }

    pub fn image(&self) -> &str {
        self.image.to_str().expect("utf-8")
    }

    pub fn dir(&self) -> &str {
        self.dir.to_str().expect("utf-8")
    }

    pub fn bpffs(&self) -> &str {
        self.bpffs.path()
    }

    /// What is pinned in this mount's bpffs.
    pub fn pinned(&self) -> Vec<String> {
        self.bpffs.pinned()
    }

    /// Runs `exofs --bpffs <this mount's> ARGS` as root.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["--bpffs", self.bpffs()];
        all.extend_from_slice(args);
        exofs(&all)
    }

    /// Mounts with `options` (`-o`), background daemon.
    pub fn mount_with(&self, options: &str) {
        let mut args = vec!["mount", self.image(), self.dir()];
        if !options.is_empty() {
            args.extend_from_slice(&["-o", options]);
        }
        let out = self.run(&args);
        assert!(out.status.success(), "mount: {}", text(&out));
        assert!(self.is_mounted(), "mounted once `exofs mount` returns");
    }

    pub fn mount(&self) {
        self.mount_with("");
    }

    pub fn umount(&self) {
        let out = exofs(&["umount", self.dir()]);
        assert!(out.status.success(), "umount: {}", text(&out));
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn fsck_clean(&self) {
        let out = exofs(&["fsck", self.image()]);
        assert!(out.status.success(), "fsck: {}", text(&out));
    }

    pub fn is_mounted(&self) -> bool {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let dir = self.dir.canonicalize().unwrap_or_else(|_| self.dir.clone());
        mounts
            .lines()
            .any(|line| line.split_whitespace().nth(1) == Some(dir.to_str().unwrap_or("")))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.is_mounted() {
            let target = CString::new(self.dir.as_os_str().as_bytes()).expect("path");
            // SAFETY: a live NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        // Wait for the daemon to let go of the image before removing it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !exofs(&["fsck", self.image()]).status.success() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = fs::remove_dir(&self.dir);
        let _ = fs::remove_file(&self.image);
    }
}

/// The unprivileged user the tests run as: `exofs-test`, created (as a system user
/// without a home) if it does not exist. Returns (uid, gid).
pub fn test_user() -> (u32, u32) {
    const NAME: &str = "exofs-test";
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, NAME])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
    };
    if id("-u").is_none() {
        let made = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                NAME,
            ])
            .output()
            .expect("useradd (passwd package)");
        // Another test may have created it at the same moment.
        assert!(
            made.status.success() || id("-u").is_some(),
            "useradd {NAME}: {}",
            text(&made)
        );
    }
    (
        id("-u").expect("the test user's uid"),
        id("-g").expect("the test user's gid"),
    )
}

/// Runs `program ARGS` as `uid`/`gid` (std drops root's supplementary groups when it
/// sets the uid).
pub fn run_as(uid: u32, gid: u32, program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .uid(uid)
        .gid(gid)
        .output()
        .expect("run as the test user")
}

/// Runs `exofs ARGS` as `uid`/`gid`.
pub fn exofs_as(uid: u32, gid: u32, args: &[&str]) -> Output {
    run_as(uid, gid, Path::new(env!("CARGO_BIN_EXE_exofs")), args)
}
