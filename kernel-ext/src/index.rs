//! User-space side of the example formats (`exofs_abi::formats`): building files in them,
//! and reference walks that answer a lookup the way the in-kernel examples must.
//!
//! Layer: kernel-ext, beside the binding; used by tests, `exofs bench chain` and the
//! README's demo. Builders return the file's bytes; callers write them however they like
//! (contiguously, or fragmented on purpose). Walks read through a closure, so the same walk
//! runs over libfs `read_at`, `pread` on the device, io_uring, or a memory mapping.

use exofs_abi::chain::BLOCK_SIZE;
use exofs_abi::formats::btree::{self, BtreeHeader, ENTRY_SIZE, HEADER_SIZE};
use exofs_abi::formats::{hash, list};

/// Why a lookup or a build failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("malformed node at byte {offset}: {what}")]
    Malformed { offset: u64, what: String },
    #[error("read of byte {offset} failed: {what}")]
    Read { offset: u64, what: String },
    #[error("{0}")]
    Invalid(String),
}

/// The answer to a lookup and the number of reads (hops) it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub value: Option<u64>,
    pub hops: u32,
}

/// A B-tree file and its shape.
#[derive(Debug, Clone)]
pub struct Btree {
    pub bytes: Vec<u8>,
    /// Levels: a lookup takes exactly this many hops.
    pub depth: u32,
    pub node_size: usize,
}

/// Builds a B-tree over `pairs` (sorted by key, keys unique) with nodes of `node_size`
/// bytes holding at most `fanout` entries each. The root is at byte 0.
pub fn build_btree(
    pairs: &[(u64, u64)],
    node_size: usize,
    fanout: usize,
) -> Result<Btree, IndexError> {
    if !btree::NODE_SIZES.contains(&node_size) {
        return Err(IndexError::Invalid(format!(
            "node size {node_size}: use 512 or 4096"
        )));
    }
    if fanout < 2 || fanout > btree::capacity(node_size) {
        return Err(IndexError::Invalid(format!(
            "fanout {fanout}: use 2..={}",
            btree::capacity(node_size)
        )));
    }
    if pairs.is_empty() || pairs.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(IndexError::Invalid(
            "keys must be non-empty, sorted and unique".into(),
        ));
    }
    // levels[0] = leaves; each node is its entries.
    let mut levels: Vec<Vec<Vec<(u64, u64)>>> =
        vec![pairs.chunks(fanout).map(<[_]>::to_vec).collect()];
    while levels.last().map_or(0, Vec::len) > 1 {
        let below = levels.last().map_or(0, Vec::len);
        // Child offsets are filled in once every node has a place; use the index for now.
        let mut entries = Vec::with_capacity(below);
        for (index, node) in levels.last().into_iter().flatten().enumerate() {
            entries.push((node[0].0, index as u64));
        }
        levels.push(entries.chunks(fanout).map(<[_]>::to_vec).collect());
    }
    let depth = levels.len() as u32;
    // Places: the root at 0, then the levels from the top down.
    let mut first_of_level = vec![0u64; levels.len()];
    let mut next_place = 0u64;
    for level in (0..levels.len()).rev() {
        first_of_level[level] = next_place;
        next_place += levels[level].len() as u64;
    }
    let mut bytes = vec![0u8; next_place as usize * node_size];
    for (level, nodes) in levels.iter().enumerate() {
        for (index, entries) in nodes.iter().enumerate() {
            let place = first_of_level[level] + index as u64;
            let node = &mut bytes[place as usize * node_size..(place as usize + 1) * node_size];
            let entries = entries.iter().map(|(key, value)| {
                let value = if level == 0 {
                    *value
                } else {
                    (first_of_level[level - 1] + value) * node_size as u64
                };
                (*key, value)
            });
            encode_node(node, level as u16, entries);
        }
    }
    Ok(Btree {
        bytes,
        depth,
        node_size,
    })
}

