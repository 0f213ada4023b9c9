/* exofs chain ABI for C authors of application functions.
 *
 * Kept identical to the Rust crate exofs-abi (bpf/abi/src): the test
 * bpf/abi/tests/c_header.rs compiles this header and compares every size and
 * offset with the Rust definitions. Little-endian, no implicit padding.
 */
#ifndef EXOFS_H
#define EXOFS_H

#include <linux/types.h>

/* Limits. */
#define EXOFS_BLOCK_SIZE 4096
#define EXOFS_MAX_HOPS 64
#define EXOFS_MAX_FANOUT 4
#define EXOFS_SCRATCH_SIZE 256
#define EXOFS_MAX_CHAIN_FILES 4
#define EXOFS_MAX_BATCH 32
#define EXOFS_EXTENTS_PER_CHUNK 32

/* What next() returns. */
#define EXOFS_NEXT_DONE 0
#define EXOFS_NEXT_CONTINUE 1
#define EXOFS_NEXT_ABORT 2

/* Chain statuses (struct exofs_chain_ctx.status). */
#define EXOFS_STATUS_DONE 0
#define EXOFS_STATUS_ABORTED 1
#define EXOFS_STATUS_HOP_LIMIT 2
#define EXOFS_STATUS_STALE 3
#define EXOFS_STATUS_OUT_OF_FILE 4
#define EXOFS_STATUS_HOLE 5
#define EXOFS_STATUS_NOT_REGISTERED 6
#define EXOFS_STATUS_DENIED 7
#define EXOFS_STATUS_FAULT 8
#define EXOFS_STATUS_INVALID 9

/* Extent flag: allocated, never written (reads as zeros; chains refuse it). */
#define EXOFS_EXTENT_UNWRITTEN 1

struct exofs_chain_file {
	__u64 ino;
	__u64 generation;
};

/* Arguments and results of one chain (the BPF_PROG_TEST_RUN context). */
struct exofs_chain_ctx {
	struct exofs_chain_file files[EXOFS_MAX_CHAIN_FILES];
	__u32 file_count;
	__u32 hop_limit;
	__u32 start_file;
	__u32 read_len;
	__u64 start_offset;
	__u64 map_addr;
	__u64 map_len;
	__u32 subject_uid;
	__u32 subject_gid;
	__u64 subject_cgroup;
	__s32 status;
	__u32 hops;
	__u32 flags;
	__u32 start_hop;
	__u64 missing;
	__u8 scratch[EXOFS_SCRATCH_SIZE];
};

/* What next() reads and writes at each hop. */
struct exofs_hop_state {
	__u32 hop;
	__u32 file;
	__u64 offset;
	__u32 data_len;
	__u32 next_count;
	__u32 next_file[EXOFS_MAX_FANOUT];
	__u64 next_offset[EXOFS_MAX_FANOUT];
	__u8 scratch[EXOFS_SCRATCH_SIZE];
	__u8 data[EXOFS_BLOCK_SIZE];
};

#define EXOFS_STATUS_MISSING 10
#define EXOFS_STATUS_NO_DAEMON 11 /* direct chains: the mount daemon is gone */
#define EXOFS_BATCH_SCRATCH_SIZE 32
#define EXOFS_NO_FAULT 1
#define EXOFS_SUBJECT_NAMED 2
#define EXOFS_TABLE_ONLY 4 /* direct: stop MISSING at a block the hot-block table lacks */

/* One lookup of a batch (the batch program's context is struct exofs_batch_ctx). */
struct exofs_batch_lookup {
	__u32 start_file;
	__s32 status;
	__u64 start_offset;
	__u32 hops;
	__u32 start_hop;
	__u64 missing;
	__u8 scratch[EXOFS_BATCH_SCRATCH_SIZE];
};

struct exofs_batch_ctx {
	struct exofs_chain_file files[EXOFS_MAX_CHAIN_FILES];
	__u32 file_count;
	__u32 hop_limit;
	__u32 read_len;
	__u32 count;
	__u64 map_addr;
	__u64 map_len;
	__u32 subject_uid;
	__u32 subject_gid;
	__u64 subject_cgroup;
	__u32 flags;
	__u32 done;
	struct exofs_batch_lookup lookups[EXOFS_MAX_BATCH];
};

