//! SQLite rowid lookups on database files stored on exofs: what an application needs
//! around the `sqlite_rowid` application function (`exofs_abi::formats::sqlite`).
//!
//! - [`Database::open`] reads the database header (page size, reserved bytes) and refuses
//!   what the function cannot serve, saying why;
//! - [`Database::table`] finds a table's root page in the schema table, as SQLite does;
//! - [`Database::lookup`] and [`Database::lookup_batch`] run the chains over a [`Handle`];
//! - [`Database::walk`] is the same lookup in user space, one read per page: the reference
//!   the benchmark compares against, and what a chain-less caller would write.
//!
//! Every read goes through a `read(offset, buf)` callback that must fill `buf`, so the same
//! code reads a file on a mount (pread) or a file of an image through libfs.

use crate::{BatchAnswer, Chain, Handle, Via};
use exofs_abi::chain::status;
use exofs_abi::formats::sqlite::{
    kind, Lookup, HEADER_SIZE, MAX_BYTES, MAX_PAGE_SIZE, MIN_USABLE, PAGE_INTERIOR_INDEX,
    PAGE_INTERIOR_TABLE, PAGE_LEAF_INDEX, PAGE_LEAF_TABLE,
};
use std::collections::HashSet;
use std::io;
use std::os::fd::AsFd;

mod schema;
pub use schema::{Affinity, Column};

/// Reads exactly `buf.len()` bytes at `offset` of the database file.
pub type Read<'a> = dyn FnMut(u64, &mut [u8]) -> io::Result<()> + 'a;

/// The magic string at the start of every SQLite database.
const MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// The default name of the loaded `sqlite_rowid` program.
pub const PROGRAM: &str = "sqlite_rowid";

/// One column's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    /// The first bytes of a text (all of them, or the first MAX_BYTES from a chain; none
    /// from a batch), and its whole length.
    Text {
        bytes: Vec<u8>,
        length: u64,
    },
    /// As Text.
    Blob {
        bytes: Vec<u8>,
        length: u64,
    },
    /// The row has fewer columns (added by ALTER TABLE later: the default applies).
    Absent,
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |bytes: &[u8], length: u64| {
            if (bytes.len() as u64) < length {
                format!(" (first {} of {length} bytes)", bytes.len())
            } else {
                String::new()
            }
        };
        match self {
            Self::Null => write!(f, "NULL"),
            Self::Integer(value) => write!(f, "{value}"),
            Self::Real(value) => write!(f, "{value:?}"),
            // (Escaped as Rust escapes a string for debugging: control characters,
            // quotes, backslashes. One value, one line, no terminal escapes.)
            Self::Text { bytes, length } => write!(
                f,
                "'{}'{}",
                String::from_utf8_lossy(bytes).escape_debug(),
                shown(bytes, *length)
            ),
            Self::Blob { bytes, length } => {
                write!(f, "x'")?;
                for b in bytes {
                    write!(f, "{b:02x}")?;
                }
                write!(f, "'{}", shown(bytes, *length))
            }
            Self::Absent => write!(f, "absent (the column's default)"),
        }
    }
}

/// What one chained lookup returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// An `exofs_abi::chain::status` value; `value` is meaningful only with DONE.
    pub status: i32,
    pub hops: u32,
    /// The column's value; None: no row with that rowid.
    pub value: Option<Value>,
}

/// How a lookup runs: which way it reaches the kernel, and its hops at most (0: as many
/// as the caller's grant allows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct How {
    pub via: Via,
    pub hop_limit: u32,
}

impl From<Via> for How {
    fn from(via: Via) -> Self {
        Self { via, hop_limit: 0 }
    }
}

/// A table as the schema names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    /// Its root page (pages count from 1).
    pub root: u32,
    /// Its CREATE statement.
    pub sql: String,
    /// Its columns as declared (none known for CREATE TABLE ... AS SELECT: every column
    /// is then stored in order).
    pub columns: Vec<Column>,
}

