//! Chained lookups from a [`crate::File`]: the hook through which a linked (privileged)
//! application runs in-kernel chains over one of its files.
//!
//! libfs does not load BPF itself: kernel-ext's binding implements [`ChainProgram`] for a
//! program bound into its driver, and `File::chain` hands it the file. The trait keeps
//! libfs free of any BPF dependency (kernel-ext depends on libfs, not the reverse).

use crate::error::Result;

/// What a chain returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainResult {
    /// The driver's status (`exofs_abi::chain::status`: 0 is DONE).
    pub status: i32,
    /// Hops taken.
    pub hops: u32,
}

/// One lookup of a batch: where it starts and its scratch (in and out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLookup {
    pub start: u64,
    pub scratch: Vec<u8>,
}

/// A program that runs chained lookups over a file of this file system.
pub trait ChainProgram {
    /// Runs one chain over `ino` from byte `start`; `scratch` goes in and, when the chain
    /// is done, comes back as the program left it.
    fn chain(&self, ino: u64, start: u64, scratch: &mut [u8]) -> Result<ChainResult>;

    /// Runs independent lookups over `ino` in as few kernel calls as the program allows.
    fn chain_batch(&self, ino: u64, lookups: &mut [ChainLookup]) -> Result<Vec<ChainResult>>;
}
