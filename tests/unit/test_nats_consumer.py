"""Unit tests for cserver.nats.consumer: the reply subjects parsed, the
consumer's config, and the ordered reader against a stand-in for NATSClient
on a task.Clock (every frame kind: data, flow control, heartbeat, stalled
heartbeat, consumer seq gap -> restart, silence -> restart, 409), plus one
test through the real NATSClient on a StringTransport; no socket."""

import json

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cserver.nats.consumer import (
    AckMetadata,
    StreamReader,
    consumer_config,
    parse_ack_subject,
    read_stream,
)
from cserver.nats.jetstream import JetStreamError
from cserver.nats.wire import Msg, ProtocolError, RequestTimeout

from .test_nats_client import ClientCase, hmsg, result_of

HEARTBEAT_HEADERS = {"Status": "100", "Description": "Idle Heartbeat"}
FLOW_CONTROL_HEADERS = {"Status": "100", "Description": "FlowControl Request"}


class FakeClient:
    """
    Stands in for NATSClient: records subscriptions, requests (each a
    Deferred the test fires, or answered at once by ``answer(subject,
    payload)`` if set) and publishes.
    """

    def __init__(self, clock=None):
        self.reactor = clock or Clock()
        self.subscriptions = {}
        self.requests = []
        self.published = []
        self.answer = None
        self._sid = 0

    def subscribe(self, subject, callback, queue=None):
        self._sid += 1
        self.subscriptions[self._sid] = (subject, callback)
        return self._sid

    def unsubscribe(self, sid):
        self.subscriptions.pop(sid, None)

    def publish(self, subject, payload, headers=None, reply=None):
        self.published.append((subject, payload))

    def request(self, subject, payload, headers=None, timeout=None):
        if self.answer is not None:
            return self.answer(subject, payload)
        d = Deferred()
        self.requests.append((subject, payload, d))
        return d

    # -- what the tests look at ---------------------------------------------------

    def creates(self):
        """The configs of the CONSUMER.CREATE requests so far."""
        return [json.loads(payload)["config"] for subject, payload, _ in self.requests
                if subject.startswith("$JS.API.CONSUMER.CREATE.")]

    def deletes(self):
        return [subject for subject, _, _ in self.requests
                if subject.startswith("$JS.API.CONSUMER.DELETE.")]

    def reply_to_create(self, index=-1, name="C1"):
        """The CONSUMER.CREATE request ``index`` succeeds: consumer ``name``."""
        creates = [d for subject, _, d in self.requests if ".CONSUMER.CREATE." in subject]
        creates[index].callback(({}, json.dumps({"name": name, "config": {}}).encode()))

    def inbox(self):
        """(subject, callback) of the one subscription there is."""
        (subscription,) = self.subscriptions.values()
        return subscription

    def send(self, headers=None, data=b"", reply=None, subject="cserver.S"):
        """Deliver a message to the one subscription."""
        _, callback = self.inbox()
        callback(Msg(subject, reply, headers or {}, data))

    def data(self, stream_seq, consumer_seq, pending=0, data=None, consumer="C1"):
        """Deliver a stream message as the consumer does."""
        reply = f"$JS.ACK.S.{consumer}.1.{stream_seq}.{consumer_seq}.1700000000{stream_seq:09d}" \
                f".{pending}"
        self.send({"Nats-Msg-Id": str(stream_seq)},
                  data if data is not None else b"m%d" % stream_seq, reply)


class ParsingTests(SynchronousTestCase):
    def test_ack_subject(self):
        """The 9-token reply subject gives stream, consumer, delivered count,
        stream seq, consumer seq, timestamp and pending."""
        self.assertEqual(parse_ack_subject("$JS.ACK.S.C1.1.120.7.1700000000000000001.3"),
                         AckMetadata("S", "C1", 1, 120, 7, 1700000000000000001, 3))

    def test_ack_subject_with_domain_and_account(self):
        """The newer form, with a domain and an account hash after $JS.ACK and
        a random token after pending, gives the same fields."""
        subject = "$JS.ACK.hub.ACCHASH.S.C1.2.120.7.1700000000000000001.3.r4nd"
        self.assertEqual(parse_ack_subject(subject),
                         AckMetadata("S", "C1", 2, 120, 7, 1700000000000000001, 3))
        self.assertEqual(parse_ack_subject(subject[:-5]).stream_seq, 120)

    def test_not_an_ack_subject(self):
        """Another prefix, a wrong token count or a number that is not one
        raise ProtocolError."""
        for subject in ["_INBOX.x", "$JS.ACK.S.C1.1.120.7.3", "$JS.NAK.S.C1.1.1.1.1.1",
                        "$JS.ACK.S.C1.1.x.7.1.3", "$JS.ACK.a.b.S.C1.1.120.7.1"]:
            self.assertRaises(ProtocolError, parse_ack_subject, subject)

    def test_consumer_config(self):
        """An ordered consumer: no acks, flow control, heartbeats in ns, in
        memory on one server; from the start with deliver_policy all, else by
        start sequence."""
        config = consumer_config("_INBOX.a", 1, 2.5, 10.0)
        self.assertEqual(config, {
            "deliver_subject": "_INBOX.a", "ack_policy": "none", "max_deliver": 1,
            "replay_policy": "instant", "flow_control": True,
            "idle_heartbeat": 2_500_000_000, "inactive_threshold": 10_000_000_000,
            "mem_storage": True, "num_replicas": 1, "deliver_policy": "all"})
        later = consumer_config("_INBOX.a", 42, 2.5, 10.0)
        self.assertEqual((later["deliver_policy"], later["opt_start_seq"]),
                         ("by_start_sequence", 42))


