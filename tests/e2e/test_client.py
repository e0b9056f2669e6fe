"""End-to-end tests for cserver.client (.cli, .commands): a real ``twistd -n cserver``
child process on loopback, driven by the ``cserver-client`` command line in child
processes of its own (and once by run_session on the real reactor), and the import of
every module of cserver.client in a fresh interpreter.  The reply parsing, the client
protocol, connect() and the CLI sessions against scripted servers on a memory reactor
are tested in the unit layer, tests/unit/test_client.py."""

import io
import json
import signal
import socket
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer

from cserver.client.cli import build_parser
from cserver.client.commands import run_session
from cserver.client.protocol import CserverClientProtocol

from ..server_process import ServerProcess, read_journal

E2E_USER = "tester"


def test_module_does_not_import_the_global_reactor():
    """Importing cserver.client and every one of its modules installs no reactor."""
    code = ("import importlib, pkgutil, sys, cserver.client; "
            "names = [m.name for m in pkgutil.iter_modules(cserver.client.__path__)]; "
            "assert 'protocol' in names and 'child' in names, names; "
            "[importlib.import_module('cserver.client.' + name) for name in names]; "
            "assert 'twisted.internet.reactor' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def cli(*argv, timeout=120):
    """Run ``python -m cserver.client ARGV``; the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "cserver.client", *argv],
                          capture_output=True, text=True, timeout=timeout)


def bench_json(port, *argv):
    """Run ``cserver-client bench --json`` against ``port``: (exit status, report dict)."""
    done = cli("bench", "--port", str(port), "--user", E2E_USER, "--json", *argv)
    return done.returncode, json.loads(done.stdout.splitlines()[-1]), done.stderr


def start_server(directory, *args):
    return ServerProcess(directory, "--users", E2E_USER,
                         "--port", "tcp:0:interface=127.0.0.1:backlog=1024", *args).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real server for the end-to-end tests of this module."""
    proc = start_server(tmp_path_factory.mktemp("server"))
    yield proc
    proc.stop()


def test_e2e_send_prints_consecutive_seqs_and_stats(server):
    """``send A B`` prints two consecutive seqs; ``stats`` prints key=value lines."""
    done = cli("send", "--port", str(server.port), "--user", E2E_USER, "first", "second")
    assert done.returncode == 0, done.stderr
    first, second = (int(x) for x in done.stdout.split())
    assert second == first + 1
    done = cli("stats", "--endpoint", f"tcp:host=127.0.0.1:port={server.port}",
               "--user", E2E_USER)
    stats = dict(line.split("=", 1) for line in done.stdout.split())
    assert int(stats["total"]) >= 2 and stats["user"] == E2E_USER and stats["mine"] == "0"


def test_e2e_send_with_keys_journals_once_and_says_so(server):
    """``send --key K1 --key K2 A B`` prints two seqs; the same command again
    prints the same seqs (exit 0) and names each as a duplicate on stderr; a
    --key count that is not the TEXT count is a usage error (exit 2)."""
    argv = ("send", "--port", str(server.port), "--user", E2E_USER,
            "--key", "cli-k1", "--key", "cli-k2", "first", "second")
    done = cli(*argv)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    seqs = done.stdout.split()
    again = cli(*argv)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == seqs
    assert again.stderr.count("(a duplicate: journaled once)") == 2
    bad = cli("send", "--port", str(server.port), "--key", "only-one", "a", "b")
    assert bad.returncode == 2 and "give one --key per TEXT" in bad.stderr


def test_e2e_keyed_bench_journals_each_key_once(server):
    """``bench --keyed`` sends PUTs, each with a new key: every one is acked, and the
    journal holds each of its keys once (over two client processes too)."""
    before = {r.get("key") for r in read_journal(server.journal)}
    status, report, stderr = bench_json(server.port, "--keyed", "-c", "20", "-n", "15",
                                        "-d", "3", "-P", "2")
    assert status == 0 and report["acked"] == 300, stderr
    keys = [r["key"] for r in read_journal(server.journal)
            if r.get("key") and r["key"] not in before]
    assert len(keys) == len(set(keys)) == 300


def test_e2e_retrying_keyed_bench_reports_and_refuses_misuse(server):
    """``bench --keyed --retry`` sends every keyed message until acknowledged and
    reports acked, duplicates and resends; --retry without --keyed is a usage
    error (exit 2)."""
    done = cli("bench", "--port", str(server.port), "--user", E2E_USER, "--keyed", "--retry",
               "-c", "10", "-n", "20", "-d", "4", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert (report["ok"], report["messages"], report["acked"]) == (True, 200, 200)
    assert report["duplicates"] == 0 and report["resends"] == 0
    bad = cli("bench", "--port", str(server.port), "--retry")
    assert bad.returncode == 2 and "--retry needs --keyed" in bad.stderr


def test_e2e_unknown_user_fails_with_auth(server):
    """AUTH as a user the server does not know: exit 1 and the ERR auth on stderr."""
    done = cli("send", "--port", str(server.port), "--user", "nobody", "x")
    assert done.returncode == 1 and "ERR auth" in done.stderr and done.stdout == ""


def test_e2e_1000_concurrent_clients(server):
    """The proof: 1000 sessions open at once (the server's own peak says so), each
    sends one MSG; all 1000 are acked and the journal holds exactly those 1000
    records, with 1000 distinct seqs and the texts sent."""
    code, report, err = bench_json(server.port, "-c", "1000", "-n", "1", "--text", "proof")
    assert code == 0, err
    assert (report["connections"], report["acked"], report["errors"]) == (1000, 1000, {})
    assert report["peak"] >= 1000 and report["server_connections"] >= 1000
    records = [r for r in read_journal(server.journal)
               if r["event"] == "message" and r["text"].startswith("proof ")]
    assert len(records) == 1000 and len({r["seq"] for r in records}) == 1000
    assert {r["text"] for r in records} == {f"proof {c} 0" for c in range(1000)}
    assert {r["user"] for r in records} == {E2E_USER}


def test_e2e_pipelined_bench_over_two_processes(server):
    """--processes 2 -d 4: the children's sessions all pass one barrier and every MSG
    is acked; the merged report counts them all."""
    code, report, err = bench_json(server.port, "-c", "40", "-n", "10", "-d", "4",
                                   "--processes", "2")
    assert code == 0, err
    assert (report["processes"], report["acked"], report["errors"]) == (2, 400, {})
    assert report["server_connections"] == 40
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["max"]


def test_e2e_open_loop_rate(server):
    """--rate 200 --duration 0.5: 100 MSGs on schedule, all acked."""
    code, report, err = bench_json(server.port, "-c", "10", "--rate", "200",
                                   "--duration", "0.5")
    assert code == 0, err
    assert (report["messages"], report["acked"]) == (100, 100)
    assert report["messages_ms"] >= 400


def test_e2e_nothing_listening_is_reported_as_refused():
    """Against a port nobody listens on, bench exits 1 at once and says refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, report, err = bench_json(port, "-c", "20")
    assert code == 1 and report["errors"] == {"refused": 20}
    assert "could not open 20 sessions" in err and "refused" in err


def test_e2e_requests_overlap_under_work_delay(tmp_path):
    """With --work-delay 1 each MSG takes 1 s in the server, yet 1000 clients are all
    acked in well under 5 s, and the server saw all 1000 in service at once."""
    proc = start_server(tmp_path, "--work-delay", "1")
    try:
        code, report, err = bench_json(proc.port, "-c", "1000", "-n", "1")
        assert code == 0, err
        assert report["acked"] == 1000 and report["messages_ms"] < 5000
        done = cli("stats", "--port", str(proc.port), "--user", E2E_USER)
        stats = dict(line.split("=", 1) for line in done.stdout.split())
        assert int(stats["inflight_peak"]) == 1000
    finally:
        proc.stop()


@pytest_twisted.ensureDeferred
async def test_e2e_send_exits_0_when_the_server_is_stopped_before_quit(tmp_path, monkeypatch,
                                                                       capsys):
    """A real server acks both MSGs and is then stopped gracefully (SIGTERM) before it
    answers QUIT: ``send`` prints both seqs and exits 0 with nothing on stderr, and
    both messages are in the journal."""
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread

    proc = start_server(tmp_path)
    original = CserverClientProtocol.quit
    stopped = []

    @defer.inlineCallbacks
    def quit_once_the_server_has_stopped(self):
        proc.process.send_signal(signal.SIGTERM)
        stopped.append(True)
        yield self.closed  # the server closes the connection as it stops
        return (yield original(self))

    monkeypatch.setattr(CserverClientProtocol, "quit", quit_once_the_server_has_stopped)
    try:
        args = build_parser().parse_args(
            ["send", "--port", str(proc.port), "--user", E2E_USER, "--timeout", "20",
             "first", "second"])
        out = io.StringIO()
        code = await run_session(reactor, args, out)
        assert await deferToThread(proc.stop) == 0
    finally:
        if proc.process.poll() is None:
            proc.kill()
    assert stopped == [True]
    assert (code, capsys.readouterr().err) == (0, "")
    seqs = [int(line) for line in out.getvalue().splitlines()]
    journaled = {r["seq"]: r["text"] for r in read_journal(proc.journal)
                 if r["event"] == "message"}
    assert [journaled[seq] for seq in seqs] == ["first", "second"]
