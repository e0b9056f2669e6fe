"""Unit tests for cserver.nats.jetstream: the replies parsed (PubAck,
duplicates, API errors, stored messages) and the requests JetStream makes of
a recording stand-in for NATSClient; no socket."""

import base64

import msgspec
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from cserver.nats.jetstream import (
    JetStream,
    JetStreamError,
    PubAck,
    StoredMessage,
    parse_api_reply,
    parse_pub_ack,
    parse_stored_message,
)
from cserver.nats.wire import NoResponders, ProtocolError


def result_of(d):
    """What a fired Deferred fired with (a Failure when it failed)."""
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


class RecordingClient:
    """Records request() calls; each returns a Deferred the test fires."""

    def __init__(self):
        self.calls = []

    def request(self, subject, payload, headers=None, timeout=None):
        d = Deferred()
        self.calls.append((subject, payload, headers, timeout, d))
        return d


class ParsingTests(SynchronousTestCase):
    def test_pub_ack(self):
        """A PubAck gives stream and seq, duplicate false unless it says true;
        other fields (domain) are ignored."""
        self.assertEqual(parse_pub_ack(b'{"stream":"S","seq":7}'), PubAck("S", 7))
        self.assertEqual(parse_pub_ack(b'{"stream":"S","seq":7,"duplicate":true,"domain":"d"}'),
                         PubAck("S", 7, True))

    def test_pub_ack_error(self):
        """An error reply raises JetStreamError with its code, err_code and
        description."""
        with self.assertRaises(JetStreamError) as caught:
            parse_pub_ack(b'{"error":{"code":400,"err_code":10060,'
                          b'"description":"expected stream does not match"}}')
        error = caught.exception
        self.assertEqual((error.code, error.err_code, error.description),
                         (400, 10060, "expected stream does not match"))

    def test_malformed_pub_ack(self):
        """Not JSON, a wrong type, or no stream or seq raise ProtocolError."""
        for payload in [b"", b"nope", b'{"stream":1,"seq":2}', b"{}", b'{"stream":"S"}']:
            self.assertRaises(ProtocolError, parse_pub_ack, payload)

    def test_api_reply(self):
        """A stream API reply is its JSON object; an error one raises."""
        self.assertEqual(parse_api_reply(b'{"config":{"name":"S"}}'), {"config": {"name": "S"}})
        with self.assertRaises(JetStreamError) as caught:
            parse_api_reply(b'{"error":{"code":404,"err_code":10059,'
                            b'"description":"stream not found"}}')
        self.assertEqual(caught.exception.err_code, 10059)
        self.assertRaises(ProtocolError, parse_api_reply, b"[1]")

    def test_stored_message(self):
        """STREAM.MSG.GET's message: data and headers decoded from base64."""
        headers = b"NATS/1.0\r\nNats-Msg-Id: k1\r\n\r\n"
        reply = msgspec.json.encode({"message": {
            "subject": "j.x", "seq": 3, "time": "2024-01-01T00:00:00.000000001Z",
            "data": base64.b64encode(b"\x00payload").decode(),
            "hdrs": base64.b64encode(headers).decode()}})
        self.assertEqual(parse_stored_message(reply), StoredMessage(
            3, "j.x", {"Nats-Msg-Id": "k1"}, b"\x00payload", "2024-01-01T00:00:00.000000001Z"))

    def test_stored_message_without_headers_or_data(self):
        """A message without hdrs (or data) has no headers (empty data)."""
        reply = b'{"message":{"subject":"j","seq":1,"time":"t"}}'
        self.assertEqual(parse_stored_message(reply), StoredMessage(1, "j", {}, b"", "t"))

    def test_stored_message_errors(self):
        """No such message raises JetStreamError; bad base64 or no message
        raise ProtocolError."""
        with self.assertRaises(JetStreamError) as caught:
            parse_stored_message(b'{"error":{"code":404,"err_code":10037,'
                                 b'"description":"no message found"}}')
        self.assertEqual(caught.exception.code, 404)
        self.assertRaises(ProtocolError, parse_stored_message,
                          b'{"message":{"subject":"j","seq":1,"data":"!!"}}')
        self.assertRaises(ProtocolError, parse_stored_message, b"{}")


class RequestTests(SynchronousTestCase):
    def setUp(self):
        self.client = RecordingClient()
        self.js = JetStream(self.client, timeout=2.0)

    def test_publish_headers(self):
        """publish sends Nats-Msg-Id and Nats-Expected-Stream (with any other
        headers) and fires with the parsed PubAck."""
        d = self.js.publish("j.x", b"data", msg_id="k1", expected_stream="J",
                            headers={"X": "y"})
        subject, payload, headers, timeout, reply = self.client.calls[0]
        self.assertEqual((subject, payload, timeout), ("j.x", b"data", 2.0))
        self.assertEqual(headers, {"X": "y", "Nats-Msg-Id": "k1", "Nats-Expected-Stream": "J"})
        reply.callback(({}, b'{"stream":"J","seq":5,"duplicate":true}'))
        self.assertEqual(result_of(d), PubAck("J", 5, True))

    def test_publish_without_headers(self):
        """Without msg_id nor expected_stream, no headers are sent (PUB)."""
        self.js.publish("j.x", b"", timeout=9)
        self.assertEqual(self.client.calls[0][2:4], (None, 9))

    def test_publish_errors_pass_through(self):
        """The client's errors (no responders: no stream) and the ack's
        errors fail the publish."""
        d = self.js.publish("j.x", b"")
        self.client.calls[0][4].errback(NoResponders("no responders on j.x"))
        result_of(d).trap(NoResponders)
        d = self.js.publish("j.x", b"")
        self.client.calls[1][4].callback(
            ({}, b'{"error":{"code":503,"err_code":10077,"description":"resources"}}'))
        result_of(d).trap(JetStreamError)

    def test_stream_api_subjects(self):
        """The stream API requests go to $JS.API.STREAM.<op>.<name>, CREATE and
        UPDATE with the config as JSON, MSG.GET with the seq."""
        config = {"name": "J", "subjects": ["j.>"], "num_replicas": 3}
        self.js.stream_info("J")
        self.js.create_stream(config)
        self.js.update_stream(config)
        self.js.delete_stream("J")
        self.js.get_message("J", 42)
        calls = [(subject, payload) for subject, payload, *_ in self.client.calls]
        self.assertEqual(calls, [
            ("$JS.API.STREAM.INFO.J", b""),
            ("$JS.API.STREAM.CREATE.J", msgspec.json.encode(config)),
            ("$JS.API.STREAM.UPDATE.J", msgspec.json.encode(config)),
            ("$JS.API.STREAM.DELETE.J", b""),
            ("$JS.API.STREAM.MSG.GET.J", b'{"seq":42}'),
        ])

    def test_stream_info_reply(self):
        """stream_info fires with the reply's object, or fails on an error."""
        d = self.js.stream_info("J")
        self.client.calls[0][4].callback(({}, b'{"cluster":{"leader":"n1"}}'))
        self.assertEqual(result_of(d)["cluster"]["leader"], "n1")
        d = self.js.stream_info("K")
        self.client.calls[1][4].callback(
            ({}, b'{"error":{"code":404,"err_code":10059,"description":"stream not found"}}'))
        self.assertEqual(result_of(d).value.code, 404)
