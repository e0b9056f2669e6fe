"""The client side of the NATS text protocol, as a Twisted Protocol.

The server sends ``INFO {json}``, ``MSG <subject> <sid> [reply] <size>``,
``HMSG <subject> <sid> [reply] <hsize> <total>``, PING, PONG, +OK and
``-ERR '<text>'``; the client ``CONNECT {json}``, PUB, HPUB, SUB, UNSUB, PING
and PONG.  Every line ends with CRLF; a payload (``size`` bytes, the first
``hsize`` of them a headers block, :mod:`cserver.nats.wire`) and a CRLF follow
its line.  The handshake: the server's INFO, a TLS upgrade if either side
asks for it, CONNECT and PING; the first PONG makes the connection ready.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cserver.nats.wire import (
    CRLF,
    DEFAULT_MAX_PAYLOAD,
    MAX_CONTROL_LINE,
    ConnectOptions,
    NATSError,
    PayloadTooLarge,
    ProtocolError,
    Refused,
    StaleConnection,
    check_subject,
    encode_headers,
)

_log = Logger(namespace="cserver.nats")

#: ``handler(subject, sid, reply, headers_block_or_None, payload)`` per MSG/HMSG.
MessageHandler = Callable[[str, int, "str | None", "bytes | None", bytes], object]

_decode_json = msgspec.json.Decoder(dict[str, Any]).decode


def _number(raw: bytes, line: bytes) -> int:
    if not raw.isdigit():
        raise ProtocolError(f"not a number in {line[:80]!r}")
    return int(raw)


class NATSProtocol(Protocol):
    """
    One connection to a NATS server.

    :param clock: for the handshake timeout and the keep-alive PINGs.
    :param options: what CONNECT says.
    :param on_message: called for every MSG and HMSG.
    :param on_info: called with every INFO after the first (cluster changes).
    :param on_error: called with the text of an ``-ERR`` once ready.
    :param tls_context: called for the context given to ``startTLS`` when
        the server (``tls_required``) or ``options.tls`` asks for TLS.
    :param ping_interval: seconds between keep-alive PINGs once ready.
    :param max_outstanding_pings: a keep-alive PING due while this many are
        unanswered drops the connection instead (:class:`StaleConnection`).
    :param handshake_timeout: seconds from the TCP connection to the first
        PONG before it is dropped.

    :ivar ready: fires with the server's INFO at the first PONG, or fails
        (:class:`Refused`, :class:`ProtocolError`, the connection lost).
    :ivar failure: None, or why this side dropped the connection.
    """

    def __init__(self, clock: IReactorTime, options: ConnectOptions | None = None, *,
                 on_message: MessageHandler | None = None,
                 on_info: Callable[[dict[str, Any]], object] | None = None,
                 on_error: Callable[[str], object] | None = None,
                 tls_context: Callable[[], object] | None = None,
                 ping_interval: float = 30.0, max_outstanding_pings: int = 2,
                 handshake_timeout: float = 5.0) -> None:
        self.clock = clock
        self.options = options or ConnectOptions()
        self.on_message = on_message or (lambda *args: None)
        self.on_info = on_info
        self.on_error = on_error
        self.tls_context = tls_context
        self.ping_interval = ping_interval
        self.max_outstanding_pings = max_outstanding_pings
        self.handshake_timeout = handshake_timeout
        self.ready: Deferred[dict[str, Any]] = Deferred()
        self.is_ready = False
        self.server_info: dict[str, Any] | None = None
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self.failure: BaseException | None = None
        self._closing = False
        self._buffer = b""
        # A MSG/HMSG line waiting for its payload: (subject, sid, reply,
        # hsize, size), with what came of it so far.
        self._frame: tuple[str, int, str | None, int, int] | None = None
        self._chunks: list[bytes] = []
        self._have = 0
        self._wanted = 0
        # One entry per PING sent: a Deferred to fire at its PONG, or None.
        self._pings: deque[Deferred[None] | None] = deque()
        self._keepalive = LoopingCall(self._keep_alive)
        self._keepalive.clock = clock
        self._timer: IDelayedCall | None = None
        # The transport, untyped: ITransport lacks startTLS and abortConnection.
        self._tx: Any = None

    # -- the connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self._tx = self.transport
        self._timer = self.clock.callLater(self.handshake_timeout, self._handshake_timed_out)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        if self._keepalive.running:
            self._keepalive.stop()
        self._cancel_timer()
        why = Failure(self.failure) if self.failure is not None else reason
        self._fail_ready(why)
        pings, self._pings = self._pings, deque()
        for d in pings:
            if d is not None:
                d.errback(why)

    def drop(self, error: BaseException) -> None:
        """
        Drop the connection at once because of ``error`` (kept as
        :attr:`failure`, and the reason :attr:`ready` fails with).
        """
        if self._closing:
            return
        self._closing = True
        self.failure = error
        _log.warn("dropping the NATS connection: {error}", error=error)
        self._fail_ready(Failure(error))
        self._tx.abortConnection()

    def _fail_ready(self, why: Failure) -> None:
        if not self.ready.called:
            self.is_ready = False
            self.ready.errback(why)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self.drop(NATSError(f"no ready NATS connection within {self.handshake_timeout} s"))

    # -- reading ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._wanted:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._wanted:
                return
            data = b"".join(self._chunks)
            self._chunks = []
            self._have = self._wanted = 0
        elif self._buffer:
            data = self._buffer + data
            self._buffer = b""
        try:
            self._parse(data)
        except ProtocolError as e:
            self.drop(e)

    def _parse(self, data: bytes) -> None:
        pos, end = 0, len(data)
        frame = self._frame
        while pos < end:
            if frame is not None:
                subject, sid, reply, hsize, size = frame
                stop = pos + size
                if stop + 2 > end:
                    break
                if data[stop:stop + 2] != CRLF:
                    raise ProtocolError(f"the {size}-byte payload on {subject} is not "
                                        f"followed by CRLF")
                if hsize:
                    headers: bytes | None = data[pos:pos + hsize]
                    payload = data[pos + hsize:stop]
                else:
                    headers, payload = None, data[pos:stop]
                pos = stop + 2
                self._frame = frame = None
                self.on_message(subject, sid, reply, headers, payload)
            else:
                eol = data.find(CRLF, pos, pos + MAX_CONTROL_LINE + 2)
                if eol < 0:
                    if end - pos > MAX_CONTROL_LINE:
                        raise ProtocolError(f"a control line over {MAX_CONTROL_LINE} bytes: "
                                            f"{data[pos:pos + 40]!r}...")
                    break
                line = data[pos:eol]
                pos = eol + 2
                self._frame = frame = self._control(line)
            if self._closing:
                return
        rest = data[pos:] if pos else data
        if frame is not None:
            self._wanted = frame[4] + 2
            self._chunks = [rest]
            self._have = len(rest)
        else:
            self._buffer = rest

    def _control(self, line: bytes) -> tuple[str, int, str | None, int, int] | None:
        """Act on one control line; a MSG or HMSG line's frame is returned."""
        if line.startswith(b"MSG "):
            args = line[4:].split()
            if len(args) == 3:
                reply = None
            elif len(args) == 4:
                reply = args[2].decode()
            else:
                raise ProtocolError(f"malformed MSG: {line[:80]!r}")
            size = _number(args[-1], line)
            if size > self.max_payload:
                raise ProtocolError(f"a {size}-byte MSG, over max_payload {self.max_payload}")
            return args[0].decode(), _number(args[1], line), reply, 0, size
        if line.startswith(b"HMSG "):
            args = line[5:].split()
            if len(args) == 4:
                reply = None
            elif len(args) == 5:
                reply = args[2].decode()
            else:
                raise ProtocolError(f"malformed HMSG: {line[:80]!r}")
            hsize, size = _number(args[-2], line), _number(args[-1], line)
            if not 0 < hsize <= size:
                raise ProtocolError(f"HMSG headers size out of range: {line[:80]!r}")
            if size > self.max_payload:
                raise ProtocolError(f"a {size}-byte HMSG, over max_payload {self.max_payload}")
            return args[0].decode(), _number(args[1], line), reply, hsize, size
        if line == b"PING":
            self._tx.write(b"PONG\r\n")
        elif line == b"PONG":
            self._pong()
        elif line == b"+OK":
            pass
        elif line.startswith(b"-ERR"):
            self._server_error(line[4:].strip().strip(b"'").decode("utf-8", "replace"))
        elif line.startswith(b"INFO "):
            try:
                info = _decode_json(line[5:])
            except msgspec.DecodeError as e:
                raise ProtocolError(f"malformed INFO: {e}") from None
            self._info(info)
        else:
            raise ProtocolError(f"unknown frame from the server: {line[:80]!r}")
        return None

    def _info(self, info: dict[str, Any]) -> None:
        first = self.server_info is None
        self.server_info = info
        max_payload = info.get("max_payload")
        if isinstance(max_payload, int) and max_payload > 0:
            self.max_payload = max_payload
        if not first:
            if self.on_info is not None:
                self.on_info(info)
            return
        if info.get("tls_required") or self.options.tls:
            if self.tls_context is None:
                self.drop(NATSError("TLS is required but no TLS context was given"))
                return
            self._tx.startTLS(self.tls_context())
        self._pings.append(None)
        self._tx.write(self.options.connect_frame() + b"PING\r\n")

    def _pong(self) -> None:
        if self._pings:
            d = self._pings.popleft()
            if d is not None:
                d.callback(None)
        if not self.is_ready and self.server_info is not None:
            self.is_ready = True
            self._cancel_timer()
            self._keepalive.start(self.ping_interval, now=False)
            self.ready.callback(self.server_info)

    def _server_error(self, text: str) -> None:
        if not self.is_ready:
            self.drop(Refused(text))
            return
        _log.warn("the NATS server says: {text}", text=text)
        if self.on_error is not None:
            self.on_error(text)

    def _keep_alive(self) -> None:
        if len(self._pings) >= self.max_outstanding_pings:
            self.drop(StaleConnection(f"{len(self._pings)} PINGs unanswered"))
            return
        self._pings.append(None)
        self._tx.write(b"PING\r\n")

    # -- writing ----------------------------------------------------------------

    def publish(self, subject: str, payload: bytes, reply: str | None = None,
                headers: Mapping[str, str] | None = None) -> None:
        """
        Send PUB (HPUB with ``headers``) of ``payload`` to ``subject``.

        :raises ValueError: an invalid subject, reply or header.
        :raises PayloadTooLarge: over the server's ``max_payload``.
        """
        check_subject(subject)
        if reply is not None:
            check_subject(reply, "reply subject")
        size = len(payload)
        head = f"{subject} {reply} " if reply is not None else f"{subject} "
        if headers:
            block = encode_headers(headers)
            total = len(block) + size
            if total > self.max_payload:
                raise PayloadTooLarge(f"{total} bytes, over max_payload {self.max_payload}")
            line = f"HPUB {head}{len(block)} {total}\r\n".encode()
            self._tx.write(b"".join((line, block, payload, CRLF)))
        else:
            if size > self.max_payload:
                raise PayloadTooLarge(f"{size} bytes, over max_payload {self.max_payload}")
            self._tx.write(b"".join((f"PUB {head}{size}\r\n".encode(), payload, CRLF)))

    def subscribe(self, subject: str, sid: int, queue: str | None = None) -> None:
        """Send ``SUB subject [queue] sid``."""
        check_subject(subject)
        if queue is not None:
            check_subject(queue, "queue group")
        group = f"{queue} " if queue is not None else ""
        self._tx.write(f"SUB {subject} {group}{sid}\r\n".encode())

    def unsubscribe(self, sid: int, max_messages: int | None = None) -> None:
        """Send ``UNSUB sid [max_messages]``."""
        limit = f" {max_messages}" if max_messages is not None else ""
        self._tx.write(f"UNSUB {sid}{limit}\r\n".encode())

    def close(self) -> None:
        """Close the connection once what was written is sent."""
        self._tx.loseConnection()

    def ping(self) -> Deferred[None]:
        """Send PING: a Deferred that fires at its PONG (everything sent
        before it has been processed by the server)."""
        d: Deferred[None] = Deferred()
        self._pings.append(d)
        self._tx.write(b"PING\r\n")
        return d
