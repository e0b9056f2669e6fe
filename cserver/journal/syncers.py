"""The syncers: what makes a journal's written batches durable
(``--fsync always``), and where the fdatasync runs (``--sync``).

Each is an :class:`~cserver.journal.interfaces.ISyncer`:
:class:`InlineSyncer` syncs in the reactor thread, :class:`SyncThread` in a
thread of its own, :class:`AutoSyncer` picks one of the two by how long
syncs take.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any

from zope.interface import implementer

from cserver.journal.interfaces import ISyncer

#: The ``--sync`` modes, the default first: see :func:`make_syncer`.
SYNC_MODES = ("auto", "reactor", "thread")

#: ``reactor.callFromThread``.
CallFromThread = Callable[..., Any]


class _Bound:
    """
    What every syncer keeps of its journal: :meth:`bind`'s three callables.
    """

    def bind(self, sync: Callable[[], None], durable: Callable[[int], None],
             failed: Callable[[int, BaseException], None]) -> None:
        self._sync = sync
        self._durable = durable
        self._failed = failed


@implementer(ISyncer)
class InlineSyncer(_Bound):
    """
    Sync each written batch at once, in the reactor thread.

    A syncer is bound to a journal's ``sync()``, ``durable(seq)`` and
    ``failed(seq, error)``; the journal calls ``request(seq)`` when it is
    written up to ``seq`` and ``stop()`` when it closes.
    """

    def request(self, seq: int) -> None:
        """
        The journal is written up to ``seq``: make it durable.
        """
        try:
            self._sync()
        except OSError as e:
            self._failed(seq, e)
            return
        self._durable(seq)

    def stop(self) -> None:
        pass


@implementer(ISyncer)
class SyncThread(_Bound):
    """
    Sync in a thread of its own: while the file is written further than it
    is synced, fdatasync again, and report through the reactor how far is
    durable.  The reactor never waits for the disk, and no sync waits for the
    reactor to hear of the one before it.  The thread starts with the first
    request (so after twistd has daemonized) and ends at ``stop()``.

    :param call_from_thread: ``reactor.callFromThread``.
    """

    def __init__(self, call_from_thread: CallFromThread) -> None:
        self._call_from_thread = call_from_thread
        self._condition = threading.Condition()
        self._wanted = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    def request(self, seq: int) -> None:
        with self._condition:
            self._wanted = seq
            self._condition.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cserver-journal-sync",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _run(self) -> None:
        done = 0
        while True:
            with self._condition:
                while self._wanted == done and not self._stopping:
                    self._condition.wait()
                if self._wanted == done:
                    return
                target = self._wanted
            try:
                self._sync()
            except BaseException as e:  # reported, and the journal refuses from now on
                self._call_from_thread(self._failed, target, e)
                return
            done = target
            self._call_from_thread(self._durable, target)


@implementer(ISyncer)
class AutoSyncer:
    """
    Sync in the reactor thread while syncs are quick, in a :class:`SyncThread`
    while they are slow.

    In the reactor a sync costs no handoff between threads, and on a disk
    that syncs in a fraction of a millisecond that is the faster way; but
    the reactor serves nobody while it waits, so on a slow disk the thread
    is faster, and keeps other clients served.  Each sync's duration feeds a
    moving average (weight 1/5 for the newest); a request goes to the thread
    while that average is over ``slow`` seconds, or while the reactor has not
    yet heard the thread report on everything asked of it.  So the two never
    sync at once, a reopen's swap of the file never races a sync, and the
    journal hears of every batch in order: an inline sync that failed could
    otherwise refuse a batch that the thread had already synced.

    :param call_from_thread: ``reactor.callFromThread``.
    :param slow: the average sync time, in seconds, over which syncs go to
        the thread.
    :param timer: seconds, for timing each sync.
    """

    def __init__(self, call_from_thread: CallFromThread, slow: float = 0.002,
                 timer: Callable[[], float] = perf_counter) -> None:
        self.slow = slow
        self.average = 0.0
        self._timer = timer
        self._inline = InlineSyncer()
        self._thread = SyncThread(call_from_thread)
        # The last seq asked of the thread, and the last it reported durable.
        self._asked = 0
        self._reported = 0

    def bind(self, sync: Callable[[], None], durable: Callable[[int], None],
             failed: Callable[[int, BaseException], None]) -> None:
        self._sync = sync
        self._durable = durable
        self._inline.bind(self._timed_sync, durable, failed)
        self._thread.bind(self._timed_sync, self._thread_durable, failed)

    def _thread_durable(self, seq: int) -> None:
        self._reported = max(self._reported, seq)
        self._durable(seq)

    def _timed_sync(self) -> None:
        start = self._timer()
        try:
            self._sync()
        finally:
            self.average += (self._timer() - start - self.average) / 5

    def in_thread(self) -> bool:
        """
        Whether the next request goes to the thread.
        """
        return self.average > self.slow or self._reported < self._asked

    def request(self, seq: int) -> None:
        if self.in_thread():
            self._asked = seq
            self._thread.request(seq)
        else:
            self._inline.request(seq)

    def stop(self) -> None:
        self._thread.stop()


def make_syncer(mode: str, reactor: Any) -> InlineSyncer | SyncThread | AutoSyncer:
    """
    What makes the journal's written batches durable (``--fsync always``),
    for a ``--sync`` mode: ``reactor``, an :class:`InlineSyncer` (fdatasync
    in the reactor thread, at the end of the turn that wrote the batch);
    ``thread``, a :class:`SyncThread`; ``auto``, an :class:`AutoSyncer`
    (the first while syncs are quick, the second while they are slow).
    """
    if mode == "reactor":
        return InlineSyncer()
    if mode == "thread":
        return SyncThread(reactor.callFromThread)
    return AutoSyncer(reactor.callFromThread)
