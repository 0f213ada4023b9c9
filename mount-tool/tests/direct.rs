//! Direct chains through a real FUSE mount: unprivileged processes run the mount's
//! programs in the kernel themselves (docs/MOUNT.md "Direct chains").
//!
//! A hostile caller, `tests/direct/forge.c` (compiled here), opens the direct pins and
//! runs contexts whose every field it sets by hand, as the test user, as other users,
//! groups and cgroups; it also plays a root process that claims to be the daemon.
//!
//! Needs root (to mount, load BPF, create the test user and a cgroup), /dev/fuse, a C
//! compiler and clang; without root or FUSE each test prints a SKIPPED line.

mod common;

use common::{can_mount, exofs_as, test_user, text, Mounted};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Statuses (exofs_abi::chain::status).
const DONE: i64 = 0;
const HOP_LIMIT: i64 = 2;
const STALE: i64 = 3;
const OUT_OF_FILE: i64 = 4;
const DENIED: i64 = 7;
const INVALID: i64 = 9;
const NO_DAEMON: i64 = 11;
/// Every byte of the secret file (0xC3); no answer may ever carry eight of them. (The
/// hex of other bytes cannot contain this string out of step: it would take 0x3C bytes.)
const SECRET_HEX: &str = "c3c3c3c3c3c3c3c3";
/// A group granted `hash_chain` on /hash, and one granted nothing.
const GRANTED_GID: u32 = 4242;
const OTHER_GID: u32 = 4243;
/// A user granted nothing.
const NOBODY: u32 = 65534;

/// The C programs, built into a directory every user can read.
struct Built {
    dir: PathBuf,
}

