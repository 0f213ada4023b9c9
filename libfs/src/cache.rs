//! Block cache: clean metadata blocks, least recently used first out.
//!
//! Layer: above the device, below the journal. Holds only blocks whose contents match
//! what is (or will be, after replay) on the device: the journal keeps the running
//! transaction's dirty blocks itself and hands them back here once written home.

use crate::format::{Block, BLOCK_SIZE};
use lru::LruCache;
use std::hash::Hash;
use std::sync::Arc;

/// An LRU map holding at most `capacity` entries that allocates as it fills (an
/// `LruCache` with a fixed capacity reserves its whole table up front, megabytes for
/// every open of a file system).
#[derive(Debug)]
pub struct BoundedLru<K: Hash + Eq, V> {
    entries: LruCache<K, V>,
    capacity: usize,
}

impl<K: Hash + Eq, V> BoundedLru<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: LruCache::unbounded(),
            capacity: capacity.max(1),
        }
    }

    pub fn get(&mut self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    pub fn put(&mut self, key: K, value: V) {
        self.entries.put(key, value);
        while self.entries.len() > self.capacity {
            self.entries.pop_lru();
        }
    }

    pub fn pop(&mut self, key: &K) -> Option<V> {
        self.entries.pop(key)
    }
}

/// Counters, for statistics and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
}

/// An LRU of clean blocks with a byte budget.
#[derive(Debug)]
pub struct BlockCache {
    blocks: BoundedLru<u64, Arc<Block>>,
    stats: CacheStats,
}

impl BlockCache {
    /// A cache holding at most `budget_bytes` of blocks (at least 16 blocks).
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            blocks: BoundedLru::new((budget_bytes / BLOCK_SIZE).max(16)),
            stats: CacheStats::default(),
        }
    }

    pub fn get(&mut self, block: u64) -> Option<Arc<Block>> {
        let found = self.blocks.get(&block).cloned();
        if found.is_some() {
            self.stats.hits += 1;
        } else {
            self.stats.misses += 1;
        }
        found
    }

    pub fn insert(&mut self, block: u64, data: Arc<Block>) {
        self.blocks.put(block, data);
    }

    pub fn remove(&mut self, block: u64) {
        self.blocks.pop(&block);
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }
}
