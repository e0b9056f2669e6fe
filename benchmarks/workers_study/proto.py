"""Prototype of ``--workers N`` designs A, B and C for the design study in
docs/workers-design.rst.  Not part of cserver: measurement scaffolding only.

Run from the repository root (bench.py and matrix.sh start it this way)::

    python benchmarks/workers_study/proto.py parent --design A|B|C --workers N \
        --port P --journal PATH [--share adopt|reuseport] [--users bench]

It prints ``parent ready pids=W1,W2,...`` once the workers are spawned, writes
the workers' counters to ``PATH.counters`` every 0.5 s, and stops on SIGTERM.
The ``worker`` role is only started by the parent.  ``PROTO_ACCEPTS=N`` in the
environment caps Twisted's accepts per wake-up in each worker.

The parent listens (or makes N SO_REUSEPORT sockets), makes a memfd of
counters, and spawns N workers (reactor.spawnProcess, childFDs) that adopt
the listening socket (adoptStreamPort) and run cserver's own factory and
protocol over a journal of the chosen design:

A  one writer: a worker sends each reactor turn's records (without seq) to
   the parent over a socketpair; the parent numbers them, writes all workers'
   batches of one turn in one write(2), fdatasyncs in a SyncThread, and sends
   back (first_seq, count) per batch; the worker then acks.
B  shared append: a worker takes flock on the journal, reads last_seq/end
   from a shared header (memfd mmap), repairs a half-written batch of a dead
   holder (busy flag -> ftruncate to end), pwrites its batch, publishes the
   new end, unlocks, and fdatasyncs in its own SyncThread before acking.
C  B + shared synced_end: a sync thread skips fdatasync when another process
   already synced past its end, and waits briefly for a sync in flight that
   started after its write.
"""
import argparse
import ctypes
import fcntl
import mmap
import os
import signal
import socket
import struct
import sys
import time
from collections import deque

from twisted.internet import protocol

# The checkout this file is in comes first, for the workers too (they run this file).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

# Shared header (bytes 0..63): last_seq, end, busy, synced_end, sync_started_end.
HDR = struct.Struct("=qqqqq")
# Per-worker counter slots from byte 64: connections, served, peak, pid.
SLOT = struct.Struct("=qqqq")
SLOT0 = 64
SHM_SIZE = 4096

REQ = struct.Struct("=II")  # nbytes, count
REP = struct.Struct("=qI")  # first_seq, count


# -- worker-side journals -------------------------------------------------------------

class TailJournal:
    """Takes cserver journal events; formats each record without its seq."""

    def __init__(self, clock):
        from cserver.recovery import Recovery
        self.recovery = Recovery()
        self.last_seq = 0
        self.broken = None
        self._clock = clock
        self._pid = os.getpid()
        self._tails = []
        self._acks = []
        self._call = None
        from json.encoder import encode_basestring
        self._q = encode_basestring

    def __call__(self, event):
        kind = event.get("cserver_event")
        if kind is None:
            return
        q = self._q
        if kind == "message":
            tail = (f'"time":{event["log_time"]!r},"event":"message","pid":{self._pid},'
                    f'"user":{q(event["user"])},"text":{q(event["text"])},'
                    f'"peer":{q(event["peer"])}}}\n').encode()
        else:
            tail = f'"time":{event["log_time"]!r},"event":"{kind}","pid":{self._pid}}}\n'.encode()
        self._tails.append(tail)
        self._acks.append(event.get("cserver_ack"))
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if not self._tails:
            return
        tails, acks = self._tails, self._acks
        self._tails, self._acks = [], []
        self._commit(tails, acks)

    def close(self):
        self.flush()


def _ack_all(acks, first):
    seq = first
    for ack in acks:
        if ack is not None:
            ack(seq, None)
        seq += 1


class PipeJournal(TailJournal):
    """Design A, worker side."""

    def __init__(self, clock, transport_holder):
        super().__init__(clock)
        self._pending = deque()
        self._holder = transport_holder

    def _commit(self, tails, acks):
        data = b"".join(tails)
        self._pending.append(acks)
        self._holder.transport.write(REQ.pack(len(data), len(tails)) + data)

    def replied(self, first, count):
        acks = self._pending.popleft()
        assert len(acks) == count
        _ack_all(acks, first)


class ParentLink(protocol.Protocol):
    """Worker's end of the socketpair to the parent (design A)."""

    journal = None

    def __init__(self):
        self._buf = b""

    def dataReceived(self, data):
        buf = self._buf + data
        n = len(buf) // REP.size * REP.size
        for off in range(0, n, REP.size):
            first, count = REP.unpack_from(buf, off)
            self.journal.replied(first, count)
        self._buf = buf[n:]

    def connectionLost(self, reason):
        # The parent is gone: a worker never outlives it.
        os._exit(3)


