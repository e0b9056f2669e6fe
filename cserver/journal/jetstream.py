"""The journal on a NATS JetStream stream (``--journal nats://.../STREAM``):
several cserver nodes append to one replicated, contiguously numbered log.

Each record is published on the stream's subject (see
:mod:`cserver.journal.stream_url`) as the JSON of a file journal's line
without its ``seq``, with a ``node`` field naming the node; the stream's
sequence is the seq, and ``ack(seq, None)`` is called only once the stream
acknowledged the publish (with ``sync_interval: always``, after the leader
and a quorum synced it).

Every publish carries a ``Nats-Msg-Id``: ``PUT <user> <key>`` for a keyed
message, a node-unique ``<node> <boot> <n>`` for the others.  A publish that
failed (no connection, no stream leader during a failover, a reply lost
with its connection) is published again with the same id until
``deadline`` seconds have passed since it was taken, then refused
(``ERR unavailable ...``): the stream keeps one message per id within its
``duplicate_window``, so a publish that did reach it before is not stored
twice.  A keyed message that the stream already holds (another node wrote
it, or a retry through another node) is read back and compared: the same
text is a duplicate (the first seq, :data:`DUPLICATE`), another text a
:data:`CONFLICT`.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import attrs
import msgspec
from twisted.logger import Logger
from zope.interface import implementer

from cserver.journal.batch import call_ack
from cserver.journal.interfaces import CONFLICT, DUPLICATE, Ack, IJournal
from cserver.journal.record import ACK, EVENT, FIELDS, message_body, record_body
from cserver.journal.stream_url import StreamURL
from cserver.nats.jetstream import JetStream, JetStreamError
from cserver.nats.wire import NATSError

_log = Logger(namespace="cserver.journal")

#: The oldest nats-server that may hold the journal: 2.10.23 fixed a loss of
#: acknowledged messages after a crash; ``sync_interval: always`` needs 2.10.
MINIMUM_VERSION = (2, 10, 23)
#: Seconds a record is published again before it is refused.
DEFAULT_DEADLINE = 30.0
#: JetStream's "no stream leader / cluster unavailable" answers are 503s.
_UNAVAILABLE_CODES = frozenset({503, 504})


class _Stored(msgspec.Struct):
    user: Any = None
    key: Any = None
    text: Any = None


_decode_stored = msgspec.json.Decoder(_Stored).decode


@attrs.define
class StreamRecovery:
    """What a start found in the stream (a file journal's recovery, for the
    factory, the start record and the log)."""

    records: int = 0
    last_seq: int = 0
    messages: int = 0
    users: dict[str, int] = attrs.Factory(dict)
    created: bool = False
    torn_bytes: int = 0
    torn_path: str | None = None
    checkpoint: int = 0

    def summary(self) -> dict[str, object]:
        """What the ``start`` record says of the stream."""
        return {"records": self.records, "last_seq": self.last_seq,
                "created": self.created}


@attrs.define(eq=False)
class _Pending:
    """One record being published: until the stream's ack, or the deadline."""

    body: bytes
    msg_id: str
    ack: Ack | None
    taken: float
    message: bool
    keyed: tuple[str, str, str] | None = None
    attempts: int = 0
    #: A publish of it may have reached the stream (its reply was lost).
    maybe_stored: bool = False


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.10.23-beta"`` as ``(2, 10, 23)``; what does not parse is ``()``."""
    parts = []
    for part in version.split("-", 1)[0].split("."):
        if not part.isdigit():
            return ()
        parts.append(int(part))
    return tuple(parts)


