//! The hot-block table, user side: the mount daemon copies the blocks direct chains keep
//! asking for into map values the driver reads in place (`exofs_abi::hot`, docs/DESIGN.md
//! "Direct chains: the hot-block table").
//!
//! Layer: kernel-ext, beside [`crate::binding`], which starts it ([`Binding::serve_hot`]).
//! Interface: [`HotWrites`], the device the daemon's file system writes through, which
//! empties the slot of every block written; [`HotTable`], the slots, their index and
//! the clock that picks the slot to reuse; a filler thread that reads the blocks direct
//! hops noted as wanted and copies them into slots.
//!
//! Invariants:
//! - A slot holds what its block held on the device at some moment after the block's last
//!   write through [`HotWrites`] returned: a write empties the block's slot after the
//!   device accepted it, and a fill reads the block (through the device, which waits for a
//!   queued write of it) and writes the slot under the same lock.
//! - Slots are written under their sequence lock (odd while written); the index is only a
//!   hint (the driver checks the slot's own block).
//! - The table is emptied before the daemon registers, so no slot of a dead daemon's
//!   table is read under a new registration.
//!
//! [`Binding::serve_hot`]: crate::binding::Binding::serve_hot

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use exofs_abi::chain::BLOCK_SIZE;
use exofs_abi::hot::{
    HotBlock, MAP_HOT, MAP_HOT_INDEX, MAP_HOT_WANTED, MAX_HOT_SLOTS, WANTED_SLOTS,
};
use libfs::BlockDevice;

use crate::loader::{LoadError, MapHandle};
use crate::store::Maps;
use crate::sys;

/// How often the filler looks for wanted blocks when the last look found none...
const FILL_INTERVAL: Duration = Duration::from_millis(1);
/// ...and when it found some: direct batches with TABLE_ONLY wait for it.
const BUSY_INTERVAL: Duration = Duration::from_micros(100);
/// Blocks the filler copies in one round at most (the rest wait for the next round).
const FILL_ROUND: usize = 256;
/// Bytes of one slot in the map (array values are 8-byte aligned; this one is already).
const SLOT_BYTES: usize = std::mem::size_of::<HotBlock>();

/// Slots a table of `bytes` bytes of blocks has: at least 1 (a map cannot be empty; a table
/// of one slot is never filled, see [`HotTable::open`]), at most [`MAX_HOT_SLOTS`].
pub fn slots_for(bytes: u64) -> u32 {
    (bytes / BLOCK_SIZE as u64).clamp(1, MAX_HOT_SLOTS as u64) as u32
}

