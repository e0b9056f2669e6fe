"""The load generator behind ``cserver-client bench``: N concurrent sessions from one factory.

One job: open N connections through one client factory in one reactor, authenticate
them all, hold every session at a barrier until all N are authenticated (so N
sessions are open at the same instant, which the server's own count of open
connections, read by STATS at the barrier, confirms), then send every MSG (closed
loop, or open loop with ``--rate``), QUIT, and report phase times, throughput and
latency percentiles.  With ``--processes P``
the connections are split over P client processes whose barrier is joined by the
parent process (children say ``ready``; the parent says ``go``).

The sessions use a lean protocol of their own: raw line splitting and plain
callbacks, no Deferred per request, so that the client is not the bottleneck.
"""

import errno
import json
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter, deque

import attrs
from twisted.internet import defer, error, tcp
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure

from cserver.client import ServerError, endpoint_description, parse_stats

PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
GREET, AUTH, READY, STATS, RUN, QUIT, DONE, FAILED = range(8)
_TCP = re.compile(r"tcp:host=([\w.-]+):port=(\d+)$")
HINTS = {
    "refused": "connection refused: is the server listening there?",
    "limit": "the open-file limit was reached: raise ulimit -n or use --processes",
    "ports": "no free local port: too many connections to one address",
    "reset": "connection reset by the server",
    "closed": "the server closed the connection early",
    "busy": "the server is at its --max-connections",
    "timeout": "no progress within --timeout seconds",
    "auth": "authentication refused: check --user/--password",
}
try:
    from twisted.internet import unix
except ImportError:  # no AF_UNIX here
    unix = None
# Transports whose socket the sessions may write to directly: exactly these types,
# never a wrapper (TLS and policies wrappers forward ``socket`` by __getattr__).
PLAIN_TRANSPORTS = (tcp.Client,) + ((unix.Client,) if unix else ())


@attrs.define
class BenchConfig:
    """What one bench process runs (children get theirs as JSON on stdin)."""

    endpoint: str
    user: str
    password: str | None = None
    connections: int = 1000
    messages: int = 1
    pipeline: int = 1
    text: str = "bench"
    rate: float | None = None
    duration: float = 10.0
    timeout: float = 60.0
    first: int = 0
    total: int | None = None  # open loop: this process's share of the MSGs (see split)

    def total_messages(self):
        if self.rate:
            return self.total if self.total is not None else round(self.rate * self.duration)
        return self.connections * self.messages


@attrs.define
class RunResult:
    """The raw outcome of one bench process; times are ``time.monotonic()`` stamps."""

    requested: int
    opened: int = 0
    authenticated: int = 0
    acked: int = 0
    failed: int = 0
    errors: dict = attrs.Factory(dict)
    peak: int | None = None
    server_connections: int | None = None
    t0: float | None = None
    t1: float | None = None
    t2: float | None = None
    t3: float | None = None
    latencies: list = attrs.Factory(list)
    notes: list = attrs.Factory(list)


@attrs.define
class Report:
    """The bench report: printed as a table, or as one JSON object with ``--json``."""

    connections: int
    processes: int
    messages: int
    pipeline: int
    rate: float | None
    opened: int
    authenticated: int
    acked: int
    failed: int
    errors: dict
    peak: int | None
    server_connections: int | None
    connect_ms: float | None
    messages_ms: float | None
    quit_ms: float | None
    total_ms: float | None
    msg_per_s: float
    latency_ms: dict
    notes: list
    ok: bool


def percentiles(latencies):
    """Nearest-rank p50/p90/p99/p99.9 and max of ``latencies`` (seconds), in ms."""
    values = sorted(latencies)
    n = len(values)
    if not n:
        return {name: None for name, _ in PERCENTILES} | {"max": None}
    rank = {name: max(0, math.ceil(round(q * n, 6)) - 1) for name, q in PERCENTILES}
    out = {name: round(values[i] * 1e3, 3) for name, i in rank.items()}
    out["max"] = round(values[-1] * 1e3, 3)
    return out


