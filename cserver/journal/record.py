"""The record format: the one definition that every writer, recovery and
``cserver-journal`` use.

A journal is JSON Lines: each record is one flat JSON object on one line,
UTF-8, whose first keys are ``seq`` (1, 2, 3... with no gap), ``time`` (Unix
seconds, a float), ``event`` (``message``, ``start``, ``stop``,
``auth_failed``, ``reopen``...) and ``pid`` (the process that wrote it),
followed by the event's own fields -- for a message ``user``, ``text`` and
``peer``, and for a keyed one (``PUT``) its ``key`` last::

    {"seq":7,"time":1764750000.123456,"event":"message","pid":4242,"user":"alice","text":"hi","peer":"127.0.0.1:50000"}
    {"seq":8,"time":1764750000.223456,"event":"message","pid":4242,"user":"alice","text":"hi","peer":"127.0.0.1:50000","key":"order-17"}

A record is made in two steps: its *body* (the object without ``seq``) when
the journal takes the event, and its line (:func:`numbered`) when the batch
is written and the seq is known -- which, with ``--workers``, is only under
the journal file's lock.

Encoding and decoding go through msgspec: the bytes are those of
``json.dumps(..., ensure_ascii=False, separators=(",", ":"))`` (strings keep
their Unicode; quotes, backslashes and C0 controls are escaped), except that
a float written in exponent form loses the ``+`` and the leading zero of its
exponent (``1e16`` for ``1e+16``), which no record the server writes holds
(``time`` is always in plain form) and which every JSON reader takes alike.
"""

from __future__ import annotations

import json
import operator
import re
from typing import Annotated, Any

import msgspec

#: The event key naming the record's kind: message, auth_failed, start, stop.
EVENT = "cserver_event"
#: The event key holding the acknowledgement callable ``ack(seq, reason)``.
ACK = "cserver_ack"
#: The event key holding the fields of a record other than a message.
FIELDS = "cserver_fields"
#: How a message event reads in a text log.
MESSAGE_FORMAT = "server recvd message {text!r} from user {user}"

_encode = msgspec.json.Encoder().encode
#: What an event's name is made of.
EVENT_NAME = re.compile("[a-z_]+")
_PID = operator.attrgetter("pid")
_EVENT = operator.attrgetter("event")


def message_body(time: float, pid: int, user: str, text: str, peer: str,
                 key: str | None = None, node: str | None = None) -> bytes:
    """
    A message record without its ``seq``: ``{"time":...,"peer":"..."}``,
    and ``"key"`` last for a keyed message (``PUT``).  ``node``: the name of
    the cserver node that wrote it, after ``pid`` (a journal on a stream,
    which several nodes share).

    :raises TypeError: ``user``, ``text`` or ``peer`` is not a str.
    :raises UnicodeEncodeError: a string holds a lone surrogate.
    """
    if type(user) is not str or type(text) is not str or type(peer) is not str:
        raise TypeError("a message's user, text and peer are str")
    if node is not None:
        record = {"time": time, "event": "message", "pid": pid, "node": node, "user": user,
                  "text": text, "peer": peer}
        if key is not None:
            if type(key) is not str:
                raise TypeError("a message's key is a str")
            record["key"] = key
        return _encode(record)
    if key is None:
        return _encode({"time": time, "event": "message", "pid": pid, "user": user,
                        "text": text, "peer": peer})
    if type(key) is not str:
        raise TypeError("a message's key is a str")
    return _encode({"time": time, "event": "message", "pid": pid, "user": user, "text": text,
                    "peer": peer, "key": key})


def record_body(time: float, kind: str, pid: int, fields: dict[str, Any] | None,
                node: str | None = None) -> bytes:
    """
    A record other than a message (``start``, ``stop``, ``reopen``...)
    without its ``seq``: ``time``, ``event``, ``pid``, ``node`` if given,
    then ``fields`` in their order.

    :raises TypeError: a field's value is not JSON.
    """
    head: dict[str, Any] = {"time": time, "event": kind, "pid": pid}
    if node is not None:
        head["node"] = node
    if fields:
        return _encode({**head, **fields})
    return _encode(head)


def numbered(seq: int, body: bytes) -> bytes:
    """
    The record's line: ``body`` with ``seq`` as its first key, and a newline.
    """
    return b'{"seq":%d,%b\n' % (seq, body[1:])


def batch(first: int, bodies: list[bytes]) -> bytes:
    """
    The lines of ``bodies`` numbered from ``first``, joined: one write.
    """
    return b"".join([b'{"seq":%d,%b\n' % (first + index, body[1:])
                     for index, body in enumerate(bodies)])


# -- reading ------------------------------------------------------------------


class Head(msgspec.Struct, gc=False):
    """
    What recovery reads of a record: the four keys every record starts
    with, and ``user`` (a message's; other records' ``user`` must be a
    string too).  Other fields are parsed (the line must be valid JSON) and
    dropped.
    """

    seq: int
    time: float
    event: str
    pid: int
    user: str | None = None


