"""Unit tests for cserver.client.protocol, .commands (send, stats) and .cli: reply
parsing, the client protocol on a StringTransport, connect() and the CLI sessions
against scripted servers on a MemoryReactorClock, and the argument parser; no real
socket or process.  The
``cserver-client`` command against a real ``twistd -n cserver`` is tested in the
end-to-end layer, tests/e2e/test_client.py."""

import ast
import gc
import getpass
import io
import pathlib
import sys

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

import cserver
import cserver.client
from cserver.client import cli, commands, protocol
from cserver.client.protocol import (
    CserverClientProtocol,
    ServerError,
    UnexpectedReplyError,
    parse_reply,
    parse_stats,
)

ERR_CODES = ["auth", "noauth", "busy", "unavailable", "syntax", "state", "unknown",
             "toolong", "encoding", "timeout"]

REFUSED = "refused by the server (not journaled): ERR unavailable disk full"
LOST = ("no reply: the connection was lost before its acknowledgement "
        "(it may or may not be in the journal)")


def result_of(d):
    """The result a Deferred has already fired with (a Failure when it failed)."""
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


def greeted_client():
    """A client protocol on a StringTransport that has read the server's greeting."""
    proto = CserverClientProtocol()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"HELLO cserver 0.1.0\r\n")
    return proto, transport


class Captured:
    """``self.capture()``: sys.stdout and sys.stderr replaced, for the rest of the test, by
    StringIOs it returns (what pytest's capsys gave)."""

    def capture(self):
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        return stdout, stderr


class KeyedSendTests(SynchronousTestCase):
    """send(text, key=...): PUT, and the seq it gets back."""

    def test_send_with_a_key_is_a_put_and_reads_dup(self):
        """With a key, send writes PUT KEY TEXT; OK <seq> gives a Seq with dup False,
        OK <seq> dup one with dup True; without a key it is a MSG, as before."""
        proto, transport = greeted_client()
        first = proto.send("hello", key="k-1")
        again = proto.send("hello", key="k-1")
        plain = proto.send("hello")
        assert transport.value() == b"PUT k-1 hello\nPUT k-1 hello\nMSG hello\n"
        proto.dataReceived(b"OK 5\r\nOK 5 dup\r\nOK 6\r\n")
        results = [result_of(d) for d in (first, again, plain)]
        assert results == [5, 5, 6]
        assert [r.dup for r in results] == [False, True, False]

    def test_a_bad_key_is_refused_before_anything_is_sent(self):
        """A key outside the charset or over 128 characters raises ValueError."""
        proto, transport = greeted_client()
        for key in ("", "sp ace", "k" * 129, "é"):
            with self.assertRaises(ValueError):
                proto.send("hello", key=key)
        assert transport.value() == b""

    def test_the_greeting_gives_version_and_protocol(self):
        """HELLO cserver <version> proto=1.1 gives both; an old greeting gives 1.0."""
        proto, _transport = greeted_client()
        assert (proto.server_version, proto.server_protocol) == ("0.1.0", "1.0")
        proto = CserverClientProtocol()
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"HELLO cserver 0.2.0 proto=1.1\r\n")
        assert (proto.server_version, proto.server_protocol) == ("0.2.0", "1.1")


class ParseTests(SynchronousTestCase):
    """parse_reply and parse_stats: what a reply line and STATS data become."""

    def test_parse_reply_ok_with_and_without_data(self):
        """``OK <data>`` gives (True, data); a bare ``OK`` gives (True, "")."""
        assert parse_reply("OK 42") == (True, "42")
        assert parse_reply("OK") == (True, "")
        assert parse_reply("OK total=1 peak=2") == (True, "total=1 peak=2")

    def test_parse_reply_err_carries_code_and_text(self):
        """``ERR <code> <text>`` gives (False, ServerError) with the code and the whole text."""
        ok, e = parse_reply("ERR auth unknown user bob")
        assert not ok and isinstance(e, ServerError)
        assert (e.code, e.text) == ("auth", "unknown user bob")
        ok, e = parse_reply("ERR noauth")
        assert (e.code, e.text) == ("noauth", "")
        assert str(e) == "ERR noauth"

    def test_parse_reply_rejects_other_lines(self):
        """A line that is neither OK nor ERR is a protocol violation, not silently accepted."""
        with self.assertRaises(UnexpectedReplyError):
            parse_reply("HELLO cserver 1")
        with self.assertRaises(UnexpectedReplyError):
            parse_reply("ok 1")

    def test_parse_stats_converts_integers(self):
        """STATS data becomes a dict; numeric values are ints, others stay strings."""
        stats = parse_stats("total=10 served=3 connections=2 peak=1000 inflight=0 "
                            "inflight_peak=7 mine=1 user=alice junk")
        assert stats == {"total": 10, "served": 3, "connections": 2, "peak": 1000,
                         "inflight": 0, "inflight_peak": 7, "mine": 1, "user": "alice"}
        assert parse_stats("total=5 connections=1 peak=1 mine=0 user=-")["user"] == "-"


