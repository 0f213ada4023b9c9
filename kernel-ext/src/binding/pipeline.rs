//! Pipelined batches: many lookups in flight, their misses read as they come.
//!
//! Layer: kernel-ext's binding, beside `Binding::run_batch`. Interface:
//! [`Binding::run_pipelined`]. Out of core, `run_batch`'s rounds are barriers: a round
//! waits for the slowest of its misses before any of its lookups goes on. Here each
//! lookup goes on as soon as its own block is in:
//!
//! 1. Up to `window` lookups are in flight. Lookups ready to run go to the kernel in
//!    calls of up to MAX_BATCH, without faulting (NO_FAULT): each ends DONE (or
//!    another final status) or MISSING with the device offset of the block it lacks.
//! 2. A missing block is read with io_uring into a scratch buffer (a buffered 4 KiB read
//!    on the POSIX_FADV_RANDOM descriptor: the block lands in the device's page cache, and
//!    only it). Lookups that miss a block already being read wait for it.
//! 3. As each read completes, its lookups are ready again. Each resumes at the hop that
//!    missed (the driver handed back where), allowed to wait for that block: its page is
//!    in the cache, so the copy maps it in with a minor fault.
//!
//! Safety is the driver's, as for every chain: user space only chooses which blocks to
//! bring into memory and when to ask again. Coherence too: the reads go through the same
//! page cache that libfs writes and chains read.

use super::{BatchCounters, BatchItem, BatchOutcome, BatchRequest, Binding, BindingError};
use super::{Cursor, Result, MAX_ATTEMPTS, MAX_MISSES};
use crate::ring::Ring;
use crate::store::BoundProgram;
use exofs_abi::chain::{status, MAX_BATCH};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One lookup of a pipelined run.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    started: Instant,
    stale_attempts: u32,
    misses: u32,
    cursor: Cursor,
}

/// A block being read, and the lookups waiting for it.
struct Read {
    block: u64,
    waiting: Vec<usize>,
    buffer: Box<[u8; libfs::BLOCK_SIZE]>,
}

