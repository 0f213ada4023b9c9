/*
 * posix_probe ROOT: runs file-system operations read from stdin, one per line, on paths
 * under ROOT, and prints one line per operation: the line, then "ok" (with what it
 * read, where it reads) or the errno's name. The permission tests run the same script
 * as the same user on exofs and on ext4 and compare the two outputs line by line.
 *
 * Operations (paths relative to ROOT; MODE octal; "-" as an id leaves it unchanged):
 *   open PATH FLAGS        FLAGS letters: r w (read, write), a (append), t (O_TRUNC),
 *                          c (O_CREAT, mode 0644), x (O_EXCL), d (O_DIRECTORY), 3
 *                          (access mode 3: no read or write, asks for both)
 *   read PATH              prints the content
 *   write PATH TEXT        writes TEXT at offset 0 (O_WRONLY)
 *   append PATH TEXT       O_WRONLY|O_APPEND
 *   truncate PATH LEN      truncate(2)
 *   ftruncate PATH LEN     open O_WRONLY, then ftruncate(2)
 *   ftruncate_ro PATH LEN  open O_RDONLY, then ftruncate(2)
 *   chmod PATH MODE
 *   chown PATH UID GID
 *   utimens PATH A M       A and M: now, omit, or seconds since the epoch
 *   touch PATH             utimensat with times NULL
 *   mkdir PATH MODE | rmdir PATH | unlink PATH | rename OLD NEW | link OLD NEW
 *   symlink TARGET PATH | mkfifo PATH MODE
 *   access PATH MASK       MASK letters r w x, or f
 *   exec PATH              fork, execve PATH; ok if it ran and exited 0
 *   chdir PATH             in a child process
 *   list PATH              the sorted names of a directory
 *   setxattr PATH NAME VALUE | getxattr PATH NAME | removexattr PATH NAME
 *   listxattr PATH         the sorted names
 *   stat PATH              type and permission bits, uid, gid, nlink, size (not of
 *                          directories)
 *   stamp PATH             remembers mtime and ctime
 *   changed PATH           which of mtime and ctime moved since the stamp
 *   mkscript PATH          creates PATH (mode 0644) holding a shell script that exits 0
 *   mktrue PATH            creates PATH (mode 0644), a copy of /bin/true
 *   pause                  sleeps 20 ms (so that a timestamp can move)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

static const char *root;
static struct timespec stamp_m, stamp_c;
static char stamp_path[4096];

static char *path_of(const char *relative) {
    static char paths[4][4096];
    static int next;
    char *path = paths[next++ % 4];
    snprintf(path, sizeof paths[0], "%s/%s", root, relative);
    return path;
}

static int flags_of(const char *letters) {
    int read = strchr(letters, 'r') != NULL, write = strchr(letters, 'w') != NULL;
    int flags = read && write ? O_RDWR : write ? O_WRONLY : O_RDONLY;
    if (strchr(letters, '3')) flags = O_ACCMODE;
    if (strchr(letters, 'a')) flags |= O_APPEND;
    if (strchr(letters, 't')) flags |= O_TRUNC;
    if (strchr(letters, 'c')) flags |= O_CREAT;
    if (strchr(letters, 'x')) flags |= O_EXCL;
    if (strchr(letters, 'd')) flags |= O_DIRECTORY;
    return flags;
}

static struct timespec time_of(const char *word) {
    struct timespec t = {0, 0};
    if (!strcmp(word, "now")) t.tv_nsec = UTIME_NOW;
    else if (!strcmp(word, "omit")) t.tv_nsec = UTIME_OMIT;
    else t.tv_sec = atol(word);
    return t;
}

static int compare_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Prints names (NUL-separated in buf, or one per entry) sorted. */
static void print_sorted(char **names, int count) {
    qsort(names, count, sizeof *names, compare_names);
    for (int i = 0; i < count; i++) printf(" %s", names[i]);
}