/// Writes one B-tree node (header, then `entries`) into `node`.
fn encode_node(node: &mut [u8], level: u16, entries: impl ExactSizeIterator<Item = (u64, u64)>) {
    let header = BtreeHeader {
        magic: btree::MAGIC,
        level,
        count: entries.len() as u16,
        node_size: node.len() as u32,
        reserved: 0,
    };
    node.fill(0);
    node[0..4].copy_from_slice(&header.magic.to_le_bytes());
    node[4..6].copy_from_slice(&header.level.to_le_bytes());
    node[6..8].copy_from_slice(&header.count.to_le_bytes());
    node[8..12].copy_from_slice(&header.node_size.to_le_bytes());
    for (slot, (key, value)) in entries.enumerate() {
        let at = HEADER_SIZE + slot * ENTRY_SIZE;
        node[at..at + 8].copy_from_slice(&key.to_le_bytes());
        node[at + 8..at + 16].copy_from_slice(&value.to_le_bytes());
    }
}

/// The shape of a full B-tree: `depth` levels, every node holding `fanout` entries,
/// `fanout^depth` keys, laid out as [`build_btree`] lays it out (root at byte 0, then
/// each level from the top down, nodes in key order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FullBtree {
    pub depth: u32,
    pub fanout: usize,
    pub node_size: usize,
}

impl FullBtree {
    /// Keys (entries of the leaves).
    pub fn keys(&self) -> u64 {
        (self.fanout as u64).pow(self.depth)
    }

    /// Nodes on level `from_top` (0: the root).
    fn nodes_on(&self, from_top: u32) -> u64 {
        (self.fanout as u64).pow(from_top)
    }

    /// Node number (in file order) of the first node on level `from_top`.
    fn first_on(&self, from_top: u32) -> u64 {
        (0..from_top).map(|level| self.nodes_on(level)).sum()
    }

    /// Bytes of the whole tree.
    pub fn bytes(&self) -> u64 {
        self.first_on(self.depth) * self.node_size as u64
    }

    /// Bytes of the levels above `from_top` (the root's level is 0): they come first.
    pub fn bytes_above(&self, from_top: u32) -> u64 {
        self.first_on(from_top.min(self.depth)) * self.node_size as u64
    }

    /// File offsets of the nodes a lookup of the key with index `item` reads, root
    /// first.
    pub fn path_of(&self, item: u64) -> Vec<u64> {
        (0..self.depth)
            .map(|level| {
                let node = item / (self.fanout as u64).pow(self.depth - level);
                (self.first_on(level) + node) * self.node_size as u64
            })
            .collect()
    }

    /// Streams the tree to `emit` in file order, `chunk` bytes at a time (a multiple of
    /// the node size; the last piece may be shorter), never holding more than one chunk:
    /// a 4 GiB index is built without 4 GiB of memory. `pair(i)` is the key and value of
    /// the i-th key (keys must increase with i). `progress(done, total)` is called after
    /// each chunk. The bytes are those `build_btree` makes for the same pairs.
    pub fn stream<E>(
        &self,
        pair: impl Fn(u64) -> (u64, u64),
        chunk: usize,
        emit: &mut dyn FnMut(&[u8]) -> Result<(), E>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), E> {
        let node_size = self.node_size;
        let chunk = chunk.max(node_size) / node_size * node_size;
        let fanout = self.fanout as u64;
        let mut buffer = vec![0u8; chunk];
        let mut filled = 0;
        let (mut done, total) = (0, self.bytes());
        for level in 0..self.depth {
            let below = self.depth - 1 - level;
            for node in 0..self.nodes_on(level) {
                let first_child = node * fanout;
                let slot = &mut buffer[filled..filled + node_size];
                if below == 0 {
                    encode_node(
                        slot,
                        0,
                        (0..self.fanout).map(|j| pair(first_child + j as u64)),
                    );
                } else {
                    let span = fanout.pow(below);
                    let first_of_next = self.first_on(level + 1);
                    let child = |j: usize| {
                        let c = first_child + j as u64;
                        (pair(c * span).0, (first_of_next + c) * node_size as u64)
                    };
                    encode_node(slot, below as u16, (0..self.fanout).map(child));
                }
                filled += node_size;
                if filled == chunk {
                    emit(&buffer)?;
                    done += chunk as u64;
                    progress(done, total);
                    filled = 0;
                }
            }
        }
        if filled > 0 {
            emit(&buffer[..filled])?;
            progress(total, total);
        }
        Ok(())
    }
}

