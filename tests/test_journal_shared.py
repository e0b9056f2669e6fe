"""Tests for cserver.journal.SharedFileJournal: several journals, each with its
own fd on one file, numbering their batches from one shared header at write
time under flock.

Several journals in one process stand for several workers (flock excludes
between open file descriptions, even in one process); the last test forks
real writer processes and SIGKILLs them.  Batches are flushed at
``clock.advance(0)`` or by ``flush()``; I/O errors are injected by replacing
an instance's ``_os_pwrite``, ``_os_fdatasync`` and ``_os_ftruncate``.
"""

import errno
import fcntl
import os
import random
import signal
import threading
import time

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from cserver.journal import (
    EVENT,
    FIELDS,
    FileJournal,
    IJournal,
    SharedFileJournal,
)
from cserver.recovery import recover
from cserver.shared import Shared
from tests.test_journal import NASTY, Acks, ManualSyncer, message, read_records


@pytest.fixture
def shared():
    shared = Shared.create(2)
    yield shared
    shared.close()
    os.close(shared.fd)


@pytest.fixture
def journals(path, clock, shared):
    """
    Prepare the journal at ``path`` on ``shared`` (as the parent does), then
    open SharedFileJournals on it, each with its own fd, closed after the
    test.
    """
    SharedFileJournal.prepare(path, shared)
    opened = []

    def open_(**kwargs):
        journal = SharedFileJournal.open(path, clock, shared, **kwargs)
        opened.append(journal)
        return journal

    yield open_
    for journal in opened:
        journal.close()


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


# -- numbering at write time ------------------------------------------------


def test_interleaved_batches_of_two_journals_make_one_contiguous_journal(journals, clock, path,
                                                                         shared):
    """Batches of two journals, taken in the same turns, land in one file whose
    seqs run 1..n without a gap or a repeat, each record whole."""
    a, b = journals(), journals()
    for turn in range(5):
        for i in range(turn + 1):
            message(a, text=f"a{turn}.{i}")
            message(b, text=f"b{turn}.{i}")
        clock.advance(0)
    records = read_records(path)
    assert [r["seq"] for r in records] == list(range(1, 31))
    assert sorted(texts(path)) == sorted(
        [f"{w}{turn}.{i}" for w in "ab" for turn in range(5) for i in range(turn + 1)]
    )
    assert_valid(path, shared)


def test_acks_carry_the_seqs_given_at_write_time(journals, path):
    """A record's seq is given when its batch is written, not when it is taken:
    records taken first but written second get the later seqs, and each ack
    carries its own record's seq."""
    a, b = journals(), journals()
    acks_a, acks_b = Acks(), Acks()
    for i in range(2):
        message(a, acks_a, text=f"a{i}")
    for i in range(3):
        message(b, acks_b, text=f"b{i}")
    b.flush()
    a.flush()
    assert acks_b.calls == [(1, None), (2, None), (3, None)]
    assert acks_a.calls == [(4, None), (5, None)]
    by_seq = {r["seq"]: r["text"] for r in read_records(path)}
    assert by_seq == {1: "b0", 2: "b1", 3: "b2", 4: "a0", 5: "a1"}


def test_records_only_some_of_which_are_acked_keep_their_places(journals, path):
    """Records without an ack still take their seq: the acked ones around them
    get the seqs of their own lines."""
    a = journals()
    acks = Acks()
    message(a, text="x")
    message(a, acks, text="y")
    message(a, text="z")
    message(a, acks, text="w")
    a.flush()
    by_seq = {r["seq"]: r["text"] for r in read_records(path)}
    assert [by_seq[seq] for seq in acks.seqs] == ["y", "w"]


def test_last_seq_and_messages_are_the_headers(journals, shared):
    """last_seq of every journal is the shared one, moved by any journal's
    write; the header counts message records, not the others."""
    a, b = journals(), journals()
    message(a)
    a({EVENT: "start", "log_time": 1.0})
    a.flush()
    message(b)
    assert a.last_seq == b.last_seq == shared.header.last_seq == 2
    b.flush()
    assert a.last_seq == b.last_seq == 3
    assert shared.header.messages == 2


def test_records_are_byte_for_byte_those_of_a_file_journal(journals, clock, tmp_path, path):
    """A shared journal writes exactly the lines a FileJournal writes for the
    same events: messages of any text and records with fields."""
    single_path = str(tmp_path / "single.jsonl")
    single = FileJournal.open(single_path, clock)
    shared_journal = journals()
    try:
        for journal in (single, shared_journal):
            journal({EVENT: "start", "log_time": 1.5, FIELDS: {"version": "1", "n": None}})
            for index, text in enumerate(NASTY):
                message(journal, text=text, user=f"u{index % 3}", log_time=1.0 + index)
            journal({EVENT: "stop", "log_time": 99.0})
            journal.flush()
    finally:
        single.close()
    assert open(path, "rb").read() == open(single_path, "rb").read()


