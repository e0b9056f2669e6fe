"""Tests for cserver.journal: record format, seq, group commit, fsync modes,
write and fsync errors, and the journal as a twisted.logger observer.

Unit layer.  The journal runs on a task.Clock: a batch is flushed at
``clock.advance(0)`` and the interval sync runs at ``clock.advance(1)``.  File
journals write real files in temporary directories; I/O errors are injected
by replacing the instance's ``_os_write``, ``_os_fdatasync`` and
``_os_ftruncate``.
"""

import contextlib
import errno
import json
import os
import pathlib
import queue
import threading
import time
from unittest import skipIf

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cserver.journal import (
    ACK,
    EVENT,
    FIELDS,
    AutoSyncer,
    FileJournal,
    IJournal,
    SyncThread,
)
from cserver.journal.recovery import Recovery, recover
from cserver.testing import MemoryJournal

from .base import JournalCase

HEAD = ["seq", "time", "event", "pid"]


NASTY = [
    "",
    'say "hi"',
    "back\\slash \\n \\u0041 \\",
    "tab\tnewline\nreturn\rformfeed\fbackspace\b",
    "nul\x00 and \x01\x1f\x7f",
    "zoë – ŝ ĉ 中文",
    "line\u2028separator\u2029paragraph",
    "emoji 😀🎉 and a ZWJ 👩‍👩‍👧",
    '{"seq":9,"time":1,"event":"message","pid":1,"user":"x","text":"y","peer":"z"}\n',
    "x" * 10000,
]


class Acks:
    """
    An ack callable that records its calls, and optionally logs them into a
    shared list of events to check their order against the system calls.
    """

    def __init__(self, log=None):
        self.calls = []
        self.log = log

    def __call__(self, seq, reason):
        self.calls.append((seq, reason))
        if self.log is not None:
            self.log.append(("ack", seq, reason))

    @property
    def seqs(self):
        return [seq for seq, _reason in self.calls]

    @property
    def reasons(self):
        return [reason for _seq, reason in self.calls]


class Syscalls:
    """
    Wraps a FileJournal's system calls: logs each one into ``log`` and makes
    them fail on demand.

    With ``write_error`` set, writes raise it once ``write_budget`` more
    bytes have been written (0: at once), which gives a partial write.
    """

    def __init__(self, journal, log=None):
        self.log = log if log is not None else []
        self.write_error = None
        self.write_budget = 0
        self.sync_error = None
        self.truncate_error = None
        self._write = journal._os_write
        self._fdatasync = journal._os_fdatasync
        self._ftruncate = journal._os_ftruncate
        journal._os_write = self.write
        journal._os_fdatasync = self.fdatasync
        journal._os_ftruncate = self.ftruncate

    def write(self, fd, data):
        if self.write_error is not None:
            if not self.write_budget:
                self.log.append(("write failed",))
                raise self.write_error
            data = data[: self.write_budget]
        written = self._write(fd, data)
        if self.write_error is not None:
            self.write_budget -= written
        self.log.append(("write", written))
        return written

    def fdatasync(self, fd):
        if self.sync_error is not None:
            self.log.append(("fdatasync failed",))
            raise self.sync_error
        self._fdatasync(fd)
        self.log.append(("fdatasync",))

    def ftruncate(self, fd, size):
        if self.truncate_error is not None:
            self.log.append(("ftruncate failed", size))
            raise self.truncate_error
        self._ftruncate(fd, size)
        self.log.append(("ftruncate", size))

    def count(self, name):
        return sum(1 for entry in self.log if entry[0] == name)


class ManualSyncer:
    """
    A syncer whose thread is the test: requests are remembered, and each
    :meth:`finish` runs one sync up to what was requested, the way
    :class:`cserver.journal.SyncThread` does.
    """

    def __init__(self):
        self.wanted = 0
        self.done = 0
        self.stopped = False

    def bind(self, sync, durable, failed):
        self._sync = sync
        self._durable = durable
        self._failed = failed

    def request(self, seq):
        self.wanted = seq

    def stop(self):
        self.stopped = True

    @property
    def pending(self):
        return self.wanted != self.done

    def finish(self, target=None):
        """
        One sync, up to ``target`` (by default, all that was requested).
        """
        target = self.wanted if target is None else target
        try:
            self._sync()
        except BaseException as e:
            self._failed(target, e)
            return
        self.done = target
        self._durable(target)


def message(journal, ack=None, user="alice", text="hello", peer="tcp:127.0.0.1:40000",
            log_time=1700000000.25):
    """
    Emit one message event into ``journal`` the way a Logger would.
    """
    event = {EVENT: "message", "log_time": log_time, "user": user, "text": text, "peer": peer}
    if ack is not None:
        event[ACK] = ack
    journal(event)


def read_records(path):
    """
    The records of the journal file at ``path``, parsed; checks that the file
    is whole newline-terminated lines.
    """
    data = open(path, "rb").read()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


class Cases:
    """
    For a test that runs several cases in a loop: ``with self.case(label):``
    makes a failure in the block name its case; ``self.fresh()`` gives the
    next case a new ``self.clock`` and ``self.path`` (a JournalCase's).
    """

    @contextlib.contextmanager
    def case(self, label):
        try:
            yield
        except AssertionError as e:
            raise self.failureException(f"case {label}: {e}") from e

    def fresh(self):
        self.clock = Clock()
        self.path = self.temp_path()


def _raise(error):
    raise error


