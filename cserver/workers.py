"""The parent of ``twistd cserver --workers N`` (N > 1).

It recovers the journal and sets up the shared memory's journal header,
makes N ``SO_REUSEPORT`` listening sockets on the one TCP port (one per
worker; it keeps them all open, so a restarting worker's queue is not
reset), and runs N :mod:`cserver.worker` processes.  It writes the ``start``
and ``stop`` records, restarts a worker that dies (with a backoff), logs the
global totals every 10 s, and on SIGTERM or SIGINT stops every worker
gracefully before it writes the ``stop`` record.  Under systemd it is the
main process: it sends ``READY=1`` (the ``start`` record durable, the sockets
listening), ``WATCHDOG=1`` and ``STOPPING=1``.  See docs/workers-design.rst.
"""

import os
import socket
import sys

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from cserver import __version__
from cserver.endpoints import parse_tcp
from cserver.notify import Notifier
from cserver.service import log_start_not_journaled, stop_cleanly_on_signals

#: Seconds before the first restart of a worker that died (--restart-delay).
RESTART_DELAY = 0.5
#: The longest wait before a restart (--restart-max-delay).
MAX_RESTART_DELAY = 30.0
#: A worker up this many seconds counts as stable: its next restart is quick.
STABLE_AFTER = 10.0
#: Seconds between two logs of the totals.
TOTALS_INTERVAL = 10.0
#: Seconds the workers have to stop before they are killed.
STOP_TIMEOUT = 25.0


# -- the listening sockets ----------------------------------------------------------------

