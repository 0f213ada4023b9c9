//! The extent API the kernel binding stands on: extent lists, change notifications,
//! generations, and epoch pins holding freed blocks back from reuse.

use libfs::{
    format, ChangeKind, Extent, ExtentChange, ExtentListener, FallocateMode, FormatOptions, Fs,
    MemDevice, OpenOptions, SetAttr, ROOT_INO,
};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

const BS: u64 = 4096;

#[derive(Default)]
struct Recorder {
    changes: Mutex<Vec<ExtentChange>>,
}

impl ExtentListener for Recorder {
    fn extents_changed(&self, change: &ExtentChange) {
        self.changes
            .lock()
            .expect("recorder lock")
            .push(change.clone());
    }
}

impl Recorder {
    fn take(&self) -> Vec<ExtentChange> {
        std::mem::take(&mut *self.changes.lock().expect("recorder lock"))
    }
}

fn open_fresh(size: u64) -> Fs {
    let device = Arc::new(MemDevice::new(size));
    format(device.clone(), &FormatOptions::default()).expect("format");
    Fs::open_device(device, &OpenOptions::default()).expect("open")
}

fn blocks_of(extents: &[Extent]) -> BTreeSet<u64> {
    extents
        .iter()
        .flat_map(|e| e.physical..e.physical + e.length)
        .collect()
}

#[test]
fn changes_are_reported_with_generations() {
    let fs = open_fresh(32 << 20);
    let recorder = Arc::new(Recorder::default());
    fs.subscribe(recorder.clone());
    let ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).expect("create").ino;
    let generation0 = fs.getattr(ino).expect("attr").generation;

    fs.write_at(ino, 0, &vec![1u8; 8 * BS as usize])
        .expect("write");
    let changes = recorder.take();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].kind, ChangeKind::Extend);
    assert_eq!(changes[0].extents, fs.extents(ino).expect("extents"));
    assert_eq!(
        changes[0].generation, generation0,
        "mapping new blocks frees nothing"
    );

    // A write far away leaves a hole; filling the hole is an Allocate.
    fs.write_at(ino, 20 * BS, &[2u8; 10]).expect("write far");
    assert_eq!(recorder.take()[0].kind, ChangeKind::Extend);
    fs.write_at(ino, 10 * BS, &[3u8; 10]).expect("fill hole");
    let changes = recorder.take();
    assert_eq!(changes[0].kind, ChangeKind::Allocate);
    assert_eq!(
        (changes[0].extents[0].logical, changes[0].extents[0].length),
        (10, 1)
    );

    // Overwriting mapped blocks changes no extent: no report.
    fs.write_at(ino, 0, &[9u8; 100]).expect("overwrite");
    assert!(recorder.take().is_empty());

    // Truncate frees blocks: the generation moves and the removed extents are reported.
    let before = fs.extents(ino).expect("extents");
    fs.setattr(
        ino,
        &SetAttr {
            size: Some(4 * BS),
            ..SetAttr::default()
        },
    )
    .expect("truncate");
    let changes = recorder.take();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].kind, ChangeKind::Truncate);
    let generation1 = fs.getattr(ino).expect("attr").generation;
    assert!(generation1 > generation0);
    assert_eq!(changes[0].generation, generation1);
    let removed = blocks_of(&changes[0].extents);
    let kept = blocks_of(&fs.extents(ino).expect("extents"));
    assert_eq!(
        removed.union(&kept).copied().collect::<BTreeSet<_>>(),
        blocks_of(&before)
    );
    assert!(removed.is_disjoint(&kept));

    // Punch: generation moves again, only whole blocks go.
    fs.fallocate(
        ino,
        BS + 100,
        2 * BS,
        FallocateMode {
            keep_size: true,
            punch_hole: true,
        },
    )
    .expect("punch");
    let changes = recorder.take();
    assert_eq!(changes[0].kind, ChangeKind::Punch);
    assert_eq!(changes[0].extents.iter().map(|e| e.length).sum::<u64>(), 1);
    let generation2 = fs.getattr(ino).expect("attr").generation;
    assert!(generation2 > generation1);

    // fallocate maps unwritten blocks that read as zeros.
    fs.fallocate(ino, 4 * BS, 4 * BS, FallocateMode::default())
        .expect("fallocate");
    let changes = recorder.take();
    assert_eq!(changes[0].kind, ChangeKind::Extend);
    assert!(changes[0].extents.iter().all(|e| e.unwritten));
    let mut buf = vec![1u8; 4 * BS as usize];
    fs.read_at(ino, 4 * BS, &mut buf).expect("read");
    assert!(buf.iter().all(|b| *b == 0));

    // Delete reports every remaining extent.
    let remaining = fs.extents(ino).expect("extents");
    fs.unlink(ROOT_INO, b"f").expect("unlink");
    let changes = recorder.take();
    assert_eq!(changes.last().map(|c| c.kind), Some(ChangeKind::Delete));
    let deleted: BTreeSet<u64> = changes.iter().flat_map(|c| blocks_of(&c.extents)).collect();
    assert_eq!(
        deleted,
        blocks_of(&remaining),
        "{changes:?} vs {remaining:?}"
    );

    // A reused inode number gets a newer generation.
    // (allocation is next-fit: create until the number comes round again)
    let reused = (0..10_000)
        .map(|i| {
            fs.create(ROOT_INO, format!("g{i}").as_bytes(), 0o644, 0, 0)
                .expect("create")
        })
        .find(|attr| attr.ino == ino)
        .expect("the freed inode number is reused");
    assert!(reused.generation > generation2);
}