class GreetingTests(SynchronousTestCase):
    """The server's first line: HELLO, ERR busy, or anything else."""

    def test_greeting_fires_with_version(self):
        """``greeted`` fires with the version from ``HELLO cserver <version>``."""
        proto, _ = greeted_client()
        assert result_of(proto.greeted) == "0.1.0"
        assert proto.server_version == "0.1.0"

    def test_busy_greeting_fails_with_code_busy(self):
        """``ERR busy`` instead of HELLO fails ``greeted`` with a ServerError coded busy."""
        proto = CserverClientProtocol()
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"ERR busy too many connections\r\n")
        failure = result_of(proto.greeted)
        assert failure.check(ServerError) and failure.value.code == "busy"

    def test_non_hello_greeting_fails_greeted_and_drops(self):
        """A first line that is not HELLO (nor ERR) fails ``greeted`` and drops the line."""
        proto = CserverClientProtocol()
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"OK 1\r\n")
        assert result_of(proto.greeted).check(UnexpectedReplyError)
        assert transport.disconnecting


class RequestTests(SynchronousTestCase):
    """The requests (AUTH, MSG, STATS, QUIT): what goes out, what each reply fires with."""

    def test_auth_sends_line_and_fires_with_user(self):
        """auth() writes ``AUTH user password`` (LF-terminated) and fires with the OK'd user."""
        proto, transport = greeted_client()
        d = proto.auth("alice", "s3cret")
        assert transport.value() == b"AUTH alice s3cret\n"
        proto.dataReceived(b"OK alice\r\n")
        assert result_of(d) == "alice" and proto.user == "alice"

    def test_auth_without_password_sends_user_only(self):
        """auth(user) with no password sends ``AUTH user`` and nothing else."""
        proto, transport = greeted_client()
        proto.auth("bob")
        assert transport.value() == b"AUTH bob\n"

    def test_send_fires_with_integer_seq(self):
        """send() writes ``MSG text`` and fires with the seq as an int."""
        proto, transport = greeted_client()
        d = proto.send("hello world")
        assert transport.value() == b"MSG hello world\n"
        proto.dataReceived(b"OK 7\r\n")
        assert result_of(d) == 7

    def test_send_encodes_utf8(self):
        """Non-ASCII text goes out as UTF-8."""
        proto, transport = greeted_client()
        proto.send("h\u00e9llo \u2603")
        assert transport.value() == "MSG h\u00e9llo \u2603\n".encode()

    def test_send_refuses_line_breaks(self):
        """A text with a line break would be two requests: send() raises ValueError."""
        proto, transport = greeted_client()
        with self.assertRaises(ValueError):
            proto.send("one\ntwo")
        with self.assertRaises(ValueError):
            proto.send("one\rtwo")
        assert transport.value() == b""

    def test_refused_request_does_not_take_the_next_reply(self):
        """A request refused for a line break leaves no pending entry behind: the next
        request still gets its own reply."""
        proto, transport = greeted_client()
        with self.assertRaises(ValueError):
            proto.send("a\nb")
        d = proto.send("ok")
        assert transport.value() == b"MSG ok\n"
        proto.dataReceived(b"OK 5\r\n")
        assert result_of(d) == 5

    def test_pipelined_replies_match_requests_in_order(self):
        """Several outstanding requests fire in request order, even from one data chunk."""
        proto, transport = greeted_client()
        d1, d2, d3, d4 = proto.send("a"), proto.send("b"), proto.stats(), proto.send("c")
        assert transport.value() == b"MSG a\nMSG b\nSTATS\nMSG c\n"
        proto.dataReceived(b"OK 1\r\nOK 2\r\nOK total=2 peak=1\r\nERR unavailable disk ")
        assert result_of(d1) == 1 and result_of(d2) == 2
        assert result_of(d3) == {"total": 2, "peak": 1}
        assert not d4.called
        proto.dataReceived(b"full\r\n")
        failure = result_of(d4)
        assert failure.value.code == "unavailable" and failure.value.text == "disk full"

    def test_lf_only_replies_work(self):
        """Replies ending in LF alone (no CR) are understood too."""
        proto, _ = greeted_client()
        d = proto.send("x")
        proto.dataReceived(b"OK 3\n")
        assert result_of(d) == 3

    def test_each_err_code_fails_with_that_code(self):
        """``ERR <code> ...`` fails the request's Deferred with ServerError(code), for
        every code of ERR_CODES."""
        for code in ERR_CODES:
            proto, _ = greeted_client()
            d = proto.send("x")
            proto.dataReceived(f"ERR {code} some text\r\n".encode())
            failure = result_of(d)
            assert failure.check(ServerError), code
            assert failure.value.code == code and failure.value.text == "some text", code

    def test_stats_fires_with_dict(self):
        """stats() sends STATS and fires with the parsed dict."""
        proto, transport = greeted_client()
        d = proto.stats()
        assert transport.value() == b"STATS\n"
        proto.dataReceived(b"OK total=3 connections=1 peak=4 mine=0 user=-\r\n")
        assert result_of(d) == {"total": 3, "connections": 1, "peak": 4, "mine": 0, "user": "-"}

    def test_quit_fires_with_bye(self):
        """quit() sends QUIT and fires with the reply data ``bye``."""
        proto, transport = greeted_client()
        d = proto.quit()
        assert transport.value() == b"QUIT\n"
        proto.dataReceived(b"OK bye\r\n")
        assert result_of(d) == "bye"