def classify(reason):
    """The error code under which a failed session or connection attempt is counted."""
    e = reason.value if isinstance(reason, Failure) else reason
    if isinstance(e, ServerError):
        return e.code
    if isinstance(e, error.ConnectionRefusedError):
        return "refused"
    if isinstance(e, (error.TimeoutError, error.TCPTimedOutError)):
        return "timeout"
    if isinstance(e, error.ConnectError):
        if e.osError in (errno.EMFILE, errno.ENFILE):
            return "limit"
        return "ports" if e.osError == errno.EADDRNOTAVAIL else "connect"
    if isinstance(e, error.ConnectionDone):
        return "closed"
    if isinstance(e, error.ConnectionLost):
        return "reset"
    if isinstance(e, defer.CancelledError):
        return "cancelled"
    return type(e).__name__


def _code(line):
    """The code of an ``ERR <code> ...`` line (bytes), else ``protocol``."""
    if line.startswith(b"ERR "):
        code = line.rstrip(b"\r")[4:].split(b" ", 1)[0]
        return code.decode("ascii", "replace") or "unknown"
    return "protocol"


class BenchProtocol(Protocol):
    """One bench session: GREET -> AUTH -> READY (barrier) -> RUN -> QUIT -> DONE."""

    state = GREET
    number = 0
    closed = False

    def __init__(self):
        self._buffer = b""
        self.sent_at = deque()
        self.to_send = 0
        self.sent = 0

    def connectionMade(self):
        transport = self.transport
        try:
            transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        # A plain socket transport lets write() skip Twisted's buffer when it is empty.
        self._sock = transport.socket if type(transport) in PLAIN_TRANSPORTS else None
        self.factory.connection_made(self)

    def dataReceived(self, data):
        if self._buffer:
            data = self._buffer + data
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > 65536:
            self.fail("protocol")
        if not lines:
            return
        if self.state == RUN:
            self.replies(lines)
            return
        for i, line in enumerate(lines):
            if self.state == RUN:
                self.replies(lines[i:])
                return
            self.control(line.rstrip(b"\r"))

    def control(self, line):
        """A line outside the message phase (greeting, AUTH, STATS, QUIT replies)."""
        state = self.state
        if not line or state in (DONE, FAILED):
            return
        ok = line.startswith(b"OK")
        if state == GREET and line.startswith(b"HELLO"):
            self.state = AUTH
            self.write(self.factory.auth_line)
        elif not ok:
            self.fail(_code(line))
        elif state == AUTH:
            self.state = READY
            self.factory.authenticated(self)
        elif state == STATS:
            self.state = READY
            self.factory.stats_received(parse_stats(line[3:].decode("utf-8", "replace")))
        elif state == QUIT:
            self.state = DONE
            self.transport.loseConnection()
        else:
            self.fail("protocol")

    def replies(self, lines):
        """The hot path: MSG replies, matched in order to the send times."""
        bench = self.factory
        now = bench.now()
        sent_at = self.sent_at
        if len(lines) == 1 and sent_at and lines[0][:2] == b"OK":
            bench.latencies.append(now - sent_at.popleft())
            bench.acked += 1
        else:
            record = bench.latencies.append
            for line in lines:
                if not sent_at:
                    self.control(line.rstrip(b"\r"))
                elif line[:2] == b"OK":
                    record(now - sent_at.popleft())
                    bench.acked += 1
                else:
                    sent_at.popleft()
                    bench.error(_code(line))
            if self.state != RUN:
                return
        bench.progress += 1
        if self.to_send:
            if not bench.open_loop:
                self.send(min(len(lines), self.to_send), now)
        elif not sent_at:
            self.quit()

    def send(self, count, stamp):
        """Send ``count`` MSGs in one write, all stamped ``stamp``."""
        start = self.sent
        self.sent = start + count
        self.to_send -= count
        prefix = self.factory.msg_prefix
        number = self.number
        if count == 1:
            self.sent_at.append(stamp)
            self.write(b"%s%d %d\n" % (prefix, number, start))
        else:
            self.sent_at.extend([stamp] * count)
            self.write(
                b"".join([b"%s%d %d\n" % (prefix, number, i) for i in range(start, start + count)])
            )

    def write(self, data):
        """Send at once when Twisted holds nothing queued (saves a reactor turn), else queue."""
        transport, sock = self.transport, self._sock
        if sock is not None and not transport.dataBuffer and not transport._tempDataBuffer:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def quit(self):
        self.state = QUIT
        self.write(b"QUIT\n")
        self.factory.messages_done(self)

    def fail(self, code):
        if self.state in (DONE, FAILED):
            return
        was = self.state
        self.state = FAILED
        self.factory.session_failed(self, was, code)
        self.transport.loseConnection()

    def connectionLost(self, reason=None):
        self.closed = True
        if self.state not in (DONE, QUIT, FAILED) and not self.factory.aborting:
            self.fail(classify(reason))
        self.state = DONE if self.state != FAILED else FAILED
        self.factory.attempt_ended()


