"""Keyed messages (PUT) across restarts of a real server: the window is
rebuilt from the journal, so a retry after a restart -- clean or kill -9 --
gets the first seq back and journals nothing.

End-to-end layer."""

import json
import socket
import subprocess
import sys
import time

from ..server_process import read_journal


def test_a_retry_after_a_restart_gets_the_first_seq_marked_dup(server):
    """PUT, then SIGTERM and restart: the same PUT gets OK <first seq> dup; PUT,
    then kill -9 and restart: the same; the journal holds each key once, and
    the server says it speaks protocol 1.1."""
    first = server()
    client = first.connect()
    assert client.greeting.endswith(" proto=1.1")
    client.request("AUTH alice")
    assert client.request("PUT order-1 two apples") == "OK 2"
    client.close()
    assert first.stop() == 0

    second = server(journal=first.journal)
    client = second.connect()
    client.request("AUTH alice")
    assert client.request("PUT order-1 two apples") == "OK 2 dup"
    assert client.request("PUT order-1 three apples").startswith("ERR conflict")
    assert client.request("PUT order-2 a pear") == "OK 5"
    assert client.stats()["duplicates"] == "1"
    client.close()
    second.kill()

    third = server(journal=first.journal)
    client = third.connect()
    client.request("AUTH alice")
    assert client.request("PUT order-2 a pear") == "OK 5 dup"
    assert client.request("PUT order-1 two apples") == "OK 2 dup"
    client.close()
    assert third.stop() == 0
    keyed = [r["key"] for r in read_journal(first.journal) if "key" in r]
    assert keyed == ["order-1", "order-2"]


def test_workers_journal_a_key_once_whichever_worker_gets_it(server):
    """With --workers 2 (connections spread over the workers by the kernel), the
    same PUT sent on 12 connections one after another gets OK <seq> once and OK
    <seq> dup everywhere else; then 20 connections send one new key at the same
    moment, pipelined: one OK <seq>, 19 OK <seq> dup, all with one seq; the
    journal holds each key once.  Another text for a key is a conflict, on
    whichever worker."""
    process = server("--workers", "2")
    clients = []
    for _ in range(12):
        client = process.connect()
        client.request("AUTH alice")
        clients.append(client)
    answers = [client.request("PUT once hello") for client in clients]
    first = answers[0]
    assert first.startswith("OK ") and not first.endswith(" dup")
    assert answers[1:] == [f"{first} dup"] * 11
    assert all(c.request("PUT once other").startswith("ERR conflict") for c in clients[:4])
    for client in clients:
        client.close()
    racers = []
    for _ in range(20):
        client = process.connect()
        client.request("AUTH bob")
        racers.append(client)
    for client in racers:
        client.send("PUT race hello")
    answers = [client.read_line() for client in racers]
    plain = [a for a in answers if not a.endswith(" dup")]
    assert len(plain) == 1 and plain[0].startswith("OK ")
    assert sorted(answers) == sorted([plain[0]] + [f"{plain[0]} dup"] * 19)
    for client in racers:
        client.close()
    assert process.stop() == 0
    keys = [r["key"] for r in read_journal(process.journal) if "key" in r]
    assert sorted(keys) == ["once", "race"]


def test_retrying_bench_survives_a_restart_mid_run(server, tmp_path):
    """``cserver-client bench --keyed --retry`` against a server killed (-9) and
    started again once it has acknowledged some: the run still ends with every
    message acknowledged once, and reports the reconnects."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    journal = str(tmp_path / "journal.jsonl")
    listen = ("--port", f"tcp:{port}:interface=127.0.0.1")
    process = server(*listen, journal=journal)
    bench = subprocess.Popen(
        [sys.executable, "-m", "cserver.client", "bench", "--port", str(port), "--user",
         "alice", "--keyed", "--retry", "-c", "20", "-n", "100", "-d", "4", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Awaited, not timed: the journal holds keyed records before the kill.
    deadline = time.monotonic() + 60
    while b'"key":' not in open(journal, "rb").read():
        assert time.monotonic() < deadline and bench.poll() is None
        time.sleep(0.01)
    process.kill()
    process = server(*listen, journal=journal)
    out, err = bench.communicate(timeout=120)
    assert bench.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    assert (report["ok"], report["acked"]) == (True, 2000)
    assert report["reconnects"] >= 1
    keys = [r["key"] for r in read_journal(journal) if "key" in r]
    assert len(keys) == len(set(keys)) == 2000
