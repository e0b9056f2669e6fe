"""cserver.poll: the epoll reactor's loop without a logging context per read."""

import socket

from twisted.internet import epollreactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import context, log
from twisted.trial.unittest import SynchronousTestCase

from cserver.poll import lean_poll


class _Reader(FileDescriptor):
    """One end of a socketpair, read by the reactor; ``fail`` makes doRead raise,
    ``done`` makes it end the connection."""

    def __init__(self, reactor, sock, fail=False, done=False):
        super().__init__(reactor)
        self.sock = sock
        self.fail = fail
        self.done = done
        self.read = []
        self.contexts = []
        self.lost = []

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return f"reader-{self.fileno()}"

    def doRead(self):
        self.contexts.append(context.get(log.ILogContext, {}).get("system"))
        if self.fail:
            raise RuntimeError("doRead went wrong")
        self.read.append(self.sock.recv(100))
        return RuntimeError("done reading") if self.done else None

    def doWrite(self):
        self.contexts.append(context.get(log.ILogContext, {}).get("system"))
        self.stopWriting()

    def connectionLost(self, reason):
        self.lost.append(reason.value)
        super().connectionLost(reason)


class LeanPollTests(SynchronousTestCase):
    """lean_poll on a real epoll reactor (socketpairs, no network) and elsewhere;
    each behaviour is checked against Twisted's own loop where they must agree."""

    def make_reactor(self, lean):
        reactor = epollreactor.EPollReactor()
        self.addCleanup(reactor._poller.close)
        if lean:
            assert lean_poll(reactor) is True
        return reactor

    def reader(self, reactor, **kwargs):
        a, b = socket.socketpair()
        a.setblocking(False)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        reader = _Reader(reactor, a, **kwargs)
        reactor.addReader(reader)
        self.addCleanup(reactor.removeReader, reader)
        return reader, b

    def test_other_reactors_are_left_alone(self):
        """A reactor that is not epoll's gets nothing: lean_poll says False."""
        reactor = MemoryReactorClock()
        assert lean_poll(reactor) is False
        assert "doPoll" not in vars(reactor) and "doIteration" not in vars(reactor)

    def test_ready_readers_are_read_without_a_context(self):
        """After lean_poll, one iteration calls doRead on every ready reader,
        with no legacy logging context of its own around it; Twisted's loop sets
        the reader's logPrefix as the system (the control)."""
        for lean in (False, True):
            reactor = self.make_reactor(lean)
            first, first_peer = self.reader(reactor)
            second, second_peer = self.reader(reactor)
            first_peer.send(b"one")
            second_peer.send(b"two")
            reactor.doIteration(1)
            assert (first.read, second.read) == ([b"one"], [b"two"]), lean
            # "-": the default system, what code outside callWithLogger sees.
            want = "-" if lean else f"reader-{first.fileno()}"
            assert first.contexts == [want], lean

    def test_other_events_go_twisteds_way(self):
        """A writable selectable is called through Twisted's own
        callWithLogger(_doReadOrWrite): its context is set."""
        reactor = self.make_reactor(lean=True)
        writer, _peer = self.reader(reactor)
        reactor.removeReader(writer)
        reactor.addWriter(writer)
        reactor.doIteration(1)
        assert writer.contexts == [f"reader-{writer.fileno()}"]

    def test_a_failing_reader_is_logged_and_disconnected_as_twisted_does(self):
        """A doRead that raises is logged as an error whose system is the
        reader's logPrefix and the reader is disconnected (connectionLost with
        the error), exactly as in Twisted's loop; the other ready readers are
        still read in the same iteration."""
        seen = {}
        for lean in (False, True):
            reactor = self.make_reactor(lean)
            events = []
            globalLogPublisher.addObserver(events.append)
            self.addCleanup(globalLogPublisher.removeObserver, events.append)
            bad, bad_peer = self.reader(reactor, fail=True)
            good, good_peer = self.reader(reactor)
            bad_peer.send(b"x")
            good_peer.send(b"y")
            reactor.doIteration(1)
            globalLogPublisher.removeObserver(events.append)
            assert good.read == [b"y"], lean
            systems = [e.get("system") for e in events if e.get("isError")]
            assert systems == [f"reader-{bad.fileno()}"], lean
            assert [type(e) for e in bad.lost] == [RuntimeError], lean
            assert bad not in reactor.getReaders(), lean
            seen[lean] = [str(e) for e in bad.lost]
            assert len(self.flushLoggedErrors(RuntimeError)) == 1
        assert seen[True] == seen[False]

    def test_a_read_that_ends_the_connection_disconnects_it(self):
        """A doRead that returns a reason ends the connection with it, in a
        read (connectionLost gets the reason; the reader leaves the reactor)."""
        reactor = self.make_reactor(lean=True)
        reader, peer = self.reader(reactor, done=True)
        peer.send(b"bye")
        reactor.doIteration(1)
        assert reader.read == [b"bye"]
        assert [str(e) for e in reader.lost] == ["done reading"]
        assert reader not in reactor.getReaders()

    def test_nothing_ready_returns_after_the_timeout(self):
        """An iteration with nothing ready returns (epoll_wait timed out)."""
        reactor = self.make_reactor(lean=True)
        reader, _peer = self.reader(reactor)
        reactor.doIteration(0)
        assert reader.read == []
