//! Journal layer: write-ahead redo log of whole metadata blocks; the only way metadata
//! reaches the device.
//!
//! Interface: `read` / `write` metadata blocks (reads see the running transaction),
//! `read_data` / `write_data` for file data (straight to the device), `commit`,
//! `checkpoint`, and replay at `open`.
//!
//! Commit protocol (one transaction = every block dirtied since the last commit):
//!   1. fdatasync if file data was written since the last sync (data before metadata);
//!   2. write descriptor(s) + block images + commit block (crc32c over all) to the log;
//!   3. fdatasync: the transaction is now durable;
//!   4. write the images to their home blocks (not synced: replay redoes them).
//!
//! Checkpoint: fdatasync (homes durable), then point the journal header past every
//! transaction and fdatasync again; only then is log space (and any block freed by a
//! logged transaction, see `alloc`) reused. The log never wraps: when a transaction does
//! not fit after the head, a checkpoint first rewinds the head to the start.
//!
//! Invariants: the cache holds only clean blocks; the running transaction's blocks live
//! in `dirty` until commit; replay applies transactions in sequence order and stops at
//! the first descriptor or commit that is missing, torn or of another sequence.
//!
//! Stopping: a commit or checkpoint that fails part way leaves the device in an unknown
//! state, so the journal stops (refuses every further write, commit and checkpoint) until
//! the file system is reopened and replays what is durable. Each counts as failed from
//! the moment it starts until it completes, so one that a panic cuts short stops the
//! journal too. The `fs` layer also stops it when a panic leaves its state in doubt.

use crate::cache::{BlockCache, CacheStats};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{
    read_struct, seal_block, verify_block, write_struct, Block, JournalCommit, JournalDescriptor,
    JournalHeader, BLOCK_SIZE, BLOCK_SIZE_U64, DESCRIPTOR_CAPACITY, MAGIC_JOURNAL_COMMIT,
    MAGIC_JOURNAL_DESCRIPTOR, MAGIC_JOURNAL_HEADER,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use zerocopy::little_endian::{U32, U64};
use zerocopy::FromZeros;

/// Counters, for statistics and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct JournalStats {
    pub commits: u64,
    pub checkpoints: u64,
    pub replayed_transactions: u64,
    pub cache: CacheStats,
}

/// The metadata journal and block cache of one open file system.
#[derive(Debug)]
pub struct Journal {
    device: Arc<dyn BlockDevice>,
    cache: BlockCache,
    read_only: bool,
    /// Read-only opens: images replayed from the log, never written home.
    overlay: HashMap<u64, Arc<Block>>,
    /// The journal header block; the log follows it.
    start: u64,
    /// Log blocks after the header.
    capacity: u64,
    /// Next free log index.
    head: u64,
    /// Sequence number of the next transaction.
    next_seq: u64,
    /// The running transaction: home block -> new image.
    dirty: BTreeMap<u64, Arc<Block>>,
    /// File data was written since the last fdatasync.
    data_unsynced: bool,
    /// Why the journal stopped (see the module header); None while it takes writes.
    stopped: Option<String>,
    /// Undo log of the current operation: for each write, the block's image before it
    /// (None: it was not in the transaction). Rolling back pops it in reverse.
    op_undo: Vec<(u64, Option<Arc<Block>>)>,
    /// Damage that recovery healed (a torn header), for fsck to mention.
    notes: Vec<String>,
    stats: JournalStats,
}

/// Log blocks a transaction of `images` blocks takes: descriptors, images, commit.
fn log_blocks_for(images: u64) -> u64 {
    images.div_ceil(DESCRIPTOR_CAPACITY as u64).max(1) + images + 1
}

impl Journal {
    /// Writes an empty journal: a header whose first transaction is `first_seq`, and an
    /// invalid first log block so nothing left on the device from an old image replays.
    pub fn format(device: &dyn BlockDevice, start: u64, blocks: u64, first_seq: u64) -> Result<()> {
        if blocks < crate::mkfs::MIN_JOURNAL_BLOCKS {
            return Err(Error::Invalid(format!(
                "journal of {blocks} blocks is too small"
            )));
        }
        write_header(device, start, blocks, first_seq)?;
        device.write_at(&[0u8; BLOCK_SIZE], (start + 1) * BLOCK_SIZE_U64)?;
        Ok(())
    }

