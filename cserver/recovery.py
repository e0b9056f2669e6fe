"""Reading a journal back at start: validate it, count it, cut a torn tail.

A journal is a sequence of records, each one line ``{"seq":N,"time":T,
"event":E,"pid":P,...}\\n`` with contiguous ``seq``.  :func:`recover` checks
the whole file with a few regular-expression passes per chunk (no per-line
Python work), so a million records take well under a second.

- A damaged end -- bytes after the last valid record that hold no valid
  record themselves (a write cut short by a crash, zeros, garbage) -- is a
  *torn tail*: it is copied to a side file next to the journal and cut off.
- Anything wrong before the last valid record is *damage*: recovery stops
  with :class:`JournalDamaged`, naming the byte offset, and touches nothing.
"""

import os
import re
from collections import Counter
from json import loads

import attrs

# The grammar of the records this package writes: a flat JSON object whose
# first keys are seq, time, event and pid, in that order.  Message records,
# nearly all of a journal, are tried first.
_STR = rb'"[^"\\\x00-\x1f]*+(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*+)*+"'
_NUM = rb"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?"
_VALUE = rb"(?:" + _STR + rb"|" + _NUM + rb"|true|false|null)"
_HEAD = rb'\{"seq":[1-9][0-9]*+,"time":' + _NUM
_MESSAGE = (
    _HEAD + rb',"event":"message","pid":[0-9]++,"user":' + _STR + rb',"text":' + _STR
    + rb',"peer":' + _STR + rb"\}\n"
)
_RECORD = (
    _HEAD + rb',"event":"[a-z_]++","pid":[0-9]++(?:,' + _STR + rb":" + _VALUE + rb")*+\}\n"
)
_RECORDS = re.compile(rb"(?:" + _MESSAGE + rb"|" + _RECORD + rb")*+")
_ANY_RECORD = re.compile(_RECORD)
# On validated records only: '{"seq":' and the message head cannot occur
# inside a string, whose quotes are escaped.
_SEQS = re.compile(rb'\{"seq":([0-9]++),')
_MESSAGE_USERS = re.compile(rb'"event":"message","pid":[0-9]++,"user":(' + _STR + rb")")

CHUNK = 1 << 24


class JournalDamaged(Exception):
    """
    A record before the end of the journal is damaged.
    """

    def __init__(self, path, offset, why):
        super().__init__(path, offset, why)
        self.path = path
        self.offset = offset
        self.why = why

    def __str__(self):
        return (
            f"journal {self.path} is damaged at byte {self.offset}: {self.why}; "
            "the file was left as it is"
        )


@attrs.define
class Recovery:
    """
    What :func:`recover` found in a journal.

    @ivar created: the file did not exist.
    @ivar size: its size in bytes once any torn tail is cut.
    @ivar records: how many records it holds.
    @ivar last_seq: the seq of its last record, 0 if none.
    @ivar messages: how many of its records are messages -- plus, from
        :func:`recover`, the ``carried`` messages of the files before it: the
        server's all-time ``total``.
    @ivar carried: the ``total`` of a ``reopen`` record that starts the file
        (messages in the files before it, rotated away), else 0;
        :func:`recover` only.
    @ivar users: messages per user.
    @ivar torn_bytes: how many bytes of torn tail were cut off.
    @ivar torn_path: the side file that holds them, or None.
    """

    created: bool = False
    size: int = 0
    records: int = 0
    last_seq: int = 0
    messages: int = 0
    users: dict = attrs.Factory(dict)
    torn_bytes: int = 0
    torn_path: str | None = None
    carried: int = 0

    def summary(self):
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


