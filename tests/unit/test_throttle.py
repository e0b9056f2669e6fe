"""Unit tests of what an unauthenticated client can make the server write: the
AUTH throttle, clipped user names, the auth_throttled records and the
rate-limited log (StringTransport and a task.Clock).  The real server's
throttle is tested in the end-to-end layer, tests/e2e/test_throttle.py."""

import json

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from cserver.protocol import MAX_AUTH_FAILURES, MAX_USER_BYTES
from cserver.server import Limits
from cserver.throttle import AuthThrottle, FailureLog

from ..common import connect, make_factory, replies, send

#: The journal bytes one failed AUTH may cost at most (a 256-byte name that
#: JSON escapes to six characters a byte, the peer, the head): README, Reliability.
RECORD_BOUND = 2048


def texts(events, namespace="cserver.auth"):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if e.get("log_namespace") == namespace]


def fail(factory, port, name="mallory"):
    """One connection from 127.0.0.1:port that sends a wrong AUTH; its reply."""
    protocol, transport = connect(factory, port=port)
    send(protocol, f"AUTH {name}")
    return replies(transport)[1]


def records(factory, event=None):
    factory.clock.advance(0)
    return [r for r in factory.journal.records() if event is None or r["event"] == event]


class Events:
    """``self.events``: every event logged during the test (the ``events`` fixture)."""

    def setUp(self):
        super().setUp()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)


class LockoutTests(SynchronousTestCase):
    """The lockout: its end, the connection's own limit, AuthThrottle alone."""

    def test_refused_auths_do_not_extend_the_lockout(self):
        """AUTHs refused while an address is throttled do not move the end of the lockout:
        a retry 37 s in is told to wait 23 s more, and at 60 s after the failure that
        throttled the address, the right user gets in."""
        factory = make_factory(limits=Limits(auth_throttle=5, auth_throttle_seconds=60))
        for port in range(5):
            assert fail(factory, 5000 + port).startswith("ERR auth wrong")
        for _ in range(37):
            factory.clock.advance(1)
            fail(factory, 5100)
        assert fail(factory, 5101, "alice") == (
            "ERR auth throttled: too many failed AUTHs from your address; retry in 23 s")
        factory.clock.advance(23)
        assert fail(factory, 5102, "alice") == "OK alice"

    def test_a_connection_is_closed_after_three_failures_throttled_or_not(self):
        """Every refused AUTH counts against the connection, throttled ones included: the third
        closes it, so one connection journals at most three records."""
        factory = make_factory(limits=Limits(auth_throttle=1, auth_throttle_seconds=60))
        protocol, transport = connect(factory, port=5000)
        send(protocol, *["AUTH mallory"] * 5)
        lines = replies(transport)[1:]
        assert len(lines) == MAX_AUTH_FAILURES
        assert transport.disconnecting

    def test_auth_throttle_alone(self):
        """AuthThrottle counts failures in a row per host (a quiet window starts the count
        again), throttles at the limit and releases exactly one window after that failure."""
        clock = Clock()
        throttle = AuthThrottle(clock, limit=2, window=10)
        throttle.failed("h")
        clock.advance(10)
        throttle.failed("h")  # the first is 10 s old: a new count
        assert throttle.retry_after("h") is None
        clock.advance(9)
        throttle.failed("h")
        assert throttle.retry_after("h") == 10
        assert throttle.throttled == ["h"]
        throttle.refuse("h")
        clock.advance(9.2)
        assert throttle.retry_after("h") == 1
        assert throttle.sweep() == []
        clock.advance(0.8)
        [lockout] = throttle.sweep()
        assert (lockout.host, lockout.refused, lockout.since, lockout.until) == ("h", 1, 19, 29)
        assert throttle.throttled == []


