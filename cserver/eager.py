"""
Eager writes: a TCP transport that sends a write straight to the socket
when nothing is queued ahead of it.

Twisted's TCP transport queues every write and sends it when the reactor
next reports the socket writable (twisted#5303).  For a server that answers
each request with one short line, that is, per reply, an ``epoll_ctl`` to
watch the socket for writing, one more event out of ``epoll_wait``, a
``doWrite`` call, and an ``epoll_ctl`` to stop watching: more than the
``send`` itself.  :class:`EagerServer` tries the ``send`` at once; whatever
the socket does not take (a full send buffer, an error) goes the usual way,
so order, flow control (a streaming producer is still paused when the
queue grows) and error handling are Twisted's own.  So does every write
while a pull producer is registered (only a drained queue asks it for
more), after ``loseConnection()`` or ``abortConnection()``, and under
``startTLS()``.

:func:`eager_writes` gives a listening TCP port's new connections this
transport.  ``twistd cserver`` does so unless ``--writes queued``.
"""

from twisted.internet import tcp


class EagerServer(tcp.Server):
    """
    A server-side TCP connection whose writes go to the socket at once when
    nothing is queued before them and the connection is open for writing.
    """

    def write(self, data):
        if (
            self._tempDataLen
            or self.dataBuffer
            or type(data) is not bytes
            or len(data) > self.SEND_LIMIT
            or not self.connected
            or self.disconnecting
            or self._aborting
            or self._writeDisconnecting
            or self._writeDisconnected
            or self.TLS
            or (self.producer is not None and not self.streamingProducer)
        ):
            tcp.Server.write(self, data)
            return
        try:
            sent = self.socket.send(data)
        except OSError:
            # A full socket (EAGAIN) or a broken connection: queue it all; the
            # reactor's own write then waits, or meets the error and loses the
            # connection the usual way.
            sent = 0
        if sent < len(data):
            tcp.Server.write(self, data[sent:])


def eager_writes(port):
    """
    Give the connections ``port`` accepts from now on an :class:`EagerServer`
    transport.

    :param port: a listening port, as an endpoint's ``listen`` gives it.
    :returns: True when done; False when ``port`` is not a plain TCP port
        (UNIX sockets, other reactors' ports), which is left as it is.
    """
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = EagerServer
        return True
    return False