class ConnectionLossTests(SynchronousTestCase):
    """The connection's end: lost, or dropped by the client at a garbage reply."""

    def test_connection_loss_fails_every_outstanding_request(self):
        """Losing the connection fails all outstanding Deferreds with the reason, and later
        requests fail at once instead of waiting forever."""
        proto, _ = greeted_client()
        pending = [proto.send("a"), proto.send("b"), proto.stats()]
        proto.connectionLost(Failure(error.ConnectionLost("gone")))
        for d in pending:
            assert result_of(d).check(error.ConnectionLost)
        assert result_of(proto.send("late")).check(error.ConnectionLost)
        assert result_of(proto.closed) is None

    def test_connection_loss_before_greeting_fails_greeted(self):
        """If the connection drops before HELLO, ``greeted`` fails instead of hanging."""
        proto = CserverClientProtocol()
        proto.makeConnection(StringTransport())
        proto.connectionLost(Failure(error.ConnectionDone()))
        assert result_of(proto.greeted).check(error.ConnectionDone)

    def test_close_drops_the_connection(self):
        """close() drops the connection; the outstanding requests fail once it is lost."""
        proto, transport = greeted_client()
        d = proto.send("a")
        proto.close()
        assert transport.disconnecting and not d.called
        proto.connectionLost(Failure(error.ConnectionDone()))
        assert result_of(d).check(error.ConnectionDone)

    def test_garbage_reply_drops_connection(self):
        """A reply line that is neither OK nor ERR makes the client drop the connection."""
        proto, transport = greeted_client()
        proto.send("a")
        proto.dataReceived(b"WHAT\r\n")
        assert transport.disconnecting


class ScriptedServer(LineReceiver):
    """A tiny protocol v1 server: greets, accepts user alice, numbers MSGs, says bye."""

    delimiter = b"\n"

    def connectionMade(self):
        self.seq = 0
        self.transport.write(b"HELLO cserver 9.9\r\n")

    def lineReceived(self, line):
        verb, _, arg = line.decode().partition(" ")
        if verb == "AUTH":
            ok = arg.split(" ")[0] == "alice"
            self.sendLine(b"OK alice" if ok else b"ERR auth unknown user")
        elif verb == "MSG":
            self.seq += 1
            self.sendLine(b"OK %d" % self.seq)
        elif verb == "STATS":
            self.sendLine(b"OK total=%d peak=1 user=alice" % self.seq)
        elif verb == "QUIT":
            self.sendLine(b"OK bye")
            self.transport.loseConnection()

    def sendLine(self, line):
        self.transport.write(line + b"\r\n")


