"""Tests that pin the private Twisted names cserver leans on.

cserver reads, sets or overrides a few names Twisted does not promise to keep:
LineReceiver's line buffer (cserver.protocol), the TCP transport's write
buffers and flags (cserver.eager, and the bench's sessions in
cserver.client), TLSMemoryBIOProtocol's state and hooks (cserver.tls), and
StreamServerEndpointService's listening state (cserver.metrics).  Each test
here checks one Twisted class, on a real instance where one can be built
without the network (a LineReceiver on a StringTransport, a TCP transport on
a socketpair with a MemoryReactorClock, a TLS client wrapper on a
StringTransport), and fails naming every attribute that changed and the
cserver module that needs it.  The last test scans cserver for private
Twisted names no test here pins.

(tests/unit/test_tls_halfclose.py also fingerprints the code of
``_flushReceiveBIO``, which cserver.tls copies.)"""

import ast
import functools
import importlib
import inspect
import os
import pathlib
import select
import socket
import sys

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import abstract, defer, error, tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

try:
    from OpenSSL import SSL
    from twisted.internet import ssl
    from twisted.protocols import tls
except ImportError as e:
    _no_tls = f"the TLS extra is not installed: {e}"
else:
    _no_tls = None

try:
    from twisted.internet import unix
except ImportError:  # no AF_UNIX
    unix = None

#: Every private Twisted name cserver uses, with the modules that need it
#: (what the failures name).  The scan at the end fails on a name missing here.
PINNED = {
    "_buffer": "cserver/protocol.py (CServerProtocol.dataReceived keeps the unfinished line in it)",
    "_busyReceiving": "cserver/protocol.py (CServerProtocol.dataReceived, re-entrant data)",
    "_tempDataBuffer": "cserver/eager.py (EagerServer.write) and the bench sessions in "
                       "cserver/client/ (their write skips Twisted's empty buffer)",
    "_tempDataLen": "cserver/eager.py (EagerServer.write: nothing queued)",
    "_aborting": "cserver/eager.py (EagerServer.write after abortConnection)",
    "_writeDisconnecting": "cserver/eager.py (EagerServer.write after loseWriteConnection)",
    "_writeDisconnected": "cserver/eager.py (EagerServer.write after the write side closed)",
    "_tlsConnection": "cserver/tls.py (HalfCloseableTLSProtocol._flushReceiveBIO)",
    "_appSendBuffer": "cserver/tls.py (HalfCloseableTLSProtocol.readConnectionLost)",
    "_handshakeDone": "cserver/tls.py (HalfCloseableTLSProtocol.readConnectionLost)",
    "_lostTLSConnection": "cserver/tls.py (HalfCloseableTLSProtocol)",
    "_aborted": "cserver/tls.py (HalfCloseableTLSProtocol._flushReceiveBIO)",
    "_producer": "cserver/tls.py (HalfCloseableTLSProtocol.readConnectionLost)",
    "_flushReceiveBIO": "cserver/tls.py (HalfCloseableTLSProtocol overrides it)",
    "_flushSendBIO": "cserver/tls.py (HalfCloseableTLSProtocol._flushReceiveBIO)",
    "_shutdownTLS": "cserver/tls.py (HalfCloseableTLSProtocol overrides it)",
    "_tlsShutdownFinished": "cserver/tls.py (HalfCloseableTLSProtocol._flushReceiveBIO)",
    "_raiseSynchronously": "cserver/metrics.py (MetricsService: a port that cannot be bound "
                           "fails at once)",
    "_waitingForPort": "cserver/metrics.py (MetricsService listens before it starts)",
    "_selectables": "cserver/poll.py (the lean doPoll finds each ready fd's selectable)",
    "_poller": "cserver/poll.py (the lean doPoll polls the reactor's epoll object)",
    "_doReadOrWrite": "cserver/poll.py (the lean doPoll calls it for all but plain reads)",
    "_disconnectSelectable": "cserver/poll.py (the lean doPoll, after a read that ends "
                             "the connection)",
}


