"""Keyed messages (PUT <key> <text>, protocol 1.1): each rule of the
deduplication window, over StringTransport with a task.Clock and the memory
journal."""

import errno
import os
import time
from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cserver.dedup import DedupWindow, digest
from cserver.journal import EVENT, FileJournal
from cserver.journal.keyed import keyed_since
from cserver.server import Limits

from ..common import connect, make_factory, replies, send
from .base import Temporary


def authed(factory, user="alice"):
    protocol, transport = connect(factory)
    send(protocol, f"AUTH {user}")
    assert replies(transport)[1:] == [f"OK {user}"]
    return protocol, transport


class PutTests(SynchronousTestCase):
    """PUT through the protocol and the factory."""

    def setUp(self):
        self.clock = Clock()
        self.factory = make_factory(clock=self.clock)
        self.journal = self.factory.journal

    def records(self):
        return [r for r in self.journal.records() if r["event"] == "message"]

    def test_the_greeting_says_protocol_1_1(self):
        """HELLO names the protocol, so that a client can tell PUT is there."""
        _protocol, transport = connect(self.factory)
        assert replies(transport)[0].endswith(" proto=1.1")

    def test_first_put_is_journaled_with_its_key_and_acked_as_a_msg(self):
        """The first PUT of a key is journaled (its key in the record, last) and
        answered OK <seq> once durable."""
        protocol, transport = authed(self.factory)
        send(protocol, "PUT order-1 two apples")
        assert replies(transport) == []
        self.clock.advance(0)
        assert replies(transport) == ["OK 1"]
        [record] = self.records()
        assert (record["text"], record["key"]) == ("two apples", "order-1")
        assert list(record)[-1] == "key"

    def test_a_retry_gets_the_first_seq_marked_dup_and_journals_nothing(self):
        """The same key and text again -- on the same connection or another --
        gets OK <seq> dup with the first seq; nothing more is journaled;
        STATS counts the duplicates, and total stays."""
        protocol, transport = authed(self.factory)
        send(protocol, "PUT k1 hello")
        self.clock.advance(0)
        assert replies(transport) == ["OK 1"]
        send(protocol, "PUT k1 hello")
        other, other_transport = authed(self.factory)
        send(other, "PUT k1 hello")
        self.clock.advance(0)
        assert replies(transport) == ["OK 1 dup"]
        assert replies(other_transport) == ["OK 1 dup"]
        assert len(self.records()) == 1
        send(protocol, "STATS")
        stats = dict(item.split("=") for item in replies(transport)[0][3:].split())
        assert (stats["duplicates"], stats["total"], stats["inflight"]) == ("2", "1", "0")

    def test_a_retry_while_the_first_is_in_flight_waits_for_it(self):
        """A duplicate sent before the first record is durable is answered only
        once it is, with its seq; replies stay in request order."""
        protocol, transport = authed(self.factory)
        send(protocol, "PUT k2 hello", "PUT k2 hello", "MSG plain")
        assert replies(transport) == []
        self.clock.advance(0)
        assert replies(transport) == ["OK 1", "OK 1 dup", "OK 2"]
        assert [r.get("key") for r in self.records()] == ["k2", None]

    def test_a_refused_first_record_refuses_its_waiting_duplicates_and_leaves(self):
        """When the journal refuses the first record, the duplicates that waited
        get the same ERR, and the key leaves the window: a later retry is
        journaled as new."""
        protocol, transport = authed(self.factory)
        self.journal.fail_writes = OSError(errno.ENOSPC, "No space left on device")
        send(protocol, "PUT k3 hello", "PUT k3 hello")
        self.clock.advance(0)
        self.flushLoggedErrors()
        first, second = replies(transport)
        assert first.startswith("ERR unavailable write failed") and second == first
        self.journal.fail_writes = None
        send(protocol, "PUT k3 hello")
        self.clock.advance(0)
        assert replies(transport) == ["OK 1"]

    def test_the_same_key_with_another_text_is_a_conflict(self):
        """A key in the window with another text gets ERR conflict; nothing is
        journaled and the first stays."""
        protocol, transport = authed(self.factory)
        send(protocol, "PUT k4 one")
        self.clock.advance(0)
        send(protocol, "PUT k4 two", "PUT k4 one")
        self.clock.advance(0)
        assert replies(transport) == ["OK 1", "ERR conflict key k4 was sent with another text",
                                      "OK 1 dup"]
        assert len(self.records()) == 1

    def test_keys_are_per_user(self):
        """One user's key never matches another's: bob's k5 is a new message."""
        alice, alice_transport = authed(self.factory, "alice")
        bob, bob_transport = authed(self.factory, "bob")
        send(alice, "PUT k5 hello")
        self.clock.advance(0)
        send(bob, "PUT k5 hello")
        self.clock.advance(0)
        assert replies(alice_transport) == ["OK 1"]
        assert replies(bob_transport) == ["OK 2"]

    def test_a_key_out_of_the_window_is_new_again(self):
        """After --dedup-window seconds the key is forgotten: the same PUT is
        journaled again (the guarantee's bound)."""
        protocol, transport = authed(self.factory)
        send(protocol, "PUT k6 hello")
        self.clock.advance(0)
        self.clock.advance(Limits().dedup_window + 1)
        send(protocol, "PUT k6 hello")
        self.clock.advance(0)
        assert replies(transport) == ["OK 1", "OK 2"]

    def test_bad_puts_get_one_line_and_journal_nothing(self):
        """Before AUTH, a bad key, no text, or --dedup-window 0: one ERR line each."""
        protocol, transport = connect(self.factory)
        replies(transport)
        send(protocol, "PUT k hello")
        assert replies(transport) == ["ERR noauth authenticate first"]
        send(protocol, "AUTH alice")
        replies(transport)
        send(protocol, "PUT b!d key", "PUT " + "k" * 129 + " x", "PUT k7", "PUT k7 ")
        lines = replies(transport)
        assert [line.split()[1] for line in lines] == ["syntax"] * 4, lines
        off = make_factory(limits=Limits(dedup_window=0))
        protocol, transport = authed(off)
        send(protocol, "PUT k8 hello")
        assert replies(transport) == ["ERR unsupported PUT is off on this server "
                                      "(--dedup-window 0)"]
        assert self.records() == [] and off.journal.records()[0:] == []


