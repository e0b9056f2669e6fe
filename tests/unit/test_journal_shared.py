"""Tests for cserver.journal.SharedFileJournal: several journals, each with its
own fd on one file, numbering their batches from one shared header at write
time under flock.

Unit layer.  Several journals in one process stand for several workers (flock
excludes between open file descriptions, even in one process); a writer's
death is a Killed raised at one of its header stores (real writer processes
SIGKILLed are in tests/e2e/test_journal_shared.py).  Batches are flushed at
``clock.advance(0)`` or by ``flush()``; I/O errors are injected by replacing
an instance's ``_os_pwrite``, ``_os_fdatasync`` and ``_os_ftruncate``.
"""

import errno
import fcntl
import json
import os
import pathlib
import threading

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cserver.dedup import DedupWindow
from cserver.journal import (
    ACK,
    EVENT,
    FIELDS,
    FileJournal,
    IJournal,
    SharedFileJournal,
)
from cserver.journal.header import Shared
from cserver.journal.interfaces import CONFLICT, DUPLICATE
from cserver.journal.recovery import recover

from .base import JournalCase
from .test_journal import NASTY, Acks, Cases, ManualSyncer, message, read_records


class SharedCase(JournalCase):
    """
    ``self.shared``, the memory of two workers (closed after the test), and
    ``self.journals(**kwargs)``: SharedFileJournals on the journal at
    ``self.path`` on it, each with its own fd, closed after the test.
    """

    def setUp(self):
        super().setUp()
        self.shared = self.make_shared()

    def make_shared(self):
        shared = Shared.create(2)
        self.addCleanup(os.close, shared.fd)
        self.addCleanup(shared.close)
        return shared

    def journals(self, **kwargs):
        journal = SharedFileJournal.open(self.path, self.clock, self.shared, **kwargs)
        self.addCleanup(journal.close)
        return journal


class PreparedCase(SharedCase):
    """
    A SharedCase whose journal at ``self.path`` is prepared on
    ``self.shared`` (as the parent does) before the test.
    """

    def setUp(self):
        super().setUp()
        SharedFileJournal.prepare(self.path, self.shared)


def fail(error_number):
    def raise_(*_args):
        raise OSError(error_number, os.strerror(error_number))

    return raise_


def texts(path):
    return [record.get("text") for record in read_records(path)]


def assert_valid(path, shared):
    """
    The file is a journal that recovery accepts whole (contiguous seqs, no
    torn tail), and the header agrees with it.
    """
    recovery = recover(path)
    assert recovery.torn_bytes == 0
    assert recovery.size == os.path.getsize(path) == shared.header.end
    assert recovery.last_seq == recovery.records == shared.header.last_seq
    assert recovery.messages == shared.header.messages
    assert shared.header.busy == 0
    assert shared.header.commit_seq == 0
    return recovery


class Killed(BaseException):
    """
    Stands for a SIGKILL: nothing after it runs but the lock's release.
    """


class DyingHeader:
    """
    The shared header, through which a journal dies (raises Killed) instead
    of making its ``stores``-th store, 0-based.
    """

    def __init__(self, header, stores):
        object.__setattr__(self, "_header", header)
        object.__setattr__(self, "_left", stores)

    def __getattr__(self, name):
        return getattr(self._header, name)

    def __setattr__(self, name, value):
        if self._left == 0:
            raise Killed(name)
        object.__setattr__(self, "_left", self._left - 1)
        setattr(self._header, name, value)


# The stores of one batch: busy, commit_messages, commit_seq, end, last_seq,
# messages, commit_seq, busy.  Dying before the commit_seq store loses the
# batch; dying after it, the next writer publishes it.
STORES = 8
COMMIT = 2


