"""The keyed records at the end of a journal: what the deduplication window
(:mod:`cserver.dedup`) needs back at start.

:func:`keyed_since` reads the journal backwards from its end, a block at a
time, and stops at the first record older than the window: a start reads
only what the window needs, however long the journal.  When it reaches the
start of a file that a ``reopen`` record begins (log rotation), it goes on
in the file before it, at the ``previous`` path that record names, if that
file is still there.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

from cserver.journal.record import DECODE_ERRORS

#: How much is read at a time, from the end.
BLOCK = 1 << 20


class KeyedRecord(msgspec.Struct, gc=False):
    """What the window keeps of a record: a message's user, text and key."""

    seq: int
    time: float
    event: str
    user: Any = None
    #: The text's JSON as the record holds it (not decoded: the window keeps
    #: only a digest of it).
    text: msgspec.Raw = msgspec.Raw(b"")
    key: Any = None
    previous: Any = None  # a reopen record's


_decode_lines = msgspec.json.Decoder(KeyedRecord).decode_lines
_decode = msgspec.json.Decoder(KeyedRecord).decode
_encode = msgspec.json.Encoder().encode


def keyed_since(path: str, since: float, limit: int,
                block: int = BLOCK) -> list[KeyedRecord]:
    """
    The keyed message records of the journal at ``path`` taken at ``since``
    or later, oldest first, at most the last ``limit`` of them.  The journal
    is one recovery has read (a line that does not decode is passed over).
    """
    found: list[KeyedRecord] = []
    seen: set[str] = set()
    next_path: str | None = path
    while next_path and next_path not in seen and len(found) < limit:
        seen.add(next_path)
        try:
            f = open(next_path, "rb")
        except OSError:
            break
        with f:
            next_path = _scan_back(f, since, limit, block, found)
    found.reverse()
    return found


def _scan_back(f: Any, since: float, limit: int, block: int,
               found: list[KeyedRecord]) -> str | None:
    """
    Add the file's keyed records at ``since`` or later to ``found``, newest
    first; return the path of the file before it if the scan reached this
    one's first record and that is a ``reopen`` record, else None.
    """
    end = f.seek(0, os.SEEK_END)
    carry = b""
    while end > 0:
        start = max(0, end - block)
        f.seek(start)
        data = f.read(end - start) + carry
        end = start
        if start > 0:
            # The head of the first line here began before this block.
            cut = data.find(b"\n") + 1
            if not cut:
                carry = data
                continue
            carry, data = data[:cut], data[cut:]
        for record in reversed(_records(data)):
            if record.time < since:
                return None
            if record.event == "message" and type(record.key) is str \
                    and type(record.user) is str and bytes(record.text)[:1] == b'"':
                found.append(record)
                if len(found) >= limit:
                    return None
    first = _first_record(f)
    if first is not None and first.event == "reopen" and type(first.previous) is str:
        return first.previous
    return None


def keyed_records(data: bytes) -> list[KeyedRecord]:
    """
    The keyed message records among the whole lines of ``data`` (records
    another worker wrote: what a shared journal learns under the lock).
    """
    return [record for record in _records(data)
            if record.event == "message" and type(record.key) is str
            and type(record.user) is str and bytes(record.text)[:1] == b'"']


def _records(data: bytes) -> list[KeyedRecord]:
    """
    The records of ``data`` (whole lines, the last maybe unfinished), each
    text's JSON as this server's encoder spells it (what the window digests:
    another spelling of the same text, with ``\\u`` escapes say, is
    re-encoded).
    """
    whole = data[:data.rfind(b"\n") + 1]
    try:
        records = _decode_lines(whole)
    except DECODE_ERRORS:
        records = []
        for line in whole.splitlines():
            try:
                records.append(_decode(line))
            except DECODE_ERRORS:
                continue
    if b"\\" in whole:
        for record in records:
            text = bytes(record.text)
            if b"\\" in text and text[:1] == b'"':
                try:
                    record.text = msgspec.Raw(_encode(msgspec.json.decode(text)))
                except (*DECODE_ERRORS, UnicodeEncodeError):
                    pass  # a lone surrogate: kept as written
    return records


def _first_record(f: Any) -> KeyedRecord | None:
    f.seek(0)
    try:
        return _decode(f.readline())
    except DECODE_ERRORS:
        return None
