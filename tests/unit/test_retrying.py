"""cserver.client.retrying: a sender that resends every unacknowledged keyed
message after a failure, until each is acknowledged -- over StringTransports,
with connect() replaced and a task.Clock for the delays."""

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cserver.client import retrying
from cserver.client.protocol import CserverClientProtocol, ServerError
from cserver.client.retrying import GaveUp, RetryingSender


class Connections:
    """connect() as the sender calls it: each call takes the next outcome
    (``"ok"``: a greeted, authenticated protocol on a StringTransport;
    ``"refused"``: a failure)."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.made = []

    def __call__(self, reactor, description, user, password=None, timeout=None):
        outcome = self.outcomes.pop(0)
        if outcome == "refused":
            return defer.fail(ConnectionRefused())
        proto = CserverClientProtocol()
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"HELLO cserver 0.1.0 proto=1.1\r\n")
        self.made.append((proto, transport))
        return defer.succeed(proto)


class ConnectionRefused(Exception):
    pass


class RetryingSenderTests(SynchronousTestCase):
    """Every rule of the retrying sender."""

    def setUp(self):
        self.clock = Clock()

    def sender(self, outcomes):
        connections = Connections(outcomes)
        self.patch(retrying, "connect", connections)
        return RetryingSender(self.clock, "tcp:host=127.0.0.1:port=1", "alice",
                              initial_delay=0.1, max_delay=0.4), connections

    def test_unacked_messages_are_resent_in_order_after_a_lost_connection(self):
        """Three PUTs; the first is acknowledged, then the connection drops: after
        the delay the sender reconnects and sends the other two again, in order,
        with their keys; a dup answer fires the Deferred with the first seq."""
        sender, connections = self.sender(["ok", "ok"])
        results = [sender.send(f"k{i}", f"text {i}") for i in range(3)]
        proto, transport = connections.made[0]
        assert transport.value() == b"PUT k0 text 0\nPUT k1 text 1\nPUT k2 text 2\n"
        proto.dataReceived(b"OK 1\r\n")
        proto.connectionLost(Failure(ConnectionLost()))
        self.clock.advance(0.1)
        proto, transport = connections.made[1]
        assert transport.value() == b"PUT k1 text 1\nPUT k2 text 2\n"
        proto.dataReceived(b"OK 2 dup\r\nOK 3\r\n")
        seqs = [self.successResultOf(d) for d in results]
        assert seqs == [1, 2, 3] and [s.dup for s in seqs] == [False, True, False]
        assert (sender.duplicates, sender.resends, sender.reconnects) == (1, 2, 1)
        assert sender.pending == 0

    def test_refused_connects_back_off_up_to_the_most(self):
        """Failed connects are retried after 0.1, 0.2, 0.4, 0.4 s..., then the
        message goes out on the connection that succeeds."""
        sender, connections = self.sender(["refused"] * 4 + ["ok"])
        d = sender.send("k", "t")
        for delay in (0.1, 0.2, 0.4):
            assert connections.made == []
            self.clock.advance(delay)
        assert connections.made == []
        self.clock.advance(0.4)
        proto, transport = connections.made[0]
        assert transport.value() == b"PUT k t\n"
        proto.dataReceived(b"OK 9\r\n")
        assert self.successResultOf(d) == 9

    def test_unavailable_reconnects_and_resends_a_conflict_fails_for_good(self):
        """ERR unavailable (a server stopping, a refused record) drops the
        connection and resends after the delay; ERR conflict fails that
        message's Deferred, since no resend can change it."""
        sender, connections = self.sender(["ok", "ok"])
        lost = sender.send("b", "t")
        kept = sender.send("a", "t")
        proto, _transport = connections.made[0]
        proto.dataReceived(b"ERR conflict key b was sent with another text\r\n"
                           b"ERR unavailable server stopping\r\n")
        failure = self.failureResultOf(lost, ServerError)
        assert failure.value.code == "conflict"
        self.clock.advance(0.1)
        proto, transport = connections.made[1]
        assert transport.value() == b"PUT a t\n"
        proto.dataReceived(b"OK 4\r\n")
        assert self.successResultOf(kept) == 4

    def test_a_server_that_does_not_answer_is_left_and_the_message_resent(self):
        """A reply that does not come within ``timeout`` seconds drops the
        connection; once it is gone, the message goes again on a new one."""
        connections = Connections(["ok", "ok"])
        self.patch(retrying, "connect", connections)
        sender = RetryingSender(self.clock, "tcp:host=127.0.0.1:port=1", "alice",
                                initial_delay=0.1, timeout=5)
        d = sender.send("k", "t")
        proto, transport = connections.made[0]
        self.clock.advance(5)
        assert transport.disconnecting
        proto.connectionLost(Failure(ConnectionLost()))
        self.clock.advance(0.1)
        proto, transport = connections.made[1]
        assert transport.value() == b"PUT k t\n"
        proto.dataReceived(b"OK 3 dup\r\n")
        assert self.successResultOf(d) == 3 and sender.duplicates == 1

    def test_stop_fails_what_is_not_acknowledged_and_bad_input_is_refused(self):
        """stop() fails every unacknowledged message with GaveUp and connects no
        more; a bad key, an empty text or a key already being sent raise
        ValueError at once."""
        sender, connections = self.sender(["ok"])
        d = sender.send("k", "t")
        for key, text in [("b!d", "t"), ("k2", ""), ("k3", "two\nlines"), ("k", "t")]:
            with self.assertRaises(ValueError):
                sender.send(key, text)
        sender.stop()
        self.failureResultOf(d, GaveUp)
        assert connections.outcomes == [] and len(connections.made) == 1
