//! Directory layer: a directory's entries in a B+tree keyed by name hash.
//!
//! Interface: `create`, `lookup`, `insert`, `remove`, `list_from`, `destroy`.
//! Key = (FNV-1a-64(name) >> 18) << 16 | collision index, so keys stay below 2^62 and a
//! readdir cursor (key + 3, after "." and "..") fits a signed 64-bit offset. Names with
//! the same 46-bit hash take the smallest free collision index; lookup scans that
//! 65,536-key range, which in practice holds one entry. Lookup and insert are O(log n).
//!
//! Invariant: at most one entry per name; the directory inode's `size` counts entries.

use crate::btree::{self, NodeStore, Tree};
use crate::error::{Error, Result};
use crate::format::{read_struct, DirEntryHeader, BTREE_KIND_DIRECTORY, NAME_MAX};
use zerocopy::little_endian::U64;
use zerocopy::IntoBytes;

/// Keys a name hash can take (the collision index).
const COLLISION_SLOTS: u64 = 1 << 16;

/// A directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub ino: u64,
    /// File type: the S_IFMT bits of the mode, shifted right by 12.
    pub file_type: u8,
}

/// FNV-1a, 64 bit: the on-disk name hash (docs/FORMAT.md).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// First key a name can have.
pub fn key_base(name: &[u8]) -> u64 {
    (fnv1a64(name) >> 18) << 16
}

/// Checks a name for use in a directory.
pub fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(Error::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::Invalid(format!(
            "bad file name {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(())
}

pub fn tree(root: u64, owner: u64) -> Tree {
    Tree {
        root,
        kind: BTREE_KIND_DIRECTORY,
        owner,
    }
}

fn decode(key: u64, value: &[u8], tree: &Tree) -> Result<Entry> {
    let header: DirEntryHeader = read_struct(value, tree.root, "directory entry")?;
    let name = &value[size_of::<DirEntryHeader>()..];
    if name.len() != usize::from(header.name_len) || name.is_empty() {
        return Err(Error::corrupt(
            tree.root,
            format!(
                "directory {}: entry {key:#x} has a bad name length",
                tree.owner
            ),
        ));
    }
    Ok(Entry {
        name: name.to_vec(),
        ino: header.ino.get(),
        file_type: header.file_type,
    })
}

fn encode(name: &[u8], ino: u64, file_type: u8) -> Vec<u8> {
    let header = DirEntryHeader {
        ino: U64::new(ino),
        file_type,
        name_len: name.len() as u8,
    };
    let mut value = header.as_bytes().to_vec();
    value.extend_from_slice(name);
    value
}

/// Finds `name`: its key and entry.
pub fn lookup<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    name: &[u8],
) -> Result<Option<(u64, Entry)>> {
    let base = key_base(name);
    for (key, value) in btree::range(store, tree, base, base + COLLISION_SLOTS - 1, usize::MAX)? {
        let entry = decode(key, &value, tree)?;
        if entry.name == name {
            return Ok(Some((key, entry)));
        }
    }
    Ok(None)
}

/// Adds an entry; fails with `Exists` if the name is taken. Returns its key.
pub fn insert<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    name: &[u8],
    ino: u64,
    file_type: u8,
) -> Result<u64> {
    check_name(name)?;
    let base = key_base(name);
    let taken = btree::range(store, tree, base, base + COLLISION_SLOTS - 1, usize::MAX)?;
    let mut free_key = base;
    for (key, value) in &taken {
        if decode(*key, value, tree)?.name == name {
            return Err(Error::Exists);
        }
        if *key == free_key {
            free_key += 1;
        }
    }
    if free_key >= base + COLLISION_SLOTS {
        return Err(Error::NoSpace);
    }
    btree::insert(store, tree, free_key, &encode(name, ino, file_type))?;
    Ok(free_key)
}

/// Replaces what an existing entry points at (rename over an existing name).
pub fn replace<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    key: u64,
    name: &[u8],
    ino: u64,
    file_type: u8,
) -> Result<()> {
    btree::insert(store, tree, key, &encode(name, ino, file_type))?;
    Ok(())
}

/// Removes `name`; returns the entry.
pub fn remove<S: NodeStore + ?Sized>(store: &mut S, tree: &Tree, name: &[u8]) -> Result<Entry> {
    let (key, entry) = lookup(store, tree, name)?.ok_or(Error::NotFound)?;
    btree::remove(store, tree, key)?;
    Ok(entry)
}

/// Up to `limit` entries with key >= `from`, in key order.
pub fn list_from<S: NodeStore + ?Sized>(
    store: &mut S,
    tree: &Tree,
    from: u64,
    limit: usize,
) -> Result<Vec<(u64, Entry)>> {
    btree::range(store, tree, from, u64::MAX, limit)?
        .into_iter()
        .map(|(key, value)| Ok((key, decode(key, &value, tree)?)))
        .collect()
}