impl Table {
    /// The index in the record of declared column `column` (from 0).
    pub fn stored(&self, column: u16) -> io::Result<u16> {
        if self.columns.is_empty() {
            return Ok(column);
        }
        let Some(declared) = self.columns.get(usize::from(column)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "`{}` has {} columns; column {column} does not exist",
                    self.name,
                    self.columns.len()
                ),
            ));
        };
        declared.stored.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "column {column} of `{}` (`{}`) is a VIRTUAL generated column: it is \
                     computed when read, not stored",
                    self.name, declared.name
                ),
            )
        })
    }

    /// A value of declared column `column` of row `rowid` as the record holds it (None:
    /// no such row), turned into what SQLite returns: the rowid for the column that
    /// aliases it (the record holds NULL there), a real for a whole number stored in a
    /// column of REAL affinity (SQLite stores those as integers).
    pub fn as_sqlite(&self, column: u16, rowid: i64, value: Option<Value>) -> Option<Value> {
        let value = value?;
        let Some(declared) = self.columns.get(usize::from(column)) else {
            return Some(value);
        };
        Some(match value {
            Value::Null if declared.rowid_alias => Value::Integer(rowid),
            Value::Integer(v) if declared.affinity == Affinity::Real => Value::Real(v as f64),
            other => other,
        })
    }
}

