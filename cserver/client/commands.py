"""What each ``cserver-client`` subcommand does once its arguments are parsed.

One job: run ``send``, ``stats`` (:func:`run_session`) or ``bench``
(:func:`run_bench`), print what it found and choose its exit status.

``cserver-client send TEXT...`` prints the seq of each acknowledged message, one per
line, in order, and names each other one on stderr.  Its exit status says what a
script may do next (see :data:`SEND_EXIT_STATUS`):

- 0: every message was acknowledged, so it is in the journal -- whatever then became
  of the QUIT (a server stopping gracefully closes the connection without answering
  it);
- 1: whatever is not printed is certainly not in the journal: the connection or AUTH
  failed before any message was sent, or the server refused (``ERR``) every message
  it did not acknowledge;
- 2: a usage error, nothing sent;
- 3: the fate of at least one message is unknown: the connection was lost, or the
  reply timed out, before its acknowledgement, so it may or may not be in the journal.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

import attrs
from twisted.internet import defer, error
from twisted.python.failure import Failure

from cserver.client.bench import BenchConfig
from cserver.client.local import (
    ensure_open_files,
    run_local,
    run_retrying_local,
    too_few_files,
)
from cserver.client.processes import run_processes
from cserver.client.protocol import (
    CserverClientProtocol,
    ServerError,
    connect,
    endpoint_description,
    within,
)
from cserver.client.report import format_table, make_report

#: ``send``'s exit statuses beyond 0 (all acknowledged) and 2 (usage error).
EXIT_NOT_JOURNALED = 1
EXIT_FATE_UNKNOWN = 3
EXIT_USAGE = 2

SEND_EXIT_STATUS = """\
exit status:
  0  every message was acknowledged and its seq printed (whatever then became of
     the QUIT)
  1  nothing that is not printed is in the journal: the connection or AUTH failed
     before any message was sent, or the server refused (ERR) each message it did
     not acknowledge
  2  usage error; nothing was sent
  3  the fate of at least one message is unknown: the connection was lost or timed
     out before its acknowledgement, so it may or may not be in the journal (look
     before sending it again)
"""

#: How much of a message's text ``send`` quotes when it names one on stderr.
CLIP = 40

Timed = Callable[[defer.Deferred[Any]], defer.Deferred[Any]]


def complain(line: str, stderr: IO[str] | None = None) -> None:
    """Say ``cserver-client: <line>`` on ``stderr`` (default: :data:`sys.stderr`)."""
    (stderr or sys.stderr).write(f"cserver-client: {line}\n")


@defer.inlineCallbacks
def run_session(reactor: Any, args: argparse.Namespace, out: IO[str]) -> Any:
    """``send`` or ``stats``, as ``args.command`` says.

    :param reactor: connects and times out.
    :param args: parsed by :func:`cserver.client.cli.build_parser`.
    :param out: where the seqs or the stats go.
    :returns: a Deferred firing with the exit status (for ``send``, see
        :data:`SEND_EXIT_STATUS`).
    """
    description = endpoint_description(args.host, args.port, args.endpoint)
    timeout = args.timeout

    def timed(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        return within(d, timeout, reactor)

    try:
        client = yield connect(reactor, description, args.user, args.password,
                               timeout=timeout)
    except Exception as e:
        complain(_reason(e, timeout))
        return EXIT_NOT_JOURNALED
    if args.command == "send":
        code = yield send_messages(client, args.texts, timed, out, timeout, keys=args.key)
    else:
        code = yield print_stats(client, timed, out, timeout)
    if code == EXIT_FATE_UNKNOWN:
        client.close()  # it has stopped answering, or is gone
    else:
        yield _quit(client, timed)
    return code


@defer.inlineCallbacks
def send_messages(client: CserverClientProtocol, texts: Sequence[str], timed: Timed,
                  out: IO[str], timeout: float, keys: Sequence[str] | None = None) -> Any:
    """Pipeline one MSG per text (with ``keys``, one PUT per text and key); print the
    seq of each acknowledged one to ``out``, in order, and name each other one on
    stderr -- and each duplicate, a keyed message the server had already.

    :param timed: applies the timeout to a reply's Deferred.
    :param timeout: in seconds, as ``timed`` applies it (for the complaints).
    :returns: a Deferred firing with the exit status: 0 when all were acknowledged,
        else :data:`EXIT_FATE_UNKNOWN` when one got no reply, else
        :data:`EXIT_NOT_JOURNALED`.
    """
    sends = [timed(client.send(text, None if keys is None else keys[index]))
             for index, text in enumerate(texts)]
    results = yield defer.DeferredList(sends, consumeErrors=True)
    code = 0
    for position, (text, (acked, result)) in enumerate(zip(texts, results, strict=True), 1):
        if acked:
            out.write(f"{result}\n")
            if result.dup:
                complain(f"message {position} of {len(texts)} {_clip(text)!r}: journaled "
                         f"before, at seq {result} (a duplicate: journaled once)")
            continue
        problem, status = _unacknowledged(result.value, timeout)
        complain(f"message {position} of {len(texts)} {_clip(text)!r}: {problem}")
        code = max(code, status)
    return code


@defer.inlineCallbacks
def print_stats(client: CserverClientProtocol, timed: Timed, out: IO[str],
                timeout: float) -> Any:
    """Print the STATS reply to ``out`` as ``key=value`` lines.

    :returns: a Deferred firing with the exit status: 0, or 1 (said on stderr) when
        there is no reply.
    """
    try:
        stats = yield timed(client.stats())
    except Exception as e:
        complain(_reason(e, timeout))
        client.close()
        return 1
    for key, value in stats.items():
        out.write(f"{key}={value}\n")
    return 0


@defer.inlineCallbacks
def _quit(client: CserverClientProtocol, timed: Timed) -> Any:
    """Say QUIT and wait for the goodbye; by then every answer that matters is in, so
    nothing that becomes of it -- an ERR, a close instead of an answer (a server
    stopping gracefully), a timeout -- changes the outcome."""
    try:
        yield timed(client.quit())
    except Exception:
        pass
    client.close()


def _unacknowledged(reason: BaseException, timeout: float) -> tuple[str, int]:
    """Why a MSG got no OK, for stderr, and the exit status that calls for."""
    if isinstance(reason, ServerError):
        return f"refused by the server (not journaled): {reason}", EXIT_NOT_JOURNALED
    if _timed_out(reason):
        cause = f"timed out after {timeout:g} s"
    else:
        cause = "the connection was lost"
    return (f"no reply: {cause} before its acknowledgement "
            "(it may or may not be in the journal)"), EXIT_FATE_UNKNOWN


def _timed_out(reason: BaseException) -> bool:
    return isinstance(reason, (defer.TimeoutError, defer.CancelledError, error.TimeoutError))


def _reason(reason: BaseException, timeout: float) -> str:
    """One line on why the session failed."""
    if _timed_out(reason):
        return f"no answer from the server within {timeout:g} s"
    return _describe(reason)


def _describe(reason: BaseException | Failure) -> str:
    """One line on an error: its message, else its type's name."""
    if isinstance(reason, Failure):
        reason = reason.value
    return str(reason) or type(reason).__name__