    /// Opens the journal at `start` (`blocks` long) and replays every committed
    /// transaction: read-write opens write them home and rewind the log; read-only opens
    /// keep them in memory only. Returns the journal and the number replayed.
    pub fn open(
        device: Arc<dyn BlockDevice>,
        start: u64,
        blocks: u64,
        cache_bytes: usize,
        read_only: bool,
    ) -> Result<Self> {
        let capacity = blocks.saturating_sub(1);
        let mut journal = Self {
            device,
            cache: BlockCache::new(cache_bytes),
            read_only,
            overlay: HashMap::new(),
            start,
            capacity,
            head: 0,
            next_seq: 0,
            dirty: BTreeMap::new(),
            data_unsynced: false,
            stopped: None,
            op_undo: Vec::new(),
            notes: Vec::new(),
            stats: JournalStats::default(),
        };
        let (tail_seq, tail_index, header_valid) = match read_header(&*journal.device, start) {
            Ok(header) => (header.tail_seq.get(), header.tail_index.get(), true),
            Err(e) => {
                // The header is rewritten only when every logged transaction is already
                // home and durable (replay end, checkpoint), and the log always restarts
                // at index 0: a torn header loses nothing if we replay the chain that
                // starts there (replaying applied transactions is idempotent).
                log::warn!("{e}; replaying the log from its start");
                journal
                    .notes
                    .push(format!("{e}; replayed the log from its start"));
                (journal.recovery_seq()?, 0, false)
            }
        };
        journal.next_seq = tail_seq;
        journal.replay(tail_index, header_valid)?;
        Ok(journal)
    }

    /// Damage that recovery healed without loss.
    pub fn recovery_notes(&self) -> &[String] {
        &self.notes
    }

    /// Records more healed damage (found before the journal was opened).
    pub fn add_notes(&mut self, notes: impl IntoIterator<Item = String>) {
        self.notes.extend(notes);
    }

    /// The journal size recorded in the header at `start`.
    pub fn recorded_size(device: &dyn BlockDevice, start: u64) -> Result<u64> {
        Ok(read_header(device, start)?.journal_blocks.get())
    }

    /// Without a header: the sequence number of the transaction at log index 0, or one
    /// past every sequence number in the log when index 0 holds none.
    fn recovery_seq(&self) -> Result<u64> {
        let mut newest = None;
        for index in 0..self.capacity {
            let Some(block) = self.read_log(index)? else {
                break;
            };
            let nr = self.start + 1 + index;
            if verify_block(&block, MAGIC_JOURNAL_DESCRIPTOR, nr, "descriptor").is_err() {
                continue;
            }
            let descriptor: JournalDescriptor = read_struct(&block, nr, "descriptor")?;
            if index == 0 {
                return Ok(descriptor.seq.get());
            }
            newest = newest.max(Some(descriptor.seq.get()));
        }
        Ok(newest.map_or(1, |seq| seq + 1))
    }

    fn replay(&mut self, tail_index: u64, header_valid: bool) -> Result<()> {
        let mut index = tail_index;
        let mut replayed: Vec<(u64, Arc<Block>)> = Vec::new();
        let mut transactions = 0;
        while let Some((images, used)) = self.read_transaction(index, self.next_seq)? {
            replayed.extend(images);
            index += used;
            self.next_seq += 1;
            transactions += 1;
        }
        self.stats.replayed_transactions = transactions;
        if transactions == 0 {
            if !self.read_only && (tail_index != 0 || !header_valid) {
                write_header(&*self.device, self.start, self.capacity + 1, self.next_seq)?;
                self.device.sync()?;
            }
            return Ok(());
        }
        log::info!(
            "journal: replaying {transactions} transaction(s), {} block(s)",
            replayed.len()
        );
        if self.read_only {
            self.overlay.extend(replayed);
            return Ok(());
        }
        for (home, image) in &replayed {
            self.device.write_at(&image[..], home * BLOCK_SIZE_U64)?;
        }
        self.device.sync()?;
        write_header(&*self.device, self.start, self.capacity + 1, self.next_seq)?;
        self.device.sync()?;
        Ok(())
    }

