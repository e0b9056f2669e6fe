"""Unit tests for cserver.protocol: every line of protocol v1, without sockets
(StringTransport and a task.Clock)."""

import errno
from collections import deque

from twisted.cred import strcred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cserver import __version__
from cserver.auth import password_portal
from cserver.server import Limits

from ..common import connect, make_factory, replies, send


class FactoryCase:
    """``self.factory``: a new factory (make_factory's defaults) for each test."""

    def setUp(self):
        super().setUp()
        self.factory = make_factory()


def authed(factory, user="alice"):
    protocol, transport = connect(factory)
    send(protocol, f"AUTH {user}")
    assert replies(transport) == [f"HELLO cserver {__version__} proto=1.1", f"OK {user}"]
    return protocol, transport


class GreetingAndConnectionTests(FactoryCase, SynchronousTestCase):
    """The greeting, --max-connections and the connection counts."""

    def test_greeting_comes_first(self):
        """On connect the server sends HELLO cserver <version> before anything else."""
        _protocol, transport = connect(self.factory)
        assert replies(transport) == [f"HELLO cserver {__version__} proto=1.1"]

    def test_busy_over_max_connections(self):
        """Past --max-connections a new connection gets ERR busy and is closed."""
        factory = make_factory(limits=Limits(max_connections=2))
        connect(factory)
        connect(factory)
        protocol, transport = connect(factory)
        assert replies(transport) == ["ERR busy"]
        assert transport.disconnecting
        assert factory.connections == 2
        protocol.connectionLost(Failure(ConnectionDone()))
        assert factory.connections == 2

    def test_connection_counts(self):
        """connections and peak follow connects and disconnects."""
        a, _ = connect(self.factory)
        b, _ = connect(self.factory)
        a.connectionLost(Failure(ConnectionDone()))
        c, _ = connect(self.factory)
        assert (self.factory.connections, self.factory.peak) == (2, 2)
        b.connectionLost(Failure(ConnectionDone()))
        c.connectionLost(Failure(ConnectionDone()))
        assert (self.factory.connections, self.factory.peak) == (0, 2)


class AuthTests(FactoryCase, SynchronousTestCase):
    """AUTH: allowed and unknown users, syntax, state, failures, passwords."""

    def test_auth_accepts_allowed_user(self):
        """AUTH <user> with a user on the allow-list answers OK <user>."""
        protocol, _transport = authed(self.factory, "bob")
        assert protocol.user == "bob"

    def test_auth_refuses_unknown_user(self):
        """AUTH with a name not on the list answers ERR auth and stays unauthenticated."""
        protocol, transport = connect(self.factory)
        send(protocol, "AUTH mallory")
        assert replies(transport)[1].startswith("ERR auth ")
        assert protocol.user is None
        assert not transport.disconnecting

    def test_auth_needs_a_user(self):
        """AUTH with no user name answers ERR syntax."""
        protocol, transport = connect(self.factory)
        send(protocol, "AUTH", "AUTH ")
        lines = replies(transport)[1:]
        assert [line.split()[:2] for line in lines] == [["ERR", "syntax"]] * 2

    def test_auth_twice_is_a_state_error(self):
        """A second AUTH on an authenticated connection answers ERR state."""
        protocol, transport = authed(self.factory)
        send(protocol, "AUTH bob")
        assert replies(transport)[0].startswith("ERR state ")
        assert protocol.user == "alice"

    def test_third_auth_failure_closes(self):
        """The third failed AUTH on a connection answers ERR auth and closes it."""
        protocol, transport = connect(self.factory)
        send(protocol, "AUTH x", "AUTH y")
        assert not transport.disconnecting
        send(protocol, "AUTH z", "AUTH alice")
        lines = replies(transport)[1:]
        assert [line.split()[:2] for line in lines] == [["ERR", "auth"]] * 3
        assert transport.disconnecting
        assert protocol.user is None

    def test_failed_auth_is_journaled_without_password(self):
        """A failed AUTH is journaled as auth_failed with the user and peer, never the password."""
        portal = password_portal([strcred.makeChecker("memory:alice:secret")])
        factory = make_factory(portal=portal)
        protocol, transport = connect(factory, port=4242)
        send(protocol, "AUTH alice wrong-password")
        factory.clock.advance(0)
        assert replies(transport)[1].startswith("ERR auth ")
        [record] = factory.journal.records()
        assert record["event"] == "auth_failed"
        assert record["user"] == "alice"
        assert record["peer"] == "127.0.0.1:4242"
        assert b"wrong-password" not in factory.journal.data
        assert factory.auth_failures == 1

    def test_password_mode_needs_password(self):
        """With password checkers, AUTH <user> alone is refused with ERR auth."""
        portal = password_portal([strcred.makeChecker("memory:alice:secret")])
        factory = make_factory(portal=portal)
        protocol, transport = connect(factory)
        send(protocol, "AUTH alice", "AUTH alice secret")
        assert replies(transport)[1:] == ["ERR auth a password is required", "OK alice"]