class _Timer:
    """
    A timer for AutoSyncer whose clock moves only in the journal's fdatasync,
    by the duration set in :attr:`next` (the last one set stays).
    """

    def __init__(self, journal):
        self.now = 0.0
        self.next = 0.0001
        self.threads = []
        real_sync = journal._os_fdatasync

        def timed(fd):
            self.threads.append(threading.current_thread())
            self.now += self.next
            real_sync(fd)

        journal._os_fdatasync = timed

    def __call__(self):
        return self.now


def _auto(open_journal):
    """
    A file journal on an AutoSyncer whose thread reports into a queue; the
    journal, the syncer, the timer and the queue.
    """
    reports = queue.Queue()
    syncer = AutoSyncer(lambda f, *args: reports.put((f, args)))
    journal = open_journal(syncer=syncer)
    timer = syncer._timer = _Timer(journal)
    return journal, syncer, timer, reports


def _pump(reports, acks, seqs):
    """Run the thread's reports in this (the reactor's) thread until ``seqs`` are acked."""
    while acks.seqs != seqs:
        f, args = reports.get(timeout=10)
        f(*args)



class RecordFormatTests(Cases, JournalCase, SynchronousTestCase):
    """The record format: the head, the fields, one compact UTF-8 line per record."""

    def test_message_record_has_head_then_user_text_peer(self):
        """A message record's keys are seq, time, event, pid, user, text, peer, in that order."""
        journal = self.open_journal()
        message(journal, user="alice", text="hi there", peer="tcp:10.0.0.1:5555", log_time=12.5)
        self.clock.advance(0)
        [record] = read_records(self.path)
        assert list(record) == [*HEAD, "user", "text", "peer"]
        assert record == {
            "seq": 1,
            "time": 12.5,
            "event": "message",
            "pid": os.getpid(),
            "user": "alice",
            "text": "hi there",
            "peer": "tcp:10.0.0.1:5555",
        }

    def test_record_is_one_compact_utf8_line(self):
        """A record is one compact JSON line, non-ASCII written as UTF-8 (greppable), LF-ended."""
        journal = self.open_journal()
        message(journal, user="zoë", text="café 😀", peer="p", log_time=1.5)
        self.clock.advance(0)
        data = open(self.path, "rb").read()
        assert data.count(b"\n") == 1 and data.endswith(b"\n")
        assert "zoë".encode() in data and "café 😀".encode() in data
        assert b": " not in data and b", " not in data

    def test_time_is_the_events_log_time_exactly(self):
        """The record's time is the event's log_time, as a float that round-trips exactly."""
        journal = self.open_journal()
        stamp = 1712345678.123456789
        message(journal, log_time=stamp)
        self.clock.advance(0)
        assert read_records(self.path)[0]["time"] == stamp

    def test_other_records_carry_their_fields_after_the_head(self):
        """start, stop and auth_failed records are the head followed by their cserver_fields."""
        for kind, fields in [
            (
                "start",
                {"version": "1.0", "records": 7, "last_seq": 7, "messages": 5, "torn_bytes": 0,
                 "torn_file": None},
            ),
            ("stop", {"served": 3, "total": 10}),
            ("auth_failed", {"user": 'mal"lory\\ 😈', "peer": "tcp:127.0.0.1:1"}),
        ]:
            with self.case(kind):
                self.fresh()
                journal = self.open_journal()
                journal({EVENT: kind, FIELDS: fields, "log_time": 3.25})
                self.clock.advance(0)
                [record] = read_records(self.path)
                assert list(record) == HEAD + list(fields)
                assert record == {"seq": 1, "time": 3.25, "event": kind, "pid": os.getpid(),
                                  **fields}

    def test_record_without_fields_is_only_the_head(self):
        """A non-message event without cserver_fields is written as the head alone."""
        journal = self.open_journal()
        journal({EVENT: "stop", "log_time": 2.0})
        self.clock.advance(0)
        assert read_records(self.path) == [
            {"seq": 1, "time": 2.0, "event": "stop", "pid": os.getpid()}]

    def test_any_text_round_trips_through_the_file(self):
        """Any text, user and peer read back from the file equal to what was emitted, and
        recover."""
        for text in NASTY:
            with self.case(repr(text)[:60]):
                self.fresh()
                journal = self.open_journal()
                message(journal, user=text or "u", text=text, peer=text)
                self.clock.advance(0)
                [record] = read_records(self.path)
                assert (record["user"], record["text"], record["peer"]) == (
                    text or "u", text, text)
                journal.close()
                result = recover(self.path)
                assert (result.last_seq, result.messages, result.users) == (
                    1, 1, {text or "u": 1})

    @given(
        user=st.text(st.characters(codec="utf-8")),
        text=st.text(st.characters(codec="utf-8")),
        peer=st.text(st.characters(codec="utf-8")),
    )
    @example(user='"', text="\\", peer="\x00")
    @example(user="\u2028", text="\n\r\t\b\f\x1f\x7f", peer="😀")
    @example(user='","text":"forged', text='"}\n{"seq":2', peer="\\u0000")
    def test_records_read_back_equal_what_was_emitted(self, user, text, peer):
        """For any strings, the written line is one line and json.loads gives back the record."""
        clock = Clock()
        journal = MemoryJournal(clock)
        message(journal, user=user, text=text, peer=peer, log_time=5.5)
        clock.advance(0)
        assert journal.data.count(b"\n") == 1
        record = json.loads(journal.data)
        assert record == {"seq": 1, "time": 5.5, "event": "message", "pid": os.getpid(),
                          "user": user, "text": text, "peer": peer}

    def test_events_without_cserver_event_are_ignored(self):
        """Plain log events, even with an ack or fields, are not journaled and take no seq."""
        journal = self.open_journal()
        calls = Syscalls(journal)
        acks = Acks()
        journal({"log_time": 1.0, "log_format": "hello", "user": "x", "text": "y", "peer": "z"})
        journal({"log_time": 1.0, ACK: acks, FIELDS: {"a": 1}})
        Logger(observer=journal).info("unrelated {thing}", thing=1)
        self.clock.advance(0)
        assert calls.log == [] and acks.calls == []
        assert journal.last_seq == 0
        assert open(self.path, "rb").read() == b""