class ReaderCase(SynchronousTestCase):
    def setUp(self):
        self.client = FakeClient()
        self.clock = self.client.reactor
        self.got = []

    def read(self, start_seq=1, reply=True, **options):
        options.setdefault("heartbeat", 1.0)
        reader = read_stream(self.client, "S", self.got.append, start_seq, **options)
        if reply:
            self.client.reply_to_create()
        return reader

    def seqs(self):
        return [delivery.stream_seq for delivery in self.got]


class ReadingTests(ReaderCase):
    def test_subscribes_then_creates_the_consumer(self):
        """The reader subscribes to an inbox of its own, then asks
        CONSUMER.CREATE.S for an ordered consumer delivering there, from the
        start seq given."""
        self.read(start_seq=5, reply=False)
        subject, _ = self.client.inbox()
        self.assertTrue(subject.startswith("_INBOX."))
        (create,) = self.client.requests
        self.assertEqual(create[0], "$JS.API.CONSUMER.CREATE.S")
        body = json.loads(create[1])
        self.assertEqual(body["stream_name"], "S")
        self.assertEqual(body["config"], consumer_config(subject, 5, 1.0, 5.0))

    def test_messages_in_order_until_none_pending(self):
        """Messages are handed on in order, with their seqs, pending, time,
        subject, headers and data; at one with nothing pending ``done`` fires
        with its seq, the consumer is deleted and the inbox dropped."""
        reader = self.read()
        self.client.data(1, 1, pending=2)
        self.client.data(2, 2, pending=1)
        self.assertFalse(reader.done.called)
        self.client.data(3, 3, pending=0)
        self.assertEqual(result_of(reader.done), 3)
        first = self.got[0]
        self.assertEqual((first.stream_seq, first.consumer_seq, first.pending, first.timestamp,
                          first.subject, first.headers, first.data),
                         (1, 1, 2, 1700000000000000001, "cserver.S", {"Nats-Msg-Id": "1"},
                          b"m1"))
        self.assertEqual(self.seqs(), [1, 2, 3])
        self.assertEqual(self.client.deletes(), ["$JS.API.CONSUMER.DELETE.S.C1"])
        self.assertEqual(self.client.subscriptions, {})

    def test_until_ends_before_the_stream_does(self):
        """With ``until``, the message at that seq ends the read even with
        more pending."""
        reader = self.read(until=2)
        self.client.data(1, 1, pending=5)
        self.client.data(2, 2, pending=4)
        self.assertEqual(result_of(reader.done), 2)

    def test_nothing_to_read(self):
        """A start after ``until`` ends at once, with no consumer made."""
        reader = read_stream(self.client, "S", self.got.append, 8, until=7)
        self.assertEqual(result_of(reader.done), 7)
        self.assertEqual(self.client.requests, [])

    def test_deleted_messages_are_skipped_not_restarted(self):
        """Stream seqs with a gap (messages deleted) but consumer seqs in order
        are handed on as they come: the gap is the caller's to see."""
        reader = self.read()
        self.client.data(1, 1, pending=1)
        self.client.data(4, 2, pending=0)
        self.assertEqual(result_of(reader.done), 4)
        self.assertEqual(self.seqs(), [1, 4])
        self.assertEqual(reader.restarts, 0)

    def test_flow_control_is_answered(self):
        """A status-100 message with a reply subject is a flow-control
        request: an empty message is published to its reply subject, and
        nothing is handed on."""
        reader = self.read()
        self.client.send(FLOW_CONTROL_HEADERS, reply="$JS.FC.S.abc.1")
        self.assertEqual(self.client.published, [("$JS.FC.S.abc.1", b"")])
        self.assertEqual(self.got, [])
        self.assertFalse(reader.done.called)

    def test_heartbeat_while_following_is_ignored(self):
        """An idle heartbeat (status 100, no reply) naming the last consumer
        seq seen changes nothing when following."""
        reader = self.read(follow=True)
        self.client.data(1, 1)
        self.client.send({**HEARTBEAT_HEADERS, "Nats-Last-Consumer": "1",
                          "Nats-Last-Stream": "1"})
        self.assertEqual((self.got[-1].stream_seq, reader.done.called, reader.restarts),
                         (1, False, 0))
        self.assertEqual(self.client.published, [])

    def test_heartbeat_ends_a_read_with_nothing_more(self):
        """Not following, an idle heartbeat says the consumer has nothing more
        to send (the last messages deleted): the read ends."""
        reader = self.read()
        self.client.data(1, 1, pending=1)
        self.client.send({**HEARTBEAT_HEADERS, "Nats-Last-Consumer": "1"})
        self.assertEqual(result_of(reader.done), 1)

    def test_stalled_heartbeat_is_answered(self):
        """A heartbeat with Nats-Consumer-Stalled gets an empty message on that
        subject (the flow-control reply lost), and does not end the read."""
        reader = self.read()
        self.client.send({**HEARTBEAT_HEADERS, "Nats-Consumer-Stalled": "$JS.FC.S.x.9",
                          "Nats-Last-Consumer": "0"})
        self.assertEqual(self.client.published, [("$JS.FC.S.x.9", b"")])
        self.assertFalse(reader.done.called)

    def test_stop_while_following(self):
        """stop() ends a follow: ``done`` fires with the last seq handed on, the
        consumer is deleted; messages after it are not handed on."""
        reader = self.read(follow=True)
        self.client.data(1, 1)
        _, callback = self.client.inbox()
        reader.stop()
        self.assertEqual(result_of(reader.done), 1)
        self.assertEqual(self.client.deletes(), ["$JS.API.CONSUMER.DELETE.S.C1"])
        callback(Msg("cserver.S", "$JS.ACK.S.C1.1.2.2.1.0", {}, b"late"))
        self.assertEqual(self.seqs(), [1])

    def test_create_error_fails_done(self):
        """A JetStream error to the first CONSUMER.CREATE fails ``done`` with it."""
        reader = self.read(reply=False)
        self.client.requests[0][2].callback(
            ({}, b'{"error":{"code":400,"err_code":10084,"description":"bad"}}'))
        self.assertTrue(result_of(reader.done).check(JetStreamError))
        self.assertEqual(self.client.subscriptions, {})

    def test_callback_error_fails_done(self):
        """An exception from on_message fails ``done`` with it and ends the read."""
        reader = read_stream(self.client, "S", lambda delivery: 1 / 0)
        self.client.reply_to_create()
        self.client.data(1, 1, pending=3)
        self.assertTrue(result_of(reader.done).check(ZeroDivisionError))
        self.assertEqual(self.client.subscriptions, {})

    def test_a_message_without_reply_fails(self):
        """A data message without a reply subject is not from a consumer:
        ``done`` fails with ProtocolError."""
        reader = self.read()
        self.client.send({}, b"x")
        self.assertTrue(result_of(reader.done).check(ProtocolError))