class Pins:
    """
    Collects what changed in Twisted: ``check(condition, "Class._name", what)``;
    ``done()`` fails with every change found, each with the cserver module
    that needs the name.
    """

    def __init__(self, case):
        self.case = case
        self.broken = []

    def check(self, condition, qualified, what):
        if not condition:
            name = qualified.rsplit(".", 1)[-1]
            self.broken.append(f"{qualified}: {what} -- needed by {PINNED.get(name, '?')}")

    def done(self):
        if self.broken:
            self.case.fail("Twisted changed private names cserver relies on:\n  "
                           + "\n  ".join(self.broken))


class _Lines(LineReceiver):
    delimiter = b"\n"

    def connectionMade(self):
        self.lines, self.busy, self.more = [], [], None

    def lineReceived(self, line):
        self.lines.append(line)
        self.busy.append((self._busyReceiving, self._buffer))
        if self.more is not None:
            more, self.more = self.more, None
            self.dataReceived(more)


class LineReceiverTests(SynchronousTestCase):
    """LineReceiver's ``_buffer`` and ``_busyReceiving``: CServerProtocol
    replaces dataReceived but keeps Twisted's buffer and re-entrance flag, so
    that LineReceiver's other methods see its state."""

    def connected(self):
        protocol = _Lines()
        protocol.makeConnection(StringTransport())
        return protocol

    def test_class_defaults(self):
        """``_buffer`` is an empty bytes and ``_busyReceiving`` False on the class
        and on a connected instance (CServerProtocol sets neither before its
        first dataReceived)."""
        pins = Pins(self)
        protocol = self.connected()
        for where, owner in (("class", LineReceiver), ("instance", protocol)):
            pins.check(getattr(owner, "_buffer", None) == b"", "LineReceiver._buffer",
                       f"not an empty bytes on the {where}")
            pins.check(getattr(owner, "_busyReceiving", None) is False,
                       "LineReceiver._busyReceiving", f"not False on the {where}")
        pins.done()

    def test_unfinished_line_waits_in_buffer(self):
        """The bytes after the last delimiter wait in ``_buffer``, and what is
        put there is the start of the next line; ``clearLineBuffer`` returns
        and empties it."""
        pins = Pins(self)
        protocol = self.connected()
        protocol.dataReceived(b"one\ntw")
        pins.check(getattr(protocol, "_buffer", None) == b"tw", "LineReceiver._buffer",
                   "does not hold the unfinished line")
        protocol._buffer = b"thr"
        protocol.dataReceived(b"ee\n")
        pins.check(protocol.lines == [b"one", b"three"], "LineReceiver._buffer",
                   f"is not the start of the next line (lines: {protocol.lines})")
        protocol._buffer = b"rest"
        pins.check(protocol.clearLineBuffer() == b"rest" and protocol._buffer == b"",
                   "LineReceiver._buffer", "is not what clearLineBuffer() returns and empties")
        pins.done()

    def test_busy_while_a_line_is_handled(self):
        """``_busyReceiving`` is True while lineReceived runs and False after;
        data received meanwhile is appended to ``_buffer`` and handled after
        the line, in order."""
        pins = Pins(self)
        protocol = self.connected()
        protocol.more = b"two\n"
        protocol.dataReceived(b"one\n")
        pins.check(protocol.busy[:1] == [(True, b"")], "LineReceiver._busyReceiving",
                   f"not True in lineReceived ({protocol.busy})")
        pins.check(protocol.lines == [b"one", b"two"], "LineReceiver._buffer",
                   f"re-entrant data not buffered and handled after (lines: {protocol.lines})")
        pins.check(protocol._busyReceiving is False, "LineReceiver._busyReceiving",
                   "not False after dataReceived")
        pins.done()


class _Quiet(Protocol):
    """A protocol that wants nothing."""


