"""cserver.journal.checkpoint: where the next start may begin reading a journal,
and when it must read the whole file instead."""

import os
import stat
from collections import Counter

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cserver.journal import EVENT, FIELDS, FileJournal, JournalDamaged, check, recover
from cserver.journal.checkpoint import TAIL, path_for

from .base import Temporary

USERS = ["alice", "bob", "zoë"]


def fill(journal, count, first=0):
    """``count`` messages from USERS in turn, flushed in batches of 50; the users."""
    users = Counter()
    for index in range(first, first + count):
        user = USERS[index % len(USERS)]
        journal({EVENT: "message", "log_time": 1700000000.5 + index, "user": user,
                 "text": f"message {index} " + "x" * (index % 40), "peer": "tcp:127.0.0.1:1"})
        users[user] += 1
        if index % 50 == 49:
            journal.flush()
    journal.flush()
    return users


def counts(result):
    """What a Recovery says of a journal, as one comparable tuple."""
    return (result.size, result.records, result.last_seq, result.messages, result.users,
            result.carried)


class CheckpointTests(Temporary, SynchronousTestCase):
    """A journal closed cleanly with its checkpoint, then opened again."""

    def setUp(self):
        self.path = self.temp_path()
        self.clock = Clock()

    def session(self, count, first=0, checkpoint=True):
        """
        Open the journal, take a start record and ``count`` messages, close it,
        and (with ``checkpoint``) leave its checkpoint with this file's users.
        """
        journal = FileJournal.open(self.path, self.clock, fsync="never")
        users = Counter(journal.recovery.users)
        journal({EVENT: "start", FIELDS: {"version": "test"}, "log_time": 1700000000.0})
        users += fill(journal, count, first)
        journal.close()
        if checkpoint:
            assert journal.write_checkpoint(dict(users)) is True
        return journal

    def full(self):
        """The journal read whole, the checkpoint set aside for it."""
        kept = path_for(self.path) + ".kept"
        os.rename(path_for(self.path), kept)
        try:
            return check(self.path)
        finally:
            os.rename(kept, path_for(self.path))

    def test_a_start_reads_from_the_checkpoint_and_finds_what_a_whole_read_finds(self):
        """After a clean close with a checkpoint (a private 0600 file), recover()
        starts at the checkpointed offset and ends with the counts a whole
        read gives: size, records, last seq, messages, messages per user."""
        journal = self.session(500)
        mode = stat.S_IMODE(os.stat(path_for(self.path)).st_mode)
        assert mode == 0o600
        result = recover(self.path)
        assert result.checkpoint == journal.size == os.path.getsize(self.path)
        assert counts(result) == counts(self.full())
        assert result.users == {"alice": 167, "bob": 167, "zoë": 166}

    def test_what_follows_the_checkpoint_is_read_and_checked(self):
        """Records written after the checkpoint (a later run that crashed, so left
        none) are read: the counts are the whole file's; a seq gap or a damaged
        record after it stops the start, naming its offset."""
        first = self.session(300)
        self.session(200, first=300, checkpoint=False)
        result = recover(self.path)
        assert result.checkpoint == first.size
        assert counts(result) == counts(self.full())
        assert result.records == 1 + 300 + 1 + 200
        with open(self.path, "ab") as f:
            f.write(b"garbage\n")
            f.write(b'{"seq":1000,"time":1.0,"event":"stop","pid":1}\n')
        with self.assertRaises(JournalDamaged) as caught:
            recover(self.path)
        assert caught.exception.offset == result.size

    def test_a_torn_tail_after_the_checkpoint_is_cut_as_always(self):
        """A write cut short after the checkpoint is a torn tail: saved aside and cut."""
        journal = self.session(100)
        with open(self.path, "ab") as f:
            f.write(b'{"seq":102,"time":1.0,"ev')
        result = recover(self.path)
        assert (result.checkpoint, result.size, result.torn_bytes) == (journal.size,
                                                                        journal.size, 25)
        assert os.path.getsize(self.path) == journal.size

    def test_a_checkpoint_that_does_not_hold_is_ignored(self):
        """The whole file is read (checkpoint 0) when the checkpoint names another
        file (the journal renamed away and a new one at the path), when the file
        is now shorter than the checkpoint, when a byte of the 4 KiB before its
        offset changed, and when it is not a checkpoint at all."""
        cases = {}

        def another_file():
            os.rename(self.path, self.path + ".old")
            self.session(10, checkpoint=False)

        def cut():
            with open(self.path, "r+b") as f:
                f.truncate(os.path.getsize(self.path) - 40)

        def rewritten():
            size = os.path.getsize(self.path)
            with open(self.path, "r+b") as f:
                f.seek(size - TAIL // 2)
                byte = f.read(1)
                f.seek(size - TAIL // 2)
                f.write(b"Y" if byte != b"Y" else b"Z")

        def garbage():
            with open(path_for(self.path), "wb") as f:
                f.write(b'{"version": 2}')

        for name, spoil in [("another file", another_file), ("cut", cut),
                            ("rewritten", rewritten), ("garbage", garbage)]:
            self.path = self.temp_path()
            self.session(200)
            spoil()
            try:
                offset = recover(self.path).checkpoint
            except JournalDamaged:
                offset = 0  # read whole, and the change found
            cases[name] = offset
        assert cases == {"another file": 0, "cut": 0, "rewritten": 0, "garbage": 0}

    def test_a_byte_changed_before_the_checked_tail_is_not_read_at_start(self):
        """The trade-off, pinned: a start skips what the checkpoint covers, so a
        byte changed early in that part goes unseen by recover(); check() (what
        ``cserver-journal verify`` runs) reads every record and finds it."""
        self.session(500)
        with open(self.path, "r+b") as f:
            f.seek(100)
            f.write(b"\x00")
        assert recover(self.path).checkpoint > 0
        with self.assertRaises(JournalDamaged):
            check(self.path)

    def test_no_checkpoint_unless_closed_cleanly_and_in_one_file(self):
        """write_checkpoint leaves nothing for a journal still open, one that broke
        (a failed fsync), one that moved to a new file (a reopen) or an empty one."""
        journal = FileJournal.open(self.path, self.clock, fsync="always")
        fill(journal, 5)
        assert journal.write_checkpoint({}) is False  # still open
        journal._os_fdatasync = _failing_sync
        fill(journal, 5, first=5)
        self.flushLoggedErrors()
        journal.close()
        assert journal.broken is not None
        assert journal.write_checkpoint({}) is False

        self.path = self.temp_path()
        journal = FileJournal.open(self.path, self.clock, fsync="never")
        fill(journal, 5)
        os.rename(self.path, self.path + ".1")
        journal.reopen()
        self.clock.advance(0)
        fill(journal, 5, first=5)
        journal.close()
        assert journal.reopens == 1 and journal.write_checkpoint({}) is False

        self.path = self.temp_path()
        journal = FileJournal.open(self.path, self.clock, fsync="never")
        journal.close()
        assert journal.write_checkpoint({}) is False
        assert not os.path.exists(path_for(self.path))


def _failing_sync(fd):
    raise OSError(5, "Input/output error")