class OrderedTests(ReaderCase):
    def test_consumer_seq_gap_restarts_after_the_last_good(self):
        """A consumer seq skipped (a message lost on the way) drops the
        consumer and its inbox and makes a new one from the stream seq after
        the last handed on; what the old inbox gets is ignored, and the new
        consumer's seqs start again at 1."""
        reader = self.read(follow=True)
        self.client.data(1, 1)
        self.client.data(2, 2)
        _, old_callback = self.client.inbox()
        self.client.data(4, 4)
        self.assertEqual(reader.restarts, 1)
        self.assertEqual(self.client.deletes(), ["$JS.API.CONSUMER.DELETE.S.C1"])
        new = self.client.creates()[-1]
        self.assertEqual((new["deliver_policy"], new["opt_start_seq"]), ("by_start_sequence", 3))
        self.assertEqual(new["deliver_subject"], self.client.inbox()[0])
        old_callback(Msg("cserver.S", "$JS.ACK.S.C1.1.5.5.1700000000000000005.0", {}, b"x"))
        self.client.reply_to_create(name="C2")
        self.client.data(3, 1, consumer="C2")
        self.client.data(4, 2, consumer="C2")
        self.assertEqual(self.seqs(), [1, 2, 3, 4])
        self.assertFalse(reader.done.called)

    def test_heartbeat_naming_an_unseen_message_restarts(self):
        """A heartbeat whose Nats-Last-Consumer is past the last consumer seq
        seen (the last messages lost) restarts from the seq after the last."""
        reader = self.read(follow=True)
        self.client.data(1, 1)
        self.client.send({**HEARTBEAT_HEADERS, "Nats-Last-Consumer": "3"})
        self.assertEqual(reader.restarts, 1)
        self.assertEqual(self.client.creates()[-1]["opt_start_seq"], 2)

    def test_silence_restarts(self):
        """Nothing at all (not even a heartbeat) for three heartbeat intervals
        -- the connection or the consumer lost -- makes a new consumer; frames
        keep it alive."""
        reader = self.read(follow=True, heartbeat=1.0)
        self.client.data(1, 1)
        for _ in range(4):
            self.clock.advance(1.0)
            self.client.send({**HEARTBEAT_HEADERS, "Nats-Last-Consumer": "1"})
        self.assertEqual(reader.restarts, 0)
        self.clock.advance(3.0)
        self.assertEqual(reader.restarts, 1)
        self.assertEqual(self.client.creates()[-1]["opt_start_seq"], 2)

    def test_consumer_deleted_status_restarts(self):
        """A status-409 message (the consumer gone) makes a new consumer."""
        reader = self.read(follow=True)
        self.client.data(1, 1)
        self.client.send({"Status": "409", "Description": "Consumer Deleted"})
        self.assertEqual(reader.restarts, 1)

    def test_failed_restart_is_retried_then_given_up(self):
        """A CONSUMER.CREATE failing after a restart is asked again every
        second; once failing for ``retry_for`` seconds ``done`` fails."""
        reader = self.read(follow=True, retry_for=3.0)
        self.client.data(1, 1)
        self.client.answer = lambda subject, payload: fail(RequestTimeout("no reply"))
        self.client.data(3, 3)
        self.assertEqual(reader.restarts, 1)
        for _ in range(3):
            self.assertFalse(reader.done.called)
            self.clock.advance(1.0)
        self.assertTrue(result_of(reader.done).check(RequestTimeout))
        self.assertEqual(self.client.subscriptions, {})

    def test_retry_that_works_goes_on(self):
        """A restart whose first CONSUMER.CREATE fails but a later one works
        reads on from the seq after the last handed on."""
        reader = self.read(follow=True)
        self.client.data(1, 1)
        self.client.send({"Status": "409"})
        self.client.requests[-1][2].errback(Failure(RequestTimeout("no reply")))
        self.clock.advance(1.0)
        self.client.reply_to_create(name="C3")
        self.client.data(2, 1, consumer="C3")
        self.assertEqual(self.seqs(), [1, 2])
        self.assertFalse(reader.done.called)