    /// Reads the transaction `seq` at log index `index`; None if it is absent or invalid.
    #[allow(clippy::type_complexity)]
    fn read_transaction(
        &self,
        index: u64,
        seq: u64,
    ) -> Result<Option<(Vec<(u64, Arc<Block>)>, u64)>> {
        let mut images = Vec::new();
        let mut crc = 0u32;
        let mut at = index;
        loop {
            let Some(descriptor_block) = self.read_log(at)? else {
                return Ok(None);
            };
            let nr = self.start + 1 + at;
            if verify_block(
                &descriptor_block,
                MAGIC_JOURNAL_DESCRIPTOR,
                nr,
                "descriptor",
            )
            .is_err()
            {
                return Ok(None);
            }
            let descriptor: JournalDescriptor = read_struct(&descriptor_block, nr, "descriptor")?;
            let count = descriptor.count.get() as usize;
            if descriptor.seq.get() != seq || count == 0 || count > DESCRIPTOR_CAPACITY {
                return Ok(None);
            }
            crc = crc32c::crc32c_append(crc, &descriptor_block);
            at += 1;
            for target in &descriptor.targets[..count] {
                let Some(image) = self.read_log(at)? else {
                    return Ok(None);
                };
                crc = crc32c::crc32c_append(crc, &image);
                images.push((target.get(), Arc::new(image)));
                at += 1;
            }
            if descriptor.more.get() == 0 {
                break;
            }
        }
        let Some(commit_block) = self.read_log(at)? else {
            return Ok(None);
        };
        let nr = self.start + 1 + at;
        if verify_block(&commit_block, MAGIC_JOURNAL_COMMIT, nr, "commit").is_err() {
            return Ok(None);
        }
        let commit: JournalCommit = read_struct(&commit_block, nr, "commit")?;
        if commit.seq.get() != seq
            || commit.total.get() as usize != images.len()
            || commit.images_crc.get() != crc
        {
            return Ok(None);
        }
        let total_blocks = self.device.size() / BLOCK_SIZE_U64;
        let journal_area = self.start..self.start + 1 + self.capacity;
        let bad_target = |home: &u64| *home >= total_blocks || journal_area.contains(home);
        if let Some((home, _)) = images.iter().find(|(home, _)| bad_target(home)) {
            return Err(Error::corrupt(
                nr,
                format!("journal transaction {seq} targets block {home}, outside the metadata it may hold"),
            ));
        }
        Ok(Some((images, at + 1 - index)))
    }

    fn read_log(&self, index: u64) -> Result<Option<Block>> {
        if index >= self.capacity {
            return Ok(None);
        }
        let mut block = [0u8; BLOCK_SIZE];
        self.device
            .read_at(&mut block, (self.start + 1 + index) * BLOCK_SIZE_U64)?;
        Ok(Some(block))
    }

    /// Reads a metadata block, as the running transaction sees it.
    pub fn read(&mut self, block: u64) -> Result<Arc<Block>> {
        if let Some(image) = self.dirty.get(&block) {
            return Ok(image.clone());
        }
        if let Some(image) = self.cache.get(block) {
            return Ok(image);
        }
        if let Some(image) = self.overlay.get(&block) {
            return Ok(image.clone());
        }
        let mut data = [0u8; BLOCK_SIZE];
        self.device.read_at(&mut data, block * BLOCK_SIZE_U64)?;
        let data = Arc::new(data);
        self.cache.insert(block, data.clone());
        Ok(data)
    }

    /// Replaces a metadata block in the running transaction.
    pub fn write(&mut self, block: u64, data: Block) -> Result<()> {
        self.check_writable()?;
        self.cache.remove(block);
        let previous = self.dirty.insert(block, Arc::new(data));
        self.op_undo.push((block, previous));
        Ok(())
    }