class SeqTests(Cases, JournalCase, SynchronousTestCase):
    """seq: contiguous from one, continued after a restart, never given to a refused event."""

    def test_seqs_are_contiguous_from_one(self):
        """Records are numbered 1, 2, 3, ... in the order they are taken, across batches."""
        journal = self.open_journal()
        acks = Acks()
        for _ in range(3):
            message(journal, acks)
        self.clock.advance(0)
        message(journal, acks)
        journal({EVENT: "stop", "log_time": 1.0, ACK: acks})
        self.clock.advance(0)
        assert acks.calls == [(1, None), (2, None), (3, None), (4, None), (5, None)]
        assert [r["seq"] for r in read_records(self.path)] == [1, 2, 3, 4, 5]
        assert journal.last_seq == 5

    def test_seq_continues_from_the_recovered_journal(self):
        """Reopened, the journal numbers its next record right after the last one in the file."""
        first = self.open_journal()
        for text in ("a", "b", "c"):
            message(first, text=text)
        first.close()
        second = self.open_journal()
        assert second.recovery.last_seq == 3 and second.last_seq == 3
        acks = Acks()
        message(second, acks, text="d")
        self.clock.advance(0)
        assert acks.calls == [(4, None)]
        assert [(r["seq"], r["text"]) for r in read_records(self.path)] == [
            (1, "a"), (2, "b"), (3, "c"), (4, "d")]

    def test_memory_journal_continues_from_a_recovery(self):
        """A MemoryJournal given a Recovery numbers from its last_seq."""
        journal = MemoryJournal(self.clock, recovery=Recovery(last_seq=41, records=41))
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        assert acks.calls == [(42, None)]
        assert [r["seq"] for r in journal.records()] == [42]

    def test_journal_opened_over_a_torn_tail_appends_after_the_last_record(self):
        """A torn tail is cut at open; the next record follows the last valid one directly."""
        first = self.open_journal()
        message(first, text="kept")
        first.close()
        with open(self.path, "ab") as f:
            f.write(b'{"seq":2,"time":1.0,"eve')
        journal = self.open_journal()
        assert journal.recovery.torn_bytes == 24
        message(journal, text="next")
        journal.close()
        assert [(r["seq"], r["text"]) for r in read_records(self.path)] == [
            (1, "kept"), (2, "next")]
        assert recover(self.path).torn_bytes == 0

    def test_an_event_that_cannot_be_formatted_takes_no_seq(self):
        """A malformed event is refused without consuming a seq: the file stays contiguous."""
        for name, bad in {
            "missing-peer": {EVENT: "message", "log_time": 1.0, "user": "alice",
                             "text": "no peer"},
            "user-none": {EVENT: "message", "log_time": 1.0, "user": None, "text": "x",
                          "peer": "p"},
            "missing-log_time": {EVENT: "message", "user": "alice", "text": "no time",
                                 "peer": "p"},
        }.items():
            with self.case(name):
                self.fresh()
                journal = self.open_journal()
                acks = Acks()
                message(journal, acks)
                self.clock.advance(0)
                with contextlib.suppress(KeyError, TypeError):
                    journal(dict(bad))
                # Logged, not raised: not an error of this test (trial's log observer).
                self.flushLoggedErrors(KeyError, TypeError)
                message(journal, acks)
                self.clock.advance(0)
                journal.close()
                assert [r["seq"] for r in read_records(self.path)] == [1, 2]
                assert acks.calls == [(1, None), (2, None)]
                assert recover(self.path).last_seq == 2

    def test_a_record_that_cannot_be_encoded_does_not_stall_the_journal(self):
        """A str that is not encodable as UTF-8 fails alone; records after it are still acked."""
        journal = MemoryJournal(self.clock)
        acks = Acks()
        with contextlib.suppress(UnicodeError):
            message(journal, acks, text="lone \ud800 surrogate")
        message(journal, acks, text="fine")
        for _ in range(2):
            with contextlib.suppress(UnicodeError):
                self.clock.advance(0)
        # Logged, not raised: not an error of this test (trial's log observer).
        self.flushLoggedErrors(UnicodeError)
        assert [seq for seq, reason in acks.calls if reason is None] == [1]
        assert [r["text"] for r in journal.records()] == ["fine"]


