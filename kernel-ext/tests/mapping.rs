//! The device mapping chains read through never reads around a miss: a page fault in it
//! reads the missing block, not the disk's read-ahead window (8 MiB on this machine), which
//! out of core read hundreds of blocks per lookup and evicted the rest of the index.
//!
//! Needs no privilege: it maps an image on a real disk (CARGO_TARGET_TMPDIR), drops the
//! image's pages from the page cache, touches one block through the mapping and counts the
//! pages that came in (mincore).

use kernel_ext::binding::DeviceMapping;
use libfs::{FileDevice, FormatOptions, Fs, OpenOptions, ROOT_INO};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

const PAGE: usize = 4096;

/// Pages of `mapping` resident in the page cache.
fn resident_pages(mapping: &DeviceMapping) -> usize {
    let (addr, len) = mapping.range();
    let mut vector = vec![0u8; (len as usize).div_ceil(PAGE)];
    // SAFETY: the range is a live mapping; the vector has one byte per page of it.
    let ret =
        unsafe { libc::mincore(addr as *mut libc::c_void, len as usize, vector.as_mut_ptr()) };
    assert_eq!(ret, 0, "mincore: {}", std::io::Error::last_os_error());
    vector.iter().filter(|&&byte| byte & 1 != 0).count()
}

/// Drops every clean page of the image from the page cache.
fn drop_pages(image: &std::fs::File) {
    // SAFETY: advice on an open descriptor; no memory is passed.
    let ret = unsafe { libc::posix_fadvise(image.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(ret, 0, "posix_fadvise");
}

/// The pages one read of a byte at device offset `at` brings in through `mapping`.
fn pages_one_fault_reads(mapping: &DeviceMapping, image: &std::fs::File, at: usize) -> usize {
    drop_pages(image);
    let before = resident_pages(mapping);
    // SAFETY: volatile read of a byte inside the readable mapping.
    let _ = unsafe { std::ptr::read_volatile(mapping.bytes().as_ptr().add(at)) };
    resident_pages(mapping).saturating_sub(before)
}

#[test]
fn a_fault_in_the_chain_mapping_reads_the_missing_block_alone() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("exofs-mapping-{}.img", std::process::id()));
    let device = FileDevice::create(&path, 64 << 20).expect("image");
    libfs::format(Arc::new(device), &FormatOptions::default()).expect("format");
    let fs = Fs::open(&path, &OpenOptions::default()).expect("open");
    let file = fs.create(ROOT_INO, b"data", 0o644, 0, 0).expect("create");
    fs.write_at(file.ino, 0, &vec![7u8; 32 << 20])
        .expect("write");
    fs.sync().expect("sync");
    let start = fs.extents(file.ino).expect("extents")[0].physical as usize * PAGE;
    let image = std::fs::File::open(&path).expect("open image");
    image.sync_all().expect("fsync");

    let chains = DeviceMapping::map(&fs).expect("map");
    let read = pages_one_fault_reads(&chains, &image, start + (16 << 20));
    // The control: a mapping without the advice, at another place of the data.
    let plain = DeviceMapping::map_private(&fs).expect("map");
    let read_around = pages_one_fault_reads(&plain, &image, start + (4 << 20));
    drop((chains, plain));
    fs.close().expect("close");
    let _ = std::fs::remove_file(&path);

    eprintln!("one fault read {read} pages; without MADV_RANDOM {read_around}");
    assert!(
        read <= 4,
        "a fault in the chain mapping read {read} pages (read-around: {read_around})"
    );
}
