"""One writer per journal: the lock (cserver.lock) alone, and end to end a second
real ``twistd cserver`` on a journal that a running one uses."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from cserver import lock as lock_module
from cserver.lock import JournalInUse, JournalLock, lock_path_for

from .server_process import (
    Load,
    ServerProcess,
    check_journal,
    read_journal,
    run_twistd,
)
from .test_workers import _wait_gone, _wait_serving, worker_pids

# -- the lock alone ------------------------------------------------------------------------


def test_a_lock_is_exclusive_and_names_its_holder(path):
    """The first acquire holds the lock and writes its pid into a 0600 lock file beside
    the journal; a second acquire (another open file description) is refused, naming the
    journal and that pid, and changes nothing."""
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
        with pytest.raises(JournalInUse) as refused:
            JournalLock.acquire(path)
        assert refused.value.pid == os.getpid()
        assert str(refused.value) == (
            f"journal {path} is in use by another server, pid {os.getpid()}: stop it first, "
            "or give this server another --journal")
        assert os.listdir(os.path.dirname(path)) == before
    finally:
        held.release()


def test_release_removes_the_lock_file_and_frees_the_lock(path):
    """release() removes the lock file and lets go; the next acquire succeeds; a second
    release does nothing."""
    first = JournalLock.acquire(path)
    first.release()
    assert not os.path.exists(first.path)
    first.release()
    second = JournalLock.acquire(path)
    second.release()


def test_a_symlink_to_the_journal_finds_the_same_lock(path, tmp_path):
    """Two spellings of one journal (a symbolic link, a relative path) find one lock."""
    open(path, "wb").close()
    link = tmp_path / "link.jsonl"
    link.symlink_to(path)
    held = JournalLock.acquire(path)
    try:
        with pytest.raises(JournalInUse):
            JournalLock.acquire(str(link))
        with pytest.raises(JournalInUse):
            JournalLock.acquire(os.path.relpath(path))
    finally:
        held.release()


def test_a_stale_lock_file_of_a_dead_server_locks_nothing(path):
    """A lock file left by a server that is gone (its pid in it, nobody holding the lock)
    is taken over, and the new pid written over the old."""
    with open(lock_path_for(path), "w") as f:
        f.write("999999999\n")
    held = JournalLock.acquire(path)
    try:
        with open(held.path) as f:
            assert f.read() == f"{os.getpid()}\n"
    finally:
        held.release()


def test_kill_9_of_the_holder_releases_the_lock(path):
    """A process holding the lock and killed with SIGKILL leaves the lock free."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from cserver.lock import JournalLock; "
         f"JournalLock.acquire({path!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(JournalInUse) as refused:
            JournalLock.acquire(path)
        assert refused.value.pid == holder.pid
        holder.kill()
        holder.wait(10)
        JournalLock.acquire(path).release()
    finally:
        holder.kill()
        holder.wait(10)


def test_a_lock_file_removed_while_being_taken_is_taken_anew(path, monkeypatch):
    """When the holder removes the lock file (a clean stop) between this acquire's open and
    its flock, the lock taken is on a file no longer at the path: acquire notices and takes
    the lock of the file that is there, so two servers never each hold one."""
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

    monkeypatch.setattr(lock_module.fcntl, "flock", flock)
    held = JournalLock.acquire(path)
    try:
        assert len(calls) == 2
        assert os.fstat(held.fd).st_ino == os.stat(held.path).st_ino == calls[1]
    finally:
        held.release()


def test_in_use_message_when_the_pid_is_gone_or_unknown(path):
    """A holder whose pid is gone is the workers of a dead parent; an unreadable pid names
    the lock file instead."""
    gone = JournalInUse(path, path + ".lock", 999999999)
    assert "the workers of another server, whose parent (pid 999999999) is gone" in str(gone)
    unknown = JournalInUse(path, path + ".lock", None)
    assert f"another server (it holds {path}.lock)" in str(unknown)


# -- end to end ----------------------------------------------------------------------------

def _files(directory):
    return sorted(name for name in os.listdir(directory) if not name.startswith("_"))


def _contents(directory):
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in _files(directory)}


def _refused(directory, journal, *args):
    """A second server on ``journal``: it must exit 1 with one line, having made no file
    and changed none (the running server may go on appending to the journal)."""
    before = _contents(directory)
    done = run_twistd(directory, "--users", "alice", "--port", "tcp:0:interface=127.0.0.1",
                      "--journal", journal, *args)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"cserver: journal {journal} is in use by ")
    after = _contents(directory)
    assert sorted(after) == sorted(before)
    for name, data in before.items():
        assert after[name].startswith(data), name
    return lines[0]


