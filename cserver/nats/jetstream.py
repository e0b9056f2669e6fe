"""JetStream over a :class:`~cserver.nats.client.NATSClient`: the stream API
(``$JS.API.STREAM.*`` requests with JSON bodies) and publishing with acks.

A publish to a stream's subject is a request: the stream's leader answers,
once the message is stored (on a quorum of its replicas), with a PubAck
``{"stream": "S", "seq": 7}``, with ``"duplicate": true`` when a message
with the same ``Nats-Msg-Id`` was stored within the stream's duplicate
window (``seq`` is then the original's).  Every API reply may instead be
``{"error": {"code": 503, "err_code": 10077, "description": "..."}}``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import attrs
import msgspec
from twisted.internet.defer import Deferred

from cserver.nats.client import NATSClient
from cserver.nats.wire import NATSError, ProtocolError, parse_headers

#: The JetStream API's subject prefix (of the default domain).
API_PREFIX = "$JS.API"
MSG_ID = "Nats-Msg-Id"
EXPECTED_STREAM = "Nats-Expected-Stream"


class JetStreamError(NATSError):
    """
    The JetStream API answered with an error.

    :ivar code: the HTTP-like status (400, 404, 503, ...).
    :ivar err_code: JetStream's own code (10059: stream not found, ...).
    :ivar description: what it said.
    """

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{description} (code {code}, err_code {err_code})")
        self.code = code
        self.err_code = err_code
        self.description = description


@attrs.frozen
class PubAck:
    """A stored message's place: its ``stream`` and ``seq``; ``duplicate``
    if it had been stored before (``seq`` is the first one's)."""

    stream: str
    seq: int
    duplicate: bool = False


@attrs.frozen
class StoredMessage:
    """A message read back from a stream; ``time`` as the server wrote it
    (RFC 3339, UTC, in nanoseconds)."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes
    time: str


class _APIError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAckReply(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _APIError | None = None


class _Stored(msgspec.Struct):
    subject: str
    seq: int
    data: str = ""
    hdrs: str = ""
    time: str = ""


class _MsgGetReply(msgspec.Struct):
    message: _Stored | None = None
    error: _APIError | None = None


_decode_pub_ack = msgspec.json.Decoder(_PubAckReply).decode
_decode_msg_get = msgspec.json.Decoder(_MsgGetReply).decode
_decode_object = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


def _raise(error: _APIError) -> None:
    raise JetStreamError(error.code, error.err_code, error.description)


def parse_pub_ack(payload: bytes) -> PubAck:
    """
    The PubAck of a publish reply.

    :raises JetStreamError: the reply is an error.
    :raises ProtocolError: it is not a PubAck.
    """
    try:
        reply = _decode_pub_ack(payload)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed PubAck {payload[:200]!r}: {e}") from None
    if reply.error is not None:
        _raise(reply.error)
    if not reply.stream or reply.seq <= 0:
        raise ProtocolError(f"PubAck without stream or seq: {payload[:200]!r}")
    return PubAck(reply.stream, reply.seq, reply.duplicate)


def parse_api_reply(payload: bytes) -> dict[str, Any]:
    """
    The JSON object of a stream API reply.

    :raises JetStreamError: the reply is an error.
    :raises ProtocolError: it is not a JSON object.
    """
    try:
        reply = _decode_object(payload)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed JetStream reply {payload[:200]!r}: {e}") from None
    error = reply.get("error")
    if isinstance(error, dict):
        raise JetStreamError(int(error.get("code", 0)), int(error.get("err_code", 0)),
                             str(error.get("description", "")))
    return reply


def parse_stored_message(payload: bytes) -> StoredMessage:
    """
    The message of a ``STREAM.MSG.GET`` reply (data and headers base64).

    :raises JetStreamError: the reply is an error (10037: no message found).
    :raises ProtocolError: it is not such a reply.
    """
    try:
        reply = _decode_msg_get(payload)
        if reply.error is not None:
            _raise(reply.error)
        if reply.message is None:
            raise ProtocolError(f"STREAM.MSG.GET reply without message: {payload[:200]!r}")
        stored = reply.message
        data = base64.b64decode(stored.data, validate=True)
        headers = parse_headers(base64.b64decode(stored.hdrs, validate=True)) \
            if stored.hdrs else {}
    except (msgspec.DecodeError, binascii.Error) as e:
        raise ProtocolError(f"malformed STREAM.MSG.GET reply {payload[:200]!r}: {e}") from None
    return StoredMessage(stored.seq, stored.subject, headers, data, stored.time)


class JetStream:
    """
    The JetStream API of the account ``client`` is connected as.

    :param prefix: the API's subject prefix (``$JS.<domain>.API`` for a domain).
    :param timeout: the default seconds to wait for a reply.
    """

    def __init__(self, client: NATSClient, prefix: str = API_PREFIX,
                 timeout: float = 5.0) -> None:
        self.client = client
        self.prefix = prefix
        self.timeout = timeout

    def publish(self, subject: str, payload: bytes, msg_id: str | None = None,
                expected_stream: str | None = None,
                headers: Mapping[str, str] | None = None,
                timeout: float | None = None) -> Deferred[PubAck]:
        """
        Publish ``payload`` to ``subject`` and wait for the stream's ack.

        :param msg_id: sent as ``Nats-Msg-Id``: the stream stores one message
            per id within its duplicate window, and acks a retry with
            ``duplicate`` and the first one's seq.
        :param expected_stream: sent as ``Nats-Expected-Stream``: refused
            unless that stream stores the subject.
        :returns: a Deferred firing with the :class:`PubAck`, or failing with
            :class:`JetStreamError` or the client's errors
            (:class:`~cserver.nats.wire.NoResponders`: no stream stores the
            subject; :class:`~cserver.nats.wire.RequestLost`: maybe stored,
            publish again with the same ``msg_id`` to know).
        """
        all_headers = dict(headers) if headers else {}
        if msg_id is not None:
            all_headers[MSG_ID] = msg_id
        if expected_stream is not None:
            all_headers[EXPECTED_STREAM] = expected_stream
        d = self.client.request(subject, payload, all_headers or None,
                                self.timeout if timeout is None else timeout)
        return d.addCallback(lambda reply: parse_pub_ack(reply[1]))

    def _api(self, operation: str, body: bytes = b"") -> Deferred[dict[str, Any]]:
        d = self.client.request(f"{self.prefix}.{operation}", body, timeout=self.timeout)
        return d.addCallback(lambda reply: parse_api_reply(reply[1]))

    def stream_info(self, name: str) -> Deferred[dict[str, Any]]:
        """The stream's info (``config``, ``state``, ``cluster``: its
        ``leader`` and ``replicas``); fails with JetStreamError 404 (err_code
        10059) when there is no such stream."""
        return self._api(f"STREAM.INFO.{name}")

    def create_stream(self, config: Mapping[str, Any]) -> Deferred[dict[str, Any]]:
        """Create the stream ``config["name"]`` (``subjects``, ``storage``,
        ``num_replicas``, ``duplicate_window`` in ns, ...); its info."""
        return self._api(f"STREAM.CREATE.{config['name']}", _encode(config))

    def update_stream(self, config: Mapping[str, Any]) -> Deferred[dict[str, Any]]:
        """Change the stream ``config["name"]``'s config; its info."""
        return self._api(f"STREAM.UPDATE.{config['name']}", _encode(config))

    def delete_stream(self, name: str) -> Deferred[dict[str, Any]]:
        """Delete the stream and its messages."""
        return self._api(f"STREAM.DELETE.{name}")

    def get_message(self, stream: str, seq: int) -> Deferred[StoredMessage]:
        """The message at ``seq`` in ``stream``; fails with JetStreamError
        (err_code 10037) when there is none."""
        d = self.client.request(f"{self.prefix}.STREAM.MSG.GET.{stream}",
                                _encode({"seq": seq}), timeout=self.timeout)
        return d.addCallback(lambda reply: parse_stored_message(reply[1]))