    /// Starts an operation: a point `rollback_op` can return the transaction to.
    pub fn begin_op(&mut self) {
        self.op_undo.clear();
    }

    /// Undoes every block write since `begin_op` (or the last commit).
    pub fn rollback_op(&mut self) {
        self.rollback_to(0);
    }

    /// A point inside the current operation that `rollback_to` can return to.
    pub fn savepoint(&self) -> usize {
        self.op_undo.len()
    }

    /// Undoes the block writes made since `savepoint`.
    pub fn rollback_to(&mut self, savepoint: usize) {
        while self.op_undo.len() > savepoint {
            let Some((block, previous)) = self.op_undo.pop() else {
                break;
            };
            match previous {
                Some(image) => self.dirty.insert(block, image),
                None => self.dirty.remove(&block),
            };
        }
    }

    /// Reads file data straight from the device.
    pub fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.device.read_at(buf, offset)?;
        Ok(())
    }

    /// Writes file data straight to the device; the next commit syncs it first.
    pub fn write_data(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.data_unsynced = true;
        self.device.write_at(buf, offset)?;
        Ok(())
    }

    /// Fails if the journal takes no writes: a read-only open, or a stopped journal.
    pub fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if let Some(reason) = &self.stopped {
            return Err(Error::Stopped(reason.clone()));
        }
        Ok(())
    }

    /// Stops the journal (see the module header), naming why; a later reason replaces an
    /// earlier one (the caller knows more: it includes the earlier one if it matters).
    pub fn stop(&mut self, reason: String) {
        self.stopped = Some(reason);
    }

    /// Why the journal stopped, if it did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// Runs a commit or checkpoint `step`, counted as failed from its start until it
    /// returns Ok: one that fails, or that a panic cuts short, stops the journal.
    fn run_stopping_on_failure<T>(
        &mut self,
        what: &str,
        step: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        self.stopped = Some(format!("a journal {what} was interrupted part way"));
        let result = step(self);
        self.stopped = match &result {
            Ok(_) => None,
            Err(e) => Some(format!("a journal {what} failed: {e}")),
        };
        result
    }

    /// True when the running transaction should be committed at the next operation
    /// boundary, to keep it well inside the log.
    pub fn should_commit(&self) -> bool {
        log_blocks_for(self.dirty.len() as u64) * 4 > self.capacity
    }

    /// True when the running transaction does not fit after the log head: the caller
    /// must checkpoint before committing.
    pub fn needs_checkpoint(&self) -> bool {
        self.head + log_blocks_for(self.dirty.len() as u64) > self.capacity
    }

    /// Makes the running transaction (and all data written before it) durable.
    pub fn commit(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.check_writable()?;
        if self.dirty.is_empty() && !self.data_unsynced {
            return Ok(());
        }
        self.run_stopping_on_failure("commit", Self::commit_dirty)
    }

    fn commit_dirty(&mut self) -> Result<()> {
        if self.dirty.is_empty() {
            self.device.sync()?;
            self.data_unsynced = false;
            return Ok(());
        }
        let images = self.dirty.len() as u64;
        let needed = log_blocks_for(images);
        if needed > self.capacity {
            return Err(Error::Invalid(format!(
                "transaction of {images} blocks exceeds the journal ({} blocks)",
                self.capacity
            )));
        }
        if self.data_unsynced {
            self.device.sync()?;
            self.data_unsynced = false;
        }
        if self.head + needed > self.capacity {
            return Err(Error::Invalid(
                "journal full: checkpoint before committing".into(),
            ));
        }
        let log = self.encode_transaction();
        self.device
            .write_at(&log, (self.start + 1 + self.head) * BLOCK_SIZE_U64)?;
        self.device.sync()?;
        self.head += needed;
        self.next_seq += 1;
        // `dirty` is emptied only once every home write is done: if one fails (or
        // panics), reads until the reopen still see the committed images.
        for (home, image) in &self.dirty {
            self.device.write_at(&image[..], home * BLOCK_SIZE_U64)?;
        }
        for (home, image) in std::mem::take(&mut self.dirty) {
            self.cache.insert(home, image);
        }
        self.begin_op();
        self.stats.commits += 1;
        Ok(())
    }

    /// Lays out the running transaction as it goes into the log at `head`.
    fn encode_transaction(&self) -> Vec<u8> {
        let entries: Vec<(&u64, &Arc<Block>)> = self.dirty.iter().collect();
        let mut log =
            Vec::with_capacity(log_blocks_for(entries.len() as u64) as usize * BLOCK_SIZE);
        let mut crc = 0u32;
        let mut at = self.start + 1 + self.head;
        let chunks: Vec<_> = entries.chunks(DESCRIPTOR_CAPACITY).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut descriptor = JournalDescriptor::new_zeroed();
            descriptor.seq = U64::new(self.next_seq);
            descriptor.count = U32::new(chunk.len() as u32);
            descriptor.more = U32::new(u32::from(i + 1 < chunks.len()));
            for (slot, (home, _)) in descriptor.targets.iter_mut().zip(chunk.iter()) {
                *slot = U64::new(**home);
            }
            let mut block = [0u8; BLOCK_SIZE];
            write_struct(&mut block, &descriptor);
            seal_block(&mut block, MAGIC_JOURNAL_DESCRIPTOR, at);
            crc = crc32c::crc32c_append(crc, &block);
            log.extend_from_slice(&block);
            at += 1;
            for (_, image) in chunk.iter() {
                crc = crc32c::crc32c_append(crc, &image[..]);
                log.extend_from_slice(&image[..]);
                at += 1;
            }
        }
        let mut commit = JournalCommit::new_zeroed();
        commit.seq = U64::new(self.next_seq);
        commit.total = U32::new(entries.len() as u32);
        commit.images_crc = U32::new(crc);
        let mut block = [0u8; BLOCK_SIZE];
        write_struct(&mut block, &commit);
        seal_block(&mut block, MAGIC_JOURNAL_COMMIT, at);
        log.extend_from_slice(&block);
        log
    }

    /// Makes every home write durable and empties the log. Returns true if the log held
    /// transactions (so blocks freed by them may now be reused).
    pub fn checkpoint(&mut self) -> Result<bool> {
        if self.read_only || self.head == 0 {
            return Ok(false);
        }
        // A stopped journal may hold a logged transaction whose home writes did not all
        // happen: pointing the header past it would lose it.
        self.check_writable()?;
        // Failing part way stops the journal: a header that names the next sequence
        // while `head` still points into the log would hide later commits from replay.
        self.run_stopping_on_failure("checkpoint", |journal| {
            journal.device.sync()?;
            write_header(
                &*journal.device,
                journal.start,
                journal.capacity + 1,
                journal.next_seq,
            )?;
            journal.device.sync()?;
            journal.head = 0;
            journal.stats.checkpoints += 1;
            Ok(true)
        })
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    pub fn stats(&self) -> JournalStats {
        JournalStats {
            cache: self.cache.stats(),
            ..self.stats
        }
    }
}

fn write_header(device: &dyn BlockDevice, start: u64, blocks: u64, tail_seq: u64) -> Result<()> {
    let mut header = JournalHeader::new_zeroed();
    header.tail_seq = U64::new(tail_seq);
    header.tail_index = U64::new(0);
    header.journal_blocks = U64::new(blocks);
    let mut block = [0u8; BLOCK_SIZE];
    write_struct(&mut block, &header);
    seal_block(&mut block, MAGIC_JOURNAL_HEADER, start);
    device.write_at(&block, start * BLOCK_SIZE_U64)?;
    Ok(())
}

fn read_header(device: &dyn BlockDevice, start: u64) -> Result<JournalHeader> {
    let mut block = [0u8; BLOCK_SIZE];
    device.read_at(&mut block, start * BLOCK_SIZE_U64)?;
    verify_block(&block, MAGIC_JOURNAL_HEADER, start, "journal header")?;
    read_struct(&block, start, "journal header")
}
