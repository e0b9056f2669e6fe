"""The shared journal: one file appended to by several processes
(``--workers``), each batch numbered when it is written, under the file's
lock, from a header in shared memory (:mod:`cserver.journal.header`).
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from cserver.fs import create_durably, pwrite_all
from cserver.journal.batch import (
    FSYNC_MODES,
    acknowledge,
    call_ack,
    describe_error,
    refuse_acks,
)
from cserver.journal.file import FileJournal
from cserver.journal.header import Shared
from cserver.journal.interfaces import CONFLICT, DUPLICATE, IJournal
from cserver.journal.keyed import keyed_records
from cserver.journal.record import batch
from cserver.journal.recovery import Recovery, recover

# Logged as "cserver.journal", whichever module: operators grep for it.
_log = Logger(namespace="cserver.journal")


class _Refused(Exception):
    """
    A batch was not written; the file and the shared header are as before.
    """


@implementer(IJournal)
class SharedFileJournal(FileJournal):
    """
    One of several journals, in as many processes (``--workers``), appending
    to one file: a record gets its seq when its batch is written, from the
    journal header in shared memory (:class:`cserver.journal.header.Shared`), not
    when it is taken.

    Each batch is written under ``flock(LOCK_EX)`` on this journal's own open
    file description -- which is why :meth:`open` opens the file itself: an
    fd inherited from another process would share its lock and exclude
    nobody.  Under the lock:

    1. if the header's ``busy`` is set, the writer before was killed in the
       middle of a batch: if it was already publishing a whole batch
       (``commit_seq`` set) finish publishing it, else cut its partial batch
       off at ``end``;
    2. set ``busy`` to this pid, number the batch from ``last_seq + 1`` and
       ``pwrite`` it at ``end``;
    3. publish: ``commit_messages`` then ``commit_seq`` (from here on the
       batch stands), then ``end``, ``last_seq`` and ``messages``; clear
       ``commit_seq`` and ``busy``; unlock.

    The fdatasync runs outside the lock (in a :class:`SyncThread` per process
    for throughput): writes are serialized by the lock, so a sync that starts
    after this journal's write covers every batch written before it too.

    A failed write is cut back, still under the lock, and its records are
    refused; the header was not advanced.  A failed fdatasync sets the
    header's ``broken``, and every journal on that header then refuses
    records until restart.  Unlike :class:`FileJournal` nothing is cut off
    after a failed sync: batches of other processes written after this one's
    may already be acknowledged.

    ``last_seq`` is the header's: the seq of the newest record written by any
    process; records taken and not yet written have no seq yet.
    ``recovery`` is what :meth:`prepare` returned in the parent, or, in a
    worker, a :class:`Recovery` with the header's ``last_seq``, ``end`` and
    ``messages`` at open (and no ``records`` or ``users``).

    The ``_os_pwrite``, ``_os_fdatasync``, ``_os_ftruncate`` and ``_os_flock``
    attributes are the system calls it uses; tests replace them.
    """

    _os_pwrite = staticmethod(os.pwrite)
    _os_flock = staticmethod(fcntl.flock)

    def __init__(self, path: str, fd: int, recovery: Recovery, clock: Any, shared: Shared,
                 fsync: str = "always", sync_interval: float = 1.0, syncer: Any = None) -> None:
        self._header = shared.header
        super().__init__(path, fd, recovery, clock, fsync=fsync, sync_interval=sync_interval,
                         syncer=syncer)
        # The keyed records taken for this batch, (index, user, key, text);
        # and how far this journal has read the file for the others' keys.
        self._keyed: list[tuple[int, str, str, str]] = []
        self._seen_end = shared.header.end
        self._read_fd: int | None = None

    @property
    def last_seq(self):
        return self._header.last_seq

    @last_seq.setter
    def last_seq(self, value):
        # _BatchingJournal keeps its own count; here the header is the count.
        pass

    @classmethod
    def prepare(cls, path: str, shared: Shared) -> Recovery:
        """
        In the parent, before any journal is opened on ``shared``: recover
        the journal at ``path`` (creating it, durably, if it does not exist)
        and set the shared header from what recovery found.

        :returns: the :class:`Recovery`.
        :raises cserver.journal.recovery.JournalDamaged: a record before the end of
            the file is damaged; the file is left as it was.
        """
        recovery = recover(path)
        if recovery.created:
            os.close(create_durably(path, os.O_WRONLY))
        header = shared.header
        header.busy = 0
        header.commit_seq = 0
        header.commit_messages = 0
        header.broken = 0
        header.last_seq = recovery.last_seq
        header.end = recovery.size
        header.messages = recovery.messages
        return recovery

    @classmethod
    def open(cls, path, clock, shared, fsync="always", sync_interval=1.0, syncer=None,
             recovery=None):
        """
        Open the journal at ``path``, already prepared on ``shared``, for
        appending from this process (in a worker or in the parent).
        """
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        if recovery is None:
            header = shared.header
            recovery = Recovery(size=header.end, last_seq=header.last_seq,
                                messages=header.messages)
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            return cls(path, fd, recovery, clock, shared, fsync=fsync,
                       sync_interval=sync_interval, syncer=syncer)
        except BaseException:
            os.close(fd)
            raise

    def reopen(self) -> Deferred[int | None]:
        """
        Not with ``--workers``: the parent ignores SIGHUP (see the docs on workers).
        """
        return fail(OSError(errno.ENOTSUP, "reopening a shared journal is not supported"))

    # -- taking records: numbered when their batch is written ------------------

    def _take(self, body, ack):
        if ack is not None:
            # Its index in the batch: the seq is known once the batch is written.
            self._acks.append((len(self._bodies), ack))
        self._bodies.append(body)

    def _shared_broken(self):
        return self._header.broken

    def _refusal(self):
        """
        Why records are refused now; an fsync failure elsewhere breaks this
        journal too.
        """
        if self.broken is None and self._shared_broken():
            self.broken = "fsync failed in another process"
        return self.broken or "journal closed"

    # -- writing a batch -----------------------------------------------------

    def flush(self) -> None:
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        if not self._bodies:
            return
        bodies, acks, messages = self._bodies, self._acks, self._batch_messages
        keyed, self._keyed = self._keyed, []
        self._bodies = []
        self._acks = []
        self._batch_messages = 0
        if self.broken is not None or self._closed or self._shared_broken():
            refuse_acks(acks, self._refusal())
            return
        try:
            first, start, end, dropped = self._write_batch(bodies, messages, keyed)
        except _Refused as e:
            refuse_acks(acks, str(e))
            return
        if dropped:
            acks = self._answer_dropped(acks, dropped, first)
            last = first + len(bodies) - len(dropped) - 1
        else:
            last = first + len(bodies) - 1
            acks = [(first + index, ack) for index, ack in acks]
        self.size = end
        if self._fsync != "always":
            self._dirty = True
            acknowledge(acks)
            return
        self._unsynced.append((first, last, start, acks))
        self._syncer.request(last)

    def _write_batch(self, bodies, messages, keyed=()):
        """
        Lock, repair, number, write and publish one batch of record bodies.
        With ``keyed`` records in it and a window (:attr:`keys`), first read
        the keys the other workers wrote since this journal last looked, and
        leave out of the batch each keyed record whose key one of them wrote
        first.

        :returns: the batch's first seq, the offsets where it starts and ends,
            and the records left out: index -> (seq or None, verdict).
        :raises _Refused: the batch is not written.
        """
        fd = self._fd
        header = self._header
        try:
            self._os_flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            raise _Refused(f"write failed: cannot lock the journal: {describe_error(e)}") from None
        try:
            if header.broken:
                raise _Refused(self._refusal())
            if header.busy:
                try:
                    self._repair(header)
                except OSError as e:
                    reason = f"write failed: cannot cut a dead writer's batch: {describe_error(e)}"
                    _log.error("journal: {reason}", reason=reason)
                    raise _Refused(reason) from None
            dropped = {}
            if keyed and self.keys is not None:
                dropped = self._check_keys(header, keyed)
                if dropped:
                    bodies = [body for index, body in enumerate(bodies) if index not in dropped]
                    messages -= len(dropped)
            first = header.last_seq + 1
            start = header.end
            if not bodies:
                return first, start, start, dropped
            header.busy = self._pid
            data = batch(first, bodies)
            try:
                pwrite_all(fd, data, start, self._os_pwrite)
            except OSError as e:
                self._cut_failed_write(start, len(bodies), f"write failed: {describe_error(e)}")
            end = start + len(data)
            last = first + len(bodies) - 1
            header.commit_messages = header.messages + messages
            header.commit_seq = last
            header.end = end
            header.last_seq = last
            header.messages = header.commit_messages
            header.commit_seq = 0
            header.busy = 0
            if keyed and self.keys is not None:
                self._seen_end = end  # caught up before, and this batch is ours
            return first, start, end, dropped
        finally:
            self._os_flock(fd, fcntl.LOCK_UN)

    def _check_keys(self, header, keyed):
        """
        Under the lock: learn the keys written since :attr:`_seen_end`, then
        which of ``keyed`` another worker wrote first.
        """
        end = header.end
        if end > self._seen_end:
            if self._read_fd is None:
                self._read_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            offset = self._seen_end
            while offset < end:
                data = os.pread(self._read_fd, min(end - offset, 1 << 24), offset)
                whole = data[:data.rfind(b"\n") + 1] if offset + len(data) < end else data
                if not whole:
                    break
                for record in keyed_records(whole):
                    self.keys.learn(record)
                offset += len(whole)
            self._seen_end = end
        dropped = {}
        for index, user, key, text in keyed:
            verdict = self.keys.written(user, key, text)
            if verdict is not None:
                dropped[index] = verdict
        return dropped

    def _answer_dropped(self, acks, dropped, first):
        """
        The acks of a batch some of whose keyed records were left out: those
        of the written records renumbered; a duplicate answered with the
        other worker's seq once this batch's sync (which covers the other
        record too: writes are serialized) is done; a conflict at once.
        """
        kept = []
        position = 0
        for index, ack in acks:
            verdict = dropped.get(index)
            if verdict is None:
                kept.append((first + index - position, ack))
                continue
            position += 1
            seq, why = verdict
            if why is CONFLICT:
                call_ack(ack, None, CONFLICT)
            else:
                kept.append((seq, _as_duplicate(ack)))
        kept.sort(key=lambda item: item[0])
        return kept

    def _cut_failed_write(self, start, count, reason):
        """
        This journal's write failed: cut what it wrote off, and refuse the
        batch.  If even the cut fails, ``busy`` stays set, so that the next
        writer cuts it, and this journal takes no more records.
        """
        _log.error("journal: {count} records not written ({reason})", count=count,
                   reason=reason)
        try:
            self._os_ftruncate(self._fd, start)
        except OSError as e:
            self.broken = f"{reason}; truncate failed: {describe_error(e)}"
            _log.critical("journal: {reason}", reason=self.broken)
            raise _Refused(reason) from None
        self._header.busy = 0
        raise _Refused(reason)

    def _repair(self, header):
        """
        The writer before was killed in the middle of a batch (``busy`` is
        still set).  If it had written its whole batch and was publishing it
        (``commit_seq`` set; the file then ends with that batch), finish
        publishing it; else cut its partial batch off at ``end``.
        """
        if header.commit_seq:
            header.end = os.fstat(self._fd).st_size
            header.last_seq = header.commit_seq
            header.messages = header.commit_messages
            header.commit_seq = 0
            _log.warn("journal: published the batch of writer {pid}, killed while publishing "
                      "it, up to seq {seq}", pid=header.busy, seq=header.last_seq)
        else:
            self._os_ftruncate(self._fd, header.end)
            _log.warn("journal: cut the unfinished batch of writer {pid} off at byte {end}",
                      pid=header.busy, end=header.end)

    # -- syncing ---------------------------------------------------------------

    def _release(self):
        super()._release()
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None

    def _sync(self):
        try:
            self._os_fdatasync(self._fd)
        except OSError:
            # At once, from the sync thread: every process refuses from now on.
            self._header.broken = 1
            raise

    def _sync_failed(self, seq, error):
        self._header.broken = 1
        super()._sync_failed(seq, error)

    def _undo(self, start, first_seq, reason):
        """
        Nothing is cut after a failed sync: batches of other processes after
        this journal's may already be acknowledged.  (A failed write is cut
        under the lock, by :meth:`_cut_failed_write`.)
        """


def _as_duplicate(ack):
    """``ack``, told DUPLICATE when the batch it waits on is durable."""

    def answer(seq, reason):
        ack(seq, DUPLICATE if reason is None else reason)

    return answer
