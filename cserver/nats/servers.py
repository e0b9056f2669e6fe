"""The servers a NATS client tries, in turn, and how long it waits between
tries: :func:`parse_url` and :class:`ServerPool`.
"""

from __future__ import annotations

from collections.abc import Iterable
from random import Random
from urllib.parse import unquote, urlsplit

import attrs
from twisted.logger import Logger

_log = Logger(namespace="cserver.nats")

DEFAULT_PORT = 4222


@attrs.frozen
class Server:
    """One server to connect to, with the credentials to use there."""

    host: str
    port: int = DEFAULT_PORT
    tls: bool = False
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)
    #: Announced by the cluster (``connect_urls``) rather than given.
    discovered: bool = False

    @property
    def url(self) -> str:
        """The URL, without credentials (for logs)."""
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"


def default_tls_options(host: str) -> object:
    """The TLS options of a ``tls://`` server: ``host`` checked against the
    system's trust roots (needs the ``tls`` extra: imported when used)."""
    from twisted.internet.ssl import optionsForClientTLS

    return optionsForClientTLS(host)


def parse_url(url: str) -> Server:
    """
    A :class:`Server` from ``nats://[user:password@]host[:port]``,
    ``nats://token@host[:port]``, ``tls://...`` or a bare ``host[:port]``.

    :raises ValueError: another scheme, or no host.
    """
    parts = urlsplit(url if "://" in url else "nats://" + url)
    if parts.scheme not in ("nats", "tls"):
        raise ValueError(f"not a nats:// or tls:// URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in NATS URL {url!r}")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    token = None
    if user is not None and password is None:
        user, token = None, user
    return Server(parts.hostname, parts.port or DEFAULT_PORT, parts.scheme == "tls",
                  user, password, token)


class ServerPool:
    """
    The servers to try, in order, round and round: each attempt takes the
    next one.  After a failed attempt the next server is tried at once,
    until every server failed in a row: then the pool waits a backoff that
    starts at ``reconnect_wait`` and doubles each such round up to
    ``max_reconnect_wait`` (plus up to ``jitter`` of it, at random).  A
    ready connection starts over.

    :param servers: URLs (see :func:`parse_url`).
    :param user: ``password``, ``token``: credentials for URLs without any.
    """

    def __init__(self, servers: Iterable[str], *, user: str | None = None,
                 password: str | None = None, token: str | None = None,
                 reconnect_wait: float = 0.1, max_reconnect_wait: float = 5.0,
                 jitter: float = 0.2, random: Random | None = None) -> None:
        self.servers: list[Server] = []
        for url in servers:
            server = parse_url(url)
            if server.user is None and server.token is None:
                server = attrs.evolve(server, user=user, password=password, token=token)
            self.servers.append(server)
        if not self.servers:
            raise ValueError("no NATS server URL given")
        self.reconnect_wait = reconnect_wait
        self.max_reconnect_wait = max_reconnect_wait
        self.jitter = jitter
        self._random = random or Random()
        self._next = 0
        self._failures = 0
        self._backoff = reconnect_wait

    def next(self) -> Server:
        """The server to try now."""
        index = self._next % len(self.servers)
        self._next = index + 1  # servers discovered meanwhile come next
        return self.servers[index]

    def connected(self) -> None:
        """The last server tried is connected and ready: reset the backoff."""
        self._failures = 0
        self._backoff = self.reconnect_wait

    def failed(self) -> float:
        """The last attempt failed: how many seconds to wait before the next."""
        self._failures += 1
        if self._failures < len(self.servers):
            return 0.0
        self._failures = 0
        delay = self._backoff * (1 + self.jitter * self._random.random())
        self._backoff = min(self._backoff * 2, self.max_reconnect_wait)
        return delay

    def discover(self, connect_urls: Iterable[str], like: Server) -> list[Server]:
        """
        Add each ``host:port`` of ``connect_urls`` not in the pool yet, with
        the scheme and credentials of ``like``; the servers added.
        """
        known = {(server.host, server.port) for server in self.servers}
        added = []
        for address in connect_urls:
            host, _, port = str(address).rpartition(":")
            host = host.strip("[]")
            if not host or not port.isdigit() or (host, int(port)) in known:
                continue
            known.add((host, int(port)))
            server = attrs.evolve(like, host=host, port=int(port), discovered=True)
            self.servers.append(server)
            added.append(server)
            _log.info("NATS server discovered: {url}", url=server.url)
        return added
