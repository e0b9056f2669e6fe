"""``cserver-journal`` on a journal in a JetStream stream (``nats://...``):
``verify``, ``stats``, ``tail`` and ``export``, as :mod:`cserver.journal.cli`
does them on a file.  Stream message N with payload P is the file journal's
line :func:`~cserver.journal.record.numbered` ``(N, P)``, checked with
:func:`~cserver.journal.record.read_head` (recovery's check of one line);
the seqs go on from the stream's ``first_seq`` to its ``last_seq`` (a gap:
messages deleted).  The stream is read through an ordered consumer
(:mod:`cserver.nats.consumer`) on the reactor, imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import IO, Any

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure

from cserver.fs import fsync_directory
from cserver.journal.record import Head, numbered, read_head
from cserver.journal.stream_open import STREAM_NOT_FOUND
from cserver.journal.stream_url import StreamURL, parse_stream_url
from cserver.nats.client import NATSClient
from cserver.nats.consumer import Delivery, read_stream
from cserver.nats.jetstream import JetStream, JetStreamError
from cserver.nats.wire import NATSError, NoResponders, Refused

#: Seconds to reach a NATS server, and to wait for a JetStream reply.
CONNECT_TIMEOUT = 5.0
#: Seconds to go on trying once a server refused the connection.
REFUSED_GRACE = 0.5
#: The ordered consumer's idle heartbeat, in seconds.
HEARTBEAT = 1.0
#: Seconds between two progress lines of ``export``.
PROGRESS_INTERVAL = 1.0
#: Problems shown one a line; the others are counted.
MAX_PROBLEMS = 20
#: The exit status of a command stopped by a signal (``tail -f``: 0).
INTERRUPTED = 130

class StreamUsage(Exception):
    """The stream cannot be read: one line, exit status 2."""


class _Damaged(Exception):
    """A message that is no record, or a gap: ``export`` stops."""


@attrs.define
class Scan:
    """The messages of a stream, in order, checked and counted as recovery
    counts a file's records (a message: a ``message`` record with a user).

    :ivar expected: the seq the next message should have.
    :ivar damage: how many problems were found: runs of seqs missing, and
        messages that are not records; ``problems``: the first
        :data:`MAX_PROBLEMS` of them, one line each; ``why``: the last.
    """

    expected: int = 1
    records: int = 0
    first: Head | None = None
    last: Head | None = None
    events: Counter[str] = attrs.Factory(Counter)
    users: Counter[str] = attrs.Factory(Counter)
    messages: int = 0
    damage: int = 0
    problems: list[str] = attrs.Factory(list)
    why: str = ""

    def take(self, seq: int, payload: bytes) -> bytes | None:
        """Stream message ``seq``'s journal line, or None if it is no record."""
        if seq > self.expected:
            self.missing(seq - 1)
        self.expected = seq + 1
        line = numbered(seq, payload)
        head = read_head(line) if payload[:1] == b"{" and b"\n" not in payload else None
        if head is None or head.seq != seq:
            more = "..." if len(payload) > 60 else ""
            self._problem(f"seq {seq}: not a valid record: {payload[:60]!r}{more}")
            return None
        self.records += 1
        self.first = self.first or head
        self.last = head
        if head.event != "message":
            self.events[head.event] += 1
        elif head.user is not None:
            self.users[head.user] += 1
            self.messages += 1
        return line

    def missing(self, last: int) -> None:
        """The seqs from :attr:`expected` to ``last`` are not in the stream."""
        first, self.expected = self.expected, last + 1
        self._problem(f"seq {first}{f'-{last}' if last > first else ''} missing (deleted "
                      "from the stream)")

    def _problem(self, why: str) -> None:
        self.damage += 1
        self.why = why
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(why)


