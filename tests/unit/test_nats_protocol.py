"""Unit tests for cserver.nats.protocol: the NATS frames read and written, on a
StringTransport and a task.Clock (no socket, no reactor): the handshake (INFO,
TLS upgrade, CONNECT, PING, ready at PONG), MSG and HMSG split anywhere, -ERR,
keep-alive and the caps on malformed and oversized frames."""

import msgspec
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cserver import __version__
from cserver.nats.protocol import NATSProtocol
from cserver.nats.wire import (
    MAX_CONTROL_LINE,
    ConnectOptions,
    NATSError,
    PayloadTooLarge,
    ProtocolError,
    Refused,
    StaleConnection,
    encode_headers,
    parse_headers,
)

INFO = b'INFO {"server_id":"S1","version":"2.10.24","max_payload":1048576,"headers":true}\r\n'


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS calls, and what was written before."""

    def __init__(self):
        super().__init__()
        self.tls = []

    def startTLS(self, context):
        self.tls.append((context, self.value()))


def result_of(d):
    """What a fired Deferred fired with (a Failure when it failed)."""
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


def connect_frame(transport):
    """The CONNECT frame's JSON, from what was written to ``transport``."""
    line = transport.value().split(b"\r\n")[0]
    assert line.startswith(b"CONNECT "), line
    return msgspec.json.decode(line[8:])


