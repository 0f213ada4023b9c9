//! In-kernel chains over real libfs images, through the binding: every example program
//! (B-tree in Rust and C, hash chain, linked list) must return exactly what the user-space
//! reference walk returns, over files whose extents are fragmented across chunk
//! boundaries; bad offsets read nothing.
//!
//! Needs root (CAP_BPF + CAP_PERFMON); without it each test prints a SKIPPED line.

mod common;

use common::{lookup_scratch, reader, setup, write_fragmented};
use exofs_abi::chain::{status, ChainCtx, MAX_HOPS, NO_FAULT, SCRATCH_SIZE};
use exofs_abi::formats::Lookup;
use kernel_ext::binding::{
    BatchItem, BatchRequest, Binding, BindingError, BoundProgram, ChainRequest, DeviceMapping,
};
use kernel_ext::examples;
use kernel_ext::index::{self, Answer};

/// Runs a lookup of `key` and returns (status, answer).
fn chain_lookup(
    binding: &Binding,
    program: &BoundProgram,
    ino: u64,
    key: u64,
    read_len: u32,
) -> (i32, Answer) {
    let mut request = ChainRequest::new(ino, 0, &lookup_scratch(key));
    request.read_len = read_len;
    let outcome = binding.run(program, &request).expect("run");
    let mut lookup = Lookup::default();
    let words: Vec<u64> = outcome.scratch[..24]
        .chunks(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect();
    (lookup.key, lookup.found, lookup.value) = (words[0], words[1], words[2]);
    assert_eq!(lookup.key, key, "the key survives in the scratch");
    let value = (lookup.found == 1).then_some(lookup.value);
    (
        outcome.status,
        Answer {
            value,
            hops: outcome.hops,
        },
    )
}

/// A small deterministic generator for keys.
fn keys(seed: u64, count: usize) -> Vec<u64> {
    let mut state = seed | 1;
    let mut keys: Vec<u64> = (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state >> 1
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Extents of `extents` that cross a boundary between chunks of the extents map.
fn chunk_crossings(extents: &[libfs::Extent]) -> usize {
    let Ok(chunked) = kernel_ext::extent_map::chunk(extents) else {
        return 0;
    };
    let shift = chunked.chunk_shift;
    extents
        .iter()
        .filter(|e| e.logical >> shift != (e.logical + e.length - 1) >> shift)
        .count()
}

#[test]
fn btree_chains_match_the_reference_walk() {
    let Some((_image, fs, binding)) = setup("btree", 256 << 20) else {
        return;
    };
    let rust = binding
        .bind("btree", examples::BTREE)
        .expect("bind the Rust B-tree");
    let mut crossings = 0;
    let c = binding
        .bind("btree_c", examples::BTREE_C)
        .expect("bind the C B-tree");
    for node_size in [512usize, 4096] {
        for depth in 1..=8u32 {
            let fanout = 3usize;
            let count = fanout.pow(depth - 1) * fanout;
            let all = keys(u64::from(depth) * 1000 + node_size as u64, count * 2);
            let present: Vec<u64> = all.iter().copied().step_by(2).collect();
            let absent: Vec<u64> = all.iter().copied().skip(1).step_by(2).collect();
            let pairs: Vec<(u64, u64)> = present.iter().map(|k| (*k, k.wrapping_mul(3))).collect();
            let tree = index::build_btree(&pairs, node_size, fanout).expect("build");
            assert_eq!(tree.depth, depth);
            let name = format!("tree-{node_size}-{depth}");
            let ino = write_fragmented(&fs, &name, &tree.bytes, 3);
            crossings += chunk_crossings(&fs.extents(ino).expect("extents"));
            let probes = present.iter().step_by(7).chain(absent.iter().step_by(7));
            for key in probes.take(60) {
                let expected =
                    index::btree_lookup(&mut reader(&fs, ino), node_size, *key).expect("walk");
                for (program, read_len) in [(&rust, node_size as u32), (&c, 4096)] {
                    let (status, answer) = chain_lookup(&binding, program, ino, *key, read_len);
                    assert_eq!(status, status::DONE, "{name} key {key} {}", program.name());
                    assert_eq!(answer, expected, "{name} key {key} {}", program.name());
                }
            }
        }
    }
    assert!(
        crossings > 0,
        "some extents cross a chunk boundary of the extents map"
    );
}

#[test]
fn hash_and_list_chains_match_the_reference_walk() {
    let Some((_image, fs, binding)) = setup("hashlist", 128 << 20) else {
        return;
    };
    let hash = binding
        .bind("hash", examples::HASH_CHAIN)
        .expect("bind hash");
    let list = binding
        .bind("list", examples::LINKED_LIST)
        .expect("bind list");
    let all = keys(99, 4000);
    let pairs: Vec<(u64, u64)> = all.iter().step_by(2).map(|k| (*k, k ^ 0xabc)).collect();
    let hash_ino = write_fragmented(&fs, "hash", &index::build_hash(&pairs, 97), 3);
    for key in all.iter().step_by(13) {
        let expected = index::hash_lookup(&mut reader(&fs, hash_ino), *key).expect("walk");
        let (status, answer) = chain_lookup(&binding, &hash, hash_ino, *key, 24);
        assert_eq!((status, answer), (status::DONE, expected), "hash key {key}");
    }
    let list_pairs = &pairs[..50];
    let list_ino = write_fragmented(&fs, "list", &index::build_list(list_pairs, 5), 3);
    for (position, (key, value)) in list_pairs.iter().enumerate() {
        let (status, answer) = chain_lookup(&binding, &list, list_ino, *key, 24);
        assert_eq!(status, status::DONE);
        assert_eq!(
            answer,
            Answer {
                value: Some(*value),
                hops: position as u32 + 1
            }
        );
    }
    // A missing key walks the whole list; a hop limit stops a walk.
    let (status, answer) = chain_lookup(&binding, &list, list_ino, 1, 24);
    assert_eq!(
        (status, answer.value, answer.hops),
        (status::DONE, None, 50)
    );
    let mut request = ChainRequest::new(list_ino, 0, &lookup_scratch(list_pairs[40].0));
    request.hop_limit = 10;
    let outcome = binding.run(&list, &request).expect("run");
    assert_eq!((outcome.status, outcome.hops), (status::HOP_LIMIT, 10));
    let stats = binding.stats().expect("stats");
    assert!(stats.chains > 0 && stats.hops >= stats.chains, "{stats:?}");
}

#[test]
fn offsets_outside_the_file_or_in_holes_read_nothing() {
    let Some((_image, fs, binding)) = setup("errors", 64 << 20) else {
        return;
    };
    let list = binding
        .bind("list", examples::LINKED_LIST)
        .expect("bind list");
    let pairs: Vec<(u64, u64)> = (1..=8).map(|k| (k, k * 100)).collect();
    let ino = write_fragmented(&fs, "list", &index::build_list(&pairs, 3), 2);
    let size = fs.getattr(ino).expect("attr").size;
    for start in [size, size + 4096, u64::MAX - 10] {
        let request = ChainRequest::new(ino, start, &lookup_scratch(1));
        let outcome = binding.run(&list, &request).expect("run");
        assert_eq!(
            (outcome.status, outcome.hops),
            (status::OUT_OF_FILE, 0),
            "start {start}"
        );
        assert_eq!(outcome.scratch, request.scratch, "nothing comes back");
    }
    // A hole inside the file: punch the head's block.
    fs.fallocate(
        ino,
        0,
        4096,
        libfs::FallocateMode {
            keep_size: true,
            punch_hole: true,
        },
    )
    .expect("punch");
    let outcome = binding
        .run(&list, &ChainRequest::new(ino, 0, &lookup_scratch(1)))
        .expect("run");
    assert_eq!((outcome.status, outcome.hops), (status::HOLE, 0));
    // A node pointing past the end: the chain stops there, reading nothing more.
    let mut bad = [0u8; 4096];
    bad[..8].copy_from_slice(&(size * 2).to_le_bytes());
    bad[8..16].copy_from_slice(&77u64.to_le_bytes());
    fs.write_at(ino, 4096, &bad).expect("write");
    let outcome = binding
        .run(&list, &ChainRequest::new(ino, 4096, &lookup_scratch(1)))
        .expect("run");
    assert_eq!((outcome.status, outcome.hops), (status::OUT_OF_FILE, 1));
    // Too many files is refused before anything runs.
    let mut request = ChainRequest::new(ino, 0, &[0u8; SCRATCH_SIZE]);
    request.files = vec![ino; 5];
    assert!(matches!(
        binding.run(&list, &request),
        Err(BindingError::Invalid(_))
    ));
}

#[test]
fn batches_match_the_reference_walk() {
    let Some((_image, fs, binding)) = setup("batch", 128 << 20) else {
        return;
    };
    let btree = binding.bind("btree", examples::BTREE).expect("bind");
    let all = keys(4242, 4000);
    let present: Vec<u64> = all.iter().copied().step_by(2).collect();
    let pairs: Vec<(u64, u64)> = present.iter().map(|k| (*k, k / 3)).collect();
    let fanout = index::fanout_for_depth(pairs.len() as u64, 4, 512).expect("fanout");
    let tree = index::build_btree(&pairs, 512, fanout).expect("build");
    let ino = write_fragmented(&fs, "tree", &tree.bytes, 3);
    let probes: Vec<u64> = all.iter().copied().step_by(9).take(150).collect();
    let items: Vec<BatchItem> = probes
        .iter()
        .map(|key| BatchItem::new(0, &lookup_scratch(*key)))
        .collect();
    for overlap_misses in [true, false] {
        let mut request = BatchRequest::new(ino);
        request.read_len = 512;
        request.overlap_misses = overlap_misses;
        let (outcomes, counters) = binding.run_batch(&btree, &request, &items).expect("batch");
        assert!(
            counters.calls as usize >= items.len().div_ceil(32),
            "{counters:?}"
        );
        if overlap_misses {
            // This binding's mapping has no page mapped yet: the first round misses.
            assert!(counters.prefetched > 0, "{counters:?}");
        }
        for (key, outcome) in probes.iter().zip(&outcomes) {
            let expected = index::btree_lookup(&mut reader(&fs, ino), 512, *key).expect("walk");
            let found = u64::from_le_bytes(outcome.scratch[8..16].try_into().expect("8"));
            let value = u64::from_le_bytes(outcome.scratch[16..24].try_into().expect("8"));
            assert_eq!(outcome.status, status::DONE, "key {key}");
            assert_eq!(
                Answer {
                    value: (found == 1).then_some(value),
                    hops: outcome.hops
                },
                expected,
                "key {key} (overlap_misses: {overlap_misses})"
            );
        }
    }
}

#[test]
fn files_run_chains_through_libfs() {
    let Some((_image, fs, binding)) = setup("filechain", 64 << 20) else {
        return;
    };
    let btree = binding.bind("btree", examples::BTREE).expect("bind");
    let pairs: Vec<(u64, u64)> = (0..2000u64).map(|k| (k * 2, k + 1)).collect();
    let tree = index::build_btree(&pairs, 4096, 20).expect("build");
    let ino = write_fragmented(&fs, "tree", &tree.bytes, 2);
    let file = libfs::File::from_ino(&fs, ino).expect("open");
    let program = binding.with(&btree);
    let mut scratch = lookup_scratch(1234);
    let result = file.chain(&program, 0, &mut scratch).expect("chain");
    assert_eq!((result.status, result.hops), (status::DONE, tree.depth));
    assert_eq!(
        &scratch[8..24],
        &[1u64.to_le_bytes(), 618u64.to_le_bytes()].concat()[..]
    );
    let mut lookups: Vec<libfs::ChainLookup> = [10u64, 11, 3998]
        .iter()
        .map(|key| libfs::ChainLookup {
            start: 0,
            scratch: lookup_scratch(*key).to_vec(),
        })
        .collect();
    let results = file.chain_batch(&program, &mut lookups).expect("batch");
    let found: Vec<u64> = lookups
        .iter()
        .map(|l| u64::from_le_bytes(l.scratch[8..16].try_into().expect("8")))
        .collect();
    assert!(results.iter().all(|r| r.status == status::DONE));
    assert_eq!(found, vec![1, 0, 1]);
}

/// Fan-out and several files in one chain: each node is { value, count, then count
/// (file, offset) pairs }; `next` adds the value to the scratch, pushes the children, and
/// stops with DONE at a node whose value is 1000 or more. Children are walked depth first
/// from the last one pushed.
#[test]
fn fan_out_crosses_files() {
    let Some((_image, fs, binding)) = setup("fanout", 32 << 20) else {
        return;
    };
    let walk = common::compile_c(
        "fanout",
        "int next(struct exofs_hop_state *s) {
             __u64 *words = (__u64 *)s->data, *sum = (__u64 *)s->scratch;
             __u64 count;
             if (s->data_len < 16)
                 return EXOFS_NEXT_ABORT;
             sum[0] += words[0];
             sum[1] += 1;
             if (words[0] >= 1000)
                 return EXOFS_NEXT_DONE;
             count = words[1];
             if (count > EXOFS_MAX_FANOUT || 16 + count * 16 > s->data_len)
                 return EXOFS_NEXT_ABORT;
             for (__u64 i = 0; i < count && i < EXOFS_MAX_FANOUT; i++) {
                 s->next_file[i] = (__u32)words[2 + 2 * i];
                 s->next_offset[i] = words[3 + 2 * i];
             }
             s->next_count = (__u32)count;
             return EXOFS_NEXT_CONTINUE;
         }",
    );
    let walk = binding.bind("fanout", &walk).expect("bind");
    let node = |value: u64, children: &[(u64, u64)]| {
        let mut block = vec![0u8; 4096];
        let mut words = vec![value, children.len() as u64];
        for (file, offset) in children {
            words.extend([*file, *offset]);
        }
        for (i, word) in words.iter().enumerate() {
            block[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        block
    };
    // File 0: root (1) -> [file 0 @4096 (1000: done), file 1 @0 (20), file 1 @4096 (300)].
    // Depth first from the last pushed: 300, then 20, then 1000 (DONE): 4 hops.
    let mut zero = node(1, &[(0, 4096), (1, 0), (1, 4096)]);
    zero.extend(node(1000, &[]));
    let mut one = node(20, &[]);
    one.extend(node(300, &[]));
    let a = write_fragmented(&fs, "a", &zero, 1);
    let b = write_fragmented(&fs, "b", &one, 1);
    let mut request = ChainRequest::new(a, 0, &[]);
    request.files = vec![a, b];
    let outcome = binding.run(&walk, &request).expect("run");
    let word =
        |i: usize| u64::from_le_bytes(outcome.scratch[i * 8..i * 8 + 8].try_into().expect("8"));
    assert_eq!((outcome.status, outcome.hops), (status::DONE, 4));
    assert_eq!((word(0), word(1)), (1 + 300 + 20 + 1000, 4));
    // A child naming a file the chain was not given is refused.
    request.files = vec![a];
    let outcome = binding.run(&walk, &request).expect("run");
    assert_eq!(outcome.status, status::INVALID);
}

#[test]
fn pipelined_lookups_match_the_reference_walk() {
    let Some((_image, fs, mut binding)) = setup("pipelined", 128 << 20) else {
        return;
    };
    let btree = binding.bind("btree", examples::BTREE).expect("bind");
    let all = keys(777, 4000);
    let present: Vec<u64> = all.iter().copied().step_by(2).collect();
    let pairs: Vec<(u64, u64)> = present.iter().map(|k| (*k, k / 3)).collect();
    let fanout = index::fanout_for_depth(pairs.len() as u64, 4, 512).expect("fanout");
    let tree = index::build_btree(&pairs, 512, fanout).expect("build");
    let ino = write_fragmented(&fs, "tree", &tree.bytes, 3);
    let probes: Vec<u64> = all.iter().copied().step_by(7).take(300).collect();
    let items: Vec<BatchItem> = probes
        .iter()
        .map(|key| BatchItem::new(0, &lookup_scratch(*key)))
        .collect();
    let mut request = BatchRequest::new(ino);
    request.read_len = 512;
    // Windows smaller than, equal to and larger than a kernel call's 32 lookups; the
    // mapping starts with nothing mapped, so the first lookups miss.
    for window in [1, 5, 32, 100] {
        binding.remap().expect("remap");
        let (outcomes, counters) = binding
            .run_pipelined(&btree, &request, &items, window)
            .expect("pipelined");
        assert!(counters.prefetched > 0, "window {window}: {counters:?}");
        assert_eq!(outcomes.len(), items.len());
        for (key, (outcome, _latency)) in probes.iter().zip(&outcomes) {
            let expected = index::btree_lookup(&mut reader(&fs, ino), 512, *key).expect("walk");
            let found = u64::from_le_bytes(outcome.scratch[8..16].try_into().expect("8"));
            let value = u64::from_le_bytes(outcome.scratch[16..24].try_into().expect("8"));
            assert_eq!(outcome.status, status::DONE, "key {key}, window {window}");
            assert_eq!(
                Answer {
                    value: (found == 1).then_some(value),
                    hops: outcome.hops
                },
                expected,
                "key {key}, window {window}"
            );
        }
    }
    // No lookups: nothing to do.
    let (none, _) = binding
        .run_pipelined(&btree, &request, &[], 32)
        .expect("empty");
    assert!(none.is_empty());
}

/// A chain run with NO_FAULT stops at a hop whose block is not mapped, says which block
/// and where to resume, and resumed there (naming the block) goes on from that hop, not
/// from the first; the answer at the end is the right one. A chain that names another
/// block keeps stopping at the same hop.
#[test]
fn a_missed_hop_resumes_where_it_stopped() {
    let Some((_image, fs, binding)) = setup("resume", 64 << 20) else {
        return;
    };
    let btree = binding.bind("btree", examples::BTREE).expect("bind");
    let shape = index::FullBtree {
        depth: 4,
        fanout: 8,
        node_size: 4096,
    };
    let pairs: Vec<(u64, u64)> = (0..shape.keys()).map(|i| (2 * i, 5 * i)).collect();
    let tree = index::build_btree(&pairs, 4096, 8).expect("build");
    let ino = write_fragmented(&fs, "tree", &tree.bytes, 2);
    let file = binding.register(ino).expect("register");
    let extents = fs.extents(ino).expect("extents");
    let device = |offset: u64| {
        let block = offset / 4096;
        let extent = extents
            .iter()
            .find(|e| e.logical <= block && block < e.logical + e.length)
            .expect("mapped");
        (extent.physical + block - extent.logical) * 4096
    };
    let item = 300;
    let path = shape.path_of(item);
    // A mapping of its own: nothing of it is mapped yet, so the first hop misses. (A
    // fault maps the cached pages around it too, so later hops may not.)
    let mapping = DeviceMapping::map(&fs).expect("map");
    let (map_addr, map_len) = mapping.range();
    let mut ctx = ChainCtx {
        file_count: 1,
        hop_limit: MAX_HOPS,
        read_len: 4096,
        map_addr,
        map_len,
        flags: NO_FAULT,
        ..ChainCtx::default()
    };
    ctx.files[0] = file;
    ctx.scratch[..24].copy_from_slice(&lookup_scratch(2 * item));
    let run = |ctx: &mut ChainCtx| {
        btree.chain_program().test_run_pod(ctx).expect("test run");
    };
    let mut resumed_at = Vec::new();
    for _ in 0..=shape.depth {
        run(&mut ctx);
        if ctx.status != status::MISSING {
            break;
        }
        let hop = ctx.start_hop as usize;
        assert!(hop < path.len(), "{ctx:?}");
        assert_eq!(
            ctx.start_offset, path[hop],
            "the offset of the hop that missed"
        );
        assert_eq!(ctx.missing, device(path[hop]), "that hop's block");
        assert!(
            resumed_at.last().is_none_or(|last| *last < hop),
            "resumed at hop {hop} after {resumed_at:?}: a miss goes on, not back"
        );
        resumed_at.push(hop);
        if resumed_at.len() == 1 {
            // Naming no block: the same hop misses again, and says the same.
            let mut again = ctx;
            again.missing = u64::MAX;
            run(&mut again);
            assert_eq!(
                (again.status, again.start_hop, again.missing),
                (status::MISSING, ctx.start_hop, ctx.missing)
            );
        }
    }
    assert_eq!(ctx.status, status::DONE, "{ctx:?}");
    assert_eq!(ctx.hops, shape.depth);
    assert_eq!(resumed_at.first(), Some(&0), "the root was not mapped");
    assert!(
        resumed_at.len() >= 2,
        "a later hop missed too (the leaves are far from the root): {resumed_at:?}"
    );
    let word = |i: usize| u64::from_le_bytes(ctx.scratch[i * 8..i * 8 + 8].try_into().expect("8"));
    assert_eq!((word(0), word(1), word(2)), (2 * item, 1, 5 * item));
}