class AuthThrottleTests(SynchronousTestCase):
    """--auth-throttle: the per-address lockout after repeated failures."""

    def test_auth_throttled_after_repeated_failures_from_one_address(self):
        """After --auth-throttle failures from one host, its AUTHs are refused unchecked, saying
        how long to wait, until the throttle window after the failure that throttled it;
        other hosts are unaffected."""
        factory = make_factory(limits=Limits(auth_throttle=3, auth_throttle_seconds=60))
        for _ in range(3):
            protocol, transport = connect(factory, port=5000)
            send(protocol, "AUTH mallory")
            assert replies(transport)[1].startswith("ERR auth wrong")
        protocol, transport = connect(factory, port=5001)
        send(protocol, "AUTH alice")
        [line] = replies(transport)[1:]
        assert line == "ERR auth throttled: too many failed AUTHs from your address; retry in 60 s"
        assert protocol.user is None
        other = factory.buildProtocol(None)
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        other_transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 7000))
        other.makeConnection(other_transport)
        send(other, "AUTH alice")
        assert replies(other_transport)[1] == "OK alice"
        factory.clock.advance(59.5)
        protocol, transport = connect(factory, port=5002)
        send(protocol, "AUTH alice")
        assert replies(transport)[1].endswith("retry in 1 s")
        factory.clock.advance(0.5)
        protocol, transport = connect(factory, port=5003)
        send(protocol, "AUTH alice")
        assert replies(transport)[1] == "OK alice"
        assert factory.auth_throttled == 2
        assert factory.auth_failures == 5

    def test_auth_throttle_zero_never_throttles(self):
        """With --auth-throttle 0, any number of failures leaves the address free to try."""
        factory = make_factory(limits=Limits(auth_throttle=0))
        for port in range(10):
            protocol, transport = connect(factory, port=6000 + port)
            send(protocol, "AUTH mallory")
            assert replies(transport)[1].startswith("ERR auth wrong")
        protocol, transport = connect(factory, port=6100)
        send(protocol, "AUTH alice")
        assert replies(transport)[1] == "OK alice"

    def test_old_failures_are_forgotten_by_the_sweep(self):
        """Hosts quiet for the throttle window drop out of the failure table."""
        factory = make_factory(limits=Limits(auth_throttle=3, auth_throttle_seconds=10))
        factory.startFactory()
        protocol, transport = connect(factory, port=5000)
        send(protocol, "AUTH mallory")
        assert factory.throttle._failures
        for _ in range(12):
            factory.clock.advance(1)
        assert not factory.throttle._failures
        factory.stopFactory()


