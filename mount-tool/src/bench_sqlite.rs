//! `exofs bench sqlite`: random rowid lookups in an SQLite database of `--size` (4 GiB by
//! default), made by SQLite, stored on an exofs mount, looked up by an unprivileged user
//! (`--user`, default nobody) five ways in one run:
//!   chain         one direct chain of `sqlite_rowid` per lookup (exofs_client::sqlite);
//!   chain_batch   direct chains, 32 lookups per kernel call;
//!   ioctl_batch   the daemon's batch ioctl, 32 lookups per round trip: the daemon reads a
//!                 round's missing pages together and resumes the lookups (a direct batch
//!                 waits for each miss in turn: docs/BENCHMARKS.md, direct chains);
//!   sqlite_mount  SQLite itself on the database on the mount: a prepared
//!                 `SELECT v FROM t WHERE rowid = ?` and its default page cache;
//!   sqlite_host   the same on the host copy the database was made in (a reference: no
//!                 FUSE in the way);
//!   pread_walk    the same walk as the chain, in user space: one pread per page on the
//!                 mount (exofs_client::sqlite::Database::walk).
//!
//! Method: the table is t(v INTEGER, pad BLOB), v = 7 * rowid + 3, rowids 1..=N dense,
//! 4 KiB pages; every answer is checked. The database is made once in `--database` and
//! kept for later runs of the same size; the image is made and removed by each run. Each
//! phase runs in a child process as the user. Warm phases follow an untimed pass over the
//! same rowids. Out of core (`--cache-budget`, 256M by default with `--mode ooc`), as `bench
//! chain --via-mount`: this process enters a memory cgroup of that size before it mounts,
//! so the daemon, the clients and every page cache they fill share it; before each phase a
//! fresh daemon and dropped caches, then an untimed warm-up of half as many other rowids,
//! then the timed lookups.

use crate::bench_chain::Phase;
use crate::bench_via_mount::{
    median_phases, policy_granting, run_client, run_rounds, timed_phase, user_ids, Mount,
};
use exofs_client::sqlite::{Database, Value};
use exofs_client::{Handle, Via};
use rusqlite::{Connection, OpenFlags};
use std::error::Error;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const PATHS: [&str; 6] = [
    "chain",
    "chain_batch",
    "ioctl_batch",
    "sqlite_mount",
    "sqlite_host",
    "pread_walk",
];
const PROGRAM: &str = "bench_sqlite";
const TABLE: &str = "t";
/// The database's file on the mount.
const ON_MOUNT: &str = "/db";

#[derive(clap::Args, Debug)]
pub struct SqliteArgs {
    /// Database size to aim for.
    #[arg(long, default_value = "4G", value_parser = crate::size::parse_size)]
    size: u64,
    /// Bytes of each row's blob beside the integer looked up.
    #[arg(long, default_value_t = 200)]
    row_bytes: usize,
    /// Lookups per phase.
    #[arg(long, default_value_t = 20_000)]
    lookups: usize,
    /// Only warm or ooc phases.
    #[arg(long)]
    mode: Option<String>,
    /// Out of core: run in a memory cgroup of this many bytes (default with --mode ooc:
    /// 256M).
    #[arg(long, value_parser = crate::size::parse_size)]
    cache_budget: Option<u64>,
    /// Rounds of every phase, the paths taking turns; the table shows each phase's
    /// median round.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Only these paths (comma-separated).
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// The host copy of the database (made if missing or of another size; kept).
    #[arg(long, default_value = "/var/tmp/exofs-bench-sqlite.db")]
    database: PathBuf,
    /// The image the database is copied into (made and removed).
    #[arg(long, default_value = "/var/tmp/exofs-bench-sqlite.img")]
    image: PathBuf,
    /// The user the lookups run as.
    #[arg(long, default_value = "nobody")]
    user: String,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// (Internal: one phase, run as the user, on this database file.)
    #[arg(long, hide = true)]
    client: Option<PathBuf>,
    #[arg(long, hide = true, default_value = "")]
    client_path: String,
    #[arg(long, hide = true, default_value = "warm")]
    client_mode: String,
    #[arg(long, hide = true, default_value_t = 1)]
    client_seed: u64,
    #[arg(long, hide = true, default_value_t = 1)]
    client_rows: u64,
    #[arg(long, hide = true)]
    client_host: Option<PathBuf>,
}

/// The integer stored in row `rowid`.
fn value_of(rowid: i64) -> i64 {
    7 * rowid + 3
}

/// `count` rowids in 1..=rows, from `seed`.
fn rowids(seed: u64, rows: u64, count: usize) -> Vec<i64> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % rows.max(1)) as i64 + 1
        })
        .collect()
}