class TCPTransportTests(SynchronousTestCase):
    """The TCP transport's write buffers and flags (FileDescriptor's and
    tcp.Connection's), on real transports over a socketpair with a
    MemoryReactorClock: EagerServer sends straight to the socket only when
    they say nothing is queued and the connection is open for writing; the
    bench's sessions do the same on the client side."""

    def server(self):
        """A tcp.Server on one end of a socketpair; returns it and the other end."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        theirs.settimeout(5)
        transport = tcp.Server(ours, _Quiet(), ("127.0.0.1", 4321), None, 1,
                               MemoryReactorClock())
        return transport, theirs

    def test_fresh_transport(self):
        """A new tcp.Server has an empty ``_tempDataBuffer`` list, a zero
        ``_tempDataLen``, an empty ``dataBuffer``, the flags False, ``TLS``
        False and an int ``SEND_LIMIT``."""
        pins = Pins(self)
        transport, _ = self.server()
        pins.check(getattr(transport, "_tempDataBuffer", None) == [],
                   "FileDescriptor._tempDataBuffer", "not an empty list after __init__")
        pins.check(getattr(transport, "_tempDataLen", None) == 0,
                   "FileDescriptor._tempDataLen", "not 0 after __init__")
        pins.check(getattr(transport, "dataBuffer", None) == b"", "FileDescriptor.dataBuffer",
                   "not an empty bytes")
        for name, owner in (("_writeDisconnecting", "FileDescriptor"),
                            ("_writeDisconnected", "FileDescriptor"),
                            ("_aborting", "tcp._AbortingMixin")):
            pins.check(getattr(transport, name, None) is False, f"{owner}.{name}",
                       "not False on a new connection")
        pins.check(getattr(transport, "TLS", None) is False, "tcp.Server.TLS",
                   "not False without startTLS")
        pins.check(isinstance(getattr(transport, "SEND_LIMIT", None), int),
                   "FileDescriptor.SEND_LIMIT", "not an int")
        pins.done()

    def test_write_queues_in_temp_buffer(self):
        """write() appends to ``_tempDataBuffer`` and adds to ``_tempDataLen``;
        doWrite() sends it and empties both."""
        pins = Pins(self)
        transport, peer = self.server()
        transport.write(b"OK 1\r\n")
        transport.write(b"OK 2\r\n")
        pins.check(getattr(transport, "_tempDataBuffer", None) == [b"OK 1\r\n", b"OK 2\r\n"],
                   "FileDescriptor._tempDataBuffer", "write() does not append to it")
        pins.check(getattr(transport, "_tempDataLen", None) == 12,
                   "FileDescriptor._tempDataLen", "write() does not add the length")
        transport.doWrite()
        pins.check(peer.recv(100) == b"OK 1\r\nOK 2\r\n", "FileDescriptor._tempDataBuffer",
                   "doWrite() does not send what it holds")
        pins.check(transport._tempDataLen == 0 and transport._tempDataBuffer == []
                   and transport.dataBuffer == b"", "FileDescriptor._tempDataLen",
                   "not emptied once everything is sent")
        pins.done()

    def test_write_side_closed(self):
        """loseWriteConnection() sets ``_writeDisconnecting``; the next doWrite()
        closes the write side and sets ``_writeDisconnected``, after which
        write() drops its data."""
        pins = Pins(self)
        transport, peer = self.server()
        transport.loseWriteConnection()
        pins.check(transport._writeDisconnecting is True, "FileDescriptor._writeDisconnecting",
                   "not set by loseWriteConnection()")
        transport.doWrite()
        pins.check(transport._writeDisconnected is True, "FileDescriptor._writeDisconnected",
                   "not set once the write side is closed")
        pins.check(peer.recv(100) == b"", "FileDescriptor._writeDisconnected",
                   "the write side was not shut down")
        transport.write(b"late\r\n")
        pins.check(transport._tempDataLen == 0, "FileDescriptor._writeDisconnected",
                   "write() still queues after the write side closed")
        pins.done()

    def test_abort_sets_aborting(self):
        """abortConnection() sets ``_aborting`` at once (the connection is lost
        on the next reactor turn)."""
        pins = Pins(self)
        transport, _ = self.server()
        transport.abortConnection()
        pins.check(getattr(transport, "_aborting", None) is True, "tcp._AbortingMixin._aborting",
                   "not set by abortConnection()")
        pins.done()

    def test_port_makes_its_transport_class(self):
        """tcp.Port makes each accepted connection's transport with its
        ``transport`` attribute, tcp.Server by default: cserver.eager's
        eager_writes swaps it for EagerServer on a listening port."""
        pins = Pins(self)
        pins.check(getattr(tcp.Port, "transport", None) is tcp.Server, "tcp.Port.transport",
                   "not tcp.Server")
        pins.check("self.transport(" in inspect.getsource(tcp.Port.doRead),
                   "tcp.Port.transport", "doRead() does not build transports with it")
        pins.done()

    def test_client_transports(self):
        """The client transports the bench's sessions write to directly
        (tcp.Client, unix.Client) have ``socket``, ``dataBuffer`` and
        ``_tempDataBuffer`` once made (before they connect)."""
        pins = Pins(self)
        reactor = MemoryReactorClock()
        clients = [("tcp.Client", lambda: tcp.Client("127.0.0.1", 9, None, None, reactor))]
        if unix is not None:
            clients.append(("unix.Client",
                            lambda: unix.Client("/nonexistent/cserver.sock", None, reactor)))
        for name, make in clients:
            transport = make()
            sock = getattr(transport, "socket", None)
            if sock is not None:
                self.addCleanup(sock.close)
            pins.check(isinstance(sock, socket.socket), f"{name}.socket", "not a socket")
            pins.check(getattr(transport, "_tempDataBuffer", None) == [],
                       f"{name}._tempDataBuffer", "not an empty list once made")
            pins.check(getattr(transport, "dataBuffer", None) == b"", f"{name}.dataBuffer",
                       "not an empty bytes")
            pins.check(isinstance(transport, abstract.FileDescriptor), f"{name}._tempDataBuffer",
                       "no longer a FileDescriptor")
        pins.done()


class _Recording(tls.BufferingTLSTransport if _no_tls is None else object):
    """Twisted's default TLS wrapper, recording the calls to the hooks
    HalfCloseableTLSProtocol overrides or calls."""

    def _record(self, name):
        self.__dict__.setdefault("calls", []).append(name)

    def _shutdownTLS(self):
        self._record("_shutdownTLS")
        return super()._shutdownTLS()

    def _flushReceiveBIO(self):
        self._record("_flushReceiveBIO")
        return super()._flushReceiveBIO()

    def _tlsShutdownFinished(self, reason):
        self._record("_tlsShutdownFinished")
        return super()._tlsShutdownFinished(reason)


class TLSTests(SynchronousTestCase):
    """TLSMemoryBIOProtocol's state and hooks, on a client wrapper connected to
    a StringTransport (no certificate needed): HalfCloseableTLSProtocol
    subclasses BufferingTLSTransport, reads its flags and overrides
    ``_flushReceiveBIO`` and ``_shutdownTLS``."""

    skip = _no_tls

    def wrapper(self, protocol=None):
        factory = tls.TLSMemoryBIOFactory(
            ssl.CertificateOptions(), True, Factory.forProtocol(_Quiet))
        if protocol is not None:
            factory.protocol = protocol
        wrapper = factory.buildProtocol(None)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        return wrapper, transport

    def test_default_wrapper(self):
        """TLSMemoryBIOFactory wraps with BufferingTLSTransport, a
        TLSMemoryBIOProtocol (cserver.tls's half_closeable_tls replaces
        exactly that default)."""
        pins = Pins(self)
        pins.check(tls.TLSMemoryBIOFactory.protocol is tls.BufferingTLSTransport,
                   "TLSMemoryBIOFactory.protocol", "no longer BufferingTLSTransport")
        pins.check(issubclass(tls.BufferingTLSTransport, tls.TLSMemoryBIOProtocol),
                   "BufferingTLSTransport._shutdownTLS", "not a TLSMemoryBIOProtocol")
        pins.done()

    def test_state_once_connected(self):
        """After makeConnection: ``_tlsConnection`` an OpenSSL Connection,
        ``_appSendBuffer`` an empty list, ``_handshakeDone``,
        ``_lostTLSConnection`` and ``_aborted`` False, ``_producer`` None,
        and ``_flushSendBIO`` has sent the ClientHello; the hooks are methods."""
        pins = Pins(self)
        wrapper, transport = self.wrapper()
        pins.check(isinstance(getattr(wrapper, "_tlsConnection", None), SSL.Connection),
                   "TLSMemoryBIOProtocol._tlsConnection", "not an OpenSSL.SSL.Connection")
        pins.check(getattr(wrapper, "_appSendBuffer", None) == [],
                   "TLSMemoryBIOProtocol._appSendBuffer", "not an empty list")
        for name in ("_handshakeDone", "_lostTLSConnection", "_aborted"):
            pins.check(getattr(wrapper, name, None) is False, f"TLSMemoryBIOProtocol.{name}",
                       "not False on a new connection")
        pins.check(hasattr(wrapper, "_producer") and wrapper._producer is None,
                   "TLSMemoryBIOProtocol._producer", "not None without a producer")
        for name in ("_flushReceiveBIO", "_flushSendBIO", "_shutdownTLS",
                     "_tlsShutdownFinished"):
            pins.check(callable(getattr(tls.TLSMemoryBIOProtocol, name, None)),
                       f"TLSMemoryBIOProtocol.{name}", "not a method")
        pins.check(transport.value() != b"", "TLSMemoryBIOProtocol._flushSendBIO",
                   "the ClientHello was not sent")
        pins.done()

    def test_lose_connection_shuts_down_tls(self):
        """loseConnection() before the handshake aborts: ``_aborted`` is set and
        ``_shutdownTLS`` called."""
        pins = Pins(self)
        wrapper, transport = self.wrapper(_Recording)
        wrapper.loseConnection()
        pins.check("_shutdownTLS" in wrapper.__dict__.get("calls", []),
                   "TLSMemoryBIOProtocol._shutdownTLS", "not called by loseConnection()")
        pins.check(wrapper._aborted is True, "TLSMemoryBIOProtocol._aborted",
                   "not set by loseConnection() before the handshake")
        pins.done()

    def test_connection_lost_flushes_receive_bio(self):
        """connectionLost() from the transport reads what is left through
        ``_flushReceiveBIO`` and sets ``_lostTLSConnection``."""
        pins = Pins(self)
        wrapper, transport = self.wrapper(_Recording)
        wrapper.connectionLost(Failure(error.ConnectionDone()))
        pins.check("_flushReceiveBIO" in wrapper.__dict__.get("calls", []),
                   "TLSMemoryBIOProtocol._flushReceiveBIO", "not called by connectionLost()")
        pins.check(wrapper._lostTLSConnection is True, "TLSMemoryBIOProtocol._lostTLSConnection",
                   "not set by connectionLost()")
        pins.done()

    def test_tls_shutdown_finished(self):
        """Bytes that are not TLS end the connection through
        ``_tlsShutdownFinished``, which sets ``_lostTLSConnection`` and loses
        the transport's connection."""
        pins = Pins(self)
        wrapper, transport = self.wrapper(_Recording)
        wrapper.dataReceived(b"this is not TLS\r\n" * 10)
        pins.check("_tlsShutdownFinished" in wrapper.__dict__.get("calls", []),
                   "TLSMemoryBIOProtocol._tlsShutdownFinished", "not called on a TLS error")
        pins.check(wrapper._lostTLSConnection is True and transport.disconnecting,
                   "TLSMemoryBIOProtocol._tlsShutdownFinished",
                   "does not mark the TLS connection lost and close the transport")
        pins.done()


