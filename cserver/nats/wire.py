"""What goes over the wire to and from a NATS server, apart from the
connection's state machine (:mod:`cserver.nats.protocol`): the errors, the
CONNECT options, subjects and the headers block.

A headers block is ``NATS/1.0[ <status>[ <description>]]\r\n``, then one
``Key: value\r\n`` line per header, then ``\r\n``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs
import msgspec

from cserver import __version__

CRLF = b"\r\n"
#: The first line of a headers block, before any status code.
HEADER_VERSION = b"NATS/1.0"
#: The longest control line taken (INFO included: a cluster's lists it).
MAX_CONTROL_LINE = 64 * 1024
#: The payload cap until the server's INFO tells its ``max_payload``.
DEFAULT_MAX_PAYLOAD = 1024 * 1024

_whitespace = re.compile(r"\s").search
_encode_json = msgspec.json.Encoder().encode


class NATSError(Exception):
    """Something went wrong talking to a NATS server."""


class ProtocolError(NATSError):
    """The server sent a malformed frame, or one over the size caps."""


class ServerError(NATSError):
    """The server sent ``-ERR '<text>'``; ``text`` is what it said."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class Refused(ServerError):
    """``-ERR`` before the connection was ready (``Authorization Violation``)."""


class StaleConnection(NATSError):
    """Keep-alive PINGs went unanswered: the connection was dropped."""


class PayloadTooLarge(NATSError, ValueError):
    """A message over the server's ``max_payload``."""


class NotConnected(NATSError):
    """The client has no ready connection (or was closed): nothing was sent."""


class RequestLost(NATSError):
    """The connection dropped after the request was written and before its
    reply: the server may or may not have acted on it."""


class RequestTimeout(NATSError, TimeoutError):
    """No reply within the request's timeout."""


class NoResponders(NATSError):
    """The server answered a request with status 503: nothing subscribes to
    its subject."""


@attrs.frozen
class Msg:
    """A message delivered to a subscription."""

    subject: str
    reply: str | None
    headers: dict[str, str]
    data: bytes


@attrs.frozen
class ConnectOptions:
    """
    What CONNECT tells the server: credentials (``user`` and ``password``,
    or ``token``), the client's ``name``, and whether the client wants TLS.
    """

    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)
    name: str = "cserver"
    tls: bool = False

    def connect_frame(self) -> bytes:
        """The CONNECT frame, CRLF included."""
        fields: dict[str, Any] = {
            "verbose": False, "pedantic": False, "tls_required": self.tls,
            "name": self.name, "lang": "python-twisted", "version": __version__,
            "protocol": 1, "headers": True, "no_responders": True,
        }
        if self.user is not None:
            fields["user"] = self.user
            fields["pass"] = self.password or ""
        if self.token is not None:
            fields["auth_token"] = self.token
        return b"CONNECT " + _encode_json(fields) + CRLF


def check_subject(subject: str, what: str = "subject") -> None:
    """
    :raises ValueError: ``subject`` is empty or holds whitespace (which
        would end the frame or split it).
    """
    if not subject or _whitespace(subject):
        raise ValueError(f"invalid NATS {what}: {subject!r}")


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """
    The headers block of ``headers``: ``NATS/1.0\\r\\nKey: value\\r\\n...\\r\\n``.

    :raises ValueError: a key is empty or holds whitespace or a colon, or a
        value holds CR or LF.
    """
    lines = [HEADER_VERSION]
    for key, value in headers.items():
        if not key or ":" in key or _whitespace(key):
            raise ValueError(f"invalid NATS header name: {key!r}")
        if "\r" in value or "\n" in value:
            raise ValueError(f"invalid NATS header value for {key}: {value!r}")
        lines.append(f"{key}: {value}".encode())
    lines.append(b"")
    lines.append(b"")
    return CRLF.join(lines)


def parse_headers(block: bytes) -> dict[str, str]:
    """
    The headers of a headers block, as a dict (a repeated key keeps its
    first value).  A status line (``NATS/1.0 503``, ``NATS/1.0 408 Request
    Timeout``) is given as ``Status`` (the code) and ``Description``.

    :raises ProtocolError: the block does not start with ``NATS/1.0``.
    """
    lines = block.decode("utf-8", "replace").split("\r\n")
    first = lines[0]
    if not first.startswith("NATS/1.0"):
        raise ProtocolError(f"headers block does not start with NATS/1.0: {first[:40]!r}")
    headers: dict[str, str] = {}
    status = first[8:].strip()
    if status:
        code, _, description = status.partition(" ")
        headers["Status"] = code
        if description:
            headers["Description"] = description.strip()
    for line in lines[1:]:
        key, colon, value = line.partition(":")
        if colon and key:
            headers.setdefault(key.strip(), value.strip())
    return headers
