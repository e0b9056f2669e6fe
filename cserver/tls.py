"""
Half-closeable TLS: a client may close its sending side and still receive
every reply it is owed.

Twisted's TLS wrapper (:class:`twisted.protocols.tls.TLSMemoryBIOProtocol`,
what ``listenSSL`` and the ``ssl:`` endpoint put around each connection's
protocol) does not provide ``IHalfCloseableProtocol``.  So when a client sends
its last request and then a bare TCP FIN, the TCP transport drops the whole
connection; and when it sends a TLS close_notify and keeps reading, Twisted
answers with its own close_notify at once and closes.  Either way the replies
the server still owes are lost.

What TLS allows: RFC 8446 section 6.1 (TLS 1.3) lets either side close its
write side with close_notify while the other keeps sending ("half-close").
RFC 5246 section 7.2.1 (TLS 1.2 and earlier) requires answering a close_notify
with one's own at once, discarding pending writes; over TLS 1.2 a close_notify
therefore still ends the connection the way Twisted ends it.  A TCP FIN
without close_notify is, to TLS, a possible truncation.  For a line protocol
whose every request is a complete, authenticated TLS record ending in a
newline, a truncated stream only loses requests that were never whole, so a
bare FIN (after the handshake, with any TLS version) is taken as the end of
the requests: the wrapped protocol gets ``readConnectionLost()``, and the
connection stays open for its replies.

:class:`HalfCloseableTLSProtocol` does this for wrapped protocols that provide
``IHalfCloseableProtocol``; for any other it behaves as Twisted's class.
:func:`half_closeable_tls` gives a listening ``ssl:`` port's new connections
this wrapper.
"""

from __future__ import annotations

from typing import Any, cast

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IHalfCloseableProtocol)
class HalfCloseableTLSProtocol(BufferingTLSTransport):
    """
    A TLS server connection that passes the peer's half-close on to a
    half-closeable wrapped protocol: a bare TCP FIN after the handshake, or a
    close_notify over TLS 1.3.  After it, the wrapped protocol may still
    write; its ``loseConnection()`` sends our close_notify and closes the TCP
    connection without waiting for the peer's.

    A subclass of Twisted's default (:class:`BufferingTLSTransport`, which
    aggregates small writes) rather than of ``TLSMemoryBIOProtocol``, so that
    connections keep Twisted's write behaviour.
    """

    # The peer will send nothing more: it sent a FIN, or a close_notify we
    # passed on as a half-close.
    _readClosed = False

    def _halfCloseable(self) -> IHalfCloseableProtocol | None:
        # Adapted the way Twisted's TCP transport looks for it.
        return IHalfCloseableProtocol(self.wrappedProtocol, None)

    def _passOnHalfClose(self) -> None:
        self._readClosed = True
        protocol = self._halfCloseable()
        assert protocol is not None
        protocol.readConnectionLost()

    def readConnectionLost(self) -> None:
        """
        The TCP transport read EOF (a FIN).  Pass it on as a half-close when
        the handshake is done and the wrapped protocol is half-closeable;
        otherwise lose the connection as Twisted's TCP transport does for a
        protocol that is not half-closeable.
        """
        if self._readClosed:
            # Twisted reads again (and reports EOF again) after a
            # resumeProducing(), or after a close_notify passed on already.
            return
        if self._lostTLSConnection or not self._handshakeDone or self._halfCloseable() is None:
            cast(Any, self.transport).connectionLost(Failure(ConnectionDone()))
            return
        if not self.disconnecting:
            self._passOnHalfClose()
            return
        # loseConnection() came first and sent our close_notify; Twisted waits
        # for the peer's, which will not come now.
        self._readClosed = True
        if not self._appSendBuffer and self._producer is None:
            cast(Any, self.transport).loseConnection()

    def writeConnectionLost(self) -> None:
        """
        Passed on to a half-closeable wrapped protocol (the TCP transport
        calls it after its own ``loseWriteConnection()``).
        """
        protocol = self._halfCloseable()
        if protocol is not None:
            protocol.writeConnectionLost()

    def dataReceived(self, data: bytes) -> None:
        # RFC 8446 section 6.1: data received after a closure alert MUST be
        # ignored.  Not feeding it to OpenSSL also keeps the BIO from growing.
        if not self._readClosed:
            super().dataReceived(data)

    def _shutdownTLS(self) -> None:
        super()._shutdownTLS()
        if self._readClosed:
            # Our close_notify is out; the peer's came already or never will.
            # (Twisted's closes the TCP connection only once both are seen.)
            cast(Any, self.transport).loseConnection()

    def _flushReceiveBIO(self) -> None:
        # A copy of TLSMemoryBIOProtocol._flushReceiveBIO (pinned by
        # tests/test_tls_halfclose.py) but for two changes: the loop also ends
        # once the read side is closed, and a close_notify over TLS 1.3, to a
        # half-closeable protocol that has not called loseConnection(), is
        # passed on as a half-close instead of ending the connection.
        while not self._lostTLSConnection and not self._readClosed:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                if (
                    self._halfCloseable() is not None
                    and not self.disconnecting
                    and self._tlsConnection.get_protocol_version_name() == "TLSv1.3"
                ):
                    self._passOnHalfClose()
                else:
                    self._shutdownTLS()
                    self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()


def half_closeable_tls(port: object) -> bool:
    """
    Give the connections ``port`` accepts from now on a
    :class:`HalfCloseableTLSProtocol` around their protocol.

    :param port: a listening port, as an ``ssl:`` endpoint's ``listen`` or
        ``reactor.listenSSL`` gives it.
    :returns: True when done; False when ``port`` is not a TCP port whose
        factory is a ``TLSMemoryBIOFactory`` with Twisted's default wrapper
        (plain TCP, UNIX sockets, other reactors' ports), which is left as it
        is.
    """
    factory = getattr(port, "factory", None)
    if (
        isinstance(port, tcp.Port)
        and isinstance(factory, TLSMemoryBIOFactory)
        and factory.protocol is BufferingTLSTransport
    ):
        factory.protocol = HalfCloseableTLSProtocol
        return True
    return False