class Bench(ClientFactory):
    """The one factory of a bench run: counts, barrier, phases and the watchdog.

    ``start()`` opens ``config.connections`` connections -- through ``endpoint``
    when given, else to ``config.endpoint`` (plain ``tcp:host=H:port=P`` goes
    straight to ``connectTCP``, anything else through ``clientFromString``) -- and
    returns a Deferred that fires with the :class:`RunResult`.  ``on_ready`` is
    called when all sessions are authenticated; by default it calls :meth:`go`
    (a child process instead tells its parent, which joins all the barriers).
    """

    protocol = BenchProtocol

    def __init__(self, config, reactor, endpoint=None, now=time.monotonic, on_ready=None):
        self.config = config
        self.reactor = reactor
        self.endpoint = endpoint
        self.now = now
        self.on_ready = on_ready or self.go
        self.result = RunResult(requested=config.connections)
        self.latencies = self.result.latencies
        self.sessions = []
        self.connecting = []
        self.ended = 0
        self.connect_failures = 0
        self.sending = 0
        self.acked = 0
        self.progress = 0
        self.aborting = False
        self.open_loop = bool(config.rate)
        self.done = defer.Deferred()
        self._timers = {}
        password = "" if config.password is None else " " + config.password
        self.auth_line = f"AUTH {config.user}{password}\n".encode()
        self.msg_prefix = f"MSG {config.text} ".encode() if config.text else b"MSG "

    def start(self):
        """Open every connection; fires with the RunResult when all have ended."""
        self.result.t0 = self.now()
        plain = _TCP.match(self.config.endpoint) if self.endpoint is None else None
        if plain:
            host, port = plain.group(1), int(plain.group(2))
            for _ in range(self.config.connections):
                self.connecting.append(self.reactor.connectTCP(host, port, self))
        else:
            endpoint = self.endpoint or clientFromString(self.reactor, self.config.endpoint)
            for _ in range(self.config.connections):
                d = endpoint.connect(self)
                self.connecting.append(d)
                d.addErrback(self._connect_failed)
        self._watch(self.progress, self.now())
        return self.done

    def clientConnectionFailed(self, connector, reason):
        self._connect_failed(reason)

    def _connect_failed(self, reason):
        self.connect_failures += 1
        if not self.aborting:
            self.session_failed(None, GREET, classify(reason))
        self.attempt_ended()

    def connection_made(self, session):
        session.number = self.config.first + len(self.sessions)
        self.sessions.append(session)
        self.result.opened += 1
        self.progress += 1
        if self.aborting:
            session.transport.loseConnection()

    def authenticated(self, session):
        self.result.authenticated += 1
        self.progress += 1
        if self.result.authenticated == self.config.connections:
            self.connecting = []
            self.on_ready()
        elif self.result.failed:
            self._check_barrier()

    def go(self):
        """Pass the barrier: ask the server's STATS on one session, then send."""
        if self.aborting:
            return
        first = self.sessions[0]
        first.state = STATS
        first.transport.write(b"STATS\n")

    def stats_received(self, stats):
        self.result.peak = stats.get("peak")
        self.result.server_connections = stats.get("connections")
        self.result.t1 = now = self.now()
        config = self.config
        self.sending = len(self.sessions)
        total = config.total_messages()
        for session in self.sessions:
            session.state = RUN
            if self.open_loop:
                index = session.number - config.first
                session.to_send = len(range(index, total, len(self.sessions)))
            else:
                session.to_send = config.messages
        for session in self.sessions:
            if self.open_loop or not session.to_send:
                if not session.to_send:
                    session.quit()
            else:
                session.send(min(config.pipeline, session.to_send), now)
        if self.open_loop:
            self._next = 0
            self._tick()

    def _tick(self):
        """Open loop: send every MSG whose intended time has come, stamped with it."""
        config, sessions, start = self.config, self.sessions, self.result.t1
        total, rate = config.total_messages(), config.rate
        now = self.now()
        due = min(total, int((now - start) * rate) + 1)
        for k in range(self._next, due):
            session = sessions[k % len(sessions)]
            if session.state == RUN:
                session.send(1, start + k / rate)
        self._next = due
        if due < total:
            delay = max(0.0, start + due / rate - now)
            self._timers["tick"] = self.reactor.callLater(delay, self._tick)

    def messages_done(self, session):
        self.sending -= 1
        if self.sending == 0:
            self.result.t2 = self.now()

    def error(self, code):
        self.result.errors[code] = self.result.errors.get(code, 0) + 1

    def session_failed(self, session, state, code):
        self.result.failed += 1
        self.error(code)
        if state == RUN:
            self.messages_done(session)
        elif state in (GREET, AUTH, READY, STATS):
            self._check_barrier()

    def _check_barrier(self):
        """Before the barrier, one failed session means the barrier can never open."""
        result = self.result
        if result.t1 is None and result.failed + result.authenticated >= result.requested:
            self.abort(f"could not open {result.requested} sessions: "
                       f"{result.authenticated} authenticated")

    def abort(self, note):
        """Give up: close every connection, cancel pending connects, finish."""
        if self.aborting:
            return
        self.aborting = True
        self.result.notes.append(note)
        for pending in self.connecting:
            if isinstance(pending, defer.Deferred):
                if not pending.called:
                    pending.cancel()
            elif getattr(pending, "state", "connecting") == "connecting":
                pending.stopConnecting()
        for session in self.sessions:
            if not session.closed:
                session.transport.loseConnection()
        self._timers["abort"] = self.reactor.callLater(5, self._finish)

    def attempt_ended(self):
        self.ended += 1
        if self.ended >= self.config.connections:
            self._finish()

    def _watch(self, seen, since):
        """Abort when nothing has progressed for ``config.timeout`` seconds while
        replies are awaited; stops once the run ends or aborts."""
        if self.done.called or self.aborting:
            return
        now = self.now()
        if self.progress != seen or not self._awaiting_replies():
            seen, since = self.progress, now
        elif now - since >= self.config.timeout:
            stuck = self._stuck()
            if stuck:
                self.result.errors["timeout"] = self.result.errors.get("timeout", 0) + stuck
                self.result.failed += stuck
            self.abort(f"no progress for {self.config.timeout:g} s: {stuck} sessions stuck")
            return
        self._timers["watch"] = self.reactor.callLater(1.0, self._watch, seen, since)

    def _awaiting_replies(self):
        """Before the barrier and in a closed loop, always; in an open loop only while
        some session has a MSG, STATS or QUIT unanswered (not between its MSGs)."""
        if not self.open_loop or self.result.t1 is None:
            return True
        return any(s.sent_at or s.state in (STATS, QUIT) for s in self.sessions)

    def _stuck(self):
        """Sessions neither done nor already counted as failed, including connection
        attempts that have not come back."""
        never = self.config.connections - len(self.sessions) - self.connect_failures
        return never + sum(1 for s in self.sessions if s.state not in (DONE, FAILED))

    def _finish(self):
        if self.done.called:
            return
        result = self.result
        if result.t1 is not None and result.t2 is None:
            result.t2 = self.now()
        result.t3 = self.now()
        result.acked = self.acked
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self.done.callback(result)


