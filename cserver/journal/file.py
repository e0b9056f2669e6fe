"""The file journal: records appended to one file, and moved to a new file
at the same path when the old one is rotated away.

:meth:`FileJournal.reopen` (SIGHUP) moves the journal to a new file at its
path once the old one was renamed away (log rotation); ``seq`` continues and
the new file starts with a ``reopen`` record.
"""

from __future__ import annotations

import errno
import os
from contextlib import suppress
from time import time

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from cserver.fs import create_durably, fsync_directory, write_all
from cserver.journal.batch import FSYNC_MODES, BatchingJournal, describe_error
from cserver.journal.checkpoint import write as write_checkpoint
from cserver.journal.interfaces import IJournal, ISyncer
from cserver.journal.record import record_body
from cserver.journal.recovery import recover

# Logged as "cserver.journal", whichever module: operators grep for it.
_log = Logger(namespace="cserver.journal")


@implementer(IJournal)
class FileJournal(BatchingJournal):
    """
    A journal in a file, only ever appended to.

    Open it with :meth:`open`, which recovers the file first.  The
    ``_os_write``, ``_os_fdatasync`` and ``_os_ftruncate`` attributes are the
    system calls it uses; tests replace them to inject I/O errors.
    """

    _os_write = staticmethod(os.write)
    _os_fdatasync = staticmethod(os.fdatasync)
    _os_ftruncate = staticmethod(os.ftruncate)

    def __init__(self, path, fd, recovery, clock, fsync="always", sync_interval=1.0,
                 syncer=None):
        super().__init__(
            clock,
            last_seq=recovery.last_seq,
            size=recovery.size,
            fsync=fsync,
            sync_interval=sync_interval,
            syncer=syncer,
            messages=recovery.messages,
            records=recovery.records,
        )
        self.path = path
        self.recovery = recovery
        self._fd = fd
        # A reopen waiting for the old file to be durable; a reopen record
        # whose write to the new file failed, to be written again.
        self._reopen = None
        self._retry = None
        #: Files this journal moved to (reopens done).
        self.reopens = 0

    @classmethod
    def open(cls, path: str, clock: IReactorTime, fsync: str = "always",
             sync_interval: float = 1.0, syncer: ISyncer | None = None) -> FileJournal:
        """
        Recover the journal at ``path`` (creating it, durably, if it does not
        exist) and open it for appending.

        :raises cserver.journal.recovery.JournalDamaged: a record before the end of
            the file is damaged; the file is left as it was.
        """
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        recovery = recover(path)
        if recovery.created:
            fd = create_durably(path, os.O_WRONLY | os.O_APPEND)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        return cls(path, fd, recovery, clock, fsync=fsync, sync_interval=sync_interval,
                   syncer=syncer)

    def _append(self, data):
        write_all(self._fd, data, self._os_write)

    def _sync(self):
        self._os_fdatasync(self._fd)

    def _truncate(self, size):
        self._os_ftruncate(self._fd, size)

    def _release(self):
        os.close(self._fd)

    def write_checkpoint(self, users: dict[str, int]) -> bool:
        """
        Leave a checkpoint (:mod:`cserver.journal.checkpoint`) for the next
        start, with ``users`` as this file's messages per user -- once the
        journal closed cleanly, and only if it never moved to a new file
        (then its counts are not the new file's alone).

        :returns: whether one was written.
        :raises OSError: it could not be written.
        """
        if not self.closed_cleanly or self.reopens or self.size == 0:
            return False
        write_checkpoint(self.path, self.size, self.record_count, self.last_seq, self.messages,
                         self.recovery.carried, users)
        return True

    # -- reopening (log rotation) -----------------------------------------------

    def reopen(self) -> Deferred[int | None]:
        """
        Reopen the journal at its path, after something (logrotate) renamed
        the file away: SIGHUP.

        1. If the path still names the open file, nothing was rotated: log
           it and fire with None.
        2. Create the new file at the path (an empty file already there,
           as logrotate's ``create`` leaves, is taken; a non-empty one is
           not) and fsync it and its directory.  If that fails, log it, go
           on writing the old file, and fail with the OSError.
        3. Write every record taken so far to the old file, and take a
           ``reopen`` record (``previous``: the old file's path now;
           ``previous_last_seq``; ``total``: message records, all time) as
           the first record for the new file.  Records taken from here on
           are numbered after it, and held.
        4. Once everything written to the old file is durable (a running
           :class:`SyncThread` sync is waited for, never cut short; the fd
           is swapped only while no sync is running or requested), sync it
           once more if the fsync mode left it unsynced, close it, and
           write the held batch, ``reopen`` record first, to the new file.

        :returns: a Deferred that fires with the ``reopen`` record's seq once
            it is durable in the new file (or None, nothing rotated), or
            fails with OSError (the new file could not be made; an fsync of
            the old file failed; the journal is closed or broken).
        """
        if self._closed or self._closing or self._close_requested:
            return fail(OSError(errno.EBADF, "journal closed"))
        if self.broken is not None:
            return fail(OSError(errno.EIO, f"journal broken: {self.broken}"))
        if self._reopen is not None:
            # One at a time: this one is answered with the reopen under way.
            d: Deferred[int | None] = Deferred()
            self._reopen.waiters.append(d)
            return d
        if self._retry is not None:
            d = Deferred()
            self._retry.waiters.append(d)
            return d
        try:
            current = os.fstat(self._fd)
            there = os.stat(self.path)
        except FileNotFoundError:
            there = None
        except OSError as e:
            return self._reopen_failed(e)
        if there is not None and (there.st_dev, there.st_ino) == (current.st_dev,
                                                                   current.st_ino):
            _log.info("journal {path}: still the same file, nothing rotated: not reopened",
                      path=self.path)
            return succeed(None)
        try:
            fd, created = self._create_next()
        except OSError as e:
            return self._reopen_failed(e)
        previous = _fd_path(self._fd)
        while self._bodies:
            # An ack may take the next record (a pipelined MSG): write it too.
            self.flush()
        if self.broken is not None:
            self._discard_next(fd, created)
            return fail(OSError(errno.EIO, f"journal broken: {self.broken}"))
        seq = self.last_seq + 1
        fields = {"previous": previous, "previous_last_seq": seq - 1, "total": self.messages}
        done: Deferred[int | None] = Deferred()
        reopen = self._reopen = _Reopen(fd, created, previous, seq, done)
        reopen.body = record_body(time(), "reopen", self._pid, fields)
        self.last_seq = seq
        self._bodies.append(reopen.body)
        self._acks.append((seq, lambda seq, reason: self._reopen_acked(reopen, seq, reason)))
        self._holding = True
        if not self._unsynced:
            self._swap()
        return done

    def _create_next(self):
        """
        Create the next file at the path, durably; return its fd and whether
        it was created (rather than found empty).
        """
        flags = os.O_WRONLY | os.O_APPEND
        try:
            return create_durably(self.path, flags), True
        except FileExistsError:
            pass
        # An empty file left there (logrotate's "create") is taken as it is.
        fd = os.open(self.path, flags | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size:
                raise OSError(errno.EEXIST, f"{self.path} exists and is not empty")
            os.fsync(fd)
            fsync_directory(self.path)
        except BaseException:
            self._discard_next(fd, False)
            raise
        return fd, False

    def _discard_next(self, fd, created):
        os.close(fd)
        if created:
            with suppress(OSError):
                os.unlink(self.path)
                fsync_directory(self.path)

    def _reopen_failed(self, error):
        _log.error("journal {path}: cannot reopen ({reason}); still writing the old file",
                   path=self.path, reason=describe_error(error))
        return fail(error)

    def _reopen_acked(self, reopen, seq, reason):
        """
        The ``reopen`` record is durable in the new file, or was refused.  A
        failed write (ENOSPC...) left the new file empty and the journal
        working: take the record again, first in the next batch, so that the
        new file still starts with it.
        """
        if (reason is not None and reason.startswith("write failed") and self.size == 0
                and not self._bodies and self.broken is None and not self._closed):
            _log.warn("journal {path}: the reopen record was not written ({reason}); "
                      "it goes first in the next batch", path=self.path, reason=reason)
            self._retry = reopen
            seq = self.last_seq + 1
            reopen.seq = seq
            self.last_seq = seq
            self._bodies.insert(0, reopen.body)
            self._acks.insert(0, (seq, lambda seq, reason: self._reopen_acked(reopen, seq,
                                                                              reason)))
            return
        self._retry = None
        reopen.fire(seq, reason)

    def _durable(self, seq):
        super()._durable(seq)
        if self._holding and not self._unsynced:
            self._swap()

    def _sync_failed(self, seq, error):
        super()._sync_failed(seq, error)
        if self._holding:
            self._swap()

    def _swap(self):
        """
        The old file is durable up to the ``reopen`` record (or the journal
        broke): move to the new file and write what was held.
        """
        reopen, self._reopen = self._reopen, None
        if self._dirty:
            self.sync()
        if self.broken is None:
            with suppress(OSError):  # everything in it is durable already
                os.close(self._fd)
            self._fd = reopen.fd
            self.size = 0
            self.record_count = 0
            self.reopens += 1
            _log.info("journal {path}: reopened at seq {seq}; the previous file, {previous}, "
                      "ends at seq {last}", path=self.path, seq=reopen.seq,
                      previous=reopen.previous, last=reopen.seq - 1)
        else:
            self._discard_next(reopen.fd, reopen.created)
        self._holding = False
        # Broken: the held records are refused, the reopen record's with them.
        self.flush()
        if self._close_requested:
            self._close_requested = False
            self.close()


class _Reopen:
    """
    A reopen under way: the new file, and who waits for its ``reopen``
    record (``seq``, its body ``body``) to be durable.
    """

    def __init__(self, fd, created, previous, seq, done):
        self.fd = fd
        self.created = created
        self.previous = previous
        self.seq = seq
        self.body = b""
        self.waiters = [done]

    def fire(self, seq, reason):
        for d in self.waiters:
            if reason is None:
                d.callback(seq)
            else:
                d.errback(OSError(errno.EIO, reason))


def _fd_path(fd):
    """
    The path of the file open at ``fd`` now (after a rename: its new name),
    or None where /proc cannot tell.
    """
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    # A name that is not UTF-8 still makes a valid record.
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