class MsgTests(FactoryCase, SynchronousTestCase):
    """MSG: acked once durable, refused before AUTH, journaled exactly, journal errors."""

    def test_msg_is_acked_only_once_durable(self):
        """MSG gets no reply until its batch is written and synced, then OK <seq>."""
        protocol, transport = authed(self.factory)
        send(protocol, "MSG hello")
        assert replies(transport) == []
        assert self.factory.journal.data == b""
        self.factory.clock.advance(0)
        assert replies(transport) == ["OK 1"]
        [record] = self.factory.journal.records()
        assert record["text"] == "hello"
        assert record["user"] == "alice"
        assert self.factory.journal.syncs == 1

    def test_msg_before_auth_is_refused(self):
        """MSG before AUTH answers ERR noauth and journals nothing."""
        protocol, transport = connect(self.factory)
        send(protocol, "MSG sneaky")
        self.factory.clock.advance(0)
        assert replies(transport)[1].startswith("ERR noauth")
        assert self.factory.journal.data == b""

    def test_msg_needs_text(self):
        """MSG with no text answers ERR syntax."""
        protocol, transport = authed(self.factory)
        send(protocol, "MSG", "MSG ")
        self.factory.clock.advance(0)
        assert [line.split()[:2] for line in replies(transport)] == [["ERR", "syntax"]] * 2
        assert self.factory.journal.data == b""

    def test_msg_text_is_kept_exactly(self):
        """The text after 'MSG ' is journaled as sent: spaces, quotes, backslashes, controls."""
        protocol, _transport = authed(self.factory)
        text = ' two  spaces "quoted" back\\slash \t tab \x00 nul \x1b esc é 😀'
        protocol.dataReceived(b"MSG " + text.encode("utf-8") + b"\n")
        self.factory.clock.advance(0)
        assert self.factory.journal.records()[0]["text"] == text

    def test_write_error_answers_unavailable(self):
        """When the journal cannot write, MSG answers ERR unavailable and nothing is journaled."""
        protocol, transport = authed(self.factory)
        self.factory.journal.fail_writes = OSError(errno.ENOSPC, "No space left on device")
        send(protocol, "MSG lost")
        self.factory.clock.advance(0)
        [line] = replies(transport)
        assert line.startswith("ERR unavailable ")
        assert "ENOSPC" in line
        assert self.factory.journal.data == b""
        assert self.factory.total == 0
        self.factory.journal.fail_writes = None
        send(protocol, "MSG kept")
        self.factory.clock.advance(0)
        assert replies(transport) == ["OK 1"]

    def test_ack_after_disconnect_is_counted(self):
        """A MSG whose client left before its ack is still journaled and counted."""
        protocol, transport = authed(self.factory)
        send(protocol, "MSG orphan")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.factory.clock.advance(0)
        assert self.factory.total == 1
        assert self.factory.inflight == 0
        assert self.factory.journal.records()[0]["text"] == "orphan"

    def test_a_connection_holds_no_reply_queue_until_its_first_msg(self):
        """An authenticated connection that has sent no MSG (the 10,000 held open) has no deque
        of its own; the first MSG makes one, which then stays for the connection's later MSGs."""
        protocol, transport = connect(self.factory)
        send(protocol, "AUTH alice", "STATS")
        assert not isinstance(protocol._queue, deque)
        send(protocol, "MSG one")
        queue = protocol._queue
        assert isinstance(queue, deque)
        self.factory.clock.advance(0)
        send(protocol, "MSG two")
        assert protocol._queue is queue
        self.factory.clock.advance(0)
        assert replies(transport)[-2:] == ["OK 1", "OK 2"]


