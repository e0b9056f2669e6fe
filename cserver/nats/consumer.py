"""Reading a JetStream stream in order through an ordered consumer:
``reader = read_stream(client, "S", on_message, start_seq=1)``, then
``last_seq = yield reader.done``.

The consumer is an ephemeral push consumer (``$JS.API.CONSUMER.CREATE.<S>``)
delivering to an inbox of its own: no acks (``ack_policy: none``), kept in
memory on one server (``mem_storage``, ``num_replicas: 1``), with flow
control and idle heartbeats.  The stream seq of each message delivered is
in its reply subject::

    $JS.ACK.<stream>.<consumer>.<delivered>.<stream_seq>.<consumer_seq>.<timestamp>.<pending>
    $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<stream_seq>...<pending>[.<token>]

A status-100 message with a reply subject is a flow-control request (an
empty message to that subject lets the server go on); one without is an
idle heartbeat, whose ``Nats-Last-Consumer`` header names the last consumer
seq sent, and whose ``Nats-Consumer-Stalled`` (if any) a flow-control reply
subject to answer.

*Ordered*: the consumer seqs come 1, 2, 3...; a message out of that order, a
heartbeat naming a consumer seq not seen, or nothing at all for three
heartbeat intervals (a connection lost, the consumer gone) drops the
consumer and makes a new one from the stream seq after the last one handed
on.  Messages deleted from the stream are skipped by the consumer: a gap in
the stream seqs is the caller's to see.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
import msgspec
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cserver.nats.client import NATSClient
from cserver.nats.jetstream import API_PREFIX, parse_api_reply
from cserver.nats.wire import Msg, ProtocolError

_log = Logger(namespace="cserver.nats")

STATUS = "Status"
#: A control message: flow control (with a reply subject) or idle heartbeat.
CONTROL = "100"
#: Sent by a server once the push consumer is gone (deleted, or its leader lost).
CONSUMER_DELETED = "409"
LAST_CONSUMER = "Nats-Last-Consumer"
CONSUMER_STALLED = "Nats-Consumer-Stalled"
#: Heartbeat intervals without any frame before the consumer is made again.
MISSED_HEARTBEATS = 3

_encode = msgspec.json.Encoder().encode


@attrs.define
class Delivery:
    """
    One stream message, as the consumer delivered it (not frozen: made
    for every message, it is made faster so).

    :ivar stream_seq: its seq in the stream.
    :ivar consumer_seq: its place among the consumer's deliveries (1, 2...).
    :ivar pending: how many of the stream's messages are left after it.
    :ivar timestamp: when it was stored, in nanoseconds since the epoch.
    """

    stream_seq: int
    consumer_seq: int
    pending: int
    timestamp: int
    subject: str
    headers: dict[str, str]
    data: bytes


class AckMetadata(NamedTuple):
    """What a delivered message's reply subject says of it."""

    stream: str
    consumer: str
    delivered: int
    stream_seq: int
    consumer_seq: int
    timestamp: int
    pending: int


def parse_ack_subject(subject: str) -> AckMetadata:
    """
    The metadata in a JetStream message's reply subject: 9 tokens, or 11 and
    more (a domain and an account hash after ``$JS.ACK``, maybe a random
    token after ``pending``).

    :raises ProtocolError: it is not such a subject.
    """
    tokens = subject.split(".")
    count = len(tokens)
    base = 2 if count == 9 else 4
    try:
        if tokens[0] != "$JS" or tokens[1] != "ACK" or count != 9 and count < 11:
            raise ValueError
        return AckMetadata(tokens[base], tokens[base + 1], int(tokens[base + 2]),
                           int(tokens[base + 3]), int(tokens[base + 4]),
                           int(tokens[base + 5]), int(tokens[base + 6]))
    except (ValueError, IndexError):
        raise ProtocolError(f"not a JetStream reply subject: {subject[:200]!r}") from None


def consumer_config(deliver_subject: str, start_seq: int, heartbeat: float,
                    inactive: float) -> dict[str, Any]:
    """The config of an ordered consumer delivering from ``start_seq`` on."""
    config: dict[str, Any] = {
        "deliver_subject": deliver_subject,
        "ack_policy": "none",
        "max_deliver": 1,
        "replay_policy": "instant",
        "flow_control": True,
        "idle_heartbeat": int(heartbeat * 1e9),
        "inactive_threshold": int(inactive * 1e9),
        "mem_storage": True,
        "num_replicas": 1,
    }
    if start_seq <= 1:
        config["deliver_policy"] = "all"
    else:
        config["deliver_policy"] = "by_start_sequence"
        config["opt_start_seq"] = start_seq
    return config


