//! Block cache: clean metadata blocks, least recently used first out.
//!
//! Layer: above the device, below the journal. Holds only blocks whose contents match
//! what is (or will be, after replay) on the device: the journal keeps the running
//! transaction's dirty blocks itself and hands them back here once written home.

use crate::format::{Block, BLOCK_SIZE};
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Counters, for statistics and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
}

/// An LRU of clean blocks with a byte budget.
#[derive(Debug)]
pub struct BlockCache {
    blocks: LruCache<u64, Arc<Block>>,
    stats: CacheStats,
}

impl BlockCache {
    /// A cache holding at most `budget_bytes` of blocks (at least 16 blocks).
    pub fn new(budget_bytes: usize) -> Self {
        let capacity =
            NonZeroUsize::new((budget_bytes / BLOCK_SIZE).max(16)).unwrap_or(NonZeroUsize::MIN);
        Self {
            blocks: LruCache::new(capacity),
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
