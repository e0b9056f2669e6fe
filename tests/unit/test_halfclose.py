"""Unit tests: half-closed clients get every reply they are owed.  A client
that sends its lines and then shuts down its sending side (``shutdown(SHUT_WR)``,
``nc -N``) is answered in full before the server closes: the protocol alone,
over StringTransport and a task.Clock.  Real sockets, nc and TLS are in the
end-to-end layer, tests/e2e/test_halfclose.py."""

from twisted.trial.unittest import SynchronousTestCase

from cserver.server import Limits

from ..common import connect, make_factory, replies, send


class EndOfFileTests(SynchronousTestCase):
    """The client's EOF (readConnectionLost): owed replies first, then the close."""

    def test_end_of_file_waits_for_the_acks_owed_then_closes(self):
        """After the client's EOF the connection stays open until every MSG it sent is
        acknowledged, then closes; the replies go out in order."""
        factory = make_factory()
        protocol, transport = connect(factory)
        send(protocol, "AUTH alice", "MSG one", "MSG two")
        protocol.readConnectionLost()
        assert not transport.disconnecting
        factory.clock.advance(0)
        assert replies(transport)[1:] == ["OK alice", "OK 1", "OK 2"]
        assert transport.disconnecting

    def test_end_of_file_with_nothing_owed_closes_at_once(self):
        """EOF when every reply is out closes the connection at once, sending nothing more."""
        factory = make_factory()
        protocol, transport = connect(factory)
        send(protocol, "AUTH alice")
        replies(transport)
        protocol.readConnectionLost()
        assert transport.value() == b""
        assert transport.disconnecting

    def test_lines_waiting_while_reading_was_paused_are_answered_after_end_of_file(self):
        """Lines still buffered because the connection hit its bound of unanswered MSGs (over
        TLS they can arrive with the EOF) are taken once the acks come, answered, and only then
        is the connection closed; the transport is never asked to read again."""
        factory = make_factory(limits=Limits(max_pending=2))
        protocol, transport = connect(factory)
        send(protocol, "AUTH alice", *[f"MSG m{i}" for i in range(7)])
        assert protocol.paused
        protocol.readConnectionLost()
        transport.producerState = "sentinel"  # a resumeProducing() would overwrite it
        for _ in range(6):
            factory.clock.advance(0)
        assert replies(transport)[1:] == ["OK alice"] + [f"OK {n}" for n in range(1, 8)]
        assert transport.disconnecting
        assert transport.producerState == "sentinel"
        assert [r["text"] for r in factory.journal.records()] == [f"m{i}" for i in range(7)]

    def test_end_of_file_during_a_login_answers_it_then_closes(self):
        """EOF while an AUTH's check is under way (a password checker answering later): the
        AUTH is answered, the lines after it too, and then the connection closes."""
        from twisted.cred import strcred
        from twisted.internet import defer

        from cserver.auth import password_portal

        checker = strcred.makeChecker("memory:alice:pw")
        waiting = defer.Deferred()

        class Later:
            credentialInterfaces = checker.credentialInterfaces

            def requestAvatarId(self, credentials):
                return waiting.addCallback(lambda _: checker.requestAvatarId(credentials))

        factory = make_factory(portal=password_portal([Later()]))
        protocol, transport = connect(factory)
        send(protocol, "AUTH alice pw", "MSG after auth")
        protocol.readConnectionLost()
        assert not transport.disconnecting
        waiting.callback(None)
        factory.clock.advance(0)
        assert replies(transport)[1:] == ["OK alice", "OK 1"]
        assert transport.disconnecting

    def test_an_unfinished_last_line_is_not_a_request(self):
        """Bytes after the last LF when the client's EOF comes are no request: not journaled."""
        factory = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"AUTH alice\nMSG whole\nMSG cut sho")
        protocol.readConnectionLost()
        factory.clock.advance(0)
        assert replies(transport)[1:] == ["OK alice", "OK 1"]
        assert [r["text"] for r in factory.journal.records()] == ["whole"]

    def test_end_of_file_twice_changes_nothing(self):
        """Twisted may report the EOF a second time; the connection ends once."""
        factory = make_factory()
        protocol, transport = connect(factory)
        send(protocol, "AUTH alice", "MSG one")
        protocol.readConnectionLost()
        protocol.readConnectionLost()
        factory.clock.advance(0)
        assert replies(transport)[1:] == ["OK alice", "OK 1"]