class SharedJournal(TailJournal):
    """Designs B and C, worker side."""

    def __init__(self, clock, fd, shm, syncer, leader=False):
        super().__init__(clock)
        self._fd = fd
        self._shm = shm
        self._unsynced = deque()  # (last_seq, end, first, acks)
        self.leader = leader
        self._written_end = 0
        self.lock_wait = 0.0
        syncer.bind(self._sync, self._durable, self._failed)
        self._syncer = syncer

    def _commit(self, tails, acks):
        fd, shm = self._fd, self._shm
        t0 = time.perf_counter()
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.lock_wait += time.perf_counter() - t0
        try:
            last, end, busy, synced, started = HDR.unpack_from(shm, 0)
            if busy:
                # A holder died mid-write: cut its half batch off.
                os.ftruncate(fd, end)
            first = last + 1
            data = b"".join([b'{"seq":%d,' % (first + i) + t for i, t in enumerate(tails)])
            HDR.pack_into(shm, 0, last, end, 1, synced, started)
            view = memoryview(data)
            off = end
            while view:
                n = os.pwrite(fd, view, off)
                view = view[n:]
                off += n
            last = first + len(tails) - 1
            HDR.pack_into(shm, 0, last, off, 0, synced, started)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._written_end = off
        self._unsynced.append((last, off, first, acks))
        self._syncer.request(last)

    # called in the sync thread
    def _sync(self):
        target = self._written_end
        shm = self._shm
        if self.leader:
            deadline = time.monotonic() + 0.05
            while True:
                synced, started = struct.unpack_from("=qq", shm, 24)
                if synced >= target:
                    return
                if started < target or time.monotonic() > deadline:
                    break
                time.sleep(0.0002)  # a sync covering us is in flight
            end = struct.unpack_from("=q", shm, 8)[0]
            struct.pack_into("=q", shm, 32, end)
            os.fdatasync(self._fd)
            if struct.unpack_from("=q", shm, 24)[0] < end:
                struct.pack_into("=q", shm, 24, end)
        else:
            os.fdatasync(self._fd)

    def _durable(self, seq):
        u = self._unsynced
        while u and u[0][0] <= seq:
            _last, _end, first, acks = u.popleft()
            _ack_all(acks, first)

    def _failed(self, seq, error):
        os._exit(4)


class WorkerCounters:
    def __init__(self, shm, index):
        self.shm, self.off = shm, SLOT0 + index * SLOT.size

    def write(self, factory):
        SLOT.pack_into(self.shm, self.off, factory.connections, factory.served, factory.peak,
                       os.getpid())


# -- parent side of design A ------------------------------------------------------------

class WriterState:
    def __init__(self, reactor, fd):
        from cserver.journal import SyncThread
        self.reactor = reactor
        self.fd = fd
        self.last_seq = 0
        self.lines = []
        self.batches = []  # (link, first, count) of this turn
        self.unsynced = deque()  # (last_seq, [(link, first, count)])
        self.call = None
        self.sync = SyncThread(reactor.callFromThread)
        self.sync.bind(lambda: os.fdatasync(fd), self.durable, self.failed)

    def take(self, link, payload, count):
        first = self.last_seq + 1
        tails = payload.split(b"\n")
        tails.pop()
        self.lines.extend([b'{"seq":%d,' % (first + i) + t + b"\n" for i, t in enumerate(tails)])
        self.last_seq = first + count - 1
        self.batches.append((link, first, count))
        if self.call is None:
            self.call = self.reactor.callLater(0, self.flush)

    def flush(self):
        self.call = None
        data = b"".join(self.lines)
        self.lines = []
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.unsynced.append((self.last_seq, self.batches))
        self.batches = []
        self.sync.request(self.last_seq)

    def durable(self, seq):
        out = {}
        while self.unsynced and self.unsynced[0][0] <= seq:
            for link, first, count in self.unsynced.popleft()[1]:
                out.setdefault(link, []).append(REP.pack(first, count))
        for link, parts in out.items():
            link.transport.write(b"".join(parts))

    def failed(self, seq, error):
        print("parent: fdatasync failed", error, file=sys.stderr)
        os._exit(5)


class WorkerLink(protocol.Protocol):
    def __init__(self, state):
        self.state = state
        self.buf = b""

    def dataReceived(self, data):
        buf = self.buf + data if self.buf else data
        off = 0
        n = len(buf)
        while n - off >= REQ.size:
            size, count = REQ.unpack_from(buf, off)
            if n - off - REQ.size < size:
                break
            start = off + REQ.size
            self.state.take(self, buf[start:start + size], count)
            off = start + size
        self.buf = buf[off:]

    def connectionLost(self, reason):
        # A partial frame from a dead worker is dropped: never acked, never written.
        self.buf = b""


# -- processes ---------------------------------------------------------------------------

def listen_socket(port, reuseport):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(4096)
    s.setblocking(False)
    return s


class WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, index, exits):
        self.index = index
        self.exits = exits

    def processEnded(self, reason):
        self.exits.append((self.index, reason.value.exitCode, reason.value.signal))