/// A shared read-write mapping of a BPF_F_MMAPABLE array's values.
struct Mapped {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access to it goes through atomics or
// through writes serialised by the table's lock.
unsafe impl Send for Mapped {}
// SAFETY: as above.
unsafe impl Sync for Mapped {}

impl Mapped {
    fn map(map: BorrowedFd<'_>, bytes: usize) -> io::Result<Self> {
        let len = bytes.div_ceil(page_size()) * page_size();
        // SAFETY: a new shared mapping of the map's value area (the kernel refuses a length
        // past it); unmapped once, in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast())
            .ok_or_else(|| io::Error::other("mmap returned a null address"))?;
        Ok(Self { addr, len })
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// The slots, as the daemon sees them (see the module documentation).
pub struct HotTable {
    slots: Mapped,
    slot_count: u32,
    wanted: Mapped,
    /// The driver's maps (the index is `EXOFS_HOT_INDEX` among them).
    maps: Arc<Maps>,
    clock: Mutex<Clock>,
    /// Writes seen so far: a fill whose read may have raced a write is dropped.
    writes: AtomicU64,
}

impl std::fmt::Debug for HotTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotTable")
            .field("slots", &self.slot_count)
            .finish_non_exhaustive()
    }
}

/// Which block each slot holds, and the clock hand.
struct Clock {
    /// Block -> slot.
    slot_of: HashMap<u64, u32>,
    /// Slot -> block + 1 (0: empty).
    held: Vec<u64>,
    hand: u32,
}

impl HotTable {
    /// The table of these maps: the slots array (`EXOFS_HOT`), the wanted words
    /// (`EXOFS_HOT_WANTED`) and the index (`EXOFS_HOT_INDEX`). The slot count is the slots
    /// map's own, as the kernel holds it (a pinned map may have been made by an earlier
    /// daemon with another size).
    pub(crate) fn open(maps: Arc<Maps>) -> Result<Self, LoadError> {
        let map = |name: &str| {
            maps.all
                .get(name)
                .ok_or_else(|| LoadError::Elf(format!("the driver has no map {name}")))
        };
        let (slots, wanted) = (map(MAP_HOT)?, map(MAP_HOT_WANTED)?);
        map(MAP_HOT_INDEX)?;
        let info = sys::map_info(slots.as_fd())?;
        if info.value_size as usize != SLOT_BYTES {
            return Err(LoadError::Elf(format!(
                "the hot-block map holds values of {} bytes, not {SLOT_BYTES}",
                info.value_size
            )));
        }
        let slot_count = info.max_entries.min(MAX_HOT_SLOTS);
        let slots_map = Mapped::map(slots.as_fd(), slot_count as usize * SLOT_BYTES)
            .map_err(|err| LoadError::Elf(format!("mapping the hot-block slots: {err}")))?;
        let wanted_map = Mapped::map(wanted.as_fd(), WANTED_SLOTS as usize * 8)
            .map_err(|err| LoadError::Elf(format!("mapping the wanted blocks: {err}")))?;
        Ok(Self {
            slots: slots_map,
            slot_count,
            wanted: wanted_map,
            maps: maps.clone(),
            clock: Mutex::new(Clock {
                slot_of: HashMap::new(),
                held: vec![0; slot_count as usize],
                hand: 0,
            }),
            writes: AtomicU64::new(0),
        })
    }

    /// Slots in the table.
    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    fn index(&self) -> &MapHandle {
        // Checked in `open`.
        &self.maps.all[MAP_HOT_INDEX]
    }

    fn lock(&self) -> MutexGuard<'_, Clock> {
        self.clock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn slot(&self, slot: u32) -> *mut HotBlock {
        debug_assert!(slot < self.slot_count);
        // SAFETY: inside the mapping: slot < slot_count slots of SLOT_BYTES were mapped.
        unsafe {
            self.slots
                .addr
                .as_ptr()
                .add(slot as usize * SLOT_BYTES)
                .cast()
        }
    }