class GroupCommitTests(JournalCase, SynchronousTestCase):
    """Group commit and the fsync modes: a batch per turn, one write and one fdatasync."""

    def test_one_turn_is_one_write_and_one_fdatasync(self):
        """N events in one reactor turn go out in one write(2) and one fdatasync(2)."""
        journal = self.open_journal()
        calls = Syscalls(journal)
        acks = Acks()
        for i in range(100):
            message(journal, acks, text=f"m{i}")
        assert calls.log == [] and acks.calls == []
        self.clock.advance(0)
        size = os.path.getsize(self.path)
        assert calls.log == [("write", size), ("fdatasync",)]
        assert acks.calls == [(seq, None) for seq in range(1, 101)]

    def test_acks_come_only_after_the_fdatasync(self):
        """With fsync=always no ack is called before the batch's fdatasync has returned."""
        journal = self.open_journal()
        log = []
        Syscalls(journal, log)
        acks = Acks(log)
        for _ in range(3):
            message(journal, acks)
        self.clock.advance(0)
        assert [entry[0] for entry in log] == ["write", "fdatasync", "ack", "ack", "ack"]
        assert acks.calls == [(1, None), (2, None), (3, None)]

    def test_each_turn_is_its_own_batch(self):
        """Events of two turns make two batches: two writes, two fdatasyncs."""
        journal = self.open_journal()
        calls = Syscalls(journal)
        acks = Acks()
        message(journal, acks)
        message(journal, acks)
        self.clock.advance(0)
        message(journal, acks)
        self.clock.advance(0)
        assert (calls.count("write"), calls.count("fdatasync")) == (2, 2)
        assert acks.seqs == [1, 2, 3]

    def test_flush_writes_and_acks_now(self):
        """flush() writes, syncs and acks the taken records without waiting for the turn's end."""
        journal = self.open_journal()
        calls = Syscalls(journal)
        acks = Acks()
        message(journal, acks)
        journal.flush()
        assert acks.calls == [(1, None)]
        assert [entry[0] for entry in calls.log] == ["write", "fdatasync"]
        assert self.clock.getDelayedCalls() == []
        self.clock.advance(0)
        assert calls.count("write") == 1

    def test_an_empty_turn_does_nothing(self):
        """With nothing taken, flush and the end of a turn neither write nor sync."""
        journal = self.open_journal()
        calls = Syscalls(journal)
        journal.flush()
        self.clock.advance(0)
        assert calls.log == []

    def test_short_writes_are_completed(self):
        """A write(2) that takes fewer bytes than asked is continued until the batch is out."""
        journal = self.open_journal()
        real_write = journal._os_write
        journal._os_write = lambda fd, data: real_write(fd, data[:7])
        acks = Acks()
        for text in ("one", "two", "three"):
            message(journal, acks, text=text)
        self.clock.advance(0)
        assert acks.seqs == [1, 2, 3]
        assert [r["text"] for r in read_records(self.path)] == ["one", "two", "three"]

    def test_interval_acks_after_the_write_and_syncs_once_a_second(self):
        """fsync=interval acks once written, then fdatasyncs once per second."""
        journal = self.open_journal("interval")
        log = []
        calls = Syscalls(journal, log)
        acks = Acks(log)
        message(journal, acks)
        message(journal, acks)
        self.clock.advance(0)
        assert [entry[0] for entry in log] == ["write", "ack", "ack"]
        message(journal, acks)
        self.clock.advance(0.5)
        assert calls.count("fdatasync") == 0
        self.clock.advance(0.5)
        assert calls.count("fdatasync") == 1
        assert acks.seqs == [1, 2, 3]

    def test_interval_syncs_only_when_something_was_written(self):
        """fsync=interval skips the periodic fdatasync when nothing was written since the last."""
        journal = self.open_journal("interval")
        calls = Syscalls(journal)
        self.clock.advance(1)
        self.clock.advance(1)
        assert calls.count("fdatasync") == 0
        message(journal)
        self.clock.advance(0)
        self.clock.advance(1)
        self.clock.advance(1)
        self.clock.advance(1)
        assert calls.count("fdatasync") == 1
        message(journal)
        self.clock.advance(0)
        self.clock.advance(1)
        assert calls.count("fdatasync") == 2

    def test_never_never_syncs(self):
        """fsync=never acks after the write and never fdatasyncs while running."""
        journal = self.open_journal("never")
        calls = Syscalls(journal)
        acks = Acks()
        for _ in range(5):
            message(journal, acks)
            self.clock.advance(0)
        for _ in range(10):
            self.clock.advance(1)
        assert acks.seqs == [1, 2, 3, 4, 5]
        assert (calls.count("write"), calls.count("fdatasync")) == (5, 0)
        assert self.clock.getDelayedCalls() == []

    def test_invalid_fsync_mode_is_a_value_error(self):
        """An fsync mode other than always, interval and never raises ValueError."""
        with self.assertRaises(ValueError) as caught:
            MemoryJournal(self.clock, fsync="sometimes")
        self.assertRegex(str(caught.exception), "always, interval, never")
        with self.assertRaises(ValueError) as caught:
            FileJournal.open(self.path, self.clock, fsync="sometimes")
        self.assertRegex(str(caught.exception), "'sometimes'")

    @skipIf(not os.path.isdir("/proc/self/fd"), "needs /proc/self/fd")
    def test_invalid_fsync_mode_leaves_no_file_open(self):
        """FileJournal.open with an invalid fsync mode leaks no file descriptor."""
        before = len(os.listdir("/proc/self/fd"))
        with self.assertRaises(ValueError):
            FileJournal.open(self.path, self.clock, fsync="sometimes")
        assert len(os.listdir("/proc/self/fd")) == before