def parent(args):
    from twisted.internet import reactor

    journal_fd = os.open(args.journal, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    if args.design == "A":
        os.close(journal_fd)
        journal_fd = os.open(args.journal, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    memfd = os.memfd_create("cserver-counters", 0)
    os.ftruncate(memfd, SHM_SIZE)
    shm = mmap.mmap(memfd, SHM_SIZE)
    reuse = args.share == "reuseport"
    socks = [listen_socket(args.port, reuse) for _ in range(args.workers if reuse else 1)]
    state = WriterState(reactor, journal_fd) if args.design == "A" else None
    procs, exits, links = [], [], []
    for i in range(args.workers):
        lsock = socks[i if reuse else 0]
        fds = {0: "w", 1: 1, 2: 2, 3: lsock.fileno(), 4: memfd}
        if args.design == "A":
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            mine.setblocking(False)
            reactor.adoptStreamConnection(mine.fileno(), socket.AF_UNIX,
                                          _LinkFactory(state))
            links.append((mine, theirs))
            fds[5] = theirs.fileno()
        argv = [sys.executable, os.path.abspath(__file__), "worker", "--design", args.design,
                "--index", str(i), "--users", args.users, "--journal", args.journal]
        pp = WorkerProcess(i, exits)
        procs.append(reactor.spawnProcess(pp, sys.executable, argv, env=dict(os.environ),
                                          childFDs=fds))
    for _mine, theirs in links:
        theirs.close()
    # The parent keeps the listening socket(s) open (a restarted worker adopts them again).

    def report():
        per = []
        for i in range(args.workers):
            c, s, p, pid = SLOT.unpack_from(shm, SLOT0 + i * SLOT.size)
            per.append((pid, c, s, p))
        with open(args.journal + ".counters", "w") as f:
            f.write(repr(per) + "\n")

    def tick():
        report()
        reactor.callLater(0.5, tick)

    reactor.callLater(0.5, tick)

    def on_term(*_):
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, on_term)
    print("parent ready pids=" + ",".join(str(p.pid) for p in procs), flush=True)
    reactor.run()
    report()
    for p in procs:
        try:
            p.signalProcess("TERM")
        except Exception:
            pass
    deadline = time.monotonic() + 5
    for p in procs:
        while p.pid and time.monotonic() < deadline:
            try:
                os.kill(p.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)


class _LinkFactory(protocol.Factory):
    def __init__(self, state):
        self.state = state

    def buildProtocol(self, addr):
        return WorkerLink(self.state)


def worker(args):
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import reactor

    from cserver.auth import allow_list_portal
    from cserver.journal import SyncThread
    from cserver.server import CServerFactory

    _die_with_parent()

    shm = mmap.mmap(4, SHM_SIZE)
    if args.design == "A":
        link = ParentLink()
        journal = PipeJournal(reactor, link)
        link.journal = journal
        reactor.adoptStreamConnection(5, socket.AF_UNIX, _Single(link))
        os.close(5)
    else:
        # Its own open file description: flock through an fd inherited from the
        # parent would be shared with every other worker and exclude nobody.
        jfd = os.open(args.journal, os.O_RDWR | os.O_CLOEXEC)
        journal = SharedJournal(reactor, jfd, shm, SyncThread(reactor.callFromThread),
                                leader=(args.design == "C"))
    factory = CServerFactory(journal, allow_list_portal(args.users.split(",")), reactor)
    counters = WorkerCounters(shm, args.index)

    def tick():
        counters.write(factory)
        reactor.callLater(0.2, tick)

    tick()
    port = reactor.adoptStreamPort(3, socket.AF_INET, factory)
    os.close(3)
    accepts = int(os.environ.get("PROTO_ACCEPTS", "0"))
    if accepts:
        # Cap the accepts per wake-up (Twisted grows it from 100 by 20 when
        # the backlog is full), so the workers woken by one burst share it.
        do_read = port.doRead

        def capped_read():
            port.numberAccepts = accepts
            do_read()

        port.doRead = capped_read
    _tune()

    def on_term(*_):
        def stop():
            port.stopListening()
            counters.write(factory)
            reactor.stop()
        reactor.callFromThread(stop)

    signal.signal(signal.SIGTERM, on_term)
    reactor.run()
    counters.write(factory)


def _die_with_parent():
    """SIGTERM this process when its parent dies (PR_SET_PDEATHSIG), and exit now
    if the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(2)


def _tune():
    import gc
    gc.collect()
    gc.freeze()
    _t, mid, old = gc.get_threshold()
    gc.set_threshold(10000, mid, old)
    sys.setswitchinterval(0.0005)


class _Single(protocol.Factory):
    def __init__(self, p):
        self.p = p

    def buildProtocol(self, addr):
        return self.p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["parent", "worker"])
    ap.add_argument("--design", default="A")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--journal", required=True)
    ap.add_argument("--share", default="adopt")
    ap.add_argument("--users", default=os.environ.get("USER", "bench"))
    ap.add_argument("--index", type=int, default=0)
    args = ap.parse_args()
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.role == "parent":
        parent(args)
    else:
        worker(args)


if __name__ == "__main__":
    main()
