/*
 * B-tree search over fixed-layout nodes of 512 B or 4 KiB, in C: the same function as
 * bpf/examples/src/bin/btree.rs (layout in exofs.h, "example application functions").
 *
 * Build: clang -O2 -g -target bpf -I bpf/abi/include -I /usr/include/$(uname -m)-linux-gnu \
 *            -c btree.c -o btree.o
 * The binder takes the global function `next` and its static callees from .text.
 */
#include "exofs.h"

#define SEARCH_STEPS 9 /* enough for the 255 entries of a 4 KiB node */

/* The u64 at byte `at` of the block, or -1 in *ok if it was not read. */
static __attribute__((always_inline)) __u64 data_u64(const struct exofs_hop_state *state,
						     __u64 at, int *ok)
{
	if (at % 8 != 0 || at > EXOFS_BLOCK_SIZE - 8 || at + 8 > state->data_len) {
		*ok = 0;
		return 0;
	}
	return *(const __u64 *)&state->data[at];
}

static __attribute__((always_inline)) int answer(struct exofs_hop_state *state, int found,
						 __u64 value)
{
	struct exofs_lookup *lookup = (struct exofs_lookup *)state->scratch;

	lookup->found = found;
	lookup->value = found ? value : 0;
	return EXOFS_NEXT_DONE;
}

int next(struct exofs_hop_state *state)
{
	struct exofs_lookup *lookup = (struct exofs_lookup *)state->scratch;
	__u64 key = lookup->key, header, node_size, low = 0, high, middle, at, entry_key, value;
	__u32 magic, level, count;
	int ok = 1, step;

	header = data_u64(state, 0, &ok);
	node_size = data_u64(state, 8, &ok) & 0xffffffff;
	if (!ok)
		return EXOFS_NEXT_ABORT;
	magic = (__u32)header;
	level = (__u16)(header >> 32);
	count = (__u16)(header >> 48);
	if (magic != EXOFS_BTREE_MAGIC || node_size > state->data_len ||
	    count > (node_size - EXOFS_BTREE_HEADER_SIZE) / EXOFS_BTREE_ENTRY_SIZE)
		return EXOFS_NEXT_ABORT;

	/* Largest entry whose key is <= key: entries[..low] are <= key, [high..] are >. */
	high = count;
	for (step = 0; step < SEARCH_STEPS && low < high; step++) {
		middle = (low + high) / 2;
		entry_key = data_u64(state, EXOFS_BTREE_HEADER_SIZE +
						    middle * EXOFS_BTREE_ENTRY_SIZE, &ok);
		if (!ok)
			return EXOFS_NEXT_ABORT;
		if (entry_key <= key)
			low = middle + 1;
		else
			high = middle;
	}
	if (low == 0)
		return answer(state, 0, 0);
	at = EXOFS_BTREE_HEADER_SIZE + (low - 1) * EXOFS_BTREE_ENTRY_SIZE;
	entry_key = data_u64(state, at, &ok);
	value = data_u64(state, at + 8, &ok);
	if (!ok)
		return EXOFS_NEXT_ABORT;
	if (level == 0)
		return answer(state, entry_key == key, value);
	state->next_count = 1;
	state->next_file[0] = state->file;
	state->next_offset[0] = value;
	return EXOFS_NEXT_CONTINUE;
}
