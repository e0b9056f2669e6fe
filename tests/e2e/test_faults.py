"""Faults under a real ``twistd -n cserver``: repeated kill -9 under load, and
a journal whose filesystem fills up (a small tmpfs when the tests may mount
one; RLIMIT_FSIZE otherwise and as well).  Torn tails of every length are in
tests/unit/test_recovery.py, a single kill -9 of a worker in
tests/e2e/test_workers.py, an injected fsync failure in
tests/unit/test_journal.py.

End-to-end layer."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from ..server_process import Load, ServerProcess, check_journal, read_journal, twistd_command

#: kill -9 cycles (20; they take about half a second each).
CYCLES = 20
#: Clients loading the server in each cycle.
CLIENTS = 50
#: Acks, counted from the start of a cycle, after which the server is killed.
ACKS_PER_CYCLE = 300


def _wait_for_start_record(process, timeout=10):
    """
    The journal's records once this server's ``start`` record is its last
    (recovery done, nothing else written yet).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(process.journal, "rb") as f:
            lines = f.read().split(b"\n")
        if lines[-1] == b"" and len(lines) > 1:
            last = json.loads(lines[-2])
            if last["event"] == "start" and last["pid"] == process.process.pid:
                return [json.loads(line) for line in lines[:-1]]
        time.sleep(0.01)
    raise AssertionError("no start record from the new server")


def _load_until(process, cycle, acked, count):
    """
    ``CLIENTS`` clients send MSGs, recording each ack, until ``count`` acks
    came in this cycle; then the server is killed (kill -9).  Returns the acks
    of this cycle.
    """
    load = Load(process.port, clients=CLIENTS, until=count, prefix=f"cycle {cycle} ").start()
    try:
        assert load.enough.wait(30), f"cycle {cycle}: only {len(load.acked)} acks"
        assert process.kill() == -signal.SIGKILL
    finally:
        if process.process.poll() is None:
            process.kill()
        load.stop()
    mine = load.acked
    acked.extend(mine)
    return mine


def test_repeated_kill_9_under_load_loses_no_acked_message(tmp_path):
    """20 cycles of: start twistd on the same journal, load it with 50 clients,
    kill -9 it once 300 MSGs were acked in the cycle.  After every restart,
    every (seq, text) ever acked is in the journal, seqs run 1..N without a
    gap, and STATS total equals the journal's message records (whatever
    recovery cut off as a torn tail was never acked)."""
    journal = tmp_path / "journal.jsonl"
    acked = []
    torn = 0
    for cycle in range(CYCLES + 1):
        process = ServerProcess(tmp_path, "--users", "alice,bob", journal=journal).start()
        try:
            records = _wait_for_start_record(process)
            journaled = check_journal(records, acked)
            torn += records[-1]["torn_bytes"]
            assert records[-1]["messages"] == len(journaled)
            client = process.connect()
            client.request("AUTH bob")
            assert client.stats()["total"] == str(len(journaled))
            client.close()
            if cycle == CYCLES:
                assert process.stop() == 0
                break
            _load_until(process, cycle, acked, ACKS_PER_CYCLE)
        finally:
            if process.process.poll() is None:
                process.kill()
    assert len(acked) >= CYCLES * ACKS_PER_CYCLE
    records = read_journal(journal)
    check_journal(records, acked)
    assert sum(r["event"] == "start" for r in records) == CYCLES + 1
    print(f"{CYCLES} kill -9 cycles: {len(acked)} acked, all journaled; torn bytes cut: {torn}")


# -- a full disk ---------------------------------------------------------------


def _tmpfs(directory, size):
    """Mount a tmpfs of ``size`` at ``directory``, or skip the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                             str(directory)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")


def _leave_free(directory, room):
    """A filler file that leaves about ``room`` bytes free on ``directory``'s filesystem."""
    filler = directory / "filler"
    stat = os.statvfs(directory)
    with open(filler, "wb") as f:
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize - room))
    return filler