class SilentServer(LineReceiver):
    """Accepts the connection and never says a word."""

    def lineReceived(self, line):
        pass


class DeafServer(ScriptedServer):
    """Greets and authenticates, then never answers another request."""

    def lineReceived(self, line):
        if line.startswith(b"AUTH"):
            super().lineReceived(line)


class RefusingServer(ScriptedServer):
    """Greets and authenticates, then answers every MSG with ``ERR unavailable``."""

    def lineReceived(self, line):
        if line.startswith(b"MSG"):
            self.sendLine(b"ERR unavailable disk full")
        else:
            super().lineReceived(line)


class StoppingServer(ScriptedServer):
    """Acks every MSG, then meets QUIT the way the real server does when it is stopped
    gracefully (SIGTERM) at that moment: it closes the connection cleanly, unanswered."""

    def lineReceived(self, line):
        if line.startswith(b"QUIT"):
            self.transport.loseConnection()
        else:
            super().lineReceived(line)


class SelectiveServer(ScriptedServer):
    """Acks every MSG but those whose text starts with ``bad``, which get ``ERR
    unavailable disk full``; at a MSG whose text starts with ``crash`` it closes the
    connection, leaving that MSG and every later one unanswered."""

    def lineReceived(self, line):
        if line.startswith(b"MSG bad"):
            self.sendLine(b"ERR unavailable disk full")
        elif line.startswith(b"MSG crash"):
            self.transport.loseConnection()
        else:
            super().lineReceived(line)


def memory_server(protocol=ScriptedServer):
    """A MemoryReactorClock with ``protocol`` on port 31337, and a ConnectionCompleter."""
    reactor = MemoryReactorClock()
    reactor.listenTCP(31337, Factory.forProtocol(protocol))
    return reactor, iosim.ConnectionCompleter(reactor)


def run_cli_session(argv, protocol=ScriptedServer, wait=0):
    """Run ``send``/``stats`` through run_session on a memory reactor, letting ``wait``
    seconds pass on its clock; (code, output)."""
    reactor, completer = memory_server(protocol)
    args = cli.build_parser().parse_args(argv)
    out = io.StringIO()
    d = commands.run_session(reactor, args, out)
    pump = completer.succeedOnce()
    pump.flush()
    reactor.advance(wait)
    pump.flush()
    return result_of(d), out.getvalue()


class ConnectTests(SynchronousTestCase):
    """protocol.connect() against scripted servers on a MemoryReactorClock."""

    def test_connect_greets_and_authenticates(self):
        """connect() fires with a protocol that has been greeted and authenticated."""
        reactor, completer = memory_server()
        d = protocol.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", 31337), "alice")
        pump = completer.succeedOnce()
        pump.flush()
        proto = result_of(d)
        assert isinstance(proto, CserverClientProtocol)
        assert proto.user == "alice" and proto.server_version == "9.9"
        sends = [proto.send("one"), proto.send("two")]
        pump.flush()
        assert [result_of(s) for s in sends] == [1, 2]

    def test_connect_with_description_string(self):
        """connect() accepts a clientFromString description."""
        reactor, completer = memory_server()
        d = protocol.connect(reactor, "tcp:host=127.0.0.1:port=31337", "alice")
        completer.succeedOnce().flush()
        assert result_of(d).user == "alice"

    def test_connect_refused_user_fails_and_closes(self):
        """A refused AUTH fails connect() with ServerError auth and closes the connection."""
        reactor, completer = memory_server()
        d = protocol.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", 31337), "mallory")
        pump = completer.succeedOnce()
        pump.flush()
        failure = result_of(d)
        assert failure.value.code == "auth"
        assert pump.client.transport.disconnected or pump.client.transport.disconnecting

    def test_connect_refused_connection_fails(self):
        """A refused TCP connection fails connect() with ConnectionRefusedError."""
        reactor, completer = memory_server()
        d = protocol.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", 31337), "alice")
        completer.failOnce()
        assert result_of(d).check(error.ConnectionRefusedError)

    def test_connect_times_out_when_the_server_never_greets(self):
        """connect(timeout=T) against a server that accepts and stays silent fails with a
        timeout after T seconds and drops the connection, instead of waiting forever."""
        reactor, completer = memory_server(SilentServer)
        d = protocol.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", 31337), "alice",
                           timeout=5)
        pump = completer.succeedOnce()
        pump.flush()
        reactor.advance(4.9)
        assert not d.called
        reactor.advance(0.2)
        assert result_of(d).check(defer.TimeoutError)
        assert pump.client.transport.disconnecting or pump.client.transport.disconnected


