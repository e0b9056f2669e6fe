"""What the unit TestCases share: a clock, temporary paths, file journals on
that clock, and the interpreter settings put back after makeService."""

import gc
import os
import shutil
import sys
import tempfile

from twisted.internet.task import Clock

from cserver.journal import FileJournal


class Temporary:
    """
    Temporary directories removed after the test (trial's ``mktemp`` makes
    them under the working directory, which under pytest is the checkout).
    """

    def temp_dir(self):
        """A new empty directory, as a str."""
        directory = tempfile.mkdtemp(prefix="cserver-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        return directory

    def temp_path(self, name="journal.jsonl"):
        """A path named ``name`` in a new empty directory (nothing there yet)."""
        return os.path.join(self.temp_dir(), name)


class JournalCase(Temporary):
    """
    ``self.clock``, ``self.path`` (a journal path in a new directory) and
    ``self.open_journal(fsync="always", at=None, **kwargs)``: FileJournals on
    that clock, closed after the test.
    """

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.path = self.temp_path()

    def open_journal(self, fsync="always", at=None, **kwargs):
        journal = FileJournal.open(at or self.path, self.clock, fsync=fsync, **kwargs)
        self.addCleanup(journal.close)
        return journal


class RestoreInterpreter:
    """
    makeService tunes the interpreter for serving (gc.freeze, thresholds, the
    switch interval): put the test process back afterwards.
    """

    def setUp(self):
        super().setUp()
        threshold, interval = gc.get_threshold(), sys.getswitchinterval()

        def restore():
            gc.unfreeze()
            gc.set_threshold(*threshold)
            sys.setswitchinterval(interval)

        self.addCleanup(restore)