/* Runs one operation; returns 0 or an errno. Output beyond "ok" goes to stdout. */
static int run(char **word, int words) {
    const char *op = word[0];
    int fd;
#define NEED(n) if (words < (n)) return EINVAL
#define CHECK(call) if ((call) < 0) return errno
    if (!strcmp(op, "open")) {
        NEED(3);
        CHECK(fd = open(path_of(word[1]), flags_of(word[2]), 0644));
        close(fd);
    } else if (!strcmp(op, "read")) {
        char buf[256];
        NEED(2);
        CHECK(fd = open(path_of(word[1]), O_RDONLY));
        ssize_t n = read(fd, buf, sizeof buf - 1);
        int err = n < 0 ? errno : 0;
        close(fd);
        if (err) return err;
        buf[n] = 0;
        printf(" [%s]", buf);
    } else if (!strcmp(op, "write") || !strcmp(op, "append")) {
        NEED(3);
        int flags = O_WRONLY | (!strcmp(op, "append") ? O_APPEND : 0);
        CHECK(fd = open(path_of(word[1]), flags));
        ssize_t n = write(fd, word[2], strlen(word[2]));
        int err = n < 0 ? errno : 0;
        close(fd);
        if (err) return err;
    } else if (!strcmp(op, "truncate")) {
        NEED(3);
        CHECK(truncate(path_of(word[1]), atol(word[2])));
    } else if (!strcmp(op, "ftruncate") || !strcmp(op, "ftruncate_ro")) {
        NEED(3);
        CHECK(fd = open(path_of(word[1]), !strcmp(op, "ftruncate") ? O_WRONLY : O_RDONLY));
        int err = ftruncate(fd, atol(word[2])) < 0 ? errno : 0;
        close(fd);
        if (err) return err;
    } else if (!strcmp(op, "chmod")) {
        NEED(3);
        CHECK(chmod(path_of(word[1]), strtol(word[2], NULL, 8)));
    } else if (!strcmp(op, "chown")) {
        NEED(4);
        uid_t uid = strcmp(word[2], "-") ? (uid_t)atol(word[2]) : (uid_t)-1;
        gid_t gid = strcmp(word[3], "-") ? (gid_t)atol(word[3]) : (gid_t)-1;
        CHECK(lchown(path_of(word[1]), uid, gid));
    } else if (!strcmp(op, "utimens")) {
        NEED(4);
        struct timespec times[2] = {time_of(word[2]), time_of(word[3])};
        CHECK(utimensat(AT_FDCWD, path_of(word[1]), times, 0));
    } else if (!strcmp(op, "touch")) {
        NEED(2);
        CHECK(utimensat(AT_FDCWD, path_of(word[1]), NULL, 0));
    } else if (!strcmp(op, "mkdir")) {
        NEED(3);
        CHECK(mkdir(path_of(word[1]), strtol(word[2], NULL, 8)));
    } else if (!strcmp(op, "rmdir")) {
        NEED(2);
        CHECK(rmdir(path_of(word[1])));
    } else if (!strcmp(op, "unlink")) {
        NEED(2);
        CHECK(unlink(path_of(word[1])));
    } else if (!strcmp(op, "rename")) {
        NEED(3);
        CHECK(rename(path_of(word[1]), path_of(word[2])));
    } else if (!strcmp(op, "link")) {
        NEED(3);
        CHECK(link(path_of(word[1]), path_of(word[2])));
    } else if (!strcmp(op, "symlink")) {
        NEED(3);
        CHECK(symlink(word[1], path_of(word[2])));
    } else if (!strcmp(op, "mkfifo")) {
        NEED(3);
        CHECK(mkfifo(path_of(word[1]), strtol(word[2], NULL, 8)));
    } else if (!strcmp(op, "access")) {
        NEED(3);
        int mask = 0;
        if (strchr(word[2], 'r')) mask |= R_OK;
        if (strchr(word[2], 'w')) mask |= W_OK;
        if (strchr(word[2], 'x')) mask |= X_OK;
        CHECK(access(path_of(word[1]), mask));
    } else if (!strcmp(op, "exec") || !strcmp(op, "chdir")) {
        NEED(2);
        const char *path = path_of(word[1]);
        pid_t child = fork();
        CHECK(child);
        if (child == 0) {
            if (!strcmp(op, "chdir")) _exit(chdir(path) < 0 ? errno : 0);
            char *argv[] = {(char *)path, NULL}, *envp[] = {NULL};
            execve(path, argv, envp);
            _exit(errno);
        }
        int status;
        CHECK(waitpid(child, &status, 0));
        if (!WIFEXITED(status)) return EINTR;
        return WEXITSTATUS(status);
    } else if (!strcmp(op, "list")) {
        NEED(2);
        DIR *dir = opendir(path_of(word[1]));
        if (!dir) return errno;
        char *names[256];
        int count = 0;
        struct dirent *entry;
        while ((entry = readdir(dir)) && count < 256)
            if (strcmp(entry->d_name, ".") && strcmp(entry->d_name, ".."))
                names[count++] = strdup(entry->d_name);
        closedir(dir);
        print_sorted(names, count);
        for (int i = 0; i < count; i++) free(names[i]);
    } else if (!strcmp(op, "setxattr")) {
        NEED(4);
        CHECK(lsetxattr(path_of(word[1]), word[2], word[3], strlen(word[3]), 0));
    } else if (!strcmp(op, "getxattr")) {
        char value[256];
        NEED(3);
        ssize_t n = lgetxattr(path_of(word[1]), word[2], value, sizeof value - 1);
        CHECK(n);
        value[n] = 0;
        printf(" [%s]", value);
    } else if (!strcmp(op, "removexattr")) {
        NEED(3);
        CHECK(lremovexattr(path_of(word[1]), word[2]));
    } else if (!strcmp(op, "listxattr")) {
        char list[4096], *names[128];
        NEED(2);
        ssize_t n = llistxattr(path_of(word[1]), list, sizeof list);
        CHECK(n);
        int count = 0;
        for (char *name = list; name < list + n && count < 128; name += strlen(name) + 1)
            names[count++] = name;
        print_sorted(names, count);
    } else if (!strcmp(op, "stat") || !strcmp(op, "stamp") || !strcmp(op, "changed")) {
        struct stat st;
        NEED(2);
        CHECK(lstat(path_of(word[1]), &st));
        if (!strcmp(op, "stat")) {
            printf(" mode=%o uid=%u gid=%u nlink=%lu", st.st_mode, st.st_uid, st.st_gid,
                   (unsigned long)st.st_nlink);
            /* A directory's size is the file system's own business. */
            if (!S_ISDIR(st.st_mode)) printf(" size=%lld", (long long)st.st_size);
        } else if (!strcmp(op, "stamp")) {
            snprintf(stamp_path, sizeof stamp_path, "%s", word[1]);
            stamp_m = st.st_mtim;
            stamp_c = st.st_ctim;
        } else {
            if (strcmp(stamp_path, word[1])) return ESRCH;
            int m = st.st_mtim.tv_sec != stamp_m.tv_sec || st.st_mtim.tv_nsec != stamp_m.tv_nsec;
            int c = st.st_ctim.tv_sec != stamp_c.tv_sec || st.st_ctim.tv_nsec != stamp_c.tv_nsec;
            printf(" mtime %s, ctime %s", m ? "moved" : "kept", c ? "moved" : "kept");
        }
    } else if (!strcmp(op, "mkscript")) {
        static const char script[] = "#!/bin/sh\nexit 0\n";
        NEED(2);
        CHECK(fd = open(path_of(word[1]), O_WRONLY | O_CREAT | O_EXCL, 0644));
        ssize_t n = write(fd, script, sizeof script - 1);
        int err = n < 0 ? errno : 0;
        close(fd);
        if (err) return err;
    } else if (!strcmp(op, "mktrue")) {
        char buf[65536];
        NEED(2);
        int from = open("/bin/true", O_RDONLY);
        CHECK(from);
        fd = open(path_of(word[1]), O_WRONLY | O_CREAT | O_EXCL, 0644);
        int err = fd < 0 ? errno : 0;
        ssize_t n;
        while (!err && (n = read(from, buf, sizeof buf)) > 0)
            if (write(fd, buf, n) != n) err = errno ? errno : EIO;
        close(from);
        if (fd >= 0) close(fd);
        if (err) return err;
    } else if (!strcmp(op, "pause")) {
        usleep(20000);
    } else {
        return ENOSYS;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: posix_probe ROOT < operations\n");
        return 2;
    }
    root = argv[1];
    char line[8192];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (!line[0] || line[0] == '#') continue;
        char copy[8192], *word[8];
        int words = 0;
        snprintf(copy, sizeof copy, "%s", line);
        for (char *token = strtok(copy, " "); token && words < 8; token = strtok(NULL, " "))
            word[words++] = token;
        if (!words) continue;
        printf("%s:", line);
        int err = run(word, words);
        if (err) printf(" %s\n", strerrorname_np(err));
        else printf(" ok\n");
        fflush(stdout);
    }
    return 0;
}