@pytest.fixture
def servers(tmp_path):
    started = []

    def start(*args, journal=None):
        process = ServerProcess(tmp_path, "--users", "alice,bob", *args, journal=journal)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        pids = worker_pids(process)
        if process.process.poll() is None:
            process.kill()
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("first, second", [
    ((), ()),
    (("--workers", "2"), ("--workers", "2")),
    ((), ("--workers", "2")),
    (("--workers", "2"), ()),
], ids=["single-single", "workers-workers", "single-workers", "workers-single"])
def test_a_second_server_on_a_journal_in_use_refuses_to_start(tmp_path, servers, first,
                                                              second):
    """A second server (another port, the same --journal) started while one runs exits 1
    with one line naming the journal and the running server's pid; it writes nothing (not
    even a start record) and leaves no file; the first keeps serving, and the journal
    stays valid with every acknowledged message in it exactly once."""
    running = servers(*first)
    if "--workers" in first:
        _wait_serving(running)
    load = Load(running.port, 4, 40).start()
    try:
        assert load.enough.wait(30)
        line = _refused(str(tmp_path), running.journal, *second)
        assert f"pid {running.process.pid}" in line
        client = running.connect()
        assert client.request("AUTH alice") == "OK alice"
        assert client.request("MSG still served").startswith("OK ")
        client.close()
    finally:
        load.stop()
    assert running.stop() == 0
    records = read_journal(running.journal)
    check_journal(records, load.acked)
    assert [r["event"] for r in records].count("start") == 1
    texts = [r["text"] for r in records if r["event"] == "message"]
    assert len(texts) == len(set(texts))
    assert not os.path.exists(running.journal + ".lock")


def test_after_kill_9_of_the_holder_a_new_server_takes_over(tmp_path, servers):
    """kill -9 of the server holding the journal frees it: a new server on it starts,
    recovers every acknowledged message and appends after them."""
    first = servers()
    load = Load(first.port, 4, 40).start()
    assert load.enough.wait(30)
    first.kill()
    load.stop()
    second = servers(journal=first.journal)
    client = second.connect()
    client.request("AUTH alice")
    assert client.request("MSG after takeover").startswith("OK ")
    client.close()
    assert second.stop() == 0
    journaled = check_journal(read_journal(first.journal), load.acked)
    assert "after takeover" in journaled.values()


def test_after_kill_9_of_a_workers_parent_the_journal_is_free_once_its_workers_exit(
        tmp_path, servers):
    """kill -9 of a --workers parent: its workers hold the lock while they answer their
    last MSGs; once they have exited, a new server takes the journal over."""
    first = servers("--workers", "2")
    _wait_serving(first)
    pids = worker_pids(first)
    load = Load(first.port, 4, 40, stopping_ends=True).start()
    assert load.enough.wait(30)
    first.kill()
    load.stop()
    assert _wait_gone(pids.values(), 20)
    second = servers("--workers", "2", journal=first.journal)
    _wait_serving(second)
    assert second.stop() == 0
    check_journal(read_journal(first.journal), load.acked)


def test_a_reopen_carries_the_lock_to_the_new_file(tmp_path, servers):
    """After a rotation (rename, SIGHUP) the new file at the journal's path is still
    covered: a second server on that path is refused."""
    running = servers()
    client = running.connect()
    client.request("AUTH alice")
    assert client.request("MSG before").startswith("OK ")
    os.rename(running.journal, running.journal + ".1")
    running.process.send_signal(signal.SIGHUP)
    assert running.wait_for("reopened at seq") is not None
    _refused(str(tmp_path), running.journal)
    assert client.request("MSG after").startswith("OK ")
    client.close()
    assert running.stop() == 0
    assert [r["event"] for r in read_journal(running.journal)] == ["reopen", "message", "stop"]


def test_the_journal_tools_read_a_live_journal(tmp_path, servers):
    """cserver-journal verify, stats, text and tail read the journal of a running server
    (they take no lock), and the server goes on serving."""
    running = servers()
    client = running.connect()
    client.request("AUTH alice")
    assert client.request("MSG live").startswith("OK ")

    def tool(*args):
        return subprocess.run([sys.executable, "-m", "cserver.journal_cli", *args],
                              capture_output=True, text=True, timeout=30)

    assert tool("verify", running.journal).returncode == 0
    assert "message" in tool("stats", running.journal).stdout
    assert '"live"' in tool("text", running.journal).stdout
    assert '"text":"live"' in tool("tail", "-n", "1", running.journal).stdout
    follow = subprocess.Popen([sys.executable, "-m", "cserver.journal_cli", "tail", "-n", "0",
                               "-f", running.journal], stdout=subprocess.PIPE, text=True)
    try:
        _wait_open(follow.pid, running.journal)
        assert client.request("MSG followed").startswith("OK ")
        assert '"text":"followed"' in follow.stdout.readline()
    finally:
        follow.kill()
        follow.wait(10)
    client.close()
    assert running.stop() == 0


def _wait_open(pid, path, timeout=20):
    """Wait until process ``pid`` has ``path`` open."""
    deadline = time.monotonic() + timeout
    real = os.path.realpath(path)
    while time.monotonic() < deadline:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            break
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == real:
                    return
            except OSError:
                continue
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never opened {path}")
