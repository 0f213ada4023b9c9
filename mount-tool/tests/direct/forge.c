/*
 * forge: a hostile direct caller, for mount-tool/tests/direct.rs. It opens the pins given
 * on the command line, then reads one request per line from stdin, builds the context
 * from `field=value` words (every field may be set to anything), runs it with
 * BPF_PROG_TEST_RUN and prints one line:
 *
 *   chain ...  ->  status=S hops=H retval=R scratch=HEX(64 bytes)
 *   batch ...  ->  retval=R done=D l0=S/H/HEX(32 bytes) l1=...
 *   discover PATH PROGRAM -> ino=I gen=G hops=H batch=B (EXOFS_IOC_DIRECT; PATH stays
 *                            open)
 *   pins CHAIN_PIN BATCH_PIN -> ready (runs later requests with these)
 *   close -> closed (closes every file `discover` opened)
 *   (a failed system call) -> error=ERRNO
 *
 * Fields (decimal or 0x...): ino gen ino1 gen1 files(file_count) hops(hop_limit) sfile
 * (start_file) len(read_len) start map_addr map_len uid gid cgroup flags shop(start_hop)
 * missing key count. `key` goes in the scratch's first 8 bytes (lookup i of a batch gets
 * key + i, all from `start`). Unset fields are those of an honest call: files=1,
 * len=4096, missing=~0.
 */
#define _GNU_SOURCE
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

static int obj_get(const char *path)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof attr);
	attr.pathname = (__u64)(unsigned long)path;
	return syscall(SYS_bpf, BPF_OBJ_GET, &attr, sizeof attr);
}

static int test_run(int prog, void *ctx, __u32 size, int *retval)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof attr);
	attr.test.prog_fd = prog;
	attr.test.ctx_in = (__u64)(unsigned long)ctx;
	attr.test.ctx_size_in = size;
	if (syscall(SYS_bpf, BPF_PROG_TEST_RUN, &attr, sizeof attr) < 0)
		return -1;
	*retval = (int)attr.test.retval;
	return 0;
}

static void hex(const __u8 *bytes, int n)
{
	for (int i = 0; i < n; i++)
		printf("%02x", bytes[i]);
}

struct request {
	__u64 ino, gen, ino1, gen1, files, hops, sfile, len, start, map_addr, map_len, uid, gid,
		cgroup, flags, shop, missing, key, count;
};

static void parse(char *line, struct request *r)
{
	memset(r, 0, sizeof *r);
	r->files = 1;
	r->len = EXOFS_BLOCK_SIZE;
	r->missing = ~0ull;
	r->count = 1;
	for (char *word = strtok(line, " \n"); word; word = strtok(NULL, " \n")) {
		char *eq = strchr(word, '=');
		if (!eq)
			continue;
		*eq = 0;
		__u64 value = strtoull(eq + 1, NULL, 0);
#define FIELD(name) if (strcmp(word, #name) == 0) r->name = value;
		FIELD(ino) FIELD(gen) FIELD(ino1) FIELD(gen1) FIELD(files) FIELD(hops)
		FIELD(sfile) FIELD(len) FIELD(start) FIELD(map_addr) FIELD(map_len) FIELD(uid)
		FIELD(gid) FIELD(cgroup) FIELD(flags) FIELD(shop) FIELD(missing) FIELD(key)
		FIELD(count)
#undef FIELD
	}
}

