"""One worker process of ``twistd cserver --workers N``: ``python -m cserver.workers.worker``.

Only the parent (:mod:`cserver.workers.supervisor`) starts it, with the
descriptors :mod:`cserver.workers` lists; the worker reads its
:class:`cserver.workers.WorkerStart` from descriptor 0.

The worker runs the single-process server's factory and protocol over the
shared journal; it writes no ``start`` or ``stop`` record (the parent does).
Its counters go to its slot of the shared memory every 0.2 s and at stop;
STATS answers the sums over all workers plus this worker's own figures.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Generator
from typing import Any, TextIO

import attrs
from twisted.cred import strcred
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, formatEvent, globalLogBeginner
from zope.interface import provider

from cserver.auth import allow_list_portal, password_portal
from cserver.eager import eager_writes
from cserver.journal import Shared, SharedFileJournal, make_syncer
from cserver.poll import lean_poll
from cserver.process import ParentWatch, raise_open_file_limit, tune_interpreter
from cserver.server import CServerFactory, Limits
from cserver.workers import LISTEN_FD, SHARED_FD, WorkerStart

__all__ = ["Worker", "WorkerFactory", "main", "make_worker", "read_start"]

#: Seconds between two publications of a worker's counters.
PUBLISH_INTERVAL = 0.2
#: Seconds a stopping worker may take before it exits anyway.
STOP_DEADLINE = 30.0

_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}


class WorkerFactory(CServerFactory):
    """
    The server's factory for one worker: counters published to
    ``shared.slot(index)``, STATS answered with the sums over all workers.

    :ivar base: counters a dead predecessor in this slot had published
        (``served``, ``auth_failures``), so that the sums keep counting
        from server start.
    """

    noisy = False

    def __init__(self, journal: Any, portal: Any, clock: Any, limits: Limits, shared: Shared,
                 index: int, base: dict[str, int] | None = None) -> None:
        super().__init__(journal, portal, clock, limits)
        self.shared = shared
        self.index = index
        self.slot = shared.slot(index)
        self.base = dict(base or {})
        self.started = int(time.time())

    def publish(self) -> None:
        """
        Write this worker's counters to its slot.
        """
        slot = self.slot
        slot.pid = os.getpid()
        slot.started = self.started
        slot.connections = self.connections
        slot.peak = self.peak
        slot.served = self.base.get("served", 0) + self.served
        slot.inflight = self.inflight
        slot.inflight_peak = self.inflight_peak
        slot.auth_failures = self.base.get("auth_failures", 0) + self.auth_failures

    def stats(self, protocol: Any) -> dict[str, Any]:
        figures = super().stats(protocol)
        self.publish()
        totals = self.shared.totals()
        figures.update(
            (name, totals[name])
            for name in ("served", "connections", "peak", "inflight", "inflight_peak",
                         "auth_failures")
        )
        figures["total"] = self.shared.header.messages
        figures["worker"] = self.index
        figures["worker_served"] = self.served
        figures["worker_connections"] = self.connections
        return figures


@attrs.define(eq=False)
class Worker:
    """
    The worker's life: serve on the adopted socket until SIGTERM, SIGINT or
    the parent's exit; then stop listening, answer every MSG in flight,
    publish the counters and close the journal.

    :ivar family: the listening socket's family (:data:`socket.AF_INET`...).
    :ivar eager: give the port's connections eager writes (:mod:`cserver.eager`).
    :ivar port: the adopted listening port, once started.
    """

    reactor: Any
    factory: WorkerFactory
    family: int
    eager: bool = False
    port: Any = attrs.field(default=None, init=False)
    _publisher: LoopingCall | None = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)

    log = Logger(namespace="cserver.worker")

    def start(self) -> None:
        """
        Serve on the socket at :data:`cserver.workers.LISTEN_FD`; watch the
        parent on descriptor 0.
        """
        self.port = self.reactor.adoptStreamPort(LISTEN_FD, self.family, self.factory)
        os.close(LISTEN_FD)
        if self.eager:
            eager_writes(self.port)
        self._publisher = LoopingCall(self.factory.publish)
        self._publisher.clock = self.reactor
        self._publisher.start(PUBLISH_INTERVAL)
        self.reactor.addReader(ParentWatch(self.reactor, 0, self._parent_gone))
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        self.log.info("worker {index} serving (pid {pid})", index=self.factory.index,
                      pid=os.getpid())

    def _parent_gone(self) -> None:
        """
        The parent exited.  When this worker is stopping already (the
        parent's SIGTERM, a clean stop), that is expected and changes
        nothing; otherwise the parent died: stop.
        """
        if self._stopping:
            return
        self.log.warn("the parent is gone: stopping")
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    @defer.inlineCallbacks
    def stop(self) -> Generator[Any, Any, None]:
        """
        Stop listening, answer the MSGs in flight, close the journal; the
        process exits anyway after :data:`STOP_DEADLINE` seconds.
        """
        self._stopping = True
        self.reactor.callLater(STOP_DEADLINE, os._exit, 1)
        if self._publisher is not None and self._publisher.running:
            self._publisher.stop()
        if self.port is not None:
            yield self.port.stopListening()
        yield self.factory.drain()
        yield self.factory.close_connections()
        self.factory.journal_auth_refusals()
        self.factory.publish()
        self.factory.journal.close()
        self.log.info("worker {index} stopped: served {served}", index=self.factory.index,
                      served=self.factory.served)


def read_start(fd: int = 0) -> WorkerStart | None:
    """
    Read the line the parent writes first on ``fd``.

    :returns: the :class:`cserver.workers.WorkerStart`, or None when the
        parent closed the pipe before it wrote the whole line.
    """
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        data += chunk
    return WorkerStart.decode(data)


def _log_to(stream: TextIO) -> None:
    """
    Log lines without a time stamp (the parent adds its own) to ``stream``.
    """

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            text += "\n" + event["log_failure"].getTraceback()
        level = event.get("log_level")
        stream.write(f"[{event.get('log_namespace', '-')}#{level.name if level else '-'}] "
                     f"{text}\n")
        stream.flush()

    globalLogBeginner.beginLoggingTo([observe], redirectStandardIO=False)


def make_worker(start: WorkerStart, reactor: Any) -> Worker:
    """
    The worker's parts, from what its parent told it: the shared memory
    (:data:`cserver.workers.SHARED_FD`), the journal, the portal, the factory.
    """
    config = start.config
    if config.poll == "lean":
        lean_poll(reactor)
    shared = Shared.attach(SHARED_FD, config.workers)
    journal = SharedFileJournal.open(
        config.journal, reactor, shared, fsync=config.fsync,
        syncer=make_syncer(config.sync, reactor),
    )
    if config.auth:
        portal = password_portal([strcred.makeChecker(d) for d in config.auth])
    else:
        portal = allow_list_portal(config.users)
    base = {"served": start.base_served, "auth_failures": start.base_auth_failures}
    factory = WorkerFactory(journal, portal, reactor, Limits.from_config(config), shared,
                            start.index, base)
    # Each worker keeps its window; under the journal's lock it learns the
    # keys the others wrote, and leaves out a record whose key came first
    # from another worker (see SharedFileJournal).
    journal.keys = factory.dedup
    return Worker(reactor, factory, _FAMILIES[start.family], eager=config.writes == "eager")


def main() -> None:
    """
    Run a worker: read its start from the parent, serve until stopped, exit 0.
    """
    start = None if os.getppid() == 1 else read_start(0)
    if start is None:
        sys.exit("cserver.worker: the parent is already gone")
    from twisted.internet import reactor

    _log_to(sys.stdout)
    raise_open_file_limit(start.config.max_connections + 64)
    worker = make_worker(start, reactor)
    worker.start()
    tune_interpreter()
    reactor.run()
    sys.exit(0)


if __name__ == "__main__":
    # Run this module's main under its own name, not as __main__: its classes
    # are then the ones the rest of cserver names.
    from cserver.workers.worker import main as _main

    _main()
