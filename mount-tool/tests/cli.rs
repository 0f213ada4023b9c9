//! The `exofs` command line on real image files and on a real block device (a loop
//! device, which needs root: the test says so and skips when it is not root).

mod common;

use common::{exofs, text, BpfFs};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch file removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        Scratch(std::env::temp_dir().join(format!("exofs-cli-{}-{name}", std::process::id())))
    }
    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn roundtrip(image: &str, source: &Path) {
    let put = exofs(&["put", image, source.to_str().expect("path"), "/copy"]);
    assert!(put.status.success(), "put: {}", text(&put));
    let get = exofs(&["get", image, "/copy"]);
    assert!(get.status.success(), "get: {}", text(&get));
    assert_eq!(get.stdout, std::fs::read(source).expect("read source"));
    let fsck = exofs(&["fsck", image]);
    assert!(fsck.status.success(), "fsck: {}", text(&fsck));
    assert!(text(&fsck).contains("clean"));
}

#[test]
fn mkfs_put_get_fsck_on_an_image_file() {
    let image = Scratch::new("image");
    let made = exofs(&["mkfs", image.path(), "--size", "64M"]);
    assert!(made.status.success(), "mkfs: {}", text(&made));
    assert_eq!(std::fs::metadata(&image.0).expect("image").len(), 64 << 20);
    let source = Scratch::new("source");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&source.0, &data).expect("write source");
    roundtrip(image.path(), &source.0);
    let listing = exofs(&["ls", image.path()]);
    assert!(text(&listing).contains("300000 copy"), "{}", text(&listing));
    let extents = exofs(&["extents", image.path(), "/copy"]);
    assert!(
        text(&extents).lines().any(|l| l.starts_with("0 ")),
        "{}",
        text(&extents)
    );
}

