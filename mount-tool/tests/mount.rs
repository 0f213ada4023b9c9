//! `exofs mount` over real FUSE mounts: the lifecycle (background mount, `exofs umount`,
//! SIGTERM, kill -9 and recovery) and what ordinary tools expect of a file system.
//!
//! Mounting needs root and /dev/fuse; without them each test prints a SKIPPED line.
//! Every mount is unmounted by a guard, even when a test fails.

mod common;

use common::{can_mount, exofs, text, Mounted};
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn errno_of(result: std::io::Result<impl Sized>) -> i32 {
    match result {
        Ok(_) => 0,
        Err(err) => err.raw_os_error().unwrap_or(-1),
    }
}

#[test]
fn mount_umount_and_remount_keep_data() {
    if !can_mount("mount_umount_and_remount_keep_data") {
        return;
    }
    let m = Mounted::new("lifecycle", "64M");
    m.mount();
    fs::write(m.path("kept"), b"across mounts").expect("write");
    fs::create_dir(m.path("dir")).expect("mkdir");
    m.umount();
    assert!(!m.is_mounted());
    m.fsck_clean();
    m.mount();
    assert_eq!(fs::read(m.path("kept")).expect("read"), b"across mounts");
    assert!(m.path("dir").is_dir());
    // A plain umount ends the daemon too; it checkpoints before it lets go of the image.
    let out = Command::new("umount")
        .arg(m.dir())
        .output()
        .expect("umount");
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exofs(&["fsck", m.image()]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the daemon did not let go of the image"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Bad arguments are named.
    let bad = m.run(&["mount", m.image(), m.dir(), "-o", "bogus"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("unknown mount option `bogus`"),
        "{}",
        text(&bad)
    );
    let not_dir = exofs(&["mount", m.image(), m.image()]);
    assert!(
        text(&not_dir).contains("not a directory"),
        "{}",
        text(&not_dir)
    );
}

fn daemon(m: &Mounted) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_exofs"))
        .args(["--bpffs", m.bpffs(), "mount", m.image(), m.dir(), "-f"])
        .spawn()
        .expect("start the daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !m.is_mounted() {
        assert!(Instant::now() < deadline, "the mount did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn sigterm_unmounts_cleanly_and_kill_9_recovers() {
    if !can_mount("sigterm_unmounts_cleanly_and_kill_9_recovers") {
        return;
    }
    let m = Mounted::new("signals", "64M");
    let mut child = daemon(&m);
    fs::write(m.path("before"), b"synced").expect("write");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(
        status.success(),
        "the daemon exits cleanly on SIGTERM: {status}"
    );
    assert!(!m.is_mounted());
    m.fsck_clean();

    // kill -9 in the middle of writes: synced data survives, fsck is clean after the
    // next mount replays the journal.
    let mut child = daemon(&m);
    let mut synced = fs::File::create(m.path("synced")).expect("create");
    synced.write_all(&[7u8; 100_000]).expect("write");
    synced.sync_all().expect("fsync");
    let writer = {
        let path = m.path("unsynced");
        std::thread::spawn(move || {
            if let Ok(mut file) = fs::File::create(path) {
                for _ in 0..10_000 {
                    if file.write_all(&[9u8; 4096]).is_err() {
                        break;
                    }
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    let _ = writer.join();
    let target = CString::new(m.dir().as_bytes()).expect("path");
    // SAFETY: a live NUL-terminated path; the daemon is gone, the mount is dead.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    m.mount();
    assert_eq!(
        fs::read(m.path("synced")).expect("read"),
        vec![7u8; 100_000]
    );
    assert_eq!(fs::read(m.path("before")).expect("read"), b"synced");
    m.umount();
    m.fsck_clean();
}

#[test]
fn ordinary_tools_find_what_they_expect() {
    if !can_mount("ordinary_tools_find_what_they_expect") {
        return;
    }
    let m = Mounted::new("posix", "128M");
    m.mount();
    let p = |name: &str| m.path(name);

    // Files: write, read, append, seek, truncate, sparse.
    fs::write(p("f"), b"hello").expect("write");
    let mut append = OpenOptions::new()
        .append(true)
        .open(p("f"))
        .expect("open append");
    append.write_all(b" world").expect("append");
    drop(append);
    assert_eq!(fs::read(p("f")).expect("read"), b"hello world");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("f"))
        .expect("open");
    file.seek(SeekFrom::Start(1 << 20)).expect("seek");
    file.write_all(b"end").expect("sparse write");
    assert_eq!(fs::metadata(p("f")).expect("stat").len(), (1 << 20) + 3);
    let mut middle = [1u8; 16];
    file.seek(SeekFrom::Start(4096)).expect("seek");
    file.read_exact(&mut middle).expect("read hole");
    assert_eq!(middle, [0u8; 16], "a hole reads as zeros");
    assert!(
        fs::metadata(p("f")).expect("stat").blocks() < 64,
        "sparse: few blocks used"
    );
    file.set_len(5).expect("truncate");
    drop(file);
    assert_eq!(fs::read(p("f")).expect("read"), b"hello");

    // Links, symlinks, rename over an existing entry.
    fs::hard_link(p("f"), p("hard")).expect("link");
    assert_eq!(fs::metadata(p("f")).expect("stat").nlink(), 2);
    std::os::unix::fs::symlink("f", p("sym")).expect("symlink");
    assert_eq!(fs::read_link(p("sym")).expect("readlink"), Path::new("f"));
    assert_eq!(fs::read(p("sym")).expect("through the link"), b"hello");
    fs::write(p("other"), b"other").expect("write");
    fs::rename(p("other"), p("hard")).expect("rename over");
    assert_eq!(fs::read(p("hard")).expect("read"), b"other");
    assert_eq!(fs::metadata(p("f")).expect("stat").nlink(), 1);

    // Permissions, ownership, timestamps.
    fs::set_permissions(p("f"), fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_eq!(fs::metadata(p("f")).expect("stat").mode() & 0o7777, 0o600);
    std::os::unix::fs::chown(p("f"), Some(1234), Some(5678)).expect("chown");
    let meta = fs::metadata(p("f")).expect("stat");
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    let before = fs::metadata(p("f"))
        .expect("stat")
        .modified()
        .expect("mtime");
    std::thread::sleep(Duration::from_millis(20));
    fs::write(p("f"), b"again").expect("write");
    assert!(
        fs::metadata(p("f"))
            .expect("stat")
            .modified()
            .expect("mtime")
            > before
    );

    // Directories, large ones included.
    fs::create_dir_all(p("a/b/c")).expect("mkdir -p");
    for i in 0..2000 {
        fs::write(p(&format!("a/b/c/file{i}")), i.to_string()).expect("create");
    }
    let mut names: Vec<String> = fs::read_dir(p("a/b/c"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2000);
    assert_eq!(
        fs::read_to_string(p("a/b/c/file1999")).expect("read"),
        "1999"
    );

    // xattrs, statfs, fsync.
    let path = CString::new(p("f").as_os_str().as_bytes()).expect("path");
    let name = CString::new("user.color").expect("name");
    // SAFETY: live C strings and a live buffer of the given length.
    let set =
        unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"blue".as_ptr().cast(), 4, 0) };
    assert_eq!(set, 0, "setxattr: {}", std::io::Error::last_os_error());
    let mut value = [0u8; 16];
    // SAFETY: as above.
    let got = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    assert_eq!(&value[..got as usize], b"blue");
    let stat = nix::sys::statvfs::statvfs(m.dir()).expect("statvfs");
    assert_eq!(stat.block_size(), 4096);
    assert!(stat.blocks() > 0 && stat.blocks_free() > 0);
    fs::File::open(p("f"))
        .expect("open")
        .sync_all()
        .expect("fsync");

    // The errors tools rely on.
    assert_eq!(errno_of(fs::read(p("missing"))), libc::ENOENT);
    assert_eq!(errno_of(fs::create_dir(p("a"))), libc::EEXIST);
    assert_eq!(errno_of(fs::remove_dir(p("a"))), libc::ENOTEMPTY);
    assert_eq!(errno_of(fs::remove_file(p("a"))), libc::EISDIR);
    assert_eq!(errno_of(fs::read(p("f/x"))), libc::ENOTDIR);
    assert_eq!(
        errno_of(fs::write(p(&"n".repeat(300)), b"")),
        libc::ENAMETOOLONG
    );
    std::os::unix::fs::symlink("loop2", p("loop1")).expect("symlink");
    std::os::unix::fs::symlink("loop1", p("loop2")).expect("symlink");
    assert_eq!(errno_of(fs::read(p("loop1"))), libc::ELOOP);
    assert_eq!(
        errno_of(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(p("f"))
        ),
        libc::EEXIST
    );

    // An unlinked file stays usable while open.
    let mut open = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p("tmp"))
        .expect("create");
    fs::remove_file(p("tmp")).expect("unlink");
    open.write_all(b"still here").expect("write unlinked");
    open.seek(SeekFrom::Start(0)).expect("seek");
    let mut back = String::new();
    open.read_to_string(&mut back).expect("read unlinked");
    assert_eq!(back, "still here");
    drop(open);

    m.umount();
    m.fsck_clean();
}

/// /sbin/mount.exofs pointing at the binary under test while the guard lives; whatever was
/// there before comes back on drop.
struct Helper {
    previous: Option<PathBuf>,
}

const HELPER: &str = "/sbin/mount.exofs";

impl Helper {
    fn install() -> Self {
        let previous = fs::read_link(HELPER).ok();
        if Path::new(HELPER).exists() && previous.is_none() {
            panic!("{HELPER} is a regular file; move it away to run this test");
        }
        let _ = fs::remove_file(HELPER);
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_exofs"), HELPER).expect("install helper");
        Self { previous }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = fs::remove_file(HELPER);
        if let Some(previous) = &self.previous {
            let _ = std::os::unix::fs::symlink(previous, HELPER);
        }
    }
}

#[test]
fn mount_t_exofs_and_fstab_use_the_helper() {
    if !can_mount("mount_t_exofs_and_fstab_use_the_helper") {
        return;
    }
    let _helper = Helper::install();
    let m = Mounted::new("helper", "64M");
    let bpffs = format!("bpffs={}", m.bpffs());
    let out = Command::new("mount")
        .args(["-t", "exofs", m.image(), m.dir(), "-o", &bpffs])
        .output()
        .expect("mount(8)");
    assert!(out.status.success(), "mount -t exofs: {}", text(&out));
    assert!(m.is_mounted());
    fs::write(m.path("via-helper"), b"mount -t exofs").expect("write");
    m.umount();
    // An fstab line (in a private fstab: mount -T), with options fstab users write.
    let fstab = PathBuf::from(format!("{}.fstab", m.image()));
    fs::write(
        &fstab,
        format!(
            "# exofs test\n{} {} exofs defaults,noauto,nofail,allow_other,{bpffs} 0 0\n",
            m.image(),
            m.dir()
        ),
    )
    .expect("fstab");
    let out = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(m.dir())
        .output()
        .expect("mount(8)");
    let _ = fs::remove_file(&fstab);
    assert!(out.status.success(), "mount from fstab: {}", text(&out));
    assert_eq!(
        fs::read(m.path("via-helper")).expect("read"),
        b"mount -t exofs"
    );
    let out = Command::new("umount")
        .arg(m.dir())
        .output()
        .expect("umount");
    assert!(out.status.success(), "{}", text(&out));
    // A bad option from mount(8) is named, with mount's failure code.
    let out = Command::new("mount")
        .args(["-t", "exofs", m.image(), m.dir(), "-o", "bogus"])
        .output()
        .expect("mount(8)");
    assert_eq!(out.status.code(), Some(32), "{}", text(&out));
    assert!(
        text(&out).contains("unknown mount option `bogus`"),
        "{}",
        text(&out)
    );
}

/// What was written without fsync is committed by the daemon within a few seconds: it
/// survives a kill -9 that comes after that.
#[test]
fn unsynced_writes_are_committed_within_seconds() {
    if !can_mount("unsynced_writes_are_committed_within_seconds") {
        return;
    }
    let m = Mounted::new("periodic", "64M");
    let mut child = daemon(&m);
    fs::write(m.path("unsynced"), vec![3u8; 50_000]).expect("write");
    fs::create_dir(m.path("dir")).expect("mkdir");
    // The commit interval is 5 s.
    std::thread::sleep(Duration::from_millis(6500));
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    let target = CString::new(m.dir().as_bytes()).expect("path");
    // SAFETY: a live NUL-terminated path; the daemon is gone, the mount is dead.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    m.mount();
    assert_eq!(
        fs::read(m.path("unsynced")).expect("read"),
        vec![3u8; 50_000]
    );
    assert!(m.path("dir").is_dir());
    m.umount();
    m.fsck_clean();
}
