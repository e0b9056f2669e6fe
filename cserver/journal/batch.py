"""Batching and acknowledgement (group commit), for every journal.

Records are batched per reactor turn: every record taken during one turn
goes out in one ``write(2)`` and, with ``fsync="always"``, is acknowledged
only after an fdatasync that started after that write (one sync often
covers several batches), made by the journal's syncer
(:mod:`cserver.journal.syncers`).  A batch that cannot be written is cut
off the storage again and its records refused; after a failed sync the
journal refuses every record until restart.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from cserver.journal.interfaces import Ack, ISyncer
from cserver.journal.record import ACK, EVENT, FIELDS, batch, message_body, record_body
from cserver.journal.syncers import InlineSyncer

#: The ``--fsync`` modes, the default first.
FSYNC_MODES = ("always", "interval", "never")

# Logged as "cserver.journal", whichever module: operators grep for it.
_log = Logger(namespace="cserver.journal")


class BatchingJournal:
    """
    Seq assignment, record formatting and group commit, over a storage that
    subclasses provide with ``_append(data)``, ``_sync()`` and
    ``_truncate(size)``.

    With ``fsync="always"`` a *syncer* makes written batches durable: by
    default :class:`InlineSyncer`, which syncs at once in the reactor thread;
    :class:`SyncThread` syncs in a thread of its own, so the reactor goes on
    reading requests and writing the next batch while the disk syncs, and
    one sync covers every batch written meanwhile; :class:`AutoSyncer` uses
    the first while syncs are quick and the second while they are slow.
    """

    def __init__(self, clock: IReactorTime, last_seq: int = 0, size: int = 0,
                 fsync: str = "always", sync_interval: float = 1.0,
                 syncer: ISyncer | None = None, messages: int = 0, records: int = 0) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        self._clock = clock
        self._fsync = fsync
        self.last_seq = last_seq
        self.size = size
        # Message records written, all time (what recovery counted, then each
        # batch written); _batch_messages counts those taken since the last flush.
        self.messages = messages
        self._batch_messages = 0
        # Records written to this file (what recovery counted, then each batch).
        self.record_count = records
        # While a reopen waits for the old file to be durable, batches are
        # held back (taken, numbered, not written): see FileJournal.reopen.
        self._holding = False
        self._close_requested = False
        self.broken: str | None = None
        # Record bodies taken and not yet written, and their acks (by seq, or
        # in the shared journal by index in the batch).
        self._bodies: list[bytes] = []
        self._acks: list[tuple[int, Ack]] = []
        self._flush_call: IDelayedCall | None = None
        self._dirty = False
        self._sync_call: IDelayedCall | None = None
        self._closed = False
        self._closing = False
        # Batches written and not yet durable: (first_seq, last_seq, start, acks).
        self._unsynced: deque[tuple[int, int, int, list[tuple[int, Ack]]]] = deque()
        self._syncer = syncer or InlineSyncer()
        self._syncer.bind(self._sync, self._durable, self._sync_failed)
        self._pid = os.getpid()
        if fsync == "interval":
            self._sync_call = clock.callLater(sync_interval, self._periodic_sync, sync_interval)

    # -- the observer -------------------------------------------------------

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get(EVENT)
        if kind is None:
            return
        ack = event.get(ACK)
        if self.broken is not None or self._closed or self._shared_broken():
            if ack is not None:
                call_ack(ack, None, self._refusal())
            return
        try:
            if kind == "message":
                key = event.get("key")
                body = message_body(event["log_time"], self._pid, event["user"], event["text"],
                                    event["peer"], key)
                self._batch_messages += 1
                if key is not None and self.keys is not None:
                    self._keyed.append((len(self._bodies), event["user"], key, event["text"]))
            else:
                body = record_body(event["log_time"], kind, self._pid, event.get(FIELDS))
        except Exception:
            _log.failure("journal: cannot make a {kind} record", kind=kind)
            if ack is not None:
                call_ack(ack, None, "record cannot be encoded")
            return
        self._take(body, ack)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush_turn)

    #: A shared journal's window of keyed messages (see the shared journal),
    #: else None; with it, the keyed records taken for this batch.
    keys: Any = None
    _keyed: list[tuple[int, str, str, str]]

    def _take(self, body: bytes, ack: Ack | None) -> None:
        """
        Number the record ``body`` and hold it for this turn's batch.
        """
        seq = self.last_seq = self.last_seq + 1
        self._bodies.append(body)
        if ack is not None:
            self._acks.append((seq, ack))

    def _shared_broken(self) -> int:
        """
        Whether another process broke the journal (see the shared journal).
        """
        return 0

    def _refusal(self) -> str:
        """
        Why records are refused now.
        """
        return self.broken or "journal closed"

    def _flush_turn(self):
        self._flush_call = None
        self.flush()

    def flush(self) -> None:
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        if not self._bodies or self._holding:
            return
        bodies, acks, messages = self._bodies, self._acks, self._batch_messages
        count = len(bodies)
        self._bodies = []
        self._acks = []
        self._batch_messages = 0
        first_seq = self.last_seq - count + 1
        start = self.size
        if self.broken is not None or self._closed:
            self.last_seq = first_seq - 1
            refuse_acks(acks, self.broken or "journal closed")
            return
        data = batch(first_seq, bodies)
        try:
            self._append(data)
        except OSError as e:
            reason = f"write failed: {describe_error(e)}"
            self._undo(start, first_seq, reason)
            _log.error(
                "journal: {count} records not written ({reason})", count=count, reason=reason
            )
            refuse_acks(acks, reason)
            return
        self.size = start + len(data)
        self.messages += messages
        self.record_count += count
        if self._fsync != "always":
            self._dirty = True
            acknowledge(acks)
            return
        self._unsynced.append((first_seq, self.last_seq, start, acks))
        self._syncer.request(self.last_seq)

    def _durable(self, seq):
        """
        Everything up to ``seq`` is synced: acknowledge it.
        """
        unsynced = self._unsynced
        while unsynced and unsynced[0][1] <= seq:
            acknowledge(unsynced.popleft()[3])
        if self._closing and not unsynced:
            self._finish_close()

    def _sync_failed(self, seq, error):
        """
        An fsync failed: what it covered cannot be trusted to be on disk.
        Cut off (best effort) and refuse everything not yet acknowledged,
        and refuse every record after.
        """
        if not isinstance(error, OSError):
            _log.error("journal: sync failed unexpectedly: {error!r}", error=error)
            error = OSError(0, repr(error))
        reason = f"fsync failed: {describe_error(error)}"
        unsynced, self._unsynced = self._unsynced, deque()
        if unsynced:
            first_seq, _last_seq, start, _acks = unsynced[0]
            self._undo(start, first_seq, reason)
            self.size = start
        self.broken = self.broken or reason
        _log.critical("journal: {reason}; no more records are taken until restart", reason=reason)
        for _first, _last, _start, acks in unsynced:
            refuse_acks(acks, reason)
        if self._closing:
            self._finish_close()

    def _undo(self, start, first_seq, reason):
        """
        Cut a failed batch off the storage so that it stays a valid journal.
        """
        self.last_seq = first_seq - 1
        try:
            self._truncate(start)
        except OSError as e:
            self.broken = f"{reason}; truncate failed: {describe_error(e)}"
            _log.critical("journal: {reason}", reason=self.broken)

    def _periodic_sync(self, interval):
        self._sync_call = self._clock.callLater(interval, self._periodic_sync, interval)
        self.sync()

    def sync(self) -> None:
        """
        Sync what is written, if anything is not yet synced.
        """
        if not self._dirty or self.broken is not None:
            return
        self._dirty = False
        try:
            self._sync()
        except OSError as e:
            self.broken = f"fsync failed: {describe_error(e)}"
            _log.critical(
                "journal: {reason}; no more records are taken until restart",
                reason=self.broken,
            )

    def close(self) -> None:
        if self._closed:
            return
        if self._holding:
            # A reopen waits for the old file to be durable: close once the
            # records it holds are written to the new file.
            self._close_requested = True
            return
        while self._bodies:
            # An ack may emit the next record (a pipelined MSG): take it too.
            self.flush()
        self._closed = True
        if self._unsynced:
            self._closing = True
            return
        self._finish_close()

    def _finish_close(self):
        self._closing = False
        self._syncer.stop()
        self.sync()
        if self._sync_call is not None and self._sync_call.active():
            self._sync_call.cancel()
        self._sync_call = None
        self._release()

    # -- the storage: what a subclass provides --------------------------------

    def _append(self, data: bytes) -> None:
        """Append ``data``; raise OSError when it cannot be written whole."""
        raise NotImplementedError

    def _sync(self) -> None:
        """Make everything appended durable; raise OSError when it cannot."""
        raise NotImplementedError

    def _truncate(self, size: int) -> None:
        """Cut the storage back to ``size`` bytes."""
        raise NotImplementedError

    def _release(self):
        pass

    @property
    def closed_cleanly(self) -> bool:
        """
        Whether the journal is closed, with everything it took written and
        durable, and never broken.
        """
        return self._closed and not self._closing and not self._unsynced \
            and not self._bodies and self.broken is None


def call_ack(ack: Ack, seq: int | None, reason: str | None) -> None:
    """
    Acknowledge one record; a failing ack is logged and spares the others.
    """
    try:
        ack(seq, reason)
    except Exception:
        _log.failure("journal: acknowledging seq {seq} failed", seq=seq)


def refuse_acks(acks: list[tuple[int, Ack]], reason: str) -> None:
    for _seq, ack in acks:
        call_ack(ack, None, reason)


def acknowledge(acks: list[tuple[int, Ack]]) -> None:
    # _call, inlined: this runs once per acknowledged message.
    for seq, ack in acks:
        try:
            ack(seq, None)
        except Exception:
            _log.failure("journal: acknowledging seq {seq} failed", seq=seq)


def describe_error(error: OSError) -> str:
    """
    ``error`` as its errno name and text: ``ENOSPC No space left on device``.
    """
    name = errno.errorcode.get(error.errno, "error") if error.errno else "error"
    return f"{name} {error.strerror or error}"
