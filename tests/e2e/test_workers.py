"""Tests for ``--workers N`` end to end: the supervisor's restart delays (it
holds a real socket), the ``SO_REUSEPORT`` listening sockets, and a real
``twistd -n cserver --workers 2`` on loopback (a parent and two worker
processes sharing one port and one journal).

End-to-end layer; the options, what the parent tells each worker, parse_tcp
and the parent's totals are in tests/unit/test_workers.py."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from cserver.config import Config
from cserver.journal.header import Shared
from cserver.journal.recovery import Recovery
from cserver.testing import MemoryJournal
from cserver.workers.parent import reuseport_sockets
from cserver.workers.supervisor import STABLE_AFTER, WorkerSupervisor

from ..server_process import (
    Load,
    check_journal,
    read_journal,
    running,
    worker_pids,
)

# -- restarts and sockets ----------------------------------------------------------------

class _SpawningClock(Clock):
    """A clock whose spawnProcess connects the protocol to a fake process with a new pid."""

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None):
        transport = StringTransport()
        transport.pid = 1000 + len(self.spawned)
        protocol.makeConnection(transport)
        self.spawned.append(protocol)
        return transport


def test_restart_delay_doubles_for_quick_deaths_up_to_the_max_and_resets_when_stable():
    """A worker dying within 10 s of its start waits twice as long as last time, never
    more than the max; one that ran 10 s or more is restarted after the first delay."""
    clock = _SpawningClock()
    shared = Shared.create(1)
    sock = socket.socket()
    try:
        supervisor = WorkerSupervisor(
            clock, shared, MemoryJournal(clock), Recovery(), [sock],
            Config(restart_delay=0.1, restart_max_delay=0.5),
        )
        supervisor._spawn(0)
        delays = []
        for uptime in (1, 0, 0, 0, 0, STABLE_AFTER):
            clock.advance(uptime)
            supervisor.worker_ended(clock.spawned[-1], Failure(ProcessTerminated(signal=9)))
            [call] = clock.getDelayedCalls()
            delays.append(round(call.getTime() - clock.seconds(), 6))
            clock.advance(delays[-1])
        assert delays == [0.1, 0.2, 0.4, 0.5, 0.5, 0.1]
        assert len(clock.spawned) == 7
        assert supervisor.processes[0] is clock.spawned[-1]
    finally:
        sock.close()
        shared.close()


def test_reuseport_sockets_share_one_port():
    """N sockets are bound to the one port the first one got, each listening."""
    sockets = reuseport_sockets(socket.AF_INET, "127.0.0.1", 0, 16, 3)
    try:
        ports = {s.getsockname()[1] for s in sockets}
        assert len(sockets) == 3 and len(ports) == 1 and ports != {0}
    finally:
        for s in sockets:
            s.close()


# -- end to end ---------------------------------------------------------------------------

@pytest.fixture
def server(server):
    """conftest's real servers, each with --workers 2."""
    return lambda *args: server("--workers", "2", *args)