class Case(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.messages = []
        self.errors = []
        self.infos = []

    def make(self, options=None, **kwargs):
        proto = NATSProtocol(self.clock, options, on_message=self.on_message,
                             on_error=self.errors.append, on_info=self.infos.append,
                             **kwargs)
        transport = TLSStringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def on_message(self, subject, sid, reply, headers, payload):
        self.messages.append((subject, sid, reply, headers, payload))

    def ready(self, **kwargs):
        """A protocol through INFO and the first PONG, its transport cleared."""
        proto, transport = self.make(**kwargs)
        proto.dataReceived(INFO)
        proto.dataReceived(b"PONG\r\n")
        self.assertTrue(proto.is_ready)
        transport.clear()
        return proto, transport


class HandshakeTests(Case):
    def test_connect_and_ping_follow_info_and_pong_makes_it_ready(self):
        """Nothing is sent before INFO; then CONNECT (verbose and pedantic off,
        headers and no_responders on, protocol 1, name, lang, version) and
        PING; ready fires with the INFO at the first PONG, not before."""
        proto, transport = self.make(ConnectOptions(name="journal"))
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(INFO)
        connect = connect_frame(transport)
        self.assertEqual(connect, {
            "verbose": False, "pedantic": False, "tls_required": False, "name": "journal",
            "lang": "python-twisted", "version": __version__, "protocol": 1,
            "headers": True, "no_responders": True})
        self.assertTrue(transport.value().endswith(b"}\r\nPING\r\n"))
        self.assertFalse(proto.ready.called)
        proto.dataReceived(b"PONG\r\n")
        self.assertEqual(result_of(proto.ready)["server_id"], "S1")
        self.assertEqual(proto.max_payload, 1048576)

    def test_user_and_password_or_token_are_sent(self):
        """CONNECT carries user and pass, or auth_token, when given."""
        proto, transport = self.make(ConnectOptions(user="u", password="p"))
        proto.dataReceived(INFO)
        connect = connect_frame(transport)
        self.assertEqual((connect["user"], connect["pass"]), ("u", "p"))
        self.assertNotIn("auth_token", connect)
        proto, transport = self.make(ConnectOptions(token="secret"))
        proto.dataReceived(INFO)
        self.assertEqual(connect_frame(transport)["auth_token"], "secret")

    def test_tls_required_upgrades_before_connect(self):
        """INFO with tls_required: startTLS with the given context before any
        byte of CONNECT is written."""
        context = object()
        proto, transport = self.make(tls_context=lambda: context)
        proto.dataReceived(INFO.replace(b'"headers":true', b'"tls_required":true'))
        self.assertEqual(transport.tls, [(context, b"")])
        connect_frame(transport)

    def test_client_asking_tls_upgrades_too(self):
        """ConnectOptions(tls=True) upgrades even when INFO does not require it,
        and CONNECT says tls_required."""
        context = object()
        proto, transport = self.make(ConnectOptions(tls=True), tls_context=lambda: context)
        proto.dataReceived(INFO)
        self.assertEqual(transport.tls, [(context, b"")])
        self.assertTrue(connect_frame(transport)["tls_required"])

    def test_tls_required_without_a_context_drops(self):
        """A server requiring TLS from a protocol without a TLS context: the
        connection is dropped, CONNECT never sent, ready fails saying why."""
        proto, transport = self.make()
        proto.dataReceived(INFO.replace(b'"headers":true', b'"tls_required":true'))
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")
        failure = result_of(proto.ready)
        failure.trap(NATSError)
        self.assertIn("TLS", str(failure.value))

    def test_no_tls_without_asking(self):
        """Without tls_required nor options.tls, startTLS is not called."""
        proto, transport = self.make(tls_context=lambda: object())
        proto.dataReceived(INFO)
        self.assertEqual(transport.tls, [])

    def test_err_before_ready_is_a_refusal(self):
        """-ERR before the first PONG fails ready with Refused carrying the
        server's text, and drops the connection."""
        proto, transport = self.make(ConnectOptions(user="u", password="bad"))
        proto.dataReceived(INFO + b"-ERR 'Authorization Violation'\r\n")
        failure = result_of(proto.ready)
        failure.trap(Refused)
        self.assertEqual(failure.value.text, "Authorization Violation")
        self.assertTrue(transport.disconnected)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.errors, [])

    def test_handshake_timeout(self):
        """No INFO (or no PONG) within the handshake timeout drops the
        connection and fails ready."""
        proto, transport = self.make(handshake_timeout=2.0)
        self.clock.advance(1.9)
        self.assertFalse(proto.ready.called)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnected)
        result_of(proto.ready).trap(NATSError)

    def test_ready_cancels_the_handshake_timeout(self):
        """Once ready, the handshake timeout no longer fires."""
        proto, transport = self.ready(handshake_timeout=2.0, ping_interval=100)
        self.clock.advance(10)
        self.assertFalse(transport.disconnected)

    def test_lost_before_ready_fails_ready_with_the_reason(self):
        """The connection lost during the handshake fails ready with its reason."""
        proto, transport = self.make()
        proto.dataReceived(INFO)
        proto.connectionLost(Failure(ConnectionDone()))
        result_of(proto.ready).trap(ConnectionDone)

    def test_later_info_goes_to_on_info(self):
        """An INFO after the first (a cluster change) updates server_info and
        is handed to on_info; no second CONNECT."""
        proto, transport = self.ready()
        proto.dataReceived(b'INFO {"server_id":"S1","connect_urls":["10.0.0.2:4222"]}\r\n')
        self.assertEqual(self.infos, [{"server_id": "S1", "connect_urls": ["10.0.0.2:4222"]}])
        self.assertEqual(proto.server_info["connect_urls"], ["10.0.0.2:4222"])
        self.assertEqual(transport.value(), b"")