class StreamReader:
    """
    Hands each message of ``stream`` from ``start_seq`` on, in stream order,
    to ``on_message(delivery)`` (see the module's docstring).

    :param follow: go on with new messages until :meth:`stop`; otherwise
        stop at the end of the stream: at a message with no more pending, one
        at ``until`` or after it, or an idle heartbeat with nothing to send.
    :param until: with ``follow`` false, the last stream seq wanted.
    :param heartbeat: the consumer's idle heartbeat, in seconds.
    :param retry_for: seconds to keep making a consumer again after one is
        lost before giving up (``done`` fails).
    :param clock: default ``client.reactor``.

    :ivar done: fires with the stream seq of the last message handed on
        (``start_seq - 1`` if none) once the end is reached or :meth:`stop`
        was called; fails with the error if a consumer cannot be made (the
        first time, or for ``retry_for`` seconds) or ``on_message`` raised.
    :ivar last_seq: the stream seq of the last message handed on.
    :ivar restarts: how many times the consumer was made again.
    """

    def __init__(self, client: NATSClient, stream: str,
                 on_message: Callable[[Delivery], object], start_seq: int = 1, *,
                 follow: bool = False, until: int | None = None, heartbeat: float = 5.0,
                 retry_for: float = 30.0, prefix: str = API_PREFIX, timeout: float = 5.0,
                 clock: Any = None) -> None:
        self.client = client
        self.stream = stream
        self.on_message = on_message
        self.follow = follow
        self.until = until
        self.heartbeat = heartbeat
        self.retry_for = retry_for
        self.prefix = prefix
        self.timeout = timeout
        self.clock = clock if clock is not None else client.reactor
        self.done: Deferred[int] = Deferred()
        self.last_seq = start_seq - 1
        self.restarts = 0
        self.consumer: str | None = None
        self._sid: int | None = None
        self._expected = 1
        self._generation = 0
        self._last_frame = 0.0
        self._failing_since: float | None = None
        self._watchdog: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._finished = False

    # -- the consumer -----------------------------------------------------------

    def start(self) -> Deferred[int]:
        """Make the consumer; :attr:`done`."""
        if self.until is not None and not self.follow and self.last_seq >= self.until:
            self._finish()
        else:
            self._create()
        return self.done

    def _create(self) -> None:
        """Subscribe to a new inbox, then make a consumer delivering to it."""
        self._retry = None
        self._generation += 1
        generation = self._generation
        inbox = f"_INBOX.{secrets.token_hex(11)}"
        self._expected = 1
        self.consumer = None
        self._last_frame = self.clock.seconds()
        config = consumer_config(inbox, self.last_seq + 1, self.heartbeat,
                                 max(5.0, MISSED_HEARTBEATS * self.heartbeat))
        body = _encode({"stream_name": self.stream, "config": config})
        try:
            self._sid = self.client.subscribe(inbox, lambda msg: self._frame(msg, generation))
            d = self.client.request(f"{self.prefix}.CONSUMER.CREATE.{self.stream}", body,
                                    timeout=self.timeout)
        except Exception as e:
            self._create_failed(Failure(e), generation)
            return
        d.addCallback(lambda reply: parse_api_reply(reply[1]))
        d.addCallbacks(self._created, self._create_failed, callbackArgs=(generation,),
                       errbackArgs=(generation,))
        self._watch()

    def _created(self, info: dict[str, Any], generation: int) -> None:
        if generation != self._generation or self._finished:
            self._delete(info.get("name"))
            return
        self.consumer = info.get("name")
        self._failing_since = None

    def _create_failed(self, failure: Failure, generation: int) -> None:
        if generation != self._generation or self._finished:
            return
        now = self.clock.seconds()
        if not self.restarts:
            self._fail(failure)
            return
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since >= self.retry_for:
            self._fail(failure)
            return
        _log.warn("cannot make a consumer of stream {stream} again ({error}): trying again",
                  stream=self.stream, error=failure.value)
        self._drop_subscription()
        self._retry = self.clock.callLater(min(self.heartbeat, 1.0), self._create)

    def _restart(self, why: str) -> None:
        """Drop the consumer; make a new one from the seq after the last."""
        if self._finished:
            return
        self.restarts += 1
        _log.info("ordered consumer of stream {stream}: {why}; again from seq {seq}",
                  stream=self.stream, why=why, seq=self.last_seq + 1)
        self._drop_subscription()
        self._delete(self.consumer)
        self._create()

    def _drop_subscription(self) -> None:
        if self._sid is not None:
            self.client.unsubscribe(self._sid)
            self._sid = None

    def _delete(self, name: str | None) -> None:
        """Delete the consumer ``name`` (it would go anyway once idle)."""
        if not name:
            return
        try:
            d = self.client.request(f"{self.prefix}.CONSUMER.DELETE.{self.stream}.{name}", b"",
                                    timeout=self.timeout)
        except Exception:
            return
        d.addErrback(lambda _: None)

    # -- the watchdog -----------------------------------------------------------

    def _watch(self) -> None:
        if self._watchdog is None or not self._watchdog.active():
            self._watchdog = self.clock.callLater(self.heartbeat, self._check_stall)

    def _check_stall(self) -> None:
        self._watchdog = None
        if self._finished or self._retry is not None:
            return
        silent = self.clock.seconds() - self._last_frame
        if silent >= MISSED_HEARTBEATS * self.heartbeat:
            self._restart(f"nothing for {silent:.1f} s")
        else:
            self._watch()

    # -- the frames -------------------------------------------------------------

    def _frame(self, msg: Msg, generation: int) -> None:
        if generation != self._generation or self._finished:
            return
        self._last_frame = self.clock.seconds()
        try:
            status = msg.headers.get(STATUS)
            if status is None:
                self._data(msg)
            elif status == CONTROL:
                self._control(msg)
            elif status == CONSUMER_DELETED:
                self._restart(f"status {status} {msg.headers.get('Description', '')}".strip())
            else:
                _log.warn("ordered consumer of stream {stream}: status {status} ignored",
                          stream=self.stream, status=status)
        except Exception:
            self._fail(Failure())

    def _data(self, msg: Msg) -> None:
        if msg.reply is None:
            raise ProtocolError(f"a message from the consumer of {self.stream} without a "
                                "reply subject")
        meta = parse_ack_subject(msg.reply)
        if meta.consumer_seq != self._expected:
            self._restart(f"consumer seq {meta.consumer_seq} where {self._expected} was due")
            return
        self._expected += 1
        self.last_seq = meta.stream_seq
        self.on_message(Delivery(meta.stream_seq, meta.consumer_seq, meta.pending,
                                 meta.timestamp, msg.subject, msg.headers, msg.data))
        if not self.follow and not self._finished and (
                meta.pending == 0 or self.until is not None and meta.stream_seq >= self.until):
            self._finish()

    def _control(self, msg: Msg) -> None:
        if msg.reply is not None:  # flow control
            self.client.publish(msg.reply, b"")
            return
        stalled = msg.headers.get(CONSUMER_STALLED)
        if stalled:
            self.client.publish(stalled, b"")
        last = msg.headers.get(LAST_CONSUMER)
        if last is not None and last.isdigit() and int(last) != self._expected - 1:
            self._restart(f"the heartbeat says consumer seq {last}, the last seen was "
                          f"{self._expected - 1}")
            return
        if not self.follow and not stalled:
            self._finish()

    # -- the end ----------------------------------------------------------------

    def stop(self) -> None:
        """Drop the consumer; :attr:`done` fires with :attr:`last_seq`."""
        self._finish()

    def _end(self) -> bool:
        if self._finished:
            return False
        self._finished = True
        for call in (self._watchdog, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._watchdog = self._retry = None
        self._drop_subscription()
        self._delete(self.consumer)
        return True

    def _finish(self) -> None:
        if self._end():
            self.done.callback(self.last_seq)

    def _fail(self, failure: Failure) -> None:
        if self._end():
            self.done.errback(failure)


def read_stream(client: NATSClient, stream: str, on_message: Callable[[Delivery], object],
                start_seq: int = 1, **options: Any) -> StreamReader:
    """
    Start a :class:`StreamReader` (``options`` are its keyword arguments):
    ``reader.done`` fires at the end, ``reader.stop()`` ends it sooner.
    """
    reader = StreamReader(client, stream, on_message, start_seq, **options)
    reader.start()
    return reader
