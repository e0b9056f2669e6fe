/*
 * An LD_PRELOAD shim for tests/e2e/test_fsync_fault.py and benchmarks/slow_disk.py:
 * a disk whose fdatasync(2) and fsync(2) fail or are slow, on demand.
 *
 * - Failing: while the file named by $CSERVER_FAULT_FSYNC_TRIGGER exists
 *   (checked with access(2) on every call), they fail with EIO.
 * - Slow: with $CSERVER_FAULT_FSYNC_DELAY_MS set to a number of
 *   milliseconds, each call sleeps that long first -- only while the file
 *   named by $CSERVER_FAULT_FSYNC_SLOW exists, when that variable is set.
 *   Each slow call first creates the file named by $CSERVER_FAULT_FSYNC_MARK
 *   (when set), so that a test can wait for a sync to be under way.
 * Otherwise, and when the variables are unset or empty, they are the real
 * calls (dlsym(RTLD_NEXT)).
 *
 * Python's os.fdatasync and os.fsync call these through libc's dynamic
 * symbols, so the preloaded definitions take their place.
 *
 *     cc -shared -fPIC -o fsync_fault.so fsync_fault.c -ldl
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

typedef int (*sync_fn)(int);

static int exists(const char *variable)
{
    const char *path = getenv(variable);

    return path != NULL && *path != '\0' && access(path, F_OK) == 0;
}

static int triggered(void)
{
    int saved = errno;
    int result = exists("CSERVER_FAULT_FSYNC_TRIGGER");

    errno = saved;
    return result;
}

static void maybe_slow(void)
{
    const char *delay = getenv("CSERVER_FAULT_FSYNC_DELAY_MS");
    const char *slow = getenv("CSERVER_FAULT_FSYNC_SLOW");
    const char *mark = getenv("CSERVER_FAULT_FSYNC_MARK");
    int saved = errno;
    long ms;

    if (delay == NULL || (ms = atol(delay)) <= 0)
        return;
    if (slow != NULL && *slow != '\0' && !exists("CSERVER_FAULT_FSYNC_SLOW")) {
        errno = saved;
        return;
    }
    if (mark != NULL && *mark != '\0') {
        int fd = open(mark, O_WRONLY | O_CREAT, 0644);

        if (fd >= 0)
            close(fd);
    }
    struct timespec wait = {ms / 1000, (ms % 1000) * 1000000L};

    while (nanosleep(&wait, &wait) != 0 && errno == EINTR)
        ;
    errno = saved;
}

static int forward(const char *name, int fd)
{
    sync_fn real = (sync_fn)dlsym(RTLD_NEXT, name);

    if (real == NULL) {
        errno = ENOSYS;
        return -1;
    }
    return real(fd);
}

/* The call named ``name``: failing while triggered, slow while set so. */
static int shimmed(const char *name, int fd)
{
    if (triggered()) {
        errno = EIO;
        return -1;
    }
    maybe_slow();
    return forward(name, fd);
}

int fdatasync(int fd)
{
    return shimmed("fdatasync", fd);
}

int fsync(int fd)
{
    return shimmed("fsync", fd);
}
