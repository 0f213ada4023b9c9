//! The hot-block table: copies of device blocks that direct chains read without going
//! through the mount daemon's memory (docs/DESIGN.md "Direct chains: the hot-block table").
//!
//! A direct hop's other way to its block, `bpf_copy_from_user_task` on the daemon's
//! mapping, walks the daemon's page tables and takes a page reference for every copy:
//! about 0.43 µs of the 0.98 µs a warm hop costs. A table slot is a map value the driver
//! reads in place.
//!
//! - [`MAP_HOT`]: an mmapable array of [`HotBlock`] slots, written by the daemon alone
//!   (through its mapping of the map; the map is pinned in a root-only directory).
//! - [`MAP_HOT_INDEX`]: device block number -> slot, written by the daemon alone. It is a
//!   hint: the driver trusts a slot only if the slot itself names the block and its
//!   sequence number did not move during the copy.
//! - [`MAP_HOT_WANTED`]: an mmapable array of [`WANTED_SLOTS`] words. A direct hop that
//!   finds no slot for its block writes `block + 1` at `block % WANTED_SLOTS`; the daemon
//!   reads the array, clears what it read and copies those blocks into slots. It is a
//!   lossy hint: a word overwritten before the daemon saw it costs a later miss, nothing
//!   else.
//!
//! The daemon writes a slot as a sequence lock: `seq` odd, then `block` and `data`, then
//! `seq` even and larger. The driver copies only from a slot whose `seq` is even, equal
//! before and after the copy, and whose `block` is the one it translated.

/// Name of the slots map.
pub const MAP_HOT: &str = "EXOFS_HOT";
/// Name of the index map.
pub const MAP_HOT_INDEX: &str = "EXOFS_HOT_INDEX";
/// Name of the wanted-blocks map.
pub const MAP_HOT_WANTED: &str = "EXOFS_HOT_WANTED";
/// Words in the wanted-blocks map.
pub const WANTED_SLOTS: u32 = 4096;
/// Entries the index holds at most (slots beyond it are never filled).
pub const MAX_HOT_SLOTS: u32 = 1 << 20;

/// One slot of the table.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HotBlock {
    /// Sequence lock: odd while the daemon writes the slot.
    pub seq: u64,
    /// The device block held, plus one; 0 for an empty slot.
    pub block: u64,
    /// Set by the driver when it uses the slot; cleared by the daemon's clock hand.
    pub used: u64,
    pub _pad: u64,
    /// The block's bytes.
    pub data: [u8; crate::chain::BLOCK_SIZE],
}

const _: () = assert!(core::mem::size_of::<HotBlock>() == 32 + crate::chain::BLOCK_SIZE);