class WindowTests(SynchronousTestCase):
    """DedupWindow alone: its bounds."""

    def test_the_count_bound_forgets_the_oldest_first(self):
        """With more than ``keys`` keys, the oldest leave first (a check of a
        forgotten key makes it new, and in flight, again; keys in flight count
        against the bound too)."""
        clock = Clock()
        window = DedupWindow(clock, seconds=60, keys=3)
        for index in range(5):
            verdict, name = window.check("u", f"k{index}", "t")
            assert verdict == "new"
            window.done(name, index + 1, None)
            clock.advance(1)
        verdicts = [window.check("u", f"k{i}", "t")[0] for i in (4, 3, 2, 1, 0)]
        assert verdicts == ["duplicate", "duplicate", "duplicate", "new", "new"]
        # k2 left to make room for k0: k3 and k4 durable, k1 and k0 in flight.
        assert len(window) == 4

    def test_a_key_never_leaves_before_its_window(self):
        """Keys are expired by whole seconds, never early: a key taken at 100.9 is
        still a duplicate at 100.9 + window - 0.1 (the same second's bucket
        holds keys whose window has not passed), and gone a second after its
        window."""
        clock = Clock()
        clock.advance(100.9)
        window = DedupWindow(clock, seconds=120)
        _verdict, name = window.check("u", "k", "t")
        window.done(name, 1, None)
        clock.advance(120 - 0.1)
        assert window.check("u", "k", "t")[0] == "duplicate"
        clock.advance(1.2)
        assert window.check("u", "k", "t")[0] == "new"

    def test_the_count_bound_holds_within_one_second(self):
        """Many keys in one second with a small count bound: exactly ``keys`` stay,
        the newest."""
        window = DedupWindow(Clock(), seconds=60, keys=10)
        for index in range(1000):
            _verdict, name = window.check("u", f"k{index}", "t")
            window.done(name, index + 1, None)
        # Newest first: a check of a forgotten key takes a place in the window.
        kept = [i for i in reversed(range(1000))
                if window.check("u", f"k{i}", "t")[0] == "duplicate"]
        kept.reverse()
        assert kept == list(range(990, 1000))

    def test_a_key_in_flight_outlives_its_window_until_it_is_durable(self):
        """A record still in flight when its second leaves the window (a sync
        stuck for longer than the window) keeps its key: its duplicate waits,
        and once durable the key stays another window."""
        clock = Clock()
        window = DedupWindow(clock, seconds=60)
        _verdict, name = window.check("u", "slow", "t")
        clock.advance(200)
        assert window.check("u", "other", "t")[0] == "new"  # expiry runs
        verdict, again = window.check("u", "slow", "t")
        assert verdict == "duplicate"
        answers = []
        window.wait(again, lambda seq, reason: answers.append((seq, reason)))
        assert answers == []
        window.done(name, 9, None)
        assert answers == [(9, None)]
        clock.advance(59)
        assert window.check("u", "slow", "t")[0] == "duplicate"

    def test_a_key_sent_again_after_a_refusal_keeps_its_whole_window(self):
        """A refused key (a write that failed) sent again 30 s later is in the
        window for a whole window from then: the refused one's place in an
        older bucket does not take the new one with it."""
        clock = Clock()
        window = DedupWindow(clock, seconds=60)
        window.done(window.check("u", "k", "t")[1], None, "write failed: ENOSPC")
        clock.advance(30)
        verdict, name = window.check("u", "k", "t")
        assert verdict == "new"
        window.done(name, 7, None)
        clock.advance(59)
        assert window.check("u", "other", "t")[0] == "new"  # expiry runs
        assert window.check("u", "k", "t")[0] == "duplicate"
        clock.advance(2)
        assert window.check("u", "k", "t")[0] == "new"

    def test_the_count_bound_never_drops_a_key_in_flight(self):
        """Over the count bound with the oldest key still in flight, nothing is
        dropped until it is durable; then the oldest go."""
        window = DedupWindow(Clock(), seconds=60, keys=2)
        _verdict, first = window.check("u", "a", "t")
        for key in ("b", "c", "d"):
            window.done(window.check("u", key, "t")[1], 1, None)
        assert window.check("u", "a", "t")[0] == "duplicate"
        window.done(first, 5, None)
        assert window.check("u", "e", "t")[0] == "new"
        assert [window.check("u", k, "t")[0] for k in ("a", "b")] == ["new", "new"]

    def test_the_digest_is_the_same_in_every_process(self):
        """A text's digest does not depend on the process (hash() would:
        PYTHONHASHSEED), so a window can be written by one and read by
        another."""
        import subprocess
        import sys
        code = "from cserver.dedup import digest; print(digest('h\u00e9llo \"x\"'))"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True, env={**os.environ, "PYTHONHASHSEED": "random"})
        assert int(other.stdout) == digest('h\u00e9llo "x"')

    def test_rebuilt_keys_answer_duplicates_at_once(self):
        """A key put back by recovery answers a duplicate with its seq at once; one
        older than the window is not put back; the text is compared by the
        digest of its JSON, as the record holds it."""
        clock = Clock()
        clock.advance(1000)
        window = DedupWindow(clock, seconds=60)
        window.rebuild([SimpleNamespace(user="u", key="old", text=b'"t"', seq=7, time=900),
                        SimpleNamespace(user="u", key="k", text=b'"t"', seq=42, time=990)])
        answers = []
        verdict, name = window.check("u", "k", "t")
        assert verdict == "duplicate"
        assert window.check("u", "k", "other")[0] == "conflict"
        window.wait(name, lambda seq, reason: answers.append((seq, reason)))
        assert answers == [(42, None)]
        assert window.check("u", "old", "t")[0] == "new"
        assert len(window) == 2  # k durable, old in flight


