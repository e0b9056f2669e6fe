"""One bench session on the wire: the lean protocol the load generator speaks.

One job: carry one session through GREET -> AUTH -> READY (the barrier) -> RUN ->
QUIT -> DONE with raw line splitting and plain callbacks -- no Deferred per
request -- so that the client is not the bottleneck, and name every way a
session can fail with a short code (:func:`classify`).  Everything counted or
decided across sessions belongs to its factory, a :class:`cserver.client.bench.Bench`,
which the session calls at each step (``connection_made``, ``authenticated``,
``stats_received``, ``messages_done``, ``error``, ``session_failed``,
``attempt_ended``).
"""

from __future__ import annotations

import errno
from collections import deque
from typing import Any

from twisted.internet import defer, error, tcp
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from cserver.client.protocol import ServerError, parse_reply, parse_stats

try:
    from twisted.internet import unix
except ImportError:  # no AF_UNIX here
    unix = None  # type: ignore[assignment]

#: A session's states, in the order it goes through them (FAILED from any).
GREET, AUTH, READY, STATS, RUN, QUIT, DONE, FAILED = range(8)

# Transports whose socket the sessions may write to directly: exactly these types,
# never a wrapper (TLS and policies wrappers forward ``socket`` by __getattr__).
PLAIN_TRANSPORTS = (tcp.Client,) + ((unix.Client,) if unix else ())


def classify(reason: BaseException | Failure | None) -> str:
    """The error code under which a failed session or connection attempt is counted.

    :param reason: why it failed: an exception or a
        :class:`~twisted.python.failure.Failure`.
    :returns: the ``ERR`` code of a :class:`~cserver.client.protocol.ServerError`;
        ``refused``, ``timeout``, ``limit``, ``ports``, ``connect``, ``closed``,
        ``reset`` or ``cancelled`` for a connection's failures; else the type's name.
    """
    e = reason.value if isinstance(reason, Failure) else reason
    if isinstance(e, ServerError):
        return e.code
    if isinstance(e, error.ConnectionRefusedError):
        return "refused"
    if isinstance(e, (error.TimeoutError, error.TCPTimedOutError)):
        return "timeout"
    if isinstance(e, error.ConnectError):
        if e.osError in (errno.EMFILE, errno.ENFILE):
            return "limit"
        return "ports" if e.osError == errno.EADDRNOTAVAIL else "connect"
    if isinstance(e, error.ConnectionDone):
        return "closed"
    if isinstance(e, error.ConnectionLost):
        return "reset"
    if isinstance(e, defer.CancelledError):
        return "cancelled"
    return type(e).__name__


def _code(line: bytes) -> str:
    """The code of an ``ERR <code> ...`` line, else ``protocol``."""
    if line.startswith(b"ERR "):
        _, refusal = parse_reply(line.rstrip(b"\r").decode("ascii", "replace"))
        return refusal.code
    return "protocol"


class BenchProtocol(Protocol):
    """One bench session: GREET -> AUTH -> READY (barrier) -> RUN -> QUIT -> DONE.

    Its factory moves it on at the barrier: to STATS on one session, then to RUN
    with :attr:`to_send` MSGs to send on each.
    """

    # A tcp.Client, a unix.Client or a wrapper: write() reads a plain one's buffers.
    transport: Any
    state: int = GREET
    number: int = 0
    closed: bool = False

    def __init__(self) -> None:
        self._buffer = b""
        self.sent_at: deque[float] = deque()
        self.to_send = 0
        self.sent = 0

    def connectionMade(self) -> None:
        transport = self.transport
        try:
            transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        # A plain socket transport lets write() skip Twisted's buffer when it is empty.
        self._sock = transport.socket if type(transport) in PLAIN_TRANSPORTS else None
        self.factory.connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > 65536:
            self.fail("protocol")
        if not lines:
            return
        if self.state == RUN:
            self.replies(lines)
            return
        for i, line in enumerate(lines):
            if self.state == RUN:
                self.replies(lines[i:])
                return
            self.control(line.rstrip(b"\r"))

    def control(self, line: bytes) -> None:
        """A line outside the message phase (greeting, AUTH, STATS, QUIT replies).

        :param line: the line, without its line end.
        """
        state = self.state
        if not line or state in (DONE, FAILED):
            return
        ok = line.startswith(b"OK")
        if state == GREET and line.startswith(b"HELLO"):
            self.state = AUTH
            self.write(self.factory.auth_line)
        elif not ok:
            self.fail(_code(line))
        elif state == AUTH:
            self.state = READY
            self.factory.authenticated(self)
        elif state == STATS:
            self.state = READY
            self.factory.stats_received(parse_stats(line[3:].decode("utf-8", "replace")))
        elif state == QUIT:
            self.state = DONE
            self.transport.loseConnection()
        else:
            self.fail("protocol")

    def replies(self, lines: list[bytes]) -> None:
        """The hot path: MSG replies, matched in order to the send times.

        :param lines: complete reply lines, their LF removed.
        """
        bench = self.factory
        now = bench.now()
        sent_at = self.sent_at
        if len(lines) == 1 and sent_at and lines[0][:2] == b"OK":
            bench.latencies.append(now - sent_at.popleft())
            bench.acked += 1
        else:
            record = bench.latencies.append
            for line in lines:
                if not sent_at:
                    self.control(line.rstrip(b"\r"))
                elif line[:2] == b"OK":
                    record(now - sent_at.popleft())
                    bench.acked += 1
                else:
                    sent_at.popleft()
                    bench.error(_code(line))
            if self.state != RUN:
                return
        bench.progress += 1
        if self.to_send:
            if not bench.open_loop:
                self.send(min(len(lines), self.to_send), now)
        elif not sent_at:
            self.quit()

    def send(self, count: int, stamp: float) -> None:
        """Send ``count`` MSGs in one write.

        :param stamp: the send time of them all, from which their latency counts.
        """
        start = self.sent
        self.sent = start + count
        self.to_send -= count
        number = self.number
        factory = self.factory
        if factory.keyed:
            key, text = factory.key_prefix, factory.text_prefix
            if count == 1:
                self.sent_at.append(stamp)
                self.write(b"%s%d-%d %s%d %d\n" % (key, number, start, text, number, start))
                return
            self.sent_at.extend([stamp] * count)
            self.write(b"".join([b"%s%d-%d %s%d %d\n" % (key, number, i, text, number, i)
                                 for i in range(start, start + count)]))
            return
        prefix = factory.msg_prefix
        if count == 1:
            self.sent_at.append(stamp)
            self.write(b"%s%d %d\n" % (prefix, number, start))
        else:
            self.sent_at.extend([stamp] * count)
            self.write(
                b"".join([b"%s%d %d\n" % (prefix, number, i) for i in range(start, start + count)])
            )

    def write(self, data: bytes) -> None:
        """Send at once when Twisted holds nothing queued (saves a reactor turn), else queue."""
        transport, sock = self.transport, self._sock
        if sock is not None and not transport.dataBuffer and not transport._tempDataBuffer:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def quit(self) -> None:
        """Say QUIT: this session's MSGs are all answered."""
        self.state = QUIT
        self.write(b"QUIT\n")
        self.factory.messages_done(self)

    def fail(self, code: str) -> None:
        """Count this session as failed under ``code`` and drop its connection."""
        if self.state in (DONE, FAILED):
            return
        was = self.state
        self.state = FAILED
        self.factory.session_failed(self, was, code)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        if self.state not in (DONE, QUIT, FAILED) and not self.factory.aborting:
            self.fail(classify(reason))
        self.state = DONE if self.state != FAILED else FAILED
        self.factory.attempt_ended()