impl Binding {
    /// Runs `items` with up to `window` lookups in flight (see the module header).
    /// Returns each item's outcome and latency (from its first call to its end), in the
    /// order of `items`, and the run's counters. `request.overlap_misses` is implied.
    pub fn run_pipelined(
        &self,
        program: &BoundProgram,
        request: &BatchRequest,
        items: &[BatchItem],
        window: usize,
    ) -> Result<(Vec<(BatchOutcome, Duration)>, BatchCounters)> {
        let request = BatchRequest {
            overlap_misses: true,
            ..request.clone()
        };
        let window = window.clamp(1, 4096);
        let fd = self
            .mapping
            .fetch_fd()
            .ok_or_else(|| BindingError::Invalid("the mapping reads nothing in".into()))?;
        // Reads in flight by slot (the io_uring user data), and slots by block. Declared
        // before the ring: dropping the ring waits for the reads into these buffers.
        let mut reads: Vec<Option<Read>> = Vec::new();
        let mut reading: HashMap<u64, usize> = HashMap::new();
        let mut ring =
            Ring::new(window).map_err(|err| BindingError::Invalid(format!("io_uring: {err}")))?;
        let mut results: Vec<Option<(BatchOutcome, Duration)>> = vec![None; items.len()];
        let mut counters = BatchCounters::default();
        let mut flights: HashMap<usize, InFlight> = HashMap::new();
        let mut ready: Vec<usize> = Vec::new();
        let mut next = 0;
        self.settle()?;
        loop {
            while flights.len() < window && next < items.len() {
                flights.insert(
                    next,
                    InFlight {
                        started: Instant::now(),
                        stale_attempts: 0,
                        misses: 0,
                        cursor: Cursor::from(&items[next]),
                    },
                );
                ready.push(next);
                next += 1;
            }
            if !ready.is_empty() {
                let files = self.register_all(&request.files)?;
                let mut stale = false;
                for group in std::mem::take(&mut ready).chunks(MAX_BATCH) {
                    let lookups = group
                        .iter()
                        .map(|i| {
                            flights
                                .get(i)
                                .map(|flight| flight.cursor.over(&files, &items[*i]))
                        })
                        .collect::<Option<Vec<Cursor>>>()
                        .ok_or_else(|| {
                            BindingError::Invalid("a lookup left the pipeline".into())
                        })?;
                    let called = self.call_batch(program, &request, &files, &lookups)?;
                    counters.calls += 1;
                    for (index, lookup) in group.iter().zip(called) {
                        match lookup.outcome.status {
                            status::MISSING => {
                                let flight = flights.get_mut(index).ok_or_else(|| {
                                    BindingError::Invalid("a lookup left the pipeline".into())
                                })?;
                                flight.misses += 1;
                                if flight.misses > MAX_MISSES {
                                    end(&mut flights, &mut results, items, *index, lookup.outcome);
                                    continue;
                                }
                                flight.cursor = lookup.resume;
                                let block = lookup.missing / libfs::BLOCK_SIZE as u64
                                    * libfs::BLOCK_SIZE as u64;
                                if let Some(slot) = reading.get(&block) {
                                    if let Some(read) = reads[*slot].as_mut() {
                                        read.waiting.push(*index);
                                    }
                                    continue;
                                }
                                let slot =
                                    reads.iter().position(Option::is_none).unwrap_or_else(|| {
                                        reads.push(None);
                                        reads.len() - 1
                                    });
                                let mut read = Read {
                                    block,
                                    waiting: vec![*index],
                                    buffer: Box::new([0; libfs::BLOCK_SIZE]),
                                };
                                let entry = io_uring::opcode::Read::new(
                                    io_uring::types::Fd(fd),
                                    read.buffer.as_mut_ptr(),
                                    libfs::BLOCK_SIZE as u32,
                                )
                                .offset(block)
                                .build()
                                .user_data(slot as u64);
                                // SAFETY: the buffer is boxed and stays in `reads[slot]`
                                // until this read's completion is taken below; `reads`
                                // outlives the ring, which waits for it on drop.
                                unsafe { ring.push(&entry) }.map_err(|err| {
                                    BindingError::Invalid(format!("io_uring push: {err}"))
                                })?;
                                reads[slot] = Some(read);
                                reading.insert(block, slot);
                                counters.prefetched += 1;
                            }
                            status::STALE | status::NOT_REGISTERED => {
                                let flight = flights.get_mut(index).ok_or_else(|| {
                                    BindingError::Invalid("a lookup left the pipeline".into())
                                })?;
                                flight.stale_attempts += 1;
                                counters.retries += 1;
                                if flight.stale_attempts >= MAX_ATTEMPTS {
                                    end(&mut flights, &mut results, items, *index, lookup.outcome);
                                } else {
                                    stale = true;
                                    flight.cursor = Cursor::from(&items[*index]);
                                    ready.push(*index);
                                }
                            }
                            _ => end(&mut flights, &mut results, items, *index, lookup.outcome),
                        }
                    }
                }
                if stale {
                    self.publish_again(&request.files);
                }
            }
            if flights.is_empty() && next == items.len() {
                break;
            }
            if ready.is_empty() && reading.is_empty() {
                // Every lookup in flight ended: start new ones.
                if next < items.len() && flights.is_empty() {
                    continue;
                }
                return Err(BindingError::Invalid(
                    "lookups in flight wait for no read".into(),
                ));
            }
            // Nothing ready: wait for at least one read; otherwise only take what is done.
            let wait = usize::from(ready.is_empty());
            let completed = ring
                .wait(wait)
                .map_err(|err| BindingError::Invalid(format!("io_uring: {err}")))?;
            for (slot, result) in completed {
                let read = reads
                    .get_mut(slot as usize)
                    .and_then(Option::take)
                    .ok_or_else(|| BindingError::Invalid("a read nobody made".into()))?;
                reading.remove(&read.block);
                if result < 0 {
                    return Err(BindingError::Invalid(format!(
                        "reading the device at byte {}: {}",
                        read.block,
                        std::io::Error::from_raw_os_error(-result)
                    )));
                }
                ready.extend(read.waiting);
            }
        }
        let outcomes = results
            .into_iter()
            .map(|result| {
                result.ok_or_else(|| BindingError::Invalid("a lookup never ended".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((outcomes, counters))
    }
}

/// Ends lookup `index` of a pipelined run with `outcome`, timed from its first call. A
/// lookup that did not end DONE hands back its item's scratch, not the state of a
/// resumed walk.
fn end(
    flights: &mut HashMap<usize, InFlight>,
    results: &mut [Option<(BatchOutcome, Duration)>],
    items: &[BatchItem],
    index: usize,
    mut outcome: BatchOutcome,
) {
    let latency = flights
        .remove(&index)
        .map_or(Duration::ZERO, |flight| flight.started.elapsed());
    if outcome.status != status::DONE {
        outcome.scratch = items[index].scratch;
    }
    results[index] = Some((outcome, latency));
}
