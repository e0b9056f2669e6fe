"""Unit tests for cserver.nats.client and cserver.nats.servers: the client on a
MemoryReactorClock (its connectTCP calls answered by hand with protocols on
StringTransports), request/reply through the inbox, timeouts, no-responders,
reconnecting across URLs with backoff, and the URL parsing; no socket."""

import re

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cserver.nats import (
    NATSClient,
    NoResponders,
    NotConnected,
    Refused,
    RequestLost,
    RequestTimeout,
    Server,
    ServerPool,
    parse_url,
)

INFO = b'INFO {"server_id":"S","server_name":"n0","version":"2.10.24","max_payload":1048576}\r\n'
URLS = ["nats://127.0.0.1:4222", "nats://127.0.0.2:4223", "nats://127.0.0.3:4224"]


def hmsg(subject, sid, headers, payload, reply=b""):
    """An HMSG frame with its sizes worked out."""
    reply = b" " + reply if reply else b""
    return b"HMSG %s %d%s %d %d\r\n%s%s\r\n" % (subject, sid, reply, len(headers),
                                                  len(headers) + len(payload), headers, payload)


def result_of(d):
    """What a fired Deferred fired with (a Failure when it failed)."""
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


class ClientCase(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def make(self, urls=URLS, **kwargs):
        kwargs.setdefault("jitter", 0)
        self.client = NATSClient(self.reactor, urls, **kwargs)
        return self.client

    def attempts(self):
        """(host, port) of every connectTCP call so far."""
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def factory(self, index=-1):
        return self.reactor.tcpClients[index][2]

    def refuse(self, index=-1):
        """The connection attempt ``index`` fails."""
        self.factory(index).clientConnectionFailed(
            self.reactor.connectors[index], Failure(ConnectionRefusedError()))

    def accept(self, index=-1, info=INFO, ready=True):
        """The attempt ``index`` connects; through the handshake if ``ready``."""
        proto = self.factory(index).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(info)
        if ready:
            proto.dataReceived(b"PONG\r\n")
        return proto, transport

    def lose(self, proto, index=-1, reason=ConnectionDone):
        failure = Failure(reason())
        proto.connectionLost(failure)
        self.factory(index).clientConnectionLost(self.reactor.connectors[index], failure)

    def connected(self, **kwargs):
        """A started client, connected to the first URL: (client, proto, transport)."""
        client = self.make(**kwargs)
        client.start()
        proto, transport = self.accept()
        self.assertTrue(client.connected)
        return client, proto, transport

    def timers(self):
        """The request timers pending."""
        return [c for c in self.reactor.getDelayedCalls() if c.func == self.client._timed_out]

    @staticmethod
    def inbox(transport):
        """The inbox prefix the client subscribed to."""
        match = re.search(rb"SUB (_INBOX\.[0-9a-f]+\.)\* (\d+)\r\n", transport.value())
        assert match, transport.value()
        return match.group(1).decode(), int(match.group(2))

    @staticmethod
    def requests(transport):
        """(subject, reply) of every PUB/HPUB written."""
        return [(m.group(2).decode(), m.group(3).decode()) for m in
                re.finditer(rb"(H?PUB) (\S+) (\S+) [\d ]+\r\n", transport.value())]


class ConnectingTests(ClientCase):
    def test_start_connects_to_the_first_url(self):
        """start() opens one TCP connection, to the first URL, with the connect
        timeout; its Deferred fires at the first PONG, then connected is
        true, the server's version known and the inbox subscribed."""
        client = self.make(connect_timeout=3.0)
        d = client.start()
        self.assertEqual(self.attempts(), [("127.0.0.1", 4222)])
        self.assertEqual(self.reactor.tcpClients[0][3], 3.0)
        proto, transport = self.accept(ready=False)
        self.assertFalse(d.called)
        self.assertFalse(client.connected)
        proto.dataReceived(b"PONG\r\n")
        self.assertIsNone(result_of(d))
        self.assertTrue(client.connected)
        self.assertEqual(client.server_version, "2.10.24")
        self.assertEqual(client.server.port, 4222)
        self.assertEqual(client.reconnects, 0)
        self.inbox(transport)
        self.assertIsNone(result_of(client.when_connected()))

    def test_failed_attempts_go_round_the_urls_with_backoff(self):
        """Each refused attempt moves to the next URL at once; once every URL
        failed in a row the client waits reconnect_wait, doubling each round
        up to max_reconnect_wait."""
        client = self.make(reconnect_wait=1.0, max_reconnect_wait=3.0)
        client.start()
        expected = []
        for wait in (1.0, 2.0, 3.0, 3.0):
            for i in range(3):
                expected.append((f"127.0.0.{i + 1}", 4222 + i))
                self.assertEqual(self.attempts(), expected)
                self.refuse()
                if i < 2:
                    self.reactor.advance(0)
            self.reactor.advance(wait - 0.01)
            self.assertEqual(len(self.attempts()), len(expected))
            self.reactor.advance(0.01)
        self.assertEqual(self.attempts()[-1], ("127.0.0.1", 4222))

    def test_jitter_adds_to_the_backoff(self):
        """The backoff is lengthened by up to ``jitter`` of it, at random."""
        pool = ServerPool(["a"], reconnect_wait=1.0, jitter=0.5,
                          random=type("R", (), {"random": lambda self: 1.0})())
        self.assertEqual(pool.failed(), 1.5)
        self.assertEqual(pool.failed(), 3.0)

    def test_a_ready_connection_resets_the_backoff(self):
        """After a ready connection, the first full round of failures waits
        reconnect_wait again."""
        client = self.make(["nats://a:1"], reconnect_wait=1.0)
        client.start()
        self.refuse()
        self.reactor.advance(1.0)
        self.refuse()
        self.reactor.advance(2.0)
        proto, _ = self.accept()
        self.lose(proto)
        self.reactor.advance(0)
        self.refuse()
        count = len(self.attempts())
        self.reactor.advance(1.0)
        self.assertEqual(len(self.attempts()), count + 1)

    def test_lost_connection_reconnects_to_the_next_server_at_once(self):
        """A ready connection lost: the client is disconnected, logs it, and
        connects to the next URL at once; once ready there, reconnects is 1,
        the subscriptions are made again and the inbox is a new one."""
        client, proto, transport = self.connected()
        received = []
        sid = client.subscribe("events.>", received.append)
        first_inbox, _ = self.inbox(transport)
        self.lose(proto)
        self.assertFalse(client.connected)
        self.assertTrue(any("lost the NATS connection" in e["log_format"] for e in self.logged))
        self.reactor.advance(0)
        self.assertEqual(self.attempts()[-1], ("127.0.0.2", 4223))
        proto, transport = self.accept()
        self.assertEqual(client.reconnects, 1)
        self.assertIn(b"SUB events.> %d\r\n" % sid, transport.value())
        self.assertNotEqual(self.inbox(transport)[0], first_inbox)
        proto.dataReceived(b"MSG events.a %d 2\r\nhi\r\n" % sid)
        self.assertEqual([m.data for m in received], [b"hi"])

    def test_refused_handshake_counts_as_a_failure(self):
        """-ERR during the handshake (a bad password): the next URL is tried,
        and last_error is the Refused with the server's text."""
        client = self.make()
        client.start()
        proto, _ = self.accept(ready=False)
        proto.dataReceived(b"-ERR 'Authorization Violation'\r\n")
        self.lose(proto)
        self.assertIsInstance(client.last_error, Refused)
        self.assertEqual(client.last_error.text, "Authorization Violation")
        self.reactor.advance(0)
        self.assertEqual(self.attempts()[-1], ("127.0.0.2", 4223))

    def test_tls_url_upgrades_with_the_hosts_options(self):
        """A tls:// URL: after INFO the connection is upgraded with the TLS
        options made for that URL's host, and CONNECT says tls_required."""
        made = []
        self.make(["tls://nats.example:4443"],
                  tls_options=lambda host: made.append(host) or f"options for {host}")
        self.client.start()
        self.assertEqual(self.attempts(), [("nats.example", 4443)])
        proto = self.factory().buildProtocol(None)
        transport = StringTransport()
        transport.startTLS = lambda context: made.append(context)
        proto.makeConnection(transport)
        proto.dataReceived(INFO)
        self.assertEqual(made, ["nats.example", "options for nats.example"])
        self.assertIn(b'"tls_required":true', transport.value())

    def test_credentials_are_sent(self):
        """Credentials in the URL, or given to the client for URLs without
        any, go into CONNECT."""
        self.make(["nats://alice:s%40cret@h:1", "nats://h:2"], user="bob", password="pw")
        self.client.start()
        _, transport = self.accept(ready=False)
        self.assertIn(b'"user":"alice","pass":"s@cret"', transport.value())
        self.refuse()
        self.reactor.advance(0)
        _, transport = self.accept(ready=False)
        self.assertIn(b'"user":"bob","pass":"pw"', transport.value())

    def test_connect_urls_are_discovered(self):
        """The servers in INFO's connect_urls join the pool (once each) with
        the credentials of the server that announced them, and are tried."""
        client = self.make(["nats://u:p@127.0.0.1:4222"])
        client.start()
        info = (b'INFO {"version":"2.10.24","connect_urls":'
                b'["127.0.0.1:4222","127.0.0.9:5000","[::1]:6000"]}\r\n')
        proto, _ = self.accept(info=info)
        proto.dataReceived(b'INFO {"connect_urls":["127.0.0.9:5000","127.0.0.10:5001"]}\r\n')
        servers = client.pool.servers
        self.assertEqual([(s.host, s.port, s.discovered) for s in servers], [
            ("127.0.0.1", 4222, False), ("127.0.0.9", 5000, True), ("::1", 6000, True),
            ("127.0.0.10", 5001, True)])
        self.assertEqual(servers[1].user, "u")
        self.lose(proto)
        self.reactor.advance(0)
        self.assertEqual(self.attempts()[-1], ("127.0.0.9", 5000))

    def test_a_lame_duck_server_is_left_for_the_next(self):
        """An INFO saying ldm (the server is shutting down): the client closes
        that connection itself, a request in flight fails with RequestLost,
        and it connects to the next URL at once."""
        client, proto, transport = self.connected()
        pending = client.request("svc", b"x")
        proto.dataReceived(b'INFO {"version":"2.10.24","ldm":true}\r\n')
        self.assertTrue(transport.disconnecting)
        self.lose(proto)
        self.assertIsInstance(result_of(pending).value, RequestLost)
        self.reactor.advance(0)
        self.assertEqual(self.attempts()[-1], ("127.0.0.2", 4223))
        self.assertTrue(any("lame duck" in e["log_format"] for e in self.logged))

    def test_close_stops_reconnecting(self):
        """close() closes the ready connection and fires once it is lost; no
        reconnect follows and when_connected fails with NotConnected."""
        client, proto, transport = self.connected()
        d = client.close()
        self.assertTrue(transport.disconnecting)
        self.assertFalse(d.called)
        self.lose(proto)
        self.assertIsNone(result_of(d))
        self.reactor.advance(100)
        self.assertEqual(len(self.attempts()), 1)
        result_of(client.when_connected()).trap(NotConnected)

    def test_close_while_waiting_fails_the_waiters(self):
        """close() during the backoff cancels the retry; a start() Deferred
        still waiting fails with NotConnected."""
        client = self.make(["nats://a:1"])
        d = client.start()
        self.refuse()
        self.assertIsNone(result_of(client.close()))
        result_of(d).trap(NotConnected)
        self.reactor.advance(100)
        self.assertEqual(len(self.attempts()), 1)


class UsingTests(ClientCase):
    def test_not_connected_at_once(self):
        """Before start and while reconnecting, publish raises NotConnected and
        request and flush fail with it at once: nothing is queued."""
        client = self.make()
        self.assertRaises(NotConnected, client.publish, "a", b"x")
        result_of(client.request("a", b"x")).trap(NotConnected)
        client.start()
        proto, transport = self.accept()
        self.lose(proto)
        self.assertRaises(NotConnected, client.publish, "a", b"x")
        result_of(client.request("a", b"x")).trap(NotConnected)
        result_of(client.flush()).trap(NotConnected)
        self.assertEqual(self.reactor.getDelayedCalls()[0].getTime(), self.reactor.seconds())

    def test_publish_writes_pub(self):
        """publish writes PUB, or HPUB with headers."""
        client, proto, transport = self.connected()
        transport.clear()
        client.publish("a.b", b"hello")
        client.publish("a.b", b"x", headers={"K": "v"}, reply="r")
        self.assertEqual(transport.value(), b"PUB a.b 5\r\nhello\r\n"
                         b"HPUB a.b r 18 19\r\nNATS/1.0\r\nK: v\r\n\r\nx\r\n")

    def test_replies_are_matched_by_token(self):
        """Two requests answered in the other order each get their own reply,
        with its headers; the reply subjects are in the one inbox."""
        client, proto, transport = self.connected()
        inbox, sid = self.inbox(transport)
        first = client.request("svc", b"1")
        second = client.request("svc", b"2", headers={"K": "v"})
        (_, reply1), (_, reply2) = self.requests(transport)
        self.assertTrue(reply1.startswith(inbox) and reply2.startswith(inbox))
        self.assertNotEqual(reply1, reply2)
        proto.dataReceived(hmsg(reply2.encode(), sid, b"NATS/1.0\r\nA: b\r\n\r\n", b"two"))
        self.assertFalse(first.called)
        self.assertEqual(result_of(second), ({"A": "b"}, b"two"))
        proto.dataReceived(b"MSG %s %d 3\r\none\r\n" % (reply1.encode(), sid))
        self.assertEqual(result_of(first), ({}, b"one"))
        self.assertEqual(self.timers(), [])

    def test_request_timeout(self):
        """No reply within the timeout fails the request with RequestTimeout;
        a reply after that is ignored."""
        client, proto, transport = self.connected(request_timeout=2.0)
        _, sid = self.inbox(transport)
        d = client.request("svc", b"")
        short = client.request("svc", b"", timeout=0.5)
        self.reactor.advance(0.5)
        result_of(short).trap(RequestTimeout)
        self.assertFalse(d.called)
        self.reactor.advance(1.5)
        result_of(d).trap(RequestTimeout)
        reply = self.requests(transport)[0][1]
        proto.dataReceived(b"MSG %s %d 1\r\nx\r\n" % (reply.encode(), sid))
        self.assertFalse(transport.disconnecting)

    def test_no_responders(self):
        """A 503 status reply fails the request with NoResponders."""
        client, proto, transport = self.connected()
        _, sid = self.inbox(transport)
        d = client.request("nobody", b"")
        reply = self.requests(transport)[0][1]
        proto.dataReceived(hmsg(reply.encode(), sid, b"NATS/1.0 503\r\n\r\n", b""))
        failure = result_of(d)
        failure.trap(NoResponders)
        self.assertIn("nobody", str(failure.value))

    def test_request_lost_with_its_connection(self):
        """A request written on a connection that is lost before its reply
        fails with RequestLost (distinct from NotConnected), its timer gone."""
        client, proto, transport = self.connected()
        d = client.request("svc", b"")
        self.lose(proto)
        failure = result_of(d)
        failure.trap(RequestLost)
        self.assertNotIsInstance(failure.value, NotConnected)
        self.assertEqual(self.timers(), [])

    def test_cancel_forgets_the_request(self):
        """Cancelling a request's Deferred removes it and its timer."""
        client, proto, transport = self.connected()
        d = client.request("svc", b"")
        d.cancel()
        d.addErrback(lambda f: None)
        self.assertEqual(client._requests, {})
        self.assertEqual(self.timers(), [])

    def test_invalid_subject_fails_the_request(self):
        """A request to an invalid subject fails with ValueError, nothing sent."""
        client, proto, transport = self.connected()
        transport.clear()
        result_of(client.request("a b", b"")).trap(ValueError)
        self.assertEqual(transport.value(), b"")

    def test_subscribe_and_unsubscribe(self):
        """subscribe sends SUB and delivers Msgs (headers parsed) to the
        callback; a failing callback is logged and the connection kept;
        unsubscribe sends UNSUB and later messages are dropped."""
        client, proto, transport = self.connected()
        got = []
        sid = client.subscribe("a.*", got.append, queue="workers")
        self.assertIn(b"SUB a.* workers %d\r\n" % sid, transport.value())
        proto.dataReceived(hmsg(b"a.x", sid, b"NATS/1.0\r\nK: v\r\n\r\n", b"!", b"r"))
        self.assertEqual([(m.subject, m.reply, m.headers, m.data) for m in got],
                         [("a.x", "r", {"K": "v"}, b"!")])
        bad = client.subscribe("b", lambda msg: 1 / 0)
        proto.dataReceived(b"MSG b %d 0\r\n\r\n" % bad)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertFalse(transport.disconnecting)
        client.unsubscribe(sid)
        self.assertIn(b"UNSUB %d\r\n" % sid, transport.value())
        proto.dataReceived(b"MSG a.y %d 0\r\n\r\n" % sid)
        self.assertEqual(len(got), 1)

    def test_flush_fires_at_pong(self):
        """flush() fires when the server answers its PING."""
        client, proto, transport = self.connected()
        d = client.flush()
        self.assertFalse(d.called)
        proto.dataReceived(b"PONG\r\n")
        self.assertIsNone(result_of(d))


class URLTests(SynchronousTestCase):
    def test_forms(self):
        """nats://, tls://, user:password@, token@ and bare host[:port]."""
        self.assertEqual(parse_url("nats://h:1"), Server("h", 1))
        self.assertEqual(parse_url("h"), Server("h", 4222))
        self.assertEqual(parse_url("tls://u:p@h"), Server("h", 4222, True, "u", "p"))
        self.assertEqual(parse_url("nats://tok@h:2"), Server("h", 2, token="tok"))
        self.assertEqual(parse_url("nats://[::1]:3").host, "::1")
        self.assertEqual(Server("h", 1, True).url, "tls://h:1")

    def test_bad_urls(self):
        """Another scheme, no host, or no URL at all raise ValueError."""
        self.assertRaises(ValueError, parse_url, "http://h:1")
        self.assertRaises(ValueError, parse_url, "nats://:1")
        self.assertRaises(ValueError, ServerPool, [])
