//! Extended-attribute layer: an inode's xattrs in a B+tree keyed by name hash.
//!
//! Interface: `get`, `set`, `remove`, `list`. Keys as in `dir` (hash of the full name
//! with its namespace prefix, plus a collision index). Namespaces accepted: user.,
//! trusted., security. (and system. for ACLs). A name and value together are limited to
//! one B+tree value (XATTR_MAX_TOTAL bytes); larger ones get `AttrTooBig`.

use crate::btree::{self, NodeStore, Tree};
use crate::dir::key_base;
use crate::error::{Error, Result};
use crate::format::{read_struct, XattrHeader, BTREE_KIND_XATTR, XATTR_MAX_TOTAL};
use zerocopy::little_endian::U16;
use zerocopy::IntoBytes;

const COLLISION_SLOTS: u64 = 1 << 16;

/// How `set` treats an existing or missing attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetMode {
    /// Create or replace.
    Any,
    /// Fail with `Exists` if present (XATTR_CREATE).
    Create,
    /// Fail with `NoAttr` if absent (XATTR_REPLACE).
    Replace,
}

pub fn tree(root: u64, owner: u64) -> Tree {
    Tree {
        root,
        kind: BTREE_KIND_XATTR,
        owner,
    }
}

/// Checks an attribute name.
pub fn check_name(name: &[u8]) -> Result<()> {
    const NAMESPACES: [&[u8]; 4] = [b"user.", b"trusted.", b"security.", b"system."];
    if name.len() > 255 {
        return Err(Error::NameTooLong);
    }
    match NAMESPACES.iter().find(|ns| name.starts_with(ns)) {
        Some(ns) if name.len() > ns.len() => Ok(()),
        _ => Err(Error::Unsupported(format!(
            "xattr name {:?}: namespace must be user., trusted., security. or system.",
            String::from_utf8_lossy(name)
        ))),
    }
}

fn decode(value: &[u8], tree: &Tree) -> Result<(Vec<u8>, Vec<u8>)> {
    let header: XattrHeader = read_struct(value, tree.root, "xattr")?;
    let name_len = usize::from(header.name_len);
    let value_len = usize::from(header.value_len.get());
    let body = &value[size_of::<XattrHeader>()..];
    if body.len() != name_len + value_len {
        return Err(Error::corrupt(
            tree.root,
            format!("inode {}: xattr with bad lengths", tree.owner),
        ));
    }
    Ok((body[..name_len].to_vec(), body[name_len..].to_vec()))
}

/// An attribute found (its key and value), and the first free key for its name.
type Found = (Option<(u64, Vec<u8>)>, u64);

fn find<S: NodeStore + ?Sized>(store: &mut S, tree: &Tree, name: &[u8]) -> Result<Found> {
    let base = key_base(name);
    let mut free_key = base;
    for (key, raw) in btree::range(store, tree, base, base + COLLISION_SLOTS - 1, usize::MAX)? {
        let (found_name, value) = decode(&raw, tree)?;
        if found_name == name {
            return Ok((Some((key, value)), free_key));
        }
        if key == free_key {
            free_key += 1;
        }
    }
    Ok((None, free_key))
}

pub fn get<S: NodeStore + ?Sized>(store: &mut S, tree: &Tree, name: &[u8]) -> Result<Vec<u8>> {
    find(store, tree, name)?
        .0
        .map(|(_, value)| value)
        .ok_or(Error::NoAttr)
}

pub fn set<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    name: &[u8],
    value: &[u8],
    mode: SetMode,
) -> Result<()> {
    check_name(name)?;
    if name.len() + value.len() > XATTR_MAX_TOTAL {
        return Err(Error::AttrTooBig(format!(
            "name and value take {} bytes, at most {XATTR_MAX_TOTAL} fit",
            name.len() + value.len()
        )));
    }
    let (existing, free_key) = find(store, tree, name)?;
    let key = match (&existing, mode) {
        (Some(_), SetMode::Create) => return Err(Error::Exists),
        (None, SetMode::Replace) => return Err(Error::NoAttr),
        (Some((key, _)), _) => *key,
        (None, _) if free_key >= key_base(name) + COLLISION_SLOTS => return Err(Error::NoSpace),
        (None, _) => free_key,
    };
    let header = XattrHeader {
        name_len: name.len() as u8,
        reserved: 0,
        value_len: U16::new(value.len() as u16),
    };
    let mut raw = header.as_bytes().to_vec();
    raw.extend_from_slice(name);
    raw.extend_from_slice(value);
    btree::insert(store, tree, key, &raw)?;
    Ok(())
}

pub fn remove<S: NodeStore + ?Sized>(store: &mut S, tree: &Tree, name: &[u8]) -> Result<()> {
    let (key, _) = find(store, tree, name)?.0.ok_or(Error::NoAttr)?;
    btree::remove(store, tree, key)?;
    Ok(())
}

/// Every attribute name.
pub fn list<S: NodeStore + ?Sized>(store: &mut S, tree: &Tree) -> Result<Vec<Vec<u8>>> {
    btree::range(store, tree, 0, u64::MAX, usize::MAX)?
        .iter()
        .map(|(_, raw)| decode(raw, tree).map(|(name, _)| name))
        .collect()
}