pub fn bench_sqlite(args: &SqliteArgs) -> Result<()> {
    if let Some(file) = &args.client {
        return client(args, file);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("bench sqlite mounts and loads BPF: run it as root".into());
    }
    let (uid, gid) = user_ids(&args.user)?;
    let rows = make_database(&args.database, args.size, args.row_bytes)?;
    let db_bytes = std::fs::metadata(&args.database)?.len();
    println!(
        "database: {} rows, {} MiB, 4 KiB pages ({})",
        rows,
        db_bytes >> 20,
        args.database.display()
    );
    let _image = make_image(&args.image, &args.database, db_bytes)?;
    let ooc_only = args.mode.as_deref() == Some("ooc");
    let budget = args.cache_budget.or(ooc_only.then_some(256 << 20));
    // Entered before the mount, left last: the daemon and the clients are its children.
    let _cgroup = match budget {
        Some(budget) => Some(crate::budget::MemoryCgroup::enter(budget)?),
        None => None,
    };
    let mount = Mount::new(
        &args.image,
        &policy_granting(uid, ON_MOUNT, PROGRAM),
        budget,
        (PROGRAM, "example:sqlite_rowid"),
        // As the README's mount: the kernel checks permissions, so it may cache names
        // (and absent names: SQLite looks for its journal at every query).
        "default_permissions",
    )?;
    mount.up()?;
    let file = mount.dir.join(ON_MOUNT.trim_start_matches('/'));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    std::fs::set_permissions(&args.database, std::fs::Permissions::from_mode(0o644))?;
    let paths: Vec<&'static str> = PATHS
        .iter()
        .copied()
        .filter(|p| args.paths.is_empty() || args.paths.iter().any(|q| q == p))
        .collect();
    let cold = if budget.is_some() { "ooc" } else { "cold" };
    let mut phases = Vec::new();
    let mut seed = 1u64;
    for mode in ["warm", cold] {
        if args.mode.as_deref().is_some_and(|wanted| wanted != mode) {
            continue;
        }
        let mut rounds = run_rounds(
            &mount,
            &paths,
            mode,
            args.rounds.max(1),
            &mut seed,
            &mut |path, seed, round| {
                let mut command = Command::new(std::env::current_exe()?);
                command
                    .args(["bench", "sqlite", "--client"])
                    .arg(&file)
                    .arg("--client-host")
                    .arg(&args.database)
                    .args(["--client-path", path, "--client-mode", mode])
                    .args(["--lookups", &args.lookups.to_string()])
                    .args(["--client-seed", &seed.to_string()])
                    .args(["--client-rows", &rows.to_string()])
                    .uid(uid)
                    .gid(gid);
                let phase = run_client(command, path, mode, args.lookups)?;
                println!("{mode} round {}: {path} {:.0}", round + 1, phase.per_sec());
                Ok(phase)
            },
        )?;
        phases.extend(median_phases(&mut rounds, &paths, mode));
    }
    drop(mount);
    report(args, &phases, rows, db_bytes)
}

