"""One writer per journal: the lock (cserver.journal.lock) alone.

Unit layer: locks taken and refused in this process, on files in a temporary
directory (a holder killed with SIGKILL and second real servers are in
tests/e2e/test_lock.py)."""

import os
import pathlib
import stat

from twisted.trial.unittest import SynchronousTestCase

from cserver.journal import lock as lock_module
from cserver.journal.lock import JournalInUse, JournalLock, lock_path_for

from .base import JournalCase


class LockTests(JournalCase, SynchronousTestCase):
    """Acquiring, refusing and releasing the lock of the journal at ``self.path``."""

    def test_a_lock_is_exclusive_and_names_its_holder(self):
        """The first acquire holds the lock and writes its pid into a 0600 lock file beside
        the journal; a second acquire (another open file description) is refused, naming the
        journal and that pid, and changes nothing."""
        path = self.path
        old = os.umask(0)
        try:
            held = JournalLock.acquire(path)
        finally:
            os.umask(old)
        try:
            assert held.path == os.path.realpath(path) + ".lock"
            with open(held.path) as f:
                assert f.read() == f"{os.getpid()}\n"
            assert stat.S_IMODE(os.stat(held.path).st_mode) == 0o600
            before = os.listdir(os.path.dirname(path))
            with self.assertRaises(JournalInUse) as refused:
                JournalLock.acquire(path)
            assert refused.exception.pid == os.getpid()
            assert str(refused.exception) == (
                f"journal {path} is in use by another server, pid {os.getpid()}: stop it "
                "first, or give this server another --journal")
            assert os.listdir(os.path.dirname(path)) == before
        finally:
            held.release()

    def test_release_removes_the_lock_file_and_frees_the_lock(self):
        """release() removes the lock file and lets go; the next acquire succeeds; a second
        release does nothing."""
        path = self.path
        first = JournalLock.acquire(path)
        first.release()
        assert not os.path.exists(first.path)
        first.release()
        second = JournalLock.acquire(path)
        second.release()

    def test_a_symlink_to_the_journal_finds_the_same_lock(self):
        """Two spellings of one journal (a symbolic link, a relative path) find one lock."""
        path = self.path
        open(path, "wb").close()
        link = pathlib.Path(os.path.dirname(path)) / "link.jsonl"
        link.symlink_to(path)
        held = JournalLock.acquire(path)
        try:
            with self.assertRaises(JournalInUse):
                JournalLock.acquire(str(link))
            with self.assertRaises(JournalInUse):
                JournalLock.acquire(os.path.relpath(path))
        finally:
            held.release()

    def test_a_stale_lock_file_of_a_dead_server_locks_nothing(self):
        """A lock file left by a server that is gone (its pid in it, nobody holding the lock)
        is taken over, and the new pid written over the old."""
        path = self.path
        with open(lock_path_for(path), "w") as f:
            f.write("999999999\n")
        held = JournalLock.acquire(path)
        try:
            with open(held.path) as f:
                assert f.read() == f"{os.getpid()}\n"
        finally:
            held.release()

    def test_a_lock_file_removed_while_being_taken_is_taken_anew(self):
        """When the holder removes the lock file (a clean stop) between this acquire's open and
        its flock, the lock taken is on a file no longer at the path: acquire notices and takes
        the lock of the file that is there, so two servers never each hold one."""
        path = self.path
        real_flock = lock_module.fcntl.flock
        calls = []

        def flock(fd, operation):
            if not calls:
                # The stopping holder: remove the file this acquire just opened, and another
                # server makes a new one at the path.
                os.unlink(lock_path_for(path))
                open(lock_path_for(path), "w").close()
            calls.append(os.fstat(fd).st_ino)
            return real_flock(fd, operation)

        self.patch(lock_module.fcntl, "flock", flock)
        held = JournalLock.acquire(path)
        try:
            assert len(calls) == 2
            assert os.fstat(held.fd).st_ino == os.stat(held.path).st_ino == calls[1]
        finally:
            held.release()


class InUseMessageTests(JournalCase, SynchronousTestCase):
    """What JournalInUse says about the holder."""

    def test_in_use_message_when_the_pid_is_gone_or_unknown(self):
        """A holder whose pid is gone is the workers of a dead parent; an unreadable pid names
        the lock file instead."""
        path = self.path
        gone = JournalInUse(path, path + ".lock", 999999999)
        assert "the workers of another server, whose parent (pid 999999999) is gone" in str(gone)
        unknown = JournalInUse(path, path + ".lock", None)
        assert f"another server (it holds {path}.lock)" in str(unknown)