/* The files map (key -> value). */
struct exofs_file_key {
	__u64 ino;
};

struct exofs_file_info {
	__u64 generation;
	__u64 size;
	__u32 chunk_shift;
	__u32 flags;
};

/* The extents map (key -> value). */
struct exofs_extent_key {
	__u64 ino;
	__u64 chunk;
};

struct exofs_extent_entry {
	__u64 logical;
	__u64 physical;
	__u32 length;
	__u32 flags;
};

struct exofs_extent_chunk {
	__u32 count;
	__u32 reserved;
	struct exofs_extent_entry extents[EXOFS_EXTENTS_PER_CHUNK];
};

/*
 * Layouts of the example application functions (Rust: exofs_abi::formats). All integers
 * little-endian. Every example's scratch is a struct exofs_lookup.
 */
struct exofs_lookup {
	__u64 key;   /* in */
	__u64 found; /* out: 0 or 1 */
	__u64 value; /* out */
};

/* B-tree node: header, then `count` (key, value) entries sorted by key. Leaf (level 0):
 * value = the key's value; inner: value = byte offset of the child whose smallest key is
 * `key`. A node is 512 or 4096 bytes, aligned to its size; the root is at byte 0. A hop
 * may read more than the node (to the end of its block), never less. */
#define EXOFS_BTREE_MAGIC 0x42545845u
#define EXOFS_BTREE_HEADER_SIZE 16
#define EXOFS_BTREE_ENTRY_SIZE 16
struct exofs_btree_header {
	__u32 magic;
	__u16 level;
	__u16 count;
	__u32 node_size;
	__u32 reserved;
};
struct exofs_btree_entry {
	__u64 key;
	__u64 value;
};

/* Hash chains: a header at byte 0, u64 bucket slots from EXOFS_HASH_BUCKETS_OFFSET
 * (0 = empty), entries anywhere, each inside one block. Hop 0 reads the header, hop 1 the
 * key's bucket slot (FNV-1a of the key's 8 bytes, modulo buckets), later hops entries. */
#define EXOFS_HASH_MAGIC 0x4853414858465845ull
#define EXOFS_HASH_BUCKETS_OFFSET 4096
#define EXOFS_HASH_END 0
struct exofs_hash_header {
	__u64 magic;
	__u64 buckets;
};
struct exofs_hash_entry {
	__u64 next;
	__u64 key;
	__u64 value;
};

/* Linked list nodes, each inside one block, the head at byte 0; next = EXOFS_LIST_END
 * ends the list. */
#define EXOFS_LIST_END 0xffffffffffffffffull
struct exofs_list_node {
	__u64 next;
	__u64 key;
	__u64 value;
};

/* SQLite rowid lookups (example:sqlite_rowid; Rust: exofs_abi::formats::sqlite). A chain
 * starts at the table's root page, (root - 1) * page_size; the caller reads the page and
 * usable sizes from the database header. Only the first 32 bytes travel in a batch. */
#define EXOFS_SQLITE_MAX_BYTES 200
#define EXOFS_SQLITE_NOT_FOUND 0
#define EXOFS_SQLITE_NULL 1
#define EXOFS_SQLITE_INTEGER 2
#define EXOFS_SQLITE_REAL 3
#define EXOFS_SQLITE_TEXT 4
#define EXOFS_SQLITE_BLOB 5
#define EXOFS_SQLITE_ABSENT 6 /* the row has fewer columns: the column's default applies */
#define EXOFS_SQLITE_LENGTH_ONLY 0x80 /* phase flag, in: a text's or blob's length, no bytes */
struct exofs_sqlite_lookup {
	__s64 rowid;      /* in */
	__u16 column;     /* in: its index in the record (declared order less VIRTUAL columns) */
	__u16 page_size;  /* in: 512..4096 */
	__u16 usable;     /* in: page size minus the reserved bytes */
	__u8 phase;       /* 0 at the start, or EXOFS_SQLITE_LENGTH_ONLY */
	__u8 kind;        /* out: EXOFS_SQLITE_* */
	__u32 length;     /* out: bytes of the value (text, blob: all of it) */
	__u32 progress;   /* internal */
	__u64 value;      /* out: the integer, or the real's bits */
	__u8 bytes[EXOFS_SQLITE_MAX_BYTES]; /* out: a text's or blob's first bytes */
};

