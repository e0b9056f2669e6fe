"""A sender that gets every keyed message acknowledged, whatever happens to
the connection: :class:`RetryingSender`.

Each message goes as ``PUT <key> <text>`` (protocol 1.1).  While a message
is not acknowledged it stays in the sender; when the connection is lost, a
connect or an AUTH fails, or the server answers ``ERR unavailable`` (it is
stopping, or its journal refused the record), the sender reconnects after a
delay that doubles from ``initial_delay`` up to ``max_delay`` and sends every
unacknowledged message again, with its key, in the order they were given.
The server's deduplication window turns the resends of messages it had
already journaled into ``OK <seq> dup`` with their first seq: each message
is journaled once, and its Deferred fires with that seq.

A retry is safe for as long as the key is in the server's window
(``--dedup-window``, 120 s by default); a sender that cannot reach the
server for longer should stop (:meth:`RetryingSender.stop`), not resend.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from cserver.client.protocol import CserverClientProtocol, Seq, ServerError, connect, within
from cserver.dedup import KEY

_log = Logger()


class GaveUp(Exception):
    """The sender was stopped with the message not acknowledged."""


class RetryingSender:
    """
    Keyed messages to one server, each until acknowledged.

    :param reactor: connects and waits.
    :param description: a client endpoint description.
    :param user: the user to ``AUTH`` as; :param password: with it, if any.
    :param timeout: seconds for a connect, the greeting and the AUTH, and for
        each reply: a server that does not answer within them is left, and
        what it owes is sent again on a new connection.
    :ivar duplicates: messages the server answered ``dup`` (it had them from an
        earlier send).
    :ivar resends: messages sent again after a failure.
    :ivar reconnects: connections made after the first.
    """

    def __init__(self, reactor: Any, description: str, user: str,
                 password: str | None = None, initial_delay: float = 0.05,
                 max_delay: float = 2.0, timeout: float = 10.0) -> None:
        self.reactor = reactor
        self.description = description
        self.user = user
        self.password = password
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.duplicates = 0
        self.resends = 0
        self.reconnects = 0
        # key -> (text, the caller's Deferred, sent on the current connection)
        self._unacked: OrderedDict[str, list[Any]] = OrderedDict()
        self._client: CserverClientProtocol | None = None
        self._connecting = False
        self._delay = initial_delay
        self._retry_call: Any = None
        self._stopped = False
        self._connected_once = False

    def send(self, key: str, text: str) -> defer.Deferred[Seq]:
        """
        Send ``text`` with ``key`` until the server acknowledges it.

        :returns: a Deferred firing with its seq (once, however many sends it
            took), or failing with :class:`ServerError` for a refusal no
            resend can change (``conflict``, ``syntax``...), or
            :class:`GaveUp` after :meth:`stop`.
        """
        if not KEY.fullmatch(key):
            raise ValueError(f"not a key: {key!r} (1 to 128 letters, digits or ._:@/+=-)")
        if "\n" in text or "\r" in text or not text:
            raise ValueError("a message's text is one line, not empty")
        if key in self._unacked:
            raise ValueError(f"key {key!r} is already being sent")
        d: defer.Deferred[Seq] = defer.Deferred()
        entry = [text, d, False]
        self._unacked[key] = entry
        if self._client is not None:
            self._put(self._client, key, entry)
        else:
            self._ensure_connection()
        return d

    @property
    def pending(self) -> int:
        """Messages given and not yet acknowledged."""
        return len(self._unacked)

    def stop(self) -> None:
        """Stop: close the connection; every unacknowledged message fails with GaveUp."""
        self._stopped = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        client, self._client = self._client, None
        if client is not None:
            client.close()
        unacked, self._unacked = self._unacked, OrderedDict()
        for key, (_text, d, _sent) in unacked.items():
            d.errback(GaveUp(f"stopped with {key!r} not acknowledged"))

    # -- the connection ----------------------------------------------------------

    def _ensure_connection(self) -> None:
        if self._client is not None or self._connecting or self._stopped:
            return
        if self._retry_call is not None and self._retry_call.active():
            return
        self._connecting = True
        d = connect(self.reactor, self.description, self.user, self.password,
                    timeout=self.timeout)
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, client: CserverClientProtocol) -> None:
        self._connecting = False
        if self._stopped:
            client.close()
            return
        if self._connected_once:
            self.reconnects += 1
        self._connected_once = True
        self._client = client
        self._delay = self.initial_delay
        client.closed.addBoth(self._lost, client)
        for key, entry in list(self._unacked.items()):
            if entry[2]:
                self.resends += 1
            self._put(client, key, entry)

    def _failed(self, reason: Any) -> None:
        self._connecting = False
        self._retry_later()

    def _lost(self, _result: Any, client: CserverClientProtocol) -> None:
        if self._client is client:
            self._client = None
            self._retry_later()

    def _retry_later(self) -> None:
        if self._stopped or not self._unacked:
            return
        delay, self._delay = self._delay, min(self._delay * 2, self.max_delay)
        self._retry_call = self.reactor.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        self._ensure_connection()

    # -- the messages --------------------------------------------------------------

    def _put(self, client: CserverClientProtocol, key: str, entry: list[Any]) -> None:
        entry[2] = True
        sent = within(client.send(entry[0], key=key), self.timeout, self.reactor)
        sent.addCallbacks(self._acked, self._not_acked, (key, entry), {}, (key, entry, client))

    def _acked(self, seq: Seq, key: str, entry: list[Any]) -> None:
        if self._unacked.get(key) is not entry:
            return  # answered already, on an earlier connection
        del self._unacked[key]
        if seq.dup:
            self.duplicates += 1
        entry[1].callback(seq)

    def _not_acked(self, reason: Any, key: str, entry: list[Any],
                   client: CserverClientProtocol) -> None:
        if self._unacked.get(key) is not entry:
            return
        error = reason.value
        if isinstance(error, ServerError) and error.code != "unavailable":
            del self._unacked[key]
            entry[1].errback(error)
            return
        # Lost, timed out or unavailable: sent again on the next connection.
        if self._client is client and isinstance(error, ServerError):
            self._client = None
            client.close()
            self._retry_later()
        elif self._client is client and isinstance(error, defer.TimeoutError):
            client.close()  # its loss starts the retry (see _lost)