class RebuildTests(Temporary, SynchronousTestCase):
    """The window rebuilt at start from the end of the journal."""

    def journal_with(self, path, keyed, clock):
        """A file journal at ``path`` holding ``keyed``: (time, user, key, text)."""
        journal = FileJournal.open(path, clock, fsync="never")
        for when, user, key, text in keyed:
            journal({EVENT: "message", "log_time": when, "user": user, "text": text,
                     "peer": "tcp:127.0.0.1:1", "key": key})
            journal({EVENT: "message", "log_time": when, "user": user, "text": "plain",
                     "peer": "tcp:127.0.0.1:1"})
            journal.flush()
        return journal

    def test_keyed_since_reads_back_the_window_oldest_first(self):
        """keyed_since gives the keyed message records at ``since`` or later, oldest
        first, the last ``limit`` of them; plain MSGs and older records are not
        in it (with blocks far smaller than the file, so lines cross blocks)."""
        path = self.temp_path()
        journal = self.journal_with(path, [(1000.0 + i, "alice", f"k{i}", f"t{i}")
                                           for i in range(200)], Clock())
        journal.close()
        found = keyed_since(path, 1150.0, 1000, block=97)
        assert [r.key for r in found] == [f"k{i}" for i in range(150, 200)]
        assert [r.seq for r in found] == [2 * i + 1 for i in range(150, 200)]
        assert [r.key for r in keyed_since(path, 0, 5, block=97)] == [
            f"k{i}" for i in range(195, 200)]

    def test_a_text_spelled_another_way_in_json_is_the_same_text(self):
        """A record whose text's JSON uses escapes this server does not write
        (``\\u0068`` for h, as another tool may) is read back as the same text:
        a PUT of it is a duplicate, not a conflict."""
        path = self.temp_path()
        with open(path, "wb") as f:
            f.write(b'{"seq":1,"time":1000.5,"event":"message","pid":1,"user":"alice",'
                    b'"text":"\\u0068ello \\"q\\"","peer":"p","key":"k"}\n')
        clock = Clock()
        clock.advance(1010)
        window = DedupWindow(clock, seconds=60)
        window.rebuild(keyed_since(path, 950, 10))
        assert window.check("alice", "k", 'hello "q"')[0] == "duplicate"
        assert window.check("alice", "k", "hello")[0] == "conflict"

    def test_keyed_since_goes_on_in_the_file_before_a_rotation(self):
        """After a reopen, the window reaches back into the previous file (named by
        the new file's reopen record) while its records are in the window."""
        path = self.temp_path()
        clock = Clock()
        journal = self.journal_with(path, [(1000.0 + i, "bob", f"k{i}", "x") for i in range(3)],
                                    clock)
        os.rename(path, path + ".1")
        journal.reopen()
        clock.advance(0)
        journal({EVENT: "message", "log_time": time.time(), "user": "bob", "text": "x",
                 "peer": "p", "key": "after"})
        journal.close()
        found = keyed_since(path, 1001.0, 1000)
        assert [r.key for r in found] == ["k1", "k2", "after"]

    def test_a_retry_after_a_restart_gets_dup_with_the_first_seq(self):
        """A factory started on a journal rebuilds its window from it: a PUT of a
        key journaled before the restart gets the original seq, marked dup, and
        nothing more is journaled; a key older than the window is new."""
        path = self.temp_path()
        now = time.time()
        clock = Clock()
        clock.advance(now)
        journal = self.journal_with(path, [(now - 500, "alice", "old", "t"),
                                           (now - 5, "alice", "recent", "t")], clock)
        journal.close()
        journal = FileJournal.open(path, clock, fsync="never")
        self.addCleanup(journal.close)
        factory = make_factory(clock=clock, journal=journal)
        protocol, transport = authed(factory)
        send(protocol, "PUT recent t", "PUT old t")
        clock.advance(0)
        assert replies(transport) == ["OK 3 dup", "OK 5"]