class SessionTests(Captured, SynchronousTestCase):
    """The ``send``/``stats`` sessions (run_session) against scripted servers: what
    they print, what they say on stderr, their exit codes."""

    def test_cli_send_prints_one_seq_per_line(self):
        """``cserver-client send A B C`` prints the three seqs in order and exits 0."""
        code, out = run_cli_session(["send", "--user", "alice", "A", "B", "C"])
        assert (code, out) == (0, "1\n2\n3\n")

    def test_cli_stats_prints_key_value_lines(self):
        """``cserver-client stats`` prints one key=value line per STATS field."""
        code, out = run_cli_session(["stats", "--user", "alice"])
        assert (code, out) == (0, "total=0\npeak=1\nuser=alice\n")

    def test_cli_session_failure_exits_nonzero(self):
        """A refused AUTH makes ``send`` print the ERR to stderr and return 1."""
        _stdout, stderr = self.capture()
        code, out = run_cli_session(["send", "--user", "mallory", "A"])
        assert code == 1 and out == ""
        assert "ERR auth" in stderr.getvalue()

    def test_cli_gives_up_on_a_server_that_never_greets(self):
        """``send``/``stats`` against a server that accepts but never answers exit 1 with
        a clear message once --timeout has passed, instead of hanging (each command)."""
        for command in (["send", "A"], ["stats"]):
            _stdout, stderr = self.capture()
            code, out = run_cli_session([command[0], "--user", "alice", "--timeout", "3",
                                         *command[1:]], SilentServer, wait=3.5)
            assert code == 1 and out == "", command
            assert "no answer from the server within 3 s" in stderr.getvalue(), command

    def test_cli_stats_gives_up_on_a_stats_that_gets_no_reply(self):
        """After AUTH, a STATS the server never answers ends ``stats`` with exit 1 after
        --timeout seconds."""
        _stdout, stderr = self.capture()
        code, out = run_cli_session(["stats", "--user", "alice", "--timeout", "2"],
                                    DeafServer, wait=2.1)
        assert code == 1 and out == ""
        assert "no answer from the server within 2 s" in stderr.getvalue()

    def test_cli_send_gives_up_on_msgs_that_get_no_reply_and_exits_3(self):
        """After AUTH, MSGs the server never answers end ``send`` after --timeout seconds
        with exit 3 (fate unknown) and one stderr line per message, saying that it timed
        out and may or may not be in the journal."""
        _stdout, stderr = self.capture()
        code, out = run_cli_session(["send", "--user", "alice", "--timeout", "2", "A", "B"],
                                    DeafServer, wait=2.1)
        assert (code, out) == (3, "")
        unknown = "no reply: timed out after 2 s before its acknowledgement " \
            "(it may or may not be in the journal)"
        assert stderr.getvalue().splitlines() == [
            f"cserver-client: message 1 of 2 'A': {unknown}",
            f"cserver-client: message 2 of 2 'B': {unknown}",
        ]

    def test_cli_send_with_several_err_replies_leaves_no_unhandled_error(self):
        """When several pipelined MSGs fail, ``send`` reports each and exits 1; the
        failures are consumed, not logged as unhandled errors in Deferreds."""
        _stdout, stderr = self.capture()
        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            code, out = run_cli_session(["send", "--user", "alice", "A", "B", "C"],
                                        RefusingServer)
            gc.collect()
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert code == 1 and stderr.getvalue().count("ERR unavailable") == 3
        assert [e for e in events if "log_failure" in e] == []

    def test_cli_send_exits_0_when_the_server_closes_instead_of_answering_quit(self):
        """Every MSG acked, then the server closes the connection without answering QUIT
        (what it does when stopped gracefully at that moment): ``send`` prints every seq
        in order and exits 0, with nothing on stderr -- the messages are journaled, and a
        script must not send them again."""
        _stdout, stderr = self.capture()
        code, out = run_cli_session(["send", "--user", "alice", "A", "B", "C"], StoppingServer)
        assert (code, out) == (0, "1\n2\n3\n")
        assert stderr.getvalue() == ""

    def test_cli_stats_exits_0_when_the_server_closes_instead_of_answering_quit(self):
        """Once STATS is answered and printed, a QUIT the server leaves unanswered (closing
        the connection) does not make ``stats`` fail."""
        _stdout, stderr = self.capture()
        code, out = run_cli_session(["stats", "--user", "alice"], StoppingServer)
        assert (code, out) == (0, "total=0\npeak=1\nuser=alice\n")
        assert stderr.getvalue() == ""

    def test_cli_send_names_each_refused_message_and_exits_1(self):
        """MSGs answered ``ERR`` are certainly not journaled: ``send`` prints the seqs of
        the acked ones in order, names each refused one on stderr (position, text, the
        ERR), one line each, and exits 1."""
        _stdout, stderr = self.capture()
        argv = ["send", "--user", "alice", "one", "bad two", "three", "bad four"]
        code, out = run_cli_session(argv, SelectiveServer)
        assert (code, out) == (1, "1\n2\n")
        assert stderr.getvalue().splitlines() == [
            f"cserver-client: message 2 of 4 'bad two': {REFUSED}",
            f"cserver-client: message 4 of 4 'bad four': {REFUSED}",
        ]

    def test_cli_send_exits_3_when_the_connection_is_lost_before_an_ack(self):
        """MSGs still unanswered when the connection is lost may or may not be journaled:
        ``send`` prints the seqs it got, names each refused and each unanswered message
        on stderr, one line each, telling the two apart, and exits 3."""
        _stdout, stderr = self.capture()
        argv = ["send", "--user", "alice", "one", "bad two", "crash three", "four"]
        code, out = run_cli_session(argv, SelectiveServer)
        assert (code, out) == (3, "1\n")
        assert stderr.getvalue().splitlines() == [
            f"cserver-client: message 2 of 4 'bad two': {REFUSED}",
            f"cserver-client: message 3 of 4 'crash three': {LOST}",
            f"cserver-client: message 4 of 4 'four': {LOST}",
        ]

    def test_cli_send_clips_long_texts_in_its_complaints(self):
        """A long message is named by its first 40 characters (ending in ...), so that
        each problem stays one short line."""
        _stdout, stderr = self.capture()
        code, _ = run_cli_session(["send", "--user", "alice", "bad " + "x" * 100],
                                  SelectiveServer)
        assert code == 1
        assert stderr.getvalue().splitlines() == [
            f"cserver-client: message 1 of 1 'bad {'x' * 33}...': {REFUSED}"]