/// An SQLite database file, as far as its header goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Database {
    page_size: u32,
    /// The page size minus the reserved bytes at the end of each page.
    usable: u32,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl Database {
    /// Reads and checks the header of the database.
    pub fn open(read: &mut Read<'_>) -> io::Result<Self> {
        let mut header = [0u8; HEADER_SIZE];
        read(0, &mut header).map_err(|err| {
            io::Error::new(err.kind(), format!("reading the database header: {err}"))
        })?;
        if &header[..16] != MAGIC {
            return Err(invalid(
                "not an SQLite database: the header does not start with \"SQLite format 3\"".into(),
            ));
        }
        let page_size = match u16::from_be_bytes([header[16], header[17]]) {
            1 => 65536,
            size => u32::from(size),
        };
        if !page_size.is_power_of_two() || page_size < 512 {
            return Err(invalid(format!(
                "the header gives page size {page_size}, which SQLite never writes"
            )));
        }
        if page_size as usize > MAX_PAGE_SIZE {
            return Err(invalid(format!(
                "page size {page_size}: exofs serves SQLite page sizes up to {MAX_PAGE_SIZE} \
                 (a page must fit in one block); rebuild the database with \
                 PRAGMA page_size = 4096 and VACUUM"
            )));
        }
        let usable = page_size - u32::from(header[20]);
        if (usable as usize) < MIN_USABLE {
            return Err(invalid(format!(
                "{} reserved bytes per page leave {usable} usable; SQLite needs {MIN_USABLE}",
                header[20]
            )));
        }
        // Bytes 18 and 19: the file format's write and read versions: 1, or 2 in WAL
        // mode, where committed changes may be in the -wal file only, which chains do not
        // read. SQLite refuses to read a file whose read version is above 2.
        if header[19] > 2 || header[18] > 2 {
            return Err(invalid(format!(
                "file format versions {} and {}: a newer SQLite's, unknown here",
                header[18], header[19]
            )));
        }
        if header[18] == 2 || header[19] == 2 {
            return Err(invalid(
                "the database is in WAL mode: committed changes may be in its -wal file, \
                 which chains do not read (PRAGMA journal_mode = DELETE converts it)"
                    .into(),
            ));
        }
        let encoding = u32::from_be_bytes([header[56], header[57], header[58], header[59]]);
        match encoding {
            0 | 1 => {}
            2 | 3 => {
                return Err(invalid(format!(
                    "the database's text encoding is UTF-16 ({}): only UTF-8 databases are \
                     served",
                    if encoding == 2 {
                        "little-endian"
                    } else {
                        "big-endian"
                    }
                )))
            }
            other => {
                return Err(invalid(format!(
                    "the header gives text encoding {other}, which SQLite never writes"
                )))
            }
        }
        Ok(Self { page_size, usable })
    }

    /// The page size (512..=4096).
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The page size minus the reserved bytes at the end of each page.
    pub fn usable(&self) -> u32 {
        self.usable
    }

    /// Byte offset of page `page` in the file.
    pub fn offset_of(&self, page: u32) -> u64 {
        u64::from(page.saturating_sub(1)) * u64::from(self.page_size)
    }

    fn page(&self, read: &mut Read<'_>, page: u32) -> io::Result<Vec<u8>> {
        if page == 0 {
            return Err(invalid("a pointer to page 0".into()));
        }
        let mut bytes = vec![0u8; self.page_size as usize];
        read(self.offset_of(page), &mut bytes)
            .map_err(|err| io::Error::new(err.kind(), format!("reading page {page}: {err}")))?;
        Ok(bytes)
    }

    /// The table `name` (case-insensitive, as SQLite), from the schema table; the schema
    /// table itself (`sqlite_schema`, or `sqlite_master`) is page 1.
    pub fn table(&self, read: &mut Read<'_>, name: &str) -> io::Result<Table> {
        if ["sqlite_schema", "sqlite_master"]
            .iter()
            .any(|schema| schema.eq_ignore_ascii_case(name))
        {
            let sql = "CREATE TABLE sqlite_schema(type text, name text, tbl_name text, \
                       rootpage integer, sql text)";
            return Ok(Table {
                name: name.to_owned(),
                root: 1,
                sql: sql.to_owned(),
                columns: ["type", "name", "tbl_name", "rootpage", "sql"]
                    .iter()
                    .zip(0..)
                    .map(|(name, at)| Column {
                        name: (*name).to_owned(),
                        affinity: Affinity::of(if at == 3 { "integer" } else { "text" }),
                        rowid_alias: false,
                        stored: Some(at),
                    })
                    .collect(),
            });
        }
        let mut found = None;
        self.scan(read, 1, &mut |_, record| {
            let text = |value: Option<&Value>| match value {
                Some(Value::Text { bytes, .. }) => String::from_utf8_lossy(bytes).into_owned(),
                _ => String::new(),
            };
            // sqlite_schema(type, name, tbl_name, rootpage, sql)
            if text(record.first()) == "table" && text(record.get(1)).eq_ignore_ascii_case(name) {
                let root = match record.get(3) {
                    Some(Value::Integer(root)) => *root,
                    _ => 0,
                };
                found = Some((text(record.get(1)), root, text(record.get(4))));
            }
        })?;
        let Some((name, root, sql)) = found else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no table named `{name}` in the schema"),
            ));
        };
        let (columns, without_rowid) = schema::columns(&name, &sql)?;
        if without_rowid {
            return Err(invalid(format!(
                "`{name}` is a WITHOUT ROWID table (an index B-tree): sqlite_rowid looks up \
                 rowid tables only"
            )));
        }
        let root = u32::try_from(root)
            .ok()
            .filter(|&root| root > 0)
            .ok_or_else(|| invalid(format!("`{name}` has root page {root} in the schema")))?;
        Ok(Table {
            name,
            root,
            sql,
            columns,
        })
    }

    /// Calls `each(rowid, record)` for every row of the table B-tree at `root`, in rowid
    /// order.
    fn scan(
        &self,
        read: &mut Read<'_>,
        root: u32,
        each: &mut dyn FnMut(i64, Vec<Value>),
    ) -> io::Result<()> {
        let mut pending = vec![root];
        let mut seen = HashSet::new();
        while let Some(number) = pending.pop() {
            if !seen.insert(number) {
                return Err(invalid(format!("page {number} is in the tree twice")));
            }
            let page = self.page(read, number)?;
            let node = self.node(&page, number)?;
            if node.leaf {
                for cell in node.cells {
                    let (rowid, payload) = self.leaf_payload(read, &page, number, cell)?;
                    each(rowid, decode_record(&payload, number, usize::MAX)?);
                }
            } else {
                // Children pushed last to first, so the leftmost is walked first.
                pending.push(node.right);
                for cell in node.cells.iter().rev() {
                    pending.push(be32(&page, *cell, number)?);
                }
            }
        }
        Ok(())
    }

    fn node(&self, page: &[u8], number: u32) -> io::Result<Node> {
        let at = if number == 1 { HEADER_SIZE } else { 0 };
        let page_type = page[at];
        let leaf = match page_type {
            PAGE_LEAF_TABLE => true,
            PAGE_INTERIOR_TABLE => false,
            PAGE_LEAF_INDEX | PAGE_INTERIOR_INDEX => {
                return Err(invalid(format!(
                    "page {number} is an index page (type {page_type:#04x}): not a rowid table"
                )))
            }
            _ => {
                return Err(invalid(format!(
                    "page {number} has type {page_type:#04x}, not a B-tree page"
                )))
            }
        };
        let count = usize::from(u16::from_be_bytes([page[at + 3], page[at + 4]]));
        let pointers = at + if leaf { 8 } else { 12 };
        let usable = self.usable as usize;
        if pointers + 2 * count > usable {
            return Err(invalid(format!(
                "page {number}: {count} cells do not fit in the page"
            )));
        }
        let mut cells = Vec::with_capacity(count);
        for i in 0..count {
            let cell = usize::from(u16::from_be_bytes([
                page[pointers + 2 * i],
                page[pointers + 2 * i + 1],
            ]));
            if cell < pointers + 2 * count || cell >= usable {
                return Err(invalid(format!(
                    "page {number}: cell {i} points to byte {cell}, outside the cell area"
                )));
            }
            cells.push(cell);
        }
        let right = if leaf { 0 } else { be32(page, at + 8, number)? };
        Ok(Node { leaf, cells, right })
    }

    /// The rowid and whole payload (overflow pages followed) of the leaf cell at `cell`.
    fn leaf_payload(
        &self,
        read: &mut Read<'_>,
        page: &[u8],
        number: u32,
        cell: usize,
    ) -> io::Result<(i64, Vec<u8>)> {
        let (size, n1) = varint(page, cell, number)?;
        let (rowid, n2) = varint(page, cell + n1, number)?;
        let start = cell + n1 + n2;
        let local = local_size(size, u64::from(self.usable)) as usize;
        let usable = self.usable as usize;
        if start + local > usable || (local as u64) < size && start + local + 4 > usable {
            return Err(invalid(format!(
                "page {number}: the cell at byte {cell} runs past the page"
            )));
        }
        let mut payload = page[start..start + local].to_vec();
        let mut next = if (local as u64) < size {
            be32(page, start + local, number)?
        } else {
            0
        };
        let mut seen = HashSet::new();
        while (payload.len() as u64) < size {
            if next == 0 {
                return Err(invalid(format!(
                    "page {number}: the overflow chain of rowid {rowid} ends early"
                )));
            }
            if !seen.insert(next) {
                return Err(invalid(format!(
                    "page {number}: the overflow chain of rowid {rowid} loops at page {next}"
                )));
            }
            let overflow = self.page(read, next)?;
            let take = ((size - payload.len() as u64) as usize).min(usable - 4);
            payload.extend_from_slice(&overflow[4..4 + take]);
            next = be32(&overflow, 0, next)?;
        }
        Ok((rowid as i64, payload))
    }

    /// The user-space lookup of declared column `column` of row `rowid` of `table`: one
    /// read per page, from the root down, then the overflow pages of the record. None: no
    /// such row.
    pub fn walk(
        &self,
        read: &mut Read<'_>,
        table: &Table,
        rowid: i64,
        column: u16,
    ) -> io::Result<Option<Value>> {
        let stored = table.stored(column)?;
        let mut number = table.root;
        let mut seen = HashSet::new();
        loop {
            if !seen.insert(number) {
                return Err(invalid(format!("page {number} is its own ancestor")));
            }
            let page = self.page(read, number)?;
            let node = self.node(&page, number)?;
            let key_of = |cell: usize| -> io::Result<i64> {
                let at = if node.leaf {
                    cell + varint(&page, cell, number)?.1
                } else {
                    cell + 4
                };
                Ok(varint(&page, at, number)?.0 as i64)
            };
            // First cell whose key is >= rowid.
            let (mut low, mut high) = (0, node.cells.len());
            while low < high {
                let middle = (low + high) / 2;
                if key_of(node.cells[middle])? < rowid {
                    low = middle + 1;
                } else {
                    high = middle;
                }
            }
            if node.leaf {
                if low == node.cells.len() || key_of(node.cells[low])? != rowid {
                    return Ok(None);
                }
                let (_, payload) = self.leaf_payload(read, &page, number, node.cells[low])?;
                let record = decode_record(&payload, number, usize::from(stored))?;
                let value = record
                    .into_iter()
                    .nth(usize::from(stored))
                    .unwrap_or(Value::Absent);
                return Ok(table.as_sqlite(column, rowid, Some(value)));
            }
            number = match node.cells.get(low) {
                Some(cell) => be32(&page, *cell, number)?,
                None => node.right,
            };
        }
    }

    /// The scratch of a chained lookup of record column `stored` (see [`Table::stored`])
    /// of row `rowid`.
    pub fn ask(&self, rowid: i64, stored: u16) -> Lookup {
        Lookup::ask(rowid, stored, self.page_size as u16, self.usable as u16)
    }

    /// The chain of a lookup over the table at `root`, with `scratch` from [`Self::ask`].
    pub fn chain<'a>(&self, program: &'a str, root: u32, scratch: &'a [u8]) -> Chain<'a> {
        let mut chain = Chain::new(program, self.offset_of(root), scratch);
        chain.read_len = self.page_size;
        chain
    }

    /// Looks declared column `column` of row `rowid` of `table` up with one chain of
    /// `program` (a loaded `sqlite_rowid`).
    pub fn lookup<F: AsFd>(
        &self,
        file: &Handle<F>,
        program: &str,
        table: &Table,
        rowid: i64,
        column: u16,
        how: How,
    ) -> io::Result<Answer> {
        let scratch = self.ask(rowid, table.stored(column)?).to_bytes();
        let mut chain = self.chain(program, table.root, &scratch);
        chain.via = how.via;
        chain.hop_limit = how.hop_limit;
        let answer = file.chain(&chain)?;
        Ok(Answer::of(
            table,
            column,
            rowid,
            answer.status,
            answer.hops,
            &answer.scratch,
        ))
    }

    /// Looks declared column `column` up in many rows, 32 lookups per kernel call. A batch
    /// returns no text or blob bytes (a batched lookup has 32 bytes of scratch), only
    /// their lengths, and does not walk overflow pages for them.
    pub fn lookup_batch<F: AsFd>(
        &self,
        file: &Handle<F>,
        program: &str,
        table: &Table,
        rowids: &[i64],
        column: u16,
        how: How,
    ) -> io::Result<Vec<Answer>> {
        let stored = table.stored(column)?;
        let asks: Vec<_> = rowids
            .iter()
            .map(|&rowid| self.ask(rowid, stored).length_only().to_bytes())
            .collect();
        let start = self.offset_of(table.root);
        let lookups: Vec<(u64, &[u8])> = asks
            .iter()
            .map(|ask| (start, &ask[..exofs_abi::chain::BATCH_SCRATCH_SIZE]))
            .collect();
        let answers = file.chain_batch(program, how.hop_limit, &lookups, how.via)?;
        Ok(rowids
            .iter()
            .zip(&answers)
            .map(|(&rowid, answer): (&i64, &BatchAnswer)| {
                Answer::of(
                    table,
                    column,
                    rowid,
                    answer.status,
                    answer.hops,
                    &answer.scratch,
                )
            })
            .collect())
    }
}

