//! File-system layer, the operation wrapper: the lock, the all-or-nothing rule, commit
//! points, and what a panic under the lock leads to.
//!
//! Interface (to the rest of `fs`): `Fs::modify` (a changing operation), `Fs::query` (one
//! that changes nothing but caches, or commits: sync, fsync, checkpoint), `Fs::locked`
//! (anything else that takes the lock); inside an operation, `Inner::consistent_point`
//! and `Inner::make_room`, which may commit.
//!
//! A panic (a bug, an arithmetic overflow, a device or a listener that panics) must never
//! get an operation's partial changes committed. Each of the three runs its closure under
//! `catch_unwind`, so the lock is never poisoned by a panic they can see, and:
//!   - `modify` rolls the operation back exactly as a failed one (the undo logs restore
//!     every block, allocation and cached inode it touched; its pending extent events are
//!     dropped) and returns `Error::Panicked`: the file system carries on, since the
//!     rolled-back state is the one the operation started from (or its last consistent
//!     point), which error rollbacks (ENOSPC, EIO) already rely on;
//!   - except when the rollback cannot be trusted, and then it stops the file system
//!     (the journal refuses every write until a reopen replays what is durable) and
//!     returns `Error::Stopped` naming the panic: the panic cut a commit or checkpoint
//!     short (the journal counts each as failed until it completes, so what is durable
//!     is unknown), listeners were already told of changes the rollback would undo (a
//!     listener panicked part way through a delivery, or a consistent point delivered
//!     them), or the rollback itself panicked;
//!   - `query` and `locked` have no undo log: a panic there stops the file system.
//!
//! A panic that escapes anyway poisons the lock; `lock` then stops the file system too,
//! never carrying on from that state. Stopping loses the changes not yet committed, as
//! a crash would, and keeps reads working until the reopen. Panics outside the lock
//! (`read_at`'s device reads, `readdir`'s callback) reach the caller and change nothing.
//! With `panic = "abort"` nothing is caught: the process dies and the journal's crash
//! recovery applies.

use super::{Fs, Inner};
use crate::error::{Error, Result};
use crate::format::BLOCK_SIZE_U64;
use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::MutexGuard;

impl Fs {
    /// Takes the lock. Every holder catches its panics (see `locked`), so a poisoned
    /// lock means one escaped anyway, from a state nobody checked: stop the file system
    /// rather than carry on from it.
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => {
                let mut inner = poisoned.into_inner();
                let reason = "a panic escaped while the file-system lock was held".to_string();
                log::error!("{reason}: the file system is read-only until reopened");
                inner.meta.journal.stop(reason);
                self.inner.clear_poison();
                inner
            }
        }
    }

    /// Runs `op` under the lock, catching a panic inside it: the state the panic left is
    /// not trusted, so the file system stops (`Inner::stop_after_panic`).
    pub(super) fn locked<T>(
        &self,
        operation: &'static str,
        op: impl FnOnce(&mut Inner) -> Result<T>,
    ) -> Result<T> {
        let mut inner = self.lock();
        match panic::catch_unwind(AssertUnwindSafe(|| op(&mut inner))) {
            Ok(result) => result,
            Err(payload) => Err(inner.stop_after_panic(operation, &panic_message(&*payload))),
        }
    }

    /// Runs a modifying operation: all or nothing, see the module header.
    pub(super) fn modify<T>(
        &self,
        operation: &'static str,
        op: impl FnOnce(&mut Inner) -> Result<T>,
    ) -> Result<T> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut inner = self.lock();
        inner.check_open()?;
        inner.meta.journal.check_writable()?;
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            inner.begin_op();
            match op(&mut inner) {
                Ok(value) => {
                    inner.finish_op()?;
                    Ok(value)
                }
                Err(e) => {
                    inner.rollback_op();
                    Err(e)
                }
            }
        }));
        match outcome {
            Ok(result) => result,
            Err(payload) => Err(inner.roll_back_after_panic(operation, &panic_message(&*payload))),
        }
    }

    /// Runs an operation that changes nothing but caches (or commits: sync, checkpoint).
    /// It has no undo log, so a panic in it stops the file system.
    pub(super) fn query<T>(
        &self,
        operation: &'static str,
        op: impl FnOnce(&mut Inner) -> Result<T>,
    ) -> Result<T> {
        self.locked(operation, |inner| {
            inner.check_open()?;
            op(inner)
        })
    }
}

impl Inner {
    pub(crate) fn begin_op(&mut self) {
        self.meta.journal.begin_op();
        self.meta.blocks.begin_op();
        self.meta.inode_alloc.begin_op();
        self.meta.inodes.begin_op();
        self.pending_events.clear();
        self.events_delivered = false;
    }

