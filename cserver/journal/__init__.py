"""The append-only journal: where every message ends up, durably.

A MSG travels one way through this package::

    protocol -> factory (cserver.server)
             -> JournalLogger.message        (logger: a twisted.logger event)
             -> the journal, an IJournal     (batch: taken, numbered, batched per turn)
             -> the syncer, an ISyncer       (syncers: fdatasync, --sync)
             -> the ack callable the protocol handed in
             -> the protocol's ordered reply (OK <seq>)

Its modules, each with one job:

- :mod:`~cserver.journal.interfaces` -- :class:`IJournal` and :class:`ISyncer`;
- :mod:`~cserver.journal.record` -- the record format, the one definition
  every writer, recovery and the CLI use;
- :mod:`~cserver.journal.logger` -- :class:`JournalLogger`;
- :mod:`~cserver.journal.batch` -- batching and acknowledgement (group
  commit), for every journal;
- :mod:`~cserver.journal.syncers` -- where the fdatasync runs;
- :mod:`~cserver.journal.file` -- :class:`FileJournal`, and its reopen after
  log rotation;
- :mod:`~cserver.journal.shared` and :mod:`~cserver.journal.header` -- one
  file written by several worker processes, and the shared memory they
  agree through;
- :mod:`~cserver.journal.recovery` -- reading a journal back at start;
- :mod:`~cserver.journal.lock` -- one server per journal;
- :mod:`~cserver.journal.reading`, :mod:`~cserver.journal.text` and
  :mod:`~cserver.journal.cli` -- ``cserver-journal``, which reads a journal
  without the server.

A test double, :class:`cserver.testing.MemoryJournal`, keeps the file in
memory.
"""

from cserver.journal.batch import FSYNC_MODES
from cserver.journal.file import FileJournal
from cserver.journal.header import Shared
from cserver.journal.interfaces import IJournal, ISyncer
from cserver.journal.lock import JournalInUse, JournalLock
from cserver.journal.logger import JournalLogger
from cserver.journal.record import ACK, EVENT, FIELDS, MESSAGE_FORMAT
from cserver.journal.recovery import JournalDamaged, Recovery, check, recover
from cserver.journal.shared import SharedFileJournal
from cserver.journal.syncers import SYNC_MODES, AutoSyncer, InlineSyncer, SyncThread, make_syncer

__all__ = [
    "ACK",
    "EVENT",
    "FIELDS",
    "FSYNC_MODES",
    "MESSAGE_FORMAT",
    "SYNC_MODES",
    "AutoSyncer",
    "FileJournal",
    "IJournal",
    "ISyncer",
    "InlineSyncer",
    "JournalDamaged",
    "JournalInUse",
    "JournalLock",
    "JournalLogger",
    "Recovery",
    "Shared",
    "SharedFileJournal",
    "SyncThread",
    "check",
    "make_syncer",
    "recover",
]

