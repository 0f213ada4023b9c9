//! An io_uring whose reads land in buffers the caller owns, made safe to drop.
//!
//! Layer: a helper of the binding (pipelined batches) and of the benchmarks' walks.
//! Interface: [`Ring::push`] (unsafe: the buffer must outlive the read), [`Ring::wait`].
//!
//! Invariant: dropping a `Ring` waits for every operation still in flight. Closing an
//! io_uring does not cancel a buffered read already under way, whose completion may
//! still copy into its buffer later; so a caller declares its buffers BEFORE the ring
//! (locals drop in reverse order) and an early return on an error can never free a
//! buffer the kernel is writing into. Interrupted waits (EINTR) are retried.

use io_uring::squeue::Entry;
use io_uring::IoUring;

/// An io_uring that counts what is in flight and waits for it on drop.
pub struct Ring {
    ring: IoUring,
    in_flight: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ring({} in flight)", self.in_flight)
    }
}

impl Ring {
    /// A ring of `entries` submission entries (rounded up to a power of two).
    pub fn new(entries: usize) -> std::io::Result<Self> {
        let entries = entries.clamp(1, 4096).next_power_of_two() as u32;
        Ok(Self {
            ring: IoUring::new(entries)?,
            in_flight: 0,
        })
    }

    /// Queues `entry` (submitted by the next [`Ring::wait`]).
    ///
    /// # Safety
    /// Every buffer `entry` names must stay valid and untouched until its completion is
    /// returned by `wait`, or until this ring is dropped (which waits for it).
    pub unsafe fn push(&mut self, entry: &Entry) -> std::io::Result<()> {
        // SAFETY: the caller keeps the buffers alive as this function requires.
        unsafe { self.ring.submission().push(entry) }
            .map_err(|_| std::io::Error::other("the io_uring submission queue is full"))?;
        self.in_flight += 1;
        Ok(())
    }

    /// Submits what was pushed, waits until at least `want` operations have completed
    /// (0: only takes what is already done), and returns each completion's user data and
    /// result.
    pub fn wait(&mut self, want: usize) -> std::io::Result<Vec<(u64, i32)>> {
        loop {
            match self.ring.submit_and_wait(want.min(self.in_flight)) {
                Ok(_) => break,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        }
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        self.in_flight -= done.len().min(self.in_flight);
        Ok(done)
    }

    /// Operations pushed and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if let Err(err) = self.wait(1) {
                // Returning would free buffers the kernel may still write into.
                eprintln!("exofs: cannot wait for io_uring reads in flight ({err}); aborting");
                std::process::abort();
            }
        }
    }
}
