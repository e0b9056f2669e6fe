"""``bench --processes P``: one job, splitting a run over P client processes and
joining their barrier.

The parent (:func:`run_processes`) starts each child with its share of the run
(:func:`split`) as one JSON line on its stdin; a child (:func:`child_main`)
opens its sessions, says ``ready`` on its stdout once they are all
authenticated, passes its barrier when the parent says ``go`` (sent once every
child is ready) or gives up at ``abort``, and ends with its
:class:`~cserver.client.bench.RunResult` as one JSON line.  A child runs as
``python -m cserver.client.child``.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import attrs

from cserver.client.bench import Bench, BenchConfig, RunResult
from cserver.client.local import ensure_open_files, run_local, too_few_files

#: What a child runs: this package's child entry point, in this Python.
CHILD_COMMAND = [sys.executable, "-m", "cserver.client.child"]


def split(config: BenchConfig, processes: int) -> list[BenchConfig]:
    """One config per client process: connections (and the rate) shared out evenly,
    the sessions numbered apart.

    With a ``rate`` each process also gets its share of the MSGs as an explicit
    ``total``; the shares add up to the whole run's count.
    """
    n = config.connections
    total = config.total_messages() if config.rate else 0
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


def _line(value: BenchConfig | RunResult) -> bytes:
    """``value`` as the one JSON line parent and children exchange."""
    return json.dumps(attrs.asdict(value)).encode() + b"\n"


def _write(child: subprocess.Popen[bytes], data: bytes) -> None:
    """Write ``data`` to ``child``'s stdin, now."""
    assert child.stdin is not None
    child.stdin.write(data)
    child.stdin.flush()


def _spawn_child() -> subprocess.Popen[bytes]:
    """A child process running :data:`CHILD_COMMAND`, with pipes both ways."""
    return subprocess.Popen(CHILD_COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def run_processes(config: BenchConfig, processes: int,
                  spawn: Callable[[], subprocess.Popen[bytes]] = _spawn_child,
                  slack: float = 30.0) -> list[RunResult]:
    """Split the run over child processes and join their barrier.

    Before ``go``, children all silent for ``config.timeout + slack`` seconds are
    taken for hung and killed; after it, the parent waits for as long as the run
    takes (each child has its own watchdog).  Whatever happens here -- an exception,
    SIGTERM -- no child is left running: the ones still alive are killed and reaped.

    :param config: the whole run.
    :param processes: how many children to split it over.
    :param spawn: starts one child.
    :returns: one result per child, in order.
    """
    configs = split(config, processes)
    children: list[subprocess.Popen[bytes]] = []
    restore = _sigterm_exits()
    try:
        for c in configs:
            child = spawn()
            children.append(child)
            _write(child, _line(c))
        return _join(config, configs, children, slack)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
            for pipe in (child.stdin, child.stdout):
                try:
                    if pipe is not None:
                        pipe.close()
                except OSError:
                    pass
        restore()


def _sigterm_exits() -> Callable[[], object]:
    """Make SIGTERM raise SystemExit (so ``finally`` runs); returns the undo."""
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


def _join(config: BenchConfig, configs: list[BenchConfig],
          children: list[subprocess.Popen[bytes]], slack: float) -> list[RunResult]:
    """The parent's side of the barrier: ``ready`` from all, then ``go`` to all."""
    processes = len(children)
    results: list[RunResult | None] = [None] * processes
    ready: set[int] = set()
    buffers = [bytearray() for _ in range(processes)]
    selector = selectors.DefaultSelector()
    for i, child in enumerate(children):
        selector.register(child.stdout, selectors.EVENT_READ, i)  # type: ignore[arg-type]

    aborted, went, open_pipes = False, False, processes

    def tell(i: int, word: bytes) -> None:
        try:
            _write(children[i], word)
        except OSError:
            pass

    def give_up() -> None:
        # One child cannot take part: the barrier cannot pass; release the ones
        # waiting at it (the others end alone).
        nonlocal aborted
        aborted = True
        for j in ready:
            if results[j] is None:
                tell(j, b"abort\n")

    with selector:
        while open_pipes:
            events = selector.select(None if went else config.timeout + slack)
            if not events:
                for child in children:
                    child.kill()
                break
            for key, _ in events:
                i = key.data
                chunk = os.read(key.fd, 1 << 20)
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
    joined = []
    for i, child in enumerate(children):
        status = child.wait()
        result = results[i]
        if result is None:
            result = RunResult.not_run(
                configs[i].connections, {"process": 1},
                f"client process {i} exited with status {status} and no report")
        joined.append(result)
    return joined


class _ParentPipe:
    """A child's stdin, read by its reactor: ``go`` passes the barrier, ``abort``
    or EOF gives up."""

    def __init__(self, reactor: Any, bench: Bench) -> None:
        self.reactor, self.bench = reactor, bench

    def fileno(self) -> int:
        return 0

    def doRead(self) -> None:
        data = os.read(0, 4096)
        if b"go" in data:
            self.bench.go()
        if not data or b"abort" in data:
            self.reactor.removeReader(self)
            self.bench.abort("stopped by the parent process")

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "bench-parent"


def _attach_parent(reactor: Any, bench: Bench) -> Callable[[], object]:
    """Hook ``bench`` up to the parent: ``ready`` on stdout at the barrier, the
    parent's words read from stdin; returns the unhooking."""
    pipe = _ParentPipe(reactor, bench)
    bench.on_ready = lambda: os.write(1, b"ready\n")
    reactor.addReader(pipe)
    return lambda: reactor.removeReader(pipe)


def child_main() -> int:
    """A ``--processes`` child: config on stdin, ``ready``/``go`` handshake, JSON result.

    :returns: the exit status: 0, or 2 when stdin ended before a config came.
    """
    data = b""
    while b"\n" not in data:
        chunk = os.read(0, 65536)
        if not chunk:
            return 2
        data += chunk
    config = BenchConfig(**json.loads(data.partition(b"\n")[0]))
    problem = ensure_open_files(config.connections)
    if problem:
        result = too_few_files(config, problem)
    else:
        result = run_local(config, attach=_attach_parent)
    os.write(1, _line(result))
    return 0
