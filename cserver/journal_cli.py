"""``cserver-journal``: read a journal without the server.

Subcommands:

``verify PATH``
    Check every record and ``seq`` contiguity with :func:`cserver.recovery.check`
    (the regex scan recovery uses, reading only).  Exit status 0: valid; 1:
    damaged or a torn tail; 2: usage or I/O error.
``tail [-n N] [-f] PATH``
    The last N records as they are in the file; ``-f`` follows appended
    records, and the new file when the journal is rotated.
``text [--utc] PATH``
    Every record as one line in the C original's format::

        2020.07.06 16:44:57.270823600 -- server 29756 recvd message "lalala" from user arijort

``stats [--json] [--utc] PATH``
    Records, seq range, first and last time, records per event and messages
    per user.
"""

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from decimal import ROUND_FLOOR, Decimal
from json.scanner import make_scanner

from cserver.recovery import JournalDamaged, check

#: How often ``tail -f`` looks at the file, in seconds.
POLL_INTERVAL = 0.1

# On records `check` has validated: '{"seq":' cannot occur inside a string,
# whose quotes are escaped, so each match is a record's head.
_HEAD = re.compile(rb'\{"seq":([0-9]++),"time":([-+.eE0-9]++),')
_OTHER_EVENTS = re.compile(rb'\{"seq":[0-9]++,"time":[-+.eE0-9]++,"event":"(?!message")([a-z_]++)"')

# What `text` escapes in a quoted string so that a record stays one line for
# grep and for Python's splitlines: quotes, backslashes, C0 and C1 controls,
# DEL, the Unicode line and paragraph separators, lone surrogates.
_ESCAPED = re.compile("[\"\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# A name shown without quotes: no space, quote, backslash or control.
_BARE = re.compile("[^\\s\"\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")

_TIME_FORMAT = "%Y.%m.%d %H:%M:%S"


class _Usage(Exception):
    """
    The journal cannot be read: exit status 2.
    """


# -- formatting -------------------------------------------------------------


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


class _Number(str):
    """
    A JSON number with a fraction or exponent, kept as written.
    """


def _value(value):
    """
    A field's value: a number as written, a string quoted, anything else
    as JSON (a list or object as a quoted JSON text).
    """
    if isinstance(value, _Number):
        return value
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, (list, dict)):
        return quote(json.dumps(value, ensure_ascii=False))
    return json.dumps(value)


# The C scanner under json.loads, called directly: a million calls of
# json.loads cost a second more.
_SCAN = make_scanner(json.JSONDecoder(parse_float=_Number))


