"""One client connection: the line protocol 1.1 state machine.

Lines end with LF (a CR before it is dropped); replies end with CRLF and go
out in request order, even when a MSG's reply waits on the journal.  The
connection reaches the shared state only through ``self.factory``
(:class:`cserver.server.CServerFactory`).  See docs/protocol.rst.
"""

from collections import deque

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
    ISSLTransport,
)
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from cserver import __version__
from cserver.auth import IUser, credentials_for
from cserver.dedup import KEY_BYTES
from cserver.replies import NO_QUEUE, KeyedReply, Reply, ReplyQueue

#: Failed AUTHs after which a connection is closed.
MAX_AUTH_FAILURES = 3
#: The longest user name AUTH takes, in bytes of UTF-8; a longer one is
#: refused (``ERR syntax``) and journaled clipped to this length.
MAX_USER_BYTES = 256

#: The protocol version this server speaks: 1.1 adds PUT.
PROTOCOL = "1.1"
_GREETING = b"HELLO cserver %s proto=%s\r\n" % (__version__.encode("ascii"),
                                                 PROTOCOL.encode("ascii"))
@implementer(IPushProducer, IHandshakeListener, IHalfCloseableProtocol)
class CServerProtocol(ReplyQueue, LineReceiver):
    """
    The server side of one connection.

    :ivar user: the authenticated user name, or None.
    :ivar mine: messages acknowledged on this connection.
    :ivar inflight: MSGs received here and not yet answered.
    :ivar active: set on every line; the factory's idle sweep clears it.
    """

    delimiter = b"\n"
    log = Logger()

    user = None
    peer = "-"
    host = "-"
    mine = 0
    active = True
    idle_since = 0.0
    _counted = False
    _auth_failures = 0
    connected_at = 0.0

    # -- connection ---------------------------------------------------------

    def connectionMade(self):
        factory = self.factory
        address = self.transport.getPeer()
        self.peer = _describe_peer(address)
        self.host = getattr(address, "host", self.peer)
        if not factory.connection_made(self):
            self.transport.write(b"ERR busy\r\n")
            self._closing = True
            self.transport.loseConnection()
            return
        self._counted = True
        self.MAX_LENGTH = factory.max_line
        if not ISSLTransport.providedBy(self.transport):
            self.transport.registerProducer(self, True)
        self.transport.write(_GREETING)

    def handshakeCompleted(self):
        """
        TLS is up: only now become the transport's producer.  During the
        handshake the TLS layer buffers the greeting and pauses its producer;
        pausing would stop reading, and so stall the handshake itself.
        """
        if not self._closing:
            self.transport.registerProducer(self, True)

    def connectionLost(self, reason):
        self._closing = True
        if self._counted:
            self._counted = False
            self.factory.connection_lost(self)

    def readConnectionLost(self):
        """
        The client shut down its sending side (``shutdown(SHUT_WR)``,
        ``nc -N``): no request comes after the ones received.  Those are
        still answered, in order -- lines waiting while reading was paused
        are taken first -- and then the connection is closed.  An unfinished
        last line (no LF) is not a request.
        """
        if self._read_closed:
            return
        self._read_closed = True
        self._end_of_requests()

    def writeConnectionLost(self):
        """
        The server never shuts down its sending side alone.
        """

    def _end_of_requests(self):
        """
        After the client's end of file: once no line waits to be taken,
        close after every reply owed.
        """
        if self._read_closed and not self._closing and not self.paused:
            self._close_with(b"")

    def timed_out(self):
        """
        Say ``ERR timeout`` and close: idle, or not authenticated in time.
        """
        if not self._closing:
            self._close_with(b"ERR timeout\r\n")

    # -- lines --------------------------------------------------------------

    def dataReceived(self, data):
        """
        Split lines in one pass over the buffer (LineReceiver's split costs
        a copy of the rest of the buffer per line).
        """
        if self._busyReceiving:
            self._buffer += data
            return
        if (
            data.find(b"\n") == len(data) - 1
            and data
            and not self._buffer
            and len(data) <= self.MAX_LENGTH
            and not self.paused
        ):
            # One whole line, the common case of a client awaiting each reply.
            self._busyReceiving = True
            try:
                if data.startswith(b"MSG ") and self.user is not None and not self._closing:
                    self.active = True
                    self._msg(data[4:-2] if data.endswith(b"\r\n") else data[4:-1])
                elif data.startswith(b"PUT ") and self.user is not None and not self._closing:
                    self.active = True
                    self.do_put(data[4:-2] if data.endswith(b"\r\n") else data[4:-1])
                else:
                    self.lineReceived(data[:-1])
            finally:
                self._busyReceiving = False
            return
        self._busyReceiving = True
        try:
            buffer, self._buffer = self._buffer + data, b""
            start = 0
            limit = self.MAX_LENGTH
            while not self.paused and not self._closing:
                end = buffer.find(b"\n", start)
                if end < 0:
                    break
                if end - start > limit:
                    start = len(buffer)
                    self.lineLengthExceeded(b"")
                    break
                self.lineReceived(buffer[start:end])
                start = end + 1
            rest = buffer[start:] + self._buffer
            # Only the unfinished line can be too long yet: whole lines left
            # while reading is paused are checked when they are taken.
            if not self._closing and len(rest) - (rest.rfind(b"\n") + 1) > limit:
                rest = b""
                self.lineLengthExceeded(b"")
            self._buffer = rest if not self._closing else b""
        finally:
            self._busyReceiving = False

    def lineLengthExceeded(self, line):
        self._close_with(b"ERR toolong\r\n")

    def lineReceived(self, line):
        if self._closing:
            return
        self.active = True
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return
        word, _, arg = line.partition(b" ")
        handler = _VERBS.get(word) or _VERBS.get(word.upper())
        if handler is None:
            try:
                word = word.decode("utf-8")
            except UnicodeDecodeError:
                self._reply(b"ERR encoding line is not valid UTF-8\r\n")
                return
            self._reply(b"ERR unknown %s\r\n" % (_clip(word).encode("utf-8"),))
            return
        handler(self, arg)

    def _msg(self, body):
        """
        The hot path: the bytes after ``MSG `` from an authenticated client.
        """
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(b"ERR encoding line is not valid UTF-8\r\n")
            return
        self._take_message(text)

    def do_msg(self, body):
        if self.user is None:
            self._reply(b"ERR noauth authenticate first\r\n")
            return
        self._msg(body)

    def _take_message(self, text):
        """
        Hand ``text`` to the factory to journal; its reply waits in the
        queue for the journal's acknowledgement.
        """
        if not text:
            self._reply(b"ERR syntax MSG needs a text\r\n")
            return
        reply = Reply(self)
        queue = self._queue
        if queue is NO_QUEUE:
            queue = self._queue = deque()
        queue.append(reply)
        self.inflight += 1
        factory = self.factory
        factory.submit_message(self, text, reply)
        if self.inflight >= factory.max_pending:
            self._update_flow()

    def do_put(self, body):
        """
        ``PUT <key> <text>``: a keyed message, journaled once however often
        it is sent within the deduplication window (:mod:`cserver.dedup`).
        """
        if self.user is None:
            self._reply(b"ERR noauth authenticate first\r\n")
            return
        key, _, text = body.partition(b" ")
        if not 0 < len(key) <= 128 or key.translate(None, KEY_BYTES):
            self._reply(b"ERR syntax PUT needs a key of 1 to 128 letters, digits or "
                        b"._:@/+=- and a text\r\n")
            return
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(b"ERR encoding line is not valid UTF-8\r\n")
            return
        if not text:
            self._reply(b"ERR syntax PUT needs a text\r\n")
            return
        key = key.decode("ascii")
        factory = self.factory
        verdict, name = factory.key_verdict(self.user, key, text)
        if verdict == "conflict":
            self._reply(b"ERR conflict key %s was sent with another text\r\n"
                        % (key.encode("ascii"),))
            return
        if verdict == "unsupported":
            self._reply(b"ERR unsupported %s\r\n" % (factory.dedup_off.encode("utf-8"),))
            return
        reply = KeyedReply(self, name)
        reply.dup = verdict == "duplicate"
        queue = self._queue
        if queue is NO_QUEUE:
            queue = self._queue = deque()
        queue.append(reply)
        self.inflight += 1
        factory.submit_keyed(self, key, text, reply)
        if self.inflight >= factory.max_pending:
            self._update_flow()

    def do_auth(self, body):
        if self.user is not None:
            self._reply(b"ERR state already authenticated\r\n")
            return
        factory = self.factory
        retry = factory.auth_retry_after(self)
        if retry is not None:
            self._count_failure(b"ERR auth throttled: too many failed AUTHs from your address; "
                                b"retry in %d s\r\n" % (retry,))
            factory.auth_refused(self)
            return
        user, _, password = body.partition(b" ")
        if len(user) > MAX_USER_BYTES:
            clipped = user[:MAX_USER_BYTES].decode("utf-8", "ignore")
            self._auth_failed(clipped, b"ERR syntax user name too long (the most is %d bytes)"
                                       b"\r\n" % (MAX_USER_BYTES,), length=len(user))
            return
        try:
            user = user.decode("utf-8")
            password = password.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(b"ERR encoding line is not valid UTF-8\r\n")
            return
        if not user:
            self._reply(b"ERR syntax AUTH needs a user name\r\n")
            return
        credentials = credentials_for(factory.portal_interfaces, user, password or None)
        if credentials is None:
            self._auth_failed(user, b"ERR auth a password is required\r\n")
            return
        check_now = factory.check_now
        if check_now is not None:
            name = check_now(credentials)
            if name is None:
                self._auth_failed(user, b"ERR auth wrong user or password\r\n")
            else:
                self._authenticated(name)
            return
        # Nothing can be owed before AUTH succeeds (only MSGs wait, and they
        # need a user), and no line is read while a login is under way, so
        # the reply is written straight away when the login ends.
        self._awaiting_auth = True
        d = factory.portal.login(credentials, None, IUser)
        d.addCallbacks(self._logged_in, self._login_failed, None, None, (user,))
        if self._awaiting_auth:
            self._update_flow()

    def _logged_in(self, result):
        _interface, avatar, _logout = result
        self._awaiting_auth = False
        if self._closing:
            return
        self._authenticated(avatar.name)
        if self.paused:
            self._update_flow()

    def _authenticated(self, name):
        self.user = name
        self._reply(b"OK %s\r\n" % (name.encode("utf-8"),))

    def _login_failed(self, failure, user):
        self._awaiting_auth = False
        if not failure.check(UnauthorizedLogin):
            self.log.failure("AUTH for {user} failed unexpectedly", failure, user=user)
        if not self._closing:
            self._auth_failed(user, b"ERR auth wrong user or password\r\n")
            if self.paused:
                self._update_flow()

    def _auth_failed(self, user, line, length=None):
        """
        Count and journal a failed AUTH; the third on a connection closes it.
        """
        self.factory.auth_failed(self, user, line[4:-2].decode("utf-8"), length)
        self._count_failure(line)

    def _count_failure(self, line):
        self._auth_failures += 1
        if self._auth_failures >= MAX_AUTH_FAILURES:
            self._close_with(line)
        else:
            self._reply(line)

    def do_stats(self, _body=b""):
        stats = self.factory.stats(self)
        body = " ".join(f"{key}={value}" for key, value in stats.items())
        self._reply(b"OK %s\r\n" % (body.encode("utf-8"),))

    def do_quit(self, _body=b""):
        self._close_with(b"OK bye\r\n")

#: The request verbs and their handlers, each called with the bytes after
#: the verb's space (verbs are matched as sent, then upper-cased).
_VERBS = {
    b"MSG": CServerProtocol.do_msg,
    b"PUT": CServerProtocol.do_put,
    b"AUTH": CServerProtocol.do_auth,
    b"STATS": CServerProtocol.do_stats,
    b"QUIT": CServerProtocol.do_quit,
}


def _clip(text, limit=40):
    return text if len(text) <= limit else text[:limit] + "..."


def _describe_peer(address):
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "type", "unix").lower()
    return f"{host}:{address.port}"