class ParserTests(Captured, SynchronousTestCase):
    """The command line: build_parser's defaults and refusals, --help, --version and
    endpoint_description."""

    def test_cli_send_refuses_a_text_with_a_line_break_before_connecting(self):
        """A TEXT with a line break would be two requests on the wire: ``send`` refuses it
        as a usage error (exit 2) before anything is sent, instead of failing after the
        TEXTs before it went out with their seqs unprinted."""
        _stdout, stderr = self.capture()
        with self.assertRaises(SystemExit) as exc:
            cli.build_parser().parse_args(["send", "A", "B\nC"])
        assert exc.exception.code == 2
        assert "line break" in stderr.getvalue()

    def test_send_help_documents_the_exit_statuses(self):
        """``cserver-client send --help`` explains exit statuses 0, 1, 2 and 3."""
        stdout, _stderr = self.capture()
        with self.assertRaises(SystemExit):
            cli.build_parser().parse_args(["send", "--help"])
        out = stdout.getvalue()
        assert "exit status:" in out
        for status in ("0", "1", "2", "3"):
            assert f"\n  {status}  " in out
        assert "may or may not be in the journal" in out

    def test_version_prints_the_version_and_exits_0(self):
        """``cserver-client --version`` prints ``cserver-client <cserver.__version__>``
        and exits 0, without needing a COMMAND."""
        stdout, _stderr = self.capture()
        with self.assertRaises(SystemExit) as exc:
            cli.main(["--version"])
        assert exc.exception.code == 0
        assert stdout.getvalue() == f"cserver-client {cserver.__version__}\n"

    def test_parser_defaults_for_send_and_stats(self):
        """send/stats default to 127.0.0.1:31337 as the OS user with no password."""
        args = cli.build_parser().parse_args(["send", "hi", "there"])
        assert (args.host, args.port, args.endpoint) == ("127.0.0.1", 31337, None)
        assert (args.user, args.password, args.texts) == (
            getpass.getuser(), None, ["hi", "there"])
        assert args.timeout == 30.0
        args = cli.build_parser().parse_args(
            ["stats", "--endpoint", "unix:path=/tmp/s", "--user", "u", "--password", "p"])
        assert (args.command, args.endpoint, args.user, args.password) == (
            "stats", "unix:path=/tmp/s", "u", "p")

    def test_parser_bench_defaults_and_short_options(self):
        """bench defaults to 1000 connections x 1 message, depth 1; -c/-n/-d set them."""
        parse = cli.build_parser().parse_args
        args = parse(["bench"])
        assert (args.connections, args.messages, args.pipeline, args.processes) == (1000, 1, 1, 1)
        assert (args.rate, args.json, args.text) == (None, False, "bench")
        args = parse(["bench", "-c", "10", "-n", "50", "-d", "4", "--json", "--port", "9",
                      "--rate", "500", "--duration", "2.5", "--processes", "2"])
        assert (args.connections, args.messages, args.pipeline, args.port) == (10, 50, 4, 9)
        assert (args.json, args.rate, args.duration, args.processes) == (True, 500.0, 2.5, 2)

    def test_parser_rejects_bad_arguments(self):
        """Nonsense counts, a send without text or no command exit with a usage error
        (each of the argument lists below)."""
        self.capture()
        for argv in (["bench", "-c", "0"], ["bench", "-d", "0"], ["bench", "-n", "-1"],
                     ["bench", "--rate", "0"], ["send"], []):
            # Were SystemExit not raised, the failure would show the Namespace parsed.
            with self.assertRaises(SystemExit) as exc:
                cli.build_parser().parse_args(argv)
            assert exc.exception.code == 2, argv

    def test_endpoint_description(self):
        """--endpoint wins over --host/--port; else a tcp description is built."""
        assert protocol.endpoint_description("127.0.0.1", 5) == "tcp:host=127.0.0.1:port=5"
        assert protocol.endpoint_description("h", 5, "unix:path=/s") == "unix:path=/s"