def parse(line):
    """
    One journal line (bytes, with or without its newline) as a dict;
    numbers with a fraction stay as written.

    @raise ValueError: it is not one JSON object.
    """
    text = line.decode("utf-8")
    try:
        record, end = _SCAN(text, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if type(record) is not dict or text[end:] not in ("\n", ""):
        raise ValueError("not one JSON object")
    return record


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


# -- reading ----------------------------------------------------------------


def _open(path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise _Usage(f"cannot read {path}: {e.strerror}") from None


def _check(path):
    try:
        return check(path)
    except JournalDamaged:
        raise
    except OSError as e:
        raise _Usage(f"cannot read {path}: {e.strerror}") from None


def _head_at(f, offset):
    """
    The (seq, raw time) of the record that starts at ``offset``.
    """
    f.seek(offset)
    seq, raw = _HEAD.match(f.read(256)).groups()
    return int(seq), raw.decode()


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


def _edges(path, result):
    """
    The (seq, raw time) of the first and last records, or Nones.
    """
    if not result.records:
        return None, None
    with _open(path) as f:
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


# -- the subcommands ----------------------------------------------------------


def cmd_verify(args, out, err):
    try:
        result = _check(args.path)
    except JournalDamaged as e:
        err.write(f"{args.path}: damaged at byte {e.offset}: {e.why}\n")
        return 1
    first, last = _edges(args.path, result)
    seqs = f", seq {first[0]}-{last[0]}" if first else ""
    counts = f"{result.records} records ({result.messages} messages){seqs}"
    if result.torn_bytes:
        err.write(
            f"{args.path}: torn tail of {result.torn_bytes} bytes at byte {result.size}, "
            f"after {counts}; the server cuts it off at its next start\n"
        )
        return 1
    out.write(f"{args.path}: OK, {counts}, {result.size} bytes\n".encode())
    return 0


def cmd_tail(args, out, err):
    f = _open(args.path)
    try:
        lines, end = last_lines(f, args.lines)
    except BaseException:
        f.close()
        raise
    out.write(b"".join(lines))
    out.flush()
    if not args.follow:
        f.close()
        return 0
    f.seek(end)
    follow(args.path, f, out, interval=args.interval, seconds=getattr(args, "for"))
    return 0


def cmd_text(args, out, err):
    when = TimeFormatter(utc=args.utc)
    problems = 0
    offset = 0
    lines = []
    with _open(args.path) as f:
        for line in f:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline at the end (a torn tail)")
                lines.append(format_record(parse(line), when))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                problems += 1
                why = e if isinstance(e, ValueError) else f"missing or bad key {e}"
                err.write(f"{args.path}: not a valid record at byte {offset}: {why}\n")
            offset += len(line)
            if len(lines) >= 4096:
                out.write(("\n".join(lines) + "\n").encode())
                lines = []
    if lines:
        out.write(("\n".join(lines) + "\n").encode())
    return 1 if problems else 0


def stats(path):
    """
    What ``stats`` reports, as a dict (the ``--json`` object).

    @raise JournalDamaged: when a record before the end is damaged.
    """
    result = _check(path)
    events = Counter()
    with _open(path) as f:
        remaining = result.size
        carry = b""
        while remaining:
            chunk = f.read(min(remaining, 1 << 24))
            remaining -= len(chunk)
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            events.update(_OTHER_EVENTS.findall(data, 0, cut))
            carry = data[cut:]
    kinds = {"message": result.messages} if result.messages else {}
    kinds.update((kind.decode(), count) for kind, count in events.items())
    first, last = _edges(path, result)
    users = sorted(result.users.items(), key=lambda item: (-item[1], item[0]))
    return {
        "path": path,
        "bytes": result.size,
        "records": result.records,
        "first_seq": first and first[0],
        "last_seq": last and last[0],
        "first_time": first and json.loads(first[1]),
        "last_time": last and json.loads(last[1]),
        "events": dict(sorted(kinds.items(), key=lambda item: (-item[1], item[0]))),
        "messages": result.messages,
        "users": dict(users),
        "torn_bytes": result.torn_bytes,
    }


def cmd_stats(args, out, err):
    try:
        report = stats(args.path)
    except JournalDamaged as e:
        err.write(f"{args.path}: damaged at byte {e.offset}: {e.why}\n")
        return 1
    if args.json:
        out.write(json.dumps(report, ensure_ascii=False).encode() + b"\n")
        return 0
    when = TimeFormatter(utc=args.utc)
    text = [f"{report['path']}: {report['records']} records, {report['bytes']} bytes"]
    if report["records"]:
        text.append(f"seq: {report['first_seq']}-{report['last_seq']}")
        text.append(f"first: {when(_raw_time(report['first_time']))}")
        text.append(f"last: {when(_raw_time(report['last_time']))}")
    if report["torn_bytes"]:
        text.append(f"torn tail: {report['torn_bytes']} bytes (not counted)")
    text.append("events:")
    text.extend(f"  {count:>10}  {kind}" for kind, count in report["events"].items())
    text.append(f"messages per user ({len(report['users'])} users):")
    text.extend(f"  {count:>10}  {name(user)}" for user, count in report["users"].items())
    out.write(("\n".join(text) + "\n").encode())
    return 0


def _raw_time(value):
    return repr(value) if isinstance(value, float) else value


# -- the command line ---------------------------------------------------------


def parser():
    top = argparse.ArgumentParser(
        prog="cserver-journal", description="Read a cserver journal (JSON Lines)."
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = sub.add_parser("verify", help="check every record and seq contiguity")
    verify.add_argument("path", metavar="PATH")
    verify.set_defaults(run=cmd_verify)

    tail = sub.add_parser("tail", help="the last records, as they are")
    tail.add_argument("-n", "--lines", type=_count, default=10, metavar="N",
                      help="how many records (default 10)")
    tail.add_argument("-f", "--follow", action="store_true",
                      help="keep printing appended records, across rotations")
    tail.add_argument("--for", type=float, default=None, metavar="SECONDS",
                      help="with -f: stop after SECONDS (default: until Ctrl-C)")
    tail.add_argument("--interval", type=float, default=POLL_INTERVAL, metavar="SECONDS",
                      help=f"with -f: how often to look (default {POLL_INTERVAL})")
    tail.add_argument("path", metavar="PATH")
    tail.set_defaults(run=cmd_tail)

    text = sub.add_parser("text", help="every record as one greppable line")
    text.add_argument("--utc", action="store_true", help="times in UTC (default: local)")
    text.add_argument("path", metavar="PATH")
    text.set_defaults(run=cmd_text)

    stats_ = sub.add_parser("stats", help="records, messages per user, times, events")
    stats_.add_argument("--json", action="store_true", help="one JSON object")
    stats_.add_argument("--utc", action="store_true", help="times in UTC (default: local)")
    stats_.add_argument("path", metavar="PATH")
    stats_.set_defaults(run=cmd_stats)
    return top


def _count(value):
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"not a count: {value}")
    return number


def main(argv=None, stdout=None, stderr=None):
    """
    Run ``cserver-journal`` with ``argv``; return the exit status.  Output
    goes to the binary ``stdout`` (default ``sys.stdout.buffer``), messages
    to the text ``stderr``.
    """
    args = parser().parse_args(argv)
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr
    try:
        status = args.run(args, out, err)
        out.flush()
        return status
    except _Usage as e:
        err.write(f"cserver-journal: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (| head): no traceback at exit either.
        if stdout is None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