class ReadingTests(Case):
    STREAM = (INFO + b"PONG\r\n"
              + b"MSG a.b 1 5\r\nhello\r\n"
              + b"MSG a.b 2 _INBOX.x.1 4\r\n\r\n\r\n\r\n"
              + b"PING\r\n"
              + b"+OK\r\n"
              + b"HMSG c 3 24 29\r\nNATS/1.0\r\nK: v\r\nA: b\r\n\r\nworld\r\n"
              + b"HMSG _INBOX.x.2 4 _INBOX.r 16 16\r\nNATS/1.0 503\r\n\r\n\r\n"
              + b"MSG e 5 0\r\n\r\n"
              + b"-ERR 'Permissions Violation for Publish to x'\r\n")
    EXPECTED = [
        ("a.b", 1, None, None, b"hello"),
        ("a.b", 2, "_INBOX.x.1", None, b"\r\n\r\n"),
        ("c", 3, None, b"NATS/1.0\r\nK: v\r\nA: b\r\n\r\n", b"world"),
        ("_INBOX.x.2", 4, "_INBOX.r", b"NATS/1.0 503\r\n\r\n", b""),
        ("e", 5, None, None, b""),
    ]

    def check(self, proto, transport):
        self.assertEqual(self.messages, self.EXPECTED)
        self.assertEqual(self.errors, ["Permissions Violation for Publish to x"])
        self.assertTrue(transport.value().endswith(b"PING\r\nPONG\r\n"), transport.value())
        self.assertTrue(proto.is_ready)
        self.assertFalse(transport.disconnected)

    def test_every_frame_in_one_chunk(self):
        """INFO, PONG, MSG (with and without reply, payloads holding CRLF,
        empty), PING, +OK, HMSG (with a status line), -ERR, all in one chunk:
        each acted on, in order."""
        proto, transport = self.make()
        proto.dataReceived(self.STREAM)
        self.check(proto, transport)

    def test_split_at_every_offset(self):
        """The same stream cut in two at every byte offset reads the same."""
        for cut in range(1, len(self.STREAM)):
            self.messages, self.errors = [], []
            proto, transport = self.make()
            proto.dataReceived(self.STREAM[:cut])
            proto.dataReceived(self.STREAM[cut:])
            self.check(proto, transport)

    def test_one_byte_at_a_time(self):
        """The same stream fed one byte per dataReceived reads the same."""
        proto, transport = self.make()
        for i in range(len(self.STREAM)):
            proto.dataReceived(self.STREAM[i:i + 1])
        self.check(proto, transport)

    def test_many_messages_in_one_chunk(self):
        """A thousand MSGs in one chunk are all delivered, in order."""
        proto, transport = self.ready()
        proto.dataReceived(b"".join(b"MSG s 7 %d\r\n%s\r\n" % (len(b"%d" % i), b"%d" % i)
                                    for i in range(1000)))
        self.assertEqual([m[4] for m in self.messages], [b"%d" % i for i in range(1000)])

    def test_a_large_payload_in_many_chunks(self):
        """A payload arriving in many small chunks is delivered once, whole."""
        proto, transport = self.ready()
        payload = bytes(range(256)) * 2000
        data = b"MSG big 1 %d\r\n%s\r\nMSG next 1 1\r\nx\r\n" % (len(payload), payload)
        for i in range(0, len(data), 1000):
            proto.dataReceived(data[i:i + 1000])
        self.assertEqual([(m[0], m[4]) for m in self.messages],
                         [("big", payload), ("next", b"x")])

    def test_ping_is_answered_at_once(self):
        """A PING from the server is answered with PONG in the same call."""
        proto, transport = self.ready()
        proto.dataReceived(b"PING\r\n")
        self.assertEqual(transport.value(), b"PONG\r\n")

    def test_err_after_ready_is_reported_and_kept(self):
        """-ERR once ready goes to on_error; the connection stays."""
        proto, transport = self.ready()
        proto.dataReceived(b"-ERR 'Invalid Subject'\r\n")
        self.assertEqual(self.errors, ["Invalid Subject"])
        self.assertFalse(transport.disconnected)

    def test_tabs_and_repeated_spaces_separate_arguments(self):
        """MSG arguments separated by tabs or several spaces are read alike."""
        proto, transport = self.ready()
        proto.dataReceived(b"MSG  a\t9   3\r\nabc\r\n")
        self.assertEqual(self.messages, [("a", 9, None, None, b"abc")])


