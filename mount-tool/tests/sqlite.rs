//! SQLite rowid lookups as chains (`example:sqlite_rowid`, `exofs sqlite`), on real
//! databases made at test time by SQLite itself (rusqlite's bundled SQLite): every
//! answer is compared with SQLite's own `SELECT ... WHERE rowid = ?`, misses included,
//! on an image as root and through a mount as the unprivileged test user, before and
//! after SQLite changes the database through the mount. Corrupt pages end in ABORTED,
//! HOP_LIMIT or OUT_OF_FILE, never in a value and never in a hang.

mod common;

use common::{exofs_as, test_user, text, Mounted};
use exofs_abi::chain::status;
use exofs_client::sqlite::Value;
use rusqlite::types::ValueRef;
use rusqlite::Connection;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// The columns of table `t`, in order.
const COLUMNS: [&str; 5] = ["i", "r", "s", "b", "tail"];

/// A temporary file removed on drop.
struct Temp(PathBuf);

impl Temp {
    fn new(name: &str) -> Self {
        Self(std::env::temp_dir().join(format!("exofs-sqlite-{}-{name}", std::process::id())))
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8")
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
        let _ = fs::remove_file(self.0.with_extension("db-journal"));
    }
}

/// The value of row `n`'s integer column: every serial type of integers (1 to 4, 6 and 8
/// bytes, negative ones, 0 and 1), and NULL.
fn integer_of(n: i64) -> Option<i64> {
    match n % 10 {
        0 => None,
        1 => Some(n % 100),
        9 => Some(n * 100_003),
        2 => Some(-n),
        3 => Some((1 << 40) + n),
        4 => Some(-(1 << 45) - n),
        5 => Some(i64::MIN + n),
        6 => Some(i64::MAX - n),
        7 => Some(0),
        _ => Some(1),
    }
}