/*
 * The chain ioctls on a file open on an exofs mount (Rust: exofs_abi::ioctl). The
 * mount daemon runs the chain after checking the policy. errno: EACCES (not granted),
 * ENOENT (no such program), EINVAL (malformed), ENOTTY (unknown request or layout),
 * EOPNOTSUPP (the daemon has no kernel binding). _IOWR and _IOR come from
 * <sys/ioctl.h>.
 */
#define EXOFS_IOCTL_TYPE 'E'
#define EXOFS_PROGRAM_NAME_SIZE 64
struct exofs_chain_ioctl {
	char program[EXOFS_PROGRAM_NAME_SIZE]; /* in: NUL-terminated */
	__u64 start;                           /* in: offset of the first hop */
	__u32 hop_limit;                       /* in: 1..EXOFS_MAX_HOPS, 0: the grant's */
	__u32 read_len;                        /* in: 1..EXOFS_BLOCK_SIZE */
	__s32 status;                          /* out: EXOFS_STATUS_* */
	__u32 hops;                            /* out */
	__u8 scratch[EXOFS_SCRATCH_SIZE];      /* in and out */
};
struct exofs_ioctl_lookup {
	__u64 start;
	__s32 status;
	__u32 hops;
	__u8 scratch[EXOFS_BATCH_SCRATCH_SIZE];
};
struct exofs_batch_ioctl {
	char program[EXOFS_PROGRAM_NAME_SIZE];
	__u32 hop_limit;
	__u32 read_len;
	__u32 count; /* in: 1..EXOFS_MAX_BATCH */
	__u32 done;  /* out: lookups with status DONE */
	struct exofs_ioctl_lookup lookups[EXOFS_MAX_BATCH];
};
#define EXOFS_MESSAGE_SIZE 1024
struct exofs_policy_reload {
	char message[EXOFS_MESSAGE_SIZE]; /* out: empty, or what was wrong */
};
/*
 * Direct chains: EXOFS_IOC_DIRECT on a file of the mount tells which pins to open
 * (BPF_OBJ_GET, file_flags 0) and how the driver names the file. Then run the pin with
 * BPF_PROG_TEST_RUN on a struct exofs_chain_ctx (or, for the batch pin, a struct
 * exofs_batch_ctx) with files[0] = { ino, generation }, file_count 1, and map_addr,
 * map_len, the subject fields and flags all zero, while the file is open.
 * EXOFS_STATUS_STALE or EXOFS_STATUS_NOT_REGISTERED: the file changed (or was closed by
 * everyone); ask again.
 */
#define EXOFS_PIN_PATH_SIZE 256
struct exofs_direct_ioctl {
	char program[EXOFS_PROGRAM_NAME_SIZE];  /* in: NUL-terminated */
	__u64 ino;                              /* out */
	__u64 generation;                       /* out */
	__u32 max_hops;                         /* out: the caller's grant */
	__u32 max_batch;                        /* out */
	char chain_pin[EXOFS_PIN_PATH_SIZE];    /* out: the single-chain program's pin */
	char batch_pin[EXOFS_PIN_PATH_SIZE];    /* out: the batch program's pin */
};
#define EXOFS_IOC_CHAIN _IOWR(EXOFS_IOCTL_TYPE, 1, struct exofs_chain_ioctl)
#define EXOFS_IOC_CHAIN_BATCH _IOWR(EXOFS_IOCTL_TYPE, 2, struct exofs_batch_ioctl)
#define EXOFS_IOC_POLICY_RELOAD _IOR(EXOFS_IOCTL_TYPE, 3, struct exofs_policy_reload)
#define EXOFS_IOC_DIRECT _IOWR(EXOFS_IOCTL_TYPE, 4, struct exofs_direct_ioctl)

#endif /* EXOFS_H */