def split(config, processes):
    """One config per client process: connections (and the rate) shared out evenly.

    With ``--rate`` each process also gets its share of the MSGs as an explicit
    ``total``; the shares add up to the whole run's count.
    """
    n = config.connections
    total = config.total_messages() if config.rate else None
    configs, done = [], 0
    for i in range(processes):
        size = n // processes + (1 if i < n % processes else 0)
        rate = share = None
        if config.rate:
            rate = config.rate * size / n
            share = total * (done + size) // n - total * done // n
        configs.append(attrs.evolve(config, connections=size, rate=rate, total=share,
                                    first=config.first + done))
        done += size
    return configs


def make_report(config, results, processes=1):
    """Merge the RunResults of all client processes into one Report."""
    t0 = min(r.t0 for r in results if r.t0 is not None) if any(r.t0 for r in results) else None
    started = [r.t1 for r in results]
    went = None not in started
    t1, t2 = (max(started), max(r.t2 for r in results)) if went else (None, None)
    t3 = max((r.t3 for r in results if r.t3 is not None), default=None)
    errors = Counter()
    for r in results:
        errors.update(r.errors)
    latencies = [x for r in results for x in r.latencies]
    acked = sum(r.acked for r in results)
    authenticated = sum(r.authenticated for r in results)
    messages_s = (t2 - min(started)) if went else 0.0
    notes = [note for r in results for note in r.notes]
    if authenticated < config.connections:
        notes += [f"{code}: {HINTS[code]}" for code in sorted(errors) if code in HINTS]

    def ms(a, b):
        return None if a is None or b is None else round((b - a) * 1e3, 3)

    return Report(
        connections=config.connections,
        processes=processes,
        messages=config.total_messages(),
        pipeline=config.pipeline,
        rate=config.rate,
        opened=sum(r.opened for r in results),
        authenticated=authenticated,
        acked=acked,
        failed=sum(r.failed for r in results),
        errors=dict(errors),
        peak=max((r.peak for r in results if r.peak is not None), default=None),
        server_connections=max(
            (r.server_connections for r in results if r.server_connections is not None),
            default=None,
        ),
        connect_ms=ms(t0, t1),
        messages_ms=ms(min(started), t2) if went else None,
        quit_ms=ms(t2, t3),
        total_ms=ms(t0, t3),
        msg_per_s=round(acked / messages_s, 1) if messages_s > 0 else 0.0,
        latency_ms=percentiles(latencies),
        notes=notes,
        ok=not errors and authenticated == config.connections
        and acked == config.total_messages(),
    )


