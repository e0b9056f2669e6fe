"""One writer per journal, end to end: a lock holder killed with SIGKILL, and a
second real ``twistd cserver`` on a journal that a running one uses.

End-to-end layer: real processes (the lock alone is in tests/unit/test_lock.py)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from cserver.journal.lock import JournalInUse, JournalLock

from ..server_process import (
    Load,
    check_journal,
    read_journal,
    run_twistd,
    worker_pids,
)
from .test_workers import _wait_gone, _wait_serving

# -- the lock and a process that holds it ---------------------------------------------------


def test_kill_9_of_the_holder_releases_the_lock(path):
    """A process holding the lock and killed with SIGKILL leaves the lock free."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from cserver.journal.lock import JournalLock; "
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


@pytest.mark.parametrize("first, second", [
    ((), ()),
    (("--workers", "2"), ("--workers", "2")),
    ((), ("--workers", "2")),
    (("--workers", "2"), ()),
], ids=["single-single", "workers-workers", "single-workers", "workers-single"])
def test_a_second_server_on_a_journal_in_use_refuses_to_start(tmp_path, server, first,
                                                              second):
    """A second server (another port, the same --journal) started while one runs exits 1
    with one line naming the journal and the running server's pid; it writes nothing (not
    even a start record) and leaves no file; the first keeps serving, and the journal
    stays valid with every acknowledged message in it exactly once."""
    running = server(*first)
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


def test_after_kill_9_of_the_holder_a_new_server_takes_over(tmp_path, server):
    """kill -9 of the server holding the journal frees it: a new server on it starts,
    recovers every acknowledged message and appends after them."""
    first = server()
    load = Load(first.port, 4, 40).start()
    assert load.enough.wait(30)
    first.kill()
    load.stop()
    second = server(journal=first.journal)
    client = second.connect()
    client.request("AUTH alice")
    assert client.request("MSG after takeover").startswith("OK ")
    client.close()
    assert second.stop() == 0
    journaled = check_journal(read_journal(first.journal), load.acked)
    assert "after takeover" in journaled.values()


def test_after_kill_9_of_a_workers_parent_the_journal_is_free_once_its_workers_exit(
        tmp_path, server):
    """kill -9 of a --workers parent: its workers hold the lock while they answer their
    last MSGs; once they have exited, a new server takes the journal over."""
    first = server("--workers", "2")
    _wait_serving(first)
    pids = worker_pids(first)
    load = Load(first.port, 4, 40, stopping_ends=True).start()
    assert load.enough.wait(30)
    first.kill()
    load.stop()
    assert _wait_gone(pids.values(), 20)
    second = server("--workers", "2", journal=first.journal)
    _wait_serving(second)
    assert second.stop() == 0
    check_journal(read_journal(first.journal), load.acked)


def test_a_reopen_carries_the_lock_to_the_new_file(tmp_path, server):
    """After a rotation (rename, SIGHUP) the new file at the journal's path is still
    covered: a second server on that path is refused."""
    running = server()
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


def test_the_journal_tools_read_a_live_journal(tmp_path, server):
    """cserver-journal verify, stats, text and tail read the journal of a running server
    (they take no lock), and the server goes on serving."""
    running = server()
    client = running.connect()
    client.request("AUTH alice")
    assert client.request("MSG live").startswith("OK ")

    def tool(*args):
        return subprocess.run([sys.executable, "-m", "cserver.journal.cli", *args],
                              capture_output=True, text=True, timeout=30)

    assert tool("verify", running.journal).returncode == 0
    assert "message" in tool("stats", running.journal).stdout
    assert '"live"' in tool("text", running.journal).stdout
    assert '"text":"live"' in tool("tail", "-n", "1", running.journal).stdout
    follow = subprocess.Popen([sys.executable, "-m", "cserver.journal.cli", "tail", "-n", "0",
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