def _send_until_refused(client, prefix, limit=2000):
    """MSGs of ~1 KiB until one is refused; the acked (seq, text) and the refusal."""
    acked = []
    for i in range(limit):
        text = f"{prefix} {i} " + "x" * 1000
        reply = client.request(f"MSG {text}")
        if not reply.startswith("OK "):
            return acked, reply
        acked.append((int(reply[3:]), text))
    raise AssertionError(f"{limit} MSGs of 1 KiB and no refusal")


def _check_whole(path, acked):
    """The journal ends with a whole record, holds every acked MSG and no other."""
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n"), data[-80:]
    records = [json.loads(line) for line in data.split(b"\n")[:-1]]
    journaled = check_journal(records, acked)
    assert sorted(journaled.items()) == sorted(acked)
    return records


def test_full_tmpfs_refuses_msgs_and_recovers_when_space_returns(tmp_path):
    """A journal on a 1 MiB tmpfs that fills up: once it is full, MSGs get ERR
    unavailable (ENOSPC), the journal still ends with a whole record and holds
    exactly the acked MSGs; when a filler file is deleted the next MSG is
    acked, taking the seq after the last acked one; the journal recovers
    cleanly at the next start."""
    disk = tmp_path / "disk"
    _tmpfs(disk, "1m")
    try:
        journal = disk / "journal.jsonl"
        process = ServerProcess(tmp_path, "--users", "alice", journal=journal).start()
        _wait_for_start_record(process)
        filler = _leave_free(disk, 64 * 1024)
        client = process.connect()
        client.request("AUTH alice")
        acked, refusal = _send_until_refused(client, "before")
        assert acked, "no MSG fit"
        assert refusal.startswith("ERR unavailable write failed: ENOSPC"), refusal
        assert client.request("MSG still full " + "x" * 1000).startswith("ERR unavailable ")
        _check_whole(journal, acked)
        os.remove(filler)
        reply = client.request("MSG after")
        assert reply == f"OK {acked[-1][0] + 1}", reply
        acked.append((acked[-1][0] + 1, "after"))
        client.close()
        assert process.stop() == 0
        records = _check_whole(journal, acked)
        assert records[-1]["event"] == "stop"
        restarted = ServerProcess(tmp_path, "--users", "alice", journal=journal).start()
        assert _wait_for_start_record(restarted)[-1]["torn_bytes"] == 0
        assert restarted.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_rlimit_fsize_refuses_msgs_and_recovers_when_raised(tmp_path):
    """RLIMIT_FSIZE on the server process (its SIGXFSZ left at its default
    action): a write past the limit fails with EFBIG -- the server does not
    die of SIGXFSZ, as CPython ignores that signal at start -- MSGs get ERR
    unavailable, the journal ends with a whole record and holds exactly the
    acked MSGs; once the limit is raised (prlimit on the running server) the
    next MSG is acked with the next seq."""
    journal = tmp_path / "journal.jsonl"
    limit = 64 * 1024
    # Set the limit, restore SIGXFSZ's default action, then become twistd (same pid).
    wrapper = [sys.executable, "-c", (
        "import os, resource, signal, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY)); "
        "signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )] + twistd_command()
    process = ServerProcess(tmp_path, "--users", "alice", journal=journal, twistd=wrapper)
    process.start()
    try:
        client = process.connect()
        client.request("AUTH alice")
        acked, refusal = _send_until_refused(client, "before")
        assert acked, "no MSG fit"
        assert refusal.startswith("ERR unavailable write failed: EFBIG"), refusal
        assert process.process.poll() is None, "the server died (SIGXFSZ?)"
        assert os.path.getsize(journal) <= limit
        _check_whole(journal, acked)
        resource.prlimit(process.process.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        reply = client.request("MSG after")
        assert reply == f"OK {acked[-1][0] + 1}", reply
        acked.append((acked[-1][0] + 1, "after"))
        client.close()
        assert process.stop() == 0
        assert _check_whole(journal, acked)[-1]["event"] == "stop"
    finally:
        if process.process.poll() is None:
            process.kill()
