"""Shared test helpers: a server factory over an in-memory journal, and
connections to it over StringTransport."""

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from cserver.auth import allow_list_portal
from cserver.server import CServerFactory, Limits
from cserver.testing import MemoryJournal


def make_factory(users=("alice", "bob"), limits=None, clock=None, journal=None, portal=None,
                 fsync="always"):
    """
    A factory with a MemoryJournal on a task.Clock (flushes run at
    ``clock.advance(0)``).
    """
    clock = clock or Clock()
    journal = journal or MemoryJournal(clock, fsync=fsync)
    portal = portal or allow_list_portal(users)
    return CServerFactory(journal, portal, clock, limits or Limits())


def connect(factory, port=40000):
    """
    A new connection to ``factory`` over a StringTransport; returns the
    protocol and its transport, the greeting already sent.
    """
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
    protocol.makeConnection(transport)
    return protocol, transport


def replies(transport):
    """
    The reply lines written so far (CRLF-terminated each), then clear them.
    """
    data = transport.value()
    transport.clear()
    assert data == b"" or data.endswith(b"\r\n"), data
    return [line.decode("utf-8") for line in data.split(b"\r\n")[:-1]]


def send(protocol, *lines, end=b"\n"):
    """
    Deliver request lines to ``protocol`` in one chunk.
    """
    protocol.dataReceived(b"".join(line.encode("utf-8") + end for line in lines))


class FakeReactor(MemoryReactorClock):
    """
    A MemoryReactorClock (ports recorded, never bound; a clock advanced by
    hand) that also takes ``callFromThread``: the call runs at the next
    ``advance``.
    """

    def callFromThread(self, f, *args, **kwargs):
        self.callLater(0, f, *args, **kwargs)