impl Answer {
    /// The answer a finished chain of declared column `column` of row `rowid` gives.
    pub fn of(
        table: &Table,
        column: u16,
        rowid: i64,
        chain_status: i32,
        hops: u32,
        scratch: &[u8],
    ) -> Self {
        Self {
            status: chain_status,
            hops,
            value: if chain_status == status::DONE {
                table.as_sqlite(column, rowid, value_of(scratch))
            } else {
                None
            },
        }
    }
}

/// The value a finished `sqlite_rowid` scratch holds; None: no such row.
pub fn value_of(scratch: &[u8]) -> Option<Value> {
    let lookup = Lookup::from_scratch(scratch);
    let bytes = if scratch.len() > exofs_abi::formats::sqlite::BYTES_OFFSET {
        lookup.returned_bytes().to_vec()
    } else {
        Vec::new()
    };
    let length = u64::from(lookup.length);
    Some(match lookup.kind {
        kind::NOT_FOUND => return None,
        kind::NULL => Value::Null,
        kind::INTEGER => Value::Integer(lookup.value as i64),
        kind::REAL => Value::Real(f64::from_bits(lookup.value)),
        kind::TEXT => Value::Text { bytes, length },
        kind::BLOB => Value::Blob { bytes, length },
        _ => Value::Absent,
    })
}

