//! What a table's CREATE statement says about its columns, as far as reading a row needs:
//! where each column is in the record, which one is the rowid, and which affinity turns a
//! stored integer back into a real. SQLite itself reads the statement: it is run in an
//! in-memory database and the table is asked with `PRAGMA table_xinfo` (name, declared
//! type, hidden: 2 for a VIRTUAL generated column, which the record does not hold) and
//! `EXPLAIN` (a column SQLite reads with the `Rowid` opcode is the rowid's alias).

use rusqlite::Connection;
use std::io;

/// A column's type affinity (sqlite.org/datatype3.html, 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    Integer,
    Text,
    Blob,
    Real,
    Numeric,
}

impl Affinity {
    /// SQLite's rules, in their order, on the declared type.
    pub fn of(declared: &str) -> Self {
        let t = declared.to_ascii_uppercase();
        if t.contains("INT") {
            Self::Integer
        } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
            Self::Text
        } else if t.contains("BLOB") || t.trim().is_empty() {
            Self::Blob
        } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
            Self::Real
        } else {
            Self::Numeric
        }
    }
}

/// One declared column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub affinity: Affinity,
    /// An alias of the rowid: the record holds NULL, the value is the rowid.
    pub rowid_alias: bool,
    /// Its index in the record; None for a VIRTUAL generated column (computed, not
    /// stored).
    pub stored: Option<u16>,
}

/// `name` quoted as an SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The columns of table `table`, created by `sql`, and whether it is WITHOUT ROWID.
pub fn columns(table: &str, sql: &str) -> io::Result<(Vec<Column>, bool)> {
    let failed = |err: rusqlite::Error| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reading the CREATE statement of `{table}` with SQLite: {err}"),
        )
    };
    let conn = Connection::open_in_memory().map_err(failed)?;
    conn.execute_batch(sql).map_err(failed)?;
    let without_rowid: bool = conn
        .query_row(
            "SELECT wr FROM pragma_table_list WHERE name = ?1 COLLATE NOCASE",
            [table],
            |row| row.get(0),
        )
        .map_err(failed)?;
    let mut statement = conn
        .prepare("SELECT name, type, hidden FROM pragma_table_xinfo(?1) ORDER BY cid")
        .map_err(failed)?;
    let declared = statement
        .query_map([table], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })
        .map_err(failed)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(failed)?;
    let mut columns = Vec::with_capacity(declared.len());
    let mut next = 0u16;
    for (name, declared_type, hidden) in declared {
        let stored = if hidden == 2 {
            None
        } else {
            next = next
                .checked_add(1)
                .ok_or_else(|| failed(rusqlite::Error::InvalidQuery))?;
            Some(next - 1)
        };
        // The program SQLite makes to read the column: the alias is read as the rowid.
        let mut explain = conn
            .prepare(&format!(
                "EXPLAIN SELECT {} FROM {}",
                quoted(&name),
                quoted(table)
            ))
            .map_err(failed)?;
        let opcodes = explain
            .query_map([], |row| row.get::<_, String>(1))
            .map_err(failed)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(failed)?;
        columns.push(Column {
            affinity: Affinity::of(&declared_type),
            rowid_alias: !without_rowid && opcodes.iter().any(|op| op == "Rowid"),
            stored,
            name,
        });
    }
    Ok((columns, without_rowid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(table: &str, sql: &str) -> Vec<(String, Affinity, bool, Option<u16>)> {
        columns(table, sql)
            .expect("columns")
            .0
            .into_iter()
            .map(|c| (c.name, c.affinity, c.rowid_alias, c.stored))
            .collect()
    }

    #[test]
    fn affinities_aliases_and_storage_are_sqlites() {
        use Affinity::*;
        assert_eq!(
            summary(
                "t",
                "CREATE TABLE t(\n -- key, then payload's bytes\n id INTEGER PRIMARY KEY, \
                 x REAL, n VARCHAR(10) NOT NULL, b, f FLOATING POINT, \
                 d DECIMAL(5,2) DEFAULT (1+2), \"odd, name\" TEXT)"
            ),
            vec![
                ("id".into(), Integer, true, Some(0)),
                ("x".into(), Real, false, Some(1)),
                ("n".into(), Text, false, Some(2)),
                ("b".into(), Blob, false, Some(3)),
                // "FLOATING POINT" holds "INT": integer affinity, as SQLite says.
                ("f".into(), Integer, false, Some(4)),
                ("d".into(), Numeric, false, Some(5)),
                ("odd, name".into(), Text, false, Some(6)),
            ]
        );
        let alias = |sql: &str| columns("t", sql).expect("columns").0[0].rowid_alias;
        assert!(!alias("CREATE TABLE t(a INT PRIMARY KEY)"));
        assert!(!alias("CREATE TABLE t(a INTEGER PRIMARY KEY DESC)"));
        assert!(alias("CREATE TABLE t(a INTEGER, b, PRIMARY KEY(a DESC))"));
        assert!(!alias("CREATE TABLE t(a INTEGER, b, PRIMARY KEY(a, b))"));
        assert!(alias("CREATE TABLE t('a' INTEGER PRIMARY KEY, 'x' REAL)"));
        // A VIRTUAL generated column (the default) takes no place in the record; a STORED
        // one does; `stored` may name a column.
        assert_eq!(
            summary(
                "t",
                "CREATE TABLE t(a, v AS (a * 2), stored AS (a * 3), \
                 s INT GENERATED ALWAYS AS (a + 1) STORED, z)"
            )
            .into_iter()
            .map(|c| c.3)
            .collect::<Vec<_>>(),
            vec![Some(0), None, None, Some(1), Some(2)]
        );
    }

    #[test]
    fn without_rowid_and_bad_statements() {
        assert!(
            columns("w", "CREATE TABLE w(k PRIMARY KEY, v) WITHOUT ROWID")
                .expect("w")
                .1
        );
        assert!(
            !columns("t", "CREATE TABLE t(a DEFAULT 'without rowid')")
                .expect("t")
                .1
        );
        let err = columns("t", "CREATE TABLE t(a, \"é").expect_err("refused");
        assert!(err.to_string().contains("CREATE statement of `t`"), "{err}");
    }
}
