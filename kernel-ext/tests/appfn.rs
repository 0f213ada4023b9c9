//! The C helper library (bpf/abi/include/exofs_helpers.h) in the kernel: a function built
//! on it (a binary search over big-endian keys, an SQLite varint, a LEB128 varint) is
//! linked into the driver, verified, and run over real files; it must answer what Rust's
//! own `partition_point` and exofs-appfn's encoders say, at every size of the search up to
//! a block's worth of entries (the verifier's work does not grow with it).
//!
//! Needs root (CAP_BPF + CAP_PERFMON); without it each test prints a SKIPPED line.

mod common;

use common::{compile_c, setup};
use exofs_abi::chain::{status, BLOCK_SIZE};
use exofs_appfn::encode;
use kernel_ext::binding::ChainRequest;

const SOURCE: &str = r#"
#include "exofs_helpers.h"

/* Entry i is a big-endian u32 key at 4 + 4 i; arg points to the sought key. */
static int key_before(struct exofs_hop_state *s, __u32 i, void *arg)
{
	int ok = 1;
	__u32 key = exofs_be32(s, 4 + 4 * (__u64)i, &ok);

	if (!ok)
		return -1;
	return key < *(__u64 *)arg;
}

EXOFS_DEFINE_PARTITION_POINT(search, key_before)

/* Scratch words: in 0 the key, 3 an SQLite varint's offset, 6 a LEB128's offset; out 1
 * the search's index, 4 and 5 the SQLite varint and its length, 7 and 8 the LEB128 and
 * its length. The block starts with the count of keys, a big-endian u16. */
int next(struct exofs_hop_state *s)
{
	__u64 *w = (__u64 *)s->scratch, sought = w[0], value = 0;
	__u32 index;
	int ok = 1;
	__u32 count = exofs_be16(s, 0, &ok);

	if (!ok || search(s, count, &sought, &index) < 0)
		return EXOFS_NEXT_ABORT;
	w[1] = index;
	w[5] = exofs_sqlite_varint(s, w[3], &value);
	w[4] = value;
	value = 0;
	w[8] = exofs_leb128(s, w[6], &value);
	w[7] = value;
	return EXOFS_NEXT_DONE;
}
"#;

/// Where the test puts its varints: after the largest key array.
const SQLITE_AT: usize = 4010;
const LEB128_AT: usize = 4040;

#[test]
fn the_c_helpers_search_and_decode_in_the_kernel_as_the_references_do() {
    let Some((_image, fs, binding)) = setup("appfn-c", 16 << 20) else {
        return;
    };
    let program = binding
        .bind("helpers", &compile_c("helpers", SOURCE))
        .expect("the helpers verify");
    let varints = [
        0u64,
        127,
        128,
        16383,
        1 << 21,
        (1 << 56) - 1,
        1 << 56,
        u64::MAX,
    ];
    for (n, count) in [0usize, 1, 2, 7, 64, 1001].into_iter().enumerate() {
        let value = varints[n % varints.len()];
        let mut block = vec![0u8; BLOCK_SIZE];
        block[..2].copy_from_slice(&(count as u16).to_be_bytes());
        let keys: Vec<u32> = (0..count as u32).map(|i| 3 * i + 1).collect();
        for (i, key) in keys.iter().enumerate() {
            block[4 + 4 * i..8 + 4 * i].copy_from_slice(&key.to_be_bytes());
        }
        let (sqlite, sqlite_len) = encode::sqlite_varint(value);
        block[SQLITE_AT..SQLITE_AT + sqlite_len].copy_from_slice(&sqlite[..sqlite_len]);
        let (leb, leb_len) = encode::leb128(value);
        block[LEB128_AT..LEB128_AT + leb_len].copy_from_slice(&leb[..leb_len]);
        let ino = common::write_fragmented(&fs, &format!("keys{count}"), &block, 1);
        let last = keys.last().copied().unwrap_or(0);
        for sought in [
            0u64,
            1,
            2,
            4,
            u64::from(last),
            u64::from(last) + 1,
            u64::MAX,
        ] {
            let mut scratch = [0u8; 72];
            let mut put = |word: usize, v: u64| {
                scratch[8 * word..8 * word + 8].copy_from_slice(&v.to_le_bytes());
            };
            put(0, sought);
            put(3, SQLITE_AT as u64);
            put(6, LEB128_AT as u64);
            let outcome = binding
                .run(&program, &ChainRequest::new(ino, 0, &scratch))
                .expect("run");
            assert_eq!(outcome.status, status::DONE, "{count} keys, {sought}");
            let word = |i: usize| {
                u64::from_le_bytes(outcome.scratch[8 * i..8 * i + 8].try_into().expect("8"))
            };
            let expected = keys.partition_point(|&k| u64::from(k) < sought);
            assert_eq!(word(1), expected as u64, "{sought} among {count} keys");
            assert_eq!(
                (word(4), word(5)),
                (value, sqlite_len as u64),
                "SQLite {value}"
            );
            assert_eq!(
                (word(7), word(8)),
                (value, leb_len as u64),
                "LEB128 {value}"
            );
        }
    }
}
