"""End-to-end tests for cserver.eager: writes sent at once over real loopback
TCP, and what still goes through Twisted's queue (a full socket, errors, a
closing or aborted connection, TLS, a pull producer) or is left alone (UNIX
sockets), on the real reactor (pytest-twisted).  The one check that needs no
socket, the refusal of text, is in tests/unit/test_eager.py."""

import io
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import FileSender
from zope.interface import implementer

from cserver.eager import EagerServer, eager_writes
from cserver.service import CServerService

from ..common import make_factory


class Accepted(protocol.Protocol):
    """
    Fires the factory's ``made`` with itself once connected and ``lost`` with
    a 1-tuple of the reason once disconnected.
    """

    def connectionMade(self):
        self.factory.made.callback(self)

    def connectionLost(self, reason):
        self.factory.lost.callback((reason,))


class AcceptOne(protocol.ServerFactory):
    protocol = Accepted

    def __init__(self):
        self.made = defer.Deferred()
        self.lost = defer.Deferred()


@implementer(IPushProducer)
class Producer:
    """A streaming producer that counts how often it is paused."""

    paused = 0

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@pytest.fixture
def listening():
    """
    Listen on a loopback TCP port; give back a function that connects a
    plain blocking socket and waits for the server side's protocol.
    """
    ports, clients = [], []

    async def connect(eager=True, client_buffer=None):
        factory = AcceptOne()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        if eager:
            assert eager_writes(port)
        client = socket.socket()
        clients.append(client)
        if client_buffer:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_buffer)
        client.settimeout(5)
        client.connect(("127.0.0.1", port.getHost().port))
        server = await factory.made
        return client, server, factory

    yield connect
    for client in clients:
        client.close()
    for port in ports:
        port.stopListening()


def pending(client):
    """
    What the client socket can read now, without waiting.
    """
    timeout = client.gettimeout()
    client.setblocking(False)
    try:
        return client.recv(1 << 20)
    except BlockingIOError:
        return b""
    finally:
        client.settimeout(timeout)


def read_exactly(client, count):
    data = b""
    while len(data) < count:
        chunk = client.recv(count - len(data))
        assert chunk, f"closed after {len(data)} of {count} bytes"
        data += chunk
    return data


@pytest_twisted.ensureDeferred
async def test_a_write_reaches_the_socket_at_once(listening):
    """With nothing queued, write() sends at once: the peer can read it before the reactor
    runs again, and the transport is not watched for writability."""
    client, server, _ = await listening()
    assert type(server.transport) is EagerServer
    server.transport.write(b"OK 1\r\n")
    assert server.transport not in reactor.getWriters()
    assert pending(client) == b"OK 1\r\n"


@pytest_twisted.ensureDeferred
async def test_queued_transport_waits_for_the_reactor(listening):
    """Without eager_writes the same write is queued: nothing on the wire until the reactor
    finds the socket writable (the difference eager writes make)."""
    client, server, _ = await listening(eager=False)
    assert type(server.transport) is tcp.Server
    server.transport.write(b"OK 1\r\n")
    assert server.transport in reactor.getWriters()
    assert pending(client) == b""
    assert await deferToThread(read_exactly, client, 6) == b"OK 1\r\n"


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_is_queued_in_order(listening):
    """A write larger than the socket takes goes out in part; the rest and every later write
    are queued behind it, the producer is paused, and the peer reads it all in order."""
    client, server, _ = await listening(client_buffer=4096)
    transport = server.transport
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    producer = Producer()
    transport.registerProducer(producer, True)
    first = bytes(range(256)) * 400  # 100 KiB: more than both buffers hold
    transport.write(first)
    assert transport.dataBuffer or transport._tempDataLen, "the socket took it all"
    assert transport in reactor.getWriters()
    assert producer.paused == 1
    # Room in the socket again, while the rest of the first write is queued.
    head = read_exactly(client, 4096)
    transport.write(b"second\r\n")
    transport.write(b"third\r\n")
    assert transport._tempDataLen >= len(b"second\r\nthird\r\n")
    # In a thread: the reactor must run to send the queued bytes.
    rest = await deferToThread(read_exactly, client, len(first) + 15 - len(head))
    assert head + rest == first + b"second\r\nthird\r\n"