class _Endpoint:
    def __init__(self, result):
        self.result = result

    def listen(self, factory):
        return self.result


class StreamServerEndpointServiceTests(SynchronousTestCase):
    """StreamServerEndpointService's ``_raiseSynchronously`` and
    ``_waitingForPort``: MetricsService sets the first so that a port that
    cannot be bound fails at once, and reads the second to listen only once."""

    def test_waiting_for_port(self):
        """``_waitingForPort`` is None until privilegedStartService(), then the
        Deferred listen() returned."""
        pins = Pins(self)
        listening = defer.succeed("port")
        service = StreamServerEndpointService(_Endpoint(listening), Factory())
        pins.check(hasattr(service, "_waitingForPort") and service._waitingForPort is None,
                   "StreamServerEndpointService._waitingForPort", "not None before listening")
        service.privilegedStartService()
        pins.check(getattr(service, "_waitingForPort", None) is listening,
                   "StreamServerEndpointService._waitingForPort",
                   "not listen()'s Deferred once listening")
        pins.done()

    def test_raise_synchronously(self):
        """``_raiseSynchronously`` is False on the class; set True, a listen()
        that fails at once makes privilegedStartService() raise the error."""
        pins = Pins(self)
        pins.check(getattr(StreamServerEndpointService, "_raiseSynchronously", None) is False,
                   "StreamServerEndpointService._raiseSynchronously", "not False on the class")
        failure = error.CannotListenError("127.0.0.1", 1, OSError("in use"))
        service = StreamServerEndpointService(_Endpoint(defer.fail(failure)), Factory())
        service._raiseSynchronously = True
        try:
            service.privilegedStartService()
        except error.CannotListenError:
            raised = True
        else:
            raised = False
        pins.check(raised, "StreamServerEndpointService._raiseSynchronously",
                   "set True, privilegedStartService() does not raise listen()'s failure")
        pins.done()