#[test]
fn a_failed_operation_reports_nothing() {
    let fs = open_fresh(8 << 20);
    let recorder = Arc::new(Recorder::default());
    fs.subscribe(recorder.clone());
    let ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).expect("create").ino;
    let too_big = vec![0u8; 16 << 20];
    assert!(fs
        .write_at(ino, 0, &too_big)
        .is_ok_and(|n| n < too_big.len()));
    let reported: u64 = recorder
        .take()
        .iter()
        .flat_map(|c| &c.extents)
        .map(|e| e.length)
        .sum();
    let mapped: u64 = fs
        .extents(ino)
        .expect("extents")
        .iter()
        .map(|e| e.length)
        .sum();
    assert_eq!(
        reported, mapped,
        "reports match what stayed mapped after a short write"
    );
    let other = fs.create(ROOT_INO, b"g", 0o644, 0, 0).expect("create").ino;
    assert!(
        fs.write_at(other, 0, &[1u8; 4096]).is_err(),
        "device is full"
    );
    assert!(recorder.take().is_empty());
}

#[test]
fn epoch_pins_hold_freed_blocks_back() {
    let fs = open_fresh(8 << 20);
    let total_free = fs.statfs().expect("statfs").free_blocks;
    let victim = fs
        .create(ROOT_INO, b"victim", 0o644, 0, 0)
        .expect("create")
        .ino;
    let size = (total_free - 64) * BS / 2;
    fs.write_at(victim, 0, &vec![7u8; size as usize])
        .expect("write");
    let victim_blocks = blocks_of(&fs.extents(victim).expect("extents"));

    let pin = fs.pin_epoch();
    fs.unlink(ROOT_INO, b"victim").expect("unlink");
    fs.checkpoint().expect("checkpoint");
    fs.reclaim();
    // Fill the device: nothing may land on the victim's blocks while the pin lives.
    let filler = fs
        .create(ROOT_INO, b"filler", 0o644, 0, 0)
        .expect("create")
        .ino;
    let written = fs
        .write_at(filler, 0, &vec![1u8; size as usize * 2])
        .expect("fill");
    assert!(
        written < size as usize * 2,
        "the pinned blocks are not available"
    );
    let filler_blocks = blocks_of(&fs.extents(filler).expect("extents"));
    assert!(
        filler_blocks.is_disjoint(&victim_blocks),
        "a pinned block was reused"
    );

    drop(pin);
    fs.reclaim();
    let more = fs
        .write_at(filler, written as u64, &vec![2u8; size as usize])
        .expect("write");
    assert!(more > 0, "after the pin is dropped the blocks come back");
    let filler_blocks = blocks_of(&fs.extents(filler).expect("extents"));
    assert!(!filler_blocks.is_disjoint(&victim_blocks));
}

/// A truncate of more extents than one step removes commits between steps; every step's
/// change must still reach the listener (they were dropped at the mid-operation commit).
#[test]
fn multi_step_truncate_reports_every_step() {
    let device = Arc::new(MemDevice::new(128 << 20));
    let options = FormatOptions {
        journal_blocks: Some(64),
        ..FormatOptions::default()
    };
    format(device.clone(), &options).expect("format");
    let fs = Fs::open_device(device, &OpenOptions::default()).expect("open");
    let ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).expect("create").ino;
    // Every other block: 5,000 one-block extents, more than two truncate steps.
    for block in 0..5_000u64 {
        fs.write_at(ino, block * 2 * BS, &[7u8; 16]).expect("write");
    }
    let before = fs.extents(ino).expect("extents");
    assert_eq!(before.len(), 5_000);
    let recorder = Arc::new(Recorder::default());
    fs.subscribe(recorder.clone());
    fs.setattr(
        ino,
        &SetAttr {
            size: Some(0),
            ..SetAttr::default()
        },
    )
    .expect("truncate");
    let changes = recorder.take();
    assert!(changes.len() >= 3, "one change per step: {}", changes.len());
    let reported: Vec<Extent> = changes.iter().flat_map(|c| c.extents.clone()).collect();
    assert_eq!(blocks_of(&reported), blocks_of(&before));
    let generations: Vec<u64> = changes.iter().map(|c| c.generation).collect();
    assert!(
        generations.windows(2).all(|w| w[0] < w[1]),
        "{generations:?}"
    );
}
