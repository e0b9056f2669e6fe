"""Where a journal on a NATS JetStream stream lives: ``--journal
nats://[user:password@]HOST:PORT[,HOST:PORT...]/STREAM`` (``tls://`` for TLS
to NATS), parsed once for the server and for ``cserver-journal``.

The records of stream ``STREAM`` are published on the subject
``cserver.STREAM`` (:attr:`StreamURL.subject`); each one's payload is the
JSON of a file journal's line without its ``seq`` (the stream's sequence
is the seq).
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

import attrs

#: A stream's name: what JetStream allows in one subject token, kept simple.
STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: The prefix of the subject a stream's records are published on.
SUBJECT_PREFIX = "cserver."

_URL = re.compile(r"(?P<scheme>nats|tls)://(?:(?P<auth>[^@/]*)@)?(?P<hosts>[^/@]+)/(?P<stream>[^/]*)")


def is_stream_url(text: str) -> bool:
    """Whether ``--journal text`` names a stream (else it is a file's path)."""
    return text.startswith(("nats://", "tls://"))


@attrs.frozen
class StreamURL:
    """A parsed ``nats://`` journal: the servers, the stream, the credentials."""

    #: ``host:port`` of each server given, in order.
    hosts: tuple[str, ...]
    stream: str
    tls: bool = False
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    @property
    def subject(self) -> str:
        """The subject the stream's records are published on."""
        return SUBJECT_PREFIX + self.stream

    @property
    def server_urls(self) -> list[str]:
        """One client URL per server, with the credentials (for the client)."""
        scheme = "tls" if self.tls else "nats"
        auth = ""
        if self.user is not None:
            auth = quote(self.user, safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        return [f"{scheme}://{auth}{host}" for host in self.hosts]

    def __str__(self) -> str:
        """The URL without the password (for logs and errors)."""
        scheme = "tls" if self.tls else "nats"
        user = f"{quote(self.user, safe='')}@" if self.user is not None else ""
        return f"{scheme}://{user}{','.join(self.hosts)}/{self.stream}"


def parse_stream_url(text: str) -> StreamURL:
    """
    Parse ``nats://[user[:password]@]HOST:PORT[,HOST:PORT...]/STREAM``.

    :raises ValueError: with a line saying what is wrong.
    """
    match = _URL.fullmatch(text)
    if match is None:
        raise ValueError(f"{_clean(text)!r} is not nats://[USER:PASSWORD@]HOST:PORT"
                         "[,HOST:PORT...]/STREAM")
    stream = match["stream"]
    if not STREAM_NAME.fullmatch(stream):
        raise ValueError(f"stream name {stream!r}: 1 to 64 letters, digits, _ or -")
    hosts = []
    for host in match["hosts"].split(","):
        name, colon, port = host.rpartition(":")
        if not colon or not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{host!r} in {_clean(text)!r} is not HOST:PORT")
        hosts.append(f"{name}:{int(port)}")
    user = password = None
    if match["auth"] is not None:
        user, colon, secret = match["auth"].partition(":")
        user = unquote(user)
        password = unquote(secret) if colon else None
    return StreamURL(tuple(hosts), stream, match["scheme"] == "tls", user, password)


def _clean(text: str) -> str:
    """``text`` with a password in it hidden."""
    return re.sub(r"(://[^:@/]*:)[^@/]*@", r"\1***@", text)
