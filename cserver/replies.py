"""The output side of a connection: replies in request order, and reading
paused while too much is owed.

A MSG's reply waits for the journal; the replies to the requests after it
wait behind it.  :class:`Reply` is one place in the queue (and, for a MSG,
the callable the journal acknowledges it through); :class:`ReplyQueue` is
the part of the protocol that queues, sends and closes, and that pauses
reading (:meth:`ReplyQueue._update_flow`) while the client is authenticating,
has too many MSGs unanswered, or is not reading its replies.
"""

from __future__ import annotations

from typing import Any

#: A connection's reply queue before its first MSG: empty, like the deque
#: that replaces it.
NO_QUEUE: Any = ()


class Reply:
    """
    A place in a connection's reply queue; for a MSG, also the callable the
    journal acknowledges it through.
    """

    __slots__ = ("line", "protocol", "close", "dup")

    #: A KeyedReply's window callback (a slot there); None for a MSG.
    done: Any = None
    name: Any = None

    def __init__(self, protocol, line=None, close=False):
        self.protocol = protocol
        self.line = line
        self.close = close
        #: A duplicate PUT's: answered ``OK <seq> dup``, and nothing journaled.
        self.dup = False

    def __call__(self, seq, reason):
        protocol = self.protocol
        if reason is not None:
            # A journal's KeyVerdict names its own code: DUPLICATE (another
            # worker wrote the key first) is answered as a duplicate.
            code = getattr(reason, "code", "unavailable")
            if code == "dup":
                self.dup = True
                self.line = b"OK %d dup\r\n" % (seq,)
                reason = None
            else:
                self.line = b"ERR %s %s\r\n" % (code.encode("ascii"), reason.encode("utf-8"))
        elif self.dup:
            self.line = b"OK %d dup\r\n" % (seq,)
        else:
            self.line = b"OK %d\r\n" % (seq,)
        if self.dup:
            protocol.factory.duplicate_done(protocol, reason is None)
        else:
            protocol.factory.message_done(protocol, reason is None)
        protocol.inflight -= 1
        queue = protocol._queue
        if queue[0] is self:
            if len(queue) == 1:
                queue.pop()
                protocol.transport.write(self.line)
            else:
                protocol._send_ready()
        if protocol.paused:
            protocol._update_flow()
        done = self.done
        if done is not None:
            # reason is None here for another worker's record (DUPLICATE):
            # as good as this one's.
            done(self.name, seq, reason)


class KeyedReply(Reply):
    """
    A ``PUT``'s place in the queue: answered as a MSG's :class:`Reply` is,
    then, for a key new to the window, ``done(name, seq, reason)`` tells the
    window what became of the key ``name`` (``done`` stays None for a
    duplicate, which the window itself answers).
    """

    __slots__ = ("name", "done")

    def __init__(self, protocol, name):
        # Reply.__init__'s work inlined: one call less per PUT.
        self.protocol = protocol
        self.line = None
        self.close = False
        self.dup = False
        self.name = name
        self.done = None


class ReplyQueue:
    """
    Ordered replies and flow control, for :class:`cserver.protocol.CServerProtocol`
    (which provides ``transport``, ``factory``, ``dataReceived`` and the
    states read here).
    """

    paused = False
    inflight = 0
    _closing = False
    _read_closed = False
    _awaiting_auth = False
    _writes_paused = False
    #: Replies in request order, once one has had to wait: a deque, made by
    #: the first MSG (an empty deque is 760 bytes, and a connection held
    #: open without a MSG never needs one).
    _queue: Any = NO_QUEUE

    # -- replies, in order --------------------------------------------------

    def _reply(self, line):
        if self._queue:
            self._queue.append(Reply(self, line))
        else:
            self.transport.write(line)

    def _close_with(self, line):
        """
        Stop taking lines; send ``line`` after every reply owed, then close.
        """
        self._closing = True
        if self._queue:
            self._queue.append(Reply(self, line, close=True))
            self._send_ready()
        else:
            self._write_and_close(line)

    def _send_ready(self):
        queue = self._queue
        write = self.transport.write
        while queue and queue[0].line is not None:
            reply = queue.popleft()
            if reply.close:
                queue.clear()
                self._write_and_close(reply.line)
            else:
                write(reply.line)

    def _write_and_close(self, line):
        transport = self.transport
        transport.write(line)
        transport.unregisterProducer()
        transport.loseConnection()

    # -- flow control -------------------------------------------------------

    def _update_flow(self):
        """
        Read from the client only while it is authenticated or authenticating
        in step, its unanswered MSGs are under the factory's bound, and the
        transport is not holding too many unsent replies.
        """
        if self._closing:
            return
        stop = (
            self._awaiting_auth
            or self.inflight >= self.factory.max_pending
            or self._writes_paused
        )
        if stop == self.paused:
            return
        self.paused = stop
        if self._read_closed:
            # Nothing more to read: take the lines that waited, then end.
            # (Resuming the transport would make it report the end again.)
            if not stop:
                self.dataReceived(b"")
                self._end_of_requests()
        elif stop:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()
            self.dataReceived(b"")

    def pauseProducing(self):
        """
        The transport's write buffer is full: stop reading requests.
        """
        self._writes_paused = True
        self._update_flow()

    def resumeProducing(self):
        """
        The transport's write buffer has drained.
        """
        self._writes_paused = False
        self._update_flow()

    def stopProducing(self):
        self._closing = True
