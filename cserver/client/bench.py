"""The load generator: one client factory firing N sessions in parallel, in one reactor.

One job: open N connections through one factory, authenticate them all, hold
every session at a barrier until all N are authenticated (so N sessions are
open at the same instant, which the server's own count of open connections,
read by STATS at the barrier, confirms), then send every MSG (closed loop, or
open loop with ``rate``), QUIT, and time each phase -- while a watchdog makes
sure every run ends.  What one run is asked to do is a :class:`BenchConfig`;
what it did, a :class:`RunResult`.  The sessions themselves are
:class:`~cserver.client.bench_protocol.BenchProtocol`\\ s.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any, cast

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IConnector, IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

from cserver.client.bench_protocol import (
    AUTH,
    DONE,
    FAILED,
    GREET,
    QUIT,
    READY,
    RUN,
    STATS,
    BenchProtocol,
    classify,
)

_TCP = re.compile(r"tcp:host=([\w.-]+):port=(\d+)$")


@attrs.define
class BenchConfig:
    """What one bench process runs (``--processes`` children get theirs as JSON)."""

    #: A :func:`~twisted.internet.endpoints.clientFromString` description.
    endpoint: str
    user: str
    password: str | None = None
    connections: int = 1000
    #: MSGs per session, closed loop.
    messages: int = 1
    #: MSGs in flight per session, closed loop.
    pipeline: int = 1
    text: str = "bench"
    #: Open loop: MSGs per second in all, else ``None`` (closed loop).
    rate: float | None = None
    #: Open loop: the run's length in seconds.
    duration: float = 10.0
    #: Seconds without progress after which the run is given up.
    timeout: float = 60.0
    #: The number of this process's first session (with ``--processes``).
    first: int = 0
    #: Open loop: this process's share of the MSGs (see :func:`~cserver.client.processes.split`).
    total: int | None = None
    #: Keyed messages (``PUT <key> <text>``, each key new) instead of MSGs.
    keyed: bool = False

    def total_messages(self) -> int:
        """How many MSGs the run sends in all.

        :returns: ``total`` or ``rate`` x ``duration`` in an open loop, else
            ``connections`` x ``messages``.
        """
        if self.rate:
            return self.total if self.total is not None else round(self.rate * self.duration)
        return self.connections * self.messages


@attrs.define
class RunResult:
    """The raw outcome of one bench process; times are ``time.monotonic()`` stamps
    (``t0`` start, ``t1`` barrier passed, ``t2`` last MSG answered, ``t3`` end)."""

    requested: int
    opened: int = 0
    authenticated: int = 0
    acked: int = 0
    failed: int = 0
    #: Failures counted by code (see :func:`~cserver.client.bench_protocol.classify`).
    errors: dict[str, int] = attrs.Factory(dict)
    peak: int | None = None
    server_connections: int | None = None
    t0: float | None = None
    t1: float | None = None
    t2: float | None = None
    t3: float | None = None
    #: Seconds from each MSG's send (or intended send) time to its OK.
    latencies: list[float] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)

    @classmethod
    def not_run(cls, requested: int, errors: dict[str, int], note: str) -> RunResult:
        """The result of a run that could not take place: every session failed.

        :param requested: the sessions the run was to open.
        :param errors: the failures, by code.
        :param note: why, for the report.
        """
        return cls(requested=requested, failed=requested, errors=errors, notes=[note])


class Bench(ClientFactory):
    """The one factory of a bench run: counts, barrier, phases and the watchdog.

    :meth:`start` opens ``config.connections`` connections and returns a Deferred
    that fires with the :class:`RunResult`.

    :param config: what to run.
    :param reactor: connects, and times the phases and the watchdog.
    :param endpoint: connect through it; by default to ``config.endpoint`` (plain
        ``tcp:host=H:port=P`` goes straight to ``connectTCP``, anything else
        through :func:`~twisted.internet.endpoints.clientFromString`).
    :param now: the clock latencies and phases are measured with.
    :param on_ready: called when all sessions are authenticated; by default
        :meth:`go` (a ``--processes`` child tells its parent instead, which
        joins all the barriers).
    """

    protocol = BenchProtocol

    def __init__(self, config: BenchConfig, reactor: Any,
                 endpoint: IStreamClientEndpoint | None = None,
                 now: Callable[[], float] = time.monotonic,
                 on_ready: Callable[[], object] | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.endpoint = endpoint
        self.now = now
        self.on_ready = on_ready or self.go
        self.result = RunResult(requested=config.connections)
        self.latencies = self.result.latencies
        self.sessions: list[BenchProtocol] = []
        self.connecting: list[IConnector | defer.Deferred[Any]] = []
        self.ended = 0
        self.connect_failures = 0
        self.sending = 0
        self.acked = 0
        self.progress = 0
        self.aborting = False
        self.open_loop = bool(config.rate)
        self.done: defer.Deferred[RunResult] = defer.Deferred()
        self._timers: dict[str, IDelayedCall] = {}
        self._next = 0
        password = "" if config.password is None else " " + config.password
        self.auth_line = f"AUTH {config.user}{password}\n".encode()
        self.msg_prefix = f"MSG {config.text} ".encode() if config.text else b"MSG "
        #: With ``keyed``: each line is ``PUT <key_prefix><session>-<n> <text> ...``,
        #: the prefix new for each run (keys of earlier runs may still be in the
        #: server's window).
        self.keyed = config.keyed
        self.key_prefix = b"PUT b%s-" % (os.urandom(4).hex().encode(),)
        self.text_prefix = f"{config.text} ".encode() if config.text else b"x "

    def start(self) -> defer.Deferred[RunResult]:
        """Open every connection.

        :returns: a Deferred firing with the :class:`RunResult` once all have ended.
        """
        self.result.t0 = self.now()
        plain = _TCP.match(self.config.endpoint) if self.endpoint is None else None
        if plain:
            host, port = plain.group(1), int(plain.group(2))
            for _ in range(self.config.connections):
                self.connecting.append(self.reactor.connectTCP(host, port, self))
        else:
            endpoint = self.endpoint or clientFromString(self.reactor, self.config.endpoint)
            for _ in range(self.config.connections):
                d = endpoint.connect(self)
                self.connecting.append(d)
                d.addErrback(self._connect_failed)
        self._watch(self.progress, self.now())
        return self.done

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self._connect_failed(reason)

    def _connect_failed(self, reason: Failure) -> None:
        self.connect_failures += 1
        if not self.aborting:
            self.session_failed(None, GREET, classify(reason))
        self.attempt_ended()

    def connection_made(self, session: BenchProtocol) -> None:
        """A session is connected: number it (its MSG texts carry the number)."""
        session.number = self.config.first + len(self.sessions)
        self.sessions.append(session)
        self.result.opened += 1
        self.progress += 1
        if self.aborting:
            session.transport.loseConnection()

    def authenticated(self, session: BenchProtocol) -> None:
        """A session waits at the barrier; the last one in calls ``on_ready``."""
        self.result.authenticated += 1
        self.progress += 1
        if self.result.authenticated == self.config.connections:
            self.connecting = []
            self.on_ready()
        elif self.result.failed:
            self._check_barrier()

    def go(self) -> None:
        """Pass the barrier: ask the server's STATS on one session, then send."""
        if self.aborting:
            return
        first = self.sessions[0]
        first.state = STATS
        first.transport.write(b"STATS\n")

    def stats_received(self, stats: dict[str, int | str]) -> None:
        """The STATS at the barrier: note the server's counts, start every session."""
        # Ints, from a cserver: parse_stats keeps what is not a number as str.
        self.result.peak = cast("int | None", stats.get("peak"))
        self.result.server_connections = cast("int | None", stats.get("connections"))
        self.result.t1 = now = self.now()
        config = self.config
        self.sending = len(self.sessions)
        total = config.total_messages()
        for session in self.sessions:
            session.state = RUN
            if self.open_loop:
                index = session.number - config.first
                session.to_send = len(range(index, total, len(self.sessions)))
            else:
                session.to_send = config.messages
        for session in self.sessions:
            if self.open_loop or not session.to_send:
                if not session.to_send:
                    session.quit()
            else:
                session.send(min(config.pipeline, session.to_send), now)
        if self.open_loop:
            self._next = 0
            self._tick()

    def _tick(self) -> None:
        """Open loop: send every MSG whose intended time has come, stamped with it."""
        config, sessions, start = self.config, self.sessions, self.result.t1
        assert start is not None and config.rate
        total, rate = config.total_messages(), config.rate
        now = self.now()
        due = min(total, int((now - start) * rate) + 1)
        for k in range(self._next, due):
            session = sessions[k % len(sessions)]
            if session.state == RUN:
                session.send(1, start + k / rate)
        self._next = due
        if due < total:
            delay = max(0.0, start + due / rate - now)
            self._timers["tick"] = self.reactor.callLater(delay, self._tick)

    def messages_done(self, session: BenchProtocol | None) -> None:
        """A session has no MSG left to send or to see answered."""
        self.sending -= 1
        if self.sending == 0:
            self.result.t2 = self.now()

    def error(self, code: str) -> None:
        """Count one failure under ``code``."""
        self.result.errors[code] = self.result.errors.get(code, 0) + 1

    def session_failed(self, session: BenchProtocol | None, state: int, code: str) -> None:
        """A session (``None``: a connection attempt) failed in ``state``."""
        self.result.failed += 1
        self.error(code)
        if state == RUN:
            self.messages_done(session)
        elif state in (GREET, AUTH, READY, STATS):
            self._check_barrier()

    def _check_barrier(self) -> None:
        """Before the barrier, one failed session means the barrier can never open."""
        result = self.result
        if result.t1 is None and result.failed + result.authenticated >= result.requested:
            self.abort(f"could not open {result.requested} sessions: "
                       f"{result.authenticated} authenticated")

    def abort(self, note: str) -> None:
        """Give up: close every connection, cancel pending connects, finish.

        :param note: why, for the report.
        """
        if self.aborting:
            return
        self.aborting = True
        self.result.notes.append(note)
        for pending in self.connecting:
            if isinstance(pending, defer.Deferred):
                if not pending.called:
                    pending.cancel()
            elif getattr(pending, "state", "connecting") == "connecting":
                pending.stopConnecting()
        for session in self.sessions:
            if not session.closed:
                session.transport.loseConnection()
        self._timers["abort"] = self.reactor.callLater(5, self._finish)

    def attempt_ended(self) -> None:
        """A connection attempt, or the session it opened, is over."""
        self.ended += 1
        if self.ended >= self.config.connections:
            self._finish()

    def _watch(self, seen: int, since: float) -> None:
        """Abort when nothing has progressed for ``config.timeout`` seconds while
        replies are awaited; stops once the run ends or aborts."""
        if self.done.called or self.aborting:
            return
        now = self.now()
        if self.progress != seen or not self._awaiting_replies():
            seen, since = self.progress, now
        elif now - since >= self.config.timeout:
            stuck = self._stuck()
            if stuck:
                self.result.errors["timeout"] = self.result.errors.get("timeout", 0) + stuck
                self.result.failed += stuck
            self.abort(f"no progress for {self.config.timeout:g} s: {stuck} sessions stuck")
            return
        self._timers["watch"] = self.reactor.callLater(1.0, self._watch, seen, since)

    def _awaiting_replies(self) -> bool:
        """Before the barrier and in a closed loop, always; in an open loop only while
        some session has a MSG, STATS or QUIT unanswered (not between its MSGs)."""
        if not self.open_loop or self.result.t1 is None:
            return True
        return any(s.sent_at or s.state in (STATS, QUIT) for s in self.sessions)

    def _stuck(self) -> int:
        """Sessions neither done nor already counted as failed, including connection
        attempts that have not come back."""
        never = self.config.connections - len(self.sessions) - self.connect_failures
        return never + sum(1 for s in self.sessions if s.state not in (DONE, FAILED))

    def _finish(self) -> None:
        if self.done.called:
            return
        result = self.result
        if result.t1 is not None and result.t2 is None:
            result.t2 = self.now()
        result.t3 = self.now()
        result.acked = self.acked
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self.done.callback(result)