/// The fanout that gives `keys` keys a B-tree of exactly `depth` levels, if any fits
/// `node_size`.
pub fn fanout_for_depth(keys: u64, depth: u32, node_size: usize) -> Option<usize> {
    let levels = |fanout: u64| {
        let (mut nodes, mut levels) = (keys.div_ceil(fanout), 1u32);
        while nodes > 1 {
            nodes = nodes.div_ceil(fanout);
            levels += 1;
        }
        levels
    };
    (2..=btree::capacity(node_size) as u64)
        .find(|fanout| levels(*fanout) <= depth)
        .filter(|fanout| levels(*fanout) == depth)
        .map(|fanout| fanout as usize)
}

/// Reads bytes at a file offset into a buffer; returns bytes read.
pub type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> Result<usize, String> + 'a;

fn read_exact(read: &mut ReadAt<'_>, offset: u64, buf: &mut [u8]) -> Result<(), IndexError> {
    let got = read(offset, buf).map_err(|what| IndexError::Read { offset, what })?;
    if got < buf.len() {
        return Err(IndexError::Read {
            offset,
            what: format!("short read: {got} of {} bytes", buf.len()),
        });
    }
    Ok(())
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Looks `key` up in the B-tree read by `read`, one node read per hop, exactly as the
/// example `next` does.
pub fn btree_lookup(
    read: &mut ReadAt<'_>,
    node_size: usize,
    key: u64,
) -> Result<Answer, IndexError> {
    let mut node = vec![0u8; node_size];
    let mut offset = 0u64;
    for hop in 1..=64u32 {
        read_exact(read, offset, &mut node)?;
        match btree_step(&node, offset, key, hop)? {
            BtreeStep::Next(child) => offset = child,
            BtreeStep::Done(answer) => return Ok(answer),
        }
    }
    Err(IndexError::Invalid("more than 64 levels".into()))
}

/// What one B-tree node says about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BtreeStep {
    /// Read the child at this offset next.
    Next(u64),
    /// The lookup ends here (found or not) after `hop` hops.
    Done(Answer),
}

/// One hop of a B-tree lookup: `node` (read at `offset`, the `hop`th node of the lookup)
/// and `key` give the next node or the answer. A walk that keeps many lookups in flight
/// calls it as each node arrives.
pub fn btree_step(node: &[u8], offset: u64, key: u64, hop: u32) -> Result<BtreeStep, IndexError> {
    let malformed = |what: &str| IndexError::Malformed {
        offset,
        what: what.to_owned(),
    };
    if node.len() < HEADER_SIZE {
        return Err(malformed("shorter than a node header"));
    }
    let magic = u32::from_le_bytes([node[0], node[1], node[2], node[3]]);
    let level = u16::from_le_bytes([node[4], node[5]]);
    let count = usize::from(u16::from_le_bytes([node[6], node[7]]));
    if magic != btree::MAGIC || count > btree::capacity(node.len()) {
        return Err(malformed("bad magic or count"));
    }
    let keys = (0..count).map(|i| u64_at(node, HEADER_SIZE + i * ENTRY_SIZE));
    let below = keys.take_while(|k| *k <= key).count();
    if below == 0 {
        return Ok(BtreeStep::Done(Answer {
            value: None,
            hops: hop,
        }));
    }
    let at = HEADER_SIZE + (below - 1) * ENTRY_SIZE;
    let (entry_key, value) = (u64_at(node, at), u64_at(node, at + 8));
    if level == 0 {
        let value = (entry_key == key).then_some(value);
        return Ok(BtreeStep::Done(Answer { value, hops: hop }));
    }
    Ok(BtreeStep::Next(value))
}

