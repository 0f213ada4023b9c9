//! `example:sqlite_rowid` in batches whose lookups stop at blocks not in memory and are
//! resumed (`overlap_misses`): a resumed lookup gets back only the first 32 bytes of its
//! scratch, so one that was skipping along an overflow chain has lost the pages it
//! walked (kept to catch cycles) and must start again at its leaf. Every answer must
//! still be SQLite's own, from a database SQLite made, read cold through the device
//! mapping.
//!
//! Needs root (CAP_BPF + CAP_PERFMON); without it the test prints a SKIPPED line.

mod common;

use exofs_abi::chain::status;
use exofs_client::sqlite::{value_of, Database, Value};
use kernel_ext::binding::{BatchItem, BatchRequest};
use kernel_ext::examples;
use libfs::ROOT_INO;
use rusqlite::Connection;
use std::os::fd::AsRawFd;

#[test]
fn resumed_batches_walk_overflow_chains_to_sqlites_answers() {
    let Some((image, fs, binding)) = common::setup("sqlite-resume", 64 << 20) else {
        return;
    };
    // Rows whose second column lies past several overflow pages of the first.
    let host = std::env::temp_dir().join(format!("exofs-ke-{}-resume.db", std::process::id()));
    let _ = std::fs::remove_file(&host);
    {
        let conn = Connection::open(&host).expect("open");
        conn.execute_batch(
            "PRAGMA page_size = 1024; CREATE TABLE o(x, y);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 64)
             INSERT INTO o(rowid, x, y) SELECT i, randomblob(3000 + 97 * i), i * 1000 - 7 FROM n;",
        )
        .expect("make the database");
    }
    let bytes = std::fs::read(&host).expect("read the database");
    let ino = fs.create(ROOT_INO, b"db", 0o644, 0, 0).expect("create").ino;
    fs.write_at(ino, 0, &bytes).expect("write");
    fs.sync().expect("sync");
    let mut read = |offset: u64, buf: &mut [u8]| -> std::io::Result<()> {
        let n = fs
            .read_at(ino, offset, buf)
            .map_err(std::io::Error::other)?;
        if n < buf.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    };
    let db = Database::open(&mut read).expect("header");
    let root = db.table(&mut read, "o").expect("schema").root;
    let program = binding
        .bind("sqlite_rowid", examples::SQLITE_ROWID)
        .expect("bind");
    let conn = Connection::open(&host).expect("open");
    let rowids: Vec<i64> = (0..70).collect();
    let items: Vec<BatchItem> = rowids
        .iter()
        .map(|&rowid| BatchItem::new(db.offset_of(root), &db.ask(rowid, 1).to_bytes()))
        .collect();
    let mut request = BatchRequest::new(ino);
    request.overlap_misses = true;
    let image_file = std::fs::File::open(&image.0).expect("open the image");
    image_file.sync_all().expect("fsync");
    let mut resumed = 0;
    for round in 0..3 {
        // Every page cold: each lookup stops at each page, and is resumed.
        // SAFETY: advice on an open descriptor; no memory is passed.
        let ret =
            unsafe { libc::posix_fadvise(image_file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(ret, 0, "posix_fadvise");
        let (outcomes, counters) = binding
            .run_batch(&program, &request, &items)
            .expect("run the batch");
        resumed += counters.prefetched;
        for (rowid, outcome) in rowids.iter().zip(&outcomes) {
            assert_eq!(outcome.status, status::DONE, "round {round}, rowid {rowid}");
            let expected: Option<i64> = conn
                .query_row("SELECT y FROM o WHERE rowid = ?", [rowid], |row| row.get(0))
                .ok();
            assert_eq!(
                value_of(&outcome.scratch),
                expected.map(Value::Integer),
                "round {round}, rowid {rowid}"
            );
        }
    }
    assert!(
        resumed > 0,
        "no block was read between calls: nothing was resumed"
    );
    drop(conn);
    let _ = std::fs::remove_file(&host);
}
