"""``cserver-journal``: read a journal without the server.

Subcommands:

``verify PATH``
    Check every record and ``seq`` contiguity with
    :func:`cserver.journal.recovery.check` (the scan recovery uses, reading
    only).  Exit status 0: valid; 1:
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
``export URL FILE``
    Write every record of the stream at ``URL``, in seq order, to ``FILE``
    as the JSON Lines a file journal holds (through ``FILE.part``, renamed
    at the end; an existing ``FILE`` is not overwritten), with progress on
    stderr.  Exit status as ``verify``'s.

Every command but ``text`` also takes a journal kept in a JetStream stream,
``nats://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/STREAM``, in place of
``PATH`` (:mod:`cserver.journal.stream_cli`): ``verify`` also finds gaps in
the stream's seqs (messages deleted), ``stats`` adds the stream's storage
and replicas, and ``tail -f`` follows the stream.  Exit status 2 when NATS
or the stream cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from cserver.journal import stream_cli
from cserver.journal.reading import POLL_INTERVAL, edges, follow, last_lines
from cserver.journal.record import OTHER_EVENTS, decode
from cserver.journal.recovery import JournalDamaged, check
from cserver.journal.stream_url import is_stream_url
from cserver.journal.text import TimeFormatter, format_record, name


class _Usage(Exception):
    """
    The journal cannot be read: exit status 2.
    """


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


# -- the subcommands ----------------------------------------------------------


def _damaged(path, error, err):
    err.write(f"{path}: damaged at byte {error.offset}: {error.why}\n")
    return 1


def cmd_verify(args, out, err):
    try:
        result = _check(args.path)
    except JournalDamaged as e:
        return _damaged(args.path, e, err)
    first, last = edges(args.path, result)
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
                lines.append(format_record(decode(line), when))
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

    :raises JournalDamaged: a record before the end is damaged.
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
            events.update(OTHER_EVENTS.findall(data, 0, cut))
            carry = data[cut:]
    kinds = {"message": result.messages} if result.messages else {}
    kinds.update((kind.decode(), count) for kind, count in events.items())
    first, last = edges(path, result)
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
        return _damaged(args.path, e, err)
    if args.json:
        out.write(json.dumps(report, ensure_ascii=False).encode() + b"\n")
        return 0
    out.write(stats_text(report, args.utc).encode())
    return 0


def stats_text(report, utc=False):
    """The ``stats`` text of a report (a file's, or a stream's)."""
    when = TimeFormatter(utc=utc)
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
    if "stream" in report:
        leader = f" (leader {report['leader']})" if report.get("leader") else ""
        text.append(f"stream: {report['stream']}, {report['storage']} storage, "
                    f"{report['replicas']} replicas{leader}")
    return "\n".join(text) + "\n"


def cmd_export(args, out, err):
    raise _Usage(f"export reads a stream (nats://HOST:PORT/STREAM), not {args.path}: "
                 "a file journal is JSON Lines already")


def _raw_time(value):
    return repr(value) if isinstance(value, float) else value


# -- the command line ---------------------------------------------------------


def parser():
    top = argparse.ArgumentParser(
        prog="cserver-journal",
        description="Read a cserver journal (JSON Lines, or a JetStream stream).",
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

    export = sub.add_parser("export", help="a stream's records to a JSON Lines file")
    export.add_argument("path", metavar="URL")
    export.add_argument("file", metavar="FILE")
    export.set_defaults(run=cmd_export)
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
        if is_stream_url(args.path):
            if args.command == "text":
                raise _Usage("text reads a file: cserver-journal export URL FILE first")
            status = stream_cli.run(args, out, err, stats_text)
        else:
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
