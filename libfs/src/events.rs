//! Extent-change notifications for the kernel binding.
//!
//! Every operation that maps or unmaps blocks of a file reports an [`ExtentChange`] to
//! each subscribed [`ExtentListener`] when the operation completes, before `Fs` returns
//! to its caller. Changes that can free or move blocks (truncate, punch, delete,
//! relocate) first bump the file's generation; the freed blocks are not reused before a
//! checkpoint and before every epoch pin older than the change is dropped (see
//! `alloc::Epochs`), so a subscriber that updates its copy of the map in the callback and
//! pins epochs around its reads never reads a block after it was given to another file.

use crate::inode::Extent;

/// What happened to a file's extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// Blocks were mapped inside the file (a hole filled, or fallocate).
    Allocate,
    /// Blocks were mapped at or past the old end of the file.
    Extend,
    /// Blocks past a new, smaller size were unmapped.
    Truncate,
    /// A hole was punched.
    Punch,
    /// The file was deleted (all its blocks unmapped).
    Delete,
    /// Blocks moved to other device blocks (defragmentation).
    Relocate,
}

/// One change to a file's extent map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentChange {
    pub ino: u64,
    /// The file's generation after the change.
    pub generation: u64,
    pub kind: ChangeKind,
    /// Extents mapped (Allocate, Extend, Relocate: the new places) or unmapped (Truncate,
    /// Punch, Delete, Relocate: the old places, listed in `old`).
    pub extents: Vec<Extent>,
    /// Relocate only: where the blocks were before.
    pub old: Vec<Extent>,
}

/// Receives extent changes. Called with the file system locked: it must not call back
/// into the `Fs`.
pub trait ExtentListener: Send + Sync {
    fn extents_changed(&self, change: &ExtentChange);
}
