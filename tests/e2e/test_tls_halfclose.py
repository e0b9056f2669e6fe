"""Tests for cserver.tls: over real loopback TLS (``reactor.listenSSL``, a
self-signed certificate, a pyOpenSSL client with memory BIOs on a socket, in
a thread), a client that half-closes (bare TCP FIN, or TLS 1.3 close_notify)
still gets every reply owed; TLS 1.2 close_notify, protocols that are not
half-closeable and handshakes not done keep Twisted's behaviour.

End-to-end layer; the check that the Twisted private names cserver.tls leans
on are still there is in tests/unit/test_tls_halfclose.py (which takes
server_options, Replies and RepliesFactory from here)."""

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from .test_tls import make_certificate

SSL = pytest.importorskip("OpenSSL.SSL")
tls = pytest.importorskip("twisted.protocols.tls")
ssl = pytest.importorskip("twisted.internet.ssl")

from cserver.tls import HalfCloseableTLSProtocol, half_closeable_tls  # noqa: E402

LINES = [b"one", b"two", b"three"]
REPLIES = b"re: one\nre: two\nre: three\n"
DELAY = 0.2  # long enough that every reply is still owed when the half-close arrives


class Replies(LineReceiver):
    """
    Answers each line after DELAY; records what happens to it in
    ``self.events``; closes after its last reply once its read side is
    closed.  Not half-closeable itself: see HalfCloseableReplies.
    """

    delimiter = b"\n"

    def connectionMade(self):
        self.events = []
        self.calls = []
        self.readClosed = False
        self.factory.made.append(self)

    def lineReceived(self, line):
        self.events.append(("line", line))
        self.calls.append(reactor.callLater(DELAY, self.reply, line))

    def reply(self, line):
        self.calls = [call for call in self.calls if call.active()]
        self.events.append(("reply", line))
        self.transport.write(b"re: " + line + b"\n")
        self.closeIfDone()

    def readConnectionLost(self):
        self.events.append(("readConnectionLost",))
        self.readClosed = True
        if self.factory.resume_after_eof:
            # Makes Twisted's TCP transport read again, and report EOF again.
            self.transport.resumeProducing()
        self.closeIfDone()

    def writeConnectionLost(self):
        self.events.append(("writeConnectionLost",))

    def closeIfDone(self):
        if self.readClosed and not self.calls:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        owed = [call for call in self.calls if call.active()]
        for call in owed:
            call.cancel()
        self.events.append(("connectionLost", reason.type.__name__, len(owed)))
        if not self.factory.lost.called:
            self.factory.lost.callback(self)


@implementer(IHalfCloseableProtocol)
class HalfCloseableReplies(Replies):
    """Replies, declared half-closeable."""


class ClosesFirst(HalfCloseableReplies):
    """Closes after its last reply without waiting for the client's side to close."""

    def closeIfDone(self):
        if not self.calls:
            self.transport.loseConnection()


class RepliesFactory(protocol.ServerFactory):
    def __init__(self, protocol_class, resume_after_eof=False):
        self.protocol = protocol_class
        self.resume_after_eof = resume_after_eof
        self.made = []
        self.lost = defer.Deferred()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(str(tmp_path_factory.mktemp("tls")))