class EPollReactorTests(SynchronousTestCase):
    """The epoll reactor's ``_selectables``, ``_poller`` and ``_doReadOrWrite``:
    cserver.poll's doPoll is Twisted's but for the logging context, and reads
    them as Twisted's does."""

    def test_poll_internals(self):
        """A new EPollReactor has ``_selectables`` (a dict of fd to selectable, with
        its waker), ``_poller`` (an epoll object with ``poll(timeout, maxevents)``),
        ``_doReadOrWrite(selectable, fd, event)``, and a ``doPoll`` that calls it
        through ``log.callWithLogger`` with those names."""
        from twisted.internet import epollreactor

        pins = Pins(self)
        reactor = epollreactor.EPollReactor()
        try:
            selectables = getattr(reactor, "_selectables", None)
            pins.check(isinstance(selectables, dict) and selectables,
                       "EPollReactor._selectables", "not a dict of fd to selectable")
            poller = getattr(reactor, "_poller", None)
            pins.check(hasattr(poller, "poll") and hasattr(poller, "register"),
                       "EPollReactor._poller", "not an epoll object")
            method = getattr(reactor, "_doReadOrWrite", None)
            pins.check(callable(method) and list(inspect.signature(method).parameters)
                       == ["selectable", "fd", "event"],
                       "_PollLikeMixin._doReadOrWrite", "not (selectable, fd, event)")
            pins.check(callable(getattr(reactor, "_disconnectSelectable", None))
                       and list(inspect.signature(reactor._disconnectSelectable).parameters)
                       == ["selectable", "why", "isRead", "faildict"],
                       "_DisconnectSelectableMixin._disconnectSelectable",
                       "not (selectable, why, isRead, faildict)")
            pins.check(reactor._POLL_IN == select.EPOLLIN, "EPollReactor._POLL_IN",
                       "not EPOLLIN: a plain read event is another number")
            read_or_write = inspect.getsource(type(reactor)._doReadOrWrite)
            pins.check(all(word in read_or_write for word in (
                "selectable.fileno() == -1", "why = _NO_FILEDESC", "why = selectable.doRead()",
                "log.err()", "self._disconnectSelectable(selectable, why, inRead)")),
                "_PollLikeMixin._doReadOrWrite",
                "no longer what cserver.poll does for a plain read event")
            source = inspect.getsource(epollreactor.EPollReactor.doPoll)
            pins.check(all(word in source for word in ("self._poller.poll(", "_selectables",
                                                       "self._doReadOrWrite",
                                                       "callWithLogger")),
                       "EPollReactor.doPoll", "no longer the loop cserver.poll copies")
        finally:
            reactor._poller.close()
            for fd in reactor._internalReaders:
                fd.connectionLost(None)
        pins.done()


