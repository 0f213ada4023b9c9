/* Helpers for exofs application functions in C: the C side of the Rust crate exofs-appfn
 * (bpf/appfn), with the same names prefixed exofs_. docs/BPF.md shows the patterns.
 *
 * - Every read masks its index to the block, so the verifier proves it in bounds whatever
 *   clang did to the checks in the source; the checks against data_len stay, as logic:
 *   a read past the bytes the hop read sets *ok to 0 (and returns 0).
 * - Loops with long bodies or data-dependent counts go through bpf_loop, whose body the
 *   verifier checks once, not once per iteration and path.
 * - Positions carried between loop steps, and the lengths varints return, pass through
 *   exofs_opaque (the hop state's memory, which the verifier does not track): otherwise
 *   the verifier follows the rest of the walk once per value they can take ("BPF program
 *   is too large", "the sequence of 8193 jumps is too complex").
 *
 * The last 16 bytes of the scratch belong to these helpers (EXOFS_HELPER_AREA).
 */
#ifndef EXOFS_HELPERS_H
#define EXOFS_HELPERS_H

#include "exofs.h"

#define EXOFS_BLOCK_MASK (EXOFS_BLOCK_SIZE - 1)
/* Steps that always suffice for a binary search over up to EXOFS_BLOCK_SIZE entries. */
#define EXOFS_SEARCH_STEPS 13
/* The helpers' 16 bytes of scratch: the search's bounds, then exofs_opaque's word. */
#define EXOFS_HELPER_AREA (EXOFS_SCRATCH_SIZE - 16)
#define EXOFS_SEARCH_WORD EXOFS_HELPER_AREA
#define EXOFS_OPAQUE_WORD (EXOFS_HELPER_AREA + 8)

#define EXOFS_INLINE static __attribute__((always_inline)) inline

/* bpf_loop (helper 181): calls callback(index, ctx) for index 0, 1, ... up to nr_loops
 * times (at most 1 << 23), stopping when it returns 1; returns the calls made. Named
 * exofs_bpf_loop so as not to clash with libbpf's declaration, whose count is a __u32:
 * this one's is 64-bit on purpose. The verifier inlines bpf_loop and compares all 64 bits
 * of the register with its maximum, and a 32-bit value may arrive with garbage above it
 * (the call then does nothing and returns -E2BIG). Declared this way, the compiler
 * zero-extends it. */
static long (*exofs_bpf_loop)(__u64 nr_loops, void *callback, void *ctx,
			      __u64 flags) = (void *)181;

/* The u64 at scratch offset `at` (8-aligned), read from memory whose contents the
 * verifier does not track. */
EXOFS_INLINE __u64 exofs_scratch_word(struct exofs_hop_state *s, __u64 at)
{
	return *(volatile __u64 *)&s->scratch[at & (EXOFS_SCRATCH_SIZE - 8)];
}

EXOFS_INLINE void exofs_set_scratch_word(struct exofs_hop_state *s, __u64 at, __u64 value)
{
	*(volatile __u64 *)&s->scratch[at & (EXOFS_SCRATCH_SIZE - 8)] = value;
}

/* `value`, with its range forgotten by the verifier (see the top of this file). */
EXOFS_INLINE __u64 exofs_opaque(struct exofs_hop_state *s, __u64 value)
{
	exofs_set_scratch_word(s, EXOFS_OPAQUE_WORD, value);
	return exofs_scratch_word(s, EXOFS_OPAQUE_WORD);
}

/* The byte at `at` of the hop's data; *ok = 0 past data_len. */
EXOFS_INLINE __u8 exofs_byte(const struct exofs_hop_state *s, __u64 at, int *ok)
{
	if (at >= s->data_len) {
		*ok = 0;
		return 0;
	}
	return s->data[at & EXOFS_BLOCK_MASK];
}

/* `len` (at most 8) bytes at `at`, big-endian, unsigned; *ok = 0 past data_len. */
EXOFS_INLINE __u64 exofs_be_var(const struct exofs_hop_state *s, __u64 at, __u64 len, int *ok)
{
	__u64 value = 0;
	int i;

	if (len > 8 || at >= EXOFS_BLOCK_SIZE || at + len > s->data_len) {
		*ok = 0;
		return 0;
	}
	for (i = 0; i < 8; i++) {
		if (i >= len)
			break;
		value = value << 8 | s->data[(at + i) & EXOFS_BLOCK_MASK];
	}
	return value;
}

/* `len` (at most 8) bytes at `at`, little-endian, unsigned. */
EXOFS_INLINE __u64 exofs_le_var(const struct exofs_hop_state *s, __u64 at, __u64 len, int *ok)
{
	__u64 value = 0;
	int i;

	if (len > 8 || at >= EXOFS_BLOCK_SIZE || at + len > s->data_len) {
		*ok = 0;
		return 0;
	}
	for (i = 0; i < 8; i++) {
		if (i >= len)
			break;
		value |= (__u64)s->data[(at + i) & EXOFS_BLOCK_MASK] << (8 * i);
	}
	return value;
}

