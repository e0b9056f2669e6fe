"""Reading a journal back at start: validate it, count it, cut a torn tail.

A journal is a sequence of records (:mod:`cserver.journal.record`), one a
line, with contiguous ``seq``.  :func:`recover` decodes each chunk of the
file in one msgspec call (no per-line Python work but a count), so a
million records take a fraction of a second.

- A damaged end -- bytes after the last valid record that hold no valid
  record themselves (a write cut short by a crash, zeros, garbage) -- is a
  *torn tail*: it is copied to a side file next to the journal and cut off.
- Anything wrong before the last valid record is *damage*: recovery stops
  with :class:`JournalDamaged`, naming the byte offset, and touches nothing.
"""

from __future__ import annotations

import os
from collections import Counter
from operator import attrgetter
from typing import BinaryIO

import attrs

from cserver.fs import create_private, fsync_directory, write_all
from cserver.journal.checkpoint import Checkpoint
from cserver.journal.checkpoint import read as read_checkpoint
from cserver.journal.record import (
    DECODE_ERRORS,
    START,
    Head,
    decode,
    decode_heads,
    one_per_line,
    read_head,
    well_formed,
)

#: How much of the file is decoded at a time, in bytes.
CHUNK = 1 << 24

_SEQ = attrgetter("seq")


class JournalDamaged(Exception):
    """
    A record before the end of the journal is damaged.
    """

    def __init__(self, path: str, offset: int, why: str) -> None:
        super().__init__(path, offset, why)
        self.path = path
        self.offset = offset
        self.why = why

    def __str__(self) -> str:
        return (
            f"journal {self.path} is damaged at byte {self.offset}: {self.why}; "
            "the file was left as it is"
        )


@attrs.define
class Recovery:
    """
    What :func:`recover` found in a journal.

    :ivar created: the file did not exist.
    :ivar size: its size in bytes once any torn tail is cut.
    :ivar records: how many records it holds.
    :ivar last_seq: the seq of its last record, 0 if none.
    :ivar messages: how many of its records are messages -- plus, from
        :func:`recover`, the ``carried`` messages of the files before it: the
        server's all-time ``total``.
    :ivar carried: the ``total`` of a ``reopen`` record that starts the file
        (messages in the files before it, rotated away), else 0;
        :func:`recover` only.
    :ivar users: messages per user.
    :ivar checkpoint: the offset recovery read from: that of the journal's
        checkpoint, where one held (:mod:`cserver.journal.checkpoint`), else
        0 (the whole file was read).
    :ivar torn_bytes: how many bytes of torn tail were cut off.
    :ivar torn_path: the side file that holds them, or None.
    """

    created: bool = False
    size: int = 0
    records: int = 0
    last_seq: int = 0
    messages: int = 0
    users: dict[str, int] = attrs.Factory(dict)
    torn_bytes: int = 0
    torn_path: str | None = None
    carried: int = 0
    checkpoint: int = 0

    def summary(self) -> dict[str, object]:
        """
        What the ``start`` record says of the recovery.
        """
        return {
            "records": self.records,
            "last_seq": self.last_seq,
            "messages": self.messages,
            "torn_bytes": self.torn_bytes,
            "torn_file": self.torn_path,
        }


def recover(path: str, chunk_size: int = CHUNK) -> Recovery:
    """
    Validate and count the journal at ``path``, cutting off a torn tail.
    Where a :mod:`checkpoint <cserver.journal.checkpoint>` holds for the
    file, start from it: only what follows is read.

    :raises JournalDamaged: a record before the end is damaged.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return Recovery(created=True)
    with f:
        start = read_checkpoint(path, f)
        f.seek(0)
        result, tail_offset, tail, first = _scan(path, f, chunk_size, start)
    if start is None and first is not None and first.event == "reopen":
        result.carried = _carried(first.line)
        result.messages += result.carried
    if tail:
        result.torn_bytes = len(tail)
        result.torn_path = _cut_tail(path, tail_offset, tail)
    result.size = tail_offset
    return result


def check(path: str, chunk_size: int = CHUNK) -> Recovery:
    """
    Validate and count the journal at ``path`` as :func:`recover` does, and
    change nothing: a torn tail is reported, not cut (``cserver-journal``).

    :returns: a :class:`Recovery` whose ``size`` is the offset where the
        valid records end and ``torn_bytes`` how many bytes follow them.
    :raises JournalDamaged: a record before the end is damaged.
    :raises OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        result, tail_offset, tail, _first = _scan(path, f, chunk_size)
    result.size = tail_offset
    result.torn_bytes = len(tail)
    return result


@attrs.frozen
class _First:
    """
    The journal's first record: its event, and its line.
    """

    event: str
    line: bytes


def _carried(line: bytes) -> int:
    """
    The ``total`` of the ``reopen`` record ``line`` that starts the journal
    (messages in the files before it), or 0 if it has none.
    """
    total = decode(line).get("total")
    return total if type(total) is int and total >= 0 else 0