def _clip(text: str, width: int = CLIP) -> str:
    """``text``, cut to ``width`` characters (ending in ``...``) when longer."""
    return text if len(text) <= width else text[:width - 3] + "..."


def bench_config(args: argparse.Namespace) -> BenchConfig:
    """The :class:`~cserver.client.bench.BenchConfig` the ``bench`` arguments ask for."""
    return BenchConfig(
        endpoint=endpoint_description(args.host, args.port, args.endpoint),
        user=args.user, password=args.password, connections=args.connections,
        messages=args.messages, pipeline=args.pipeline, text=args.text,
        rate=args.rate, duration=args.duration, timeout=args.timeout, keyed=args.keyed,
    )


def _run_retrying(args: argparse.Namespace, config: BenchConfig, stdout: IO[str],
                  stderr: IO[str]) -> int:
    """``bench --keyed --retry``: one process of RetryingSenders; its report."""
    if not config.keyed:
        complain("--retry needs --keyed: only keyed messages can be sent again safely", stderr)
        return EXIT_USAGE
    if args.processes > 1 or config.rate:
        complain("--retry runs in one process, closed loop (no --processes, no --rate)",
                 stderr)
        return EXIT_USAGE
    problem = ensure_open_files(config.connections)
    if problem:
        complain(problem, stderr)
        return 1
    report = run_retrying_local(config)
    for failure in report.failed[:10]:
        complain(f"refused for good: {failure}", stderr)
    fields = attrs.asdict(report)
    del fields["seqs"]
    if args.json:
        stdout.write(json.dumps(fields) + "\n")
    else:
        stdout.write(" ".join(f"{key}={value}" for key, value in fields.items()
                              if key != "failed") + "\n")
    stdout.flush()
    return 0 if report.ok else 1


def run_bench(args: argparse.Namespace, stdout: IO[str] | None = None,
              stderr: IO[str] | None = None) -> int:
    """``cserver-client bench``: run it, print the report.

    :param args: parsed by :func:`cserver.client.cli.build_parser`.
    :returns: the exit status: 0 when the report is ok, 1 when not, 2 for a usage
        error.
    """
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    config = bench_config(args)
    if "\n" in config.text or "\r" in config.text:
        complain("--text must not contain a line break", stderr)
        return EXIT_USAGE
    if args.processes > config.connections:
        complain("more --processes than --connections", stderr)
        return EXIT_USAGE
    if args.retry:
        return _run_retrying(args, config, stdout, stderr)
    if args.processes > 1:
        results = run_processes(config, args.processes)
    else:
        problem = ensure_open_files(config.connections)
        if problem:
            results = [too_few_files(config, problem)]
        else:
            tty = not args.json and stdout.isatty()
            results = [run_local(config, progress=stderr if tty else None)]
    report = make_report(config, results, args.processes)
    for note in report.notes:
        complain(note, stderr)
    if args.json:
        stdout.write(json.dumps(attrs.asdict(report)) + "\n")
    else:
        stdout.write(format_table(report) + "\n")
    stdout.flush()
    return 0 if report.ok else 1
