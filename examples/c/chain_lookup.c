/*
 * chain_lookup: look keys up in an index file on an exofs mount, as an ordinary
 * unprivileged program, through the mount's chain ioctls. The mount daemon runs the
 * bound program (for instance `exofs prog load MOUNTPOINT btree example:btree`) in the
 * kernel, however many hops the lookup takes, if the mount's policy grants it.
 *
 *   chain_lookup FILE PROGRAM KEY [HOPS]          one lookup
 *   chain_lookup --batch FILE PROGRAM KEY COUNT   COUNT lookups (KEY, KEY+1, ...) in
 *                                                 one request
 *
 * Prints `key K: value V (N hops)` or `key K: not found (N hops)` per lookup. Exit 0 when
 * every lookup ran, 1 when one did not finish, 2 when the request was refused (the
 * message names errno: EACCES for the policy, ENOENT for an unknown program).
 *
 * Build: cc -I bpf/abi/include -o chain_lookup examples/c/chain_lookup.c
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "exofs.h"

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

static int refused(const char *what)
{
	fprintf(stderr, "chain_lookup: %s: %s (errno %d)\n", what, strerror(errno), errno);
	return 2;
}

static int one(int fd, const char *program, __u64 key, __u32 hops)
{
	struct exofs_chain_ioctl request = {
		.hop_limit = hops, /* 0: as many as the grant allows */
		.read_len = EXOFS_BLOCK_SIZE,
	};

	snprintf(request.program, sizeof request.program, "%s", program);
	ask(request.scratch, key);
	if (ioctl(fd, EXOFS_IOC_CHAIN, &request) < 0)
		return refused("EXOFS_IOC_CHAIN");
	return report(key, request.status, request.hops, request.scratch);
}

static int batch(int fd, const char *program, __u64 key, __u32 count)
{
	static struct exofs_batch_ioctl request;
	int worst = 0;

	request.read_len = EXOFS_BLOCK_SIZE;
	request.count = count;
	snprintf(request.program, sizeof request.program, "%s", program);
	for (__u32 i = 0; i < count && i < EXOFS_MAX_BATCH; i++)
		ask(request.lookups[i].scratch, key + i);
	if (ioctl(fd, EXOFS_IOC_CHAIN_BATCH, &request) < 0)
		return refused("EXOFS_IOC_CHAIN_BATCH");
	for (__u32 i = 0; i < count && i < EXOFS_MAX_BATCH; i++) {
		int outcome = report(key + i, request.lookups[i].status, request.lookups[i].hops,
				     request.lookups[i].scratch);
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
	int fd, outcome;

	if (count < 4 || count > 5 || (is_batch && count != 5)) {
		fprintf(stderr, "usage: %s FILE PROGRAM KEY [HOPS]\n"
				"       %s --batch FILE PROGRAM KEY COUNT\n", argv[0], argv[0]);
		return 2;
	}
	fd = open(args[1], O_RDONLY);
	if (fd < 0)
		return refused(args[1]);
	if (is_batch)
		outcome = batch(fd, args[2], strtoull(args[3], NULL, 0), strtoul(args[4], NULL, 0));
	else
		outcome = one(fd, args[2], strtoull(args[3], NULL, 0),
			      count == 5 ? strtoul(args[4], NULL, 0) : 0);
	close(fd);
	return outcome;
}
