"""One server per journal: an exclusive lock held for the server's whole life.

A server takes the lock before it reads or writes anything of its journal: an
``flock(LOCK_EX)`` on ``<journal>.lock``, a file of its own beside the journal
(the path with symbolic links resolved, so that two spellings of one journal
find one lock), which holds the pid of the server.  The lock belongs to the
open file description, so

- it survives twistd's daemonizing fork, and ``--workers`` hands the same
  description to every worker: the lock is free only once the parent *and*
  all its workers have exited;
- the kernel drops it when the last holder exits, however it exits (a
  ``kill -9`` included): a lock file left behind by a dead server locks
  nothing, and the next server takes it;
- it follows the journal's path, not its file: after a reopen (log rotation)
  the new file at the path is still covered.

A second server finds the lock taken and stops before it touches anything:
:class:`JournalInUse` names the journal and the pid read from the lock file.
A server that stops cleanly removes the lock file (while it still holds the
lock); :meth:`JournalLock.acquire` checks, once it holds a lock, that the
file it locked is still the one at the path, so a server that removed it
meanwhile cannot leave two servers each holding a lock.

Readers (``cserver-journal``) never take it.
"""

import errno
import fcntl
import os

import attrs

from cserver.fs import FILE_MODE

#: What the lock file's name adds to the journal's.
SUFFIX = ".lock"


class JournalInUse(Exception):
    """
    Another server holds the lock of the journal.

    :ivar journal: the journal's path, as given.
    :ivar pid: the pid written in the lock file, or None if it cannot be read.
    """

    def __init__(self, journal: str, lock_path: str, pid: int | None) -> None:
        super().__init__(journal, lock_path, pid)
        self.journal = journal
        self.lock_path = lock_path
        self.pid = pid

    def __str__(self) -> str:
        if self.pid is None:
            holder = f"another server (it holds {self.lock_path})"
        elif _alive(self.pid):
            holder = f"another server, pid {self.pid}"
        else:
            holder = (f"the workers of another server, whose parent (pid {self.pid}) is "
                      "gone; they exit once their last MSGs are answered")
        return (f"journal {self.journal} is in use by {holder}: stop it first, or give "
                "this server another --journal")


def lock_path_for(journal: str) -> str:
    """
    The lock file of the journal at ``journal``.
    """
    return os.path.realpath(journal) + SUFFIX


@attrs.define
class JournalLock:
    """
    The lock of one journal, held.

    :ivar journal: the journal's path, as given.
    :ivar path: the lock file's path.
    :ivar fd: the lock file's descriptor, holding the lock (close-on-exec:
        pass it on explicitly, as the ``--workers`` parent does).
    """

    journal: str
    path: str
    fd: int | None

    @classmethod
    def acquire(cls, journal: str) -> "JournalLock":
        """
        Take the lock of the journal at ``journal``, and write this process's
        pid into the lock file (mode 0600).

        :raises JournalInUse: another server holds it; nothing was created.
        :raises OSError: the lock file cannot be made (no such directory, no
            permission...).
        """
        path = lock_path_for(journal)
        while True:
            fd, created = _open(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise JournalInUse(journal, path, pid) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                there = os.stat(path)
            except FileNotFoundError:
                there = None
            mine = os.fstat(fd)
            if there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                break
            # The server that held it removed it as it stopped: lock the new one.
            os.close(fd)
        lock = cls(journal, path, fd)
        try:
            if created:
                os.fchmod(fd, FILE_MODE)
            lock.write_pid()
        except BaseException:
            lock.release()
            raise
        return lock

    def write_pid(self, pid: int | None = None) -> None:
        """
        Write ``pid`` (default: this process's) into the lock file; twistd's
        daemonizing fork changes it after :meth:`acquire`.
        """
        if self.fd is None:
            return
        data = b"%d\n" % (os.getpid() if pid is None else pid,)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        """
        Remove the lock file and let the lock go.  Harmless twice.
        """
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)


def _open(path: str) -> tuple[int, bool]:
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
    except FileExistsError:
        pass
    try:
        return os.open(path, flags), False
    except FileNotFoundError:
        # Removed between the two opens by a stopping server: make it anew.
        return os.open(path, flags | os.O_CREAT, 0o600), True


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as e:
        return e.errno == errno.EPERM
    return True
