"""The client side of protocol v1, as a library: one job, talking to a server from Python.

Wait for the greeting, ``AUTH``, ``MSG``, ``STATS``, ``QUIT``, with pipelining
(replies are matched to requests in order) and an exception,
:class:`ServerError`, carrying the code of every ``ERR`` reply::

    d = connect(reactor, "tcp:host=127.0.0.1:port=31337", "alice")
    d.addCallback(lambda client: client.send("hello"))   # fires with the seq

This module imports nothing else of :mod:`cserver.client`: the bench and the
command line are built on it, never the other way round.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from cserver.dedup import KEY

#: Where the server listens unless told otherwise.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 31337


class ServerError(Exception):
    """The server answered ``ERR <code>[ <text>]``.

    :param code: the word after ``ERR`` (``auth``, ``noauth``, ``busy``,
        ``unavailable``, ``syntax``, ``state``, ``unknown``, ``toolong``,
        ``encoding``, ``timeout``).
    :param text: the rest of the line, possibly empty.
    """

    def __init__(self, code: str, text: str = "") -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text

    def __str__(self) -> str:
        return f"ERR {self.code} {self.text}".rstrip()


class UnexpectedReplyError(Exception):
    """The server sent a line that protocol v1 does not allow at that point."""


def parse_reply(line: str) -> tuple[bool, Any]:
    """Split one reply line into ``(ok, data)``.

    :param line: the reply, without its line end.
    :returns: ``(True, data)`` for ``OK[ <data>]``; ``(False, ServerError)`` for
        ``ERR <code>[ <text>]``.
    :raises UnexpectedReplyError: for any other line.
    """
    verb, _, rest = line.partition(" ")
    if verb == "OK":
        return True, rest
    if verb == "ERR":
        code, _, text = rest.partition(" ")
        return False, ServerError(code or "unknown", text)
    raise UnexpectedReplyError(f"unexpected reply line: {line!r}")


def parse_stats(data: str) -> dict[str, int | str]:
    """Turn the data of a STATS reply (``key=value key=value ...``) into a dict.

    :param data: the reply's data, after ``OK``.
    :returns: integer values as ``int``, other values as ``str``; a word without
        ``=`` is ignored.
    """
    stats: dict[str, int | str] = {}
    for word in data.split():
        key, sep, value = word.partition("=")
        if not sep:
            continue
        try:
            stats[key] = int(value)
        except ValueError:
            stats[key] = value
    return stats


class Seq(int):
    """
    The seq a message was journaled at; ``dup`` says the server had it
    already (a retried ``PUT``: nothing more was journaled).
    """

    dup: bool = False


def parse_ack(data: str) -> Seq:
    """The data of ``OK <seq>`` or ``OK <seq> dup`` as a :class:`Seq`."""
    number, _, flag = data.partition(" ")
    seq = Seq(int(number))
    seq.dup = flag == "dup"
    return seq


def _check_text(text: str, what: str) -> bytes:
    """``text`` in UTF-8, refused when it would be more than one line.

    :raises ValueError: when ``text`` holds a CR or an LF.
    """
    if "\n" in text or "\r" in text:
        raise ValueError(f"{what} must not contain a line break")
    return text.encode("utf-8")


class CserverClientProtocol(LineReceiver):
    """One client session: requests go out as lines, replies fire Deferreds in order.

    :attr:`greeted` fires with the server's version once ``HELLO cserver
    <version>`` arrives (or fails with :class:`ServerError` ``busy``).  Each
    request method returns a Deferred; any number may be outstanding at once.
    When the connection is lost, every outstanding Deferred fails with the
    reason, and :attr:`closed` fires.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20
    log = Logger()

    def __init__(self) -> None:
        self.greeted: defer.Deferred[str] = defer.Deferred(self._drop)
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.server_version: str | None = None
        #: The protocol the server speaks ("1.0" before PUT; "1.1").
        self.server_protocol: str | None = None
        self.user: str | None = None
        self._pending: deque[tuple[defer.Deferred[Any], Callable[[str], Any] | None]] = deque()
        self._lost: Failure | None = None

    def lineReceived(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if not self.greeted.called:
            self._greeting(text)
            return
        try:
            ok, data = parse_reply(text)
        except UnexpectedReplyError as e:
            self.log.warn("dropping the connection: {error}", error=e)
            self.close()
            return
        if not self._pending:
            self.log.info("reply to no request: {line}", line=text)
            return
        d, convert = self._pending.popleft()
        if d.called:
            return  # cancelled (timed out): its reply still holds its place in the order
        if ok:
            d.callback(convert(data) if convert else data)
        else:
            d.errback(data)

    def _greeting(self, text: str) -> None:
        if text.startswith("HELLO "):
            # HELLO cserver <version>[ proto=<protocol>]: 1.0 before PUT.
            words = text.split(" ")
            self.server_version = words[2] if len(words) > 2 else words[-1]
            options = dict(word.partition("=")[::2] for word in words[3:])
            self.server_protocol = options.get("proto", "1.0")
            self.greeted.callback(self.server_version)
            return
        error: Exception
        try:
            _, error = parse_reply(text)
        except UnexpectedReplyError as e:
            error = e
        if not isinstance(error, ServerError):
            error = UnexpectedReplyError(f"expected HELLO, got {text!r}")
        self.greeted.errback(error)
        self.close()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection, if there still is one (:attr:`closed` fires once it
        is gone)."""
        if self.transport is not None:
            self.transport.loseConnection()

    def _drop(self, _cancelled: defer.Deferred[str]) -> None:
        """Cancelling :attr:`greeted` (a connect timeout) gives up on the connection."""
        self.close()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = reason
        if not self.greeted.called:
            self.greeted.errback(reason)
        pending, self._pending = self._pending, deque()
        for d, _ in pending:
            d.errback(reason)
        self.closed.callback(None)

    def request(self, line: str,
                convert: Callable[[str], Any] | None = None) -> defer.Deferred[Any]:
        """Send one request line.

        Cancelling the Deferred (e.g. through ``addTimeout``) fails it at once; the
        reply, when it comes, is dropped so that later replies still match.

        :param line: the request, without its line end.
        :param convert: applied to the OK data before the Deferred fires with it.
        :returns: a Deferred firing with the (converted) OK data, or failing with
            :class:`ServerError` or the reason the connection was lost.
        :raises ValueError: when ``line`` holds a line break (nothing is sent).
        """
        if self._lost is not None:
            return defer.fail(self._lost)
        data = _check_text(line, "a request") + b"\n"
        d: defer.Deferred[Any] = defer.Deferred()
        self._pending.append((d, convert))
        assert self.transport is not None
        self.transport.write(data)
        return d

    def auth(self, user: str, password: str | None = None) -> defer.Deferred[str]:
        """``AUTH user[ password]``.

        :returns: a Deferred firing with the user name the server confirms (also
            kept as :attr:`user`).
        """
        line = f"AUTH {user}" if password is None else f"AUTH {user} {password}"

        def authenticated(name: str) -> str:
            self.user = name
            return name

        return self.request(line).addCallback(authenticated)

    def send(self, text: str, key: str | None = None) -> defer.Deferred[Seq]:
        """``MSG text``, or with ``key`` ``PUT key text`` (protocol 1.1: sent
        again with the same key, within the server's window, it is journaled
        once).

        :returns: a Deferred firing with the message's seq (a :class:`Seq`,
            ``dup`` set when the server had it already) once it is durable.
        :raises ValueError: when ``text`` holds a line break, or ``key`` is
            not a key (1 to 128 of letters, digits and ``._:@/+=-``).
        """
        if key is None:
            return self.request("MSG " + text, parse_ack)
        if not KEY.fullmatch(key):
            raise ValueError(f"not a key: {key!r} (1 to 128 letters, digits or ._:@/+=-)")
        return self.request(f"PUT {key} {text}", parse_ack)

    def stats(self) -> defer.Deferred[dict[str, int | str]]:
        """``STATS``.

        :returns: a Deferred firing with a dict (see :func:`parse_stats`).
        """
        return self.request("STATS", parse_stats)

    def quit(self) -> defer.Deferred[str]:
        """``QUIT``.

        :returns: a Deferred firing with ``"bye"`` when the server says goodbye.
        """
        return self.request("QUIT")


class CserverClientFactory(Factory):
    """Builds :class:`CserverClientProtocol` sessions for an endpoint."""

    protocol = CserverClientProtocol


def endpoint_description(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                         endpoint: str | None = None) -> str:
    """The :func:`~twisted.internet.endpoints.clientFromString` description to connect to.

    :param endpoint: a description, which wins over ``host`` and ``port`` when given.
    :returns: ``endpoint``, else ``tcp:host=<host>:port=<port>``.
    """
    if endpoint:
        return endpoint
    return f"tcp:host={host}:port={port}"


def within(d: defer.Deferred[Any], timeout: float | None,
           reactor: IReactorTime) -> defer.Deferred[Any]:
    """``d``, failing with :class:`~twisted.internet.defer.TimeoutError` after
    ``timeout`` seconds.

    :param timeout: seconds, or ``None`` for no limit (``d`` is returned as is).
    """
    return d if timeout is None else d.addTimeout(timeout, reactor)


@defer.inlineCallbacks
def connect(reactor: Any, description: str | IStreamClientEndpoint, user: str,
            password: str | None = None, factory: Factory | None = None,
            timeout: float | None = None) -> Any:
    """Connect, wait for the greeting and authenticate.

    :param reactor: the reactor to connect (and time out) with.
    :param description: a :func:`~twisted.internet.endpoints.clientFromString`
        string, or an endpoint.
    :param user: the user to ``AUTH`` as.
    :param password: sent after the user when given.
    :param factory: builds the protocol (default: a :class:`CserverClientFactory`).
    :param timeout: seconds; the connect, the greeting and the AUTH reply each fail
        with :class:`twisted.internet.defer.TimeoutError` when they take longer.
    :returns: a Deferred firing with the ready :class:`CserverClientProtocol`; on
        any failure the connection is closed.
    """
    endpoint = (clientFromString(reactor, description) if isinstance(description, str)
                else description)
    connecting = endpoint.connect(factory or CserverClientFactory())
    client = yield within(connecting, timeout, reactor)
    try:
        yield within(client.greeted, timeout, reactor)
        yield within(client.auth(user, password), timeout, reactor)
    except BaseException:
        client.close()
        raise
    return client