class _CheckedHead(Head, gc=False):
    """
    A :class:`Head` that also decodes a message's ``text`` and ``peer``:
    msgspec checks the UTF-8 of the strings it decodes, not of those it
    skips.
    """

    text: Any = None
    peer: Any = None


class _StrictHead(msgspec.Struct, gc=False):
    """
    :class:`Head` with its values' constraints, for one line at a time:
    msgspec checks them per record at about twice the cost of the decode, so
    a block is decoded as :class:`Head` and checked by :func:`well_formed`.
    """

    seq: Annotated[int, msgspec.Meta(ge=1)]
    time: float
    event: Annotated[str, msgspec.Meta(pattern=rf"\A{EVENT_NAME.pattern}\Z")]
    pid: Annotated[int, msgspec.Meta(ge=0)]
    user: str | None = None


_heads = msgspec.json.Decoder(Head)
_checked_heads = msgspec.json.Decoder(_CheckedHead)
_strict_head = msgspec.json.Decoder(_StrictHead)


def decode_head(line: bytes) -> Head:
    """
    One record's line as a :class:`Head`, every constraint checked.

    :raises: one of :data:`DECODE_ERRORS`: the line is not a record.
    """
    strict = _strict_head.decode(line)
    return Head(strict.seq, strict.time, strict.event, strict.pid, strict.user)


def decode_heads(block: bytes, ascii: bool = True) -> list[Head]:
    """
    Decode a block of whole lines as a list of :class:`Head` (the values'
    constraints are :func:`well_formed`'s to check).  Unless the block is
    ``ascii``, the strings of messages are checked to be UTF-8 too (msgspec
    checks the strings it decodes, not those it skips; other records'
    fields are not checked).

    :raises: one of :data:`DECODE_ERRORS`: the block is not all records.
    """
    if ascii:
        return _heads.decode_lines(block)
    return _checked_heads.decode_lines(block)  # type: ignore[return-value]


def well_formed(heads: list[Head]) -> bool:
    """
    Whether the decoded ``heads`` keep the constraints of a record: the
    first seq at least 1 (contiguity, checked by recovery, does the rest),
    every event a name of ``a-z`` and ``_``, no pid below 0.
    """
    if not heads or heads[0].seq < 1:
        return bool(not heads)
    events = set(map(_EVENT, heads))
    return (all(EVENT_NAME.fullmatch(event) for event in events)
            and min(map(_PID, heads)) >= 0)


#: What :func:`decode_head` and :func:`decode_heads` raise on anything but
#: a valid record.
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)

#: How every line starts.
START = b'{"seq":'
#: A record's head, with its seq and its time as written: on a validated
#: journal each match is a record's start (``{"seq":`` cannot occur inside a
#: string, whose quotes are escaped).
HEAD = re.compile(rb'\{"seq":([0-9]++),"time":([-+.eE0-9]++),')
#: On a validated journal: the event of each record that is not a message.
OTHER_EVENTS = re.compile(
    rb'\{"seq":[0-9]++,"time":[-+.eE0-9]++,"event":"(?!message")([a-z_]++)"')


def read_head(line: bytes) -> Head | None:
    """
    The record that ``line`` (one line, with its newline) is, or None if it
    is not one: not UTF-8, not JSON, without the four keys, or with a
    carriage return (:func:`one_per_line` says the same of a block).
    """
    if not line.endswith(b"\n") or b"\r" in line:
        return None
    try:
        line.decode("utf-8")
        return decode_head(line)
    except UnicodeDecodeError:
        return None
    except DECODE_ERRORS:
        pass
    # msgspec refuses an escaped lone surrogate ("\ud800"), which JSON's
    # grammar allows and the json module reads.
    try:
        strict = msgspec.convert(json.loads(line), _StrictHead)
    except (ValueError, msgspec.ValidationError):
        return None
    return Head(strict.seq, strict.time, strict.event, strict.pid, strict.user)


def one_per_line(block: bytes, count: int) -> bool:
    """
    Whether the block of ``count`` decoded records holds ``count`` lines
    (msgspec skips blank lines) and no carriage return (a raw one cannot be
    inside a JSON string: it would be a CRLF line end).
    """
    return block.count(b"\n") == count and b"\r" not in block


class Number(str):
    """
    A JSON number with a fraction or exponent, kept as written.
    """


_objects = msgspec.json.Decoder(float_hook=Number)


def decode(line: bytes) -> dict[str, Any]:
    """
    One journal line (with or without its newline) as a dict, numbers with a
    fraction or exponent as :class:`Number` (their text as written).

    :raises ValueError: it is not one JSON object.
    """
    try:
        record = _objects.decode(line)
    except msgspec.DecodeError:
        try:  # an escaped lone surrogate: see read_head
            record = json.loads(line, parse_float=Number)
        except ValueError:
            raise ValueError("not JSON") from None
    if type(record) is not dict:
        raise ValueError("not one JSON object")
    return record
