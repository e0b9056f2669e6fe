"""The cserver client: the wire protocol v1 seen from the client side, and ``cserver-client``.

One job: speak protocol v1 to a server from Python code -- wait for the greeting,
``auth``, ``send``, ``stats``, ``quit`` -- with pipelining (replies are matched to
requests in order) and an exception carrying the code of every ``ERR`` reply.  The
``cserver-client`` command line (``send``, ``stats``, ``bench``) lives here too; the
load generator behind ``bench`` is in :mod:`cserver.bench`.

    d = connect(reactor, "tcp:host=127.0.0.1:port=31337", "alice")
    d.addCallback(lambda client: client.send("hello"))   # fires with the seq

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

import argparse
import getpass
import sys
from collections import deque

from twisted.internet import defer, error
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 31337
DEFAULT_TIMEOUT = 30.0

#: ``send``'s exit statuses beyond 0 (all acknowledged) and 2 (usage error).
EXIT_NOT_JOURNALED = 1
EXIT_FATE_UNKNOWN = 3

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


class ServerError(Exception):
    """The server answered ``ERR <code>[ <text>]``.

    ``code`` is the word after ERR (``auth``, ``noauth``, ``busy``, ``unavailable``,
    ``syntax``, ``state``, ``unknown``, ``toolong``, ``encoding``, ``timeout``);
    ``text`` is the rest of the line, possibly empty.
    """

    def __init__(self, code, text=""):
        super().__init__(code, text)
        self.code = code
        self.text = text

    def __str__(self):
        return f"ERR {self.code} {self.text}".rstrip()


class UnexpectedReplyError(Exception):
    """The server sent a line that protocol v1 does not allow at that point."""


def parse_reply(line):
    """Split one reply line (``str``, no line end) into ``(ok, data)``.

    ``OK[ <data>]`` gives ``(True, data)``; ``ERR <code>[ <text>]`` gives
    ``(False, ServerError)``; anything else raises :class:`UnexpectedReplyError`.
    """
    verb, _, rest = line.partition(" ")
    if verb == "OK":
        return True, rest
    if verb == "ERR":
        code, _, text = rest.partition(" ")
        return False, ServerError(code or "unknown", text)
    raise UnexpectedReplyError(f"unexpected reply line: {line!r}")


def parse_stats(data):
    """Turn the data of a STATS reply (``key=value key=value ...``) into a dict.

    Integer values become ``int``; other values stay ``str``.  A word without
    ``=`` is ignored.
    """
    stats = {}
    for word in data.split():
        key, sep, value = word.partition("=")
        if not sep:
            continue
        try:
            stats[key] = int(value)
        except ValueError:
            stats[key] = value
    return stats


def _check_text(text, what):
    if "\n" in text or "\r" in text:
        raise ValueError(f"{what} must not contain a line break")
    return text.encode("utf-8")


class CserverClientProtocol(LineReceiver):
    """One client session: requests go out as lines, replies fire Deferreds in order.

    ``greeted`` fires with the server's version once ``HELLO cserver <version>``
    arrives (or fails with :class:`ServerError` ``busy``).  Each request method
    returns a Deferred; any number may be outstanding at once.  When the
    connection is lost, every outstanding Deferred fails with the reason.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20
    log = Logger()

    def __init__(self):
        self.greeted = defer.Deferred(self._drop)
        self.closed = defer.Deferred()
        self.server_version = None
        self.user = None
        self._pending = deque()
        self._lost = None

    def lineReceived(self, line):
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if not self.greeted.called:
            self._greeting(text)
            return
        try:
            ok, data = parse_reply(text)
        except UnexpectedReplyError as e:
            self.log.warn("dropping the connection: {error}", error=e)
            self.transport.loseConnection()
            return
        if not self._pending:
            self.log.info("reply to no request: {line}", line=text)
            return
        d, convert = self._pending.popleft()
        if d.called:
            return  # cancelled (timed out): its reply still holds its place in the order
        if ok:
            d.callback(convert(data) if convert else data)
        else:
            d.errback(data)

    def _greeting(self, text):
        if text.startswith("HELLO "):
            self.server_version = text.rpartition(" ")[2]
            self.greeted.callback(self.server_version)
            return
        try:
            _, error = parse_reply(text)
        except UnexpectedReplyError as e:
            error = e
        if not isinstance(error, ServerError):
            error = UnexpectedReplyError(f"expected HELLO, got {text!r}")
        self.greeted.errback(error)
        self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self.transport.loseConnection()

    def _drop(self, _cancelled):
        """Cancelling ``greeted`` (a connect timeout) gives up on the connection."""
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason=None):
        self._lost = reason
        if not self.greeted.called:
            self.greeted.errback(reason)
        pending, self._pending = self._pending, deque()
        for d, _ in pending:
            d.errback(reason)
        self.closed.callback(None)

    def request(self, line, convert=None):
        """Send one request line (``str``); the Deferred fires with the OK data.

        Cancelling the Deferred (e.g. through ``addTimeout``) fails it at once; the
        reply, when it comes, is dropped so that later replies still match.
        """
        if self._lost is not None:
            return defer.fail(self._lost)
        data = _check_text(line, "a request") + b"\n"
        d = defer.Deferred()
        self._pending.append((d, convert))
        self.transport.write(data)
        return d

    def auth(self, user, password=None):
        """``AUTH user[ password]``; fires with the user name the server confirms."""
        line = f"AUTH {user}" if password is None else f"AUTH {user} {password}"
        d = self.request(line)

        def authenticated(name):
            self.user = name
            return name

        return d.addCallback(authenticated)

    def send(self, text):
        """``MSG text``; fires with the message's seq (``int``) once it is durable."""
        return self.request("MSG " + text, int)

    def stats(self):
        """``STATS``; fires with a dict (see :func:`parse_stats`)."""
        return self.request("STATS", parse_stats)

    def quit(self):
        """``QUIT``; fires with ``"bye"`` when the server says goodbye."""
        return self.request("QUIT")