def format_table(report):
    """The human-readable report."""

    def num(value, unit=" ms"):
        return "-" if value is None else f"{value:.1f}{unit}"

    lat = "  ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in report.latency_ms.items())
    errors = ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())) or "none"
    peak = "-" if report.peak is None else report.peak
    at_server = "-" if report.server_connections is None else report.server_connections
    plural = "es" if report.processes > 1 else ""
    rows = [
        ("connections", f"{report.connections} ({report.processes} process{plural}), "
                        f"{report.authenticated} authenticated"),
        ("server", f"{at_server} connections open at the barrier "
                   f"(peak {peak} since server start)"),
        ("messages", f"{report.acked}/{report.messages} acked, "
                     + (f"open loop at {report.rate:g}/s" if report.rate
                        else f"pipeline {report.pipeline}")),
        ("errors", errors),
        ("connect+auth", num(report.connect_ms)),
        ("messages", f"{num(report.messages_ms)}  ({report.msg_per_s:.0f} msg/s)"),
        ("quit", num(report.quit_ms)),
        ("total", num(report.total_ms)),
        ("latency ms", lat),
    ]
    return "\n".join(f"{name:<14}{value}" for name, value in rows)


def ensure_open_files(connections):
    """Raise the soft RLIMIT_NOFILE toward the hard one; say why when it is not enough."""
    import resource

    needed = connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (ValueError, OSError):
        pass
    if soft >= needed:
        return None
    return (f"{connections} connections need {needed} open files but the limit is {soft} "
            f"(hard {hard}): raise it (ulimit -n) or split them with --processes")


