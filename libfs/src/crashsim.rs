//! Crash simulation: a [`BlockDevice`] in memory that records every write and sync, and
//! builds the images a power failure could leave behind.
//!
//! Model of the disk: a write is volatile until a `sync` (fdatasync) returns; then every
//! write issued before the sync is durable. Writes issued since the last sync may reach
//! the media in any order, or not at all, and the last one in flight may be torn. The
//! smallest unit that is written atomically is a 512-byte sector: a write lands whole
//! sectors, never part of one.
//!
//! [`RecordingDevice`] keeps:
//!   - the *base* image: the contents when recording started (taken as durable), e.g. a
//!     freshly formatted file system;
//!   - every write since then (offset and bytes), numbered from 0 in issue order;
//!   - the trace of [`Event`]s: `Write` and `Sync`, in order;
//!   - the *current* contents, which reads see (every write applied).
//!
//! [`RecordingDevice::crash_image_at`] builds the image after a power failure right after
//! the N-th write was issued (and before anything that followed it, syncs included):
//! the durable state as of the last sync before that write (the base plus every write
//! the sync covered), plus a choice ([`Reorder`]) of the writes issued since that sync:
//! all of them in order (a clean cut), a seeded random subset of whole writes, or a
//! seeded random subset of their 512-byte sectors; and optionally the N-th write torn to
//! a prefix of its sectors. Durable states are computed lazily by replaying the trace
//! from the base; the last one computed is kept, so walking the cut points in increasing
//! order costs one copy of the image per crash image plus the replay of each write once.
//!
//! ```
//! use libfs::crashsim::{Crash, RecordingDevice, Reorder};
//! use libfs::BlockDevice;
//! let device = RecordingDevice::new(1 << 20, 0xEE);
//! device.write_at(&[1; 4096], 0)?;
//! device.sync()?;
//! device.write_at(&[2; 4096], 0)?;
//! let crashed = device.crash_image_at(&Crash::clean(2));
//! assert_eq!(crashed[0], 2);
//! let dropped = device.crash_image_at(&Crash {
//!     writes: 2,
//!     reorder: Reorder::InOrder,
//!     torn_last: Some(0),
//! });
//! assert_eq!(dropped[0], 1);
//! # Ok::<(), std::io::Error>(())
//! ```

use crate::device::{check_range, BlockDevice};
use std::io;
use std::sync::{Mutex, MutexGuard};

/// Size of the unit a disk writes atomically.
pub const SECTOR_SIZE: usize = 512;

/// One entry of the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The write numbered `index` (0-based, in issue order) of `len` bytes at `offset`.
    Write {
        offset: u64,
        len: usize,
        index: usize,
    },
    /// A sync: every earlier write is durable.
    Sync,
}

/// Which of the writes issued since the last sync reach the media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reorder {
    /// All of them, in issue order.
    InOrder,
    /// Each write lands whole or not at all, chosen by a generator seeded with `seed`
    /// (the landing ones are applied in issue order, so a later write to the same place
    /// wins).
    DropWrites { seed: u64 },
    /// Each 512-byte sector of each write lands or not, chosen independently by a
    /// generator seeded with `seed`.
    DropSectors { seed: u64 },
}

/// A simulated power failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crash {
    /// The failure comes right after this many writes were issued (0 ..= write count),
    /// before any later event (a sync right after the last of them did not happen).
    pub writes: usize,
    /// Which unsynced writes land.
    pub reorder: Reorder,
    /// If set, the last issued write (number `writes - 1`) is torn, whatever `reorder`
    /// chose for it: only its first `n` sectors land (`n` is clamped below its sector
    /// count, so at least one sector is missing).
    pub torn_last: Option<usize>,
}

impl Crash {
    /// A clean cut after `writes` writes: every issued write lands, in order.
    pub fn clean(writes: usize) -> Self {
        Self {
            writes,
            reorder: Reorder::InOrder,
            torn_last: None,
        }
    }
}

/// A recorded write.
struct Written {
    offset: u64,
    data: Vec<u8>,
}

struct State {
    /// What reads see.
    current: Vec<u8>,
    /// Durable contents when recording started.
    base: Vec<u8>,
    /// Every write since recording started.
    writes: Vec<Written>,
    events: Vec<Event>,
    /// For each sync, the number of writes issued before it (nondecreasing).
    syncs: Vec<usize>,
    /// The durable image after the first `.0` writes (a sync point), kept to replay from.
    cached: Option<(usize, Vec<u8>)>,
}

/// An in-memory device that records writes and syncs to build crash images (see the
/// module header).
pub struct RecordingDevice {
    state: Mutex<State>,
    size: u64,
}

