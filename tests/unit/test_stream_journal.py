"""The journal on a JetStream stream, against a recording stand-in for the
NATS client and a task.Clock: what is published, with which id, and how
each JetStream answer or failure is acknowledged; the start's checks."""

import base64
import json

import msgspec
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cserver.journal.interfaces import CONFLICT, DUPLICATE
from cserver.journal.jetstream import StreamJournal, version_tuple
from cserver.journal.record import ACK, EVENT, FIELDS
from cserver.journal.stream_open import StreamRefused, check_stream, check_version, stream_config
from cserver.journal.stream_url import parse_stream_url
from cserver.nats.wire import NotConnected, RequestLost

URL = parse_stream_url("nats://127.0.0.1:4222/orders")


class FakeClient:
    """Records request() calls; each returns a Deferred the test fires."""

    connected = True
    server = None
    last_error = None
    reconnects = 0

    def __init__(self):
        self.calls = []
        self.closed = False

    def request(self, subject, payload, headers=None, timeout=None):
        d = Deferred()
        self.calls.append((subject, payload, headers or {}, d))
        return d

    def close(self):
        self.closed = True


def pub_ack(seq, duplicate=False):
    return ({}, msgspec.json.encode({"stream": "orders", "seq": seq, "duplicate": duplicate}))


def stored(seq, payload):
    message = {"subject": "cserver.orders", "seq": seq, "time": "2026-12-03T00:00:00Z",
               "data": base64.b64encode(payload).decode()}
    return ({}, msgspec.json.encode({"message": message}))


class StreamJournalTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.client = FakeClient()
        self.journal = StreamJournal(URL, self.client, self.clock, "node-a", deadline=30)
        self.acks = []

    def message(self, text="hello", key=None, user="alice"):
        event = {EVENT: "message", "log_time": 12.5, "user": user, "text": text,
                 "peer": "tcp:127.0.0.1:5", ACK: lambda seq, reason: self.acks.append(
                     (seq, reason))}
        if key is not None:
            event["key"] = key
        self.journal(event)
        return self.client.calls[-1]

    def test_a_message_is_published_as_its_record_and_acked_at_the_stream_seq(self):
        """The payload is a file journal's record without seq, with the node;
        the subject is the stream's, the id node-unique, the expected stream
        set; the ack carries the stream's seq."""
        subject, payload, headers, d = self.message()
        assert subject == "cserver.orders"
        record = json.loads(payload)
        assert list(record) == ["time", "event", "pid", "node", "user", "text", "peer"]
        assert record["node"] == "node-a" and record["text"] == "hello"
        assert headers["Nats-Expected-Stream"] == "orders"
        assert headers["Nats-Msg-Id"].startswith("node-a ")
        assert self.acks == []
        d.callback(pub_ack(41))
        assert self.acks == [(41, None)]
        assert self.journal.last_seq == 41 and self.journal.messages == 1

    def test_each_record_has_its_own_id_and_a_keyed_one_its_users_key(self):
        """Two MSGs get two ids; a PUT's id is PUT <user> <key>, so that any
        node publishing it names it alike."""
        first = self.message()[2]["Nats-Msg-Id"]
        second = self.message()[2]["Nats-Msg-Id"]
        keyed = self.message(key="k-1", user="bob")[2]["Nats-Msg-Id"]
        assert first != second
        assert keyed == "PUT bob k-1"

    def test_ids_differ_between_starts_of_a_node(self):
        """A restarted node never reuses an id of its previous run (the stream
        would take the new record for a retry of the old one)."""
        other = StreamJournal(URL, self.client, self.clock, "node-a")
        self.message()
        other({EVENT: "start", "log_time": 1.0})
        assert self.client.calls[0][2]["Nats-Msg-Id"] != self.client.calls[1][2]["Nats-Msg-Id"]

    def test_a_failed_publish_is_sent_again_with_the_same_id(self):
        """No connection, then a reply lost with its connection: each time the
        same payload and id are published again after a short wait, and the
        stream's answer (a duplicate of the lost one) acks it."""
        _subject, payload, headers, d = self.message()
        d.errback(NotConnected("down"))
        assert len(self.client.calls) == 1
        self.clock.advance(1)
        assert len(self.client.calls) == 2
        _s, again, again_headers, d2 = self.client.calls[1]
        assert (again, again_headers) == (payload, headers)
        d2.errback(RequestLost("lost"))
        self.clock.advance(1)
        self.client.calls[2][3].callback(pub_ack(9, duplicate=True))
        assert self.acks == [(9, None)]
        assert self.journal.republished == 2

    def test_past_the_deadline_a_record_is_refused_as_unavailable(self):
        """A record that could not be published for --nats-deadline seconds is
        refused, saying how long and why."""
        self.message()[3].errback(NotConnected("no servers"))
        for _ in range(60):
            self.clock.advance(1)
            if self.acks:
                break
            self.client.calls[-1][3].errback(NotConnected("no servers"))
        (seq, reason), = self.acks
        assert seq is None and "unavailable for 3" in reason and "no servers" in reason

    def test_a_stream_error_refuses_at_once(self):
        """A 400 (the subject is not the stream's) is not retried."""
        self.message()[3].callback(({}, b'{"error":{"code":400,"err_code":10060,'
                                        b'"description":"expected stream does not match"}}'))
        (seq, reason), = self.acks
        assert seq is None and "expected stream does not match" in reason
        assert len(self.client.calls) == 1

    def test_a_key_another_node_wrote_with_the_same_text_is_a_duplicate(self):
        """The stream says duplicate for a PUT: the stored record is read back;
        the same user, key and text: the first seq, DUPLICATE."""
        self.message(text="t", key="k")[3].callback(pub_ack(5, duplicate=True))
        subject, body, _h, d = self.client.calls[-1]
        assert subject == "$JS.API.STREAM.MSG.GET.orders" and json.loads(body) == {"seq": 5}
        d.callback(stored(5, b'{"time":1.0,"event":"message","pid":1,"node":"b",'
                             b'"user":"alice","text":"t","peer":"p","key":"k"}'))
        assert self.acks == [(5, DUPLICATE)]

    def test_a_key_another_node_wrote_with_another_text_is_a_conflict(self):
        """The stored record's text differs: CONFLICT, nothing journaled."""
        self.message(text="mine", key="k")[3].callback(pub_ack(5, duplicate=True))
        self.client.calls[-1][3].callback(stored(5, b'{"user":"alice","key":"k","text":"x"}'))
        assert self.acks == [(None, CONFLICT)]

    def test_a_duplicate_of_its_own_lost_publish_is_no_dup(self):
        """A PUT whose first publish lost its reply, published again: the
        stream's duplicate is that first publish, acked as new."""
        self.message(text="t", key="k")[3].errback(RequestLost("lost"))
        self.clock.advance(1)
        self.client.calls[-1][3].callback(pub_ack(8, duplicate=True))
        self.client.calls[-1][3].callback(stored(8, b'{"user":"alice","key":"k","text":"t"}'))
        assert self.acks == [(8, None)]

    def test_close_refuses_what_waits_to_be_published_again(self):
        """At close, a record waiting for its next publish is refused and the
        connection closed; later records are refused at once."""
        self.message()[3].errback(NotConnected("down"))
        self.journal.close()
        assert self.acks == [(None, "journal closed")] and self.client.closed
        self.journal({EVENT: "stop", "log_time": 2.0, FIELDS: {"served": 1},
                      ACK: lambda seq, reason: self.acks.append((seq, reason))})
        assert self.acks[-1] == (None, "journal closed")


    def test_stats_say_the_connection_reconnects_and_republishes(self):
        """STATS on a stream node adds nats=up|down, its reconnects and the
        records published again."""
        self.message()[3].errback(NotConnected("down"))
        self.client.connected, self.client.reconnects = False, 2
        assert self.journal.stats() == {"nats": "down", "nats_reconnects": 2,
                                        "republished": 1}


