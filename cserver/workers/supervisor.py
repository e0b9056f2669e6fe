"""The parent of ``twistd cserver --workers N`` at work: run, restart and stop the workers.

:class:`WorkerSupervisor` runs N :mod:`cserver.workers.worker` processes on
the sockets and the journal :mod:`cserver.workers.parent` prepared.  It
writes the ``start`` and ``stop`` records, restarts a worker that dies
(with a backoff), logs the global totals every 10 s, and on SIGTERM or
SIGINT stops every worker gracefully before it writes the ``stop`` record.
Under systemd it is the main process: it sends ``READY=1`` (the ``start``
record durable, the sockets listening), ``WATCHDOG=1`` and ``STOPPING=1``.
See docs/workers-design.rst.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Generator
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cserver import __version__
from cserver.config import Config
from cserver.journal import JournalLogger
from cserver.notify import Notifier
from cserver.process import describe_socket, stop_cleanly_on_signals
from cserver.service import log_start_not_journaled
from cserver.startup import discard_journal
from cserver.workers import LISTEN_FD, LOCK_FD, SHARED_FD, WORKER_MODULE, WorkerStart

__all__ = ["STABLE_AFTER", "WorkerProcess", "WorkerSupervisor"]

#: A worker up this many seconds counts as stable: its next restart is quick.
STABLE_AFTER = 10.0
#: Seconds between two logs of the totals.
TOTALS_INTERVAL = 10.0
#: Seconds the workers have to stop before they are killed.
STOP_TIMEOUT = 25.0


class WorkerProcess(ProcessProtocol):
    """
    One worker seen from the parent: it is told its :class:`WorkerStart`,
    its output goes to the parent's log, its end to the supervisor.

    :ivar pid: the worker's pid, once spawned.
    :ivar ended: fires (with None) once the worker has exited.
    """

    log = Logger(namespace="cserver.workers")

    def __init__(self, supervisor: WorkerSupervisor, index: int, started_at: float,
                 start: WorkerStart) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started_at = started_at
        self.start = start
        self.pid: int | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.write(self.start.encode())

    def signal(self, name: str) -> None:
        """Send the worker the signal ``name`` (``TERM``, ``KILL``)."""
        if self.transport is not None:
            self.transport.signalProcess(name)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            self.log.info("worker {index} [{pid}]: {line}", index=self.index, pid=self.pid,
                          line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


def _describe_exit(reason: Failure) -> str:
    if isinstance(reason.value, ProcessDone):
        return "exited with status 0"
    if reason.value.signal is not None:
        return f"was killed by signal {reason.value.signal}"
    return f"exited with status {reason.value.exitCode}"


class WorkerSupervisor(Service):
    """
    Runs and restarts one worker per socket; writes the ``start`` and
    ``stop`` records.

    :param reactor: the reactor (a clock that can ``spawnProcess``).
    :param shared: the :class:`cserver.journal.header.Shared` memory of the workers.
    :param journal: the parent's :class:`cserver.journal.SharedFileJournal`.
    :param recovery: what recovering the journal found.
    :param sockets: the listening sockets, one per worker.
    :param config: the options, passed on to each worker; the restart delays
        are its ``restart_delay`` and ``restart_max_delay``.
    :param exit_cleanly: SIGTERM and SIGINT stop the reactor, for an exit
        with status 0 (:func:`cserver.process.stop_cleanly_on_signals`).
    :param lock: the journal's :class:`cserver.journal.lock.JournalLock`, or None.
    :param auth: how AUTH is checked, for the log at start, or None.
    :ivar processes: the running :class:`WorkerProcess` of each index, or None.
    :ivar notifier: a :class:`cserver.notify.Notifier` (default: one for this
        process's environment).
    """

    log = Logger(namespace="cserver.workers")

    def __init__(self, reactor: Any, shared: Any, journal: Any, recovery: Any,
                 sockets: list[socket.socket], config: Config, exit_cleanly: bool = False,
                 notifier: Notifier | None = None, lock: Any = None,
                 auth: str | None = None) -> None:
        self.notifier = Notifier() if notifier is None else notifier
        self.reactor = reactor
        self.shared = shared
        self.journal = journal
        self.recovery = recovery
        self.journal_log = JournalLogger(namespace="cserver.journal", observer=journal)
        self.sockets = sockets
        self.config = config
        self.exit_cleanly = exit_cleanly
        self.restart_delay = config.restart_delay
        self.max_restart_delay = config.restart_max_delay
        self.lock = lock
        self.auth = auth
        self.count = len(sockets)
        self.processes: list[WorkerProcess | None] = [None] * self.count
        self._delays = [0.0] * self.count
        self._restarts: dict[int, Any] = {}
        self._totals: LoopingCall | None = None
        self._last_totals: dict[str, int] | None = None
        self.stopping = False

    def startService(self) -> None:
        super().startService()
        if self.lock is not None:
            self.lock.write_pid()  # twistd forks to daemonize after makeService
        recovery = self.recovery
        if recovery.torn_bytes:
            self.log.warn(
                "journal {path}: cut a torn tail of {count} bytes, saved in {side}",
                path=self.journal.path, count=recovery.torn_bytes, side=recovery.torn_path,
            )
        fields = {"version": __version__, **recovery.summary(), "workers": self.count}
        started = self.journal_log.record("start", fields, "cserver {version} starting")
        started.addCallbacks(self._ready, log_start_not_journaled, errbackArgs=(self.log,))
        for index in range(self.count):
            self._spawn(index)
        self._totals = LoopingCall(self.log_totals)
        self._totals.clock = self.reactor
        self._totals.start(TOTALS_INTERVAL, now=False)
        self.notifier.start_watchdog(self.reactor)
        if self.exit_cleanly:
            self.reactor.callWhenRunning(stop_cleanly_on_signals, self.reactor, self.log)
            # Once the signals are ours.
            self.reactor.callWhenRunning(self._log_listening)
        else:
            self._log_listening()

    def _log_listening(self) -> None:
        recovery = self.recovery
        self.log.info(
            "cserver {version} listening on {address} with {count} workers; "
            "journal {path} ({records} records, last seq {seq})",
            version=__version__, address=describe_socket(self.sockets[0]), count=self.count,
            path=self.journal.path, records=recovery.records, seq=recovery.last_seq,
        )
        if self.auth:
            self.log.info("{auth}", auth=self.auth)

    def _ready(self, seq: int) -> int:
        # The sockets listen since make_service: a connection waits in the
        # backlog until a worker accepts it.
        if self.running and not self.stopping:
            host, port = self.sockets[0].getsockname()[:2]
            self.notifier.ready(f"listening on {host}:{port} with {self.count} workers")
        return seq

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        slot = self.shared.slot(index)
        start = WorkerStart(
            index=index,
            family="inet6" if self.sockets[index].family == socket.AF_INET6 else "inet",
            config=self.config, base_served=slot.served,
            base_auth_failures=slot.auth_failures,
        )
        process = WorkerProcess(self, index, self.reactor.seconds(), start)
        self.processes[index] = process
        self.reactor.spawnProcess(
            process, sys.executable, [sys.executable, "-m", WORKER_MODULE],
            env=dict(os.environ), childFDs=self._child_fds(index),
        )
        self.log.info("worker {index} started, pid {pid}", index=index, pid=process.pid)

    def _child_fds(self, index: int) -> dict[int, int | str]:
        """
        A worker's descriptors (see :mod:`cserver.workers`); it holds the
        journal's lock too, so the lock outlives a parent killed while its
        workers still answer their last MSGs.
        """
        fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r",
                                     LISTEN_FD: self.sockets[index].fileno(),
                                     SHARED_FD: self.shared.fd}
        if self.lock is not None and self.lock.fd is not None:
            fds[LOCK_FD] = self.lock.fd
        return fds

    def abandon(self) -> None:
        """
        Give up a supervisor that will not be started: close the sockets and
        the journal (removed if this start created it), let go of the lock.
        """
        for sock in self.sockets:
            sock.close()
        discard_journal(self.journal, self.recovery)
        if self.lock is not None:
            self.lock.release()

    def worker_ended(self, process: WorkerProcess, reason: Failure) -> None:
        """
        ``process`` exited: restart it after its delay, unless stopping.
        """
        index = process.index
        if self.processes[index] is process:
            self.processes[index] = None
        slot = self.shared.slot(index)
        slot.pid = slot.connections = slot.inflight = 0
        how = _describe_exit(reason)
        if self.stopping:
            self.log.info("worker {index} (pid {pid}) {how}", index=index, pid=process.pid,
                          how=how)
            return
        uptime = self.reactor.seconds() - process.started_at
        if uptime >= STABLE_AFTER or not self._delays[index]:
            delay = self.restart_delay
        else:
            delay = min(self._delays[index] * 2, self.max_restart_delay)
        self._delays[index] = delay
        self.log.warn(
            "worker {index} (pid {pid}) {how} after {uptime:.1f} s; restarting in {delay} s",
            index=index, pid=process.pid, how=how, uptime=uptime, delay=delay,
        )
        self._restarts[index] = self.reactor.callLater(delay, self._spawn, index)

    def log_totals(self) -> None:
        """
        Log the totals over the workers and, when they changed since the last
        ``totals`` record, journal one (the C original's parent, too, writes
        its periodic totals into the append-only log).
        """
        totals = self.shared.totals()
        self.log.info(
            "totals: {total} messages in the journal, served {served}, connections "
            "{connections}, in flight {inflight}, auth failures {auth_failures}",
            total=self.shared.header.messages, **totals,
        )
        fields = {
            "total": self.shared.header.messages,
            "served": totals["served"],
            "connections": totals["connections"],
            "inflight": totals["inflight"],
            "auth_failures": totals["auth_failures"],
            "workers": sum(1 for process in self.processes if process is not None),
        }
        if fields != self._last_totals:
            self._last_totals = fields
            d = self.journal_log.record("totals", fields, "totals")
            d.addErrback(lambda failure: self.log.error(
                "could not journal the totals: {error}", error=failure.value))

    # -- stopping -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def stopService(self) -> Generator[Any, Any, None]:
        super().stopService()
        self.stopping = True
        self.notifier.stopping()
        self.notifier.stop_watchdog()
        if self._totals is not None and self._totals.running:
            self._totals.stop()
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        running = [p for p in self.processes if p is not None]
        for process in running:
            process.signal("TERM")
        killer = self.reactor.callLater(STOP_TIMEOUT, self._kill, running)
        yield defer.DeferredList([p.ended for p in running])
        if killer.active():
            killer.cancel()
        for sock in self.sockets:
            sock.close()
        totals = self.shared.totals()
        total = self.shared.header.messages
        try:
            yield self.journal_log.record(
                "stop", {"served": totals["served"], "total": total}, "cserver stopping"
            )
        except OSError as e:
            self.log.error("could not journal the stop record: {error}", error=e)
        self.journal.close()
        if self.lock is not None:
            self.lock.release()
        self.log.info("cserver stopped: served {served}, total {total}",
                      served=totals["served"], total=total)

    def _kill(self, processes: list[WorkerProcess]) -> None:
        for process in processes:
            if not process.ended.called:
                self.log.warn("worker {index} (pid {pid}) did not stop: killing it",
                              index=process.index, pid=process.pid)
                process.signal("KILL")
