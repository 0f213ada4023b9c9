//! In-kernel chains over a real libfs image: the driver's linked-list walk must return
//! exactly what a user-space walk of the same file returns, over fragmented extents.
//!
//! Needs root (CAP_BPF + CAP_PERFMON); without it each test prints a SKIPPED line.

use exofs_abi::chain::{status, ChainFile, SCRATCH_SIZE};
use kernel_ext::chain::{ChainError, ChainRequest, Chains, DeviceMapping};
use kernel_ext::LoadError;
use libfs::{FileDevice, FormatOptions, Fs, OpenOptions, ROOT_INO};
use std::path::PathBuf;
use std::sync::Arc;

const NODE: u64 = 4096;
const END: u64 = u64::MAX;

/// An image file removed on drop.
struct Image(PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn load_or_skip(test: &str) -> Option<Chains> {
    match Chains::load() {
        Ok(chains) => Some(chains),
        Err(ChainError::Load(LoadError::Sys(err))) if err.is_permission_denied() => {
            eprintln!("SKIPPED {test}: {err} (loading BPF needs root: CAP_BPF + CAP_PERFMON)");
            None
        }
        Err(err) => panic!("loading the driver failed: {err}"),
    }
}

/// One node of the test list, where it lives in the file and what it holds.
#[derive(Debug, Clone, Copy)]
struct Node {
    offset: u64,
    key: u64,
    value: u64,
    next: u64,
}

/// A linked list of `count` nodes, one per block, linked in a shuffled order; written
/// interleaved with another file so the list's extents are fragmented. Returns the image,
/// the open file system, the list's inode and its nodes in list order.
fn build_list(name: &str, count: u64) -> (Image, Fs, u64, Vec<Node>) {
    let image =
        Image(std::env::temp_dir().join(format!("exofs-chain-{}-{name}.img", std::process::id())));
    let device = FileDevice::create(&image.0, 64 << 20).expect("image");
    libfs::format(Arc::new(device), &FormatOptions::default()).expect("format");
    let fs = Fs::open(&image.0, &OpenOptions::default()).expect("open");
    let list = fs
        .create(ROOT_INO, b"list", 0o644, 0, 0)
        .expect("create")
        .ino;
    let filler = fs
        .create(ROOT_INO, b"filler", 0o644, 0, 0)
        .expect("create")
        .ino;
    // Slot i of the file holds node order[i]; the list visits slots in a shuffled order.
    let mut order: Vec<u64> = (0..count).collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..order.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        order.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    let mut nodes = Vec::new();
    for (position, slot) in order.iter().enumerate() {
        let next = order.get(position + 1).map_or(END, |s| s * NODE);
        nodes.push(Node {
            offset: slot * NODE,
            key: 1000 + position as u64,
            value: 7 * position as u64 + 3,
            next,
        });
    }
    for slot in 0..count {
        let node = *nodes
            .iter()
            .find(|n| n.offset == slot * NODE)
            .expect("node");
        let mut block = vec![0u8; NODE as usize];
        block[0..8].copy_from_slice(&node.next.to_le_bytes());
        block[8..16].copy_from_slice(&node.key.to_le_bytes());
        block[16..24].copy_from_slice(&node.value.to_le_bytes());
        fs.write_at(list, node.offset, &block).expect("write node");
        // Break contiguity every few blocks.
        if slot % 3 == 0 {
            fs.write_at(filler, slot * NODE, &[1u8; NODE as usize])
                .expect("write filler");
        }
    }
    (image, fs, list, nodes)
}

fn request(file: ChainFile, key: u64, start_offset: u64, hop_limit: u32) -> ChainRequest {
    let mut scratch = [0u8; SCRATCH_SIZE];
    scratch[0..8].copy_from_slice(&key.to_le_bytes());
    ChainRequest {
        files: vec![file],
        start_file: 0,
        start_offset,
        read_len: 24,
        hop_limit,
        scratch,
    }
}

fn word(scratch: &[u8], index: usize) -> u64 {
    u64::from_le_bytes(
        scratch[index * 8..index * 8 + 8]
            .try_into()
            .expect("8 bytes"),
    )
}

#[test]
fn chained_lookups_match_the_user_space_walk() {
    let Some(chains) = load_or_skip("chained_lookups_match_the_user_space_walk") else {
        return;
    };
    let (_image, fs, list, nodes) = build_list("walk", 40);
    let extents = fs.extents(list).expect("extents");
    assert!(
        extents.len() > 5,
        "the list file is fragmented ({} extents)",
        extents.len()
    );
    let file = chains.register(&fs, list).expect("register");
    let mapping = DeviceMapping::map(&fs).expect("map the device");
    let head = nodes[0].offset;
    // Every key in the list: found after (position + 1) hops with the right value.
    for (position, node) in nodes.iter().enumerate() {
        let (key, value) = (node.key, node.value);
        let ctx = chains
            .run(&mapping, &request(file, key, head, 64))
            .expect("run");
        assert_eq!(ctx.status, status::DONE, "key {key}");
        assert_eq!(ctx.hops as usize, position + 1, "key {key}");
        assert_eq!(
            (word(&ctx.scratch, 1), word(&ctx.scratch, 2)),
            (1, value),
            "key {key}"
        );
    }
    // A missing key walks the whole list and reports not found.
    let ctx = chains
        .run(&mapping, &request(file, 5, head, 64))
        .expect("run");
    assert_eq!(
        (ctx.status, ctx.hops, word(&ctx.scratch, 1)),
        (status::DONE, 40, 0)
    );
    // The hop limit stops a walk.
    let ctx = chains
        .run(&mapping, &request(file, nodes[30].key, head, 10))
        .expect("run");
    assert_eq!((ctx.status, ctx.hops), (status::HOP_LIMIT, 10));
}

#[test]
fn bad_offsets_and_stale_generations_read_nothing() {
    let Some(chains) = load_or_skip("bad_offsets_and_stale_generations_read_nothing") else {
        return;
    };
    let (_image, fs, list, nodes) = build_list("errors", 8);
    let file = chains.register(&fs, list).expect("register");
    let mapping = DeviceMapping::map(&fs).expect("map the device");
    let size = fs.getattr(list).expect("attr").size;
    let mut past_end = request(file, nodes[0].key, 0, 8);
    past_end.start_offset = size;
    let ctx = chains.run(&mapping, &past_end).expect("run");
    assert_eq!((ctx.status, ctx.hops), (status::OUT_OF_FILE, 0));
    // A hole: punch the first node's block, re-register.
    fs.fallocate(
        list,
        0,
        NODE,
        libfs::FallocateMode {
            keep_size: true,
            punch_hole: true,
        },
    )
    .expect("punch");
    // Re-registering after the change bumps the generation the driver checks.
    let fresh = chains.register(&fs, list).expect("re-register");
    assert!(fresh.generation > file.generation);
    let ctx = chains
        .run(&mapping, &request(file, nodes[0].key, 0, 8))
        .expect("run");
    assert_eq!(
        ctx.status,
        status::STALE,
        "a chain naming the old generation is refused"
    );
    let ctx = chains
        .run(&mapping, &request(fresh, nodes[0].key, 0, 8))
        .expect("run");
    assert_eq!((ctx.status, ctx.hops), (status::HOLE, 0));
    // An unregistered file.
    let other = ChainFile {
        ino: list + 1000,
        generation: 1,
    };
    let ctx = chains.run(&mapping, &request(other, 1, 0, 8)).expect("run");
    assert_eq!(ctx.status, status::NOT_REGISTERED);
}