class CserverClientFactory(Factory):
    """Builds :class:`CserverClientProtocol` sessions for an endpoint."""

    protocol = CserverClientProtocol


def endpoint_description(host=DEFAULT_HOST, port=DEFAULT_PORT, endpoint=None):
    """The clientFromString description: ``endpoint`` if given, else tcp to host:port."""
    if endpoint:
        return endpoint
    return f"tcp:host={host}:port={port}"


def _within(d, timeout, reactor):
    """``d`` with ``addTimeout(timeout)`` unless ``timeout`` is None."""
    return d if timeout is None else d.addTimeout(timeout, reactor)


@defer.inlineCallbacks
def connect(reactor, description, user, password=None, factory=None, timeout=None):
    """Connect to ``description`` (a clientFromString string or an endpoint), wait for
    the greeting and authenticate; fires with the ready :class:`CserverClientProtocol`.

    With ``timeout`` (seconds), the connect, the greeting and the AUTH reply each
    fail with :class:`twisted.internet.defer.TimeoutError` when they take longer.
    """
    if isinstance(description, str):
        description = clientFromString(reactor, description)
    connecting = description.connect(factory or CserverClientFactory())
    client = yield _within(connecting, timeout, reactor)
    try:
        yield _within(client.greeted, timeout, reactor)
        yield _within(client.auth(user, password), timeout, reactor)
    except BaseException:
        client.transport.loseConnection()
        raise
    return client


def add_connection_arguments(parser):
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


def _seconds(text):
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def add_timeout_argument(parser):
    """``--timeout`` for ``send`` and ``stats`` (bench has its own, a watchdog)."""
    parser.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT,
        help="give up when the connect, the greeting or any reply takes longer than "
        "this many seconds (%(default)s)")


def _message_text(text):
    """A ``send`` TEXT: one MSG line, so no line break (argparse type)."""
    if "\n" in text or "\r" in text:
        raise argparse.ArgumentTypeError(f"a message must not contain a line break: {text!r}")
    return text


def build_parser():
    """The ``cserver-client`` argument parser."""
    import cserver
    from cserver import bench

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
    bench.add_arguments(load)
    return parser


