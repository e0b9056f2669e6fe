"""Tests for reopening the journal at its path (SIGHUP, log rotation):
FileJournal.reopen on a task.Clock with real files, with the test as the
sync thread (ManualSyncer) and with a real SyncThread; recovery of a file
that starts with a ``reopen`` record.

Unit layer: files in temporary directories (end to end with a real twistd is
in tests/e2e/test_reopen.py).
"""

import errno
import os
import pathlib
import queue
import threading
from unittest import skipIf

from twisted.trial.unittest import SynchronousTestCase

from cserver.journal import AutoSyncer, SyncThread
from cserver.journal.recovery import recover

from .base import JournalCase
from .test_journal import Acks, ManualSyncer, Syscalls, message, read_records


def result_of(d):
    """The result of a fired Deferred: its value, or the exception it failed with."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    result = results[0]
    return result.value if hasattr(result, "value") and hasattr(result, "trap") else result


def fired(d):
    results = []
    d.addBoth(lambda r: results.append(r) or r)
    return bool(results)


def seqs(path):
    return [r["seq"] for r in read_records(path)]


class ReopenTests(JournalCase, SynchronousTestCase):
    """FileJournal.reopen on a task.Clock, with the test as the sync thread (ManualSyncer)."""

    def test_records_before_go_to_the_old_file_and_after_to_the_new_one(self):
        """After a rename and reopen(), the old file holds every record taken before, the new file
        at the path starts with a reopen record naming the old one (seq last+1, its last seq, the
        message total), and later records follow it with contiguous seqs."""
        journal = self.open_journal()
        acks = Acks()
        for i in range(3):
            message(journal, acks, text=f"m{i}")
        self.clock.advance(0)
        os.rename(self.path, self.path + ".1")
        d = journal.reopen()
        assert result_of(d) == 4
        message(journal, acks, text="after")
        self.clock.advance(0)
        assert acks.seqs == [1, 2, 3, 5]
        assert seqs(self.path + ".1") == [1, 2, 3]
        new = read_records(self.path)
        assert [r["seq"] for r in new] == [4, 5]
        reopen = new[0]
        assert reopen["event"] == "reopen"
        assert reopen["previous"] == os.path.realpath(self.path + ".1")
        assert (reopen["previous_last_seq"], reopen["total"]) == (3, 3)
        assert new[1]["text"] == "after"

    def test_old_file_is_durable_before_the_swap(self):
        """With a sync in flight on the old file, reopen() waits for it: nothing goes to the new
        file, and no ack is sent, until the old file's fdatasync is done; records taken meanwhile
        are numbered after the reopen record and written, in order, to the new file after it."""
        syncer = ManualSyncer()
        journal = self.open_journal(syncer=syncer)
        log = []
        Syscalls(journal, log)
        acks = Acks(log)
        message(journal, acks, text="old")
        self.clock.advance(0)
        os.rename(self.path, self.path + ".1")
        message(journal, acks, text="taken before the reopen")
        d = journal.reopen()
        message(journal, acks, text="held 1")
        message(journal, acks, text="held 2")
        self.clock.advance(0)
        journal.flush()
        assert not fired(d)
        assert acks.calls == []
        assert os.path.getsize(self.path) == 0
        assert seqs(self.path + ".1") == [1, 2]
        assert [e[0] for e in log] == ["write", "write"]
        syncer.finish()  # the old file's sync: now the swap, and the held batch
        kinds = [e[0] for e in log]
        assert kinds[:3] == ["write", "write", "fdatasync"]
        assert kinds[3:5] == ["ack", "ack"] and kinds[5] == "write"
        assert acks.seqs == [1, 2]
        syncer.finish()  # the new file's sync
        assert result_of(d) == 3
        assert acks.seqs == [1, 2, 4, 5]
        new = read_records(self.path)
        assert [(r["seq"], r["event"], r.get("text")) for r in new] == [
            (3, "reopen", None), (4, "message", "held 1"), (5, "message", "held 2")]
        assert new[0]["previous_last_seq"] == 2 and new[0]["total"] == 2

    def test_same_file_is_not_reopened(self):
        """When the path still names the open file (nothing rotated), reopen() fires with None,
        writes no record, and the journal goes on appending to the same file."""
        journal = self.open_journal()
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        inode = os.stat(self.path).st_ino
        assert result_of(journal.reopen()) is None
        message(journal, acks)
        self.clock.advance(0)
        assert acks.seqs == [1, 2]
        assert os.stat(self.path).st_ino == inode
        assert [r["event"] for r in read_records(self.path)] == ["message", "message"]

    def test_a_failed_open_keeps_the_old_file_directory(self):
        """If the new file cannot be made, reopen() fails with the OSError, and the journal goes on
        writing the old file with contiguous seqs and no reopen record."""
        self._a_failed_open_keeps_the_old_file("directory")

    def test_a_failed_open_keeps_the_old_file_non_empty_file(self):
        """If the new file cannot be made, reopen() fails with the OSError, and the journal goes on
        writing the old file with contiguous seqs and no reopen record."""
        self._a_failed_open_keeps_the_old_file("non-empty file")

    def _a_failed_open_keeps_the_old_file(self, obstacle):
        journal = self.open_journal()
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        os.rename(self.path, self.path + ".1")
        if obstacle == "directory":
            os.mkdir(self.path)
        else:
            with open(self.path, "w") as f:
                f.write("someone else's\n")
        error = result_of(journal.reopen())
        assert isinstance(error, OSError)
        assert error.errno == (errno.EISDIR if obstacle == "directory" else errno.EEXIST)
        message(journal, acks)
        self.clock.advance(0)
        assert acks.seqs == [1, 2]
        assert [r["event"] for r in read_records(self.path + ".1")] == ["message", "message"]
        assert seqs(self.path + ".1") == [1, 2]
        if obstacle != "directory":
            assert open(self.path).read() == "someone else's\n"

    def test_an_empty_file_at_the_path_is_taken(self):
        """An empty file already at the path (logrotate's ``create``) becomes the new journal."""
        journal = self.open_journal()
        message(journal)
        self.clock.advance(0)
        os.rename(self.path, self.path + ".1")
        open(self.path, "w").close()
        assert result_of(journal.reopen()) == 2
        assert [r["event"] for r in read_records(self.path)] == ["reopen"]

    @skipIf(not os.path.isdir("/proc/self/fd"), "needs /proc/self/fd")
    def test_the_new_file_and_its_directory_are_fsynced(self):
        """reopen() fsyncs the new file and its directory before it writes to it."""
        tmp_path = pathlib.Path(os.path.dirname(self.path))
        journal = self.open_journal()
        os.rename(self.path, self.path + ".1")
        synced = []
        real_fsync = os.fsync

        def spy(fd):
            synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
            real_fsync(fd)

        self.patch(os, "fsync", spy)
        assert result_of(journal.reopen()) == 1
        assert (os.path.realpath(self.path), 0) in synced
        assert any(name == os.path.realpath(tmp_path) for name, _ in synced)

    def test_interval_mode_syncs_the_old_file_before_the_swap(self):
        """With --fsync interval, what the old file holds unsynced is fdatasync'd before the new
        file is written to."""
        journal = self.open_journal(fsync="interval")
        log = []
        Syscalls(journal, log)
        message(journal)
        self.clock.advance(0)
        os.rename(self.path, self.path + ".1")
        assert result_of(journal.reopen()) == 2
        assert [e[0] for e in log] == ["write", "fdatasync", "write"]

    def test_a_failed_sync_of_the_old_file_fails_the_reopen(self):
        """If the old file's fdatasync fails while reopen() waits for it, the reopen fails, the
        records held for the new file are refused, and the new file is removed again."""
        syncer = ManualSyncer()
        journal = self.open_journal(syncer=syncer)
        calls = Syscalls(journal)
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        os.rename(self.path, self.path + ".1")
        d = journal.reopen()
        message(journal, acks)
        calls.sync_error = OSError(errno.EIO, "Input/output error")
        syncer.finish()
        assert isinstance(result_of(d), OSError)
        assert acks.seqs == [None, None]
        assert not os.path.exists(self.path)
        assert journal.broken.startswith("fsync failed")

    def test_a_failed_write_to_the_new_file_retries_the_reopen_record(self):
        """If the first write to the new file fails (ENOSPC), its records are refused and the new
        file stays empty; the reopen record is taken again and still starts the new file."""
        journal = self.open_journal()
        calls = Syscalls(journal)
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        os.rename(self.path, self.path + ".1")
        calls.write_error = OSError(errno.ENOSPC, "No space left on device")
        d = journal.reopen()
        assert not fired(d)
        assert os.path.getsize(self.path) == 0
        calls.write_error = None
        message(journal, acks, text="later")
        self.clock.advance(0)
        assert result_of(d) == 2
        assert [(r["seq"], r["event"]) for r in read_records(self.path)] == [(2, "reopen"),
                                                                        (3, "message")]
        assert acks.seqs == [1, 3]

    def test_close_while_reopening_writes_the_held_records_then_closes(self):
        """close() while reopen() waits for the old file: once it is durable the held records go to
        the new file and are acked, then the journal closes."""
        syncer = ManualSyncer()
        journal = self.open_journal(syncer=syncer)
        acks = Acks()
        message(journal, acks)
        self.clock.advance(0)
        os.rename(self.path, self.path + ".1")
        d = journal.reopen()
        message(journal, acks)
        journal.close()
        assert acks.calls == []
        syncer.finish()
        syncer.finish()
        assert result_of(d) == 2
        assert acks.seqs == [1, 3]
        assert syncer.stopped
        assert seqs(self.path) == [2, 3]
        assert isinstance(result_of(journal.reopen()), OSError)

    def test_a_second_reopen_while_one_is_under_way_gets_its_result(self):
        """reopen() while another waits for the old file makes no second file: it fires with the
        first one's reopen record."""
        syncer = ManualSyncer()
        journal = self.open_journal(syncer=syncer)
        message(journal)
        self.clock.advance(0)
        os.rename(self.path, self.path + ".1")
        first = journal.reopen()
        second = journal.reopen()
        syncer.finish()
        syncer.finish()
        assert result_of(first) == result_of(second) == 2
        assert seqs(self.path) == [2]


class SyncThreadReopenTests(JournalCase, SynchronousTestCase):
    """reopen() with a real SyncThread (or AutoSyncer) and batches in flight."""

    def test_sync_thread_reopen_loses_and_reorders_nothing_thread(self):
        """With a real SyncThread and batches in flight, reopen() never has the thread sync a
        closed or swapped fd, acks an old-file record only after the old file's sync, and every
        record lands once, in seq order, in the old file or after the reopen record in the new.
        The same with an AutoSyncer sending every other batch to the thread and the others to
        the calling thread (when the thread is idle)."""
        self._sync_thread_reopen_loses_and_reorders_nothing("thread")

    def test_sync_thread_reopen_loses_and_reorders_nothing_auto(self):
        """With a real SyncThread and batches in flight, reopen() never has the thread sync a
        closed or swapped fd, acks an old-file record only after the old file's sync, and every
        record lands once, in seq order, in the old file or after the reopen record in the new.
        The same with an AutoSyncer sending every other batch to the thread and the others to
        the calling thread (when the thread is idle)."""
        self._sync_thread_reopen_loses_and_reorders_nothing("auto")

    def _sync_thread_reopen_loses_and_reorders_nothing(self, kind):
        reports = queue.Queue()
        if kind == "thread":
            syncer = SyncThread(lambda f, *args: reports.put((f, args)))
        else:
            syncer = AutoSyncer(lambda f, *args: reports.put((f, args)))
            syncer._timer = lambda: 0.0  # the average moves only as the test sets it
        journal = self.open_journal(syncer=syncer)
        synced = []  # (thread, inode, size) at each fdatasync
        errors = []
        real_sync = journal._os_fdatasync
        gate = threading.Event()  # cleared: the thread's next sync blocks mid-way
        gate.set()
        blocked = threading.Event()

        def sync(fd):
            try:
                stat = os.fstat(fd)
                if not gate.is_set():
                    blocked.set()
                    gate.wait(10)
                real_sync(fd)
            except OSError as e:
                errors.append(e)
                raise
            synced.append((threading.current_thread(), stat.st_ino, stat.st_size))

        journal._os_fdatasync = sync
        old_inode = os.stat(self.path).st_ino
        acks = Acks()
        acked_at = {}

        def ack(seq, reason):
            acks(seq, reason)
            acked_at[seq] = list(synced)

        def pump():
            while True:
                try:
                    f, args = reports.get_nowait()
                except queue.Empty:
                    return
                f(*args)

        for batch in range(20):
            if kind == "auto":
                # Even batches (the blocked one, 10, among them) to the thread.
                syncer.average = 1.0 if batch % 2 == 0 else 0.0
            if batch == 10:
                gate.clear()
            for i in range(5):
                message(journal, ack, text=f"b{batch} m{i}")
            self.clock.advance(0)
            if batch == 10:
                # A sync of the old file is under way (blocked): reopen now.
                assert blocked.wait(10)
                os.rename(self.path, self.path + ".1")
                d = journal.reopen()
            pump()
        gate.set()
        for i in range(3):
            message(journal, ack, text=f"late {i}")
        self.clock.advance(0)
        while len(acks.calls) < 103 or not fired(d):
            f, args = reports.get(timeout=10)
            f(*args)
            self.clock.advance(0)
        assert errors == []
        in_thread = [thread is not threading.current_thread() for thread, _, _ in synced]
        assert all(in_thread) if kind == "thread" else (any(in_thread) and not all(in_thread))
        old = read_records(self.path + ".1")
        new = read_records(self.path)
        boundary = old[-1]["seq"]
        assert new[0]["event"] == "reopen" and new[0]["seq"] == boundary + 1
        assert result_of(d) == boundary + 1
        assert new[0]["previous_last_seq"] == boundary and new[0]["total"] == len(old)
        assert [r["seq"] for r in old + new] == list(range(1, len(old) + len(new) + 1))
        texts = [r["text"] for r in old + new if r["event"] == "message"]
        assert texts == [f"b{b} m{i}" for b in range(20) for i in range(5)] + [
            f"late {i}" for i in range(3)]
        assert sorted(s for s, _ in acks.calls) == [r["seq"] for r in old + new if "text" in r]
        end = 0
        with open(self.path + ".1", "rb") as f:
            for seq, line in enumerate(f, 1):
                end += len(line)
                # Acked only after a sync of the old file that started once it held the record.
                assert any(ino == old_inode and size >= end for _, ino, size in acked_at[seq])
        journal.close()
        thread = syncer._thread if kind == "thread" else syncer._thread._thread
        assert not thread.is_alive()


class RecoveryAfterReopenTests(JournalCase, SynchronousTestCase):
    """Recovery of a file that starts with a reopen record, and restart."""

    def test_recovery_carries_the_total_of_a_leading_reopen_record(self):
        """Recovering a file that starts with a reopen record counts its ``total`` into
        ``messages`` (the all-time total) and reports it as ``carried``; seq continues."""
        journal = self.open_journal()
        for _ in range(4):
            message(journal)
        self.clock.advance(0)
        os.rename(self.path, self.path + ".1")
        journal.reopen()
        message(journal, user="bob")
        self.clock.advance(0)
        journal.close()
        recovery = recover(self.path)
        assert (recovery.carried, recovery.messages, recovery.last_seq) == (4, 5, 6)
        assert recovery.users == {"bob": 1}
        again = self.open_journal()
        message(again)
        self.clock.advance(0)
        assert seqs(self.path) == [5, 6, 7]
        os.rename(self.path, self.path + ".2")
        assert result_of(again.reopen()) == 8
        assert read_records(self.path)[0]["total"] == 6

    def test_a_reopen_record_later_in_the_file_carries_nothing(self):
        """Only a reopen record that starts the file carries a total."""
        tmp_path = pathlib.Path(self.temp_dir())
        path = tmp_path / "j.jsonl"
        path.write_bytes(
            b'{"seq":1,"time":1.0,"event":"start","pid":1}\n'
            b'{"seq":2,"time":1.0,"event":"reopen","pid":1,"previous":null,'
            b'"previous_last_seq":1,"total":50}\n')
        recovery = recover(str(path))
        assert (recovery.carried, recovery.messages) == (0, 0)
