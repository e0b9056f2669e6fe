"""Journal records as text: the ``cserver-journal text`` line format.

One record per line in the C original's format::

    2020.07.06 16:44:57.270823600 -- server 29756 recvd message "lalala" from user arijort

Strings are quoted and escaped so that a record stays one line for grep and
for Python's ``splitlines``; times are printed from their digits as
written, never through a float.
"""

from __future__ import annotations

import json
import re
import time
from decimal import ROUND_FLOOR, Decimal

from cserver.journal.record import Number

# What `text` escapes in a quoted string so that a record stays one line for
# grep and for Python's splitlines: quotes, backslashes, C0 and C1 controls,
# DEL, the Unicode line and paragraph separators, lone surrogates.
_ESCAPED = re.compile("[\"\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# A name shown without quotes: no space, quote, backslash or control.
_BARE = re.compile("[^\\s\"\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")

_TIME_FORMAT = "%Y.%m.%d %H:%M:%S"


def _escape_char(match):
    char = match.group()
    escaped = _ESCAPES.get(char)
    if escaped is None:
        code = ord(char)
        escaped = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return escaped


def quote(text):
    """
    ``text`` in double quotes, with quotes, backslashes and anything that
    could break a line escaped C-style (``\\"``, ``\\\\``, ``\\n``, ``\\x01``,
    ``\\u2028``); other Unicode is kept as it is.
    """
    return '"' + _ESCAPED.sub(_escape_char, text) + '"'


def name(value):
    """
    A user name or peer as the C original shows it -- bare -- unless it is
    empty or holds a space, a quote, a backslash or a control: then quoted.
    """
    if isinstance(value, str) and _BARE.fullmatch(value):
        return value
    return _value(value)


def _value(value):
    """
    A field's value: a number as written, a string quoted, anything else
    as JSON (a list or object as a quoted JSON text).
    """
    if isinstance(value, Number):
        return value
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, (list, dict)):
        return quote(json.dumps(value, ensure_ascii=False))
    return json.dumps(value)


def _split_time(raw):
    """
    Whole seconds and nanoseconds of a record's ``time``, from its digits as
    written (not through a float).
    """
    if isinstance(raw, int):
        return raw, 0
    if isinstance(raw, str) and raw[:1] != "-" and "e" not in raw and "E" not in raw:
        whole, _, fraction = raw.partition(".")
        return int(whole), int((fraction + "000000000")[:9])
    exact = Decimal(raw)
    seconds = int(exact.to_integral_value(rounding=ROUND_FLOOR))
    return seconds, int((exact - seconds) * 1_000_000_000)


class TimeFormatter:
    """
    Times as ``YYYY.MM.DD HH:MM:SS.nnnnnnnnn``, in local time or UTC; the
    date and time of the last second are remembered (records come in order).
    """

    def __init__(self, utc=False):
        self._convert = time.gmtime if utc else time.localtime
        self._second = None
        self._prefix = ""

    def __call__(self, raw):
        seconds, nanos = _split_time(raw)
        if seconds != self._second:
            self._prefix = time.strftime(_TIME_FORMAT, self._convert(seconds))
            self._second = seconds
        return f"{self._prefix}.{nanos:09d}"


def _fields_text(record):
    return "".join(
        f" {key}={_value(value)}" for key, value in record.items()
        if key not in ("seq", "time", "event", "pid")
    )


def format_record(record, when):
    """
    One record as one text line (without its newline).  ``when`` formats
    its time (a :class:`TimeFormatter`).
    """
    event = record["event"]
    head = f"{when(record['time'])} -- server {record['pid']}"
    if event == "message":
        return f"{head} recvd message {quote(record['text'])} from user {name(record['user'])}"
    if event == "auth_failed":
        return f"{head} auth failed for user {name(record['user'])} from {name(record['peer'])}"
    verb = {"start": "started", "stop": "stopped"}.get(event, event)
    return f"{head} {verb}{_fields_text(record)}"