def test_acks_wait_for_the_fdatasync(journals):
    """With fsync=always a batch is acked only once a sync that started after
    its write is done."""
    syncer = ManualSyncer()
    a = journals(syncer=syncer)
    acks = Acks()
    message(a, acks)
    a.flush()
    assert acks.calls == []
    syncer.finish()
    assert acks.calls == [(1, None)]


def test_interval_mode_acks_after_the_write(journals, clock):
    """With fsync=interval a batch is acked once written."""
    a = journals(fsync="interval")
    acks = Acks()
    message(a, acks)
    clock.advance(0)
    assert acks.calls == [(1, None)]


def test_shared_file_journal_provides_ijournal(journals):
    """SharedFileJournal is an IJournal."""
    assert verifyObject(IJournal, journals())


# -- prepare and open ---------------------------------------------------------


def test_prepare_sets_the_header_from_recovery(clock, path, shared, tmp_path):
    """prepare recovers the file (cutting a torn tail) and sets last_seq, end
    and messages from it, clearing busy and broken; journals opened after it
    continue the numbering."""
    single = FileJournal.open(path, clock)
    message(single)
    single({EVENT: "start", "log_time": 1.0})
    message(single)
    single.close()
    with open(path, "ab") as f:
        f.write(b'{"seq":4,"ti')
    shared.header.busy = 1234
    shared.header.broken = 1
    recovery = SharedFileJournal.prepare(path, shared)
    assert recovery.torn_bytes == len(b'{"seq":4,"ti')
    assert (shared.header.last_seq, shared.header.end, shared.header.messages) == (
        3, os.path.getsize(path), 2)
    assert (shared.header.busy, shared.header.broken) == (0, 0)
    journal = SharedFileJournal.open(path, clock, shared)
    assert journal.recovery.last_seq == 3 and journal.recovery.messages == 2
    acks = Acks()
    message(journal, acks)
    journal.close()
    assert acks.seqs == [4]
    assert_valid(path, shared)


def test_prepare_creates_a_missing_journal(path, shared):
    """prepare creates a missing journal file, empty, and zeroes the header."""
    recovery = SharedFileJournal.prepare(path, shared)
    assert recovery.created
    assert os.path.getsize(path) == 0
    assert (shared.header.last_seq, shared.header.end, shared.header.messages) == (0, 0, 0)


