"""Exactly once: 50 clients send keyed messages through RetryingSenders while
the server is killed with SIGKILL and restarted 10 times; afterwards every
message is in the journal exactly once, at the seq its client was told.

End-to-end layer."""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

from ..server_process import ServerProcess, read_journal, worker_pids
from .keyed_load import check_exactly_once

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENTS = 50
MESSAGES = 60
KILLS = 10


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(stream, into):
    for line in stream:
        into.put(line)
    into.put(None)


def test_keyed_messages_survive_ten_kill_9s_exactly_once(server, tmp_path):
    """Each kill comes once the load has acknowledged 200 more messages since the
    last restart (awaited, not timed).  The load gives up on nothing: it ends
    with every message acknowledged, and then the journal holds each key once
    (0 doubled), all 3000 of them (0 lost), each at the seq its sender was
    finally told, with contiguous seqs."""
    journal = str(tmp_path / "journal.jsonl")
    port = _free_port()
    _kill_and_check(lambda: server("--port", f"tcp:{port}:interface=127.0.0.1",
                                   journal=journal), port, journal, tmp_path)


def test_resends_of_records_already_written_are_answered_dup(shim, tmp_path):
    """The same, on a disk whose every fdatasync takes 20 ms (the LD_PRELOAD shim,
    --sync thread): the kills land while written batches wait for their sync, so
    the senders resend messages the journal already holds -- the server answers
    those OK <seq> dup, and still each is in the journal once."""
    journal = str(tmp_path / "journal.jsonl")
    port = _free_port()
    env = {"LD_PRELOAD": " ".join(filter(None, [shim, os.environ.get("LD_PRELOAD")])),
           "CSERVER_FAULT_FSYNC_DELAY_MS": "20"}
    started = []

    def start():
        process = ServerProcess(tmp_path, "--users", "alice,bob", "--sync", "thread",
                                "--port", f"tcp:{port}:interface=127.0.0.1",
                                journal=journal, env=env)
        started.append(process)
        return process.start()

    try:
        result = _kill_and_check(start, port, journal, tmp_path)
    finally:
        for process in started:
            if process.process.poll() is None:
                process.kill()
    assert result["duplicates"] > 0


def test_keyed_messages_survive_ten_worker_kills_exactly_once(server, tmp_path):
    """The same with --workers 2: one worker (each in turn) is SIGKILLed 10 times
    and restarted by its parent, so retries land on the other worker or on the
    new one; every message is in the journal once, at the seq its sender was
    told (the workers learn each other's keys under the journal's lock)."""
    journal = str(tmp_path / "journal.jsonl")
    port = _free_port()
    process = server("--workers", "2", "--restart-delay", "0.05", "--restart-max-delay", "0.2",
                     "--port", f"tcp:{port}:interface=127.0.0.1", journal=journal)
    kills = []

    def kill_a_worker(_process):
        index = len(kills) % 2
        victim = worker_pids(process)[index]
        os.kill(victim, signal.SIGKILL)
        kills.append(victim)
        deadline = time.monotonic() + 30
        while worker_pids(process).get(index) == victim:  # awaited: its parent restarts it
            assert time.monotonic() < deadline, "the worker was not restarted"
            time.sleep(0.01)
        return process

    _kill_and_check(lambda: process, port, journal, tmp_path, kill=kill_a_worker)


def _kill_and_check(start, port, journal, tmp_path, kill=None):
    """Run the load on the server ``start()`` starts, kill -9 and restart it
    KILLS times (or ``kill(process)`` it, which returns the server to go on
    with), then check the journal against what the senders were told; the
    load's report."""
    if kill is None:
        def kill(process):
            process.kill()
            return start()

    process = start()
    report = tmp_path / "report.json"
    load = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.keyed_load", str(port), "alice", str(CLIENTS),
         str(MESSAGES), str(report)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress = queue.Queue()
    threading.Thread(target=_lines, args=(load.stdout, progress), daemon=True).start()
    output = []
    kills = 0
    since_restart = 0
    try:
        while kills < KILLS:
            line = progress.get(timeout=120)
            if line is None:
                break
            output.append(line)
            since_restart += line.startswith("acked ")
            if since_restart == 2:
                process = kill(process)
                kills += 1
                since_restart = 0
        assert load.wait(timeout=180) == 0, "".join(output)
    finally:
        if load.poll() is None:
            load.kill()
    assert kills == KILLS, f"the load ended after {kills} kills: {''.join(output)}"
    assert process.stop() == 0
    result = json.loads(report.read_text())
    told = result["seqs"]
    check_exactly_once(read_journal(journal), result, CLIENTS * MESSAGES)
    print(f"exactly once: {len(told)} messages, {kills} kills, "
          f"{result['duplicates']} duplicates answered, {result['resends']} resends, "
          f"{result['reconnects']} reconnects, 0 lost, 0 doubled")
    return result
