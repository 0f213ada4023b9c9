//! Chained lookups through a real FUSE mount, as an unprivileged user: the chain ioctls
//! (through `exofs chain` on the mount, which uses the exofs-client crate, and through
//! the C example examples/c/chain_lookup.c), the policy file (paths, programs, hops,
//! batch sizes; default deny; reload), and the counting and logging of refusals.
//!
//! Needs root (to mount, load BPF and create the test user), /dev/fuse and a C
//! compiler; without root or FUSE each test prints a SKIPPED line.

mod common;

use common::{can_mount, exofs_as, run_as, test_user, text, Mounted};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The C example, compiled into a directory the test user can read.
struct CExample(PathBuf);

impl CExample {
    fn build() -> Self {
        let dir = std::env::temp_dir().join(format!("exofs-c-example-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let binary = dir.join("chain_lookup");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let built = Command::new("cc")
            .args(["-std=c11", "-Wall", "-Werror", "-I"])
            .arg(root.join("bpf/abi/include"))
            .arg("-o")
            .arg(&binary)
            .arg(root.join("examples/c/chain_lookup.c"))
            .output()
            .expect("run cc (gcc or clang must be installed)");
        assert!(built.status.success(), "cc: {}", text(&built));
        Self(binary)
    }
}

impl Drop for CExample {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// A policy file beside the image, removed on drop.
/// The mount's log, removed on drop.
struct LogFile(PathBuf);

impl Drop for LogFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

struct PolicyFile(PathBuf);

impl PolicyFile {
    fn new(m: &Mounted, text: &str) -> Self {
        let path = PathBuf::from(format!("{}.policy.toml", m.image()));
        fs::write(&path, text).expect("policy");
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8")
    }

    fn rewrite(&self, text: &str) {
        fs::write(&self.0, text).expect("policy");
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn refused_count(m: &Mounted) -> u64 {
    let stats = m.run(&["stats", m.dir()]);
    assert!(stats.status.success(), "stats: {}", text(&stats));
    text(&stats)
        .lines()
        .find_map(|line| line.trim().strip_prefix("refused"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no refused count in {}", text(&stats)))
}

fn assert_refused(out: &Output, what: &str) {
    assert_eq!(out.status.code(), Some(2), "{what}: {}", text(out));
    assert!(
        text(out).contains("Permission denied"),
        "{what}: {}",
        text(out)
    );
}

fn write_indexes(m: &Mounted) {
    for (path, kind, keys) in [
        ("/idx", "btree", "10000"),
        ("/other", "btree", "100"),
        ("/hash", "hash", "1000"),
    ] {
        let out = m.run(&["index", m.image(), path, "--kind", kind, "--keys", keys]);
        assert!(out.status.success(), "index {path}: {}", text(&out));
    }
}

fn load_programs(m: &Mounted) {
    for (name, object) in [
        ("btree", "example:btree"),
        ("hash_chain", "example:hash_chain"),
    ] {
        let out = m.run(&["prog", "load", m.dir(), name, object]);
        assert!(out.status.success(), "prog load {name}: {}", text(&out));
    }
}

const POLICY: &str = r#"
[[subject]]
uid = UID

[[subject.grant]]
paths = ["/idx", "/data/"]
programs = ["btree", "missing"]
max_hops = 8
max_batch = 16

[[subject.grant]]
paths = ["/hash"]
programs = ["hash_chain"]
max_hops = 64
max_batch = 1
"#;

#[test]
fn unprivileged_chains_follow_the_policy() {
    if !can_mount("unprivileged_chains_follow_the_policy") {
        return;
    }
    let (uid, gid) = test_user();
    let c = CExample::build();
    let m = Mounted::new("chains", "64M");
    write_indexes(&m);
    let policy = PolicyFile::new(&m, &POLICY.replace("UID", &uid.to_string()));
    let log = LogFile(PathBuf::from(format!("{}.log", m.image())));
    m.mount_with(&format!(
        "allow_other,default_permissions,policy={},log={}",
        policy.path(),
        log.0.display()
    ));
    load_programs(&m);
    let file = |name: &str| m.path(name).to_str().expect("utf-8").to_owned();
    let lookup = |args: &[&str]| run_as(uid, gid, &c.0, args);

    // Allowed: the CLI (exofs-client) and the C example, single and batch.
    let out = exofs_as(
        uid,
        gid,
        &["chain", m.dir(), "/idx", "--prog", "btree", "--key", "4243"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("key 4243: value 29701 (2 hops)"),
        "{}",
        text(&out)
    );
    let out = lookup(&[&file("idx"), "btree", "4243"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("key 4243: value 29701"),
        "{}",
        text(&out)
    );
    let out = lookup(&["--batch", &file("idx"), "btree", "4241", "16"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(text(&out).matches(": value ").count(), 8, "{}", text(&out));
    assert_eq!(
        text(&out).matches(": not found").count(),
        8,
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("key 4241: value 29687"),
        "{}",
        text(&out)
    );
    let out = lookup(&[&file("hash"), "hash_chain", "11"]);
    assert!(text(&out).contains("key 11: value 77"), "{}", text(&out));
    assert_eq!(refused_count(&m), 0);

    // Refused, each counted: a path, a program, hops, batch sizes, a stranger (root has
    // no grant: default deny).
    assert_refused(
        &lookup(&[&file("other"), "btree", "1"]),
        "a file not granted",
    );
    assert_refused(
        &lookup(&[&file("idx"), "hash_chain", "1"]),
        "a program not granted",
    );
    assert_refused(
        &lookup(&[&file("idx"), "btree", "4243", "9"]),
        "9 hops > max_hops 8",
    );
    assert_refused(
        &lookup(&["--batch", &file("idx"), "btree", "1", "17"]),
        "17 > max_batch 16",
    );
    assert_refused(
        &lookup(&["--batch", &file("hash"), "hash_chain", "1", "2"]),
        "2 > 1",
    );
    let root = m.run(&["chain", m.dir(), "/idx", "--prog", "btree", "--key", "1"]);
    assert!(text(&root).contains("Permission denied"), "{}", text(&root));
    assert_eq!(refused_count(&m), 6);
    let logged = fs::read_to_string(&log.0).expect("the daemon's log");
    for reason in [
        "the file is not granted",
        "the program is not granted for this file",
        "9 hops exceed max_hops 8",
        "a batch of 17 exceeds max_batch 16",
        "the policy grants this caller nothing",
    ] {
        assert!(logged.contains(reason), "log lacks `{reason}`:\n{logged}");
    }
    // Not refusals: an unknown program, malformed requests.
    let out = lookup(&[&file("idx"), "missing", "1"]);
    assert!(
        text(&out).contains("No such file or directory"),
        "{}",
        text(&out)
    );
    let out = lookup(&[&file("idx"), "btree", "1", "65"]);
    assert!(text(&out).contains("Invalid argument"), "{}", text(&out));
    assert_eq!(refused_count(&m), 6);

    // Grants follow names: a file written through the mount into a granted directory is
    // granted; moved out, it is not.
    fs::create_dir(m.path("data")).expect("mkdir");
    fs::copy(m.path("idx"), m.path("data/copy")).expect("copy through FUSE");
    let out = lookup(&[&file("data/copy"), "btree", "4243"]);
    assert!(
        text(&out).contains("key 4243: value 29701"),
        "{}",
        text(&out)
    );
    fs::rename(m.path("data/copy"), m.path("moved")).expect("rename");
    assert_refused(
        &lookup(&[&file("moved"), "btree", "4243"]),
        "moved out of /data/",
    );

    // Reload: the user may not; mistakes are named and change nothing; a good file
    // takes effect at once.
    let out = exofs_as(uid, gid, &["policy", "reload", m.dir()]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("only root or the mount's owner"),
        "{}",
        text(&out)
    );
    policy.rewrite("[[subject]]\nuid = 1\n[[subject.grant]]\npaths = [\"/other\"]\nprograms = []\nmax_hops = 99\nmax_batch = 1\n");
    let out = m.run(&["policy", "reload", m.dir()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let expected = format!("{}:5:", policy.path());
    assert!(text(&out).contains(&expected), "{}", text(&out));
    assert!(text(&out).contains("max_hops = 99"), "{}", text(&out));
    let out = lookup(&[&file("idx"), "btree", "4243"]);
    assert!(
        text(&out).contains("value 29701"),
        "the old policy stays: {}",
        text(&out)
    );
    policy.rewrite(
        &POLICY
            .replace("UID", &uid.to_string())
            .replace("/idx", "/other"),
    );
    let out = m.run(&["policy", "reload", m.dir()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = lookup(&[&file("other"), "btree", "21"]);
    assert!(text(&out).contains("key 21: value 147"), "{}", text(&out));
    assert_refused(
        &lookup(&[&file("idx"), "btree", "4243"]),
        "/idx no longer granted",
    );

    m.umount();
    assert!(
        m.pinned().is_empty(),
        "unmount removes every pin: {:?}",
        m.pinned()
    );
    m.fsck_clean();
}

#[test]
fn without_a_policy_every_chain_is_refused() {
    if !can_mount("without_a_policy_every_chain_is_refused") {
        return;
    }
    let (uid, gid) = test_user();
    let m = Mounted::new("deny", "64M");
    write_indexes(&m);
    m.mount_with("allow_other");
    load_programs(&m);
    let out = exofs_as(
        uid,
        gid,
        &["chain", m.dir(), "/idx", "--prog", "btree", "--key", "3"],
    );
    assert!(text(&out).contains("Permission denied"), "{}", text(&out));
    let out = m.run(&["chain", m.dir(), "/idx", "--prog", "btree", "--key", "3"]);
    assert!(text(&out).contains("Permission denied"), "{}", text(&out));
    assert_eq!(refused_count(&m), 2);
    // Without a policy file there is nothing to reload.
    let out = m.run(&["policy", "reload", m.dir()]);
    assert!(text(&out).contains("no policy file"), "{}", text(&out));
    m.umount();
    assert!(m.pinned().is_empty(), "{:?}", m.pinned());
}