class NumberingTests(PreparedCase, SynchronousTestCase):
    """Numbering at write time: one contiguous journal from the batches of several."""

    def test_interleaved_batches_of_two_journals_make_one_contiguous_journal(self):
        """Batches of two journals, taken in the same turns, land in one file whose
        seqs run 1..n without a gap or a repeat, each record whole."""
        a, b = self.journals(), self.journals()
        for turn in range(5):
            for i in range(turn + 1):
                message(a, text=f"a{turn}.{i}")
                message(b, text=f"b{turn}.{i}")
            self.clock.advance(0)
        records = read_records(self.path)
        assert [r["seq"] for r in records] == list(range(1, 31))
        assert sorted(texts(self.path)) == sorted(
            [f"{w}{turn}.{i}" for w in "ab" for turn in range(5) for i in range(turn + 1)]
        )
        assert_valid(self.path, self.shared)

    def test_acks_carry_the_seqs_given_at_write_time(self):
        """A record's seq is given when its batch is written, not when it is taken:
        records taken first but written second get the later seqs, and each ack
        carries its own record's seq."""
        a, b = self.journals(), self.journals()
        acks_a, acks_b = Acks(), Acks()
        for i in range(2):
            message(a, acks_a, text=f"a{i}")
        for i in range(3):
            message(b, acks_b, text=f"b{i}")
        b.flush()
        a.flush()
        assert acks_b.calls == [(1, None), (2, None), (3, None)]
        assert acks_a.calls == [(4, None), (5, None)]
        by_seq = {r["seq"]: r["text"] for r in read_records(self.path)}
        assert by_seq == {1: "b0", 2: "b1", 3: "b2", 4: "a0", 5: "a1"}

    def test_records_only_some_of_which_are_acked_keep_their_places(self):
        """Records without an ack still take their seq: the acked ones around them
        get the seqs of their own lines."""
        a = self.journals()
        acks = Acks()
        message(a, text="x")
        message(a, acks, text="y")
        message(a, text="z")
        message(a, acks, text="w")
        a.flush()
        by_seq = {r["seq"]: r["text"] for r in read_records(self.path)}
        assert [by_seq[seq] for seq in acks.seqs] == ["y", "w"]

    def test_last_seq_and_messages_are_the_headers(self):
        """last_seq of every journal is the shared one, moved by any journal's
        write; the header counts message records, not the others."""
        a, b = self.journals(), self.journals()
        message(a)
        a({EVENT: "start", "log_time": 1.0})
        a.flush()
        message(b)
        assert a.last_seq == b.last_seq == self.shared.header.last_seq == 2
        b.flush()
        assert a.last_seq == b.last_seq == 3
        assert self.shared.header.messages == 2

    def test_records_are_byte_for_byte_those_of_a_file_journal(self):
        """A shared journal writes exactly the lines a FileJournal writes for the
        same events: messages of any text and records with fields."""
        tmp_path = pathlib.Path(os.path.dirname(self.path))
        single_path = str(tmp_path / "single.jsonl")
        single = FileJournal.open(single_path, self.clock)
        shared_journal = self.journals()
        try:
            for journal in (single, shared_journal):
                journal({EVENT: "start", "log_time": 1.5, FIELDS: {"version": "1", "n": None}})
                for index, text in enumerate(NASTY):
                    message(journal, text=text, user=f"u{index % 3}", log_time=1.0 + index)
                journal({EVENT: "stop", "log_time": 99.0})
                journal.flush()
        finally:
            single.close()
        assert open(self.path, "rb").read() == open(single_path, "rb").read()

    def test_acks_wait_for_the_fdatasync(self):
        """With fsync=always a batch is acked only once a sync that started after
        its write is done."""
        syncer = ManualSyncer()
        a = self.journals(syncer=syncer)
        acks = Acks()
        message(a, acks)
        a.flush()
        assert acks.calls == []
        syncer.finish()
        assert acks.calls == [(1, None)]

    def test_interval_mode_acks_after_the_write(self):
        """With fsync=interval a batch is acked once written."""
        a = self.journals(fsync="interval")
        acks = Acks()
        message(a, acks)
        self.clock.advance(0)
        assert acks.calls == [(1, None)]

    def test_shared_file_journal_provides_ijournal(self):
        """SharedFileJournal is an IJournal."""
        assert verifyObject(IJournal, self.journals())


