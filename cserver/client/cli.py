"""The ``cserver-client`` command line: one job, parsing it and dispatching to a
subcommand (``send``, ``stats``, ``bench``) of :mod:`cserver.client.commands`.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from twisted.internet import task

import cserver
from cserver.client.commands import SEND_EXIT_STATUS, run_bench, run_session
from cserver.client.protocol import DEFAULT_HOST, DEFAULT_PORT
from cserver.dedup import KEY

#: ``send`` and ``stats``'s ``--timeout``, in seconds.
DEFAULT_TIMEOUT = 30.0


def _checked(kind: Callable[[str], Any], accept: Callable[[Any], bool],
             name: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)``, refused unless ``accept`` takes it.

    :param name: what argparse calls the type in its errors (``invalid NAME value``).
    """
    def parse(text: str) -> Any:
        value = kind(text)
        if not accept(value):
            raise ValueError(text)
        return value

    parse.__name__ = name
    return parse


def _at_least(kind: type, low: float) -> Callable[[str], Any]:
    """An argparse ``type``: a ``kind`` no lower than ``low``."""
    return _checked(kind, lambda value: not value < low, kind.__name__)


_seconds = _checked(float, lambda value: value > 0, "_seconds")


def _message_text(text: str) -> str:
    """A ``send`` TEXT: one MSG line, so no line break (an argparse ``type``)."""
    if "\n" in text or "\r" in text:
        raise argparse.ArgumentTypeError(f"a message must not contain a line break: {text!r}")
    return text


def _key(text: str) -> str:
    """A ``send --key``: 1 to 128 letters, digits or ``._:@/+=-`` (an argparse ``type``)."""
    if not KEY.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"not a key: {text!r} (1 to 128 letters, digits or ._:@/+=-)")
    return text


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every subcommand shares: where the server is and who we are."""
    parser.add_argument("--host", default=DEFAULT_HOST, help="server address (%(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="server port (%(default)s)")
    parser.add_argument(
        "--endpoint",
        help="a Twisted client endpoint description, e.g. unix:path=/run/cserver.sock "
        "or tls:host=example.org:port=31337; overrides --host and --port",
    )
    parser.add_argument("--user", default=getpass.getuser(), help="user to AUTH as (%(default)s)")
    parser.add_argument("--password", help="password for AUTH (default: none sent)")


def add_timeout_argument(parser: argparse.ArgumentParser) -> None:
    """``--timeout`` for ``send`` and ``stats`` (bench has its own, a watchdog)."""
    parser.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT,
        help="give up when the connect, the greeting or any reply takes longer than "
        "this many seconds (%(default)s)")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` options (beside those of :func:`add_connection_arguments`)."""
    add = parser.add_argument
    add("-c", "--connections", type=_at_least(int, 1), default=1000,
        help="concurrent sessions (%(default)s)")
    add("-n", "--messages", type=_at_least(int, 0), default=1,
        help="MSGs per session, closed loop (%(default)s)")
    add("-d", "--pipeline", type=_at_least(int, 1), default=1,
        help="MSGs in flight per session (%(default)s)")
    add("--text", default="bench",
        help="message text; each MSG carries TEXT CONNECTION NUMBER, so all differ")
    add("--keyed", action="store_true",
        help="send keyed messages (PUT KEY TEXT, protocol 1.1), each with a new key, "
        "instead of MSGs")
    add("--retry", action="store_true",
        help="with --keyed: send every message until acknowledged, reconnecting and "
        "resending with its key after any failure (a server restart mid-run); the "
        "report counts the resends answered dup")
    add("--rate", type=_at_least(float, 1e-9),
        help="open loop: R MSGs per second in all, on a fixed schedule; latency is "
        "measured from the intended send time")
    add("--duration", type=_at_least(float, 1e-9), default=10.0,
        help="open loop length in seconds (%(default)s)")
    add("-P", "--processes", type=_at_least(int, 1), default=1,
        help="split the sessions over P client processes (%(default)s)")
    add("--timeout", type=_at_least(float, 1e-9), default=60.0,
        help="give up after this many seconds without progress (%(default)s)")
    add("--json", action="store_true", help="print the report as one JSON object")


def build_parser() -> argparse.ArgumentParser:
    """The ``cserver-client`` argument parser: a ``COMMAND`` is required."""
    parser = argparse.ArgumentParser(
        prog="cserver-client", description="Talk to a cserver: send, stats, bench.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {cserver.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    send = sub.add_parser(
        "send", help="send messages and print their seqs, one per line",
        description="Send each TEXT as one MSG, pipelined, and print the seq of each "
        "acknowledged one, one per line, in order; each message not acknowledged is "
        "named on stderr, refused (ERR) or with no reply.",
        epilog=SEND_EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_arguments(send)
    add_timeout_argument(send)
    send.add_argument("--key", action="append", default=None, metavar="KEY", type=_key,
                      help="send the TEXTs as keyed messages (PUT KEY TEXT, protocol "
                      "1.1), one --key per TEXT, in order: sent again with the same keys, "
                      "within the server's deduplication window, they are journaled once "
                      "(a duplicate prints its first seq, and says so on stderr)")
    send.add_argument("texts", nargs="+", type=_message_text, metavar="TEXT",
                      help="one message each")
    stats = sub.add_parser("stats", help="print the server's STATS as key=value lines")
    add_connection_arguments(stats)
    add_timeout_argument(stats)
    load = sub.add_parser(
        "bench", help="the load generator: N concurrent sessions",
        description="Open N sessions through one client factory, hold them at a barrier "
        "until all N are authenticated, then send every MSG, QUIT, and report phase "
        "times, msg/s and latency percentiles.")
    add_connection_arguments(load)
    add_bench_arguments(load)
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``cserver-client`` console script.

    :param argv: the arguments (default: ``sys.argv[1:]``).
    :raises SystemExit: always, with the subcommand's exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "send" and args.key is not None and len(args.key) != len(args.texts):
        parser.error(f"give one --key per TEXT: {len(args.key)} keys, {len(args.texts)} texts")
    if args.command == "bench":
        sys.exit(run_bench(args))

    def session(reactor: Any) -> Any:
        return run_session(reactor, args, sys.stdout).addCallback(_exit)

    task.react(session)


def _exit(code: int) -> None:
    """End :func:`~twisted.internet.task.react` with ``code`` (it exits 0 by itself)."""
    if code:
        raise SystemExit(code)