@attrs.define
class Session:
    """A command's arguments, stream, outputs, connected client, clock
    and the stream's info."""

    args: argparse.Namespace
    url: StreamURL
    out: IO[bytes]
    err: IO[str]
    client: NATSClient
    clock: Any
    info: dict[str, Any] = attrs.Factory(dict)
    #: The info's ``state`` and ``config``.
    state: dict[str, Any] = attrs.Factory(dict)
    config: dict[str, Any] = attrs.Factory(dict)
    stats_text: Callable[[dict[str, Any], bool], str] | None = None
    #: Called when the reactor stops before the command ends.
    on_interrupt: list[Callable[[], object]] = attrs.Factory(list)

    def edges(self) -> tuple[int, int, int]:
        """The stream's ``first_seq``, ``last_seq`` and message count."""
        last = int(self.state.get("last_seq") or 0)
        return (int(self.state.get("first_seq") or last + 1), last,
                int(self.state.get("messages") or 0))

    def report_damage(self, scan: Scan) -> int:
        """Say what is wrong (:data:`MAX_PROBLEMS` lines at most); 1."""
        for problem in scan.problems:
            self.err.write(f"{self.url}: damaged: {problem}\n")
        if scan.damage > len(scan.problems):
            self.err.write(f"{self.url}: damaged: {scan.damage - len(scan.problems)} more\n")
        return 1

    async def read(self, start_seq: int, on_message: Callable[[Delivery], object],
                   seconds: float | None = None, **options: Any) -> int:
        """Read from ``start_seq`` on, for ``seconds`` at most (``options``:
        the :class:`~cserver.nats.consumer.StreamReader`'s)."""
        reader = read_stream(self.client, self.url.stream, on_message, start_seq,
                             heartbeat=HEARTBEAT, timeout=CONNECT_TIMEOUT, clock=self.clock,
                             **options)
        timer = self.clock.callLater(seconds, reader.stop) if seconds is not None else None
        try:
            return await reader.done
        except NATSError as e:
            raise StreamUsage(f"cannot read stream {self.url.stream} at {self.url}: "
                              f"{e}") from None
        finally:
            if timer is not None and timer.active():
                timer.cancel()

    async def scan(self, on_line: Callable[[int, bytes | None], object] | None = None,
                   scan: Scan | None = None) -> Scan:
        """Read and check every message into ``scan`` (by default a new one),
        calling ``on_line(seq, its line or None)`` after each."""
        first, last, messages = self.edges()
        scan = Scan(expected=first) if scan is None else scan

        def take(delivery: Delivery) -> None:
            line = scan.take(delivery.stream_seq, delivery.data)
            if on_line is not None:
                on_line(delivery.stream_seq, line)

        if messages:
            await self.read(first, take, until=last)
        if scan.expected <= last:  # the last ones deleted
            scan.missing(last)
        return scan


# -- the commands -------------------------------------------------------------


async def cmd_verify(session: Session) -> int:
    scan = await session.scan()
    if scan.damage:
        return session.report_damage(scan)
    seqs = f", seq {scan.first.seq}-{scan.last.seq}" if scan.first and scan.last else ""
    session.out.write(
        f"{session.url}: OK, {scan.records} records ({scan.messages} messages){seqs}, "
        f"{int(session.state.get('bytes') or 0)} bytes, {session.config.get('storage')} "
        f"storage, {int(session.config.get('num_replicas') or 1)} replicas\n".encode())
    return 0