class PrepareTests(SharedCase, SynchronousTestCase):
    """prepare: the header set from the recovered file, before any journal is opened."""

    def test_prepare_sets_the_header_from_recovery(self):
        """prepare recovers the file (cutting a torn tail) and sets last_seq, end
        and messages from it, clearing busy and broken; journals opened after it
        continue the numbering."""
        single = FileJournal.open(self.path, self.clock)
        message(single)
        single({EVENT: "start", "log_time": 1.0})
        message(single)
        single.close()
        with open(self.path, "ab") as f:
            f.write(b'{"seq":4,"ti')
        self.shared.header.busy = 1234
        self.shared.header.broken = 1
        recovery = SharedFileJournal.prepare(self.path, self.shared)
        assert recovery.torn_bytes == len(b'{"seq":4,"ti')
        assert (self.shared.header.last_seq, self.shared.header.end,
                self.shared.header.messages) == (3, os.path.getsize(self.path), 2)
        assert (self.shared.header.busy, self.shared.header.broken) == (0, 0)
        journal = SharedFileJournal.open(self.path, self.clock, self.shared)
        assert journal.recovery.last_seq == 3 and journal.recovery.messages == 2
        acks = Acks()
        message(journal, acks)
        journal.close()
        assert acks.seqs == [4]
        assert_valid(self.path, self.shared)

    def test_prepare_creates_a_missing_journal(self):
        """prepare creates a missing journal file, empty, and zeroes the header."""
        recovery = SharedFileJournal.prepare(self.path, self.shared)
        assert recovery.created
        assert os.path.getsize(self.path) == 0
        assert (self.shared.header.last_seq, self.shared.header.end,
                self.shared.header.messages) == (0, 0, 0)


