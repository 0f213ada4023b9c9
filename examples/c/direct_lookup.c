/*
 * direct_lookup: look keys up in an index file on an exofs mount, as an ordinary
 * unprivileged program that runs the chain in the kernel ITSELF: one EXOFS_IOC_DIRECT
 * ioctl asks the mount daemon which pins to open and how the driver names the file; every
 * lookup after that is one bpf(BPF_PROG_TEST_RUN) system call, with no daemon in the data
 * path. The driver checks the mount's policy on this process (uid, gid, cgroup) and reads
 * the blocks through the daemon's mapping of the device. The file must stay open while
 * chains run over it.
 *
 *   direct_lookup FILE PROGRAM KEY [HOPS]          one lookup
 *   direct_lookup --batch FILE PROGRAM KEY COUNT   COUNT lookups (KEY, KEY+1, ...) in
 *                                                  one call
 *
 * Prints `key K: value V (N hops)` or `key K: not found (N hops)` per lookup. Exit 0 when
 * every lookup ran, 1 when one did not finish (the status is printed: denied, the daemon
 * gone...), 2 when a system call failed (the message names it and errno).
 *
 * Build: cc -I bpf/abi/include -o direct_lookup examples/c/direct_lookup.c
 */
#define _GNU_SOURCE /* syscall(2) */
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "exofs.h"

static int failed(const char *what)
{
	fprintf(stderr, "direct_lookup: %s: %s (errno %d)\n", what, strerror(errno), errno);
	return 2;
}

static void ask(__u8 *scratch, __u64 key)
{
	struct exofs_lookup lookup = { .key = key };
	memcpy(scratch, &lookup, sizeof lookup);
}

static int report(__u64 key, __s32 status, __u32 hops, const __u8 *scratch)
{
	struct exofs_lookup lookup;

	if (status != EXOFS_STATUS_DONE) {
		printf("key %llu: status %d after %u hops\n", (unsigned long long)key, status, hops);
		return 1;
	}
	memcpy(&lookup, scratch, sizeof lookup);
	if (lookup.found)
		printf("key %llu: value %llu (%u hops)\n", (unsigned long long)key,
		       (unsigned long long)lookup.value, hops);
	else
		printf("key %llu: not found (%u hops)\n", (unsigned long long)key, hops);
	return 0;
}

/* BPF_OBJ_GET of a pin (a program's pin is opened read-write). */
static int obj_get(const char *path)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof attr);
	attr.pathname = (__u64)(unsigned long)path;
	return syscall(SYS_bpf, BPF_OBJ_GET, &attr, sizeof attr);
}

/* BPF_PROG_TEST_RUN of a syscall program: the context is read and written back. */
static int test_run(int prog, void *ctx, __u32 size)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof attr);
	attr.test.prog_fd = prog;
	attr.test.ctx_in = (__u64)(unsigned long)ctx;
	attr.test.ctx_size_in = size;
	if (syscall(SYS_bpf, BPF_PROG_TEST_RUN, &attr, sizeof attr) < 0)
		return -1;
	return (int)attr.test.retval;
}

static int one(const struct exofs_direct_ioctl *direct, __u64 key, __u32 hops)
{
	static struct exofs_chain_ctx ctx;
	int prog = obj_get(direct->chain_pin);

	if (prog < 0)
		return failed(direct->chain_pin);
	ctx.files[0].ino = direct->ino;
	ctx.files[0].generation = direct->generation;
	ctx.file_count = 1;
	ctx.hop_limit = hops ? hops : direct->max_hops;
	ctx.read_len = EXOFS_BLOCK_SIZE;
	ctx.missing = ~0ull;
	ask(ctx.scratch, key);
	if (test_run(prog, &ctx, sizeof ctx) < 0)
		return failed("BPF_PROG_TEST_RUN");
	close(prog);
	return report(key, ctx.status, ctx.hops, ctx.scratch);
}

static int batch(const struct exofs_direct_ioctl *direct, __u64 key, __u32 count)
{
	static struct exofs_batch_ctx ctx;
	int prog = obj_get(direct->batch_pin);
	int worst = 0, refused;

	if (prog < 0)
		return failed(direct->batch_pin);
	if (count > EXOFS_MAX_BATCH)
		count = EXOFS_MAX_BATCH;
	ctx.files[0].ino = direct->ino;
	ctx.files[0].generation = direct->generation;
	ctx.file_count = 1;
	ctx.hop_limit = direct->max_hops;
	ctx.read_len = EXOFS_BLOCK_SIZE;
	ctx.count = count;
	for (__u32 i = 0; i < count; i++) {
		ctx.lookups[i].missing = ~0ull;
		ask(ctx.lookups[i].scratch, key + i);
	}
	refused = test_run(prog, &ctx, sizeof ctx);
	close(prog);
	if (refused < 0)
		return failed("BPF_PROG_TEST_RUN");
	if (refused != EXOFS_STATUS_DONE) {
		/* The whole call was refused (policy, arguments, the daemon gone). */
		printf("batch: status %d\n", refused);
		return 1;
	}
	for (__u32 i = 0; i < count; i++) {
		int outcome = report(key + i, ctx.lookups[i].status, ctx.lookups[i].hops,
				     ctx.lookups[i].scratch);
		if (outcome > worst)
			worst = outcome;
	}
	return worst;
}

int main(int argc, char **argv)
{
	int is_batch = argc > 1 && strcmp(argv[1], "--batch") == 0;
	char **args = argv + is_batch;
	int count = argc - is_batch;
	struct exofs_direct_ioctl direct;
	int fd, outcome;

	if (count < 4 || count > 5 || (is_batch && count != 5)) {
		fprintf(stderr, "usage: %s FILE PROGRAM KEY [HOPS]\n"
				"       %s --batch FILE PROGRAM KEY COUNT\n", argv[0], argv[0]);
		return 2;
	}
	fd = open(args[1], O_RDONLY);
	if (fd < 0)
		return failed(args[1]);
	memset(&direct, 0, sizeof direct);
	snprintf(direct.program, sizeof direct.program, "%s", args[2]);
	if (ioctl(fd, EXOFS_IOC_DIRECT, &direct) < 0)
		return failed("EXOFS_IOC_DIRECT");
	/* The file stays open: the daemon keeps a file registered with the driver while a
	 * handle on it is open (closed, chains over it answer EXOFS_STATUS_NOT_REGISTERED). */
	if (is_batch)
		outcome = batch(&direct, strtoull(args[3], NULL, 0), strtoul(args[4], NULL, 0));
	else
		outcome = one(&direct, strtoull(args[3], NULL, 0),
			      count == 5 ? strtoul(args[4], NULL, 0) : 0);
	close(fd);
	return outcome;
}
