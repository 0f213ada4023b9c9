//! The allowed-extents policy file (`-o policy=FILE`, `exofs policy check FILE`).
//!
//! TOML. Each `[[subject]]` names exactly one of `uid`, `gid` or `cgroup` (a cgroup2
//! directory path), and has `[[subject.grant]]`s:
//!
//! ```toml
//! [[subject]]
//! uid = 1000
//!
//! [[subject.grant]]
//! paths = ["/indexes/"]     # files, or directory trees (a trailing / or a directory)
//! programs = ["btree"]      # programs loaded with `exofs prog load`
//! max_hops = 16             # 1..=64 hops per chain
//! max_batch = 32            # 1..=32 lookups per batch call
//! ```
//!
//! Whatever no grant allows is denied. Every mistake is reported with its line and
//! column: unknown keys, missing or doubled subjects, relative paths, bad program names,
//! limits out of range.

use exofs_abi::chain::{MAX_BATCH, MAX_HOPS};
use serde::Deserialize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Whom a subject is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    Uid(u32),
    Gid(u32),
    /// A cgroup2 directory.
    Cgroup(PathBuf),
}

/// What a subject may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Absolute paths inside the image: a file, or every file under a directory.
    pub paths: Vec<String>,
    pub programs: Vec<String>,
    pub max_hops: u32,
    pub max_batch: u32,
}

/// One subject and its grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub who: Who,
    pub grants: Vec<Grant>,
}

/// A checked policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub subjects: Vec<Subject>,
}

/// One mistake in a policy file, with where it is (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mistake {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    subject: Vec<Spanned<SubjectSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubjectSpec {
    uid: Option<Spanned<u32>>,
    gid: Option<Spanned<u32>>,
    cgroup: Option<Spanned<String>>,
    #[serde(default)]
    grant: Vec<Spanned<GrantSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantSpec {
    paths: Spanned<Vec<Spanned<String>>>,
    programs: Spanned<Vec<Spanned<String>>>,
    max_hops: Spanned<u32>,
    max_batch: Spanned<u32>,
}

/// Line and column (1-based) of byte `offset` of `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

struct Checker<'a> {
    text: &'a str,
    mistakes: Vec<Mistake>,
}

impl Checker<'_> {
    fn report(&mut self, span: Range<usize>, message: String) {
        let (line, column) = position(self.text, span.start);
        self.mistakes.push(Mistake {
            line,
            column,
            message,
        });
    }

    fn subject(&mut self, spec: &Spanned<SubjectSpec>) -> Option<Subject> {
        let inner = spec.get_ref();
        let mut named = Vec::new();
        if let Some(uid) = &inner.uid {
            named.push((uid.span(), Who::Uid(*uid.get_ref())));
        }
        if let Some(gid) = &inner.gid {
            named.push((gid.span(), Who::Gid(*gid.get_ref())));
        }
        if let Some(cgroup) = &inner.cgroup {
            let path = cgroup.get_ref();
            if !path.starts_with('/') {
                self.report(
                    cgroup.span(),
                    format!("cgroup `{path}`: give the cgroup's absolute directory"),
                );
            }
            named.push((cgroup.span(), Who::Cgroup(PathBuf::from(path))));
        }
        if named.len() != 1 {
            let span = named.get(1).map_or(spec.span(), |(span, _)| span.clone());
            self.report(
                span,
                "a subject names exactly one of uid, gid or cgroup".to_owned(),
            );
        }
        if inner.grant.is_empty() {
            self.report(
                spec.span(),
                "a subject without [[subject.grant]] is allowed nothing (remove it)".to_owned(),
            );
        }
        let grants: Vec<Grant> = inner.grant.iter().filter_map(|g| self.grant(g)).collect();
        let who = named.into_iter().next()?.1;
        Some(Subject { who, grants })
    }

    fn grant(&mut self, spec: &Spanned<GrantSpec>) -> Option<Grant> {
        let inner = spec.get_ref();
        let before = self.mistakes.len();
        if inner.paths.get_ref().is_empty() {
            self.report(inner.paths.span(), "`paths` is empty".to_owned());
        }
        for path in inner.paths.get_ref() {
            let text = path.get_ref();
            if !text.starts_with('/') || text.split('/').any(|c| c == "..") {
                self.report(
                    path.span(),
                    format!("path `{text}`: use an absolute path inside the image, without `..`"),
                );
            }
        }
        if inner.programs.get_ref().is_empty() {
            self.report(inner.programs.span(), "`programs` is empty".to_owned());
        }
        for program in inner.programs.get_ref() {
            let name = program.get_ref();
            if !exofs_abi::ioctl::is_valid_program_name(name) {
                self.report(
                    program.span(),
                    format!("program `{name}`: names are 1-64 characters of [A-Za-z0-9_-]"),
                );
            }
        }
        let hops = *inner.max_hops.get_ref();
        if !(1..=MAX_HOPS).contains(&hops) {
            self.report(
                inner.max_hops.span(),
                format!("max_hops = {hops}: use 1..={MAX_HOPS}"),
            );
        }
        let batch = *inner.max_batch.get_ref();
        if !(1..=MAX_BATCH as u32).contains(&batch) {
            self.report(
                inner.max_batch.span(),
                format!("max_batch = {batch}: use 1..={MAX_BATCH}"),
            );
        }
        (self.mistakes.len() == before).then(|| Grant {
            paths: inner
                .paths
                .get_ref()
                .iter()
                .map(|p| p.get_ref().clone())
                .collect(),
            programs: inner
                .programs
                .get_ref()
                .iter()
                .map(|p| p.get_ref().clone())
                .collect(),
            max_hops: hops,
            max_batch: batch,
        })
    }
}