@implementer(IJournal)
class StreamJournal:
    """
    An :class:`~cserver.journal.interfaces.IJournal` appending to a JetStream
    stream through a connected :class:`cserver.nats.client.NATSClient`.

    :param url: the stream.
    :param clock: the reactor (``seconds``, ``callLater``).
    :param node: this node's name, in every record it writes.
    :param deadline: seconds a record is published again before it is refused.
    :param recovery: what :func:`cserver.journal.stream_open.open_stream` found.
    """

    def __init__(self, url: StreamURL, client: Any, clock: Any, node: str,
                 deadline: float = DEFAULT_DEADLINE, publish_timeout: float = 5.0,
                 recovery: StreamRecovery | None = None) -> None:
        self.url = url
        self.client = client
        self.jetstream = JetStream(client)
        self.clock = clock
        self.node = node
        self.deadline = deadline
        self.publish_timeout = publish_timeout
        self.recovery = recovery or StreamRecovery()
        self.last_seq = self.recovery.last_seq
        #: Message records this node had acknowledged since start.
        self.messages = 0
        self.broken: str | None = None
        #: Publishes sent again after a failure.
        self.republished = 0
        self._subject = url.subject
        self._stream = url.stream
        self._ids = f"{node} {secrets.token_hex(8)} "
        self._count = 0
        self._pid = os.getpid()
        self._closed = False
        self._retries: dict[_Pending, Any] = {}

    def __str__(self) -> str:
        return str(self.url)

    @property
    def stream_records(self) -> int:
        """The stream's records (all nodes'), as of the newest ack seen."""
        return self.last_seq

    # -- the observer -------------------------------------------------------

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get(EVENT)
        if kind is None:
            return
        ack = event.get(ACK)
        if self.broken is not None or self._closed:
            if ack is not None:
                call_ack(ack, None, self.broken or "journal closed")
            return
        keyed = None
        try:
            if kind == "message":
                key = event.get("key")
                body = message_body(event["log_time"], self._pid, event["user"], event["text"],
                                    event["peer"], key, self.node)
                if key is not None:
                    keyed = (event["user"], key, event["text"])
            else:
                body = record_body(event["log_time"], kind, self._pid, event.get(FIELDS),
                                   self.node)
        except Exception:
            _log.failure("journal: cannot make a {kind} record", kind=kind)
            if ack is not None:
                call_ack(ack, None, "record cannot be encoded")
            return
        if keyed is not None:
            msg_id = f"PUT {keyed[0]} {keyed[1]}"
        else:
            self._count += 1
            msg_id = self._ids + str(self._count)
        pending = _Pending(body, msg_id, ack, self.clock.seconds(), kind == "message", keyed)
        self._publish(pending)

    def _publish(self, pending: _Pending) -> None:
        self._retries.pop(pending, None)
        pending.attempts += 1
        d = self.jetstream.publish(self._subject, pending.body, msg_id=pending.msg_id,
                                   expected_stream=self._stream, timeout=self.publish_timeout)
        d.addCallbacks(self._acked, self._failed, callbackArgs=(pending,),
                       errbackArgs=(pending,))

    def _acked(self, puback: Any, pending: _Pending) -> None:
        seq = puback.seq
        if seq > self.last_seq:
            self.last_seq = seq
        if puback.duplicate and pending.keyed is not None:
            # Which text has the key: read the stored record back.
            d = self.jetstream.get_message(self._stream, seq)
            d.addCallbacks(self._compare, self._failed, callbackArgs=(pending, seq),
                           errbackArgs=(pending,))
            return
        # A plain record's id is this node's own: a duplicate is its earlier
        # publish, whose reply was lost.
        self._answer(pending, seq, None)

    def _compare(self, stored: Any, pending: _Pending, seq: int) -> None:
        user, key, text = pending.keyed  # type: ignore[misc]
        try:
            record = _decode_stored(stored.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            record = _Stored()
        if (record.user, record.key) != (user, key) or record.text != text:
            self._answer(pending, None, CONFLICT)
        elif pending.maybe_stored:
            self._answer(pending, seq, None)  # maybe this very publish
        else:
            self._answer(pending, seq, DUPLICATE)

    def _failed(self, failure: Any, pending: _Pending) -> None:
        error = failure.value
        retry = isinstance(error, NATSError) and not isinstance(error, JetStreamError) \
            or isinstance(error, JetStreamError) and error.code in _UNAVAILABLE_CODES
        if not isinstance(error, NATSError):
            _log.failure("journal: publishing to {stream} failed", failure, stream=self.url)
        why = f"{type(error).__name__}: {error}"
        if type(error).__name__ in ("RequestLost", "RequestTimeout"):
            pending.maybe_stored = True
        waited = self.clock.seconds() - pending.taken
        if not retry or self._closed:
            self._answer(pending, None, f"stream {self._stream} refused the record ({why})")
            return
        if waited >= self.deadline:
            self._answer(pending, None, f"stream {self._stream} unavailable for {waited:.0f} s "
                                        f"({why})")
            return
        self.republished += 1
        delay = min(1.0, 0.05 * 2 ** min(pending.attempts, 5))
        self._retries[pending] = self.clock.callLater(delay, self._publish, pending)

    def _answer(self, pending: _Pending, seq: int | None, reason: Any) -> None:
        if reason is None and pending.message:
            self.messages += 1
        if pending.ack is not None:
            call_ack(pending.ack, seq, reason)

    # -- IJournal -------------------------------------------------------------

    def flush(self) -> None:
        """Publishes go out as they are taken: nothing waits for a flush."""

    def close(self) -> None:
        """
        Refuse what still waits to be published again and close the
        connection (the server drained its MSGs before).
        """
        if self._closed:
            return
        self._closed = True
        retries, self._retries = self._retries, {}
        for pending, call in retries.items():
            if call.active():
                call.cancel()
            self._answer(pending, None, "journal closed")
        self.client.close()

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up now."""
        return bool(self.client.connected)

    def stats(self) -> dict[str, object]:
        """What STATS adds for a stream: the connection, reconnects, republishes."""
        return {"nats": "up" if self.client.connected else "down",
                "nats_reconnects": self.client.reconnects,
                "republished": self.republished}

    def status(self) -> str:
        """One line on the stream's connection, for STATS and sd_notify."""
        server = self.client.server
        if self.client.connected and server is not None:
            return f"stream {self._stream} via {server.url}"
        return f"stream {self._stream}: NATS unreachable ({self.client.last_error})"