class WriteErrorTests(Cases, JournalCase, SynchronousTestCase):
    """Write errors: the batch refused and cut back off, the journal going on."""

    def test_a_failed_write_fails_its_batch_and_leaves_a_valid_file(self):
        """
        A write error fails every ack of the batch with the reason, cuts any part
        written back off, keeps the journal running, reuses the batch's seqs, and
        takes records again once writes work.
        """
        for code in (errno.ENOSPC, errno.EIO, errno.EFBIG):
            for partial in (False, True):
                written = "half-written" if partial else "nothing-written"
                with self.case(f"{errno.errorcode[code]}, {written}"):
                    self.fresh()
                    journal = self.open_journal()
                    calls = Syscalls(journal)
                    message(journal, text="before")
                    self.clock.advance(0)
                    good = open(self.path, "rb").read()

                    calls.write_error = OSError(code, os.strerror(code))
                    failed = Acks()
                    for text in ("x1", "x2", "x3"):
                        message(journal, failed, text=text)
                    if partial:
                        calls.write_budget = 50
                    self.clock.advance(0)
                    assert failed.seqs == [None, None, None]
                    assert len(set(failed.reasons)) == 1
                    assert failed.reasons[0].startswith("write failed: " + errno.errorcode[code])
                    assert ("ftruncate", len(good)) in calls.log
                    assert open(self.path, "rb").read() == good
                    assert journal.broken is None and journal.last_seq == 1
                    clean = recover(self.path)
                    assert (clean.last_seq, clean.torn_bytes, clean.size) == (1, 0, len(good))

                    calls.write_error = None
                    later = Acks()
                    message(journal, later, text="after1")
                    message(journal, later, text="after2")
                    self.clock.advance(0)
                    assert later.calls == [(2, None), (3, None)]
                    assert [(r["seq"], r["text"]) for r in read_records(self.path)] == [
                        (1, "before"), (2, "after1"), (3, "after2")]

    def test_a_failed_write_in_interval_mode_fails_its_acks(self):
        """With fsync=interval too, a write error refuses the batch and the journal goes on."""
        journal = self.open_journal("interval")
        calls = Syscalls(journal)
        calls.write_error = OSError(errno.ENOSPC, "No space left on device")
        calls.write_budget = 10
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        assert acks.seqs == [None] and "ENOSPC" in acks.reasons[0]
        assert open(self.path, "rb").read() == b""
        calls.write_error = None
        message(journal, acks)
        self.clock.advance(0)
        assert acks.seqs == [None, 1]

    def test_a_write_error_whose_truncate_fails_breaks_the_journal(self):
        """When the partial batch cannot be cut off, the journal takes nothing more; a restart
        moves the partial batch to a side file."""
        journal = self.open_journal()
        calls = Syscalls(journal)
        message(journal, text="kept")
        self.clock.advance(0)
        calls.write_error = OSError(errno.EIO, "Input/output error")
        calls.write_budget = 30
        calls.truncate_error = OSError(errno.EIO, "Input/output error")
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        assert acks.seqs == [None]
        assert "truncate failed" in journal.broken
        message(journal, acks)
        assert acks.calls[-1] == (None, journal.broken)
        journal.close()
        result = recover(self.path)
        assert (result.last_seq, result.torn_bytes) == (1, 30)

    def test_memory_journal_write_errors(self):
        """MemoryJournal.fail_writes refuses the batch, keeps the data and the seq, then
        recovers."""
        journal = MemoryJournal(self.clock)
        acks = Acks()
        message(journal, acks, text="a")
        self.clock.advance(0)
        journal.fail_writes = OSError(errno.ENOSPC, "No space left on device")
        message(journal, acks, text="b")
        self.clock.advance(0)
        journal.fail_writes = None
        message(journal, acks, text="c")
        self.clock.advance(0)
        assert acks.calls[0] == (1, None) and acks.calls[2] == (2, None)
        assert acks.calls[1][0] is None and "ENOSPC" in acks.calls[1][1]
        assert [(r["seq"], r["text"]) for r in journal.records()] == [(1, "a"), (2, "c")]
        assert journal.broken is None