/// Makes a database at `path` with page size `page_size`: a table `first` made before
/// `t` (so `t`'s root is not page 2), and `t` with `rows` rows at rowids 3n + 1 (gaps
/// between), texts and blobs of every size up to several pages (overflow), and a column
/// after them that only an overflow walk reaches.
fn make_database(path: &str, page_size: u32, rows: i64) {
    let _ = fs::remove_file(path);
    let conn = Connection::open(path).expect("open the database");
    conn.execute_batch(&format!(
        "PRAGMA page_size = {page_size}; PRAGMA journal_mode = DELETE;
         CREATE TABLE first(x);
         INSERT INTO first VALUES (1), ('two'), (3.5);
         CREATE TABLE t(i, r, s, b, tail);
         CREATE TABLE typed(id INTEGER PRIMARY KEY, x REAL, twice AS (id * 2) VIRTUAL,
                            name TEXT, next INT GENERATED ALWAYS AS (id + 1) STORED);
         WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < 300)
         INSERT INTO typed(id, x, name)
             SELECT k * 5, CASE WHEN k % 2 = 0 THEN k ELSE k + 0.5 END, 'row ' || k FROM n;"
    ))
    .expect("schema");
    let tx = conn.unchecked_transaction().expect("transaction");
    {
        let mut insert = tx
            .prepare("INSERT INTO t(rowid, i, r, s, b, tail) VALUES (?, ?, ?, ?, ?, ?)")
            .expect("prepare");
        for n in 0..rows {
            let rowid = 3 * n + 1;
            let real = if n % 5 == 0 {
                None
            } else {
                Some(n as f64 * -1.25e-3 + 7.0)
            };
            let text_len = (n * 37 % 3000) as usize + if n % 50 == 0 { 9000 } else { 0 };
            let text: String = (0..text_len)
                .map(|k| char::from(b'a' + ((k + n as usize) % 26) as u8))
                .collect();
            let blob: Vec<u8> = (0..(n * 53 % 700) as usize)
                .map(|k| (k as i64 * 7 + n) as u8)
                .collect();
            insert
                .execute(rusqlite::params![
                    rowid,
                    integer_of(n),
                    real,
                    text,
                    blob,
                    n * 1000 - 5
                ])
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
}

/// SQLite's own answer for `column` of row `rowid` of `table`, as a chain returns it.
fn sqlite_answer(
    conn: &Connection,
    table: &str,
    rowid: i64,
    column: &str,
    batch: bool,
) -> Option<Value> {
    let mut statement = conn
        .prepare_cached(&format!("SELECT {column} FROM {table} WHERE rowid = ?"))
        .expect("prepare");
    let mut rows = statement.query([rowid]).expect("query");
    let row = rows.next().expect("step")?;
    let value = match row.get_ref(0).expect("column") {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(v) => Value::Integer(v),
        ValueRef::Real(v) => Value::Real(v),
        ValueRef::Text(bytes) => Value::Text {
            bytes: if batch { Vec::new() } else { bytes.to_vec() },
            length: bytes.len() as u64,
        },
        ValueRef::Blob(bytes) => Value::Blob {
            bytes: if batch { Vec::new() } else { bytes.to_vec() },
            length: bytes.len() as u64,
        },
    };
    Some(value.as_returned())
}

/// The rowids asked: every row, the gaps between them, and around both ends.
fn rowids_of(rows: i64) -> Vec<i64> {
    let mut rowids: Vec<i64> = (-2..3 * rows + 3).collect();
    rowids.extend([i64::MIN, i64::MAX, 1 << 40]);
    rowids
}

/// Runs `exofs sqlite` (through `run`) for every column of `t` over `rowids`, and
/// compares each line with SQLite's answer from `conn`.
fn check_all(
    run: &dyn Fn(&[&str]) -> std::process::Output,
    target: &str,
    conn: &Connection,
    rowids: &[i64],
    batch: bool,
) {
    let columns: Vec<(usize, &str)> = COLUMNS.iter().copied().enumerate().collect();
    check_table(run, target, conn, "t", &columns, rowids, batch);
}

/// As `check_all`, for `columns` (declared index, name) of `table`.
fn check_table(
    run: &dyn Fn(&[&str]) -> std::process::Output,
    target: &str,
    conn: &Connection,
    table: &str,
    columns: &[(usize, &str)],
    rowids: &[i64],
    batch: bool,
) {
    let list: Vec<String> = rowids.iter().map(i64::to_string).collect();
    let list = list.join(",");
    for &(k, column) in columns {
        let k = k.to_string();
        let mut args = vec![
            "sqlite", target, "/db", "--table", table, "--column", &k, "--rowid", &list,
        ];
        if batch {
            args.push("--batch");
        }
        let out = run(&args);
        let printed = text(&out);
        assert!(out.status.success(), "column {column}: {printed}");
        let lines: Vec<&str> = printed.lines().collect();
        assert_eq!(lines.len(), rowids.len(), "{printed}");
        for (line, &rowid) in lines.iter().zip(rowids) {
            let expected = match sqlite_answer(conn, table, rowid, column, batch) {
                Some(value) => format!("rowid {rowid}: {value} ("),
                None => format!("rowid {rowid}: not found ("),
            };
            assert!(
                line.starts_with(&expected),
                "column {column}, batch {batch}: got `{line}`, SQLite says `{expected}`"
            );
        }
    }
}

/// A fresh image, not mounted, with `sqlite_rowid` loaded.
fn image_with_program(test: &str) -> Mounted {
    let m = Mounted::new(test, "64M");
    let out = m.run(&[
        "prog",
        "load",
        m.image(),
        "sqlite_rowid",
        "example:sqlite_rowid",
    ]);
    assert!(out.status.success(), "prog load: {}", text(&out));
    m
}

#[test]
fn rowid_lookups_on_an_image_answer_as_sqlite_does() {
    const TEST: &str = "rowid_lookups_on_an_image_answer_as_sqlite_does";
    if !common::can_mount(TEST) {
        return;
    }
    let m = image_with_program(TEST);
    // 4 KiB pages, and 512-byte pages (the smallest: deeper trees, long overflow chains).
    for (page_size, rows) in [(4096, 1500), (512, 400)] {
        let db = Temp::new(&format!("image-{page_size}.db"));
        make_database(db.path(), page_size, rows);
        let out = m.run(&["put", m.image(), db.path(), "/db"]);
        assert!(out.status.success(), "put: {}", text(&out));
        let conn = Connection::open(db.path()).expect("open");
        let run = |args: &[&str]| m.run(args);
        check_all(&run, m.image(), &conn, &rowids_of(rows), false);
        check_all(&run, m.image(), &conn, &rowids_of(rows), true);
        // Declared columns as SQLite reads them: the rowid for INTEGER PRIMARY KEY (the
        // record holds NULL), reals for whole numbers in a REAL column (stored as
        // integers), columns after a VIRTUAL generated one (not stored), a STORED one.
        let typed = [(0, "id"), (1, "x"), (3, "name"), (4, "next")];
        let typed_rowids: Vec<i64> = (0..1510).step_by(7).collect();
        for batch in [false, true] {
            check_table(
                &run,
                m.image(),
                &conn,
                "typed",
                &typed,
                &typed_rowids,
                batch,
            );
        }
        let out = m.run(&[
            "sqlite",
            m.image(),
            "/db",
            "--table",
            "typed",
            "--column",
            "2",
            "--rowid",
            "5",
        ]);
        assert!(
            text(&out).contains("VIRTUAL generated column"),
            "{}",
            text(&out)
        );
        // The schema table, whose root is page 1, after the database header.
        for (k, column) in ["type", "name", "tbl_name", "rootpage", "sql"]
            .iter()
            .enumerate()
        {
            let out = m.run(&[
                "sqlite",
                m.image(),
                "/db",
                "--table",
                "sqlite_schema",
                "--column",
                &k.to_string(),
                "--rowid",
                "0,1,2,3",
            ]);
            let printed = text(&out);
            assert!(out.status.success(), "{printed}");
            for (line, rowid) in printed.lines().zip(0..) {
                let expected: Option<rusqlite::types::Value> = conn
                    .query_row(
                        &format!("SELECT {column} FROM sqlite_schema WHERE rowid = ?"),
                        [rowid],
                        |row| row.get(0),
                    )
                    .ok();
                let expected = match expected {
                    None => "not found".to_owned(),
                    Some(rusqlite::types::Value::Integer(v)) => v.to_string(),
                    Some(rusqlite::types::Value::Text(t)) => Value::Text {
                        length: t.len() as u64,
                        bytes: t.into_bytes(),
                    }
                    .as_returned()
                    .to_string(),
                    Some(other) => format!("{other:?}"),
                };
                assert!(
                    line.starts_with(&format!("rowid {rowid}: {expected} (")),
                    "schema column {column}: `{line}`, SQLite says {expected}"
                );
            }
        }
    }
}

#[test]
fn through_a_mount_the_user_gets_sqlites_answers_before_and_after_sqlite_writes() {
    const TEST: &str =
        "through_a_mount_the_user_gets_sqlites_answers_before_and_after_sqlite_writes";
    if !common::can_mount(TEST) {
        return;
    }
    let (uid, gid) = test_user();
    let m = Mounted::new(TEST, "64M");
    let policy = Temp::new("policy.toml");
    fs::write(
        &policy.0,
        format!(
            "[[subject]]\nuid = {uid}\n\n[[subject.grant]]\npaths = [\"/db\"]\n\
             programs = [\"sqlite_rowid\"]\nmax_hops = 64\nmax_batch = 32\n"
        ),
    )
    .expect("policy");
    m.mount_with(&format!(
        "allow_other,default_permissions,policy={}",
        policy.path()
    ));
    let db = Temp::new("mount.db");
    let rows = 1200;
    make_database(db.path(), 4096, rows);
    fs::copy(&db.0, m.path("db")).expect("copy the database in");
    fs::set_permissions(m.path("db"), fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = m.run(&[
        "prog",
        "load",
        m.dir(),
        "sqlite_rowid",
        "example:sqlite_rowid",
    ]);
    assert!(out.status.success(), "prog load: {}", text(&out));
    let as_user = |args: &[&str]| exofs_as(uid, gid, args);
    let rowids = rowids_of(rows);
    {
        let conn = Connection::open(m.path("db")).expect("open through the mount");
        check_all(&as_user, m.dir(), &conn, &rowids, false);
        check_all(&as_user, m.dir(), &conn, &rowids, true);
    }
    // SQLite changes the database through the mount: rows inserted past the end and in
    // the gaps, rows grown onto overflow pages, rows deleted. The lookups follow.
    {
        let conn = Connection::open(m.path("db")).expect("open through the mount");
        conn.execute_batch(
            "BEGIN;
             INSERT INTO t(rowid, i, r, s, b, tail)
                 SELECT rowid + 1, -i, r * 2, s || 'changed', b, tail + 1 FROM t WHERE rowid % 2 = 0;
             UPDATE t SET s = printf('%.*c', 6000, 'q'), tail = -tail WHERE rowid % 7 = 1;
             DELETE FROM t WHERE rowid % 11 = 3;
             INSERT INTO t(rowid, i, s, tail) VALUES (100000, 42, 'far', 7);
             COMMIT;",
        )
        .expect("change the database");
        let mut rowids = rowids.clone();
        rowids.extend([100000, 99999, 100001]);
        check_all(&as_user, m.dir(), &conn, &rowids, false);
        check_all(&as_user, m.dir(), &conn, &rowids, true);
    }
    // A user the policy does not grant is refused.
    let out = exofs_as(
        65534,
        65534,
        &["sqlite", m.dir(), "/db", "--table", "t", "--rowid", "1"],
    );
    assert!(!out.status.success(), "{}", text(&out));
}

/// Byte offset of page `n`.
fn page_offset(page_size: usize, n: usize) -> usize {
    (n - 1) * page_size
}

#[test]
fn corrupt_pages_end_in_a_status_never_a_value_and_bad_databases_are_refused_by_name() {
    const TEST: &str =
        "corrupt_pages_end_in_a_status_never_a_value_and_bad_databases_are_refused_by_name";
    if !common::can_mount(TEST) {
        return;
    }
    let m = image_with_program(TEST);
    const PAGE: usize = 1024;
    let good = Temp::new("good.db");
    make_database(good.path(), PAGE as u32, 300);
    // A table `o` whose one row spills its blob onto overflow pages, with a column after
    // it: made in a fresh database, so its pages follow each other.
    let spill = Temp::new("spill.db");
    {
        let _ = fs::remove_file(spill.path());
        let conn = Connection::open(spill.path()).expect("open");
        conn.execute_batch(&format!(
            "PRAGMA page_size = {PAGE}; CREATE TABLE o(x, y);
             INSERT INTO o VALUES (zeroblob(6000), 42);"
        ))
        .expect("spill");
    }
    let root = |path: &str, table: &str| -> usize {
        let conn = Connection::open(path).expect("open");
        conn.query_row(
            "SELECT rootpage FROM sqlite_schema WHERE name = ?",
            [table],
            |row| row.get::<_, i64>(0),
        )
        .expect("root") as usize
    };
    let t_root = root(good.path(), "t");
    let o_root = root(spill.path(), "o");
    let clean = fs::read(&good.0).expect("read");
    assert_eq!(
        clean[page_offset(PAGE, t_root)],
        0x05,
        "t's root is interior"
    );
    let at = page_offset(PAGE, t_root);
    let cells = u16::from_be_bytes([clean[at + 3], clean[at + 4]]) as usize;

    // (what, the database, its table, the status every lookup must end in)
    let mut cases: Vec<(&str, Vec<u8>, &str, i32)> = Vec::new();
    // A page of another type where the tree needs a table page.
    let mut bytes = clean.clone();
    bytes[at] = 0x0a;
    cases.push(("wrong page type", bytes, "t", status::ABORTED));
    // Every cell pointer of the root past the usable size.
    let mut bytes = clean.clone();
    for i in 0..cells {
        bytes[at + 12 + 2 * i..at + 14 + 2 * i].copy_from_slice(&0xfff0u16.to_be_bytes());
    }
    cases.push(("cell pointers out of range", bytes, "t", status::ABORTED));
    // Every child of the root past the end of the file.
    let mut bytes = clean.clone();
    let far = 0x00ff_ffffu32.to_be_bytes();
    bytes[at + 8..at + 12].copy_from_slice(&far);
    for i in 0..cells {
        let cell = u16::from_be_bytes([bytes[at + 12 + 2 * i], bytes[at + 13 + 2 * i]]) as usize;
        bytes[at + cell..at + cell + 4].copy_from_slice(&far);
    }
    cases.push((
        "child pointers past the end",
        bytes,
        "t",
        status::OUT_OF_FILE,
    ));
    // The root pointing to itself.
    let mut bytes = clean.clone();
    let itself = (t_root as u32).to_be_bytes();
    bytes[at + 8..at + 12].copy_from_slice(&itself);
    for i in 0..cells {
        let cell = u16::from_be_bytes([bytes[at + 12 + 2 * i], bytes[at + 13 + 2 * i]]) as usize;
        bytes[at + cell..at + cell + 4].copy_from_slice(&itself);
    }
    cases.push(("a cycle in the tree", bytes, "t", status::HOP_LIMIT));
    // An overflow chain that loops: the second overflow page points back to the first.
    let mut bytes = fs::read(&spill.0).expect("read");
    let first_overflow = o_root + 1;
    for page in [first_overflow, first_overflow + 1] {
        let offset = page_offset(PAGE, page);
        assert!(
            bytes[offset + 4..offset + 64].iter().all(|&b| b == 0),
            "page {page} is an overflow page of the zero blob"
        );
    }
    let spilled = bytes.clone();
    let second = page_offset(PAGE, first_overflow + 1);
    bytes[second..second + 4].copy_from_slice(&(first_overflow as u32).to_be_bytes());
    // (Skipping counts bytes, so without a check the walk would end, after as many pages
    // as the chain should have, on a wrong page: a wrong value, 0.)
    cases.push(("a cycle in an overflow chain", bytes, "o", status::ABORTED));
    // An overflow page pointing back to the leaf.
    let mut bytes = spilled;
    let first = page_offset(PAGE, first_overflow);
    bytes[first..first + 4].copy_from_slice(&(o_root as u32).to_be_bytes());
    cases.push((
        "an overflow chain back to its leaf",
        bytes,
        "o",
        status::ABORTED,
    ));

    let file = Temp::new("case.db");
    for (what, bytes, table, expected) in &cases {
        fs::write(&file.0, bytes).expect("write the case");
        let out = m.run(&["put", m.image(), file.path(), "/db"]);
        assert!(out.status.success(), "put: {}", text(&out));
        // Column 1: for `o`, past the spilled blob.
        let rowids = if *table == "o" { "1" } else { "1,4,301,600" };
        let args = [
            "sqlite",
            m.image(),
            "/db",
            "--table",
            table,
            "--column",
            "1",
            "--rowid",
            rowids,
        ];
        for batch in [false, true] {
            let mut args = args.to_vec();
            if batch {
                args.push("--batch");
            }
            let out = m.run(&args);
            let printed = text(&out);
            assert_eq!(out.status.code(), Some(1), "{what}: {printed}");
            let expected = status::name(*expected);
            assert!(
                printed.lines().all(|line| line.contains(expected)),
                "{what} (batch {batch}): expected `{expected}` on every line: {printed}"
            );
        }
    }
    // The uncorrupted overflow walk reaches the column after the blob.
    fs::write(&file.0, fs::read(&spill.0).expect("read")).expect("write");
    let out = m.run(&["put", m.image(), file.path(), "/db"]);
    assert!(out.status.success(), "put: {}", text(&out));
    let out = m.run(&[
        "sqlite",
        m.image(),
        "/db",
        "--table",
        "o",
        "--column",
        "1",
        "--rowid",
        "1",
    ]);
    assert!(text(&out).starts_with("rowid 1: 42 ("), "{}", text(&out));

    // Refused before any chain, saying why.
    let refused = |setup: &str, table: &str, expected: &str| {
        let _ = fs::remove_file(&file.0);
        let conn = Connection::open(file.path()).expect("open");
        conn.execute_batch(setup).expect("setup");
        drop(conn);
        let out = m.run(&["put", m.image(), file.path(), "/db"]);
        assert!(out.status.success(), "put: {}", text(&out));
        let out = m.run(&["sqlite", m.image(), "/db", "--table", table, "--rowid", "1"]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains(expected), "{}", text(&out));
    };
    refused(
        "PRAGMA page_size = 8192; CREATE TABLE t(a); INSERT INTO t VALUES (1);",
        "t",
        "page size 8192: exofs serves SQLite page sizes up to 4096",
    );
    refused(
        "CREATE TABLE w(k PRIMARY KEY, v) WITHOUT ROWID; INSERT INTO w VALUES (1, 2);",
        "w",
        "WITHOUT ROWID",
    );
    refused("CREATE TABLE t(a);", "nope", "no table named `nope`");
    refused(
        "PRAGMA journal_mode = WAL; CREATE TABLE t(a); INSERT INTO t VALUES (1);",
        "t",
        "WAL mode",
    );
    fs::write(&file.0, "not a database at all, just text. ".repeat(8)).expect("write");
    let out = m.run(&["put", m.image(), file.path(), "/db"]);
    assert!(out.status.success(), "put: {}", text(&out));
    let out = m.run(&["sqlite", m.image(), "/db", "--table", "t", "--rowid", "1"]);
    assert!(
        text(&out).contains("not an SQLite database"),
        "{}",
        text(&out)
    );
}
