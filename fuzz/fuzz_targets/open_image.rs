//! Opens damaged images: every outcome must be a value (Ok or Err), never a panic.
//!
//! The input patches a small populated image: a list of (block, offset, byte) edits. When
//! the first input byte is odd, every patched metadata block is re-sealed (checksum
//! recomputed) afterwards, so the fuzzer gets past checksums and reaches the structural
//! checks behind them.
#![no_main]

use libfs::format::{seal_block, BLOCK_SIZE};
use libfs::{format, FormatOptions, Fs, MemDevice, OpenOptions, ROOT_INO};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

const IMAGE_BYTES: u64 = 4 << 20;

fn template() -> &'static Vec<u8> {
    static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let device = Arc::new(MemDevice::new(IMAGE_BYTES));
        let options = FormatOptions {
            journal_blocks: Some(64),
            inodes: Some(512),
            ..Default::default()
        };
        format(device.clone(), &options).expect("format template");
        let fs = Fs::open_device(device.clone(), &OpenOptions::default()).expect("open template");
        let dir = fs.mkdir(ROOT_INO, b"dir", 0o755, 0, 0).expect("mkdir");
        for i in 0..300u32 {
            fs.create(dir.ino, format!("entry-{i}").as_bytes(), 0o644, 0, 0)
                .expect("create");
        }
        let file = fs
            .create(ROOT_INO, b"fragmented", 0o644, 0, 0)
            .expect("create");
        for block in (0..40u64).step_by(2) {
            fs.write_at(file.ino, block * 4096, &[7u8; 4096])
                .expect("write");
        }
        fs.setxattr(file.ino, b"user.k", b"v", libfs::XattrMode::Any)
            .expect("xattr");
        fs.symlink(ROOT_INO, b"link", b"fragmented", 0, 0)
            .expect("symlink");
        // Leave one transaction in the journal so replay is exercised too.
        fs.sync().expect("sync");
        // The image as a crash would leave it, before close checkpoints.
        let image = device.snapshot();
        drop(fs);
        image
    })
}

fn walk(fs: &Fs, ino: u64, depth: usize) {
    if depth > 8 {
        return;
    }
    let Ok(entries) = fs.list_dir(ino) else {
        return;
    };
    for entry in entries {
        let Ok(attr) = fs.getattr(entry.ino) else {
            continue;
        };
        if attr.is_dir() {
            walk(fs, entry.ino, depth + 1);
        } else if attr.is_symlink() {
            let _ = fs.readlink(entry.ino);
        } else {
            let mut buf = vec![0u8; attr.size.min(1 << 20) as usize];
            let _ = fs.read_at(entry.ino, 0, &mut buf);
            let _ = fs.extents(entry.ino);
            let _ = fs.listxattr(entry.ino);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, edits)) = data.split_first() else {
        return;
    };
    let mut image = template().clone();
    let blocks = image.len() / BLOCK_SIZE;
    let mut touched = Vec::new();
    for edit in edits.chunks_exact(5) {
        let block = usize::from(u16::from_le_bytes([edit[0], edit[1]])) % blocks;
        let offset = usize::from(u16::from_le_bytes([edit[2], edit[3]])) % BLOCK_SIZE;
        image[block * BLOCK_SIZE + offset] ^= edit[4];
        touched.push(block);
    }
    if flags & 1 == 1 {
        for block in touched {
            let bytes: &mut [u8; BLOCK_SIZE] = (&mut image
                [block * BLOCK_SIZE..(block + 1) * BLOCK_SIZE])
                .try_into()
                .expect("block slice");
            let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            seal_block(bytes, magic, block as u64);
        }
    }
    let device = Arc::new(MemDevice::from_bytes(image));
    let _ = libfs::fsck::check(device.clone());
    if let Ok(fs) = Fs::open_device(device.clone(), &OpenOptions::read_only()) {
        walk(&fs, ROOT_INO, 0);
    }
    if let Ok(fs) = Fs::open_device(device, &OpenOptions::default()) {
        walk(&fs, ROOT_INO, 0);
        if let Ok(file) = fs.create(ROOT_INO, b"new", 0o644, 0, 0) {
            let _ = fs.write_at(file.ino, 0, &[1u8; 20000]);
        }
        let _ = fs.unlink(ROOT_INO, b"fragmented");
        let _ = fs.rmdir(ROOT_INO, b"dir");
        let _ = fs.close();
    }
});