class _ParentPipe:
    """A child's stdin: ``go`` passes the barrier, ``abort`` or EOF gives up."""

    def __init__(self, reactor, bench):
        self.reactor, self.bench = reactor, bench

    def fileno(self):
        return 0

    def doRead(self):
        data = os.read(0, 4096)
        if b"go" in data:
            self.bench.go()
        if not data or b"abort" in data:
            self.reactor.removeReader(self)
            self.bench.abort("stopped by the parent process")

    def connectionLost(self, reason):
        pass

    def logPrefix(self):
        return "bench-parent"


def run_local(config, child=False, progress=None):
    """Run one bench in this process's reactor; returns the RunResult."""
    from twisted.internet import reactor, task

    outcome = []

    def start():
        bench = Bench(config, reactor)
        if child:
            pipe = _ParentPipe(reactor, bench)
            bench.on_ready = lambda: os.write(1, b"ready\n")
            reactor.addReader(pipe)
        if progress is not None:
            total = config.total_messages()
            loop = task.LoopingCall(lambda: progress.write(
                f"\rbench: {bench.result.opened} open, {bench.result.authenticated} "
                f"authenticated, {bench.acked}/{total} acked "))
            loop.start(1.0, now=False)
        d = bench.start()
        d.addBoth(outcome.append)
        if child:
            d.addBoth(lambda _: reactor.removeReader(pipe))
        if progress is not None:
            d.addBoth(lambda _: (loop.stop(), progress.write("\n")))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise SystemExit("cserver-client: interrupted")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def _spawn_child():
    """A ``--processes`` child: ``python -m cserver.bench`` with pipes both ways."""
    return subprocess.Popen([sys.executable, "-m", "cserver.bench"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def run_processes(config, processes, spawn=_spawn_child, slack=30.0):
    """Split the run over child processes and join their barrier; returns their results.

    Before ``go``, children all silent for ``config.timeout + slack`` seconds are
    taken for hung and killed; after it, the parent waits for as long as the run
    takes (each child has its own watchdog).  Whatever happens here -- an exception,
    SIGTERM -- no child is left running: the ones still alive are killed and reaped.
    """
    configs = split(config, processes)
    children = []
    restore = _sigterm_exits()
    try:
        for c in configs:
            child = spawn()
            children.append(child)
            child.stdin.write(json.dumps(attrs.asdict(c)).encode() + b"\n")
            child.stdin.flush()
        return _join(config, configs, children, slack)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
            for pipe in (child.stdin, child.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        restore()


def _sigterm_exits():
    """Make SIGTERM raise SystemExit (so ``finally`` runs); returns the undo."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


def _join(config, configs, children, slack):
    """The parent's side of the barrier: ``ready`` from all, then ``go`` to all."""
    processes = len(children)
    results, ready = [None] * processes, set()
    buffers = [bytearray() for _ in range(processes)]
    selector = selectors.DefaultSelector()
    for i, child in enumerate(children):
        selector.register(child.stdout, selectors.EVENT_READ, i)

    def tell(i, word):
        try:
            children[i].stdin.write(word)
            children[i].stdin.flush()
        except OSError:
            pass

    def give_up():
        # One child cannot take part: the barrier cannot pass; release the ones
        # waiting at it (the others end alone).
        nonlocal aborted
        aborted = True
        for j in ready:
            if results[j] is None:
                tell(j, b"abort\n")

    aborted, went, open_pipes = False, False, processes
    with selector:
        while open_pipes:
            events = selector.select(None if went else config.timeout + slack)
            if not events:
                for child in children:
                    child.kill()
                break
            for key, _ in events:
                i = key.data
                chunk = os.read(key.fileobj.fileno(), 1 << 20)
                if not chunk:
                    selector.unregister(key.fileobj)
                    open_pipes -= 1
                    if results[i] is None and not went and not aborted:
                        give_up()  # it exited without a report before the barrier
                    continue
                buffer = buffers[i]
                buffer += chunk
                end = buffer.rfind(b"\n")
                if end < 0:
                    continue
                lines = bytes(buffer[:end]).split(b"\n")
                del buffer[:end + 1]
                for line in lines:
                    if line == b"ready":
                        ready.add(i)
                        if aborted:
                            tell(i, b"abort\n")
                        elif len(ready) == processes:
                            went = True
                            for j in ready:
                                tell(j, b"go\n")
                    elif line.startswith(b"{"):
                        results[i] = RunResult(**json.loads(line))
                        if i not in ready and not aborted:
                            give_up()
    for i, child in enumerate(children):
        status = child.wait()
        if results[i] is None:
            results[i] = RunResult(
                requested=configs[i].connections, failed=configs[i].connections,
                errors={"process": 1},
                notes=[f"client process {i} exited with status {status} and no report"])
    return results


def child_main():
    """A ``--processes`` child: config on stdin, ``ready``/``go`` handshake, JSON result."""
    data = b""
    while b"\n" not in data:
        chunk = os.read(0, 65536)
        if not chunk:
            return 2
        data += chunk
    config = BenchConfig(**json.loads(data.partition(b"\n")[0]))
    problem = ensure_open_files(config.connections)
    if problem:
        result = RunResult(requested=config.connections, failed=config.connections,
                           errors={"limit": config.connections}, notes=[problem])
    else:
        result = run_local(config, child=True)
    os.write(1, json.dumps(attrs.asdict(result)).encode() + b"\n")
    return 0


def _number(kind, low):
    def parse(text):
        value = kind(text)
        if value < low:
            raise ValueError(text)
        return value

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser):
    """The ``bench`` options (the connection options come from cserver.client)."""
    add = parser.add_argument
    add("-c", "--connections", type=_number(int, 1), default=1000,
        help="concurrent sessions (%(default)s)")
    add("-n", "--messages", type=_number(int, 0), default=1,
        help="MSGs per session, closed loop (%(default)s)")
    add("-d", "--pipeline", type=_number(int, 1), default=1,
        help="MSGs in flight per session (%(default)s)")
    add("--text", default="bench",
        help="message text; each MSG carries TEXT CONNECTION NUMBER, so all differ")
    add("--rate", type=_number(float, 1e-9),
        help="open loop: R MSGs per second in all, on a fixed schedule; latency is "
        "measured from the intended send time")
    add("--duration", type=_number(float, 1e-9), default=10.0,
        help="open loop length in seconds (%(default)s)")
    add("-P", "--processes", type=_number(int, 1), default=1,
        help="split the sessions over P client processes (%(default)s)")
    add("--timeout", type=_number(float, 1e-9), default=60.0,
        help="give up after this many seconds without progress (%(default)s)")
    add("--json", action="store_true", help="print the report as one JSON object")


def config_from_args(args):
    return BenchConfig(
        endpoint=endpoint_description(args.host, args.port, args.endpoint),
        user=args.user, password=args.password, connections=args.connections,
        messages=args.messages, pipeline=args.pipeline, text=args.text,
        rate=args.rate, duration=args.duration, timeout=args.timeout,
    )


def main(args, stdout=None, stderr=None):
    """``cserver-client bench``: run, print the report; returns the exit status."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    config = config_from_args(args)
    if "\n" in config.text or "\r" in config.text:
        stderr.write("cserver-client: --text must not contain a line break\n")
        return 2
    if args.processes > config.connections:
        stderr.write("cserver-client: more --processes than --connections\n")
        return 2
    if args.processes > 1:
        results = run_processes(config, args.processes)
    else:
        problem = ensure_open_files(config.connections)
        if problem:
            results = [RunResult(requested=config.connections, failed=config.connections,
                                 errors={"limit": config.connections}, notes=[problem])]
        else:
            tty = not args.json and stdout.isatty()
            results = [run_local(config, progress=stderr if tty else None)]
    report = make_report(config, results, args.processes)
    for note in report.notes:
        stderr.write(f"cserver-client: {note}\n")
    if args.json:
        stdout.write(json.dumps(attrs.asdict(report)) + "\n")
    else:
        stdout.write(format_table(report) + "\n")
    stdout.flush()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(child_main())