def _wait_gone(pids, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(running(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def _stats_of_worker(process, index, tries=200):
    """STATS from a connection that landed on worker ``index``."""
    for _ in range(tries):
        client = process.connect()
        try:
            client.request("AUTH bob")
            stats = client.stats()
            if stats["worker"] == str(index):
                assert client.request("MSG probe").startswith("OK ")
                return stats
        finally:
            client.close()
    raise AssertionError(f"no connection landed on worker {index}")


def _wait_serving(process, timeout=15):
    """Wait until both workers say they serve (the adopted socket, the parent watch)."""
    serving = set()
    deadline = time.monotonic() + timeout
    while serving != {"0", "1"}:
        line = process.wait_for(r"worker \d serving", max(0.1, deadline - time.monotonic()))
        assert line is not None, "the workers did not start serving"
        serving.add(re.search(r"worker (\d) serving", line).group(1))


def _wait_inflight(process, timeout=10):
    """Wait (asking STATS, whose sums the workers publish every 0.2 s) for a MSG in flight."""
    probe = process.connect()
    probe.request("AUTH bob")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if probe.stats()["inflight"] != "0":
                return
            time.sleep(0.02)
        raise AssertionError("the MSG never showed as in flight")
    finally:
        probe.close()


def test_connections_land_on_both_workers_and_stats_are_global(server):
    """Connections are spread over both workers; STATS answers sums over workers plus its own."""
    process = server()
    seen = {}
    for i in range(60):
        client = process.connect()
        client.request("AUTH alice")
        assert client.request(f"MSG m{i}").startswith("OK ")
        stats = client.stats()
        seen.setdefault(stats["worker"], stats)
        client.close()
        if len(seen) == 2 and i >= 9:
            break
    assert set(seen) == {"0", "1"}
    final = process.connect()
    final.request("AUTH alice")
    stats = final.stats()
    final.close()
    assert int(stats["total"]) == int(stats["served"]) == i + 1
    assert int(stats["worker_served"]) < i + 1
    assert {"worker_connections", "inflight", "peak", "connections"} <= set(stats)
    assert process.stop() == 0


def test_thousand_concurrent_clients_all_acked_with_contiguous_seqs(server):
    """1000 clients at once, one MSG each: all acked; the journal's seqs run 1..N without gaps."""
    process = server()
    bench = subprocess.run(
        [sys.executable, "-m", "cserver.client", "bench", "--port", str(process.port),
         "--user", "alice", "-c", "1000", "-n", "1", "--json", "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )
    report = json.loads(bench.stdout)
    assert report["ok"], report
    assert report["acked"] == 1000
    assert process.stop() == 0
    records = read_journal(process.journal)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    messages = [r for r in records if r["event"] == "message"]
    assert len(messages) == 1000
    assert len({r["pid"] for r in messages}) == 2
    assert [r["event"] for r in records if r["event"] != "message"] == ["start", "stop"]


def test_kill_9_of_a_worker_loses_no_acked_message_and_it_is_restarted(server):
    """kill -9 of one worker under load: every acked (seq, text) is journaled; a new pid serves."""
    process = server()
    old = worker_pids(process)
    assert set(old) == {0, 1}
    load = Load(process.port, clients=16, until=400).start()
    try:
        assert load.enough.wait(30), "the clients got no acks"
        os.kill(old[0], signal.SIGKILL)
        assert process.wait_for(r"worker 0 started, pid", 15), "worker 0 was not restarted"
        assert process.wait_for(r"worker 0 serving", 15)
    finally:
        load.stop()
    acked = load.acked
    new = worker_pids(process)
    assert new[0] != old[0] and new[1] == old[1]
    assert any("worker 0" in line and "killed by signal 9" in line for line in process.output)
    stats = _stats_of_worker(process, 0)
    assert int(stats["total"]) >= len(acked)
    assert process.stop() == 0
    assert acked
    check_journal(read_journal(process.journal), acked)


#: kill -9 cycles of a worker.
WORKER_CYCLES = 20


def test_repeated_kill_9_of_a_worker_under_load_loses_no_acked_message(server):
    """20 cycles of: 50 clients load the server, one worker (0 and 1 in turn) is
    killed with kill -9 once 200 MSGs were acked in the cycle, the parent
    restarts it.  After every restart every (seq, text) ever acked is in the
    journal, seqs run 1..N without a gap, STATS total equals the journal's
    message records, and both workers serve again."""
    process = server("--restart-delay", "0.05", "--restart-max-delay", "0.2")
    _wait_serving(process)
    acked = []
    for cycle in range(WORKER_CYCLES):
        index = cycle % 2
        victim = worker_pids(process)[index]
        load = Load(process.port, clients=50, until=200, prefix=f"cycle {cycle} ").start()
        try:
            assert load.enough.wait(30), f"cycle {cycle}: only {len(load.acked)} acks"
            os.kill(victim, signal.SIGKILL)
            assert _wait_gone([victim], 10), f"cycle {cycle}: worker {index} did not die"
            assert process.wait_for(rf"worker {index} serving", 15), (
                f"cycle {cycle}: worker {index} was not restarted")
        finally:
            load.stop()
        acked.extend(load.acked)
        new = worker_pids(process)
        assert new[index] != victim
        journaled = check_journal(read_journal(process.journal), acked, f"cycle {cycle}: ")
        stats = _stats_of_worker(process, index)
        # _stats_of_worker's probe MSG is journaled after the STATS it read.
        assert int(stats["total"]) == len(journaled)
    kills = [line for line in process.output if "killed by signal 9" in line]
    assert len(kills) == WORKER_CYCLES
    assert process.stop() == 0
    records = read_journal(process.journal)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert records[-1]["event"] == "stop"
    assert records[-1]["total"] == sum(r["event"] == "message" for r in records)
    print(f"{WORKER_CYCLES} kill -9 cycles of a worker: {len(acked)} acked, all journaled")


def test_sigterm_acks_inflight_writes_one_stop_record_and_leaves_no_worker(server):
    """SIGTERM of the parent: the MSG in flight is acked, exit 0, one stop record, no worker."""
    process = server("--work-delay", "1")
    pids = worker_pids(process)
    client = process.connect()
    client.request("AUTH alice")
    client.send("MSG slow one")
    _wait_inflight(process)
    process.process.send_signal(signal.SIGTERM)
    assert client.read_line() == "OK 2"
    assert process.process.wait(20) == 0
    assert _wait_gone(pids.values(), 5)
    records = read_journal(process.journal)
    assert [r["event"] for r in records] == ["start", "message", "stop"]
    assert records[-1]["served"] == 1 and records[-1]["total"] == 1


def test_sigkill_of_the_parent_leaves_no_workerrunning(server):
    """kill -9 of the parent: the workers see their stdin close and exit within seconds."""
    process = server()
    pids = worker_pids(process)
    _wait_serving(process)
    assert len(pids) == 2 and all(running(pid) for pid in pids.values())
    process.kill()
    assert _wait_gone(pids.values(), 10), "a worker outlived its parent"
