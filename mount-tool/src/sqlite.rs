//! `exofs sqlite IMAGE|MOUNTPOINT PATH --table NAME --rowid N [--column K]`: rowid
//! lookups in an SQLite database stored on exofs, run as a chain of the loaded
//! `sqlite_rowid` program (exofs_client::sqlite does the SQLite side: the header, the
//! schema, the scratch). Through a mount it runs as any user the policy grants; on an
//! image that nobody holds, as root through this process's binding.

use crate::progs::{self, Target, ViaArg};
use exofs_abi::chain::status;
use exofs_client::sqlite::{Answer, Database, How};
use kernel_ext::binding::{BatchItem, BatchRequest, ChainRequest};
use std::error::Error;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// What `exofs sqlite` looks up.
#[derive(Debug, Clone)]
pub struct SqliteArgs {
    pub path: PathBuf,
    pub table: String,
    pub rowids: Vec<i64>,
    pub column: u16,
    /// Up to 32 lookups per kernel call (no text or blob bytes come back, only lengths).
    pub batch: bool,
    pub prog: String,
    pub hops: Option<u32>,
    pub via: ViaArg,
}

pub fn lookup(image: &Path, bpffs: &Path, args: &SqliteArgs) -> Result<ExitCode> {
    if let Some((_, mountpoint)) = progs::mounted(image)? {
        return through_mount(&mountpoint, args);
    }
    let Target::Image(binding) = progs::open_target(image, bpffs)? else {
        return Err(format!("{}: in use by another process", image.display()).into());
    };
    let program = binding.program(&args.prog).map_err(|err| {
        format!(
            "{} (load it with `exofs prog load {} {} example:sqlite_rowid`)",
            progs::explain(err),
            image.display(),
            args.prog
        )
    })?;
    let fs = binding.fs();
    let ino = fs.resolve(&args.path)?.ino;
    let mut read = |offset: u64, buf: &mut [u8]| -> std::io::Result<()> {
        let n = fs
            .read_at(ino, offset, buf)
            .map_err(std::io::Error::other)?;
        if n < buf.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file ends at byte {}", offset + n as u64),
            ));
        }
        Ok(())
    };
    let db = Database::open(&mut read).map_err(|e| in_file(&args.path, e))?;
    let table = db
        .table(&mut read, &args.table)
        .map_err(|e| in_file(&args.path, e))?;
    let stored = table.stored(args.column)?;
    let start = db.offset_of(table.root);
    let mut answers = Vec::new();
    if args.batch {
        let mut request = BatchRequest::new(ino);
        if let Some(hops) = args.hops {
            request.hop_limit = hops;
        }
        let items: Vec<BatchItem> = args
            .rowids
            .iter()
            .map(|&rowid| BatchItem::new(start, &db.ask(rowid, stored).length_only().to_bytes()))
            .collect();
        let (outcomes, _) = binding
            .run_batch(&program, &request, &items)
            .map_err(progs::explain)?;
        for (&rowid, outcome) in args.rowids.iter().zip(outcomes) {
            answers.push(Answer::of(
                &table,
                args.column,
                rowid,
                outcome.status,
                outcome.hops,
                &outcome.scratch,
            ));
        }
    } else {
        for &rowid in &args.rowids {
            let scratch = db.ask(rowid, stored).to_bytes();
            let mut request = ChainRequest::new(ino, start, &scratch);
            request.read_len = db.page_size();
            if let Some(hops) = args.hops {
                request.hop_limit = hops;
            }
            let outcome = binding.run(&program, &request).map_err(progs::explain)?;
            answers.push(Answer::of(
                &table,
                args.column,
                rowid,
                outcome.status,
                outcome.hops,
                &outcome.scratch,
            ));
        }
    }
    Ok(report(&args.rowids, &answers))
}

fn in_file(path: &Path, err: std::io::Error) -> String {
    format!("{}: {err}", path.display())
}

fn through_mount(mountpoint: &Path, args: &SqliteArgs) -> Result<ExitCode> {
    let path = &args.path;
    let inside = mountpoint.join(path.strip_prefix("/").unwrap_or(path));
    let file = std::fs::File::open(&inside).map_err(|e| format!("{}: {e}", inside.display()))?;
    let mut read = |offset: u64, buf: &mut [u8]| file.read_exact_at(buf, offset);
    let db = Database::open(&mut read).map_err(|e| in_file(&inside, e))?;
    let table = db
        .table(&mut read, &args.table)
        .map_err(|e| in_file(&inside, e))?;
    let handle = exofs_client::Handle::new(file);
    let failed = |e: std::io::Error| format!("{}: chain: {e}", inside.display());
    let how = How {
        via: args.via.into(),
        hop_limit: args.hops.unwrap_or(0),
    };
    let answers = if args.batch {
        db.lookup_batch(&handle, &args.prog, &table, &args.rowids, args.column, how)
            .map_err(failed)?
    } else {
        let mut answers = Vec::new();
        for &rowid in &args.rowids {
            answers.push(
                db.lookup(&handle, &args.prog, &table, rowid, args.column, how)
                    .map_err(failed)?,
            );
        }
        answers
    };
    Ok(report(&args.rowids, &answers))
}

/// Prints a line per rowid; exit 0 if every chain finished (found or not), else 1.
fn report(rowids: &[i64], answers: &[Answer]) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for (&rowid, answer) in rowids.iter().zip(answers) {
        if !report_one(rowid, answer) {
            code = ExitCode::from(1);
        }
    }
    code
}

fn report_one(rowid: i64, answer: &Answer) -> bool {
    let hops = answer.hops;
    if answer.status != status::DONE {
        let why = match answer.status {
            status::ABORTED => {
                ": a page is not what a rowid table's B-tree holds (a corrupt database, an \
                 index, a record header larger than its page), or the column lies more than \
                 49 overflow pages into its record"
            }
            status::HOP_LIMIT => {
                ": too many pages (a cycle in the tree, or a batch resumed on many overflow \
                 pages: ask without --batch)"
            }
            status::OUT_OF_FILE => ": a page pointer past the end of the file",
            _ => "",
        };
        println!(
            "rowid {rowid}: {} after {hops} hops{why}",
            status::name(answer.status)
        );
        return false;
    }
    match &answer.value {
        Some(value) => println!("rowid {rowid}: {value} ({hops} hops)"),
        None => println!("rowid {rowid}: not found ({hops} hops)"),
    }
    true
}