#: cserver.client's modules, lowest first: each may import only those before it.
LAYERS = ["protocol", "retrying", "bench_protocol", "bench", "retry_bench", "report", "local",
          "processes", "commands", "cli", "child", "__main__", "__init__"]


def module_imports(path):
    """``(imported cserver.client modules, nested imports)`` of one source file: the
    names after ``cserver.client.``, and the modules imported inside a function."""
    tree = ast.parse(path.read_text())
    imported, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        imported |= {name.split(".")[2] for name in names
                     if name.startswith("cserver.client.")}
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom):
                    nested.append(node.module)
                elif isinstance(node, ast.Import):
                    nested += [alias.name for alias in node.names]
    return imported, nested


class LayeringTests(SynchronousTestCase):
    """The package's modules import one way: cli -> bench -> protocol, never back up."""

    def test_every_module_imports_only_lower_layers(self):
        """Each module of cserver.client imports only modules listed before it in LAYERS
        (so there is no import cycle), and every module is in LAYERS."""
        directory = pathlib.Path(cserver.client.__file__).parent
        paths = sorted(directory.glob("*.py"))
        assert sorted(p.stem for p in paths) == sorted(LAYERS)
        for path in paths:
            imported, _ = module_imports(path)
            lower = set(LAYERS[:LAYERS.index(path.stem)])
            assert imported <= lower, (path.stem, imported - lower)

    def test_no_module_imports_inside_a_function_but_the_reactor(self):
        """Imports sit at the top of each module; the one exception is the global
        reactor, imported where a program runs it."""
        directory = pathlib.Path(cserver.client.__file__).parent
        for path in directory.glob("*.py"):
            _, nested = module_imports(path)
            assert set(nested) <= {"twisted.internet"}, (path.stem, nested)