def test_each_journal_opens_its_own_file_description(journals):
    """Each journal has an fd of its own on the file (flock excludes per open
    file description: an inherited fd would exclude nobody)."""
    a, b = journals(), journals()
    assert a._fd != b._fd
    assert os.path.samefile(f"/proc/self/fd/{a._fd}", f"/proc/self/fd/{b._fd}")
    fcntl.flock(a._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(b._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        fcntl.flock(a._fd, fcntl.LOCK_UN)


def test_a_write_waits_for_the_lock(journals, path):
    """A batch is written only while its journal holds the file's lock: a
    write blocks while another open file description holds it."""
    a = journals()
    message(a)
    other = os.open(path, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)
    writer = threading.Thread(target=a.flush)
    try:
        writer.start()
        writer.join(0.2)
        assert writer.is_alive()
        assert os.path.getsize(path) == 0
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
        writer.join(5)
    assert [r["seq"] for r in read_records(path)] == [1]


# -- a writer killed mid-batch ----------------------------------------------


def test_a_half_written_batch_is_cut_by_the_next_writer(journals, path, shared):
    """A writer killed in the middle of its write leaves busy set and bytes
    after end; the next writer cuts them off and writes where they began."""
    a, b = journals(), journals()
    message(a, text="before")
    a.flush()
    end = shared.header.end
    shared.header.busy = 999999
    with open(path, "ab") as f:
        f.write(b'{"seq":2,"time":1.0,"event":"message","pid":1,"user":"x","text":"'
                + b"y" * 1000)
    acks = Acks()
    message(b, acks, text="after")
    b.flush()
    assert acks.seqs == [2]
    assert texts(path) == ["before", "after"]
    assert os.path.getsize(path) > end
    assert_valid(path, shared)


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


@pytest.mark.parametrize("stores", range(STORES + 1))
def test_a_writer_killed_at_any_header_store_leaves_a_state_the_next_repairs(
        journals, path, shared, stores):
    """Whatever header store a writer dies before, the next writer leaves a
    valid journal and a header that agrees with it: the dead batch is either
    whole in the file (if the writer had begun to publish it) or gone, and
    the numbering goes on after it."""
    a, b = journals(), journals()
    message(a, text="first")
    a.flush()
    a._header = DyingHeader(shared.header, stores)
    for i in range(3):
        message(a, text=f"dead{i}")
    a({EVENT: "auth_failed", "log_time": 1.0})
    if stores < STORES:
        with pytest.raises(Killed):
            a.flush()
    else:
        a.flush()
    message(b, text="next")
    b.flush()
    kept = stores > COMMIT
    expected = ["first"] + (["dead0", "dead1", "dead2", None] if kept else []) + ["next"]
    assert texts(path) == expected
    assert_valid(path, shared)


# -- write errors -------------------------------------------------------------


def test_a_failed_write_is_cut_back_and_refused_and_the_header_kept(journals, path, shared):
    """A write that fails after writing part of its batch: the part is cut
    off, its acks are refused (write failed), the header is not advanced, and
    the next batch takes the seqs the failed one would have had."""
    a, b = journals(), journals()
    message(a, text="ok")
    a.flush()
    before = (shared.header.last_seq, shared.header.end, shared.header.messages)
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
    assert (shared.header.last_seq, shared.header.end, shared.header.messages) == before
    assert os.path.getsize(path) == before[1]
    assert a.broken is None
    a._os_pwrite = real_pwrite
    acks_a, acks_b = Acks(), Acks()
    message(b, acks_b, text="b")
    b.flush()
    message(a, acks_a, text="a")
    a.flush()
    assert (acks_b.seqs, acks_a.seqs) == ([2], [3])
    assert texts(path) == ["ok", "b", "a"]
    assert_valid(path, shared)


def test_a_failed_write_whose_cut_fails_is_cut_by_the_next_writer(journals, path, shared):
    """When even the cut after a failed write fails, that journal is broken,
    busy stays set, and the next writer cuts the partial batch off."""
    a, b = journals(), journals()
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
    assert shared.header.busy == os.getpid()
    refused = Acks()
    message(a, refused)
    assert refused.calls == [(None, a.broken)]
    acks_b = Acks()
    message(b, acks_b, text="b")
    b.flush()
    assert acks_b.seqs == [2]
    assert texts(path) == ["ok", "b"]
    assert_valid(path, shared)


def test_a_failed_cut_of_a_dead_writers_batch_refuses_and_leaves_it_for_the_next(
        journals, path, shared):
    """If the cut of a dead writer's partial batch fails, the batch that
    needed it is refused and busy stays set, so the next writer cuts again."""
    a, b = journals(), journals()
    shared.header.busy = 999999
    with open(path, "ab") as f:
        f.write(b'{"seq":1,"ti')
    a._os_ftruncate = fail(errno.EIO)
    acks = Acks()
    message(a, acks)
    a.flush()
    assert acks.seqs == [None]
    assert acks.reasons[0].startswith("write failed: cannot cut")
    assert shared.header.busy == 999999
    acks_b = Acks()
    message(b, acks_b, text="b")
    b.flush()
    assert acks_b.seqs == [1]
    assert_valid(path, shared)


# -- fsync errors and the broken flag ------------------------------------------


def test_a_failed_fdatasync_breaks_every_journal_on_the_header(journals, path, shared):
    """A failed fdatasync refuses its batch and sets the header's broken: the
    journal whose sync failed, and every other, refuse records from then on,
    both those taken before and those taken after."""
    a, b = journals(), journals()
    acks_b = Acks()
    message(b, acks_b, text="taken before")
    a._os_fdatasync = fail(errno.EIO)
    acks = Acks()
    message(a, acks)
    a.flush()
    assert acks.seqs == [None]
    assert acks.reasons[0].startswith("fsync failed: EIO")
    assert shared.header.broken == 1
    assert a.broken.startswith("fsync failed")
    b.flush()
    assert acks_b.calls == [(None, "fsync failed in another process")]
    later = Acks()
    message(b, later)
    message(a, later)
    assert later.seqs == [None, None]
    assert b.broken == "fsync failed in another process"


def test_nothing_is_cut_after_a_failed_fdatasync(journals, path, shared):
    """After a failed sync the batch stays in the file (unacked): batches of
    other journals after it may already be acked; the file stays valid."""
    syncer = ManualSyncer()
    a, b = journals(syncer=syncer), journals()
    acks_a, acks_b = Acks(), Acks()
    message(a, acks_a, text="a")
    a.flush()
    message(b, acks_b, text="b")
    b.flush()
    assert acks_b.seqs == [2]
    a._os_fdatasync = fail(errno.EIO)
    syncer.finish()
    assert acks_a.seqs == [None]
    assert texts(path) == ["a", "b"]
    assert_valid(path, shared)


def test_the_sync_thread_sets_broken_as_soon_as_the_sync_fails(journals, shared):
    """A failed fdatasync in the sync thread sets the header's broken at once,
    before the reactor hears of it."""
    a = journals()
    a._os_fdatasync = fail(errno.EIO)
    with pytest.raises(OSError):
        a._sync()
    assert shared.header.broken == 1


def test_a_broken_header_refuses_records_in_every_journal(journals, path, shared):
    """With the header's broken set (by another process), every journal
    refuses new records and its batches not yet written, and writes nothing."""
    a, b = journals(), journals()
    pending = Acks()
    message(a, pending)
    shared.header.broken = 1
    a.flush()
    assert pending.calls == [(None, "fsync failed in another process")]
    acks = Acks()
    message(a, acks)
    message(b, acks)
    b({EVENT: "stop", "log_time": 1.0})
    b.flush()
    assert acks.seqs == [None, None]
    assert os.path.getsize(path) == 0


# -- real processes, SIGKILLed ------------------------------------------------


def _append_forever(path, shared, report_path, tag, fsync):
    """
    A child: append batches of 1-20 messages, each flushed (and synced by
    ``fsync``), then note every acked (seq, text) in the report file.
    """
    clock = Clock()
    journal = SharedFileJournal.open(path, clock, shared, fsync=fsync)
    report = os.open(report_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    rng = random.Random(os.getpid())
    acked = []
    n = 0
    while True:
        for _ in range(rng.randint(1, 20)):
            text = f"{tag}-{n}" + "x" * rng.randint(0, 50)
            n += 1
            message(journal, lambda seq, reason, text=text: acked.append((seq, reason, text)),
                    text=text)
        journal.flush()
        lines = [f"{seq} {text}\n" for seq, reason, text in acked if reason is None]
        acked.clear()
        os.write(report, "".join(lines).encode())


def test_writers_killed_at_random_lose_no_acked_record(path, shared, tmp_path):
    """Two writer processes append while one or the other is SIGKILLed at
    random (100 kills; every 10th kills both, the second while it writes):
    at each of those checkpoints, once one more write has repaired what the
    victims left, the file is a valid journal with contiguous seqs, and every
    record any writer reported acked is in it, at its seq."""
    SharedFileJournal.prepare(path, shared)
    rng = random.Random(4)
    reports = {}  # report file: how much of it is checked

    def spawn():
        tag = len(reports)
        report_path = str(tmp_path / f"acked-{tag}")
        reports[report_path] = 0
        pid = os.fork()
        if pid == 0:
            try:
                # Without syncs a writer spends most of its time under the
                # lock, where a kill leaves a partial batch.
                _append_forever(path, shared, report_path, tag,
                                "always" if tag % 4 == 0 else "never")
            finally:
                os._exit(1)
        return pid

    def kill(pid):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    children = [spawn(), spawn()]
    deadline = time.monotonic() + 8
    acked = busy = 0
    try:
        for round_ in range(1, 101):
            assert time.monotonic() < deadline
            time.sleep(rng.uniform(0, 0.01))
            kill(children.pop(rng.randrange(len(children))))
            if round_ % 10 == 0:
                # Aim at the lock holder: wait until the survivor writes.
                spin = time.monotonic() + 0.1
                while shared.header.busy != children[0] and time.monotonic() < spin:
                    pass
                kill(children.pop())
                busy += shared.header.busy != 0
                acked += _check_after_kills(path, shared, reports)
                if round_ == 100:
                    break
                children.append(spawn())
            children.append(spawn())
    finally:
        for pid in children:
            kill(pid)
    assert busy > 0, "no checkpoint found a writer killed mid-batch"
    assert acked > 1000
    # The records acked before a checkpoint are still there at the end.
    reports = dict.fromkeys(reports, 0)
    assert _check_after_kills(path, shared, reports) == acked


def _check_after_kills(path, shared, reports):
    """
    With every writer dead: one more write (as the parent's stop record),
    then the file must be valid and hold every ack reported since the last
    check; return how many those were.
    """
    parent = SharedFileJournal.open(path, Clock(), shared)
    parent({EVENT: "stop", "log_time": 1.0})
    parent.close()
    assert_valid(path, shared)
    # recover() checked that the seqs run 1..n: record n is line n.
    lines = open(path, "rb").read().split(b"\n")
    acked = 0
    for report_path, checked in reports.items():
        if not os.path.exists(report_path):
            continue
        with open(report_path, "rb") as f:
            f.seek(checked)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]  # a victim's last line may be cut
        reports[report_path] = checked + len(data)
        for line in data.split(b"\n")[:-1]:
            seq, text = line.split(b" ", 1)
            record = lines[int(seq) - 1]
            assert record.startswith(b'{"seq":%s,' % seq)
            assert record.endswith(b',"text":"%s","peer":"tcp:127.0.0.1:40000"}' % text)
            acked += 1
    return acked