/// Builds a hash file over `pairs` with `buckets` buckets: header, slots, then entries,
/// each entry inside one block.
pub fn build_hash(pairs: &[(u64, u64)], buckets: u64) -> Vec<u8> {
    let buckets = buckets.max(1);
    let slots_end = hash::slot_offset(buckets);
    let entries_start = slots_end.div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64;
    let per_block = BLOCK_SIZE as u64 / 24;
    let place = |index: u64| {
        entries_start + (index / per_block) * BLOCK_SIZE as u64 + (index % per_block) * 24
    };
    let end = if pairs.is_empty() {
        entries_start
    } else {
        place(pairs.len() as u64 - 1) + 24
    };
    let mut bytes = vec![0u8; end as usize];
    bytes[0..8].copy_from_slice(&hash::MAGIC.to_le_bytes());
    bytes[8..16].copy_from_slice(&buckets.to_le_bytes());
    let mut heads = vec![hash::END; buckets as usize];
    for (index, (key, value)) in pairs.iter().enumerate() {
        let at = place(index as u64);
        let bucket = hash::bucket_of(*key, buckets) as usize;
        let entry = at as usize;
        bytes[entry..entry + 8].copy_from_slice(&heads[bucket].to_le_bytes());
        bytes[entry + 8..entry + 16].copy_from_slice(&key.to_le_bytes());
        bytes[entry + 16..entry + 24].copy_from_slice(&value.to_le_bytes());
        heads[bucket] = at;
    }
    for (bucket, head) in heads.iter().enumerate() {
        let slot = hash::slot_offset(bucket as u64) as usize;
        bytes[slot..slot + 8].copy_from_slice(&head.to_le_bytes());
    }
    bytes
}

/// Looks `key` up in the hash file read by `read`, as the example does (header, slot,
/// then one entry per hop).
pub fn hash_lookup(read: &mut ReadAt<'_>, key: u64) -> Result<Answer, IndexError> {
    let mut header = [0u8; 16];
    read_exact(read, 0, &mut header)?;
    let buckets = u64_at(&header, 8);
    if u64_at(&header, 0) != hash::MAGIC || buckets == 0 {
        return Err(IndexError::Malformed {
            offset: 0,
            what: "bad hash header".into(),
        });
    }
    let mut slot = [0u8; 8];
    read_exact(
        read,
        hash::slot_offset(hash::bucket_of(key, buckets)),
        &mut slot,
    )?;
    let mut at = u64::from_le_bytes(slot);
    let mut hops = 2;
    while at != hash::END {
        let mut entry = [0u8; 24];
        read_exact(read, at, &mut entry)?;
        hops += 1;
        if u64_at(&entry, 8) == key {
            return Ok(Answer {
                value: Some(u64_at(&entry, 16)),
                hops,
            });
        }
        at = u64_at(&entry, 0);
        if hops > 64 {
            break;
        }
    }
    Ok(Answer { value: None, hops })
}

/// Builds a linked list over `pairs` in list order: one node per block, the head at
/// block 0, the rest in an order shuffled by `seed`.
pub fn build_list(pairs: &[(u64, u64)], seed: u64) -> Vec<u8> {
    let count = pairs.len() as u64;
    // slots[i] = block of the i-th node; the head stays at block 0.
    let mut slots: Vec<u64> = (0..count).collect();
    let mut state = seed | 1;
    for i in (2..slots.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = 1 + (state % i as u64) as usize;
        slots.swap(i, j);
    }
    let mut bytes = vec![0u8; count as usize * BLOCK_SIZE];
    for (position, (key, value)) in pairs.iter().enumerate() {
        let next = slots
            .get(position + 1)
            .map_or(list::END, |slot| slot * BLOCK_SIZE as u64);
        let at = slots[position] as usize * BLOCK_SIZE;
        bytes[at..at + 8].copy_from_slice(&next.to_le_bytes());
        bytes[at + 8..at + 16].copy_from_slice(&key.to_le_bytes());
        bytes[at + 16..at + 24].copy_from_slice(&value.to_le_bytes());
    }
    bytes
}