    fn seq(&self, slot: u32) -> &AtomicU64 {
        // SAFETY: an 8-byte aligned word of the live mapping (slots are 8-byte multiples
        // from a page boundary).
        unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.slot(slot)).seq)) }
    }

    fn used(&self, slot: u32) -> &AtomicU64 {
        // SAFETY: as in `seq`.
        unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.slot(slot)).used)) }
    }

    fn wanted_word(&self, index: u32) -> &AtomicU64 {
        debug_assert!(index < WANTED_SLOTS);
        // SAFETY: WANTED_SLOTS aligned words were mapped.
        unsafe { AtomicU64::from_ptr(self.wanted.addr.as_ptr().cast::<u64>().add(index as usize)) }
    }

    /// Writes `slot` under its sequence lock: it holds `block + 1` (0: empty) and, if
    /// given, these bytes. Called with the clock locked (the only writer).
    fn write_slot(&self, slot: u32, block_plus_one: u64, data: Option<&[u8]>) {
        let seq = self.seq(slot);
        // Odd while written. A slot left odd by a daemon that died mid-write stays odd
        // here and ends even, past any value a reader saw.
        let odd = seq.load(Ordering::Relaxed) | 1;
        seq.store(odd, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let entry = self.slot(slot);
        // SAFETY: the slot lies inside the mapping; the driver only reads it, and checks
        // `seq` around its copy.
        unsafe {
            std::ptr::addr_of_mut!((*entry).block).write_volatile(block_plus_one);
            std::ptr::addr_of_mut!((*entry).used).write_volatile(0);
            if let Some(data) = data {
                let bytes = std::ptr::addr_of_mut!((*entry).data).cast::<u8>();
                std::ptr::copy_nonoverlapping(data.as_ptr(), bytes, data.len().min(BLOCK_SIZE));
            }
        }
        seq.store(odd + 1, Ordering::Release);
    }

    /// Empties the table: every slot's index entry goes and the wanted words are cleared
    /// (the slots themselves are unreachable without their index entries).
    pub fn clear(&self) -> Result<(), LoadError> {
        let mut clock = self.lock();
        for key in self.index().keys::<u64>()? {
            self.index().delete(&key)?;
        }
        for (slot, held) in clock.held.iter_mut().enumerate() {
            if *held != 0 {
                self.write_slot(slot as u32, 0, None);
                *held = 0;
            }
        }
        clock.slot_of.clear();
        for word in 0..WANTED_SLOTS {
            self.wanted_word(word).store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Blocks `[offset, offset + len)` of the device were written: their slots are
    /// emptied.
    pub fn invalidate(&self, offset: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        // Before the lock: a fill that started reading before this write returned sees
        // the count move and drops what it read.
        self.writes.fetch_add(1, Ordering::SeqCst);
        let first = offset / BLOCK_SIZE as u64;
        let last = offset.saturating_add(len - 1) / BLOCK_SIZE as u64;
        let mut clock = self.lock();
        if clock.slot_of.is_empty() {
            return 0;
        }
        let blocks: Vec<u64> = if last - first >= clock.slot_of.len() as u64 {
            clock
                .slot_of
                .keys()
                .copied()
                .filter(|block| (first..=last).contains(block))
                .collect()
        } else {
            (first..=last)
                .filter(|block| clock.slot_of.contains_key(block))
                .collect()
        };
        for block in &blocks {
            if let Some(slot) = clock.slot_of.remove(block) {
                // The slot's own block is what the driver trusts: emptying it is the
                // invalidation; the index entry is only a hint.
                self.write_slot(slot, 0, None);
                clock.held[slot as usize] = 0;
                if let Err(err) = self.index().delete(block) {
                    log::warn!("hot-block index: removing block {block}: {err}");
                }
            }
        }
        blocks.len() as u64
    }

    /// Copies the blocks direct hops noted as wanted into slots (up to [`FILL_ROUND`]),
    /// reading them from `device`. Returns how many blocks were wanted.
    ///
    /// The reads of a round are started together (POSIX_FADV_WILLNEED on the device's
    /// descriptor, exactly each block) before the first is waited for, so that their
    /// waits overlap: a direct batch that stopped at its lookups' misses (TABLE_ONLY)
    /// resumes into reads already under way.
    ///
    /// Reads happen outside the table's lock, so that a slow read never holds up the
    /// writes (each write takes the lock to empty slots). A block is written into its
    /// slot only if no write at all returned since before its read began: otherwise the
    /// read may hold bytes older than that write, and the block waits to be wanted again.
    pub fn fill(&self, device: &dyn BlockDevice) -> u64 {
        if self.slot_count < 2 {
            return 0;
        }
        let mut blocks = Vec::new();
        for word in 0..WANTED_SLOTS {
            if blocks.len() >= FILL_ROUND {
                break;
            }
            let word = self.wanted_word(word);
            if word.load(Ordering::Relaxed) != 0 {
                let value = word.swap(0, Ordering::AcqRel);
                if value != 0 {
                    blocks.push(value - 1);
                }
            }
        }
        if blocks.is_empty() {
            return 0;
        }
        let wanted = blocks.len() as u64;
        let device_blocks = device.size() / BLOCK_SIZE as u64;
        {
            let clock = self.lock();
            blocks.retain(|block| *block < device_blocks && !clock.slot_of.contains_key(block));
        }
        if let Some(fd) = device.raw_fd() {
            for block in &blocks {
                // SAFETY: advice on a descriptor the device owns; no memory is passed.
                unsafe {
                    libc::posix_fadvise(
                        fd,
                        (block * BLOCK_SIZE as u64) as libc::off_t,
                        BLOCK_SIZE as libc::off_t,
                        libc::POSIX_FADV_WILLNEED,
                    )
                };
            }
        }
        let mut buf = vec![0u8; BLOCK_SIZE];
        for block in blocks {
            if block >= device_blocks || self.lock().slot_of.contains_key(&block) {
                continue;
            }
            let writes = self.writes.load(Ordering::SeqCst);
            // Waits for a queued write-behind of the block (FileDevice::read_at).
            if let Err(err) = device.read_at(&mut buf, block * BLOCK_SIZE as u64) {
                log::warn!("hot-block table: reading block {block}: {err}");
                continue;
            }
            let mut clock = self.lock();
            // A write that returns after this check empties the slot after this fill:
            // its emptying needs the lock.
            if self.writes.load(Ordering::SeqCst) != writes || clock.slot_of.contains_key(&block) {
                continue;
            }
            let slot = self.victim(&mut clock);
            self.write_slot(slot, block + 1, Some(&buf));
            clock.held[slot as usize] = block + 1;
            clock.slot_of.insert(block, slot);
            if let Err(err) = self.index().set(&block, &slot, sys::BPF_ANY) {
                log::warn!("hot-block index: adding block {block}: {err}");
            }
        }
        wanted
    }

    /// The slot to fill next: an empty one, or the first the clock hand finds unused
    /// since it last passed (its block leaves the table).
    fn victim(&self, clock: &mut Clock) -> u32 {
        for _ in 0..2 * self.slot_count as u64 + 1 {
            let slot = clock.hand;
            clock.hand = (clock.hand + 1) % self.slot_count;
            let held = clock.held[slot as usize];
            if held == 0 {
                return slot;
            }
            if self.used(slot).swap(0, Ordering::Relaxed) != 0 {
                continue;
            }
            self.evict(clock, slot, held - 1);
            return slot;
        }
        // Every slot was used again while the hand went round twice: take the next.
        let slot = clock.hand;
        clock.hand = (clock.hand + 1) % self.slot_count;
        let held = clock.held[slot as usize];
        if held != 0 {
            self.evict(clock, slot, held - 1);
        }
        slot
    }

    fn evict(&self, clock: &mut Clock, slot: u32, block: u64) {
        clock.slot_of.remove(&block);
        clock.held[slot as usize] = 0;
        self.write_slot(slot, 0, None);
        if let Err(err) = self.index().delete(&block) {
            log::warn!("hot-block index: removing block {block}: {err}");
        }
    }

    /// Blocks held now.
    pub fn held(&self) -> u64 {
        self.lock().slot_of.len() as u64
    }
}

/// The device the mount daemon's file system writes through: every write empties the
/// slots of the blocks it wrote, once the device has accepted it. Reads and everything
/// else go to the device it wraps.
pub struct HotWrites {
    inner: Arc<dyn BlockDevice>,
    table: OnceLock<Arc<HotTable>>,
}

impl std::fmt::Debug for HotWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotWrites")
            .field("inner", &self.inner)
            .field("table", &self.table.get())
            .finish()
    }
}

impl HotWrites {
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        Self {
            inner,
            table: OnceLock::new(),
        }
    }

    /// From now on, writes empty `table`'s slots. One table per device.
    pub(crate) fn attach(&self, table: Arc<HotTable>) -> Result<(), Arc<HotTable>> {
        self.table.set(table)
    }
}

impl BlockDevice for HotWrites {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let result = self.inner.write_at(buf, offset);
        // Even after a failed write: part of it may have reached the device.
        if let Some(table) = self.table.get() {
            table.invalidate(offset, buf.len() as u64);
        }
        result
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn raw_fd(&self) -> Option<RawFd> {
        self.inner.raw_fd()
    }
    fn settle(&self) -> io::Result<()> {
        self.inner.settle()
    }
}

/// The thread that fills a table every [`FILL_INTERVAL`]; stopped and joined on drop.
pub(crate) struct Filler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Filler {
    pub(crate) fn start(table: Arc<HotTable>, device: Arc<dyn BlockDevice>) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("exofs-hot".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    let busy = table.fill(&*device) > 0;
                    std::thread::sleep(if busy { BUSY_INTERVAL } else { FILL_INTERVAL });
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