def _scan(path: str, f: BinaryIO, chunk_size: int, start: Checkpoint | None = None,
          ) -> tuple[Recovery, int, bytes, _First | None]:
    """
    Count the valid records, from ``start`` on if given (else from the
    first); return the result, the offset where they end, the torn tail
    after them (empty when there is none) and the first record read.
    """
    result = Recovery()
    users: Counter[str] = Counter()
    first: _First | None = None
    offset = 0
    if start is not None:
        result = Recovery(records=start.records, last_seq=start.last_seq,
                          messages=start.messages, carried=start.carried,
                          checkpoint=start.size)
        users.update(start.users)
        offset = start.size
        f.seek(offset)
    carry = b""
    tail = b""
    while True:
        chunk = f.read(chunk_size)
        data = carry + chunk if carry else chunk
        # Whole lines only: what follows the last newline waits for the next
        # chunk, or is the tail.
        cut = data.rfind(b"\n") + 1
        block, carry = data[:cut], data[cut:]
        heads, block_users, end = _valid_prefix(block)
        if heads:
            if first is None:
                first = _First(heads[0].event, block[:block.index(b"\n") + 1])
            _count(path, result, offset, heads, block)
            result.messages += block_users.total()
            users.update(block_users)
        offset += end
        if end < len(block) or not chunk:
            tail = block[end:] + carry + f.read()
            if _holds_record(tail):
                _damaged_line(path, offset, tail)
            break
    result.users = dict(users)
    return result, offset, tail, first


def _valid_prefix(block: bytes) -> tuple[list[Head], Counter[str], int]:
    """
    The records of the longest prefix of ``block`` (whole lines) that is
    all valid records, the messages per user among them, and that prefix's
    length.
    """
    if not block:
        return [], Counter(), 0
    ascii = block.isascii()
    try:
        heads = decode_heads(block, ascii)
        users = _messages(heads)
        if not ascii and users.total() != len(heads):
            # Fields other than a message's are skipped, unchecked.
            block.decode("utf-8")
    except (*DECODE_ERRORS, UnicodeDecodeError):
        pass
    else:
        if one_per_line(block, len(heads)) and well_formed(heads):
            return heads, users, len(block)
    # Something in the block is not a record: find the first such line.
    heads = []
    end = 0
    while end < len(block):
        stop = block.index(b"\n", end) + 1
        head = read_head(block[end:stop])
        if head is None:
            break
        heads.append(head)
        end = stop
    return heads, _messages(heads), end


def _messages(heads: list[Head]) -> Counter[str]:
    """
    The messages among ``heads``, per user (a message record without a user
    is no message).
    """
    return Counter([head.user for head in heads
                    if head.event == "message" and head.user is not None])


def _holds_record(tail: bytes) -> bool:
    """
    Whether a valid record is anywhere in ``tail``: a whole line, or a line's
    end from a ``{"seq":`` on (then what comes before it is damage, not a
    torn tail).
    """
    lines = tail.split(b"\n")[:-1]  # the last piece has no newline
    if any(read_head(line + b"\n") is not None for line in lines):
        return True
    start = tail.find(START)
    while start >= 0:
        stop = tail.find(b"\n", start)
        if stop >= 0 and read_head(tail[start:stop + 1]) is not None:
            return True
        start = tail.find(START, start + 1)
    return False


def _count(path: str, result: Recovery, offset: int, heads: list[Head], block: bytes) -> None:
    """
    Add the records ``heads`` (decoded from ``block``, which starts at byte
    ``offset``) to ``result``, checking that their seqs go on without a gap.
    """
    first = heads[0].seq if not result.records else result.last_seq + 1
    seqs = list(map(_SEQ, heads))
    if seqs[0] != first or seqs[-1] != first + len(seqs) - 1 \
            or seqs != list(range(first, first + len(seqs))):
        start = 0
        for index, seq in enumerate(seqs):
            if seq != first + index:
                raise JournalDamaged(path, offset + start,
                                     f"seq {seq} where {first + index} was expected")
            start = block.index(b"\n", start) + 1
    result.records += len(seqs)
    result.last_seq = seqs[-1]


def _damaged_line(path: str, offset: int, rest: bytes) -> None:
    line = rest.split(b"\n", 1)[0]
    preview = line[:60]
    more = "..." if len(line) > 60 else ""
    raise JournalDamaged(path, offset, f"not a valid record: {preview!r}{more}")


def _cut_tail(path: str, offset: int, tail: bytes) -> str:
    """
    Save ``tail`` to a new side file, durably, then cut it off the journal.

    :returns: the side file's path.
    """
    side = f"{path}.torn-{offset}"
    n = 1
    while os.path.exists(side):
        n += 1
        side = f"{path}.torn-{offset}.{n}"
    fd = create_private(side, os.O_WRONLY)
    try:
        write_all(fd, tail)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(side)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return side