#define exofs_be16(s, at, ok) ((__u16)exofs_be_var(s, at, 2, ok))
#define exofs_be32(s, at, ok) ((__u32)exofs_be_var(s, at, 4, ok))
#define exofs_be64(s, at, ok) exofs_be_var(s, at, 8, ok)
#define exofs_le16(s, at, ok) ((__u16)exofs_le_var(s, at, 2, ok))
#define exofs_le32(s, at, ok) ((__u32)exofs_le_var(s, at, 4, ok))
#define exofs_le64(s, at, ok) exofs_le_var(s, at, 8, ok)

/* An SQLite varint at `at` into *value: returns its length (1..9), 0 if it runs past the
 * data. Big-endian groups of 7 bits, the high bit set on every byte but the last; a ninth
 * byte gives all 8 bits. Position and length go through exofs_opaque. */
static __attribute__((noinline)) __u64 exofs_sqlite_varint(struct exofs_hop_state *s, __u64 at,
							     __u64 *value)
{
	__u64 v = 0, length = 0;
	int i, ok = 1;
	__u8 b;

	at = exofs_opaque(s, at);
	for (i = 0; i < 9; i++) {
		b = exofs_byte(s, at + i, &ok);
		if (!ok)
			return 0;
		if (i == 8) {
			v = v << 8 | b;
			length = 9;
			break;
		}
		v = v << 7 | (b & 0x7f);
		if (b < 0x80) {
			length = i + 1;
			break;
		}
	}
	*value = v;
	return exofs_opaque(s, length);
}

/* An unsigned LEB128 varint at `at` into *value: returns its length (1..10), 0 if it runs
 * past the data or past 64 bits. */
static __attribute__((noinline)) __u64 exofs_leb128(struct exofs_hop_state *s, __u64 at,
						      __u64 *value)
{
	__u64 v = 0, length = 0;
	int i, ok = 1;
	__u8 b;

	at = exofs_opaque(s, at);
	for (i = 0; i < 10; i++) {
		b = exofs_byte(s, at + i, &ok);
		if (!ok || (i == 9 && b > 1))
			return 0;
		v |= (__u64)(b & 0x7f) << (7 * i);
		if (b < 0x80) {
			length = i + 1;
			break;
		}
	}
	*value = v;
	return exofs_opaque(s, length);
}

/*
 * A binary search that verifies at any size: EXOFS_DEFINE_PARTITION_POINT(name, before)
 * defines
 *     static int name(struct exofs_hop_state *s, __u32 count, void *arg, __u32 *index);
 * which sets *index to the first of `count` sorted entries (at most EXOFS_BLOCK_SIZE)
 * that is not "before" the sought key, in 0..count, and returns 0; or returns -1 when
 * `before` failed. `before` is your function
 *     static int before(struct exofs_hop_state *s, __u32 i, void *arg);
 * reading entry i's key: 1 if it sorts before the sought one, 0 if not, -1 if it cannot
 * be read. `arg` is passed through (a pointer to your key, say). One bpf_loop of
 * EXOFS_SEARCH_STEPS steps; the bounds live in the helpers' scratch word.
 */
#define EXOFS_DEFINE_PARTITION_POINT(name, before)                                             \
	struct name##_ctx {                                                                    \
		struct exofs_hop_state *s;                                                     \
		void *arg;                                                                     \
	};                                                                                     \
	static long name##_step(__u64 i, void *p)                                              \
	{                                                                                      \
		struct name##_ctx *c = p;                                                      \
		__u64 w = exofs_scratch_word(c->s, EXOFS_SEARCH_WORD), next;                   \
		__u32 low = (__u32)w, high = (__u32)(w >> 32), middle;                         \
		int r;                                                                         \
		if (low >= high || high > EXOFS_BLOCK_SIZE)                                    \
			return 1;                                                              \
		middle = low + (high - low) / 2;                                               \
		r = before(c->s, middle, c->arg);                                              \
		if (r < 0)                                                                     \
			next = ~0ull;                                                          \
		else if (r)                                                                    \
			next = (__u64)high << 32 | (middle + 1);                               \
		else                                                                           \
			next = (__u64)middle << 32 | low;                                      \
		exofs_set_scratch_word(c->s, EXOFS_SEARCH_WORD, next);                         \
		return r < 0;                                                                  \
	}                                                                                      \
	static int name(struct exofs_hop_state *s, __u32 count, void *arg, __u32 *index)       \
	{                                                                                      \
		struct name##_ctx c = { s, arg };                                              \
		__u64 w;                                                                       \
		if (count > EXOFS_BLOCK_SIZE)                                                  \
			return -1;                                                             \
		exofs_set_scratch_word(s, EXOFS_SEARCH_WORD, (__u64)count << 32);              \
		exofs_bpf_loop(EXOFS_SEARCH_STEPS, name##_step, &c, 0);                        \
		w = exofs_scratch_word(s, EXOFS_SEARCH_WORD);                                  \
		if ((__u32)w != (__u32)(w >> 32) || (w >> 32) > EXOFS_BLOCK_SIZE)              \
			return -1;                                                             \
		*index = (__u32)w;                                                             \
		return 0;                                                                      \
	}

#endif /* EXOFS_HELPERS_H */