def _by_count(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def stats_report(session: Session, scan: Scan) -> dict[str, Any]:
    """What ``stats --json`` says of a stream: a file's keys, and the stream's."""
    first, last = scan.first, scan.last
    kinds = {"message": scan.messages} if scan.messages else {}
    kinds.update(scan.events)
    return {
        "path": str(session.url), "bytes": int(session.state.get("bytes") or 0),
        "records": scan.records, "first_seq": first and first.seq,
        "last_seq": last and last.seq, "first_time": first and first.time,
        "last_time": last and last.time, "events": _by_count(kinds),
        "messages": scan.messages, "users": _by_count(scan.users), "torn_bytes": 0,
        "stream": session.url.stream, "storage": session.config.get("storage"),
        "replicas": int(session.config.get("num_replicas") or 1),
        "leader": (session.info.get("cluster") or {}).get("leader"),
    }


async def cmd_stats(session: Session) -> int:
    scan = await session.scan()
    if scan.damage:
        return session.report_damage(scan)
    report = stats_report(session, scan)
    if session.args.json or session.stats_text is None:
        session.out.write(json.dumps(report, ensure_ascii=False).encode() + b"\n")
        return 0
    session.out.write(session.stats_text(report, session.args.utc).encode())
    return 0


async def cmd_tail(session: Session) -> int:
    args = session.args
    first, last, messages = session.edges()
    start = max(first, last - args.lines + 1) if args.lines and messages else last + 1
    scan = Scan(expected=start)

    def show(delivery: Delivery) -> None:
        scan.expected = delivery.stream_seq  # gaps are verify's business, not tail's
        line = scan.take(delivery.stream_seq, delivery.data)
        if line is None:
            session.err.write(f"{session.url}: {scan.why}\n")
            return
        session.out.write(line)
        if args.follow:
            session.out.flush()

    if args.follow:
        await session.read(start, show, getattr(args, "for"), follow=True)
    elif start <= last:
        await session.read(start, show, until=last)
    return 1 if scan.damage else 0


async def cmd_export(session: Session) -> int:
    target = session.args.file
    if os.path.lexists(target):
        raise StreamUsage(f"{target} exists: not overwritten")
    part = target + ".part"
    try:
        f = open(part, "wb", buffering=1 << 20)
    except OSError as e:
        raise StreamUsage(f"cannot write {part}: {e.strerror}") from None

    def remove() -> None:
        f.close()
        if os.path.exists(part):
            os.unlink(part)

    def write(seq: int, line: bytes | None) -> None:
        if line is None or scan.damage:
            raise _Damaged()
        f.write(line)

    session.on_interrupt.append(remove)
    first, last, total = session.edges()
    scan = Scan(expected=first)
    progress = LoopingCall(lambda: session.err.write(
        f"{session.url}: {scan.records}/{total} records exported\n"))
    progress.clock = session.clock
    progress.start(PROGRESS_INTERVAL, now=False)
    began = time.monotonic()
    try:
        await session.scan(write, scan)
        if not scan.damage:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.link(part, target)  # a rename that overwrites nothing
    except _Damaged:
        pass
    except FileExistsError:
        raise StreamUsage(f"{target} exists: not overwritten") from None
    except OSError as e:
        raise StreamUsage(f"cannot write {part}: {e.strerror}") from None
    finally:
        progress.stop()
        remove()
    if scan.damage:
        session.report_damage(scan)
        session.err.write(f"{session.url}: not exported ({part} removed)\n")
        return 1
    fsync_directory(target)
    seconds = max(time.monotonic() - began, 1e-9)
    seqs = f" (seq {scan.first.seq}-{scan.last.seq})" if scan.first and scan.last else ""
    session.out.write(f"{session.url}: exported {scan.records} records{seqs} to {target} in "
                      f"{seconds:.2f} s ({scan.records / seconds:.0f} records/s)\n".encode())
    return 0


COMMANDS = {"verify": cmd_verify, "stats": cmd_stats, "tail": cmd_tail, "export": cmd_export}


# -- connecting, and the reactor ----------------------------------------------


async def connect(client: NATSClient, url: StreamURL, clock: Any,
                  timeout: float = CONNECT_TIMEOUT) -> None:
    """Start ``client``, wait until it is connected; :raises StreamUsage:
    refused (for :data:`REFUSED_GRACE` s, the others tried), CONNECT
    refused, or no server ready within ``timeout``."""
    ready = client.start()
    ready.addErrback(lambda _: None)  # closed meanwhile
    began = clock.seconds()
    refused: float | None = None
    while not ready.called:
        now, error = clock.seconds(), client.last_error
        if isinstance(error, Refused):
            raise StreamUsage(f"cannot reach NATS at {url}: {error}")
        if isinstance(error, ConnectionRefusedError) and refused is None:
            refused = now
        if refused is not None and now - refused >= REFUSED_GRACE or now - began >= timeout:
            why = "connection refused" if refused is not None else error or "no answer"
            raise StreamUsage(f"cannot reach NATS at {url}: {why}")
        await deferLater(clock, 0.05)


async def find_stream(client: NATSClient, url: StreamURL) -> dict[str, Any]:
    """The stream's info; :raises StreamUsage: there is none, or no answer."""
    try:
        return await JetStream(client, timeout=CONNECT_TIMEOUT).stream_info(url.stream)
    except JetStreamError as e:
        if e.err_code == STREAM_NOT_FOUND:
            raise StreamUsage(f'no stream "{url.stream}" at {url}') from None
        raise StreamUsage(f"stream {url.stream} at {url}: {e}") from None
    except NoResponders:
        raise StreamUsage(f"no JetStream at {url}: no responders") from None
    except NATSError as e:
        raise StreamUsage(f"no answer from JetStream at {url}: {e}") from None


async def main(session: Session) -> int:
    """Connect, find the stream, run the command, close; the exit status."""
    try:
        await connect(session.client, session.url, session.clock)
        session.info = info = await find_stream(session.client, session.url)
        session.state, session.config = info.get("state") or {}, info.get("config") or {}
        status = await COMMANDS[session.args.command](session)
    except StreamUsage as e:
        session.err.write(f"cserver-journal: {e}\n")
        status = 2
    except BaseException:
        session.client.close()  # not waited for: on the way out
        raise
    await session.client.close()
    return status


def run(args: argparse.Namespace, out: IO[bytes], err: IO[str],
        stats_text: Callable[..., str] | None = None, reactor: Any = None) -> int:
    """Run ``args.command`` on the stream ``args.path`` on ``reactor`` (the
    global one by default): its exit status, or the exception it raised."""
    try:
        url = parse_stream_url(args.path)
    except ValueError as e:
        err.write(f"cserver-journal: {e}\n")
        return 2
    if reactor is None:
        from twisted.internet import reactor
    client = NATSClient(reactor, url.server_urls, name="cserver-journal",
                        connect_timeout=CONNECT_TIMEOUT, request_timeout=CONNECT_TIMEOUT,
                        reconnect_wait=0.1, max_reconnect_wait=1.0)
    session = Session(args, url, out, err, client, reactor, stats_text=stats_text)
    outcome: list[Any] = []

    def finished(result: object) -> None:
        outcome.append(result)
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(main(session)).addBoth(finished))
    reactor.run()
    if not outcome:  # stopped by a signal
        for cleanup in session.on_interrupt:
            cleanup()
        return 0 if args.command == "tail" else INTERRUPTED
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return int(outcome[0])