impl std::fmt::Debug for RecordingDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("RecordingDevice")
            .field("size", &self.size)
            .field("writes", &state.writes.len())
            .field("syncs", &state.syncs.len())
            .finish()
    }
}

/// SplitMix64: a small deterministic generator for the seeded choices.
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

fn sectors_of(len: usize) -> usize {
    len.div_ceil(SECTOR_SIZE)
}

fn apply(image: &mut [u8], write: &Written) {
    let start = write.offset as usize;
    image[start..start + write.data.len()].copy_from_slice(&write.data);
}

fn apply_sector(image: &mut [u8], write: &Written, sector: usize) {
    let from = sector * SECTOR_SIZE;
    let to = (from + SECTOR_SIZE).min(write.data.len());
    let start = write.offset as usize + from;
    image[start..start + (to - from)].copy_from_slice(&write.data[from..to]);
}

impl RecordingDevice {
    /// A device of `size` bytes, every byte `fill`, recording from now on.
    pub fn new(size: u64, fill: u8) -> Self {
        Self::from_image(vec![fill; size as usize])
    }

    /// A device holding `image`, recording from now on.
    pub fn from_image(image: Vec<u8>) -> Self {
        let size = image.len() as u64;
        Self {
            state: Mutex::new(State {
                base: image.clone(),
                current: image,
                writes: Vec::new(),
                events: Vec::new(),
                syncs: Vec::new(),
                cached: None,
            }),
            size,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets the trace and takes the current contents as the durable base (call it
    /// after a setup phase such as `format`, which ends with a sync).
    pub fn restart_recording(&self) {
        let mut state = self.lock();
        state.base = state.current.clone();
        state.writes.clear();
        state.events.clear();
        state.syncs.clear();
        state.cached = None;
    }

    /// Writes issued since recording started.
    pub fn write_count(&self) -> usize {
        self.lock().writes.len()
    }

    /// Events (writes and syncs) since recording started.
    pub fn event_count(&self) -> usize {
        self.lock().events.len()
    }

    /// The trace since recording started.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// Position in the trace of write number `index` (0-based).
    pub fn event_index_of_write(&self, index: usize) -> Option<usize> {
        let state = self.lock();
        // Writes and events are both in issue order: search for the write's event.
        let mut seen = 0;
        for (at, event) in state.events.iter().enumerate() {
            if let Event::Write { .. } = event {
                if seen == index {
                    return Some(at);
                }
                seen += 1;
            }
        }
        None
    }

    /// Offset and length of write number `index`.
    pub fn write_info(&self, index: usize) -> Option<(u64, usize)> {
        self.lock()
            .writes
            .get(index)
            .map(|w| (w.offset, w.data.len()))
    }

    /// Number of the writes made durable before the failure after `writes` writes: the
    /// writes issued before the last sync that precedes write number `writes - 1`.
    pub fn durable_writes_at(&self, writes: usize) -> usize {
        durable_before(&self.lock().syncs, writes)
    }

    /// The contents reads see now (every write applied).
    pub fn current_image(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// The contents as of the last sync (what survives a failure that drops every
    /// unsynced write).
    pub fn durable_image(&self) -> Vec<u8> {
        let mut state = self.lock();
        let count = state.syncs.last().copied().unwrap_or(0);
        state.durable(count).clone()
    }

    /// The image a power failure described by `crash` leaves (see the module header).
    ///
    /// Panics if `crash.writes` exceeds the number of writes issued.
    pub fn crash_image_at(&self, crash: &Crash) -> Vec<u8> {
        let mut state = self.lock();
        assert!(
            crash.writes <= state.writes.len(),
            "crash after write {} of {}",
            crash.writes,
            state.writes.len()
        );
        let durable = durable_before(&state.syncs, crash.writes);
        let mut image = state.durable(durable).clone();
        let unsynced = &state.writes[durable..crash.writes];
        let torn = crash.torn_last.is_some() && !unsynced.is_empty();
        let whole = if torn {
            &unsynced[..unsynced.len() - 1]
        } else {
            unsynced
        };
        match crash.reorder {
            Reorder::InOrder => whole.iter().for_each(|w| apply(&mut image, w)),
            Reorder::DropWrites { seed } => {
                let mut rng = SplitMix(seed);
                for write in whole {
                    if rng.coin() {
                        apply(&mut image, write);
                    }
                }
            }
            Reorder::DropSectors { seed } => {
                let mut rng = SplitMix(seed);
                for write in whole {
                    for sector in 0..sectors_of(write.data.len()) {
                        if rng.coin() {
                            apply_sector(&mut image, write, sector);
                        }
                    }
                }
            }
        }
        if let (true, Some(keep), Some(last)) = (torn, crash.torn_last, unsynced.last()) {
            let keep = keep.min(sectors_of(last.data.len()).saturating_sub(1));
            for sector in 0..keep {
                apply_sector(&mut image, last, sector);
            }
        }
        image
    }
}

/// Writes covered by the last sync issued before write number `writes - 1`.
fn durable_before(syncs: &[usize], writes: usize) -> usize {
    // A sync that followed `k` writes precedes write number `k`; it precedes the failure
    // iff k < writes (k == writes: the sync came after the last issued write).
    let covered = syncs.partition_point(|k| *k < writes);
    if covered == 0 {
        0
    } else {
        syncs[covered - 1]
    }
}

impl State {
    /// The durable image after the first `count` writes.
    fn durable(&mut self, count: usize) -> &Vec<u8> {
        let reuse = matches!(&self.cached, Some((at, _)) if *at <= count);
        if !reuse {
            self.cached = Some((0, self.base.clone()));
        }
        let writes = &self.writes;
        let Some((at, image)) = self.cached.as_mut() else {
            unreachable!("cache filled above");
        };
        for write in &writes[*at..count] {
            apply(image, write);
        }
        *at = count;
        image
    }
}

impl BlockDevice for RecordingDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.lock();
        let start = check_range(offset, buf.len(), self.size)?;
        buf.copy_from_slice(&state.current[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.lock();
        let start = check_range(offset, buf.len(), self.size)?;
        state.current[start..start + buf.len()].copy_from_slice(buf);
        let index = state.writes.len();
        state.writes.push(Written {
            offset,
            data: buf.to_vec(),
        });
        state.events.push(Event::Write {
            offset,
            len: buf.len(),
            index,
        });
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut state = self.lock();
        let count = state.writes.len();
        state.syncs.push(count);
        state.events.push(Event::Sync);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_state_follows_syncs() {
        let device = RecordingDevice::new(8192, 0xEE);
        device.write_at(&[1; 4096], 0).expect("write");
        device.sync().expect("sync");
        device.write_at(&[2; 4096], 4096).expect("write");
        device.write_at(&[3; 1024], 0).expect("write");
        device.sync().expect("sync");
        device.write_at(&[4; 4096], 0).expect("write");

        assert_eq!(device.durable_writes_at(0), 0);
        assert_eq!(device.durable_writes_at(1), 0);
        assert_eq!(device.durable_writes_at(2), 1);
        assert_eq!(device.durable_writes_at(3), 1);
        assert_eq!(device.durable_writes_at(4), 3);

        let image = device.crash_image_at(&Crash::clean(0));
        assert!(image.iter().all(|b| *b == 0xEE));
        let image = device.crash_image_at(&Crash::clean(3));
        assert_eq!(&image[..1024], &[3; 1024]);
        assert_eq!(&image[1024..4096], &[1; 3072]);
        assert_eq!(&image[4096..], &[2; 4096]);
        // Torn to zero sectors: write 3 (index 2) does not land; write 2 may or may not.
        let torn = device.crash_image_at(&Crash {
            writes: 3,
            reorder: Reorder::InOrder,
            torn_last: Some(0),
        });
        assert_eq!(&torn[..4096], &[1; 4096]);
        assert_eq!(&torn[4096..], &[2; 4096]);
        let torn = device.crash_image_at(&Crash {
            writes: 4,
            reorder: Reorder::InOrder,
            torn_last: Some(3),
        });
        assert_eq!(&torn[..1536], &[4; 1536]);
        assert_eq!(&torn[1536..4096], &[1; 2560]);
        // Going back to an earlier cut rebuilds from the base.
        let image = device.crash_image_at(&Crash::clean(1));
        assert_eq!(&image[..4096], &[1; 4096]);
        assert_eq!(
            device.durable_image(),
            device.crash_image_at(&Crash::clean(3))
        );
    }

    #[test]
    fn dropped_writes_and_sectors_only_come_from_unsynced_writes() {
        let device = RecordingDevice::new(16384, 0);
        device.write_at(&[1; 16384], 0).expect("write");
        device.sync().expect("sync");
        device.write_at(&[2; 8192], 0).expect("write");
        device.write_at(&[3; 8192], 8192).expect("write");
        for seed in 0..32 {
            for reorder in [Reorder::DropWrites { seed }, Reorder::DropSectors { seed }] {
                let image = device.crash_image_at(&Crash {
                    writes: 3,
                    reorder,
                    torn_last: None,
                });
                for (i, sector) in image.chunks(SECTOR_SIZE).enumerate() {
                    let first = sector[0];
                    assert!(sector.iter().all(|b| *b == first), "sector torn");
                    let new = if i < 16 { 2 } else { 3 };
                    assert!(first == 1 || first == new);
                }
            }
        }
    }
}