@pytest_twisted.ensureDeferred
async def test_a_write_to_a_reset_connection_loses_it_the_usual_way(listening):
    """A send that fails (the peer reset the connection) raises nothing in write(); the
    connection is lost through the reactor, as with Twisted's own transport."""
    client, server, factory = await listening()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a linger of 0: RST
    for _ in range(2):  # the first send may still succeed; the second meets the RST
        server.transport.write(b"OK 1\r\n")
    (reason,) = await factory.lost
    assert not server.transport.connected
    assert reason.type.__name__ in ("ConnectionLost", "ConnectionDone")


@pytest_twisted.ensureDeferred
async def test_writes_after_lose_connection_reach_the_peer_before_the_close(listening):
    """A write after loseConnection() (which goes through Twisted's queue) still reaches the
    peer, after the earlier ones and before the close."""
    client, server, factory = await listening()
    server.transport.write(b"OK bye\r\n")
    server.transport.loseConnection()
    server.transport.write(b"late\r\n")
    assert server.transport.disconnecting
    (reason,) = await factory.lost
    assert reason.type.__name__ == "ConnectionDone"
    assert read_exactly(client, 14) == b"OK bye\r\nlate\r\n"
    assert client.recv(10) == b""


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("eager", [True, False])
async def test_a_pull_producer_is_asked_for_more_until_it_is_done(listening, eager):
    """A pull (non-streaming) producer such as FileSender is asked for more only when the queue
    drains, so its writes go through the queue: the whole file arrives, eager or not."""
    client, server, factory = await listening(eager=eager)
    data = bytes(range(256)) * 800  # 200 KiB, in FileSender's 64 KiB chunks
    done = FileSender().beginFileTransfer(io.BytesIO(data), server.transport)
    done.addCallback(lambda _: server.transport.loseConnection())
    received = await deferToThread(read_exactly, client, len(data))
    await factory.lost
    assert received == data


@pytest_twisted.ensureDeferred
async def test_nothing_goes_out_after_abort_connection(listening):
    """After abortConnection() a write is dropped, as Twisted's transport drops it: the peer
    gets a reset and none of the bytes."""
    client, server, factory = await listening()
    server.transport.abortConnection()
    server.transport.write(b"after the abort\r\n")
    await factory.lost
    try:
        received = client.recv(100)
    except ConnectionResetError:
        received = b""
    assert received == b""


def test_only_plain_tcp_ports_are_changed(tmp_path):
    """eager_writes changes a TCP port's transport and leaves a UNIX socket's port alone."""
    factory = AcceptOne()
    tcp_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    unix_port = reactor.listenUNIX(str(tmp_path / "s"), factory)
    try:
        assert eager_writes(tcp_port) is True
        assert tcp_port.transport is EagerServer
        assert eager_writes(unix_port) is False
        assert unix_port.transport is not EagerServer
        assert eager_writes(object()) is False
    finally:
        tcp_port.stopListening()
        unix_port.stopListening()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("eager", [True, False])
async def test_the_service_gives_its_port_eager_writes(eager):
    """CServerService(eager=True) listens with EagerServer connections; eager=False keeps
    Twisted's transport."""
    factory = make_factory()
    endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    service = CServerService(factory, endpoint, reactor, eager=eager)
    service.startService()
    try:
        assert service.port is not None
        assert (service.port.transport is EagerServer) is eager
    finally:
        await service.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_after_start_tls_writes_go_through_tls(listening, tmp_path):
    """Once startTLS() is called on the transport, a write goes to the TLS layer, never to the
    socket as plain text."""
    pytest.importorskip("OpenSSL")
    from twisted.internet.ssl import DefaultOpenSSLContextFactory

    from .test_tls import make_certificate

    key_path, cert_path = make_certificate(str(tmp_path))
    client, server, _ = await listening()
    server.transport.startTLS(DefaultOpenSSLContextFactory(key_path, cert_path))
    server.transport.write(b"secret\r\n")
    assert b"secret" not in pending(client)