/// Makes the database (unless `path` holds one of this size already): its row count.
fn make_database(path: &Path, size: u64, row_bytes: usize) -> Result<u64> {
    // A row takes its blob, the integer, the record and cell headers and a cell pointer.
    let rows = (size / (row_bytes as u64 + 20)).max(1);
    if let Ok(conn) = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY) {
        let existing: rusqlite::Result<(i64, i64)> = conn.query_row(
            &format!("SELECT max(rowid), length(pad) FROM {TABLE} WHERE rowid = (SELECT max(rowid) FROM {TABLE})"),
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        );
        if existing.ok() == Some((rows as i64, row_bytes as i64)) {
            return Ok(rows);
        }
    }
    let _ = std::fs::remove_file(path);
    let started = Instant::now();
    let conn = Connection::open(path)?;
    conn.execute_batch(&format!(
        "PRAGMA page_size = 4096; PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
         CREATE TABLE {TABLE}(v INTEGER, pad BLOB);"
    ))?;
    const PER_TRANSACTION: u64 = 1 << 20;
    let mut next = 1u64;
    while next <= rows {
        let tx = conn.unchecked_transaction()?;
        {
            let mut insert = tx.prepare(&format!(
                "INSERT INTO {TABLE}(rowid, v, pad) VALUES (?, ?, zeroblob(?))"
            ))?;
            let end = (next + PER_TRANSACTION).min(rows + 1);
            for rowid in next..end {
                let rowid = rowid as i64;
                insert.execute(rusqlite::params![rowid, value_of(rowid), row_bytes as i64])?;
            }
            next = end;
        }
        tx.commit()?;
        println!(
            "making the database: {} of {rows} rows ({:.0} s)",
            next - 1,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(rows)
}

/// The image, removed on drop.
struct Image(PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Makes an image with room for the database and copies it in as ON_MOUNT.
fn make_image(image: &Path, database: &Path, db_bytes: u64) -> Result<Image> {
    let exofs = |args: &[&str]| -> Result<()> {
        let out = Command::new(std::env::current_exe()?).args(args).output()?;
        if !out.status.success() {
            return Err(format!(
                "exofs {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        Ok(())
    };
    let path = |p: &Path| p.to_str().ok_or("non-UTF-8 path").map(str::to_owned);
    let (image_path, database_path) = (path(image)?, path(database)?);
    let _ = std::fs::remove_file(image);
    let size = format!("{}M", (db_bytes + db_bytes / 8 + (256 << 20)) >> 20);
    let made = Image(image.to_owned());
    exofs(&["mkfs", &image_path, "--size", &size])?;
    let started = Instant::now();
    exofs(&["put", &image_path, &database_path, ON_MOUNT])?;
    println!(
        "copied the database into the image in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(made)
}

/// The client: one phase, as the user.
fn client(args: &SqliteArgs, file: &Path) -> Result<()> {
    let keys = rowids(args.client_seed, args.client_rows, args.lookups);
    let check = |rowid: i64, value: Option<Value>| -> Result<()> {
        if value != Some(Value::Integer(value_of(rowid))) {
            return Err(format!("rowid {rowid}: wrong answer {value:?}").into());
        }
        Ok(())
    };
    let opened = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut read = |offset: u64, buf: &mut [u8]| opened.read_exact_at(buf, offset);
    let db = Database::open(&mut read)?;
    let table = db.table(&mut read, TABLE)?;
    let handle = Handle::new(&opened);
    let sqlite = match args.client_path.as_str() {
        "sqlite_mount" => Some(file.to_owned()),
        "sqlite_host" => Some(args.client_host.clone().ok_or("no --client-host")?),
        _ => None,
    };
    let conn = match &sqlite {
        Some(path) => Some(Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?),
        None => None,
    };
    let mut statement = match &conn {
        Some(conn) => Some(conn.prepare(&format!("SELECT v FROM {TABLE} WHERE rowid = ?"))?),
        None => None,
    };
    let path = args.client_path.clone();
    let mut run = |keys: &[i64], latencies: &mut Vec<u64>| -> Result<()> {
        if path == "chain_batch" || path == "ioctl_batch" {
            let via = if path == "chain_batch" {
                Via::Direct
            } else {
                Via::Daemon
            };
            for group in keys.chunks(32) {
                let start = Instant::now();
                let answers = db.lookup_batch(&handle, PROGRAM, &table, group, 0, via.into())?;
                let ns = start.elapsed().as_nanos() as u64;
                for (rowid, answer) in group.iter().zip(answers) {
                    check(*rowid, answer.value)?;
                    latencies.push(ns);
                }
            }
            return Ok(());
        }
        for &rowid in keys {
            let start = Instant::now();
            let value = match path.as_str() {
                "chain" => {
                    db.lookup(&handle, PROGRAM, &table, rowid, 0, Via::Direct.into())?
                        .value
                }
                "pread_walk" => db.walk(&mut read, &table, rowid, 0)?,
                "sqlite_mount" | "sqlite_host" => {
                    let statement = statement.as_mut().ok_or("no statement")?;
                    let v: i64 = statement.query_row([rowid], |row| row.get(0))?;
                    Some(Value::Integer(v))
                }
                other => return Err(format!("unknown path {other}").into()),
            };
            latencies.push(start.elapsed().as_nanos() as u64);
            check(rowid, value)?;
        }
        Ok(())
    };
    timed_phase(
        &args.client_mode,
        &keys,
        || rowids(!args.client_seed, args.client_rows, keys.len() / 2),
        &mut run,
    )
}

fn report(args: &SqliteArgs, phases: &[Phase], rows: u64, db_bytes: u64) -> Result<()> {
    println!(
        "{:<14} {:<5} {:>10} {:>8} {:>8} {:>9} {:>12}",
        "path", "mode", "lookups/s", "p50 us", "p99 us", "cpu us/op", "vs sqlite_mount"
    );
    for phase in phases {
        let base = phases
            .iter()
            .find(|p| p.path == "sqlite_mount" && p.mode == phase.mode)
            .map(Phase::per_sec);
        println!(
            "{:<14} {:<5} {:>10.0} {:>8.1} {:>8.1} {:>9.2} {:>12}",
            phase.path,
            phase.mode,
            phase.per_sec(),
            phase.percentile_us(0.5),
            phase.percentile_us(0.99),
            phase.cpu.as_secs_f64() * 1e6 / phase.lookups as f64,
            base.map_or("-".to_owned(), |b| format!("{:.2}", phase.per_sec() / b)),
        );
    }
    if let Some(path) = &args.json {
        let results: Vec<serde_json::Value> = phases
            .iter()
            .map(|phase| {
                serde_json::json!({
                    "path": phase.path,
                    "mode": phase.mode,
                    "rows": rows,
                    "database_bytes": db_bytes,
                    "lookups": phase.lookups,
                    "lookups_per_sec": phase.per_sec(),
                    "p50_us": phase.percentile_us(0.5),
                    "p99_us": phase.percentile_us(0.99),
                    "cpu_us_per_lookup": phase.cpu.as_secs_f64() * 1e6 / phase.lookups as f64,
                })
            })
            .collect();
        std::fs::write(
            path,
            serde_json::to_string_pretty(&serde_json::json!({ "results": results }))?,
        )?;
    }
    Ok(())
}