class ThrottledRecordTests(SynchronousTestCase):
    """The auth_throttled records, and the bound on what one address can journal."""

    def test_throttled_auths_are_counted_and_journaled_once_per_lockout(self):
        """AUTHs refused by the throttle are each counted in STATS (auth_throttled and
        auth_failures) but not journaled one by one: once the address is released, one
        auth_throttled record carries their count, the address and the lockout's times."""
        factory = make_factory(limits=Limits(auth_throttle=3, auth_throttle_seconds=10))
        factory.startFactory()
        for port in range(3):
            fail(factory, 5000 + port)
        for port in range(40):
            fail(factory, 6000 + port)
        assert len(records(factory, "auth_failed")) == 3
        assert records(factory, "auth_throttled") == []
        protocol, transport = connect(factory, port=7000)
        stats = factory.stats(protocol)
        assert (stats["auth_failures"], stats["auth_throttled"]) == (43, 40)
        for _ in range(12):
            factory.clock.advance(1)
        [record] = records(factory, "auth_throttled")
        assert (record["host"], record["refused"]) == ("127.0.0.1", 40)
        assert record["until"] - record["since"] == 10
        factory.stopFactory()

    def test_refusals_not_yet_journaled_go_before_the_stop_record(self):
        """At stop, the refusals of addresses still throttled are journaled (one record per
        address) before the stop record, so the journal's count matches STATS."""
        factory = make_factory(limits=Limits(auth_throttle=2, auth_throttle_seconds=60))
        for port in range(2):
            fail(factory, 5000 + port)
        for port in range(4):
            fail(factory, 6000 + port)
        factory.record_stop()
        kinds = [(r["event"], r.get("refused")) for r in records(factory)]
        assert kinds == [("auth_failed", None), ("auth_failed", None), ("auth_throttled", 4),
                         ("stop", None)]

    def test_the_bytes_one_unauthenticated_address_can_journal_are_bounded(self):
        """One address that opens a connection every 0.1 s for ten minutes, each sending AUTHs
        with 65 KB names of control characters (the worst case for JSON escaping), makes the
        journal grow by at most 3 records per connection and, over time, by at most 5
        auth_failed records and 1 auth_throttled record per minute (under 10 KB a minute):
        each record under 2 KB."""
        factory = make_factory()
        factory.startFactory()
        name = "\x01" * 65000
        for tick in range(6000):
            protocol, transport = connect(factory, port=10000 + tick % 50000)
            send(protocol, *[f"AUTH {name}"] * 5)
            factory.clock.advance(0.1)
        factory.record_stop()
        factory.clock.advance(0)
        lines = factory.journal.data.splitlines()
        kinds = [json.loads(line)["event"] for line in lines]
        assert max(len(line) for line in lines) < RECORD_BOUND
        minutes = 10
        assert kinds.count("auth_failed") <= 5 * (minutes + 1)
        assert kinds.count("auth_throttled") <= minutes + 1
        assert len(factory.journal.data) <= (minutes + 1) * 10 * 1024  # 10 KB a minute
        factory.stopFactory()


class UserNameTests(SynchronousTestCase):
    """User names over and at the 256-byte limit."""

    def test_a_long_user_name_is_refused_and_journaled_clipped(self):
        """A user name over 256 bytes gets ERR syntax and counts as a failed AUTH; the journal
        keeps its first 256 bytes (never half a character), marked clipped, with its length."""
        factory = make_factory()
        name = "é" * 200 + "x" * 1000  # 400 bytes of two-byte characters first
        reply = fail(factory, 5000, name)
        assert reply == f"ERR syntax user name too long (the most is {MAX_USER_BYTES} bytes)"
        [record] = records(factory, "auth_failed")
        assert record["user"] == "é" * 128
        assert (record["clipped"], record["length"]) == (True, len(name.encode()))
        assert factory.auth_failures == 1

    def test_a_name_of_exactly_the_limit_is_checked_as_usual(self):
        """A user name of exactly 256 bytes is an ordinary name: checked, not clipped."""
        factory = make_factory(users=("a" * MAX_USER_BYTES,))
        assert fail(factory, 5000, "a" * MAX_USER_BYTES) == "OK " + "a" * MAX_USER_BYTES


class AuthLogTests(Events, SynchronousTestCase):
    """The server's log of throttled addresses and failed AUTHs, rate-limited."""

    def test_the_log_says_when_an_address_is_throttled_and_released(self):
        """The server's log says when an address is throttled (for how long, after how many
        failures) and when it is released (with the AUTHs it had refused)."""
        factory = make_factory(limits=Limits(auth_throttle=2, auth_throttle_seconds=30))
        factory.startFactory()
        fail(factory, 5000)
        fail(factory, 5001)
        fail(factory, 5002)
        for _ in range(31):
            factory.clock.advance(1)
        lines = texts(self.events)
        assert "AUTH from 127.0.0.1 throttled for 30 s after 2 failed AUTHs" in lines
        assert ("AUTH from 127.0.0.1 allowed again; 1 AUTHs were refused while it was "
                "throttled") in lines
        factory.stopFactory()

    def test_failed_auths_are_logged_at_most_ten_a_minute(self):
        """Each failed AUTH appears in the server's log (the name, the peer, the reason),
        but at most ten a minute; the log then says how many it left out."""
        factory = make_factory(limits=Limits(auth_throttle=0))
        factory.startFactory()
        for port in range(25):
            fail(factory, 5000 + port, name=f"u{port}")
        lines = [line for line in texts(self.events) if line.startswith("AUTH failed")]
        assert len(lines) == 10
        assert lines[0] == ("AUTH failed for user 'u0' from 127.0.0.1:5000: "
                            "auth wrong user or password")
        for _ in range(61):
            factory.clock.advance(1)
        assert "15 more failed AUTHs were not logged" in texts(self.events)
        factory.stopFactory()

    def test_failure_log_flushes_what_it_left_out_at_stop(self):
        """At stop the failure log says at once how many failed AUTHs it left out."""
        log = FailureLog(Clock(), burst=1)
        log.failed("a", "peer", "why")
        log.failed("b", "peer", "why")
        log.flush(stopping=True)
        assert texts(self.events)[-1] == "1 more failed AUTHs were not logged"
        assert all(e["log_level"] == LogLevel.info for e in self.events
                   if e.get("log_namespace") == "cserver.auth")