def server_options(certificate, max_tls=None):
    """The server's CertificateOptions; TLS 1.3 unless ``max_tls`` lowers it."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key, cert = certificate
    with open(key, "rb") as k, open(cert, "rb") as c:
        # cryptography objects: pyOpenSSL deprecates its own X509 and PKey here.
        private = load_pem_private_key(k.read(), None)
        public = x509.load_pem_x509_certificate(c.read())
    return ssl.CertificateOptions(
        privateKey=private, certificate=public, lowerMaximumSecurityTo=max_tls)


@pytest.fixture
def tls_server(certificate):
    """
    ``listen(protocol_class, max_tls=None, patch=True, resume_after_eof=False)``:
    a loopback ``listenSSL`` server; gives back (port number, factory).
    """
    ports = []

    def listen(protocol_class, max_tls=None, patch=True, resume_after_eof=False):
        options = server_options(certificate, max_tls)
        factory = RepliesFactory(protocol_class, resume_after_eof)
        port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
        ports.append(port)
        if patch:
            assert half_closeable_tls(port)
        return port.getHost().port, factory

    yield listen
    for port in ports:
        port.stopListening()


class Client:
    """
    A pyOpenSSL client over memory BIOs on a blocking socket (with a timeout:
    pyOpenSSL on a socket with a timeout gets WantReadError, as the socket is
    non-blocking underneath), so each TLS record and TCP FIN goes out exactly
    when asked.
    """

    def __init__(self, port, trust):
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(trust)
        context.set_verify(SSL.VERIFY_PEER, lambda connection, cert, errno, depth, ok: ok)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.tls = SSL.Connection(context, None)
        self.tls.set_connect_state()

    def flush(self):
        try:
            while True:
                self.sock.sendall(self.tls.bio_read(65536))
        except SSL.WantReadError:
            pass

    def feed(self):
        """Read from the socket into the TLS connection; False at TCP EOF."""
        data = self.sock.recv(65536)
        if data:
            self.tls.bio_write(data)
        else:
            self.tls.bio_shutdown()
        return bool(data)

    def handshake(self):
        while True:
            try:
                self.tls.do_handshake()
            except SSL.WantReadError:
                self.flush()
                assert self.feed(), "EOF during the handshake"
            else:
                self.flush()
                return

    def recv(self):
        while True:
            try:
                return self.tls.recv(65536)
            except SSL.WantReadError:
                self.flush()
                if not self.feed():
                    # bio_shutdown(): OpenSSL should now raise, not want more.
                    return self.tls.recv(65536)


def tls_client(port, trust, end, answer=None, lines=LINES):
    """
    In a thread: sends ``lines``, then ends the client's side with ``end``
    ("fin": shutdown(SHUT_WR) with no close_notify; "close_notify";
    "close_notify+fin"; "none"), then reads until the server is done, and
    answers its close_notify with ``answer`` ("close_notify", "fin" or None).
    Gives back (TLS version, bytes received, how TLS ended, whether a TCP EOF
    followed).
    """
    client = Client(port, trust)
    try:
        client.handshake()
        version = client.tls.get_protocol_version_name()
        client.tls.sendall(b"".join(line + b"\n" for line in lines))
        if end.startswith("close_notify"):
            assert client.tls.shutdown() is False  # sent; the server's not seen yet
        client.flush()
        if end.endswith("fin"):
            client.sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            try:
                received += client.recv()
            except SSL.ZeroReturnError:
                ended = "close_notify"
                break
            except SSL.Error:  # EOF without close_notify (OpenSSL: "unexpected eof")
                ended = "truncated"
                break
            except OSError as e:
                ended = type(e).__name__
                break
        if ended == "close_notify" and answer == "close_notify":
            assert client.tls.shutdown() is True  # both sides' close_notify seen
            client.flush()
        elif answer == "fin":
            client.sock.shutdown(socket.SHUT_WR)
        tcp_eof = ended == "truncated" or client.sock.recv(1) == b""
        return version, received, ended, tcp_eof
    finally:
        client.sock.close()


async def run(port, trust, end, factory, answer=None):
    outcome = await deferToThread(tls_client, port, trust, end, answer)
    server = await factory.lost.addTimeout(10, reactor)
    return outcome, server.events


def trust(certificate):
    return certificate[1]


def lines_then(*tail):
    return [("line", line) for line in LINES] + list(tail)


def all_replies(reason="ConnectionDone"):
    return lines_then(
        ("readConnectionLost",), *[("reply", line) for line in LINES], ("connectionLost", reason, 0)
    )


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("max_tls", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
async def test_bare_fin_still_gets_every_reply(tls_server, certificate, max_tls):
    """A bare TCP FIN after the requests (TLS 1.3, and TLS 1.2 too: the client has not closed
    TLS) is the end of the requests: every reply arrives, then the server's close_notify and
    its FIN; the protocol sees readConnectionLost once, then connectionLost once."""
    port, factory = tls_server(HalfCloseableReplies, max_tls=max_tls)
    (version, received, ended, tcp_eof), events = await run(
        port, trust(certificate), "fin", factory)
    assert version == ("TLSv1.2" if max_tls else "TLSv1.3")
    assert type(factory.made[0].transport) is HalfCloseableTLSProtocol
    assert (received, ended, tcp_eof) == (REPLIES, "close_notify", True)
    assert events == all_replies()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("end", ["close_notify", "close_notify+fin"])
async def test_tls13_close_notify_still_gets_every_reply(tls_server, certificate, end):
    """Over TLS 1.3 a close_notify (alone, or followed by a FIN) closes only the client's side:
    every reply arrives, then the server's close_notify and FIN; readConnectionLost is
    passed on once (not again for the FIN), connectionLost once."""
    port, factory = tls_server(HalfCloseableReplies)
    (version, received, ended, tcp_eof), events = await run(
        port, trust(certificate), end, factory)
    assert version == "TLSv1.3"
    assert (received, ended, tcp_eof) == (REPLIES, "close_notify", True)
    assert events == all_replies()


@pytest_twisted.ensureDeferred
async def test_tls12_close_notify_ends_the_connection(tls_server, certificate):
    """Over TLS 1.2 (RFC 5246 7.2.1) a close_notify is answered with ours at once, as Twisted
    does: the connection ends, no readConnectionLost, and the replies owed are lost."""
    port, factory = tls_server(HalfCloseableReplies, max_tls=ssl.TLSVersion.TLSv1_2)
    (version, received, ended, tcp_eof), events = await run(
        port, trust(certificate), "close_notify", factory)
    assert version == "TLSv1.2"
    assert (received, ended, tcp_eof) == (b"", "close_notify", True)
    assert events == lines_then(("connectionLost", "ConnectionDone", len(LINES)))


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("patch", [True, False], ids=["half_closeable_tls", "twisted"])
async def test_not_half_closeable_is_lost_on_fin(tls_server, certificate, patch):
    """A wrapped protocol that is not half-closeable loses its connection on a bare FIN, with
    or without half_closeable_tls alike: no replies, no close_notify, ConnectionLost."""
    port, factory = tls_server(Replies, patch=patch)
    (version, received, ended, tcp_eof), events = await run(
        port, trust(certificate), "fin", factory)
    assert (received, ended, tcp_eof) == (b"", "truncated", True)
    assert events == lines_then(("connectionLost", "ConnectionLost", len(LINES)))


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("end", ["fin", "close_notify"])
async def test_twisted_alone_loses_the_replies(tls_server, certificate, end):
    """Without half_closeable_tls (Twisted's own wrapper), a half-closeable protocol still
    loses every reply owed on a bare FIN or a TLS 1.3 close_notify: what this module fixes."""
    port, factory = tls_server(HalfCloseableReplies, patch=False)
    (version, received, ended, tcp_eof), events = await run(
        port, trust(certificate), end, factory)
    assert version == "TLSv1.3"
    assert received == b""
    assert ("readConnectionLost",) not in events
    assert events[-1][0] == "connectionLost" and events[-1][2] == len(LINES)


@pytest_twisted.ensureDeferred
async def test_eof_reported_again_is_passed_on_once(tls_server, certificate):
    """A resumeProducing() after the FIN makes Twisted's TCP transport read again and report
    EOF a second time: the protocol still sees readConnectionLost once, and every reply."""
    port, factory = tls_server(HalfCloseableReplies, resume_after_eof=True)
    (version, received, ended, tcp_eof), events = await run(
        port, trust(certificate), "fin", factory)
    assert (received, ended, tcp_eof) == (REPLIES, "close_notify", True)
    assert events == all_replies()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("answer", ["close_notify", "fin"])
async def test_server_closing_first_still_closes(tls_server, certificate, answer):
    """When the protocol calls loseConnection() first (our close_notify goes out), the client's
    answer ends the connection: its close_notify (TLS 1.3 too: no half-close then), or a
    bare FIN (our close_notify being out, nothing is left to wait for).  No
    readConnectionLost after loseConnection(); connectionLost once, ConnectionDone."""
    port, factory = tls_server(ClosesFirst)
    (version, received, ended, tcp_eof), events = await run(
        port, trust(certificate), "none", factory, answer)
    assert version == "TLSv1.3"
    assert (received, ended, tcp_eof) == (REPLIES, "close_notify", True)
    assert events == lines_then(
        *[("reply", line) for line in LINES], ("connectionLost", "ConnectionDone", 0))


def fin_before_handshake(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(65536)
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_fin_before_the_handshake_loses_the_connection(tls_server):
    """A FIN before the handshake completes loses the connection as Twisted does: no
    readConnectionLost, connectionLost once."""
    port, factory = tls_server(HalfCloseableReplies)
    assert await deferToThread(fin_before_handshake, port) == b""
    server = await factory.lost.addTimeout(10, reactor)
    assert [event[0] for event in server.events] == ["connectionLost"]


# The ssl: endpoint hands pyOpenSSL its deprecated X509/PKey objects: Twisted's doing.
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_half_closeable_tls_takes_only_tls_ports(certificate):
    """half_closeable_tls gives False and changes nothing for a plain TCP port (or anything
    else); for an ``ssl:`` endpoint's port it gives True, only that port's factory changes,
    and a half-close over it gets every reply."""
    plain_factory = RepliesFactory(HalfCloseableReplies)
    plain = reactor.listenTCP(0, plain_factory, interface="127.0.0.1")
    key, cert = certificate
    factory = RepliesFactory(HalfCloseableReplies)
    endpoint = serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    port = await endpoint.listen(factory)
    try:
        assert half_closeable_tls(plain) is False
        assert plain.factory is plain_factory and plain_factory.protocol is HalfCloseableReplies
        assert half_closeable_tls(object()) is False
        assert port.factory.protocol is tls.BufferingTLSTransport
        assert half_closeable_tls(port) is True
        assert port.factory.protocol is HalfCloseableTLSProtocol
        assert tls.TLSMemoryBIOFactory.protocol is tls.BufferingTLSTransport
        assert half_closeable_tls(port) is False  # no longer Twisted's wrapper
        (_, received, ended, _), events = await run(
            port.getHost().port, trust(certificate), "fin", factory)
        assert (received, ended) == (REPLIES, "close_notify")
        assert events == all_replies()
    finally:
        plain.stopListening()
        port.stopListening()
