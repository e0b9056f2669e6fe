"""Public test doubles: what a test of code that uses cserver needs in
place of a disk.

:class:`MemoryJournal` is a journal (:class:`~cserver.journal.IJournal`)
whose file is a bytes attribute, with switches that make its writes or its
syncs fail.
"""

from __future__ import annotations

import json

from zope.interface import implementer

from cserver.journal.batch import BatchingJournal
from cserver.journal.interfaces import IJournal
from cserver.journal.recovery import Recovery


@implementer(IJournal)
class MemoryJournal(BatchingJournal):
    """
    A journal kept in memory, for tests: ``data`` holds the bytes a file
    journal would hold.  Set ``fail_writes`` to an ``OSError`` to make
    writes fail, ``fail_syncs`` likewise for syncs.
    """

    def __init__(self, clock, fsync="always", recovery=None):
        recovery = recovery or Recovery()
        super().__init__(clock, last_seq=recovery.last_seq, size=0, fsync=fsync)
        self.recovery = recovery
        self.data = b""
        self.syncs = 0
        self.fail_writes = None
        self.fail_syncs = None

    def _append(self, data):
        if self.fail_writes is not None:
            raise self.fail_writes
        self.data += data

    def _sync(self):
        if self.fail_syncs is not None:
            raise self.fail_syncs
        self.syncs += 1

    def _truncate(self, size):
        self.data = self.data[:size]

    def records(self):
        """
        The records written so far, parsed.
        """
        return [json.loads(line) for line in self.data.splitlines()]