def reuseport_sockets(family, host, port, backlog, count):
    """
    ``count`` listening sockets bound with ``SO_REUSEPORT`` to one address
    (port 0: the port the first one got).
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# -- the workers ----------------------------------------------------------------------------

class WorkerProcess(ProcessProtocol):
    """
    One worker seen from the parent: its output goes to the parent's log,
    its end to the supervisor.
    """

    log = Logger(namespace="cserver.workers")

    def __init__(self, supervisor, index, started_at):
        self.supervisor = supervisor
        self.index = index
        self.started_at = started_at
        self.pid = None
        self.ended = defer.Deferred()
        self._partial = {1: b"", 2: b""}

    def connectionMade(self):
        self.pid = self.transport.pid

    def childDataReceived(self, fd, data):
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            self.log.info("worker {index} [{pid}]: {line}", index=self.index, pid=self.pid,
                          line=line.decode("utf-8", "replace"))

    def processEnded(self, reason):
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


def _describe_exit(reason):
    if isinstance(reason.value, ProcessDone):
        return "exited with status 0"
    if reason.value.signal is not None:
        return f"was killed by signal {reason.value.signal}"
    return f"exited with status {reason.value.exitCode}"


class WorkerSupervisor(Service):
    """
    Runs and restarts ``count`` workers; writes the ``start`` and ``stop``
    records.

    @ivar processes: the running :class:`WorkerProcess` of each index, or None.
    @ivar notifier: a :class:`cserver.notify.Notifier` (default: one for this
        process's environment).
    """

    log = Logger(namespace="cserver.workers")

    def __init__(self, reactor, shared, journal, recovery, sockets, worker_argv,
                 exit_cleanly=False, notifier=None, restart_delay=RESTART_DELAY,
                 max_restart_delay=MAX_RESTART_DELAY, lock=None, auth=None):
        from cserver.journal import JournalLogger

        self.notifier = Notifier() if notifier is None else notifier
        self.reactor = reactor
        self.shared = shared
        self.journal = journal
        self.recovery = recovery
        self.journal_log = JournalLogger(namespace="cserver.journal", observer=journal)
        self.sockets = sockets
        self.worker_argv = worker_argv
        self.exit_cleanly = exit_cleanly
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.lock = lock
        self.auth = auth
        self.count = len(sockets)
        self.processes = [None] * self.count
        self._delays = [0.0] * self.count
        self._restarts = {}
        self._totals = None
        self._last_totals = None
        self.stopping = False

    def startService(self):
        from twisted.internet.task import LoopingCall

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

    def _log_listening(self):
        recovery = self.recovery
        host, port = self.sockets[0].getsockname()[:2]
        kind = "tcp6" if self.sockets[0].family == socket.AF_INET6 else "tcp"
        self.log.info(
            "cserver {version} listening on {kind}:{host}:{port} with {count} workers; "
            "journal {path} ({records} records, last seq {seq})",
            version=__version__, kind=kind, host=host, port=port, count=self.count,
            path=self.journal.path, records=recovery.records, seq=recovery.last_seq,
        )
        if self.auth:
            self.log.info("{auth}", auth=self.auth)

    def _ready(self, seq):
        # The sockets listen since make_service: a connection waits in the
        # backlog until a worker accepts it.
        if self.running and not self.stopping:
            host, port = self.sockets[0].getsockname()[:2]
            self.notifier.ready(f"listening on {host}:{port} with {self.count} workers")
        return seq

    def _spawn(self, index):
        self._restarts.pop(index, None)
        slot = self.shared.slot(index)
        argv = [
            sys.executable, "-m", "cserver.worker", "--index", str(index),
            "--workers", str(self.count),
            "--family", "inet6" if self.sockets[index].family == socket.AF_INET6 else "inet",
            "--base-served", str(slot.served), "--base-auth-failures", str(slot.auth_failures),
            *self.worker_argv,
        ]
        process = WorkerProcess(self, index, self.reactor.seconds())
        self.processes[index] = process
        self.reactor.spawnProcess(
            process, sys.executable, argv, env=dict(os.environ),
            childFDs=self._child_fds(index),
        )
        self.log.info("worker {index} started, pid {pid}", index=index, pid=process.pid)

    def _child_fds(self, index):
        """
        A worker's descriptors (see :mod:`cserver.worker`); it holds the
        journal's lock too, so the lock outlives a parent killed while its
        workers still answer their last MSGs.
        """
        fds = {0: "w", 1: "r", 2: "r", 3: self.sockets[index].fileno(), 4: self.shared.fd}
        if self.lock is not None and self.lock.fd is not None:
            fds[5] = self.lock.fd
        return fds

    def abandon(self):
        """
        Give up a supervisor that will not be started: close the sockets and
        the journal, let go of the lock.
        """
        for sock in self.sockets:
            sock.close()
        self.journal.close()
        if self.lock is not None:
            self.lock.release()

    def worker_ended(self, process, reason):
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

    def log_totals(self):
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
    def stopService(self):
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
            process.transport.signalProcess("TERM")
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

    def _kill(self, processes):
        for process in processes:
            if not process.ended.called:
                self.log.warn("worker {index} (pid {pid}) did not stop: killing it",
                              index=process.index, pid=process.pid)
                process.transport.signalProcess("KILL")


# -- wiring ---------------------------------------------------------------------------------

def worker_arguments(config):
    """
    The ``cserver.worker`` options that carry ``config`` to a worker.
    """
    argv = [
        "--journal", os.path.abspath(config["journal"]), "--fsync", config["fsync"],
        "--users", ",".join(config["user_list"]),
        "--max-connections", str(config["max-connections"]),
        "--idle-timeout", str(config["idle-timeout"]),
        "--auth-timeout", str(config["auth-timeout"]),
        "--max-line", str(config["max-line"]),
        "--work-delay", str(config["work-delay"]),
        "--auth-throttle", str(config["auth-throttle"]),
        "--writes", config["writes"],
        "--sync", config["sync"],
    ]
    for description in config.get("auth_descriptions", ()):
        argv += ["--auth", description]
    return argv


def make_service(config, reactor):
    """
    The parent's service for ``--workers N``: take the journal's lock,
    prepare the journal and the shared memory, make the sockets.  Exits with
    one line, leaving nothing behind, when the journal is in use or damaged
    or the port cannot be bound.
    """
    from cserver.auth import describe_checkers
    from cserver.journal import SharedFileJournal
    from cserver.recovery import JournalDamaged
    from cserver.shared import Shared
    from cserver.tap import describe_listen_error, make_syncer, take_journal_lock

    count = config["workers"]
    family, host, port, backlog = parse_tcp(config["port"])
    path = config["journal"]
    lock = take_journal_lock(path)
    try:
        try:
            sockets = reuseport_sockets(family, host, port, backlog, count)
        except OSError as e:
            raise SystemExit(f"cserver: cannot listen on {config['port']} (--port): "
                             f"{describe_listen_error(e)}") from None
        try:
            shared = Shared.create(count)
            recovery = SharedFileJournal.prepare(path, shared)
            journal = SharedFileJournal.open(
                path, reactor, shared, fsync=config["fsync"],
                syncer=make_syncer(config["sync"], reactor),
            )
        except BaseException as e:
            for sock in sockets:
                sock.close()
            if isinstance(e, JournalDamaged):
                raise SystemExit(f"cserver: {e}") from None
            if isinstance(e, OSError):
                raise SystemExit(f"cserver: cannot open journal {path}: "
                                 f"{e.strerror or e}") from None
            raise
    except BaseException:
        lock.release()
        raise
    return WorkerSupervisor(reactor, shared, journal, recovery, sockets,
                            worker_arguments(config), exit_cleanly=True,
                            restart_delay=config["restart-delay"],
                            max_restart_delay=config["restart-max-delay"], lock=lock,
                            auth=describe_checkers(config.get("auth_descriptions"),
                                                   config["user_list"]))