impl Built {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("exofs-direct-bin-{}-{test}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let include = root.join("bpf/abi/include");
        for (source, binary) in [
            ("mount-tool/tests/direct/forge.c", "forge"),
            ("examples/c/direct_lookup.c", "direct_lookup"),
        ] {
            let built = Command::new("cc")
                .args(["-std=c11", "-Wall", "-Werror", "-I"])
                .arg(&include)
                .arg("-o")
                .arg(dir.join(binary))
                .arg(root.join(source))
                .output()
                .expect("run cc (gcc or clang must be installed)");
            assert!(built.status.success(), "cc {source}: {}", text(&built));
        }
        // `dump`: hands the first 32 bytes of the block it read back in the scratch.
        let dump_c = dir.join("dump.c");
        fs::write(
            &dump_c,
            "#include \"exofs.h\"
             int next(struct exofs_hop_state *s) {
                 __u64 *out = (__u64 *)s->scratch;
                 for (int i = 0; i < 4; i++)
                     out[i] = *(__u64 *)&s->data[i * 8];
                 return EXOFS_NEXT_DONE;
             }",
        )
        .expect("write dump.c");
        let clang = if Command::new("clang-22").arg("--version").output().is_ok() {
            "clang-22"
        } else {
            "clang"
        };
        let built = Command::new(clang)
            .args(["-O2", "-g", "-target", "bpf", "-c", "-I"])
            .arg(&include)
            .arg(format!(
                "-I/usr/include/{}-linux-gnu",
                std::env::consts::ARCH
            ))
            .arg(&dump_c)
            .arg("-o")
            .arg(dir.join("dump.o"))
            .output()
            .expect("run clang (scripts/setup.sh installs clang-22)");
        assert!(built.status.success(), "clang dump.c: {}", text(&built));
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Built {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A running `forge`: one request per line in, one answer per line out. Killed on drop.
struct Forge {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Forge {
    /// `forge` as `uid`/`gid` (None: as root) over the pins of `program`'s direct variant
    /// (`privileged`: its root-only variant) in `m`.
    fn spawn(built: &Built, m: &Mounted, program: &str, who: Option<(u32, u32)>) -> Self {
        Self::spawn_over(built, &pins(m, program, false), who)
    }

    fn spawn_over(built: &Built, pins: &(PathBuf, PathBuf), who: Option<(u32, u32)>) -> Self {
        let mut command = Command::new(built.path("forge"));
        command
            .arg(&pins.0)
            .arg(&pins.1)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some((uid, gid)) = who {
            command.uid(uid).gid(gid);
        }
        let mut child = command.spawn().expect("run forge");
        let input = child.stdin.take().expect("stdin");
        let output = BufReader::new(child.stdout.take().expect("stdout"));
        let mut forge = Self {
            child,
            input,
            output,
        };
        let ready = forge.line();
        assert_eq!(ready, "ready", "forge could not open {pins:?}");
        forge
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.output.read_line(&mut line).expect("read forge");
        line.trim().to_owned()
    }

    fn send(&mut self, request: &str) -> String {
        writeln!(self.input, "{request}").expect("write forge");
        self.input.flush().expect("flush forge");
        let answer = self.line();
        assert!(
            !answer.contains(SECRET_HEX),
            "SECRET bytes came back for `{request}`: {answer}"
        );
        answer
    }

    /// Discovers `path` (inside the mount) for `program`: (ino, generation).
    fn discover(&mut self, m: &Mounted, path: &str, program: &str) -> (u64, u64) {
        let answer = self.send(&format!("discover {} {program}", m.path(path).display()));
        let fields = fields(&answer);
        let (Some(ino), Some(gen)) = (fields.get("ino"), fields.get("gen")) else {
            panic!("discover {path} {program}: {answer}");
        };
        (*ino as u64, *gen as u64)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Forge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `name=value` fields of an answer (numbers only; `scratch` and the lookups are
/// read with [`lookup_of`]).
fn fields(answer: &str) -> BTreeMap<String, i64> {
    answer
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
        .collect()
}

/// (found, value) of an example lookup's scratch given in hex.
fn lookup_of(hex: &str) -> (u64, u64) {
    let word = |index: usize| {
        let bytes: Vec<u8> = (0..8)
            .map(|i| {
                let at = index * 16 + i * 2;
                u8::from_str_radix(&hex[at..at + 2], 16).expect("hex")
            })
            .collect();
        u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    };
    (word(1), word(2))
}

/// The status of a chain answer.
fn status_of(answer: &str) -> i64 {
    *fields(answer)
        .get("status")
        .unwrap_or_else(|| panic!("no status in {answer}"))
}

/// The scratch of a chain answer, in hex.
fn scratch_of(answer: &str) -> &str {
    answer
        .split_whitespace()
        .find_map(|word| word.strip_prefix("scratch="))
        .unwrap_or_else(|| panic!("no scratch in {answer}"))
}

/// The lookups of a batch answer: (status, hops, scratch hex).
fn lookups_of(answer: &str) -> Vec<(i64, u32, String)> {
    answer
        .split_whitespace()
        .filter(|word| word.starts_with('l'))
        .filter_map(|word| {
            let (_, rest) = word.split_once('=')?;
            let mut parts = rest.split('/');
            Some((
                parts.next()?.parse().ok()?,
                parts.next()?.parse().ok()?,
                parts.next()?.to_owned(),
            ))
        })
        .collect()
}

/// The pins of `program`'s direct (or, `privileged`, root-only) single-chain and batch
/// variants in `m`'s bpffs.
fn pins(m: &Mounted, program: &str, privileged: bool) -> (PathBuf, PathBuf) {
    let exofs = Path::new(m.bpffs()).join("exofs");
    let dir = fs::read_dir(&exofs)
        .expect("the pin directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .next()
        .expect("one file system's pins");
    let (chain, batch) = if privileged {
        ("progs", "batch")
    } else {
        ("direct", "direct-batch")
    };
    (dir.join(chain).join(program), dir.join(batch).join(program))
}

/// Direct hops served from the hot-block table so far, from `exofs stats`.
fn hot_hits(m: &Mounted) -> u64 {
    let out = m.run(&["stats", m.dir()]);
    assert!(out.status.success(), "stats: {}", text(&out));
    let stats = text(&out);
    stats
        .lines()
        .find_map(|line| line.strip_prefix("hot hits"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no `hot hits` in {stats}"))
}

/// The kernel's denial counters from `exofs stats`: (denied, no grant, hops, batch, no
/// handle).
fn denials(m: &Mounted) -> (u64, u64, u64, u64, u64) {
    let out = m.run(&["stats", m.dir()]);
    assert!(out.status.success(), "stats: {}", text(&out));
    let stats = text(&out);
    let count = |label: &str| -> u64 {
        stats
            .lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no `{label}` in {stats}"))
    };
    (
        count("denied"),
        count("no grant"),
        count("too many hops"),
        count("batch too big"),
        count("no handle"),
    )
}

/// A cgroup2 directory made for the test, removed (its processes moved out) on drop.
struct Cgroup {
    dir: PathBuf,
    root: PathBuf,
}

impl Cgroup {
    fn new(test: &str) -> Self {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let root = mountinfo
            .lines()
            .find_map(|line| {
                let (before, after) = line.split_once(" - ")?;
                let point = before.split_whitespace().nth(4)?;
                (after.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(point))
            })
            .expect("a cgroup2 mount (this machine has one at /sys/fs/cgroup/unified)");
        let dir = root.join(format!("exofs-direct-{}-{test}", std::process::id()));
        fs::create_dir_all(&dir).expect("make the test cgroup");
        Self { dir, root }
    }

    fn enter(&self, pid: u32) {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("enter the cgroup");
    }

    fn leave(&self, pid: u32) {
        fs::write(self.root.join("cgroup.procs"), pid.to_string()).expect("leave the cgroup");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(pids) = fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in pids.lines() {
                let _ = fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

const POLICY: &str = r#"
[[subject]]
uid = UID

[[subject.grant]]
paths = ["/idx", "/private", "/data/"]
programs = ["btree"]
max_hops = 8
max_batch = 16

[[subject.grant]]
paths = ["/open"]
programs = ["dump"]
max_hops = 4
max_batch = 32

[[subject]]
gid = GRANTED_GID

[[subject.grant]]
paths = ["/hash"]
programs = ["hash_chain"]
max_hops = 64
max_batch = 1

[[subject]]
cgroup = "CGROUP"

[[subject.grant]]
paths = ["/idx"]
programs = ["btree"]
max_hops = 8
max_batch = 16
"#;

/// A file removed on drop.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Mounts a fresh image with the indexes, the secret and open files, the policy and the
/// programs `btree`, `hash_chain` and `dump`.
fn mounted(test: &str, built: &Built, cgroup: &Cgroup) -> (Mounted, Removed) {
    let (uid, _) = test_user();
    let m = Mounted::new(test, "64M");
    for (path, kind, keys) in [("/idx", "btree", "10000"), ("/hash", "hash", "1000")] {
        let out = m.run(&["index", m.image(), path, "--kind", kind, "--keys", keys]);
        assert!(out.status.success(), "index {path}: {}", text(&out));
    }
    let policy = Removed(PathBuf::from(format!("{}.policy.toml", m.image())));
    let text_of_policy = POLICY
        .replace("GRANTED_GID", &GRANTED_GID.to_string())
        .replace("UID", &uid.to_string())
        .replace("CGROUP", cgroup.dir.to_str().expect("utf-8"));
    fs::write(&policy.0, text_of_policy).expect("policy");
    m.mount_with(&format!(
        "allow_other,default_permissions,policy={}",
        policy.0.display()
    ));
    fs::write(m.path("secret"), vec![0xC3; 64 << 10]).expect("write /secret");
    fs::write(m.path("open"), vec![0x5A; 16 << 10]).expect("write /open");
    for path in ["idx", "hash", "secret", "open"] {
        fs::set_permissions(m.path(path), fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    fs::create_dir(m.path("data")).expect("mkdir /data");
    fs::copy(m.path("idx"), m.path("data/copy")).expect("copy /idx to /data/copy");
    // Granted by the policy, but only root may open it.
    fs::copy(m.path("idx"), m.path("private")).expect("copy /idx to /private");
    fs::set_permissions(m.path("private"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let dump = built.path("dump.o");
    for (name, object) in [
        ("btree", "example:btree"),
        ("hash_chain", "example:hash_chain"),
        ("dump", dump.to_str().expect("utf-8")),
    ] {
        let out = m.run(&["prog", "load", m.dir(), name, object]);
        assert!(out.status.success(), "prog load {name}: {}", text(&out));
    }
    (m, policy)
}

/// The example index's answer for `key`: keys 1, 3, 5, ... (10000 of them), value 7 * key.
fn reference(key: u64) -> (u64, u64) {
    if key % 2 == 1 && key < 20000 {
        (1, key * 7)
    } else {
        (0, 0)
    }
}

#[test]
fn direct_chains_answer_as_the_reference_and_every_refusal_is_counted() {
    if !can_mount("direct_chains_answer_as_the_reference_and_every_refusal_is_counted") {
        return;
    }
    let (uid, gid) = test_user();
    let built = Built::new("answers");
    let cgroup = Cgroup::new("answers");
    let (m, policy) = mounted("direct", &built, &cgroup);
    let mut user = Forge::spawn(&built, &m, "btree", Some((uid, gid)));
    let (idx, idx_gen) = user.discover(&m, "idx", "btree");

    // Allowed: single chains and a batch, equal to the reference walk, and to the
    // daemon's answer through the ioctl.
    for key in [1, 3, 4242, 4243, 9999, 19999, 20001] {
        let answer = user.send(&format!("chain ino={idx} gen={idx_gen} hops=8 key={key}"));
        assert_eq!(status_of(&answer), DONE, "key {key}: {answer}");
        assert_eq!(lookup_of(scratch_of(&answer)), reference(key), "key {key}");
    }
    let answer = user.send(&format!(
        "batch ino={idx} gen={idx_gen} hops=8 count=16 key=4230"
    ));
    assert_eq!(fields(&answer)["retval"], DONE, "{answer}");
    for (i, (status, _, scratch)) in lookups_of(&answer).iter().take(16).enumerate() {
        let key = 4230 + i as u64;
        assert_eq!(*status, DONE, "batch lookup {i}: {answer}");
        assert_eq!(lookup_of(scratch), reference(key), "batch key {key}");
    }
    for via in ["direct", "daemon"] {
        let out = exofs_as(
            uid,
            gid,
            &[
                "chain",
                m.dir(),
                "/idx",
                "--prog",
                "btree",
                "--key",
                "4243",
                "--via",
                via,
            ],
        );
        assert!(
            text(&out).contains("key 4243: value 29701 ("),
            "--via {via}: {}",
            text(&out)
        );
    }
    let lookup = built.path("direct_lookup");
    let idx_path = m.path("idx");
    let idx_path = idx_path.to_str().expect("utf-8");
    let out = common::run_as(uid, gid, &lookup, &[idx_path, "btree", "4243"]);
    assert!(
        text(&out).contains("key 4243: value 29701 ("),
        "{}",
        text(&out)
    );
    let out = common::run_as(
        uid,
        gid,
        &lookup,
        &["--batch", idx_path, "btree", "4241", "4"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for key in 4241..4245u64 {
        let expected = match reference(key) {
            (1, value) => format!("key {key}: value {value} ("),
            _ => format!("key {key}: not found ("),
        };
        assert!(text(&out).contains(&expected), "{}", text(&out));
    }

    // Refusals, each counted by the kernel with its reason.
    let secret = fs::metadata(m.path("secret")).expect("stat").ino();
    let expect_denied = |forge: &mut Forge, request: &str, reason: usize, count: u64| {
        let before = denials(&m);
        let answer = forge.send(request);
        let status = fields(&answer)
            .get("status")
            .or(fields(&answer).get("retval"))
            .copied();
        assert_eq!(status, Some(DENIED), "`{request}`: {answer}");
        let after = denials(&m);
        let moved = [
            after.0 - before.0,
            after.1 - before.1,
            after.2 - before.2,
            after.3 - before.3,
            after.4 - before.4,
        ];
        let mut expected = [count, 0, 0, 0, 0];
        expected[reason] += count;
        assert_eq!(moved, expected, "`{request}` counted as {moved:?}");
    };
    // An ungranted file (at any generation), and a granted one beside it.
    expect_denied(&mut user, &format!("chain ino={secret} gen=1 hops=8"), 1, 1);
    expect_denied(
        &mut user,
        &format!("chain ino={idx} gen={idx_gen} ino1={secret} gen1=1 files=2 hops=8"),
        1,
        1,
    );
    // Hops and batch size over the grant.
    expect_denied(
        &mut user,
        &format!("chain ino={idx} gen={idx_gen} hops=9"),
        2,
        1,
    );
    expect_denied(
        &mut user,
        &format!("batch ino={idx} gen={idx_gen} hops=8 count=17"),
        3,
        17,
    );
    // A program the grant does not name, on the granted file.
    let mut other_program = Forge::spawn(&built, &m, "hash_chain", Some((uid, gid)));
    expect_denied(
        &mut other_program,
        &format!("chain ino={idx} gen={idx_gen} hops=8"),
        1,
        1,
    );
    // Another uid.
    let mut nobody = Forge::spawn(&built, &m, "btree", Some((NOBODY, NOBODY)));
    expect_denied(
        &mut nobody,
        &format!("chain ino={idx} gen={idx_gen} hops=8"),
        1,
        1,
    );
    // A group: granted, then not.
    let mut member = Forge::spawn(&built, &m, "hash_chain", Some((NOBODY, GRANTED_GID)));
    let (hash, hash_gen) = member.discover(&m, "hash", "hash_chain");
    let answer = member.send(&format!("chain ino={hash} gen={hash_gen} hops=64 key=11"));
    assert_eq!(status_of(&answer), DONE, "{answer}");
    assert_eq!(lookup_of(scratch_of(&answer)), (1, 77));
    let mut stranger = Forge::spawn(&built, &m, "hash_chain", Some((NOBODY, OTHER_GID)));
    expect_denied(
        &mut stranger,
        &format!("chain ino={hash} gen={hash_gen} hops=64 key=11"),
        1,
        1,
    );
    // A cgroup: granted inside it, not once it left.
    cgroup.enter(nobody.pid());
    assert_eq!(nobody.discover(&m, "idx", "btree"), (idx, idx_gen));
    let answer = nobody.send(&format!("chain ino={idx} gen={idx_gen} hops=8 key=4243"));
    assert_eq!(
        status_of(&answer),
        DONE,
        "inside the granted cgroup: {answer}"
    );
    assert_eq!(lookup_of(scratch_of(&answer)), reference(4243));
    cgroup.leave(nobody.pid());
    expect_denied(
        &mut nobody,
        &format!("chain ino={idx} gen={idx_gen} hops=8"),
        1,
        1,
    );

    // Grants follow names: moved out of the granted directory, a file's direct chains
    // are denied without any request to the daemon (its refresher recompiles).
    let (copy, copy_gen) = user.discover(&m, "data/copy", "btree");
    let chain_copy = format!("chain ino={copy} gen={copy_gen} hops=8 key=4243");
    assert_eq!(status_of(&user.send(&chain_copy)), DONE);
    fs::rename(m.path("data/copy"), m.path("moved")).expect("rename");
    let deadline = Instant::now() + Duration::from_secs(2);
    while status_of(&user.send(&chain_copy)) != DENIED {
        assert!(
            Instant::now() < deadline,
            "a file moved out of /data/ is still granted to direct chains"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // A file the policy grants but the user cannot open: no ticket, whatever the
    // generation; nor, once the user closed its handles, for /idx.
    let private = fs::metadata(m.path("private")).expect("stat").ino();
    let out = user.send(&format!("discover {} btree", m.path("private").display()));
    assert_eq!(out, format!("error={}", libc::EACCES), "open /private");
    for generation in 0..4 {
        expect_denied(
            &mut user,
            &format!("chain ino={private} gen={generation} hops=8"),
            4,
            1,
        );
    }
    assert_eq!(user.send("close"), "closed");
    expect_denied(
        &mut user,
        &format!("chain ino={idx} gen={idx_gen} hops=8"),
        4,
        1,
    );

    // Forged contexts: never a byte of /secret, never a status the fields do not
    // explain. `dump` hands back the first 32 bytes of whatever block it is given.
    let mut dump = Forge::spawn(&built, &m, "dump", Some((uid, gid)));
    let (open, open_gen) = dump.discover(&m, "open", "dump");
    let honest = format!("ino={open} gen={open_gen} hops=4");
    let answer = dump.send(&format!("chain {honest}"));
    assert_eq!(status_of(&answer), DONE, "{answer}");
    assert!(
        scratch_of(&answer).starts_with(&"5a".repeat(32)),
        "{answer}"
    );
    let forged: Vec<(String, i64)> = vec![
        (format!("chain ino={secret} gen=1 hops=4"), DENIED),
        (format!("chain ino={secret} gen=2 hops=4"), DENIED),
        (
            format!("chain ino={open} gen={open_gen} ino1={secret} gen1=1 files=2 sfile=1 hops=4"),
            DENIED,
        ),
        (format!("chain {honest} files=0"), INVALID),
        (format!("chain {honest} files=5"), INVALID),
        (format!("chain {honest} files=4294967295"), INVALID),
        (format!("chain {honest} sfile=1"), INVALID),
        (format!("chain {honest} sfile=4294967295"), INVALID),
        (format!("chain {honest} len=0"), INVALID),
        (format!("chain {honest} len=4097"), INVALID),
        (format!("chain {honest} start=16384"), OUT_OF_FILE),
        (
            format!("chain {honest} start=18446744073709551615"),
            OUT_OF_FILE,
        ),
        (
            format!("chain {honest} start=9223372036854775808"),
            OUT_OF_FILE,
        ),
        (
            format!("chain ino={open} gen={} hops=4", open_gen - 1),
            STALE,
        ),
        (
            format!("chain ino={open} gen={} hops=4", open_gen + 1),
            STALE,
        ),
        (
            format!("chain ino={open} gen=18446744073709551615 hops=4"),
            STALE,
        ),
        (format!("chain {honest} shop=4"), HOP_LIMIT),
        (format!("chain {honest} shop=4294967295"), HOP_LIMIT),
        (format!("chain ino={open} gen={open_gen} hops=0"), HOP_LIMIT),
        // Anything that looks like an address, a mapping or a subject.
        (format!("chain {honest} map_addr=140737488289792"), INVALID),
        (format!("chain {honest} map_len=68719476736"), INVALID),
        (
            format!("chain {honest} map_addr=18446744073709551615 map_len=18446744073709551615"),
            INVALID,
        ),
        (format!("chain {honest} uid=0"), DONE),
        (format!("chain {honest} uid=1"), INVALID),
        (format!("chain {honest} gid=1"), INVALID),
        (format!("chain {honest} cgroup=1"), INVALID),
        (format!("chain {honest} flags=1"), INVALID),
        (format!("chain {honest} flags=2 uid={uid}"), INVALID),
        (format!("chain {honest} flags=4294967295"), INVALID),
        (format!("chain {honest} missing=0"), DONE),
    ];
    for (request, expected) in &forged {
        let answer = dump.send(request);
        assert_eq!(status_of(&answer), *expected, "`{request}`: {answer}");
    }
    for request in [
        format!("batch ino={secret} gen=1 hops=4 count=32"),
        format!("batch {honest} count=0"),
        format!("batch {honest} count=33"),
        format!("batch {honest} count=4294967295"),
        format!("batch {honest} count=8 map_addr=4096"),
        format!("batch {honest} count=8 flags=2 uid={uid}"),
        format!("batch {honest} count=8 start=1048576"),
        format!("batch ino={open} gen={} hops=4 count=8", open_gen + 1),
        format!("batch {honest} count=32 shop=4"),
    ] {
        let answer = dump.send(&request);
        let retval = fields(&answer)["retval"];
        assert!(
            [DONE, DENIED, INVALID].contains(&retval),
            "`{request}`: {answer}"
        );
        if retval == DONE {
            assert!(
                lookups_of(&answer)
                    .iter()
                    .all(|(status, _, _)| *status != DONE),
                "`{request}` read something: {answer}"
            );
        }
    }
    // The callers go before the mount and its bpffs.
    drop((user, other_program, nobody, member, stranger, dump));
    drop((m, policy));
}

#[test]
fn pins_in_directories_another_user_made_are_refused_and_one_daemon_holds_them() {
    if !can_mount("pins_in_directories_another_user_made_are_refused_and_one_daemon_holds_them") {
        return;
    }
    let (uid, gid) = test_user();
    let m = Mounted::new("direct-pins", "32M");
    let policy = Removed(PathBuf::from(format!("{}.policy.toml", m.image())));
    fs::write(&policy.0, "").expect("policy");
    let options = format!("ro,policy={}", policy.0.display());
    // The user makes <bpffs>/exofs first, to own the tree the pins would go in.
    let planted = Path::new(m.bpffs()).join("exofs");
    let made = Command::new("mkdir")
        .arg(&planted)
        .uid(uid)
        .gid(gid)
        .output()
        .expect("mkdir as the test user");
    assert!(made.status.success(), "mkdir: {}", text(&made));
    let out = m.run(&["mount", m.image(), m.dir(), "-o", &options]);
    assert!(
        !out.status.success(),
        "mounted over a planted pin directory"
    );
    assert!(
        text(&out).contains("not a directory owned by this user"),
        "{}",
        text(&out)
    );
    assert!(!m.is_mounted());
    let _ = fs::remove_dir(&planted);
    // One daemon per file system: a second read-only mount of the same image is refused
    // rather than take the first one's daemon entry and policy over.
    let out = m.run(&["mount", m.image(), m.dir(), "-o", &options]);
    assert!(out.status.success(), "mount: {}", text(&out));
    let second = PathBuf::from(format!("{}.second", m.dir()));
    fs::create_dir_all(&second).expect("second mount point");
    let out = m.run(&[
        "mount",
        m.image(),
        second.to_str().expect("utf-8"),
        "-o",
        &options,
    ]);
    if out.status.success() {
        // Wrongly mounted: leave nothing behind before failing.
        let _ = common::exofs(&["umount", second.to_str().expect("utf-8")]);
    }
    let _ = fs::remove_dir(&second);
    assert!(!out.status.success(), "a second daemon took the pins");
    assert!(
        text(&out).contains("another mount daemon holds these pins"),
        "{}",
        text(&out)
    );
    m.umount();
    drop((m, policy));
}

/// The daemon's process id: the `exofs ... mount IMAGE ... -f` process.
fn daemon_pid(image: &str) -> u32 {
    fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.contains(&image.as_bytes()) && args.contains(&b"-f".as_slice())
        })
        .expect("the daemon's process")
}

/// Starts a `forge` as root over `pins` whose process id is `pid` (the pid just freed by
/// a dead daemon), by setting the kernel's last pid and retrying until it lands there.
fn forge_at_pid(built: &Built, pins: &(PathBuf, PathBuf), pid: u32) -> Forge {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("set ns_last_pid (root)");
        let forge = Forge::spawn_over(built, pins, None);
        if forge.pid() == pid {
            return forge;
        }
    }
    panic!("no process could be started with the dead daemon's pid {pid}");
}

#[test]
fn after_kill_9_of_the_daemon_direct_chains_return_no_data_whoever_takes_its_pid() {
    if !can_mount("after_kill_9_of_the_daemon_direct_chains_return_no_data_whoever_takes_its_pid") {
        return;
    }
    let (uid, gid) = test_user();
    let built = Built::new("kill");
    let cgroup = Cgroup::new("kill");
    let (m, policy) = mounted("direct-kill", &built, &cgroup);
    let mut user = Forge::spawn(&built, &m, "btree", Some((uid, gid)));
    let (idx, idx_gen) = user.discover(&m, "idx", "btree");
    let chain = format!("chain ino={idx} gen={idx_gen} hops=8 key=4243");
    let batch = format!("batch ino={idx} gen={idx_gen} hops=8 count=16 key=4243");
    let answer = user.send(&chain);
    assert_eq!(status_of(&answer), DONE, "{answer}");
    assert_eq!(lookup_of(scratch_of(&answer)), reference(4243));
    // Until the daemon has copied the walk's blocks into its hot-block table and both the
    // chain and the batch are served from it: after the kill, they must give no data
    // from the table either.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = hot_hits(&m);
        let answer = user.send(&chain);
        assert_eq!(status_of(&answer), DONE, "{answer}");
        let chain_hops = fields(&answer)["hops"] as u64;
        let by_chain = hot_hits(&m) - before;
        let answer = user.send(&batch);
        let lookups = lookups_of(&answer);
        assert!(
            lookups
                .iter()
                .take(16)
                .all(|(status, _, _)| *status == DONE),
            "{answer}"
        );
        let batch_hops: u64 = lookups
            .iter()
            .take(16)
            .map(|(_, hops, _)| *hops as u64)
            .sum();
        let by_batch = hot_hits(&m) - before - by_chain;
        // Every hop of both from the table: after the kill no hop can miss it and fail
        // on the mapping instead, so only the end-of-call check can refuse the data.
        if by_chain == chain_hops && by_batch == batch_hops {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hot-block table serves no hops"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // Only the daemon may name a subject: a root process that is not it, running the
    // privileged program and naming the granted user, is checked as itself (root, who
    // is granted nothing).
    let privileged = pins(&m, "btree", true);
    let named =
        format!("chain ino={idx} gen={idx_gen} hops=8 key=4243 flags=2 uid={uid} gid={gid}");
    let mut impostor = Forge::spawn_over(&built, &privileged, None);
    assert_eq!(status_of(&impostor.send(&named)), DENIED);
    drop(impostor);

    let daemon = daemon_pid(m.image());
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(daemon as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{daemon}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the daemon {daemon} does not go away"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A process with the daemon's pid: still not the daemon.
    let mut impostor = forge_at_pid(&built, &privileged, daemon);
    assert_eq!(
        status_of(&impostor.send(&named)),
        DENIED,
        "a process that took the dead daemon's pid spoke for another user"
    );
    // The user's chains, through the pins it still holds: a clear status, no data.
    let answer = user.send(&chain);
    assert_eq!(status_of(&answer), NO_DAEMON, "{answer}");
    assert_eq!(lookup_of(scratch_of(&answer)), (0, 0), "{answer}");
    assert_eq!(fields(&answer)["hops"], 0, "{answer}");
    let answer = user.send(&batch);
    for (status, hops, scratch) in lookups_of(&answer).iter().take(16) {
        assert_eq!(*status, NO_DAEMON, "{answer}");
        assert_eq!(lookup_of(scratch).0, 0, "{answer}");
        assert_eq!(*hops, 0, "{answer}");
    }
    // A newly opened pin (the pins outlive the daemon until its bpffs goes): the same.
    let mut late = Forge::spawn(&built, &m, "btree", Some((uid, gid)));
    assert_eq!(status_of(&late.send(&chain)), NO_DAEMON);
    drop((late, impostor, user));
    drop((m, policy));
}