class StartCheckTests(SynchronousTestCase):
    def test_versions_before_2_10_23_are_refused(self):
        """2.9.10 (Debian 12's) and 2.10.22 are refused in one line naming the
        version needed; 2.10.23 and 2.15.1 are taken."""
        for old in ("2.9.10", "2.10.22", None, "garbage"):
            with pytest.raises(StreamRefused) as error:
                check_version(old)
            assert "2.10.23 or later" in str(error.value) and "\n" not in str(error.value)
        check_version("2.10.23")
        check_version("2.15.1")
        assert version_tuple("2.11.0-beta.1") == (2, 11, 0)

    def test_a_weaker_stream_is_refused(self):
        """Fewer replicas than asked, memory storage, a shorter duplicate
        window, or another subject: each refuses the start, saying which."""
        good = stream_config(URL, 3, 120)
        check_stream(URL, good, 3, 120)
        for change, words in [({"num_replicas": 1}, "1 replica and --nats-replicas asks 3"),
                              ({"storage": "memory"}, "memory storage"),
                              ({"duplicate_window": 10 * 10**9}, "duplicate window of 10 s"),
                              ({"subjects": ["other"]}, "does not take the subject")]:
            with pytest.raises(StreamRefused) as error:
                check_stream(URL, {**good, **change}, 3, 120)
            assert words in str(error.value)

    def test_a_journal_stream_is_append_only(self):
        """The stream made for a journal keeps files, denies delete and purge."""
        config = stream_config(URL, 3, 120)
        assert config["storage"] == "file" and config["deny_delete"] and config["deny_purge"]
        assert config["duplicate_window"] == 120 * 10**9