/// Parses and checks a policy; every mistake comes back, in file order.
pub fn parse(text: &str) -> Result<Policy, Vec<Mistake>> {
    let spec: FileSpec = match toml::from_str(text) {
        Ok(spec) => spec,
        Err(err) => {
            let (line, column) = err.span().map_or((1, 1), |span| position(text, span.start));
            return Err(vec![Mistake {
                line,
                column,
                message: err.message().trim().to_owned(),
            }]);
        }
    };
    let mut checker = Checker {
        text,
        mistakes: Vec::new(),
    };
    let subjects: Vec<Subject> = spec
        .subject
        .iter()
        .filter_map(|s| checker.subject(s))
        .collect();
    if checker.mistakes.is_empty() {
        Ok(Policy { subjects })
    } else {
        let mut mistakes = checker.mistakes;
        mistakes.sort_by_key(|m| (m.line, m.column));
        Err(mistakes)
    }
}

/// Reads and checks a policy file; the error lists every mistake as `FILE:LINE:COL: ...`.
pub fn load(path: &Path) -> Result<Policy, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|mistakes| {
        mistakes
            .iter()
            .map(|m| format!("{}:{}:{}: {}", path.display(), m.line, m.column, m.message))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// Why `exofs policy reload` did not put a new policy in force.
#[derive(Debug)]
pub enum ReloadError {
    /// The file has mistakes (one `FILE:LINE:COL: ...` per line); the old policy stays.
    Mistakes(String),
    /// The request failed (not an exofs mount, not allowed, no policy file...).
    Failed(String),
}

/// Asks the daemon of the exofs mount at `mountpoint` to read its policy file again.
pub fn reload(mountpoint: &Path) -> Result<(), ReloadError> {
    let root = std::fs::File::open(mountpoint)
        .map_err(|e| ReloadError::Failed(format!("{}: {e}", mountpoint.display())))?;
    exofs_client::reload_policy(&root).map_err(|err| match err.kind() {
        std::io::ErrorKind::InvalidInput if err.raw_os_error().is_none() => {
            ReloadError::Mistakes(err.to_string())
        }
        _ => ReloadError::Failed(match err.raw_os_error() {
            Some(libc::ENOTTY) => format!("{}: not an exofs mount", mountpoint.display()),
            Some(libc::EPERM) => format!(
                "{}: only root or the mount's owner reloads its policy",
                mountpoint.display()
            ),
            Some(libc::EINVAL) => format!(
                "{}: the mount has no policy file (mount with -o policy=FILE)",
                mountpoint.display()
            ),
            _ => format!("{}: {err}", mountpoint.display()),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[subject]]
uid = 1000

[[subject.grant]]
paths = ["/indexes/", "/other"]
programs = ["btree"]
max_hops = 16
max_batch = 32

[[subject]]
cgroup = "/sys/fs/cgroup/app"

[[subject.grant]]
paths = ["/"]
programs = ["btree", "hash_chain"]
max_hops = 64
max_batch = 1
"#;

    #[test]
    fn a_good_policy_parses() {
        let policy = parse(GOOD).expect("valid");
        assert_eq!(policy.subjects.len(), 2);
        assert_eq!(policy.subjects[0].who, Who::Uid(1000));
        assert_eq!(policy.subjects[0].grants[0].max_hops, 16);
        assert_eq!(
            policy.subjects[1].who,
            Who::Cgroup(PathBuf::from("/sys/fs/cgroup/app"))
        );
    }

    #[test]
    fn mistakes_name_their_line() {
        let bad = "[[subject]]\nuid = 1\ngid = 2\n\n[[subject.grant]]\npaths = [\"rel\"]\nprograms = [\"a b\"]\nmax_hops = 65\nmax_batch = 0\n";
        let mistakes = parse(bad).expect_err("invalid");
        let lines: Vec<usize> = mistakes.iter().map(|m| m.line).collect();
        assert_eq!(lines, vec![3, 6, 7, 8, 9], "{mistakes:?}");
        assert!(mistakes[0]
            .message
            .contains("exactly one of uid, gid or cgroup"));
        assert!(mistakes[3].message.contains("max_hops = 65"));
        let typo =
            parse("[[subject]]\nuid = 1\n[[subject.grant]]\npath = [\"/\"]\n").expect_err("typo");
        assert_eq!(typo[0].line, 4, "{typo:?}");
        assert!(typo[0].message.contains("path"), "{typo:?}");
        let syntax = parse("[[subject]\n").expect_err("syntax");
        assert_eq!(syntax[0].line, 1);
    }
}