@defer.inlineCallbacks
def run_session(reactor, args, out):
    """``send`` or ``stats`` for parsed ``args``: prints to ``out``; fires with the exit
    code (for ``send``, see :data:`SEND_EXIT_STATUS`)."""
    description = endpoint_description(args.host, args.port, args.endpoint)
    timeout = args.timeout

    def timed(d):
        return _within(d, timeout, reactor)

    try:
        client = yield connect(reactor, description, args.user, args.password,
                               timeout=timeout)
    except Exception as e:
        _complain(_reason(e, timeout))
        return EXIT_NOT_JOURNALED
    if args.command == "send":
        code = yield send_messages(client, args.texts, timed, out, timeout)
    else:
        code = yield print_stats(client, timed, out, timeout)
    if code == EXIT_FATE_UNKNOWN:
        client.transport.loseConnection()  # it has stopped answering, or is gone
    else:
        yield _quit(client, timed)
    return code


@defer.inlineCallbacks
def send_messages(client, texts, timed, out, timeout):
    """Pipeline one MSG per text; print the seq of each acknowledged one to ``out``, in
    order, and name each other one on stderr; fires with the exit code: 0 when all
    were acknowledged, else :data:`EXIT_FATE_UNKNOWN` when one got no reply, else
    :data:`EXIT_NOT_JOURNALED`."""
    sends = [timed(client.send(text)) for text in texts]
    results = yield defer.DeferredList(sends, consumeErrors=True)
    code = 0
    for position, (text, (acked, result)) in enumerate(zip(texts, results, strict=True), 1):
        if acked:
            out.write(f"{result}\n")
            continue
        problem, status = _unacknowledged(result.value, timeout)
        _complain(f"message {position} of {len(texts)} {_clip(text)!r}: {problem}")
        code = max(code, status)
    return code


@defer.inlineCallbacks
def print_stats(client, timed, out, timeout):
    """Print the STATS reply to ``out`` as key=value lines; fires with the exit code:
    0, or 1 (said on stderr) when there is no reply."""
    try:
        stats = yield timed(client.stats())
    except Exception as e:
        _complain(_reason(e, timeout))
        client.transport.loseConnection()
        return 1
    for key, value in stats.items():
        out.write(f"{key}={value}\n")
    return 0


@defer.inlineCallbacks
def _quit(client, timed):
    """Say QUIT and wait for the goodbye; by then every answer that matters is in, so
    nothing that becomes of it -- an ERR, a close instead of an answer (a server
    stopping gracefully), a timeout -- changes the outcome."""
    try:
        yield timed(client.quit())
    except Exception:
        pass
    client.transport.loseConnection()


def _unacknowledged(reason, timeout):
    """Why a MSG got no OK, for stderr, and the exit code that calls for."""
    if isinstance(reason, ServerError):
        return f"refused by the server (not journaled): {reason}", EXIT_NOT_JOURNALED
    if _timed_out(reason):
        cause = f"timed out after {timeout:g} s"
    else:
        cause = "the connection was lost"
    return (f"no reply: {cause} before its acknowledgement "
            "(it may or may not be in the journal)"), EXIT_FATE_UNKNOWN


def _timed_out(reason):
    return isinstance(reason, (defer.TimeoutError, defer.CancelledError, error.TimeoutError))


def _reason(reason, timeout):
    """One line on why the session failed."""
    if _timed_out(reason):
        return f"no answer from the server within {timeout:g} s"
    return _describe(reason)


def _clip(text, width=CLIP):
    """``text``, cut to ``width`` characters (ending in ``...``) when longer."""
    return text if len(text) <= width else text[:width - 3] + "..."


def _complain(line):
    sys.stderr.write(f"cserver-client: {line}\n")


def _describe(error):
    if isinstance(error, Failure):
        error = error.value
    return str(error) or type(error).__name__


def main(argv=None):
    """The ``cserver-client`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from cserver import bench

        sys.exit(bench.main(args))
    from twisted.internet import task

    def session(reactor):
        return run_session(reactor, args, sys.stdout).addCallback(_exit)

    task.react(session)


def _exit(code):
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
