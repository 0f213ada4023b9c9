//! What a CREATE TABLE statement says about its columns, as far as reading a row needs:
//! where each column is in the record, which one is the rowid, and which affinity turns a
//! stored integer back into a real. A small tokenizer, not an SQL parser: it follows
//! SQLite's rules for column affinity (sqlite.org/datatype3.html, 3.1) and for the rowid
//! alias (an `INTEGER PRIMARY KEY` column, not `DESC`), and knows VIRTUAL generated
//! columns, which are not stored.

/// A column's type affinity.
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
    fn of(declared: &str) -> Self {
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

/// The columns of `sql` (a CREATE TABLE statement), and whether the table is WITHOUT
/// ROWID. No columns for a statement without a column list (CREATE TABLE ... AS SELECT:
/// every column is then stored in order, none is an alias).
pub fn columns(sql: &str) -> (Vec<Column>, bool) {
    let Some(open) = sql.find('(') else {
        return (Vec::new(), false);
    };
    let (body, tail) = split_body(&sql[open + 1..]);
    let tail_words = words(tail);
    let without_rowid = tail_words
        .windows(2)
        .any(|w| w[0].eq_ignore_ascii_case("WITHOUT") && w[1].eq_ignore_ascii_case("ROWID"));
    let mut columns: Vec<Column> = Vec::new();
    // Each column's declared type, for the alias rule (exactly INTEGER).
    let mut declared_types: Vec<String> = Vec::new();
    let mut key_columns: Vec<String> = Vec::new();
    for definition in split_top_level(body) {
        let tokens = words(&definition);
        let Some(first) = tokens.first() else {
            continue;
        };
        let upper: Vec<String> = tokens.iter().map(|t| t.to_ascii_uppercase()).collect();
        if ["CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK", "FOREIGN"].contains(&upper[0].as_str()) {
            // A table constraint: PRIMARY KEY of one column (not DESC) may make that column
            // the alias.
            let key = definition.to_ascii_uppercase().find("PRIMARY");
            if let Some(open) = key.and_then(|at| definition[at..].find('(').map(|o| at + o)) {
                let (list, _) = split_body(&definition[open + 1..]);
                let keys = split_top_level(list);
                let key_words = keys.first().map(|k| words(k)).unwrap_or_default();
                let descending = key_words.iter().any(|w| w.eq_ignore_ascii_case("DESC"));
                if keys.len() == 1 && !descending {
                    if let Some(name) = key_words.first() {
                        key_columns.push(unquote(name));
                    }
                }
            }
            continue;
        }
        const STOP: [&str; 11] = [
            "CONSTRAINT",
            "PRIMARY",
            "NOT",
            "NULL",
            "UNIQUE",
            "CHECK",
            "DEFAULT",
            "COLLATE",
            "REFERENCES",
            "GENERATED",
            "AS",
        ];
        let type_end = upper[1..]
            .iter()
            .position(|t| STOP.contains(&t.as_str()))
            .map_or(upper.len(), |p| p + 1);
        let declared = tokens[1..type_end].join(" ");
        let primary = upper
            .windows(2)
            .position(|w| w[0] == "PRIMARY" && w[1] == "KEY");
        let descending =
            primary.is_some_and(|p| upper.get(p + 2).map(String::as_str) == Some("DESC"));
        let generated = upper[type_end..].iter().any(|t| t == "AS");
        let stored_generated = upper.iter().any(|t| t == "STORED");
        declared_types.push(declared.clone());
        columns.push(Column {
            name: unquote(first),
            affinity: Affinity::of(&declared),
            rowid_alias: primary.is_some()
                && !descending
                && declared.eq_ignore_ascii_case("INTEGER"),
            stored: if generated && !stored_generated {
                None
            } else {
                Some(0)
            },
        });
    }
    for (column, declared) in columns.iter_mut().zip(&declared_types) {
        if key_columns
            .iter()
            .any(|k| k.eq_ignore_ascii_case(&column.name))
        {
            column.rowid_alias = declared.eq_ignore_ascii_case("INTEGER");
        }
    }
    // Only one column can be the rowid; without ROWID there is none.
    if without_rowid || columns.iter().filter(|c| c.rowid_alias).count() > 1 {
        columns.iter_mut().for_each(|c| c.rowid_alias = false);
    }
    let mut next = 0u16;
    for column in &mut columns {
        if column.stored.is_some() {
            column.stored = Some(next);
            next += 1;
        }
    }
    (columns, without_rowid)
}

/// The column list (up to its closing parenthesis) and what follows it.
fn split_body(after_open: &str) -> (&str, &str) {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    for (i, c) in after_open.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"' | '`') => quote = Some(c),
            (None, '[') => quote = Some(']'),
            (None, '(') => depth += 1,
            (None, ')') if depth == 0 => return (&after_open[..i], &after_open[i + 1..]),
            (None, ')') => depth -= 1,
            _ => {}
        }
    }
    (after_open, "")
}

