//! The image-file device: large aligned writes go behind, through O_DIRECT, and must
//! read back, order and sync exactly as buffered writes would.

mod common;

use libfs::device::DIRECT_MIN;
use libfs::{BlockDevice, FileDevice};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

const SIZE: usize = 32 << 20;
const ALIGN: usize = 4096;

/// An image file beside the test binary (on disk: a tmpfs refuses O_DIRECT), removed on
/// drop.
struct Image(PathBuf);

impl Image {
    fn new(name: &str) -> Self {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("exofs-device-{}-{name}.img", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open_direct(image: &Image) -> Option<FileDevice> {
    let device = FileDevice::create(&image.0, SIZE as u64).expect("create image");
    if device.writes_direct() {
        Some(device)
    } else {
        let why = format!(
            "{} refuses O_DIRECT, so no write goes behind",
            image.0.display()
        );
        common::skip("device", &why);
        None
    }
}

/// Queued direct writes, buffered writes over and inside them, reads straight after
/// each, syncs now and then: every read returns what a byte array given the same writes
/// holds, and so does the file read through another descriptor at the end.
#[test]
fn direct_and_buffered_writes_read_back_in_order() {
    let image = Image::new("model");
    let Some(device) = open_direct(&image) else {
        return;
    };
    let mut model = vec![0u8; SIZE];
    let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
    let mut direct_writes = 0;
    for op in 0..3000 {
        let fill = (op % 251) as u8 + 1;
        match rng.gen_range(0..10) {
            // A large aligned write (queued), up to 3 MiB so some are cut in pieces.
            0..=3 => {
                let len = (DIRECT_MIN + rng.gen_range(0..3 << 20)) / ALIGN * ALIGN;
                let at = rng.gen_range(0..SIZE - len) / ALIGN * ALIGN;
                let data: Vec<u8> = (0..len).map(|i| fill ^ (i as u8)).collect();
                device.write_at(&data, at as u64).expect("direct write");
                model[at..at + len].copy_from_slice(&data);
                direct_writes += 1;
            }
            // A small unaligned write (buffered), often inside a queued one.
            4..=5 => {
                let len = 1 + rng.gen_range(0..3 * ALIGN);
                let at = rng.gen_range(0..SIZE - len);
                device.write_at(&vec![fill; len], at as u64).expect("write");
                model[at..at + len].fill(fill);
            }
            6..=8 => {
                let len = 1 + rng.gen_range(0..2 << 20);
                let at = rng.gen_range(0..SIZE - len);
                let mut buf = vec![0u8; len];
                device.read_at(&mut buf, at as u64).expect("read");
                assert!(
                    buf == model[at..at + len],
                    "op {op}: read of {len} bytes at {at} differs from what was written"
                );
            }
            _ => device.sync().expect("sync"),
        }
    }
    assert!(direct_writes > 1000, "only {direct_writes} direct writes");
    device.sync().expect("sync");
    let file = std::fs::read(&image.0).expect("read image file");
    assert!(
        file == model,
        "the synced file differs from what was written"
    );
}

/// Two writes are in flight at once; writes to the same bytes must still land in the
/// order they were made. A large write (two queued pieces) then small ones over each
/// piece: a small one that overtook its piece would be overwritten by it.
#[test]
fn overlapping_queued_writes_land_in_order() {
    let image = Image::new("order");
    let Some(device) = open_direct(&image) else {
        return;
    };
    let reader = std::fs::File::open(&image.0).expect("open image");
    let small = DIRECT_MIN;
    for round in 0..200u32 {
        let (big, first, second) = ((round % 80) as u8 + 1, 0xa0, 0xb0);
        device
            .write_at(&vec![big; 2 << 20], 0)
            .expect("large write");
        device
            .write_at(&vec![first; small], 0)
            .expect("small write");
        device
            .write_at(&vec![second; small], 1 << 20)
            .expect("small write");
        device.settle().expect("settle");
        // Through another descriptor, past the device's own waiting.
        let mut file = vec![0u8; 2 << 20];
        reader.read_exact_at(&mut file, 0).expect("read image file");
        let expect = |range: std::ops::Range<usize>, byte: u8| {
            assert!(
                file[range.clone()].iter().all(|&b| b == byte),
                "round {round}: bytes {range:?} are not {byte:#x}: writes landed out of order"
            );
        };
        expect(0..small, first);
        expect(small..1 << 20, big);
        expect(1 << 20..(1 << 20) + small, second);
        expect((1 << 20) + small..2 << 20, big);
    }
}

/// What settle promises the kernel binding: once it returns, a read-only mapping of the
/// file (which bypasses the device) sees every write made before it.
#[test]
fn settle_makes_writes_visible_to_a_mapping() {
    let image = Image::new("settle");
    let Some(device) = open_direct(&image) else {
        return;
    };
    let file = std::fs::File::open(&image.0).expect("open image");
    // SAFETY: a fresh read-only shared mapping of a file kept open below; only read.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap");
    // SAFETY: the mapping is SIZE readable bytes until the munmap below.
    let mapped = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), SIZE) };
    for round in 1..=20u8 {
        // Fault the pages in first, so the direct write has cached pages to replace.
        assert!(mapped[..4 << 20].iter().all(|&b| b == round - 1));
        device
            .write_at(&vec![round; 4 << 20], 0)
            .expect("direct write");
        device.settle().expect("settle");
        assert!(
            mapped[..4 << 20].iter().all(|&b| b == round),
            "round {round}: the mapping shows old bytes after settle"
        );
    }
    // SAFETY: unmapping the mapping made above, no longer used.
    unsafe { libc::munmap(addr, SIZE) };
}