    pub(super) fn rollback_op(&mut self) {
        self.meta.journal.rollback_op();
        self.meta.blocks.rollback_op();
        self.meta.inode_alloc.rollback_op();
        self.meta.inodes.rollback_op();
        self.pending_events.clear();
    }

    /// Ends a successful operation: delivers its events, commits if the transaction grew
    /// large, and starts a new savepoint.
    pub(super) fn finish_op(&mut self) -> Result<()> {
        self.deliver_events();
        if self.meta.journal.should_commit() {
            self.commit()?;
        }
        Ok(())
    }

    /// Hands the operation's extent changes so far to the listeners. Called wherever the
    /// operation may commit: a commit (and the checkpoint it may bring) is what lets freed
    /// blocks be reused, and listeners must see a generation bump before that can happen.
    /// (Dropping the changes at a mid-operation commit, as `begin_op` would, lost the
    /// first steps of a multi-step truncate.)
    pub(super) fn deliver_events(&mut self) {
        if !self.pending_events.is_empty() && !self.listeners.is_empty() {
            self.events_delivered = true;
        }
        for change in std::mem::take(&mut self.pending_events) {
            for listener in &self.listeners {
                listener.extents_changed(&change);
            }
        }
    }

    /// A point inside a long operation where the state is consistent: commit if needed.
    pub(crate) fn consistent_point(&mut self) -> Result<()> {
        self.deliver_events();
        if self.meta.journal.should_commit() {
            self.commit()?;
            self.begin_op();
        }
        Ok(())
    }

    pub(crate) fn commit(&mut self) -> Result<()> {
        if self.meta.journal.needs_checkpoint() {
            self.checkpoint()?;
        }
        self.meta.journal.commit()?;
        self.meta.blocks.committed();
        Ok(())
    }

    pub(super) fn checkpoint(&mut self) -> Result<()> {
        if self.meta.journal.checkpoint()? {
            self.meta.blocks.checkpointed();
        }
        Ok(())
    }

    /// Before allocating for the bytes `[offset, offset + len)`: if free space is short
    /// and freed blocks are held back by the log, commit and checkpoint so they can be
    /// reused. Call it only before the operation changes anything: it may commit.
    pub(crate) fn make_room(&mut self, offset: u64, len: u64) -> Result<()> {
        let first = offset / BLOCK_SIZE_U64;
        let blocks = crate::inode::blocks_for(offset.saturating_add(len)).saturating_sub(first);
        let meta = &mut self.meta;
        if meta.blocks.allocatable_blocks() < blocks + 64 && meta.blocks.has_held() {
            self.deliver_events();
            self.commit()?;
            self.checkpoint()?;
            self.meta.blocks.reclaim();
            self.begin_op();
        }
        Ok(())
    }

    pub(super) fn check_open(&self) -> Result<()> {
        if self.closed {
            return Err(Error::Invalid("file system is closed".into()));
        }
        Ok(())
    }

    /// After a panic inside a modifying operation: roll it back as if it had failed,
    /// unless the rollback cannot be trusted (see the module header); then stop.
    pub(super) fn roll_back_after_panic(
        &mut self,
        operation: &'static str,
        message: &str,
    ) -> Error {
        if self.meta.journal.stopped().is_some() {
            // It cut a commit or checkpoint short: what is durable is unknown.
            return self.stop(format!("{operation} panicked: {message}"));
        }
        if self.events_delivered {
            return self.stop(format!(
                "{operation} panicked after listeners were told of its changes: {message}"
            ));
        }
        if panic::catch_unwind(AssertUnwindSafe(|| self.rollback_op())).is_err() {
            return self.stop(format!(
                "{operation} panicked ({message}), and so did its rollback"
            ));
        }
        log::error!("{operation} panicked and was rolled back: {message}");
        Error::Panicked {
            operation,
            message: message.to_string(),
        }
    }

    /// After a panic where there is nothing to roll back to: stop.
    pub(super) fn stop_after_panic(&mut self, operation: &'static str, message: &str) -> Error {
        self.stop(format!("{operation} panicked: {message}"))
    }

    /// Stops the file system (the journal refuses every write from now on), naming why.
    pub(super) fn stop(&mut self, reason: String) -> Error {
        let reason = match self.meta.journal.stopped() {
            Some(earlier) => format!("{reason} ({earlier})"),
            None => reason,
        };
        log::error!("{reason}: the file system is read-only until reopened");
        self.meta.journal.stop(reason.clone());
        Error::Stopped(reason)
    }
}

/// The text of a panic's payload (`panic!` with a literal or with a format string).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}
