/*
 * An LD_PRELOAD shim for tests/test_fsync_fault.py: fdatasync(2) and
 * fsync(2) fail with EIO while the file named by $CSERVER_FAULT_FSYNC_TRIGGER
 * exists (checked with access(2) on every call); otherwise, and when the
 * variable is unset or empty, they are the real calls (dlsym(RTLD_NEXT)).
 *
 * Python's os.fdatasync and os.fsync call these through libc's dynamic
 * symbols, so the preloaded definitions take their place.
 *
 *     cc -shared -fPIC -o fsync_fault.so fsync_fault.c -ldl
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

typedef int (*sync_fn)(int);

static int triggered(void)
{
    const char *path = getenv("CSERVER_FAULT_FSYNC_TRIGGER");
    int saved = errno;
    int exists = path != NULL && *path != '\0' && access(path, F_OK) == 0;

    errno = saved;
    return exists;
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

int fdatasync(int fd)
{
    if (triggered()) {
        errno = EIO;
        return -1;
    }
    return forward("fdatasync", fd);
}

int fsync(int fd)
{
    if (triggered()) {
        errno = EIO;
        return -1;
    }
    return forward("fsync", fd);
}