int main(int argc, char **argv)
{
	static struct exofs_chain_ctx chain;
	static struct exofs_batch_ctx batch;
	char line[4096];
	int chain_fd, batch_fd, files[64], opened = 0;

	if (argc != 3) {
		fprintf(stderr, "usage: %s CHAIN_PIN BATCH_PIN\n", argv[0]);
		return 2;
	}
	chain_fd = obj_get(argv[1]);
	batch_fd = obj_get(argv[2]);
	if (chain_fd < 0 || batch_fd < 0) {
		printf("error=%d\n", errno);
		return 2;
	}
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		struct request r;
		int is_batch = strncmp(line, "batch", 5) == 0;
		int retval;
		char a[1024], b[1024];

		if (sscanf(line, "discover %1023s %1023s", a, b) == 2) {
			struct exofs_direct_ioctl direct;
			int fd = open(a, O_RDONLY);

			memset(&direct, 0, sizeof direct);
			strncpy(direct.program, b, sizeof direct.program - 1);
			if (fd >= 0 && opened < 64)
				files[opened++] = fd;
			if (fd < 0 || ioctl(fd, EXOFS_IOC_DIRECT, &direct) < 0)
				printf("error=%d\n", errno);
			else
				printf("ino=%llu gen=%llu hops=%u batch=%u\n",
				       (unsigned long long)direct.ino,
				       (unsigned long long)direct.generation, direct.max_hops,
				       direct.max_batch);
			fflush(stdout);
			continue;
		}
		if (strncmp(line, "close", 5) == 0) {
			for (int i = 0; i < opened; i++)
				close(files[i]);
			opened = 0;
			printf("closed\n");
			fflush(stdout);
			continue;
		}
		if (sscanf(line, "pins %1023s %1023s", a, b) == 2) {
			close(chain_fd);
			close(batch_fd);
			chain_fd = obj_get(a);
			batch_fd = obj_get(b);
			if (chain_fd < 0 || batch_fd < 0)
				printf("error=%d\n", errno);
			else
				printf("ready\n");
			fflush(stdout);
			continue;
		}
		parse(line, &r);
		if (!is_batch) {
			memset(&chain, 0, sizeof chain);
			chain.files[0].ino = r.ino;
			chain.files[0].generation = r.gen;
			chain.files[1].ino = r.ino1;
			chain.files[1].generation = r.gen1;
			chain.file_count = r.files;
			chain.hop_limit = r.hops;
			chain.start_file = r.sfile;
			chain.read_len = r.len;
			chain.start_offset = r.start;
			chain.map_addr = r.map_addr;
			chain.map_len = r.map_len;
			chain.subject_uid = r.uid;
			chain.subject_gid = r.gid;
			chain.subject_cgroup = r.cgroup;
			chain.flags = r.flags;
			chain.start_hop = r.shop;
			chain.missing = r.missing;
			memcpy(chain.scratch, &r.key, sizeof r.key);
			if (test_run(chain_fd, &chain, sizeof chain, &retval) < 0) {
				printf("error=%d\n", errno);
			} else {
				printf("status=%d hops=%u retval=%d scratch=", chain.status, chain.hops,
				       retval);
				hex(chain.scratch, 64);
				printf("\n");
			}
		} else {
			memset(&batch, 0, sizeof batch);
			batch.files[0].ino = r.ino;
			batch.files[0].generation = r.gen;
			batch.files[1].ino = r.ino1;
			batch.files[1].generation = r.gen1;
			batch.file_count = r.files;
			batch.hop_limit = r.hops;
			batch.read_len = r.len;
			batch.count = r.count;
			batch.map_addr = r.map_addr;
			batch.map_len = r.map_len;
			batch.subject_uid = r.uid;
			batch.subject_gid = r.gid;
			batch.subject_cgroup = r.cgroup;
			batch.flags = r.flags;
			for (int i = 0; i < EXOFS_MAX_BATCH; i++) {
				batch.lookups[i].start_file = r.sfile;
				batch.lookups[i].start_offset = r.start;
				batch.lookups[i].start_hop = r.shop;
				batch.lookups[i].missing = r.missing;
				batch.lookups[i].status = -1;
				__u64 key = r.key + (__u64)i;
				memcpy(batch.lookups[i].scratch, &key, sizeof key);
			}
			if (test_run(batch_fd, &batch, sizeof batch, &retval) < 0) {
				printf("error=%d\n", errno);
			} else {
				printf("retval=%d done=%u", retval, batch.done);
				for (int i = 0; i < EXOFS_MAX_BATCH; i++) {
					printf(" l%d=%d/%u/", i, batch.lookups[i].status, batch.lookups[i].hops);
					hex(batch.lookups[i].scratch, EXOFS_BATCH_SCRATCH_SIZE);
				}
				printf("\n");
			}
		}
		fflush(stdout);
	}
	return 0;
}
