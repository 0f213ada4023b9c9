//! Registry layer (user space): cutting a file's extent list into the chunks of the
//! `extents` map (see `exofs_abi::extents`), and the same translation the driver does,
//! for tests and for the user-space fallback.
//!
//! Invariants of a [`ChunkedMap`]: every chunk holds at most EXTENTS_PER_CHUNK extents,
//! sorted by `logical`; chunk c lists exactly the extents overlapping
//! `[c << chunk_shift, (c + 1) << chunk_shift)`; `chunk_shift` is the largest for which
//! that bound holds; chunks without extents are absent.

use exofs_abi::extents::{ExtentChunk, ExtentEntry, EXTENTS_PER_CHUNK, EXTENT_UNWRITTEN};
use libfs::Extent;
use std::collections::{BTreeMap, HashMap};

/// Largest chunk: 2^40 blocks covers the largest libfs file.
const MAX_SHIFT: u32 = 40;
/// Most chunks one file may take in the map.
pub const MAX_CHUNKS_PER_FILE: usize = 1 << 20;

/// A file's extents as the `extents` map holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkedMap {
    pub chunk_shift: u32,
    pub chunks: BTreeMap<u64, ExtentChunk>,
}

/// Why a file cannot be registered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("more than {EXTENTS_PER_CHUNK} extents start in one block range that cannot be split further")]
    TooDense,
    #[error("the file needs more than {MAX_CHUNKS_PER_FILE} chunks in the extents map")]
    TooManyChunks,
}

fn chunk_range(extent: &Extent, shift: u32) -> (u64, u64) {
    let last = extent.logical + extent.length.max(1) - 1;
    (extent.logical >> shift, last >> shift)
}

/// Whether every chunk at `shift` holds at most EXTENTS_PER_CHUNK extents, or None if it
/// would take too many chunks.
fn fits(extents: &[Extent], shift: u32) -> Option<bool> {
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for extent in extents {
        let (first, last) = chunk_range(extent, shift);
        for chunk in first..=last {
            let count = counts.entry(chunk).or_insert(0);
            *count += 1;
            if *count > EXTENTS_PER_CHUNK {
                return Some(false);
            }
            if counts.len() > MAX_CHUNKS_PER_FILE {
                return None;
            }
        }
    }
    Some(true)
}

/// Cuts a sorted, non-overlapping extent list (as `libfs::Fs::extents` returns it) into
/// chunks.
pub fn chunk(extents: &[Extent]) -> Result<ChunkedMap, ChunkError> {
    let mut shift = MAX_SHIFT;
    loop {
        match fits(extents, shift) {
            Some(true) => break,
            Some(false) if shift > 0 => shift -= 1,
            Some(false) => return Err(ChunkError::TooDense),
            None => return Err(ChunkError::TooManyChunks),
        }
    }
    let mut chunks: BTreeMap<u64, ExtentChunk> = BTreeMap::new();
    for extent in extents {
        let (first, last) = chunk_range(extent, shift);
        let entry = ExtentEntry {
            logical: extent.logical,
            physical: extent.physical,
            length: extent.length as u32,
            flags: if extent.unwritten {
                EXTENT_UNWRITTEN
            } else {
                0
            },
        };
        for index in first..=last {
            let chunk = chunks.entry(index).or_default();
            chunk.extents[chunk.count as usize] = entry;
            chunk.count += 1;
        }
    }
    Ok(ChunkedMap {
        chunk_shift: shift,
        chunks,
    })
}

/// What the driver does for one block: the device block, or None for a hole or an
/// unwritten extent.
pub fn translate(map: &ChunkedMap, block: u64) -> Option<u64> {
    let chunk = map.chunks.get(&(block >> map.chunk_shift))?;
    let entries = &chunk.extents[..(chunk.count as usize).min(EXTENTS_PER_CHUNK)];
    // Last entry starting at or before `block` (bounded binary search, as in BPF).
    let (mut low, mut high) = (0usize, entries.len());
    while low < high {
        let middle = (low + high) / 2;
        if entries[middle].logical <= block {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    let entry = entries.get(low.checked_sub(1)?)?;
    let inside = block < entry.logical + u64::from(entry.length);
    (inside && entry.flags & EXTENT_UNWRITTEN == 0).then(|| entry.physical + block - entry.logical)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn extent(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            unwritten: false,
        }
    }

    fn reference(extents: &[Extent], block: u64) -> Option<u64> {
        extents
            .iter()
            .find(|e| e.logical <= block && block < e.logical + e.length && !e.unwritten)
            .map(|e| e.physical + block - e.logical)
    }

    fn check(extents: &[Extent], blocks: u64) -> ChunkedMap {
        let map = chunk(extents).unwrap();
        for chunk in map.chunks.values() {
            assert!(chunk.count as usize <= EXTENTS_PER_CHUNK);
        }
        for block in 0..blocks {
            assert_eq!(
                translate(&map, block),
                reference(extents, block),
                "block {block}"
            );
        }
        map
    }

    #[test]
    fn a_contiguous_file_is_one_chunk() {
        let map = check(&[extent(0, 1000, 5000)], 6000);
        assert_eq!(map.chunks.len(), 1);
        assert_eq!(map.chunk_shift, MAX_SHIFT);
    }

    #[test]
    fn fragmented_extents_split_into_chunks_and_cross_boundaries() {
        // 500 extents of 3 blocks with 2-block holes (a stride of 5 is no power of two,
        // so some extents straddle chunk boundaries), physically scattered.
        let extents: Vec<Extent> = (0..500)
            .map(|i| extent(i * 5, 100_000 - i * 7, 3))
            .collect();
        let map = check(&extents, 2600);
        assert!(map.chunks.len() > 500 / EXTENTS_PER_CHUNK);
        let crossing = extents.iter().filter(|e| {
            let (first, last) = chunk_range(e, map.chunk_shift);
            first != last
        });
        assert!(
            crossing.count() > 0,
            "no extent crosses a chunk boundary at shift {}",
            map.chunk_shift
        );
    }

    #[test]
    fn a_long_extent_beside_dense_ones_is_listed_in_every_chunk_it_covers() {
        let mut extents: Vec<Extent> = (0..100).map(|i| extent(i, 50_000 + 2 * i, 1)).collect();
        extents.push(extent(100, 1_000, 10_000));
        check(&extents, 10_200);
    }

    #[test]
    fn unwritten_extents_and_holes_translate_to_nothing() {
        let extents = vec![
            extent(0, 10, 4),
            Extent {
                logical: 8,
                physical: 40,
                length: 4,
                unwritten: true,
            },
        ];
        let map = check(&extents, 20);
        assert_eq!(translate(&map, 9), None);
        assert_eq!(translate(&map, 5), None);
    }
}