class OpenTests(PreparedCase, SynchronousTestCase):
    """open: each journal its own open file description, writing under the file's lock."""

    def test_each_journal_opens_its_own_file_description(self):
        """Each journal has an fd of its own on the file (flock excludes per open
        file description: an inherited fd would exclude nobody)."""
        a, b = self.journals(), self.journals()
        assert a._fd != b._fd
        assert os.path.samefile(f"/proc/self/fd/{a._fd}", f"/proc/self/fd/{b._fd}")
        fcntl.flock(a._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            with self.assertRaises(BlockingIOError):
                fcntl.flock(b._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            fcntl.flock(a._fd, fcntl.LOCK_UN)

    def test_a_write_waits_for_the_lock(self):
        """A batch is written only while its journal holds the file's lock: a
        write blocks while another open file description holds it."""
        a = self.journals()
        message(a)
        other = os.open(self.path, os.O_RDONLY)
        fcntl.flock(other, fcntl.LOCK_EX)
        writer = threading.Thread(target=a.flush)
        try:
            writer.start()
            writer.join(0.2)
            assert writer.is_alive()
            assert os.path.getsize(self.path) == 0
        finally:
            fcntl.flock(other, fcntl.LOCK_UN)
            os.close(other)
            writer.join(5)
        assert [r["seq"] for r in read_records(self.path)] == [1]


class KilledWriterTests(Cases, PreparedCase, SynchronousTestCase):
    """A writer killed mid-batch (in this process: a Killed raised at a header store)."""

    def test_a_half_written_batch_is_cut_by_the_next_writer(self):
        """A writer killed in the middle of its write leaves busy set and bytes
        after end; the next writer cuts them off and writes where they began."""
        a, b = self.journals(), self.journals()
        message(a, text="before")
        a.flush()
        end = self.shared.header.end
        self.shared.header.busy = 999999
        with open(self.path, "ab") as f:
            f.write(b'{"seq":2,"time":1.0,"event":"message","pid":1,"user":"x","text":"'
                    + b"y" * 1000)
        acks = Acks()
        message(b, acks, text="after")
        b.flush()
        assert acks.seqs == [2]
        assert texts(self.path) == ["before", "after"]
        assert os.path.getsize(self.path) > end
        assert_valid(self.path, self.shared)

    def test_a_writer_killed_at_any_header_store_leaves_a_state_the_next_repairs(self):
        """Whatever header store a writer dies before, the next writer leaves a
        valid journal and a header that agrees with it: the dead batch is either
        whole in the file (if the writer had begun to publish it) or gone, and
        the numbering goes on after it."""
        for stores in range(STORES + 1):
            with self.case(f"stores={stores}"):
                # A journal file and shared memory of its own, prepared.
                self.fresh()
                self.shared = self.make_shared()
                SharedFileJournal.prepare(self.path, self.shared)
                a, b = self.journals(), self.journals()
                message(a, text="first")
                a.flush()
                a._header = DyingHeader(self.shared.header, stores)
                for i in range(3):
                    message(a, text=f"dead{i}")
                a({EVENT: "auth_failed", "log_time": 1.0})
                if stores < STORES:
                    with self.assertRaises(Killed):
                        a.flush()
                else:
                    a.flush()
                message(b, text="next")
                b.flush()
                kept = stores > COMMIT
                expected = (["first"] + (["dead0", "dead1", "dead2", None] if kept else [])
                            + ["next"])
                assert texts(self.path) == expected
                assert_valid(self.path, self.shared)


class WriteErrorTests(PreparedCase, SynchronousTestCase):
    """Write errors: the partial batch cut off, by this writer or the next."""

    def test_a_failed_write_is_cut_back_and_refused_and_the_header_kept(self):
        """A write that fails after writing part of its batch: the part is cut
        off, its acks are refused (write failed), the header is not advanced, and
        the next batch takes the seqs the failed one would have had."""
        a, b = self.journals(), self.journals()
        message(a, text="ok")
        a.flush()
        before = (self.shared.header.last_seq, self.shared.header.end, self.shared.header.messages)
        real_pwrite = a._os_pwrite
        calls = []

        def pwrite(fd, data, offset):
            calls.append(offset)
            if len(calls) == 1:
                return real_pwrite(fd, data[:10], offset)
            raise OSError(errno.ENOSPC, "No space left on device")

        a._os_pwrite = pwrite
        acks = Acks()
        message(a, acks, text="lost1")
        message(a, acks, text="lost2")
        a.flush()
        assert acks.seqs == [None, None]
        assert all(reason.startswith("write failed: ENOSPC") for reason in acks.reasons)
        assert (self.shared.header.last_seq, self.shared.header.end,
                self.shared.header.messages) == before
        assert os.path.getsize(self.path) == before[1]
        assert a.broken is None
        a._os_pwrite = real_pwrite
        acks_a, acks_b = Acks(), Acks()
        message(b, acks_b, text="b")
        b.flush()
        message(a, acks_a, text="a")
        a.flush()
        assert (acks_b.seqs, acks_a.seqs) == ([2], [3])
        assert texts(self.path) == ["ok", "b", "a"]
        assert_valid(self.path, self.shared)

    def test_a_failed_write_whose_cut_fails_is_cut_by_the_next_writer(self):
        """When even the cut after a failed write fails, that journal is broken,
        busy stays set, and the next writer cuts the partial batch off."""
        a, b = self.journals(), self.journals()
        message(a, text="ok")
        a.flush()
        real_pwrite = a._os_pwrite

        def pwrite(fd, data, offset):
            real_pwrite(fd, data[:10], offset)
            raise OSError(errno.EIO, "Input/output error")

        a._os_pwrite = pwrite
        a._os_ftruncate = fail(errno.EIO)
        acks = Acks()
        message(a, acks, text="lost")
        a.flush()
        assert acks.seqs == [None]
        assert "truncate failed" in a.broken
        assert self.shared.header.busy == os.getpid()
        refused = Acks()
        message(a, refused)
        assert refused.calls == [(None, a.broken)]
        acks_b = Acks()
        message(b, acks_b, text="b")
        b.flush()
        assert acks_b.seqs == [2]
        assert texts(self.path) == ["ok", "b"]
        assert_valid(self.path, self.shared)

    def test_a_failed_cut_of_a_dead_writers_batch_refuses_and_leaves_it_for_the_next(self):
        """If the cut of a dead writer's partial batch fails, the batch that
        needed it is refused and busy stays set, so the next writer cuts again."""
        a, b = self.journals(), self.journals()
        self.shared.header.busy = 999999
        with open(self.path, "ab") as f:
            f.write(b'{"seq":1,"ti')
        a._os_ftruncate = fail(errno.EIO)
        acks = Acks()
        message(a, acks)
        a.flush()
        assert acks.seqs == [None]
        assert acks.reasons[0].startswith("write failed: cannot cut")
        assert self.shared.header.busy == 999999
        acks_b = Acks()
        message(b, acks_b, text="b")
        b.flush()
        assert acks_b.seqs == [1]
        assert_valid(self.path, self.shared)


class FsyncErrorTests(PreparedCase, SynchronousTestCase):
    """fsync errors and the header's broken flag."""

    def test_a_failed_fdatasync_breaks_every_journal_on_the_header(self):
        """A failed fdatasync refuses its batch and sets the header's broken: the
        journal whose sync failed, and every other, refuse records from then on,
        both those taken before and those taken after."""
        a, b = self.journals(), self.journals()
        acks_b = Acks()
        message(b, acks_b, text="taken before")
        a._os_fdatasync = fail(errno.EIO)
        acks = Acks()
        message(a, acks)
        a.flush()
        assert acks.seqs == [None]
        assert acks.reasons[0].startswith("fsync failed: EIO")
        assert self.shared.header.broken == 1
        assert a.broken.startswith("fsync failed")
        b.flush()
        assert acks_b.calls == [(None, "fsync failed in another process")]
        later = Acks()
        message(b, later)
        message(a, later)
        assert later.seqs == [None, None]
        assert b.broken == "fsync failed in another process"

    def test_nothing_is_cut_after_a_failed_fdatasync(self):
        """After a failed sync the batch stays in the file (unacked): batches of
        other journals after it may already be acked; the file stays valid."""
        syncer = ManualSyncer()
        a, b = self.journals(syncer=syncer), self.journals()
        acks_a, acks_b = Acks(), Acks()
        message(a, acks_a, text="a")
        a.flush()
        message(b, acks_b, text="b")
        b.flush()
        assert acks_b.seqs == [2]
        a._os_fdatasync = fail(errno.EIO)
        syncer.finish()
        assert acks_a.seqs == [None]
        assert texts(self.path) == ["a", "b"]
        assert_valid(self.path, self.shared)

    def test_the_sync_thread_sets_broken_as_soon_as_the_sync_fails(self):
        """A failed fdatasync in the sync thread sets the header's broken at once,
        before the reactor hears of it."""
        a = self.journals()
        a._os_fdatasync = fail(errno.EIO)
        with self.assertRaises(OSError):
            a._sync()
        assert self.shared.header.broken == 1

    def test_a_broken_header_refuses_records_in_every_journal(self):
        """With the header's broken set (by another process), every journal
        refuses new records and its batches not yet written, and writes nothing."""
        a, b = self.journals(), self.journals()
        pending = Acks()
        message(a, pending)
        self.shared.header.broken = 1
        a.flush()
        assert pending.calls == [(None, "fsync failed in another process")]
        acks = Acks()
        message(a, acks)
        message(b, acks)
        b({EVENT: "stop", "log_time": 1.0})
        b.flush()
        assert acks.seqs == [None, None]
        assert os.path.getsize(self.path) == 0


class KeyedAcrossWorkersTests(PreparedCase, SynchronousTestCase):
    """Keyed records written by two journals on one file, each with its window:
    under the lock a journal learns the other's keys and leaves out a record
    whose key the other wrote first."""

    def keyed(self, journal, key, text="hello", user="alice"):
        acks = []
        journal({EVENT: "message", "log_time": self.clock.seconds(), "user": user,
                 "text": text, "peer": "p", "key": key,
                 ACK: lambda seq, reason: acks.append((seq, reason))})
        return acks

    def windows(self):
        first, second = self.journals(), self.journals()
        first.keys = DedupWindow(self.clock)
        second.keys = DedupWindow(self.clock)
        return first, second

    def test_the_second_writer_of_a_key_writes_nothing_and_gets_the_first_seq(self):
        """Worker A writes key k; worker B, which had not seen it, takes the same
        PUT: B's record is left out, its ack is the first's seq with DUPLICATE
        (once B's sync is done); the file holds k once, seqs contiguous; a
        plain MSG beside it in B's batch is written and numbered as usual."""
        first, second = self.windows()
        a = self.keyed(first, "k")
        first.flush()
        self.clock.advance(0)
        assert a == [(1, None)]
        b_msg = []
        second({EVENT: "message", "log_time": 1.0, "user": "bob", "text": "plain", "peer": "p",
                ACK: lambda seq, reason: b_msg.append((seq, reason))})
        b = self.keyed(second, "k")
        second.flush()
        self.clock.advance(0)
        assert b == [(1, DUPLICATE)] and b_msg == [(2, None)]
        records = [json.loads(line) for line in open(self.path, "rb")]
        assert [r["seq"] for r in records] == [1, 2]
        assert [r.get("key") for r in records] == ["k", None]

    def test_the_same_key_with_another_text_is_a_conflict_and_writes_nothing(self):
        """B takes k with another text than A wrote: nothing is written for it, and
        its ack is (None, CONFLICT) -- the client's ERR conflict."""
        first, second = self.windows()
        self.keyed(first, "k", text="one")
        first.flush()
        self.clock.advance(0)
        b = self.keyed(second, "k", text="two")
        second.flush()
        self.clock.advance(0)
        assert b == [(None, CONFLICT)]
        assert len(open(self.path, "rb").read().splitlines()) == 1

    def test_keys_are_per_user_across_workers_too(self):
        """Bob's k is not alice's k: both are written."""
        first, second = self.windows()
        self.keyed(first, "k", user="alice")
        first.flush()
        b = self.keyed(second, "k", user="bob")
        second.flush()
        self.clock.advance(0)
        assert b == [(2, None)]