class WireTests(ClientCase):
    def test_through_the_real_client(self):
        """Through NATSClient on a StringTransport: HMSG frames of the consumer
        are handed on with their seqs, a flow-control request is answered
        with an empty PUB to its reply subject, and the read ends at the
        message with nothing pending."""
        client, proto, transport = self.connected()
        got = []
        reader = StreamReader(client, "S", got.append, heartbeat=1.0)
        reader.start()
        written = transport.value().decode()
        inbox = next(line.split()[1] for line in written.split("\r\n")
                     if line.startswith("SUB _INBOX.") and not line.split()[1].endswith("*"))
        sid = int(next(line.split()[2] for line in written.split("\r\n")
                       if line.startswith(f"SUB {inbox} ")))
        transport.clear()
        proto.dataReceived(
            hmsg(inbox.encode(), sid, b"NATS/1.0\r\nNats-Msg-Id: a\r\n\r\n", b"one",
                 b"$JS.ACK.S.C1.1.1.1.1700000000000000000.1")
            + hmsg(inbox.encode(), sid, b"NATS/1.0 100 FlowControl Request\r\n\r\n", b"",
                   b"$JS.FC.S.x.1")
            + hmsg(inbox.encode(), sid, b"NATS/1.0\r\n\r\n", b"two",
                   b"$JS.ACK.S.C1.1.2.2.1700000000000000000.0"))
        self.assertEqual([(d.stream_seq, d.data) for d in got], [(1, b"one"), (2, b"two")])
        self.assertTrue(transport.value().startswith(b"PUB $JS.FC.S.x.1 0\r\n\r\n"))
        self.assertEqual(result_of(reader.done), 2)