class MalformedTests(Case):
    def assert_dropped(self, data, why, proto=None):
        if proto is None:
            proto, transport = self.ready()
        else:
            transport = proto.transport
        proto.dataReceived(data)
        self.assertTrue(transport.disconnected, data)
        self.assertIsInstance(proto.failure, ProtocolError)
        self.assertIn(why, str(proto.failure))
        return proto

    def test_oversized_msg(self):
        """A MSG over the INFO's max_payload drops the connection."""
        self.assert_dropped(b"MSG a 1 1048577\r\n", "over max_payload")

    def test_oversized_hmsg(self):
        """An HMSG whose total is over max_payload drops the connection."""
        self.assert_dropped(b"HMSG a 1 12 1048577\r\n", "over max_payload")

    def test_max_payload_comes_from_info(self):
        """The cap is the server's max_payload, not the default."""
        proto, transport = self.make()
        proto.dataReceived(INFO.replace(b"1048576", b"100") + b"PONG\r\n")
        proto.dataReceived(b"MSG a 1 100\r\n" + b"x" * 100 + b"\r\n")
        self.assertEqual(len(self.messages), 1)
        self.assert_dropped(b"MSG a 1 101\r\n", "over max_payload", proto)

    def test_control_line_too_long(self):
        """A control line with no CRLF within MAX_CONTROL_LINE bytes drops the
        connection without waiting for its end."""
        self.assert_dropped(b"MSG " + b"a" * MAX_CONTROL_LINE, "control line over")

    def test_control_line_too_long_in_pieces(self):
        """The cap holds when the long line comes in pieces."""
        proto, transport = self.ready()
        for _ in range(MAX_CONTROL_LINE // 1000):
            proto.dataReceived(b"a" * 1000)
        self.assertFalse(transport.disconnected)
        self.assert_dropped(b"a" * 2000, "control line over", proto)

    def test_malformed_lines(self):
        """Wrong argument counts, non-numbers, unknown frames, bad INFO JSON and
        an HMSG headers size past its total each drop the connection with a
        ProtocolError naming the problem."""
        for data, why in [
            (b"MSG a 1\r\n", "malformed MSG"),
            (b"MSG a 1 r x 5\r\n", "malformed MSG"),
            (b"MSG a 1 -5\r\n", "not a number"),
            (b"MSG a x 5\r\n", "not a number"),
            (b"HMSG a 1 5\r\n", "malformed HMSG"),
            (b"HMSG a 1 20 10\r\n", "headers size"),
            (b"HMSG a 1 0 10\r\n", "headers size"),
            (b"HELLO\r\n", "unknown frame"),
            (b"INFO {not json\r\n", "malformed INFO"),
        ]:
            self.assert_dropped(data, why)

    def test_payload_without_crlf(self):
        """A payload not followed by CRLF (a size that lies) drops the connection."""
        self.assert_dropped(b"MSG a 1 3\r\nhello\r\n", "not followed by CRLF")

    def test_nothing_is_read_after_a_drop(self):
        """Frames after the malformed one, and data after the drop, are ignored."""
        proto = self.assert_dropped(b"HELLO\r\nMSG a 1 1\r\nx\r\n", "unknown frame")
        proto.dataReceived(b"MSG a 1 1\r\nx\r\n")
        self.assertEqual(self.messages, [])


class KeepAliveTests(Case):
    def test_pings_every_interval(self):
        """Once ready, a PING is sent every ping_interval seconds."""
        proto, transport = self.ready(ping_interval=10)
        self.clock.advance(9.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        self.assertEqual(transport.value(), b"PING\r\n")

    def test_answered_pings_keep_it(self):
        """PINGs answered by PONGs never drop the connection."""
        proto, transport = self.ready(ping_interval=10)
        for _ in range(10):
            self.clock.advance(10)
            proto.dataReceived(b"PONG\r\n")
        self.assertFalse(transport.disconnected)

    def test_two_unanswered_pings_drop_it(self):
        """With two PINGs unanswered, the next tick drops the connection
        (StaleConnection) rather than sending a third."""
        proto, transport = self.ready(ping_interval=10)
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(transport.value(), b"PING\r\nPING\r\n")
        self.assertFalse(transport.disconnected)
        self.clock.advance(10)
        self.assertEqual(transport.value(), b"PING\r\nPING\r\n")
        self.assertTrue(transport.disconnected)
        self.assertIsInstance(proto.failure, StaleConnection)

    def test_keepalive_stops_when_lost(self):
        """After connectionLost no more PINGs are sent."""
        proto, transport = self.ready(ping_interval=10)
        proto.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(100)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class WritingTests(Case):
    def test_pub(self):
        """publish writes PUB with and without a reply subject."""
        proto, transport = self.ready()
        proto.publish("a.b", b"hello")
        proto.publish("a.b", b"", reply="_INBOX.1")
        self.assertEqual(transport.value(), b"PUB a.b 5\r\nhello\r\nPUB a.b _INBOX.1 0\r\n\r\n")

    def test_hpub(self):
        """publish with headers writes HPUB with the headers block's size and
        the total size."""
        proto, transport = self.ready()
        proto.publish("js.x", b"data", reply="r", headers={"Nats-Msg-Id": "42"})
        block = b"NATS/1.0\r\nNats-Msg-Id: 42\r\n\r\n"
        self.assertEqual(transport.value(),
                         b"HPUB js.x r %d %d\r\n%sdata\r\n" % (len(block), len(block) + 4, block))

    def test_too_large(self):
        """A payload over max_payload raises PayloadTooLarge and writes nothing."""
        proto, transport = self.make()
        proto.dataReceived(INFO.replace(b"1048576", b"10") + b"PONG\r\n")
        transport.clear()
        self.assertRaises(PayloadTooLarge, proto.publish, "a", b"x" * 11)
        self.assertRaises(PayloadTooLarge, proto.publish, "a", b"x", headers={"K": "v"})
        proto.publish("a", b"x" * 10)
        self.assertEqual(transport.value(), b"PUB a 10\r\n" + b"x" * 10 + b"\r\n")

    def test_invalid_subjects_and_headers(self):
        """Subjects with whitespace or empty, and header names or values that
        would break the frame, raise ValueError and write nothing."""
        proto, transport = self.ready()
        for args, kwargs in [(("a b", b""), {}), (("", b""), {}), (("a\r\n", b""), {}),
                             (("a", b""), {"reply": "r x"}),
                             (("a", b""), {"headers": {"K:": "v"}}),
                             (("a", b""), {"headers": {"K": "v\r\nX: y"}})]:
            self.assertRaises(ValueError, proto.publish, *args, **kwargs)
        self.assertRaises(ValueError, proto.subscribe, "a b", 1)
        self.assertEqual(transport.value(), b"")

    def test_sub_and_unsub(self):
        """SUB with and without a queue group; UNSUB with and without a max."""
        proto, transport = self.ready()
        proto.subscribe("_INBOX.abc.*", 1)
        proto.subscribe("work", 2, queue="q")
        proto.unsubscribe(1)
        proto.unsubscribe(2, 5)
        self.assertEqual(transport.value(),
                         b"SUB _INBOX.abc.* 1\r\nSUB work q 2\r\nUNSUB 1\r\nUNSUB 2 5\r\n")

    def test_ping_fires_at_its_pong(self):
        """ping() fires at the PONG answering it, pings in order; one still
        unanswered fails when the connection is lost."""
        proto, transport = self.ready()
        first, second = proto.ping(), proto.ping()
        self.assertEqual(transport.value(), b"PING\r\nPING\r\n")
        proto.dataReceived(b"PONG\r\n")
        self.assertTrue(first.called)
        self.assertFalse(second.called)
        proto.connectionLost(Failure(ConnectionDone()))
        result_of(second).trap(ConnectionDone)


class HeadersTests(SynchronousTestCase):
    def test_round_trip(self):
        """encode_headers and parse_headers agree."""
        headers = {"Nats-Msg-Id": "abc", "Nats-Expected-Stream": "S"}
        self.assertEqual(parse_headers(encode_headers(headers)), headers)

    def test_status_lines(self):
        """A status line gives Status and Description."""
        self.assertEqual(parse_headers(b"NATS/1.0 503\r\n\r\n"), {"Status": "503"})
        self.assertEqual(parse_headers(b"NATS/1.0 408 Request Timeout\r\nK: v\r\n\r\n"),
                         {"Status": "408", "Description": "Request Timeout", "K": "v"})

    def test_not_a_headers_block(self):
        """A block not starting with NATS/1.0 raises ProtocolError."""
        self.assertRaises(ProtocolError, parse_headers, b"HTTP/1.1 200\r\n\r\n")