def recover(path, chunk_size=CHUNK):
    """
    Validate and count the journal at ``path``, cutting off a torn tail.

    @raise JournalDamaged: when a record before the end is damaged.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return Recovery(created=True)
    with f:
        result, tail_offset, tail = _scan(path, f, chunk_size)
        if result.records:
            result.carried = _carried(f)
            result.messages += result.carried
    if tail:
        result.torn_bytes = len(tail)
        result.torn_path = _cut_tail(path, tail_offset, tail)
    result.size = tail_offset
    return result


_REOPEN_HEAD = re.compile(rb'\{"seq":[0-9]++,"time":' + _NUM + rb',"event":"reopen",')


def _carried(f):
    """
    The ``total`` of the ``reopen`` record that starts the (validated,
    non-empty) journal ``f``, if it starts with one, else 0: one line read.
    """
    f.seek(0)
    first = f.readline(1 << 20)
    if not _REOPEN_HEAD.match(first):
        return 0
    total = loads(first).get("total")
    return total if type(total) is int and total >= 0 else 0


def check(path, chunk_size=CHUNK):
    """
    Validate and count the journal at ``path`` as :func:`recover` does, and
    change nothing: a torn tail is reported, not cut (``cserver-journal``).

    @return: a :class:`Recovery` whose ``size`` is the offset where the valid
        records end and ``torn_bytes`` how many bytes follow them.
    @raise JournalDamaged: when a record before the end is damaged.
    @raise OSError: when the file cannot be read.
    """
    with open(path, "rb") as f:
        result, tail_offset, tail = _scan(path, f, chunk_size)
    result.size = tail_offset
    result.torn_bytes = len(tail)
    return result


def _scan(path, f, chunk_size):
    """
    Count the valid records; return the result, the offset where they end,
    and the torn tail after them (empty when there is none).
    """
    result = Recovery()
    users = Counter()
    offset = 0
    carry = b""
    tail = b""
    while True:
        chunk = f.read(chunk_size)
        data = carry + chunk if carry else chunk
        if chunk:
            cut = data.rfind(b"\n") + 1
            block, carry = data[:cut], data[cut:]
        else:
            block, carry = data, b""
        end = _valid_prefix(block)
        if end:
            _count(path, result, users, offset, block[:end] if end < len(block) else block)
        offset += end
        if end < len(block):
            tail = block[end:] + carry + f.read()
            if _ANY_RECORD.search(tail):
                _damaged_line(path, offset, tail)
            break
        if not chunk:
            break
    for name, count in users.items():
        # One name may be escaped in more than one way ("\u00e9" and "é").
        name = loads(name)
        result.users[name] = result.users.get(name, 0) + count
    return result, offset, tail


def _valid_prefix(block):
    """
    The length of the longest prefix of whole, valid UTF-8 records.
    """
    end = _RECORDS.match(block).end()
    try:
        block[:end].decode("utf-8")
    except UnicodeDecodeError as e:
        end = block.rfind(b"\n", 0, e.start) + 1
    return end


def _count(path, result, users, offset, good):
    seqs = list(map(int, _SEQS.findall(good)))
    first = seqs[0] if not result.records else result.last_seq + 1
    if seqs != list(range(first, first + len(seqs))):
        for index, match in enumerate(_SEQS.finditer(good)):
            if int(match.group(1)) != first + index:
                raise JournalDamaged(
                    path,
                    offset + match.start(),
                    f"seq {match.group(1).decode()} where {first + index} was expected",
                )
    result.records += len(seqs)
    result.last_seq = seqs[-1]
    names = _MESSAGE_USERS.findall(good)
    result.messages += len(names)
    users.update(names)


def _damaged_line(path, offset, rest):
    line = rest.split(b"\n", 1)[0]
    preview = line[:60]
    more = "..." if len(line) > 60 else ""
    raise JournalDamaged(path, offset, f"not a valid record: {preview!r}{more}")


def _cut_tail(path, offset, tail):
    """
    Save ``tail`` to a new side file, durably, then cut it off the journal.
    """
    side = f"{path}.torn-{offset}"
    n = 1
    while os.path.exists(side):
        n += 1
        side = f"{path}.torn-{offset}.{n}"
    fd = create_private(side, os.O_WRONLY)
    try:
        view = memoryview(tail)
        while view:
            view = view[os.write(fd, view):]
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


def fsync_directory(path):
    """
    Make the directory entry of ``path`` durable.
    """
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: The mode of every file the server creates: the journal, the files a
#: reopen starts, torn-tail side files and the lock hold every message and
#: peer address, so only the server's own account may read them.
FILE_MODE = 0o600


def create_private(path, flags):
    """
    Create the file ``path`` (it must not exist) with mode 0600 whatever the
    umask, open with ``flags``; return its descriptor.
    """
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_durably(path, flags):
    """
    :func:`create_private`, then make the new file and its directory entry
    durable; if that fails, the file is removed again.
    """
    fd = create_private(path, flags)
    try:
        os.fsync(fd)
        fsync_directory(path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return fd
