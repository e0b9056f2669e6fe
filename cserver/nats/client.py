"""A NATS client that keeps itself connected, with publish, request/reply
and subscriptions: ``client = NATSClient(reactor, ["nats://127.0.0.1:4222",
...])``, ``yield client.start()``, ``headers, data = yield client.request(
"service.x", b"ping")``.

Once its connection drops it reconnects to the next server at once, and
when every server failed in a row, after a backoff (:mod:`.servers`).
Nothing is buffered meanwhile: :meth:`NATSClient.publish` raises and
:meth:`NATSClient.request` fails at once with :class:`NotConnected`; a
request written on a connection that then dropped fails with
:class:`RequestLost` (it may or may not have been acted on: the caller
decides whether to send it again).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from random import Random
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IAddress, IConnector, IDelayedCall
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from cserver.nats.protocol import NATSProtocol
from cserver.nats.servers import Server, ServerPool, default_tls_options
from cserver.nats.wire import (
    ConnectOptions,
    Msg,
    NATSError,
    NoResponders,
    NotConnected,
    ProtocolError,
    RequestLost,
    RequestTimeout,
    check_subject,
    parse_headers,
)

_log = Logger(namespace="cserver.nats")


@attrs.define
class _Subscription:
    subject: str
    callback: Callable[[Msg], object]
    queue: str | None


@attrs.define
class _Request:
    deferred: Deferred[tuple[dict[str, str], bytes]]
    timer: IDelayedCall
    subject: str


class _Factory(ClientFactory):
    """One connection attempt to one server, reported to its client."""

    noisy = False

    def __init__(self, client: NATSClient, server: Server) -> None:
        self.client = client
        self.server = server
        self.protocol_instance: NATSProtocol | None = None

    def buildProtocol(self, addr: IAddress | None) -> NATSProtocol:
        self.protocol_instance = self.client._build_protocol(self.server)
        return self.protocol_instance

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.client._attempt_ended(self, reason)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        self.client._attempt_ended(self, reason)


class NATSClient:
    """
    A connection to a NATS cluster, kept up by reconnecting.

    :param reactor: provides IReactorTCP and IReactorTime.
    :param servers: ``user``, ``password``, ``token``, ``reconnect_wait``,
        ``max_reconnect_wait``, ``jitter``, ``random``: the
        :class:`~cserver.nats.servers.ServerPool` of the URLs to try.
    :param tls_options: ``tls_options(host)`` gives the context for
        ``startTLS`` (default: ``twisted.internet.ssl.optionsForClientTLS``).
    :param connect_timeout: seconds for the TCP connection, then again for
        the handshake.
    :param ping_interval: ``max_outstanding_pings``: the keep-alive.
    :param request_timeout: the default timeout of :meth:`request`.
    :param discover: add the servers the cluster announces (``connect_urls``).

    :ivar pool: the servers, given and discovered.
    :ivar connected: whether a connection is ready now.
    :ivar reconnects: connections made after the first.
    :ivar server: the :class:`Server` connected to, or None.
    :ivar server_info: the INFO of the server connected to (last one).
    :ivar last_error: why the last connection or attempt ended, or None.
    """

    def __init__(self, reactor: Any, servers: Iterable[str], *, name: str = "cserver",
                 user: str | None = None, password: str | None = None,
                 token: str | None = None,
                 tls_options: Callable[[str], object] | None = None,
                 connect_timeout: float = 5.0, ping_interval: float = 30.0,
                 max_outstanding_pings: int = 2, reconnect_wait: float = 0.1,
                 max_reconnect_wait: float = 5.0, jitter: float = 0.2,
                 request_timeout: float = 5.0, discover: bool = True,
                 random: Random | None = None) -> None:
        self.reactor = reactor
        self.name = name
        self.pool = ServerPool(servers, user=user, password=password, token=token,
                               reconnect_wait=reconnect_wait,
                               max_reconnect_wait=max_reconnect_wait, jitter=jitter,
                               random=random)
        self._tls_options = tls_options or default_tls_options
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.max_outstanding_pings = max_outstanding_pings
        self.request_timeout = request_timeout
        self.discover = discover
        self.connected = False
        self.reconnects = 0
        self.server: Server | None = None
        self.server_info: dict[str, Any] | None = None
        self.last_error: BaseException | None = None
        self._protocol: NATSProtocol | None = None
        self._attempt: _Factory | None = None
        self._connector: IConnector | None = None
        self._retry: IDelayedCall | None = None
        self._started = self._closed = self._ever_connected = False
        self._sid = 0
        self._subscriptions: dict[int, _Subscription] = {}
        self._inbox = ""
        self._inbox_sid = 0
        self._token = 0
        self._requests: dict[str, _Request] = {}
        self._waiters: list[Deferred[None]] = []
        self._close_waiters: list[Deferred[None]] = []

    @property
    def server_version(self) -> str | None:
        """The version of the server connected to last (from its INFO)."""
        return None if self.server_info is None else self.server_info.get("version")

    # -- connecting -------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start connecting (once); fires like :meth:`when_connected`."""
        if not self._started and not self._closed:
            self._started = True
            self._connect_next()
        return self.when_connected()

    def when_connected(self) -> Deferred[None]:
        """Fires once a connection is ready (now, if one is); fails with
        :class:`NotConnected` if the client is closed first."""
        if self._closed:
            return fail(NotConnected("the NATS client is closed"))
        if self.connected:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def _connect_next(self) -> None:
        self._retry = None
        if self._closed:
            return
        server = self.pool.next()
        self._attempt = _Factory(self, server)
        self._connector = self.reactor.connectTCP(server.host, server.port, self._attempt,
                                                  timeout=self.connect_timeout)

    def _build_protocol(self, server: Server) -> NATSProtocol:
        options = ConnectOptions(user=server.user, password=server.password,
                                 token=server.token, name=self.name, tls=server.tls)
        proto = NATSProtocol(
            self.reactor, options, on_message=self._message, on_info=self._discover,
            tls_context=lambda: self._tls_options(server.host),
            ping_interval=self.ping_interval,
            max_outstanding_pings=self.max_outstanding_pings,
            handshake_timeout=self.connect_timeout)
        # A failed handshake is reported when the connection ends (_attempt_ended).
        proto.ready.addCallbacks(lambda info: self._ready(proto, server, info), lambda _: None)
        return proto

    def _ready(self, proto: NATSProtocol, server: Server, info: dict[str, Any]) -> None:
        if self._closed:
            proto.close()
            return
        self._protocol, self.server, self.server_info = proto, server, info
        self.connected = True
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self.pool.connected()
        self._inbox = f"_INBOX.{secrets.token_hex(11)}."
        self._sid += 1
        self._inbox_sid = self._sid
        proto.subscribe(self._inbox + "*", self._inbox_sid)
        for sid, subscription in self._subscriptions.items():
            proto.subscribe(subscription.subject, sid, subscription.queue)
        self._discover(info)
        _log.info("connected to NATS {url} (server {server_name} {version}, reconnects "
                  "{reconnects})", url=server.url, server_name=info.get("server_name"),
                  version=info.get("version"), reconnects=self.reconnects)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _discover(self, info: dict[str, Any]) -> None:
        if self.discover and self.server is not None:
            self.pool.discover(info.get("connect_urls") or (), self.server)
        if info.get("ldm") and self._protocol is not None and not self._closed:
            # Lame duck: leave now, not when the server drops us; what was in
            # flight fails with RequestLost, for the caller to send again.
            _log.info("NATS {url} is entering lame duck mode: moving to another server",
                      url=self.server.url if self.server is not None else "-")
            self._protocol.close()

    def _attempt_ended(self, attempt: _Factory, reason: Failure) -> None:
        """A connection attempt failed, or a connection (ready or not) ended."""
        if attempt is not self._attempt:
            return
        self._attempt = self._connector = None
        proto = attempt.protocol_instance
        why = (proto.failure if proto is not None and proto.failure is not None
               else reason.value)
        url = attempt.server.url
        if proto is not None and proto is self._protocol:
            self._protocol, self.connected = None, False
            self.last_error = why
            if self._closed:
                _log.info("closed the NATS connection to {url}", url=url)
            else:
                _log.warn("lost the NATS connection to {url}: {why}", url=url, why=why)
            self._fail_requests(RequestLost(f"the connection to {url} was lost before "
                                            f"the reply ({why})"))
            delay = 0.0
        else:
            self.last_error = why
            if not self._closed:
                _log.warn("cannot connect to NATS {url}: {why}", url=url, why=why)
            delay = self.pool.failed()
        if self._closed:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)
            return
        if delay:
            _log.info("no NATS server ready: trying again in {delay:.2f} s", delay=delay)
        self._retry = self.reactor.callLater(delay, self._connect_next)

    # -- using the connection ---------------------------------------------------

    def _ready_protocol(self) -> NATSProtocol:
        proto = self._protocol
        if proto is None:
            raise NotConnected("closed" if self._closed else "not connected to NATS")
        return proto

    def publish(self, subject: str, payload: bytes, headers: Mapping[str, str] | None = None,
                reply: str | None = None) -> None:
        """Publish ``payload`` to ``subject`` (fire and forget).

        :raises NotConnected: no ready connection now; nothing was sent.
        :raises ValueError: an invalid subject or header.
        :raises cserver.nats.wire.PayloadTooLarge: over the server's cap.
        """
        self._ready_protocol().publish(subject, payload, reply, headers)

    def request(self, subject: str, payload: bytes, headers: Mapping[str, str] | None = None,
                timeout: float | None = None) -> Deferred[tuple[dict[str, str], bytes]]:
        """Publish ``payload`` to ``subject`` with a reply subject in this
        client's inbox, and wait for the reply.

        :returns: a Deferred firing with the reply's ``(headers, payload)``,
            or failing with :class:`NotConnected` (nothing sent),
            :class:`NoResponders`, :class:`RequestTimeout` or
            :class:`RequestLost`.  Cancelling it forgets the request.
        """
        try:
            proto = self._ready_protocol()
            self._token += 1
            token = str(self._token)
            proto.publish(subject, payload, self._inbox + token, headers)
        except (NATSError, ValueError) as e:
            return fail(e)
        d: Deferred[tuple[dict[str, str], bytes]] = Deferred(
            lambda _: self._forget(token))
        wait = self.request_timeout if timeout is None else timeout
        timer = self.reactor.callLater(wait, self._timed_out, token, wait)
        self._requests[token] = _Request(d, timer, subject)
        return d

    def _forget(self, token: str) -> None:
        request = self._requests.pop(token, None)
        if request is not None and request.timer.active():
            request.timer.cancel()

    def _timed_out(self, token: str, wait: float) -> None:
        request = self._requests.pop(token, None)
        if request is not None:
            request.deferred.errback(RequestTimeout(
                f"no reply to the request on {request.subject} within {wait} s"))

    def _fail_requests(self, error: NATSError) -> None:
        requests, self._requests = self._requests, {}
        for request in requests.values():
            if request.timer.active():
                request.timer.cancel()
            request.deferred.errback(error)

    def _message(self, subject: str, sid: int, reply: str | None, block: bytes | None,
                 payload: bytes) -> None:
        if sid == self._inbox_sid:
            request = self._requests.pop(subject[len(self._inbox):], None)
            if request is None:
                return  # timed out or cancelled already
            request.timer.cancel()
            try:
                headers = parse_headers(block) if block is not None else {}
            except ProtocolError as e:
                request.deferred.errback(e)
                return
            if headers.get("Status") == "503":
                request.deferred.errback(NoResponders(f"no responders on {request.subject}"))
            else:
                request.deferred.callback((headers, payload))
            return
        subscription = self._subscriptions.get(sid)
        if subscription is None:
            return
        try:
            headers = parse_headers(block) if block is not None else {}
            subscription.callback(Msg(subject, reply, headers, payload))
        except Exception:
            _log.failure("the callback of the subscription to {subject} failed",
                         subject=subscription.subject)

    def subscribe(self, subject: str, callback: Callable[[Msg], object],
                  queue: str | None = None) -> int:
        """
        Call ``callback(msg)`` with every :class:`Msg` on ``subject`` (in
        ``queue`` group, if given), from now on and again after every
        reconnect.

        :returns: the subscription's id, for :meth:`unsubscribe`.
        """
        check_subject(subject)
        if queue is not None:
            check_subject(queue, "queue group")
        self._sid += 1
        sid = self._sid
        self._subscriptions[sid] = _Subscription(subject, callback, queue)
        if self._protocol is not None:
            self._protocol.subscribe(subject, sid, queue)
        return sid

    def unsubscribe(self, sid: int) -> None:
        """Stop the subscription ``sid`` (an unknown one is ignored)."""
        if self._subscriptions.pop(sid, None) is not None and self._protocol is not None:
            self._protocol.unsubscribe(sid)

    def flush(self) -> Deferred[None]:
        """Fires once the server processed all sent so far (PING, PONG)."""
        try:
            return self._ready_protocol().ping()
        except NotConnected as e:
            return fail(e)

    def close(self) -> Deferred[None]:
        """
        Stop reconnecting and close the connection: waiters of
        :meth:`when_connected` fail with :class:`NotConnected`, requests
        without a reply with :class:`RequestLost`.  Fires once closed.
        """
        self._closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(NotConnected("the NATS client was closed"))
        if self._attempt is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        if self._protocol is not None:
            self._protocol.close()
        elif self._connector is not None:
            self._connector.disconnect()
        return d
