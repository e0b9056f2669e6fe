"""Private files: everything the server creates -- the journal, the files a
reopen starts, torn-tail side files, the lock -- is mode 0600 whatever the
umask (they hold every message and peer address).

Unit layer: the journal, recovery and lock code on files in a temporary
directory, each test under a permissive, an open and a strict umask."""

import os
import stat

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cserver.journal import FileJournal, SharedFileJournal
from cserver.journal.header import Shared
from cserver.journal.lock import JournalLock
from cserver.journal.recovery import recover

from .base import JournalCase


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class PrivateFiles(JournalCase):
    """
    The files the server creates, under the umask ``umask`` (set by each
    subclass; put back after the test).
    """

    umask = None

    def setUp(self):
        super().setUp()
        old = os.umask(self.umask)
        self.addCleanup(os.umask, old)

    def test_a_new_journal_is_private(self):
        """FileJournal.open creates the journal 0600."""
        path = self.path
        journal = FileJournal.open(path, Clock())
        journal.close()
        assert mode(path) == 0o600

    def test_a_new_shared_journal_is_private(self):
        """SharedFileJournal.prepare (--workers) creates the journal 0600."""
        path = self.path
        shared = Shared.create(1)
        try:
            SharedFileJournal.prepare(path, shared)
        finally:
            shared.close()
        assert mode(path) == 0o600

    def test_the_file_a_reopen_creates_is_private(self):
        """After a rotation, the new file at the journal's path is 0600."""
        path = self.path
        clock = Clock()
        journal = FileJournal.open(path, clock)
        os.rename(path, path + ".1")
        done = journal.reopen()
        clock.advance(0)
        assert done.called
        journal.close()
        assert mode(path) == 0o600

    def test_a_torn_tail_side_file_is_private(self):
        """The side file that keeps a torn tail is 0600."""
        path = self.path
        with open(path, "wb") as f:
            f.write(b'{"seq":1,"time":1,"event":"start","pid":1}\n{"seq":2,"ti')
        os.chmod(path, 0o600)
        recovery = recover(path)
        assert recovery.torn_path is not None
        assert mode(recovery.torn_path) == 0o600

    def test_the_lock_file_is_private(self):
        """The journal's lock file is 0600."""
        lock = JournalLock.acquire(self.path)
        try:
            assert mode(lock.path) == 0o600
        finally:
            lock.release()


class PrivateFilesUnderUmask022Tests(PrivateFiles, SynchronousTestCase):
    """Under a permissive umask."""

    umask = 0o022


class PrivateFilesUnderUmask000Tests(PrivateFiles, SynchronousTestCase):
    """Under an open umask."""

    umask = 0o000


class PrivateFilesUnderUmask077Tests(PrivateFiles, SynchronousTestCase):
    """Under a strict umask."""

    umask = 0o077


class ExistingFileTests(JournalCase, SynchronousTestCase):
    """Files the server finds already there."""

    def test_an_existing_journal_keeps_its_mode(self):
        """A journal that exists keeps the mode its owner gave it (e.g. 0640 for a log
        shipper's group): the server creates files private, it does not change others."""
        path = self.path
        open(path, "wb").close()
        os.chmod(path, 0o640)
        FileJournal.open(path, Clock()).close()
        assert mode(path) == 0o640