class FsyncErrorTests(JournalCase, SynchronousTestCase):
    """fsync errors: the batch refused, the journal broken from then on."""

    def test_a_failed_fdatasync_fails_its_batch_and_breaks_the_journal(self):
        """
        An fdatasync error fails the batch's acks, is not retried, and every
        later event is refused with the reason, even once syncs would work.
        """
        journal = self.open_journal()
        calls = Syscalls(journal)
        message(journal, text="kept")
        self.clock.advance(0)
        good = open(self.path, "rb").read()
        calls.sync_error = OSError(errno.EIO, "Input/output error")
        failed = Acks()
        message(journal, failed)
        message(journal, failed)
        self.clock.advance(0)
        assert failed.seqs == [None, None]
        assert failed.reasons[0].startswith("fsync failed: EIO")
        assert journal.broken == failed.reasons[0]
        assert open(self.path, "rb").read() == good

        calls.sync_error = None
        writes = calls.count("write")
        refused = Acks()
        message(journal, refused)
        journal({EVENT: "stop", "log_time": 1.0, ACK: refused})
        assert refused.calls == [(None, journal.broken)] * 2
        self.clock.advance(0)
        assert calls.count("write") == writes
        assert calls.count("fdatasync failed") == 1
        assert recover(self.path).last_seq == 1

    def test_a_failed_periodic_sync_breaks_the_journal(self):
        """With fsync=interval a failed periodic fdatasync makes later events refused."""
        journal = self.open_journal("interval")
        calls = Syscalls(journal)
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        calls.sync_error = OSError(errno.EIO, "Input/output error")
        self.clock.advance(1)
        assert journal.broken.startswith("fsync failed: EIO")
        message(journal, acks)
        assert acks.calls == [(1, None), (None, journal.broken)]
        calls.sync_error = None
        self.clock.advance(1)
        assert calls.count("fdatasync") == 0

    def test_records_taken_before_a_sync_failure_are_not_acked_after_it(self):
        """Records still waiting for their write when the journal breaks are refused, not acked."""
        acks = Acks()
        self.clock.callLater(1, lambda: message(journal, acks, text="late"))
        journal = FileJournal.open(self.path, self.clock, fsync="interval")
        calls = Syscalls(journal)
        message(journal, acks, text="early")
        self.clock.advance(0)
        calls.sync_error = OSError(errno.EIO, "Input/output error")
        self.clock.advance(1)
        journal.close()
        assert journal.broken is not None
        assert acks.calls[0] == (1, None)
        assert acks.calls[1][0] is None

    def test_memory_journal_sync_errors(self):
        """MemoryJournal.fail_syncs breaks the journal; syncs counts the successful ones."""
        journal = MemoryJournal(self.clock)
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        assert journal.syncs == 1
        journal.fail_syncs = OSError(errno.EIO, "Input/output error")
        message(journal, acks)
        self.clock.advance(0)
        message(journal, acks)
        assert acks.seqs == [1, None, None]
        assert journal.broken and journal.syncs == 1
        assert [r["seq"] for r in journal.records()] == [1]

    def test_broken_says_when_the_truncate_after_a_failed_sync_failed_too(self):
        """When the unsynced batch cannot be cut off either, the broken reason says so."""
        journal = self.open_journal()
        calls = Syscalls(journal)
        calls.sync_error = OSError(errno.EIO, "Input/output error")
        calls.truncate_error = OSError(errno.EIO, "Input/output error")
        message(journal)
        self.clock.advance(0)
        assert journal.broken.startswith("fsync failed: EIO")
        assert "truncate failed" in journal.broken


class ThreadedSyncTests(JournalCase, SynchronousTestCase):
    """Sync in a thread: the test as the thread (ManualSyncer), and a real SyncThread."""

    def test_threaded_sync_acks_when_the_sync_is_done(self):
        """With a threaded syncer, acks wait for its fdatasync and come after it."""
        syncer = ManualSyncer()
        journal = self.open_journal(syncer=syncer)
        log = []
        Syscalls(journal, log)
        acks = Acks(log)
        message(journal, acks)
        message(journal, acks)
        self.clock.advance(0)
        assert [entry[0] for entry in log] == ["write"] and syncer.wanted == 2
        syncer.finish()
        assert [entry[0] for entry in log] == ["write", "fdatasync", "ack", "ack"]
        assert acks.seqs == [1, 2]

    def test_threaded_sync_covers_every_batch_written_meanwhile(self):
        """Batches written while a sync runs are acked together after one next sync."""
        syncer = ManualSyncer()
        journal = self.open_journal(syncer=syncer)
        calls = Syscalls(journal)
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        first = syncer.wanted
        for _ in range(3):
            message(journal, acks)
            self.clock.advance(0)
        assert calls.count("write") == 4 and syncer.wanted == 4
        syncer.finish(first)
        assert acks.seqs == [1] and syncer.pending
        syncer.finish()
        assert acks.seqs == [1, 2, 3, 4]
        assert calls.count("fdatasync") == 2 and not syncer.pending
        assert [r["seq"] for r in read_records(self.path)] == [1, 2, 3, 4]

    def test_threaded_sync_failure_fails_everything_unsynced(self):
        """A failed threaded sync refuses its batch and the batches written meanwhile, cuts them
        off, and breaks the journal."""
        syncer = ManualSyncer()
        journal = self.open_journal(syncer=syncer)
        calls = Syscalls(journal)
        acks = Acks()
        message(journal, acks, text="kept")
        self.clock.advance(0)
        syncer.finish()
        good = open(self.path, "rb").read()
        message(journal, acks)
        self.clock.advance(0)
        message(journal, acks)
        self.clock.advance(0)
        calls.sync_error = OSError(errno.EIO, "Input/output error")
        syncer.finish()
        assert acks.seqs == [1, None, None]
        assert journal.broken.startswith("fsync failed: EIO")
        assert open(self.path, "rb").read() == good
        message(journal, acks)
        assert acks.calls[-1] == (None, journal.broken)

    def test_threaded_sync_unexpected_exception_breaks_the_journal(self):
        """A non-OSError from the sync thread is treated as a failed fsync."""
        syncer = ManualSyncer()
        journal = self.open_journal(syncer=syncer)
        journal._os_fdatasync = lambda fd: _raise(RuntimeError("boom"))
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        syncer.finish()
        assert acks.seqs == [None]
        assert journal.broken.startswith("fsync failed")

    def test_close_waits_for_a_running_threaded_sync(self):
        """close() during a threaded sync finishes once the sync is done, acking its records."""
        syncer = ManualSyncer()
        journal = self.open_journal(syncer=syncer)
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        journal.close()
        assert acks.calls == [] and not syncer.stopped
        syncer.finish()
        assert acks.calls == [(1, None)]
        assert syncer.stopped
        message(journal, acks)
        assert acks.calls[-1] == (None, "journal closed")

    def test_sync_thread_syncs_in_its_own_thread(self):
        """SyncThread runs fdatasync off the calling thread and reports through call_from_thread."""
        import queue
        import threading

        reports = queue.Queue()
        syncer = SyncThread(lambda f, *args: reports.put((f, args)))
        journal = self.open_journal(syncer=syncer)
        threads = []
        real_sync = journal._os_fdatasync
        journal._os_fdatasync = lambda fd: (threads.append(threading.current_thread()),
                                            real_sync(fd))
        acks = Acks()
        for _ in range(3):
            message(journal, acks)
            self.clock.advance(0)
        while acks.seqs != [1, 2, 3]:
            f, args = reports.get(timeout=10)
            f(*args)
        assert threads and threading.current_thread() not in threads
        journal.close()
        assert not syncer._thread.is_alive()
        assert [r["seq"] for r in read_records(self.path)] == [1, 2, 3]

    def test_sync_thread_reports_a_failed_sync(self):
        """A sync that fails in the thread is reported, and the journal refuses from then on."""
        import queue

        reports = queue.Queue()
        syncer = SyncThread(lambda f, *args: reports.put((f, args)))
        journal = self.open_journal(syncer=syncer)
        journal._os_fdatasync = lambda fd: _raise(OSError(errno.EIO, "Input/output error"))
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        f, args = reports.get(timeout=10)
        f(*args)
        assert acks.seqs == [None]
        assert journal.broken.startswith("fsync failed: EIO")