/// Looks `key` up in the list read by `read`.
pub fn list_lookup(read: &mut ReadAt<'_>, key: u64, hop_limit: u32) -> Result<Answer, IndexError> {
    let mut at = 0u64;
    for hop in 1..=hop_limit {
        let mut node = [0u8; 24];
        read_exact(read, at, &mut node)?;
        if u64_at(&node, 8) == key {
            return Ok(Answer {
                value: Some(u64_at(&node, 16)),
                hops: hop,
            });
        }
        at = u64_at(&node, 0);
        if at == list::END {
            return Ok(Answer {
                value: None,
                hops: hop,
            });
        }
    }
    Err(IndexError::Invalid(format!("more than {hop_limit} nodes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(bytes: &[u8]) -> impl FnMut(u64, &mut [u8]) -> Result<usize, String> + '_ {
        move |offset, buf| {
            let start = offset as usize;
            let end = (start + buf.len()).min(bytes.len());
            let n = end.saturating_sub(start);
            buf[..n].copy_from_slice(&bytes[start..start + n]);
            Ok(n)
        }
    }

    #[test]
    fn a_streamed_full_tree_is_the_built_one() {
        for (depth, fanout, node_size) in [(1, 5, 512), (3, 4, 512), (4, 16, 4096), (2, 200, 4096)]
        {
            let shape = FullBtree {
                depth,
                fanout,
                node_size,
            };
            let pair = |i: u64| (2 * i, 7 * i + 1);
            let pairs: Vec<(u64, u64)> = (0..shape.keys()).map(pair).collect();
            let built = build_btree(&pairs, node_size, fanout).expect("build");
            let mut streamed = Vec::new();
            let mut chunks = 0;
            shape
                .stream::<()>(
                    pair,
                    3 * node_size,
                    &mut |bytes| {
                        streamed.extend_from_slice(bytes);
                        Ok(())
                    },
                    &mut |_, _| chunks += 1,
                )
                .expect("stream");
            assert_eq!(built.depth, depth);
            assert_eq!(streamed.len() as u64, shape.bytes());
            assert!(streamed == built.bytes, "depth {depth} fanout {fanout}");
            assert_eq!(chunks, streamed.len().div_ceil(3 * node_size));
            // The path of every tenth key is the nodes the reference walk reads.
            for item in (0..shape.keys()).step_by(10) {
                let mut read = Vec::new();
                let mut reader = |offset: u64, buf: &mut [u8]| {
                    read.push(offset);
                    reader(&built.bytes)(offset, buf)
                };
                let answer = btree_lookup(&mut reader, node_size, 2 * item).expect("walk");
                assert_eq!(answer.value, Some(7 * item + 1));
                assert_eq!(read, shape.path_of(item), "item {item}");
            }
        }
    }

    #[test]
    fn btree_depths_and_lookups() {
        for depth in 1..=5u32 {
            let keys = 3u64.pow(depth);
            let pairs: Vec<(u64, u64)> = (0..keys).map(|k| (k * 10 + 5, k * 7)).collect();
            let fanout = fanout_for_depth(keys, depth, 512).expect("fanout");
            let tree = build_btree(&pairs, 512, fanout).expect("build");
            assert_eq!(tree.depth, depth);
            let mut read = reader(&tree.bytes);
            for (key, value) in &pairs {
                let answer = btree_lookup(&mut read, 512, *key).expect("lookup");
                assert_eq!(
                    answer,
                    Answer {
                        value: Some(*value),
                        hops: depth
                    }
                );
            }
            let miss = btree_lookup(&mut read, 512, 6).expect("lookup");
            assert_eq!(miss.value, None);
            assert_eq!(btree_lookup(&mut read, 512, 0).expect("lookup").value, None);
        }
    }

    #[test]
    fn hash_and_list_lookups() {
        let pairs: Vec<(u64, u64)> = (0..500).map(|k| (k * 3 + 1, k)).collect();
        let file = build_hash(&pairs, 64);
        let mut read = reader(&file);
        for (key, value) in &pairs {
            assert_eq!(
                hash_lookup(&mut read, *key).expect("lookup").value,
                Some(*value)
            );
        }
        assert_eq!(hash_lookup(&mut read, 2).expect("lookup").value, None);
        let list = build_list(&pairs[..40], 7);
        let mut read = reader(&list);
        for (position, (key, value)) in pairs[..40].iter().enumerate() {
            let answer = list_lookup(&mut read, *key, 64).expect("lookup");
            assert_eq!(
                answer,
                Answer {
                    value: Some(*value),
                    hops: position as u32 + 1
                }
            );
        }
    }
}
