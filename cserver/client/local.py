"""Running one bench in this process: one job, the process-level setup around a
:class:`~cserver.client.bench.Bench` -- the open-file limit it needs, the global
reactor it runs in, the progress line on a terminal.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import IO, Any

from twisted.internet import task
from twisted.python.failure import Failure

from cserver.client.bench import Bench, BenchConfig, RunResult
from cserver.client.retry_bench import RetryReport, run_retrying

#: Open files a bench process needs beyond one per connection.
SPARE_FILES = 64


def ensure_open_files(connections: int) -> str | None:
    """Raise the soft ``RLIMIT_NOFILE`` toward the hard one, as far as ``connections``
    connections need.

    :returns: ``None`` when the limit is enough, else a note saying why not and what
        to do about it.
    """
    needed = connections + SPARE_FILES
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


def too_few_files(config: BenchConfig, note: str) -> RunResult:
    """The result of a run the open-file limit kept from starting.

    :param note: what :func:`ensure_open_files` said.
    """
    return RunResult.not_run(config.connections, {"limit": config.connections}, note)


def run_local(config: BenchConfig, progress: IO[str] | None = None,
              attach: Callable[[Any, Bench], Callable[[], object]] | None = None) -> RunResult:
    """Run one bench in the global reactor, which this starts and stops.

    :param config: what to run.
    :param progress: where to rewrite a progress line every second (a terminal).
    :param attach: called with the reactor and the :class:`Bench` before it starts;
        what it returns is called once the run has ended (a ``--processes`` child
        hooks its parent's pipe up this way).
    :returns: the run's result.
    :raises SystemExit: when the reactor stopped before the run ended.
    """
    from twisted.internet import reactor

    outcome: list[RunResult | Failure] = []

    def end_progress(_: object, loop: task.LoopingCall, progress: IO[str]) -> None:
        loop.stop()
        progress.write("\n")

    def start() -> None:
        bench = Bench(config, reactor)
        detach = attach(reactor, bench) if attach is not None else None
        if progress is not None:
            total = config.total_messages()
            loop = task.LoopingCall(lambda: progress.write(
                f"\rbench: {bench.result.opened} open, {bench.result.authenticated} "
                f"authenticated, {bench.acked}/{total} acked "))
            loop.start(1.0, now=False)
        d = bench.start()
        d.addBoth(outcome.append)
        if detach is not None:
            d.addBoth(lambda _: detach())
        if progress is not None:
            d.addBoth(end_progress, loop, progress)
        d.addBoth(lambda _: reactor.stop())

    return _run_reactor_until(start, outcome)


def run_retrying_local(config: BenchConfig) -> RetryReport:
    """:func:`~cserver.client.retry_bench.run_retrying` in the global reactor, which
    this starts and stops.

    :raises SystemExit: when the reactor stopped before the run ended.
    """
    from twisted.internet import reactor

    outcome: list[RetryReport | Failure] = []

    def start() -> None:
        d = run_retrying(reactor, config)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    return _run_reactor_until(start, outcome)


def _run_reactor_until(start: Callable[[], None], outcome: list[Any]) -> Any:
    """Run the global reactor, ``start`` called once it runs, until something
    stops it; then the one result ``start`` put in ``outcome`` (a Failure is
    raised).

    :raises SystemExit: when the reactor stopped with nothing in ``outcome``.
    """
    from twisted.internet import reactor

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise SystemExit("cserver-client: interrupted")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]