impl Value {
    /// The value as a chain returns it: text and blobs cut to their first MAX_BYTES.
    pub fn as_returned(&self) -> Self {
        match self {
            Self::Text { bytes, length } => Self::Text {
                bytes: bytes[..bytes.len().min(MAX_BYTES)].to_vec(),
                length: *length,
            },
            Self::Blob { bytes, length } => Self::Blob {
                bytes: bytes[..bytes.len().min(MAX_BYTES)].to_vec(),
                length: *length,
            },
            other => other.clone(),
        }
    }
}

struct Node {
    leaf: bool,
    cells: Vec<usize>,
    right: u32,
}

fn be32(page: &[u8], at: usize, number: u32) -> io::Result<u32> {
    page.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| invalid(format!("page {number}: a page number past the page's end")))
}

/// An SQLite varint at `at`: its value and length.
fn varint(page: &[u8], at: usize, number: u32) -> io::Result<(u64, usize)> {
    let byte = |i: usize| {
        page.get(at + i)
            .copied()
            .ok_or_else(|| invalid(format!("page {number}: a varint runs past the page's end")))
    };
    let mut value = 0u64;
    for i in 0..8 {
        let b = byte(i)?;
        value = value << 7 | u64::from(b & 0x7f);
        if b < 0x80 {
            return Ok((value, i + 1));
        }
    }
    Ok((value << 8 | u64::from(byte(8)?), 9))
}