class AutoSyncerTests(JournalCase, SynchronousTestCase):
    """AutoSyncer: quick syncs in the calling thread, slow ones in its thread."""

    def test_auto_syncer_syncs_quick_disks_in_the_calling_thread(self):
        """While syncs are quick AutoSyncer fdatasyncs at once, in the reactor's thread: the MSG
        is acked in the same turn, and no thread is started."""
        journal, syncer, timer, reports = _auto(self.open_journal)
        acks = Acks()
        for seq in (1, 2, 3):
            message(journal, acks)
            self.clock.advance(0)
            assert acks.seqs[-1] == seq
        assert set(timer.threads) == {threading.current_thread()}
        assert syncer._thread._thread is None
        assert syncer.average < syncer.slow

    def test_auto_syncer_moves_slow_syncs_to_the_thread_and_back(self):
        """After a slow sync (20 ms: an average over the 2 ms bar) the next requests go to the
        thread, whose reports ack them; once quick syncs bring the average under the bar again,
        and the thread is idle, syncing is back in the calling thread."""
        journal, syncer, timer, reports = _auto(self.open_journal)
        acks = Acks()
        timer.next = 0.020
        message(journal, acks)
        self.clock.advance(0)
        assert acks.seqs == [1]  # decided before it was timed: in this thread
        self.assertAlmostEqual(syncer.average, 0.004, delta=0.004 * 1e-6)  # pytest.approx(0.004)
        message(journal, acks)
        self.clock.advance(0)
        assert acks.seqs == [1]  # in the thread now: not acked until its report is run
        _pump(reports, acks, [1, 2])
        assert timer.threads[-1] is not threading.current_thread()
        timer.next = 0.0001
        seqs = [1, 2]
        while syncer.in_thread():
            message(journal, acks)
            self.clock.advance(0)
            seqs.append(seqs[-1] + 1)
            _pump(reports, acks, seqs)
        assert len(seqs) < 20
        message(journal, acks)
        self.clock.advance(0)
        assert acks.seqs == seqs + [seqs[-1] + 1]
        assert timer.threads[-1] is threading.current_thread()

    def test_auto_syncer_keeps_to_the_thread_while_it_is_busy(self):
        """While the thread has a sync running, a request goes to it even when the average is
        quick again: the two never sync at once."""
        journal, syncer, timer, reports = _auto(self.open_journal)
        syncer.average = 1.0
        acks = Acks()
        gate = threading.Event()
        real_sync = journal._os_fdatasync
        journal._os_fdatasync = lambda fd: (gate.wait(10), real_sync(fd))
        message(journal, acks)
        self.clock.advance(0)
        syncer.average = 0.0
        assert syncer.in_thread()
        message(journal, acks)
        self.clock.advance(0)
        assert acks.seqs == []
        gate.set()
        _pump(reports, acks, [1, 2])
        assert not syncer.in_thread()

    def test_auto_syncer_keeps_to_the_thread_until_its_report_is_heard(self):
        """A sync the thread has finished but the reactor has not yet heard of still keeps
        requests on the thread: an inline sync failing then would refuse a batch that is on
        disk.  Here the next sync fails: the first MSG is acked, only the second refused."""
        journal, syncer, timer, reports = _auto(self.open_journal)
        syncer.average = 1.0
        acks = Acks()
        message(journal, acks, text="synced by the thread")
        self.clock.advance(0)
        durable = reports.get(timeout=10)  # done in the thread, not yet run in the reactor
        syncer.average = 0.0
        assert syncer.in_thread()
        journal._os_fdatasync = lambda fd: _raise(OSError(errno.EIO, "Input/output error"))
        message(journal, acks, text="refused")
        self.clock.advance(0)
        failed = reports.get(timeout=10)
        for f, args in (durable, failed):
            f(*args)
        assert acks.seqs == [1, None]
        assert [r["text"] for r in read_records(journal.path)] == ["synced by the thread"]

    def test_auto_syncer_reports_a_failed_sync_in_the_calling_thread(self):
        """A quick-path fdatasync that fails refuses the record and breaks the journal, as
        InlineSyncer does."""
        journal, syncer, timer, reports = _auto(self.open_journal)
        journal._os_fdatasync = lambda fd: _raise(OSError(errno.EIO, "Input/output error"))
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        assert acks.seqs == [None]
        assert journal.broken.startswith("fsync failed: EIO")