# -- the scan -----------------------------------------------------------------

_OPTIONAL = ("OpenSSL", "prometheus_client", "atheris", "cryptography", "service_identity")


def _cserver_modules():
    """(dotted name, path) of every module of the checkout's cserver package."""
    root = pathlib.Path(__file__).resolve().parents[2] / "cserver"
    for path in sorted(root.rglob("*.py")):
        parts = ("cserver",) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _private(name):
    return name.startswith("_") and not name.startswith("__") and len(name) > 1


@functools.cache
def _private_names_of(cls):
    """The private names a Twisted class has: class attributes and methods, and
    the ``self._x`` its methods assign."""
    names = {name for name in vars(cls) if _private(name)}
    try:
        tree = ast.parse(inspect.getsource(cls).lstrip())
    except (OSError, TypeError, SyntaxError, IndentationError):
        return names
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id == "self"
                and _private(node.attr)):
            names.add(node.attr)
    return names


def _twisted_bases(cls):
    return [base for base in cls.__mro__[1:]
            if (base.__module__ or "").split(".")[0] == "twisted"]


class ScanTests(SynchronousTestCase):
    """No private Twisted name in cserver that no test here pins."""

    def test_every_private_twisted_name_is_pinned(self):
        """Every private name of a Twisted base that a cserver class uses,
        sets or overrides, and every private name of a Twisted class that
        cserver reads off another object (``transport._tempDataBuffer``) and
        never defines itself, is in PINNED, so a test here checks it.  The
        failure lists each new one with its file:line."""
        trees, twisted_classes, defined = {}, set(), set()
        for module, path in _cserver_modules():
            try:
                loaded = importlib.import_module(module)
            except ImportError as e:
                if (e.name or "").split(".")[0] in _OPTIONAL:
                    continue
                raise
            tree = ast.parse(path.read_text(encoding="utf-8"))
            trees[module] = (loaded, tree, path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    defined.add(node.attr)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    defined.add(node.name)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    defined.add(node.id)
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] != "twisted" or module is None:
                continue
            for value in list(vars(module).values()):
                if isinstance(value, type) and value.__module__ == name:
                    twisted_classes.add(value)

        unpinned = {}
        root = pathlib.Path(__file__).resolve().parents[2]
        for loaded, tree, path in trees.values():
            where = os.path.relpath(path, root)
            # Names used, set or overridden in classes derived from Twisted's.
            for node in ast.walk(tree):
                if not isinstance(node, ast.ClassDef):
                    continue
                cls = getattr(loaded, node.name, None)
                if not isinstance(cls, type):
                    continue
                theirs = {}
                for base in _twisted_bases(cls):
                    for name in _private_names_of(base):
                        theirs.setdefault(name, base.__qualname__)
                for child in ast.walk(node):
                    if isinstance(child, ast.Attribute):
                        name = child.attr
                    elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        name = child.name
                    elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                        name = child.id
                    else:
                        continue
                    if name in theirs and name not in PINNED:
                        unpinned.setdefault((where, child.lineno, name),
                                            f"{theirs[name]}.{name} (in {node.name})")
            # Names read off other objects: Twisted's, never defined by cserver.
            for child in ast.walk(tree):
                if (isinstance(child, ast.Attribute) and isinstance(child.ctx, ast.Load)
                        and _private(child.attr) and child.attr not in defined
                        and child.attr not in PINNED):
                    owners = sorted(cls.__qualname__ for cls in twisted_classes
                                    if child.attr in _private_names_of(cls))
                    if owners:
                        unpinned.setdefault((where, child.lineno, child.attr),
                                            f"{owners[0]}.{child.attr}")
        if unpinned:
            self.fail("cserver uses private Twisted names no test pins (add each to PINNED "
                      "and a test to tests/unit/test_twisted_private.py):\n  "
                      + "\n  ".join(f"{where}:{line}: {what}"
                                     for (where, line, _), what in sorted(unpinned.items())))