/// Bytes of a table leaf payload kept on the leaf page.
fn local_size(payload: u64, usable: u64) -> u64 {
    let max_local = usable - 35;
    if payload <= max_local {
        return payload;
    }
    let min_local = (usable - 12) * 32 / 255 - 23;
    let local = min_local + (payload - min_local) % (usable - 4);
    if local <= max_local {
        local
    } else {
        min_local
    }
}

/// The columns of a record up to column `upto` (all of them if it has fewer), with the
/// checks the chain makes: a serial type may not run past the header, nor a value past
/// the payload.
fn decode_record(payload: &[u8], number: u32, upto: usize) -> io::Result<Vec<Value>> {
    let bad = || invalid(format!("page {number}: a malformed record"));
    let (header_size, mut at) = varint(payload, 0, number)?;
    let header_size = usize::try_from(header_size).map_err(|_| bad())?;
    if header_size > payload.len() || header_size < at {
        return Err(bad());
    }
    let mut body = header_size;
    let mut values = Vec::new();
    while at < header_size && values.len() <= upto {
        let (serial, n) = varint(payload, at, number)?;
        at += n;
        if at > header_size {
            return Err(bad());
        }
        let size = match serial {
            0 | 8 | 9 => 0,
            1..=4 => serial as usize,
            5 => 6,
            6 | 7 => 8,
            10 | 11 => return Err(bad()),
            _ => ((serial - 12) / 2) as usize,
        };
        let bytes = payload.get(body..body + size).ok_or_else(bad)?;
        body += size;
        let integer = || {
            let mut value = 0i64;
            for (i, b) in bytes.iter().enumerate() {
                value = if i == 0 {
                    i64::from(*b as i8)
                } else {
                    value << 8 | i64::from(*b)
                };
            }
            value
        };
        values.push(match serial {
            0 => Value::Null,
            1..=6 => Value::Integer(integer()),
            7 => {
                let mut bits = [0u8; 8];
                bits.copy_from_slice(bytes);
                Value::Real(f64::from_be_bytes(bits))
            }
            8 => Value::Integer(0),
            9 => Value::Integer(1),
            _ if serial % 2 == 0 => Value::Blob {
                bytes: bytes.to_vec(),
                length: size as u64,
            },
            _ => Value::Text {
                bytes: bytes.to_vec(),
                length: size as u64,
            },
        });
    }
    Ok(values)
}
