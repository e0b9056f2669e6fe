"""Private files: everything the server creates -- the journal, the files a
reopen starts, torn-tail side files, the lock -- is mode 0600 whatever the
umask (they hold every message and peer address)."""

import os
import signal
import stat

import pytest
from twisted.internet.task import Clock

from cserver.journal import FileJournal, SharedFileJournal
from cserver.lock import JournalLock
from cserver.recovery import recover
from cserver.shared import Shared

from .server_process import ServerProcess


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o000, 0o077], ids=["umask-022", "umask-000", "umask-077"])
def umask(request):
    """Each test under a permissive, an open and a strict umask."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_a_new_journal_is_private(path, umask):
    """FileJournal.open creates the journal 0600."""
    journal = FileJournal.open(path, Clock())
    journal.close()
    assert mode(path) == 0o600


def test_a_new_shared_journal_is_private(path, umask):
    """SharedFileJournal.prepare (--workers) creates the journal 0600."""
    shared = Shared.create(1)
    try:
        SharedFileJournal.prepare(path, shared)
    finally:
        shared.close()
    assert mode(path) == 0o600


def test_the_file_a_reopen_creates_is_private(path, umask):
    """After a rotation, the new file at the journal's path is 0600."""
    clock = Clock()
    journal = FileJournal.open(path, clock)
    os.rename(path, path + ".1")
    done = journal.reopen()
    clock.advance(0)
    assert done.called
    journal.close()
    assert mode(path) == 0o600


def test_a_torn_tail_side_file_is_private(path, umask):
    """The side file that keeps a torn tail is 0600."""
    with open(path, "wb") as f:
        f.write(b'{"seq":1,"time":1,"event":"start","pid":1}\n{"seq":2,"ti')
    os.chmod(path, 0o600)
    recovery = recover(path)
    assert recovery.torn_path is not None
    assert mode(recovery.torn_path) == 0o600


def test_the_lock_file_is_private(path, umask):
    """The journal's lock file is 0600."""
    lock = JournalLock.acquire(path)
    try:
        assert mode(lock.path) == 0o600
    finally:
        lock.release()


def test_an_existing_journal_keeps_its_mode(path):
    """A journal that exists keeps the mode its owner gave it (e.g. 0640 for a log
    shipper's group): the server creates files private, it does not change others."""
    open(path, "wb").close()
    os.chmod(path, 0o640)
    FileJournal.open(path, Clock()).close()
    assert mode(path) == 0o640


def test_a_real_server_under_umask_022_writes_private_files(tmp_path):
    """``twistd cserver`` started under umask 022 creates its journal, its lock file and,
    after a SIGHUP rotation, the new journal file, all 0600."""

    process = ServerProcess(tmp_path, "--users", "alice", umask=0o022).start()
    try:
        assert mode(process.journal) == 0o600
        assert mode(process.journal + ".lock") == 0o600
        os.rename(process.journal, process.journal + ".1")
        process.process.send_signal(signal.SIGHUP)
        assert process.wait_for("reopened at seq") is not None
        assert mode(process.journal) == 0o600
    finally:
        assert process.stop() == 0