class CloseTests(JournalCase, SynchronousTestCase):
    """close(): what is waiting is written, synced and acked; nothing after it."""

    def test_close_flushes_and_syncs(self):
        """close() writes, fdatasyncs and acks the records still waiting for the turn's end."""
        journal = self.open_journal()
        log = []
        Syscalls(journal, log)
        acks = Acks(log)
        message(journal, acks)
        message(journal, acks)
        journal.close()
        assert [entry[0] for entry in log] == ["write", "fdatasync", "ack", "ack"]
        assert len(read_records(self.path)) == 2

    def test_close_syncs_what_interval_mode_has_not_synced(self):
        """With fsync=interval, close() fdatasyncs what was written since the last sync."""
        journal = self.open_journal("interval")
        calls = Syscalls(journal)
        message(journal)
        self.clock.advance(0)
        journal.close()
        assert calls.count("fdatasync") == 1
        assert self.clock.getDelayedCalls() == []

    def test_closed_journal_refuses_events(self):
        """After close() events are refused with a reason, and a second close is harmless."""
        journal = self.open_journal()
        journal.close()
        journal.close()
        acks = Acks()
        message(journal, acks)
        assert acks.calls == [(None, "journal closed")]
        assert self.clock.getDelayedCalls() == []

    def test_a_record_taken_while_close_acks_is_not_written_after_close(self):
        """A record emitted from an ack during close() is journaled or refused, never written
        to a closed file descriptor (possibly another file's by then)."""
        tmp_path = pathlib.Path(os.path.dirname(self.path))
        journal = self.open_journal()
        acks = Acks()

        def ack_then_emit(seq, reason):
            acks(seq, reason)
            message(journal, acks, text="second")

        message(journal, ack_then_emit, text="first")
        journal.close()
        other = tmp_path / "other"
        fd = os.open(other, os.O_WRONLY | os.O_CREAT)
        try:
            self.clock.advance(0)
        finally:
            os.close(fd)
        assert other.read_bytes() == b""
        texts = [r["text"] for r in read_records(self.path)]
        if acks.calls[1][0] is None:
            assert texts == ["first"]
        else:
            assert (acks.calls[1], texts) == ((2, None), ["first", "second"])

    def test_an_ack_that_raises_does_not_starve_the_rest_of_its_batch(self):
        """Every ack of a batch is called even when an earlier one raises."""
        journal = self.open_journal()
        acks = Acks()

        def bad_ack(seq, reason):
            raise RuntimeError("a broken connection")

        message(journal, acks)
        message(journal, bad_ack)
        message(journal, acks)
        with contextlib.suppress(RuntimeError):
            self.clock.advance(0)
        # Logged, not raised: not an error of this test (trial's log observer).
        self.flushLoggedErrors(RuntimeError)
        assert acks.calls == [(1, None), (3, None)]


class FileAndObserverTests(JournalCase, SynchronousTestCase):
    """The file, and the journal as a twisted.logger observer."""

    def test_open_creates_a_missing_journal(self):
        """Opening a journal that does not exist creates it empty and it takes records from 1."""
        assert not os.path.exists(self.path)
        journal = self.open_journal()
        assert journal.recovery.created
        assert os.path.getsize(self.path) == 0
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        assert acks.calls == [(1, None)]

    @skipIf(not os.path.isdir("/proc/self/fd"), "needs /proc/self/fd")
    def test_a_new_journal_and_its_directory_are_fsynced(self):
        """Creating a journal fsyncs the new file and its directory; reopening it does not."""
        tmp_path = pathlib.Path(self.temp_dir())
        path = str(tmp_path / "new.jsonl")
        synced = []
        real_fsync = os.fsync

        def spy(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_fsync(fd)

        self.patch(os, "fsync", spy)
        FileJournal.open(path, self.clock).close()
        assert os.path.realpath(path) in synced
        assert os.path.realpath(tmp_path) in synced
        synced.clear()
        FileJournal.open(path, self.clock).close()
        assert synced == []

    def test_file_journal_provides_ijournal(self):
        """FileJournal and MemoryJournal provide IJournal."""
        assert verifyObject(IJournal, self.open_journal())
        assert verifyObject(IJournal, MemoryJournal(self.clock))

    def test_events_logged_through_a_logger_are_journaled(self):
        """A Logger whose observer is the journal journals its cserver events and acks them."""
        journal = self.open_journal()
        log = Logger(namespace="cserver.journal", observer=journal)
        acks = Acks()
        before = time.time()
        log.info(
            "server recvd message {text!r} from user {user}",
            cserver_event="message",
            user="alice",
            text='say "hi"\n',
            peer="tcp:127.0.0.1:40000",
            cserver_ack=acks,
        )
        after = time.time()
        fields = {"user": "mallory", "peer": "tcp:127.0.0.1:40001"}
        log.info("AUTH failed for user {user} from {peer}",
                 **{EVENT: "auth_failed", FIELDS: fields}, **fields)
        log.info("nothing to journal")
        self.clock.advance(0)
        assert acks.calls == [(1, None)]
        first, second = read_records(self.path)
        assert before <= first["time"] <= after
        assert (first["user"], first["text"], first["peer"]) == (
            "alice", 'say "hi"\n', "tcp:127.0.0.1:40000")
        assert list(second) == [*HEAD, "user", "peer"]
        assert (second["seq"], second["event"], second["user"]) == (2, "auth_failed", "mallory")