/// The definitions of a column list, split at its top-level commas.
fn split_top_level(body: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let (mut depth, mut quote, mut start) = (0usize, None::<char>, 0usize);
    for (i, c) in body.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"' | '`') => quote = Some(c),
            (None, '[') => quote = Some(']'),
            (None, '(') => depth += 1,
            (None, ')') => depth = depth.saturating_sub(1),
            (None, ',') if depth == 0 => {
                parts.push(body[start..i].to_owned());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(body[start..].to_owned());
    parts
}

/// Words and quoted names, with comments, punctuation and parenthesised parts dropped
/// (their contents are expressions: defaults, checks).
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let (mut i, mut depth) = (0, 0usize);
    while i < chars.len() {
        let c = chars[i];
        if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                i += 1;
            }
            i += 2;
        } else if c == '(' {
            depth += 1;
            i += 1;
        } else if c == ')' {
            depth = depth.saturating_sub(1);
            i += 1;
        } else if matches!(c, '\'' | '"' | '`' | '[') {
            let close = if c == '[' { ']' } else { c };
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != close {
                i += 1;
            }
            i += 1;
            if depth == 0 && c != '\'' {
                out.push(chars[start..i.min(chars.len())].iter().collect());
            }
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            if depth == 0 {
                out.push(chars[start..i].iter().collect());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// A name without its quotes.
fn unquote(name: &str) -> String {
    let trimmed = name.trim();
    let inner = match trimmed.chars().next() {
        Some('"' | '`' | '[') if trimmed.len() >= 2 => &trimmed[1..trimmed.len() - 1],
        _ => trimmed,
    };
    inner.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(sql: &str) -> Vec<(String, Affinity, bool, Option<u16>)> {
        columns(sql)
            .0
            .into_iter()
            .map(|c| (c.name, c.affinity, c.rowid_alias, c.stored))
            .collect()
    }

    #[test]
    fn affinities_aliases_and_storage_follow_sqlites_rules() {
        use Affinity::*;
        assert_eq!(
            summary(
                "CREATE TABLE t(id INTEGER PRIMARY KEY, x REAL, n VARCHAR(10) NOT NULL, \
                 b, f FLOATING POINT, d DECIMAL(5,2) DEFAULT (1+2), \"odd, name\" TEXT)"
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
        // Not aliases: INT, DESC, a key of two columns.
        assert!(!columns("CREATE TABLE t(a INT PRIMARY KEY)").0[0].rowid_alias);
        assert!(!columns("CREATE TABLE t(a INTEGER PRIMARY KEY DESC)").0[0].rowid_alias);
        assert!(columns("CREATE TABLE t(a INTEGER, b, PRIMARY KEY(a))").0[0].rowid_alias);
        assert!(!columns("CREATE TABLE t(a INTEGER, b, PRIMARY KEY(a, b))").0[0].rowid_alias);
        // A VIRTUAL generated column takes no place in the record; a STORED one does.
        assert_eq!(
            summary("CREATE TABLE t(a, v AS (a * 2), s INT GENERATED ALWAYS AS (a + 1) STORED, z)")
                .into_iter()
                .map(|c| c.3)
                .collect::<Vec<_>>(),
            vec![Some(0), None, Some(1), Some(2)]
        );
    }

    #[test]
    fn without_rowid_is_read_from_the_words_after_the_columns() {
        assert!(columns("CREATE TABLE w(k PRIMARY KEY, v) WITHOUT ROWID").1);
        assert!(columns("CREATE TABLE w(k PRIMARY KEY, v) WITHOUT\n  /* c */ ROWID, STRICT").1);
        assert!(!columns("CREATE TABLE t(a DEFAULT 'without rowid')").1);
        assert!(!columns("CREATE TABLE t(a)").1);
    }
}