class LineTests(FactoryCase, SynchronousTestCase):
    """Lines: CRLF and LF, split reads, empty lines, verbs, --max-line, UTF-8."""

    def test_crlf_and_lf_lines(self):
        """LF ends a line; a CR just before it is dropped; replies end with CRLF."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(b"AUTH alice\r\nMSG one\r\nMSG two\n")
        self.factory.clock.advance(0)
        assert replies(transport)[1:] == ["OK alice", "OK 1", "OK 2"]
        assert [r["text"] for r in self.factory.journal.records()] == ["one", "two"]

    def test_lines_split_across_reads(self):
        """A line that arrives in pieces is handled once it is complete."""
        protocol, transport = authed(self.factory)
        for piece in (b"MS", b"G spl", b"it\r", b"\nMSG x\n"):
            protocol.dataReceived(piece)
        self.factory.clock.advance(0)
        assert replies(transport) == ["OK 1", "OK 2"]
        assert self.factory.journal.records()[0]["text"] == "split"

    def test_empty_lines_are_ignored(self):
        """Empty lines (LF or CRLF) get no reply."""
        protocol, transport = authed(self.factory)
        protocol.dataReceived(b"\n\r\n\nSTATS\n")
        assert len(replies(transport)) == 1

    def test_verbs_are_case_insensitive(self):
        """Verbs match in any case."""
        protocol, transport = connect(self.factory)
        send(protocol, "auth alice", "Msg hi", "stats", "qUiT")
        self.factory.clock.advance(0)
        lines = replies(transport)[1:]
        assert lines[0] == "OK alice"
        assert lines[1] == "OK 1"
        assert lines[2].startswith("OK total=0 served=0 connections=1 peak=1 inflight=1 ")
        assert lines[3] == "OK bye"

    def test_unknown_verb(self):
        """An unknown verb answers ERR unknown <verb>."""
        protocol, transport = authed(self.factory)
        send(protocol, "FROB the widget")
        assert replies(transport) == ["ERR unknown FROB"]

    def test_too_long_line_closes(self):
        """A line over --max-line gets ERR toolong and a close; nothing of it is journaled."""
        factory = make_factory(limits=Limits(max_line=20))
        protocol, transport = authed(factory)
        protocol.dataReceived(b"MSG " + b"x" * 30 + b"\nMSG after\n")
        factory.clock.advance(0)
        assert replies(transport) == ["ERR toolong"]
        assert transport.disconnecting
        assert factory.journal.data == b""

    def test_too_long_partial_line_closes(self):
        """Bytes past --max-line with no newline yet get ERR toolong and a close."""
        factory = make_factory(limits=Limits(max_line=20))
        protocol, transport = authed(factory)
        protocol.dataReceived(b"MSG " + b"x" * 10)
        assert not transport.disconnecting
        protocol.dataReceived(b"y" * 10)
        assert replies(transport) == ["ERR toolong"]
        assert transport.disconnecting

    def test_line_at_max_length_is_taken(self):
        """A line of exactly --max-line bytes is a valid request."""
        factory = make_factory(limits=Limits(max_line=20))
        protocol, transport = authed(factory)
        protocol.dataReceived(b"MSG " + b"x" * 16 + b"\n")
        factory.clock.advance(0)
        assert replies(transport) == ["OK 1"]

    def test_invalid_utf8(self):
        """Invalid UTF-8 answers ERR encoding, journals nothing, and keeps the connection."""
        protocol, transport = authed(self.factory)
        protocol.dataReceived(b"MSG caf\xe9\n")
        self.factory.clock.advance(0)
        assert replies(transport)[0].startswith("ERR encoding")
        assert self.factory.journal.data == b""
        assert not transport.disconnecting


class StatsAndOrderTests(FactoryCase, SynchronousTestCase):
    """STATS, the order of pipelined replies, and QUIT."""

    def test_stats_reports_state(self):
        """STATS answers OK key=value ... with the global and per-connection figures."""
        protocol, transport = authed(self.factory)
        other, _ = connect(self.factory)
        send(protocol, "MSG a", "MSG b")
        self.factory.clock.advance(0)
        replies(transport)
        send(protocol, "STATS")
        [line] = replies(transport)
        assert line.startswith("OK ")
        stats = dict(item.split("=", 1) for item in line[3:].split())
        assert stats["total"] == "2"
        assert stats["served"] == "2"
        assert stats["connections"] == "2"
        assert stats["peak"] == "2"
        assert stats["inflight"] == "0"
        assert stats["inflight_peak"] == "2"
        assert stats["mine"] == "2"
        assert stats["user"] == "alice"
        send(other, "STATS")
        assert "user=- " in other.transport.value().decode()

    def test_replies_stay_in_request_order(self):
        """Pipelined requests are answered in order, even when a MSG waits on the journal."""
        protocol, transport = connect(self.factory)
        send(protocol, "AUTH alice", "MSG one", "STATS", "FROB", "MSG two", "QUIT")
        assert replies(transport)[:2] == [f"HELLO cserver {__version__} proto=1.1", "OK alice"]
        self.factory.clock.advance(0)
        lines = replies(transport)
        assert lines[0] == "OK 1"
        assert lines[1].startswith("OK total=")
        assert lines[2] == "ERR unknown FROB"
        assert lines[3] == "OK 2"
        assert lines[4] == "OK bye"
        assert transport.disconnecting

    def test_quit_closes_after_owed_replies(self):
        """QUIT answers OK bye after every earlier reply, then closes; later lines are ignored."""
        protocol, transport = authed(self.factory)
        send(protocol, "MSG one", "QUIT", "MSG ignored")
        assert not transport.disconnecting
        self.factory.clock.advance(0)
        assert replies(transport) == ["OK 1", "OK bye"]
        assert transport.disconnecting
        assert len(self.factory.journal.records()) == 1


class FlowControlTests(FactoryCase, SynchronousTestCase):
    """--work-delay and backpressure on unanswered MSGs and unsent replies."""

    def test_work_delay_holds_msg_without_blocking(self):
        """With --work-delay, a MSG is journaled after the delay; others are served meanwhile."""
        factory = make_factory(limits=Limits(work_delay=3.0))
        protocol, transport = authed(factory)
        send(protocol, "MSG slow")
        factory.clock.advance(0)
        assert factory.journal.data == b""
        assert factory.inflight == 1
        other, other_transport = authed(factory, "bob")
        send(other, "STATS")
        assert "inflight=1" in replies(other_transport)[0]
        factory.clock.advance(3)
        factory.clock.advance(0)
        assert replies(transport) == ["OK 1"]
        assert factory.inflight == 0

    def test_backpressure_on_unanswered_msgs(self):
        """A client past max_pending unanswered MSGs is not read until the journal answers."""
        factory = make_factory(limits=Limits(max_pending=3))
        protocol, transport = authed(factory)
        send(protocol, *[f"MSG {i}" for i in range(10)])
        assert factory.inflight == 3
        assert transport.producerState == "paused"
        assert replies(transport) == []
        factory.clock.advance(0)
        assert transport.producerState == "producing"
        assert replies(transport) == [f"OK {i}" for i in range(1, 11)]
        assert factory.inflight_peak == 3

    def test_backpressure_on_unsent_replies(self):
        """When the transport pauses the protocol (replies unsent), no more requests are read."""
        protocol, transport = authed(self.factory)
        protocol.pauseProducing()
        assert transport.producerState == "paused"
        send(protocol, "STATS", "STATS")
        assert replies(transport) == []
        protocol.resumeProducing()
        assert transport.producerState == "producing"
        assert len(replies(transport)) == 2


class TimeoutTests(SynchronousTestCase):
    """--idle-timeout and --auth-timeout."""

    def test_idle_timeout(self):
        """A connection with no request for --idle-timeout seconds gets ERR timeout and a close."""
        factory = make_factory(limits=Limits(idle_timeout=10, auth_timeout=0))
        factory.startFactory()
        protocol, transport = authed(factory)
        quiet, quiet_transport = authed(factory, "bob")
        for _ in range(8):
            factory.clock.advance(2)
            send(protocol, "STATS")
        assert not transport.disconnecting
        assert replies(quiet_transport) == ["ERR timeout"]
        assert quiet_transport.disconnecting
        factory.stopFactory()
        assert not factory.clock.getDelayedCalls()

    def test_idle_timeout_spares_connections_awaiting_acks(self):
        """A connection whose MSG is still in service is not idle."""
        factory = make_factory(limits=Limits(idle_timeout=2, auth_timeout=0, work_delay=5))
        factory.startFactory()
        protocol, transport = authed(factory)
        send(protocol, "MSG slow")
        for _ in range(10):
            factory.clock.advance(0.5)
        assert replies(transport) == ["OK 1"]
        assert not transport.disconnecting

    def test_auth_timeout(self):
        """A connection that does not authenticate within --auth-timeout is closed."""
        factory = make_factory(limits=Limits(auth_timeout=5, idle_timeout=0))
        factory.startFactory()
        protocol, transport = connect(factory)
        send(protocol, "STATS")
        for _ in range(4):
            factory.clock.advance(1)
        assert not transport.disconnecting
        factory.clock.advance(1)
        assert replies(transport)[2:] == ["ERR timeout"]
        assert transport.disconnecting
        protocol.connectionLost(Failure(ConnectionDone()))
        assert factory.connections == 0

    def test_auth_in_time_lifts_auth_timeout(self):
        """A connection that authenticated in time is not closed by the auth timeout."""
        factory = make_factory(limits=Limits(auth_timeout=5, idle_timeout=0))
        factory.startFactory()
        _protocol, transport = authed(factory)
        for _ in range(60):
            factory.clock.advance(1)
        assert not transport.disconnecting
        factory.stopFactory()
        assert not factory.clock.getDelayedCalls()


class DrainTests(FactoryCase, SynchronousTestCase):
    """drain(): waiting for in-flight MSGs at shutdown."""

    def test_drain_waits_for_inflight_and_refuses_new(self):
        """drain() fires once in-flight MSGs are acked; MSGs after it get ERR unavailable."""
        protocol, transport = authed(self.factory)
        send(protocol, "MSG before")
        fired = []
        self.factory.drain().addCallback(fired.append)
        assert fired == []
        send(protocol, "MSG after")
        self.factory.clock.advance(0)
        assert fired == [None]
        lines = replies(transport)
        assert lines[0] == "OK 1"
        assert lines[1].startswith("ERR unavailable ")
        assert [r["text"] for r in self.factory.journal.records()] == ["before"]
