"""Reading a journal from outside the server, which may be writing it:
its first and last records, its last lines, the lines appended to it (across
rotations), and its statistics.  Nothing here takes the journal's lock.
"""

from __future__ import annotations

import os
import time

from cserver.journal.record import HEAD, decode

#: How often ``tail -f`` looks at the file, in seconds.
POLL_INTERVAL = 0.1


def _head_at(f, offset):
    """
    The (seq, raw time) of the record that starts at ``offset``.
    """
    f.seek(offset)
    match = HEAD.match(f.read(256))
    if match is not None:
        seq, raw = match.groups()
        return int(seq), raw.decode()
    # A record in another JSON spelling than the server's: parse it.
    f.seek(offset)
    record = decode(f.readline())
    return record["seq"], str(record["time"])


def _last_record_start(f, end, block=1 << 16):
    """
    The offset of the last record that ends at ``end`` (which follows a
    newline).
    """
    pos = end - 1
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        data = f.read(pos - start)
        newline = data.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        pos = start
    return 0


def edges(path, result):
    """
    The (seq, raw time) of the first and last records, or Nones.
    """
    if not result.records:
        return None, None
    with open(path, "rb") as f:
        return _head_at(f, 0), _head_at(f, _last_record_start(f, result.size))


def last_lines(f, count, block=1 << 16):
    """
    The last ``count`` whole lines of ``f`` (a trailing partial line is left
    out), and the offset where the last of them ends.
    """
    f.seek(0, os.SEEK_END)
    pos = f.tell()
    blocks = []
    newlines = 0
    while pos > 0 and newlines <= count:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step)
        blocks.append(data)
        newlines += data.count(b"\n")
    data = b"".join(reversed(blocks))
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.split(b"\n")[:-1]
    if pos > 0:
        lines = lines[1:]
    lines = [line + b"\n" for line in lines[-count:]] if count else []
    return lines, pos + len(complete)


def follow(path, f, out, interval=POLL_INTERVAL, seconds=None, sleep=time.sleep,
           clock=time.monotonic):
    """
    Copy whole lines appended to ``f`` (open on ``path``, at the offset to
    start from) to ``out`` until ``seconds`` have passed (forever if None).
    When ``path`` names another file (rotation: the old one renamed, a new
    one created), finish the old file and go on with the new one from its
    start; when the file shrinks (truncated), start again from its start.
    """
    deadline = None if seconds is None else clock() + seconds
    pending = b""
    try:
        while True:
            pending = _copy_new(f, out, pending)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            here = os.fstat(f.fileno())
            if now is not None and (now.st_ino, now.st_dev) != (here.st_ino, here.st_dev):
                _copy_new(f, out, pending)
                f.close()
                try:
                    f = open(path, "rb")
                except FileNotFoundError:
                    # Renamed again already: the next poll finds the newest.
                    f = open(os.devnull, "rb")
                pending = b""
                continue
            if here.st_size < f.tell():
                f.seek(0)
                pending = b""
            if deadline is not None and clock() >= deadline:
                return
            sleep(interval)
    finally:
        f.close()


def _copy_new(f, out, pending):
    wrote = False
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        pending += chunk
        cut = pending.rfind(b"\n") + 1
        if cut:
            out.write(pending[:cut])
            pending = pending[cut:]
            wrote = True
    if wrote:
        out.flush()
    return pending
