"""The server's global state: the protocol factory.

One :class:`CServerFactory` holds what all connections share -- counters,
per-user message counts, limits, the cred portal and the journal -- and is
the only way a connection reaches them.  Every record goes to the journal
through a :class:`twisted.logger.Logger` whose observer is the journal.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import deferLater
from twisted.logger import Logger

from cserver import __version__
from cserver.auth import immediate_checker
from cserver.dedup import DedupWindow
from cserver.journal import EVENT, FIELDS, JournalLogger
from cserver.journal.keyed import keyed_since
from cserver.limits import Limits
from cserver.protocol import CServerProtocol
from cserver.throttle import AuthThrottle, FailureLog

__all__ = ["CServerFactory", "Limits"]

_DEFAULT_LIMITS = Limits()


class CServerFactory(ServerFactory):
    """
    Builds :class:`CServerProtocol` connections and holds the state they share.

    :ivar total: message records in the journal, all time.
    :ivar served: messages acknowledged since start.
    :ivar connections: connections open now.
    :ivar peak: the most connections open at once since start.
    :ivar inflight: MSGs received and not yet answered.
    :ivar inflight_peak: the most MSGs in flight at once since start.
    :ivar users: message records per user, all time.
    :ivar auth_failures: failed AUTHs since start.
    """

    protocol = CServerProtocol
    log = Logger()
    #: Why PUT is refused where the factory has no window.
    dedup_off = "PUT is off on this server (--dedup-window 0)"

    def __init__(self, journal: Any, portal: Any, clock: Any,
                 limits: Limits = _DEFAULT_LIMITS) -> None:
        self.journal = journal
        self.journal_log = JournalLogger(namespace="cserver.journal", observer=journal)
        self.portal = portal
        self.portal_interfaces = frozenset(portal.listCredentialsInterfaces())
        # The allow-list answers at once: AUTH then skips the Portal's Deferreds.
        self.check_now = immediate_checker(portal)
        self.clock = clock
        self.limits = limits
        self.max_line = limits.max_line
        self.max_pending = limits.max_pending
        self.work_delay = limits.work_delay
        recovery = journal.recovery
        self.total = recovery.messages
        self.users = dict(recovery.users)
        self.served = 0
        self.connections = 0
        self.peak = 0
        self.inflight = 0
        self.inflight_peak = 0
        self.auth_failures = 0
        self.throttle = AuthThrottle(clock, limits.auth_throttle, limits.auth_throttle_seconds)
        self.failure_log = FailureLog(clock)
        #: The PUT keys of the window (None: PUT is refused).
        self.dedup = (DedupWindow(clock, limits.dedup_window, limits.dedup_keys)
                      if limits.dedup_window else None)
        #: ``key_verdict(user, key, text)``: what a ``PUT`` of ``user`` with
        #: ``key`` and ``text`` is -- ``new`` (now in the window, in flight),
        #: a ``duplicate`` (the key is in the window with this text), a
        #: ``conflict`` (with another text), or ``unsupported`` (no window:
        #: ``--dedup-window 0``) -- and the key's name in the window.
        #: (The window's own method: one call less per PUT.)
        self.key_verdict = self.dedup.check if self.dedup is not None else self._no_keys
        path = getattr(journal, "path", None)
        if self.dedup is not None and path is not None:
            self.dedup.rebuild(keyed_since(path, clock.seconds() - limits.dedup_window,
                                           limits.dedup_keys))
        self.stopping = False
        self.protocols: set[Any] = set()
        self._drained: list[defer.Deferred[None]] = []
        self._sweep_call: Any = None

    # -- lifecycle ----------------------------------------------------------

    def startFactory(self) -> None:
        limits = self.limits
        throttle = limits.auth_throttle_seconds if limits.auth_throttle else 0
        timeouts = [t for t in (limits.idle_timeout, limits.auth_timeout, throttle) if t]
        if timeouts and self._sweep_call is None:
            self._schedule_sweep(min(1.0, min(timeouts) / 4))

    def stopFactory(self) -> None:
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None

    def _schedule_sweep(self, interval):
        self._sweep_call = self.clock.callLater(interval, self._sweep, interval)

    def _sweep(self, interval):
        """
        Time out, give or take ``interval``, connections that have not
        authenticated within ``auth_timeout`` seconds, and connections that
        sent no line for ``idle_timeout`` seconds and are owed no reply.
        One periodic pass instead of a timer per connection.
        """
        self._schedule_sweep(interval)
        self._journal_refusals(self.throttle.sweep())
        self.failure_log.flush()
        now = self.clock.seconds()
        idle_timeout = self.limits.idle_timeout
        auth_timeout = self.limits.auth_timeout
        expired = []
        for protocol in self.protocols:
            if auth_timeout and protocol.user is None:
                if now - protocol.connected_at >= auth_timeout:
                    expired.append(protocol)
                    continue
            if protocol.active or protocol.inflight:
                protocol.active = False
                protocol.idle_since = now
            elif idle_timeout and now - protocol.idle_since >= idle_timeout:
                expired.append(protocol)
        for protocol in expired:
            protocol.timed_out()

    def record_start(self) -> defer.Deferred[Any]:
        """
        Journal the ``start`` record, with what recovery found.
        """
        fields = {"version": __version__, **self.journal.recovery.summary()}
        return self.journal_log.record("start", fields, "cserver {version} starting")

    def record_stop(self) -> defer.Deferred[Any]:
        """
        Journal what the throttle refused, then the ``stop`` record; fires
        once it is durable.
        """
        self.journal_auth_refusals()
        fields = {"served": self.served, "total": self.total}
        return self.journal_log.record("stop", fields, "cserver stopping")

    def drain(self) -> defer.Deferred[None]:
        """
        Take no more MSGs; fire once every MSG in flight is answered.
        """
        self.stopping = True
        if not self.inflight:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        return d

    @defer.inlineCallbacks
    def close_connections(self, timeout: float = 2.0) -> Generator[Any, Any, None]:
        """
        Close every connection once what is written to it is sent (the
        reactor's own shutdown would drop connections with their last
        replies unsent); fires when all are closed or after ``timeout``.
        """
        yield deferLater(self.clock, 0, lambda: None)  # the last acks reach the transports
        for protocol in list(self.protocols):
            protocol.transport.loseConnection()
        deadline = self.clock.seconds() + timeout
        while self.connections and self.clock.seconds() < deadline:
            yield deferLater(self.clock, 0.01, lambda: None)

    # -- connections --------------------------------------------------------

    def connection_made(self, protocol: Any) -> bool:
        """
        Count a new connection; False when it is one too many.
        """
        if self.connections >= self.limits.max_connections:
            return False
        self.connections += 1
        if self.connections > self.peak:
            self.peak = self.connections
        protocol.idle_since = protocol.connected_at = self.clock.seconds()
        self.protocols.add(protocol)
        return True

    def connection_lost(self, protocol: Any) -> None:
        self.connections -= 1
        self.protocols.discard(protocol)

    # -- messages -----------------------------------------------------------

    def submit_message(self, protocol: Any, text: str,
                       ack: Callable[[int | None, str | None], object]) -> None:
        """
        Journal ``text`` from ``protocol``'s user, after the work delay;
        ``ack(seq, reason)`` is called once it is durable or has failed.
        """
        self.inflight += 1
        if self.inflight > self.inflight_peak:
            self.inflight_peak = self.inflight
        if self.stopping:
            ack(None, "server stopping")
            return
        if self.work_delay:
            self.clock.callLater(self.work_delay, self.journal_log.message, protocol.user, text,
                                 protocol.peer, ack)
        else:
            self.journal_log.message(protocol.user, text, protocol.peer, ack)

    def _no_keys(self, user: str, key: str, text: str) -> tuple[str, str]:
        return "unsupported", ""

    def submit_keyed(self, protocol: Any, key: str, text: str, reply: Any) -> None:
        """
        A ``PUT`` that :meth:`key_verdict` found new or a duplicate (then
        ``reply.dup`` is set): journal ``text`` with ``key``, or answer with
        the first record's seq.  ``reply`` is a
        :class:`cserver.replies.KeyedReply` for the key ``reply.name``:
        called as a MSG's reply is, and for a new key it then tells the window
        (``reply.done``).
        """
        window = self.dedup
        assert window is not None
        self.inflight += 1
        if self.inflight > self.inflight_peak:
            self.inflight_peak = self.inflight
        if reply.dup:
            window.wait(reply.name, reply)
            return
        if self.stopping:
            reply(None, "server stopping")
            window.done(reply.name, None, "server stopping")
            return
        reply.done = window.done
        if self.work_delay:
            self.clock.callLater(self.work_delay, self.journal_log.message, protocol.user, text,
                                 protocol.peer, reply, key)
        else:
            self.journal_log.message(protocol.user, text, protocol.peer, reply, key)

    def duplicate_done(self, protocol: Any, acked: bool) -> None:
        """
        A duplicate ``PUT`` of ``protocol`` was answered (with the first
        record's seq, or refused as the first was): nothing was journaled,
        so nothing is counted but its end, and the duplicate.
        """
        if acked and self.dedup is not None:
            self.dedup.duplicates += 1
        self.message_done(protocol, False)

    def message_done(self, protocol: Any, acked: bool) -> None:
        """
        A MSG of ``protocol`` was answered: acknowledged, or refused.
        """
        if acked:
            self.served += 1
            self.total += 1
            protocol.mine += 1
            user = protocol.user
            self.users[user] = self.users.get(user, 0) + 1
        self.inflight -= 1
        if not self.inflight and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    @property
    def auth_throttled(self) -> int:
        """
        AUTHs refused, unchecked, by the throttle since start.
        """
        return self.throttle.refused

    def auth_retry_after(self, protocol: Any) -> int | None:
        """
        Whole seconds until ``protocol``'s host address may AUTH again (it
        failed too often: see :class:`cserver.throttle.AuthThrottle`), or
        None when it may now.
        """
        return self.throttle.retry_after(protocol.host)

    def auth_failed(self, protocol: Any, user: str, why: object,
                    length: int | None = None) -> None:
        """
        Count and journal a failed AUTH (the name and the peer, never a
        password; a name of ``length`` bytes clipped to ``user``), log it
        (rate-limited), and count it against the peer's host address.
        """
        self.auth_failures += 1
        fields = {"user": user, "peer": protocol.peer}
        if length is not None:
            fields["clipped"] = True
            fields["length"] = length
        self.journal_log.info(
            "AUTH failed for user {user} from {peer}",
            **{EVENT: "auth_failed", FIELDS: fields},
            **fields,
        )
        self.failure_log.failed(user, protocol.peer, why)
        self.throttle.failed(protocol.host)

    def auth_refused(self, protocol: Any) -> None:
        """
        An AUTH from a throttled address, refused unchecked: counted (in
        ``auth_failures`` and ``auth_throttled``), not journaled one by one.
        """
        self.auth_failures += 1
        self.throttle.refuse(protocol.host)

    def journal_auth_refusals(self) -> None:
        """
        Journal the AUTHs refused so far from addresses still throttled (at
        stop: the sweep journals the others as each address is released).
        """
        self._journal_refusals(self.throttle.take_refusals())
        self.failure_log.flush(stopping=True)

    def _journal_refusals(self, lockouts):
        for lockout in lockouts:
            fields = lockout.fields()
            self.journal_log.info(
                "{refused} AUTHs refused from {host}, throttled",
                **{EVENT: "auth_throttled", FIELDS: fields},
                **fields,
            )

    def stats(self, protocol: Any) -> dict[str, Any]:
        """
        The figures ``STATS`` reports to ``protocol``.
        """
        user = protocol.user
        return {
            # On a stream, the stream's: every node's records.
            "total": getattr(self.journal, "stream_records", self.total),
            "served": self.served,
            "connections": self.connections,
            "peak": self.peak,
            "inflight": self.inflight,
            "inflight_peak": self.inflight_peak,
            "mine": protocol.mine,
            "user": user if user is not None else "-",
            "user_total": self.users.get(user, 0),
            "auth_failures": self.auth_failures,
            "auth_throttled": self.auth_throttled,
            "duplicates": self.dedup.duplicates if self.dedup is not None else 0,
            # A stream journal's connection (cserver.journal.jetstream).
            **(self.journal.stats() if hasattr(self.journal, "stats") else {}),
        }
