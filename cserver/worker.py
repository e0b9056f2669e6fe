"""One worker process of ``twistd cserver --workers N``: ``python -m cserver.worker``.

Only :mod:`cserver.workers` (the parent) starts it, with these descriptors:

- 0: a pipe from the parent, never written to: end of file on it means the
  parent is gone, and the worker stops;
- 1, 2: pipes to the parent, which logs what the worker prints;
- 3: the listening socket, adopted with ``adoptStreamPort``;
- 4: the shared memory (:class:`cserver.shared.Shared`);
- 5: the journal's lock file (:mod:`cserver.lock`), held open, and with it
  the lock, for as long as the worker lives.

The worker runs the single-process server's factory and protocol over the
shared journal; it writes no ``start`` or ``stop`` record (the parent does).
Its counters go to its slot of the shared memory every 0.2 s and at stop;
STATS answers the sums over all workers plus this worker's own figures.
"""

import argparse
import os
import socket
import sys
import time

from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger, formatEvent
from zope.interface import implementer

from cserver.eager import eager_writes
from cserver.server import CServerFactory, Limits

LISTEN_FD = 3
SHARED_FD = 4
#: Seconds between two publications of a worker's counters.
PUBLISH_INTERVAL = 0.2
#: Seconds a stopping worker may take before it exits anyway.
STOP_DEADLINE = 30.0

_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}


class WorkerFactory(CServerFactory):
    """
    The server's factory for one worker: counters published to
    ``shared.slot(index)``, STATS answered with the sums over all workers.

    @ivar base: counters a dead predecessor in this slot had published
        (``served``, ``auth_failures``), so that the sums keep counting
        from server start.
    """

    noisy = False

    def __init__(self, journal, portal, clock, limits, shared, index, base=None):
        super().__init__(journal, portal, clock, limits)
        self.shared = shared
        self.index = index
        self.slot = shared.slot(index)
        self.base = dict(base or {})
        self.started = int(time.time())

    def publish(self):
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

    def stats(self, protocol):
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


@implementer(IReadDescriptor)
class ParentWatch:
    """
    Calls ``gone()`` once the parent's end of a pipe is closed: the parent
    exited, however it died.
    """

    def __init__(self, reactor, fd, gone):
        self.reactor = reactor
        self.fd = fd
        self.gone = gone
        os.set_blocking(fd, False)

    def fileno(self):
        return self.fd

    def logPrefix(self):
        return "parent-watch"

    def doRead(self):
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self.reactor.removeReader(self)
            self._lost()
        return None

    def connectionLost(self, reason):
        # epoll reports a pipe whose writer is gone as a hang-up, without
        # readable data: the reactor then calls this instead of doRead.
        self._lost()

    def _lost(self):
        gone, self.gone = self.gone, None
        if gone is not None:
            gone()


class Worker:
    """
    The worker's life: serve on the adopted socket until SIGTERM, SIGINT or
    the parent's exit; then stop listening, answer every MSG in flight,
    publish the counters and close the journal.
    """

    log = Logger(namespace="cserver.worker")

    def __init__(self, reactor, factory, family, eager=False):
        self.reactor = reactor
        self.factory = factory
        self.family = family
        self.eager = eager
        self.port = None
        self._publisher = None
        self._stopping = False

    def start(self):
        from twisted.internet.task import LoopingCall

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

    def _parent_gone(self):
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
    def stop(self):
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


def parse_args(argv):
    from cserver.tap import SYNC_MODES, WRITE_MODES

    parser = argparse.ArgumentParser(prog="python -m cserver.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--family", choices=sorted(_FAMILIES), default="inet")
    parser.add_argument("--journal", required=True)
    parser.add_argument("--fsync", default="always")
    parser.add_argument("--users", default="")
    parser.add_argument("--auth", action="append", default=[])
    parser.add_argument("--max-connections", type=int, default=Limits.max_connections)
    parser.add_argument("--idle-timeout", type=float, default=Limits.idle_timeout)
    parser.add_argument("--auth-timeout", type=float, default=Limits.auth_timeout)
    parser.add_argument("--max-line", type=int, default=Limits.max_line)
    parser.add_argument("--work-delay", type=float, default=Limits.work_delay)
    parser.add_argument("--auth-throttle", type=int, default=Limits.auth_throttle)
    parser.add_argument("--writes", choices=WRITE_MODES, default="eager")
    parser.add_argument("--sync", choices=SYNC_MODES, default="auto")
    parser.add_argument("--base-served", type=int, default=0)
    parser.add_argument("--base-auth-failures", type=int, default=0)
    return parser.parse_args(argv)


def _log_to(stream):
    """
    Log lines without a time stamp (the parent adds its own) to ``stream``.
    """
    from twisted.logger import globalLogBeginner

    def observe(event):
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            text += "\n" + event["log_failure"].getTraceback()
        level = event.get("log_level")
        stream.write(f"[{event.get('log_namespace', '-')}#{level.name if level else '-'}] "
                     f"{text}\n")
        stream.flush()

    globalLogBeginner.beginLoggingTo([observe], redirectStandardIO=False)


def make_worker(args, reactor):
    """
    The worker's parts from its arguments: the shared memory, the journal,
    the portal, the factory.
    """
    from twisted.cred import strcred

    from cserver.auth import allow_list_portal, password_portal
    from cserver.journal import SharedFileJournal
    from cserver.shared import Shared
    from cserver.tap import make_syncer

    shared = Shared.attach(SHARED_FD, args.workers)
    journal = SharedFileJournal.open(
        args.journal, reactor, shared, fsync=args.fsync,
        syncer=make_syncer(args.sync, reactor),
    )
    if args.auth:
        portal = password_portal([strcred.makeChecker(d) for d in args.auth])
    else:
        portal = allow_list_portal([u for u in args.users.split(",") if u])
    limits = Limits(
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        auth_timeout=args.auth_timeout,
        max_line=args.max_line,
        work_delay=args.work_delay,
        auth_throttle=args.auth_throttle,
    )
    base = {"served": args.base_served, "auth_failures": args.base_auth_failures}
    factory = WorkerFactory(journal, portal, reactor, limits, shared, args.index, base)
    return Worker(reactor, factory, _FAMILIES[args.family], eager=args.writes == "eager")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.getppid() == 1:
        sys.exit("cserver.worker: the parent is already gone")
    from twisted.internet import reactor

    from cserver.tap import raise_open_file_limit, tune_interpreter

    _log_to(sys.stdout)
    raise_open_file_limit(args.max_connections + 64)
    worker = make_worker(args, reactor)
    worker.start()
    tune_interpreter()
    reactor.run()
    sys.exit(0)


if __name__ == "__main__":
    # Run this module's main under its own name, not as __main__: the log
    # namespaces then read cserver.worker.
    from cserver.worker import main as _main

    _main()