#[test]
fn mkfs_refuses_bad_input_clearly() {
    let missing = Scratch::new("missing");
    let out = exofs(&["mkfs", missing.path()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("give --size"), "{}", text(&out));
    let out = exofs(&["mkfs", missing.path(), "--size", "12Q"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("bad size suffix"), "{}", text(&out));
    let out = exofs(&["mkfs", missing.path(), "--size", "1M"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("too small"), "{}", text(&out));
    let garbage = Scratch::new("garbage");
    std::fs::write(&garbage.0, vec![0x5au8; 1 << 20]).expect("garbage");
    let out = exofs(&["fsck", garbage.path()]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("superblock"), "{}", text(&out));
}

#[test]
fn fsck_reports_and_repairs_a_leaked_block() {
    let image = Scratch::new("leak");
    assert!(exofs(&["mkfs", image.path(), "--size", "16M"])
        .status
        .success());
    // Mark a free data block used in the bitmap by hand, then reseal the block.
    let mut bytes = std::fs::read(&image.0).expect("read image");
    let bitmap_start = u64::from_le_bytes(bytes[80..88].try_into().expect("8 bytes")) as usize;
    let block = &mut bytes[bitmap_start * 4096..(bitmap_start + 1) * 4096];
    let bit = 4000usize;
    block[16 + bit / 8] |= 1 << (bit % 8);
    let block: &mut [u8; 4096] = block.try_into().expect("block");
    libfs::format::seal_block(block, libfs::format::MAGIC_BITMAP, bitmap_start as u64);
    std::fs::write(&image.0, &bytes).expect("write image");
    let out = exofs(&["fsck", image.path()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("block 4000: leaked"), "{}", text(&out));
    let out = exofs(&["fsck", image.path(), "--repair"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = exofs(&["fsck", image.path()]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A loop device detached on drop, even when the test fails.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn mkfs_and_fsck_on_a_block_device() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(
            "mkfs_and_fsck_on_a_block_device",
            "loop devices need root (CI runs as root)",
        );
        return;
    }
    let backing = Scratch::new("backing");
    std::fs::File::create(&backing.0)
        .and_then(|f| f.set_len(32 << 20))
        .expect("backing file");
    let attach = Command::new("losetup")
        .args(["--find", "--show", backing.path()])
        .output();
    let device = match attach {
        Ok(out) if out.status.success() => {
            Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        Ok(out) => panic!("losetup failed as root: {}", text(&out)),
        Err(e) => panic!("losetup is missing (util-linux): {e}"),
    };
    let made = exofs(&["mkfs", &device.0]);
    assert!(
        made.status.success(),
        "mkfs on {}: {}",
        device.0,
        text(&made)
    );
    assert!(text(&made).contains("8192 blocks"), "{}", text(&made));
    let source = Scratch::new("device-source");
    std::fs::write(&source.0, vec![0xabu8; 1 << 20]).expect("source");
    roundtrip(&device.0, &source.0);
}

#[test]
fn prog_chain_stats_and_unload() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(
            "prog_chain_stats_and_unload",
            "loading BPF needs root (CI runs as root)",
        );
        return;
    }
    let image = Scratch::new("prog.img");
    let bpffs = BpfFs::new("cli");
    let bpffs_arg = bpffs.path();
    let run = |args: &[&str]| {
        let mut all = vec!["--bpffs", bpffs_arg];
        all.extend_from_slice(args);
        exofs(&all)
    };
    assert!(exofs(&["mkfs", image.path(), "--size", "64M"])
        .status
        .success());
    let index = exofs(&[
        "index",
        image.path(),
        "/index",
        "--keys",
        "5000",
        "--node-size",
        "512",
    ]);
    assert!(index.status.success(), "{}", text(&index));
    assert!(text(&index).contains("B-tree of depth"), "{}", text(&index));
    let load = run(&["prog", "load", image.path(), "tree", "example:btree"]);
    assert!(load.status.success(), "{}", text(&load));
    let bad = run(&["prog", "load", image.path(), "other", "example:nope"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("no example `nope`"), "{}", text(&bad));
    assert_eq!(text(&run(&["prog", "list", image.path()])).trim(), "tree");
    // (key, extra arguments, expected text)
    let chains: [(&str, &[&str], &str); 3] = [
        ("4001", &[], "key 4001: value 28007 ("),
        ("4002", &[], "key 4002: not found ("),
        ("1", &["--start", "99999999"], "offset outside the file"),
    ];
    for (key, extra, expected) in chains {
        let mut args = vec![
            "chain",
            image.path(),
            "/index",
            "--prog",
            "tree",
            "--key",
            key,
        ];
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(text(&out).contains(expected), "{}", text(&out));
        let code = if extra.is_empty() { 0 } else { 1 };
        assert_eq!(out.status.code(), Some(code), "{}", text(&out));
    }
    let stats = text(&run(&["stats", image.path()]));
    assert!(stats.contains("chains    3"), "{stats}");
    assert!(stats.contains("rejects   1"), "{stats}");
    let unload = run(&["prog", "unload", image.path(), "tree"]);
    assert!(unload.status.success(), "{}", text(&unload));
    let left = bpffs.pinned();
    assert!(left.is_empty(), "nothing is left pinned: {left:?}");
}

#[test]
fn policy_check_reports_mistakes_with_lines() {
    let good = Scratch::new("good.toml");
    std::fs::write(
        &good.0,
        "[[subject]]\nuid = 1000\n[[subject.grant]]\npaths = [\"/idx\"]\nprograms = [\"btree\"]\nmax_hops = 10\nmax_batch = 8\n",
    )
    .expect("write");
    let out = exofs(&["policy", "check", good.path()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("valid, 1 subjects, 1 grants"),
        "{}",
        text(&out)
    );
    let bad = Scratch::new("bad.toml");
    std::fs::write(
        &bad.0,
        "[[subject]]\nuid = 1000\n[[subject.grant]]\npaths = [\"idx\"]\nprograms = [\"btree\"]\nmax_hops = 100\nmax_batch = 8\n",
    )
    .expect("write");
    let out = exofs(&["policy", "check", bad.path()]);
    assert_eq!(out.status.code(), Some(1));
    let report = text(&out);
    assert!(report.contains(&format!("{}:4:", bad.path())), "{report}");
    assert!(report.contains("path `idx`"), "{report}");
    assert!(report.contains(&format!("{}:6:", bad.path())), "{report}");
    assert!(report.contains("max_hops = 100: use 1..=64"), "{report}");
}

#[test]
fn bench_chain_under_a_cache_budget_counts_the_disks_reads() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(
            "bench_chain_under_a_cache_budget_counts_the_disks_reads",
            "memory cgroups and BPF need root (CI runs as root)",
        );
        return;
    }
    // On a real disk (the temporary directory may be tmpfs, which has no disk to count).
    let image = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("exofs-cli-{}-budget.img", std::process::id()));
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("exofs-cli-{}-budget.json", std::process::id()));
    let plot = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("exofs-cli-{}-budget.svg", std::process::id()));
    let paths = [
        "pread",
        "pread_direct",
        "io_uring_32",
        "io_uring_32_direct",
        "chain",
        "chain_batch",
        "chain_pipelined",
        "mmap_random",
    ];
    let out = exofs(&[
        "bench",
        "chain",
        "--index-size",
        "32M",
        "--cache-budget",
        "8M",
        "--mode",
        "cold",
        "--lookups",
        "5000",
        "--paths",
        &paths.join(","),
        "--image",
        image.to_str().expect("utf-8"),
        "--json",
        json.to_str().expect("utf-8"),
        "--plot",
        plot.to_str().expect("utf-8"),
    ]);
    let printed = text(&out);
    assert!(out.status.success(), "bench: {printed}");
    assert!(printed.contains("cache budget: 8 MiB"), "{printed}");
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON")).expect("JSON");
    std::fs::remove_file(&json).expect("remove the JSON");
    let svg = std::fs::read_to_string(&plot).expect("the plot");
    std::fs::remove_file(&plot).expect("remove the plot");
    assert!(svg.starts_with("<svg"), "{svg}");
    for path in paths {
        assert!(
            svg.lines().any(|line| line.trim() == path),
            "{path} is not in the plot"
        );
    }
    // The device's limit, measured in the run.
    for depth in ["qd1_iops", "qd32_iops"] {
        let iops = figures["device"][depth].as_f64().unwrap_or_default();
        assert!(iops > 100.0, "{depth}: {iops} ({printed})");
    }
    // Every path answers every key right (the bench fails otherwise), from the steady
    // state out of core: some blocks it needs are not in memory, it reads the disk, and
    // its read amplification and limit are reported.
    let results = figures["results"].as_array().expect("results");
    for path in paths {
        let result = results
            .iter()
            .find(|r| r["path"] == path)
            .unwrap_or_else(|| panic!("no {path} result: {printed}"));
        assert_eq!(result["mode"], "ooc", "{result}");
        let number = |field: &str| result[field].as_f64().unwrap_or_default();
        assert!(
            number("device_reads") > 0.0,
            "{path} read nothing: {result}"
        );
        assert!(number("misses_per_lookup") > 0.0, "{path}: {result}");
        assert!(number("read_amplification") > 0.0, "{path}: {result}");
        assert!(number("limit_lookups_per_sec") > 0.0, "{path}: {result}");
    }
    // The bench removed its cgroup and its image.
    let mine = format!("exofs-bench-{}", out_pid(&printed));
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/memory"] {
        assert!(
            !Path::new(root).join(&mine).exists(),
            "{root}/{mine} was left behind"
        );
    }
    assert!(!image.exists(), "the image was left behind");
}

/// The pid in the bench's "cache budget: ... in .../exofs-bench-PID" line.
fn out_pid(printed: &str) -> String {
    printed
        .lines()
        .find_map(|line| line.split("exofs-bench-").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn bench_via_mount_answers_every_key_on_every_path_as_the_unprivileged_user() {
    const TEST: &str = "bench_via_mount_answers_every_key_on_every_path_as_the_unprivileged_user";
    if !common::can_mount(TEST) {
        return;
    }
    common::test_user();
    let image = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("exofs-cli-{}-via-mount.img", std::process::id()));
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("exofs-cli-{}-via-mount.json", std::process::id()));
    let out = exofs(&[
        "bench",
        "chain",
        "--via-mount",
        "--user",
        "exofs-test",
        "--mode",
        "warm",
        "--index-size",
        "8M",
        "--lookups",
        "2000",
        "--rounds",
        "1",
        "--image",
        image.to_str().expect("utf-8"),
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    let printed = text(&out);
    assert!(out.status.success(), "bench: {printed}");
    assert!(!image.exists(), "the bench left its image");
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON")).expect("JSON");
    std::fs::remove_file(&json).expect("remove the JSON");
    // The client checks every answer against the tree it built (a wrong one fails the
    // bench), so a figure for a path means all its lookups were right.
    let results = figures["results"].as_array().expect("results");
    for path in [
        "fuse_pread",
        "fuse_mmap",
        "ioctl_chain",
        "ioctl_batch",
        "direct_chain",
        "direct_batch",
    ] {
        let result = results
            .iter()
            .find(|r| r["path"] == path)
            .unwrap_or_else(|| panic!("no {path} result: {printed}"));
        assert_eq!(result["lookups"], 2000, "{result}");
        assert!(
            result["lookups_per_sec"].as_f64().unwrap_or_default() > 0.0,
            "{result}"
        );
    }
}

#[test]
fn bench_sqlite_answers_every_rowid_on_every_path_warm_and_out_of_core() {
    const TEST: &str = "bench_sqlite_answers_every_rowid_on_every_path_warm_and_out_of_core";
    if !common::can_mount(TEST) {
        return;
    }
    common::test_user();
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let database = scratch.join(format!("exofs-cli-{}-bench.db", std::process::id()));
    let image = scratch.join(format!("exofs-cli-{}-bench-sqlite.img", std::process::id()));
    let json = scratch.join(format!(
        "exofs-cli-{}-bench-sqlite.json",
        std::process::id()
    ));
    let out = exofs(&[
        "bench",
        "sqlite",
        "--user",
        "exofs-test",
        "--size",
        "32M",
        "--lookups",
        "1000",
        // (Not out of core at this size: the budget must hold the daemon with its
        // hot-block table, the program loader (the verifier's memory) and the clients,
        // which 32M did not, nor 64M once the table came. The path is what is tested.)
        "--cache-budget",
        "96M",
        "--database",
        database.to_str().expect("utf-8"),
        "--image",
        image.to_str().expect("utf-8"),
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    let printed = text(&out);
    let _ = std::fs::remove_file(&database);
    assert!(out.status.success(), "bench: {printed}");
    assert!(!image.exists(), "the bench left its image");
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON")).expect("JSON");
    std::fs::remove_file(&json).expect("remove the JSON");
    // Each client checks every answer against the value it stored (a wrong one fails the
    // bench), so a figure means all its lookups were right.
    let results = figures["results"].as_array().expect("results");
    for mode in ["warm", "ooc"] {
        for path in [
            "chain",
            "chain_batch",
            "ioctl_batch",
            "sqlite_mount",
            "sqlite_host",
            "pread_walk",
        ] {
            let result = results
                .iter()
                .find(|r| r["path"] == path && r["mode"] == mode)
                .unwrap_or_else(|| panic!("no {mode} {path} result: {printed}"));
            assert_eq!(result["lookups"], 1000, "{result}");
            assert!(
                result["lookups_per_sec"].as_f64().unwrap_or_default() > 0.0,
                "{result}"
            );
        }
    }
}
