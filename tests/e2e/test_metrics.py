"""Tests for ``--metrics`` end to end: makeService on the real reactor (the
server and the metrics site listening for real), and a real ``twistd -n
cserver --metrics`` scraped over HTTP (one process, and ``--workers 2``).

End-to-end layer; the collectors, the fsync timing and the options are in
tests/unit/test_metrics.py."""

import re
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import MultiService

from cserver.service import CServerService
from cserver.tap import Options, makeService

from ..server_process import twistd_command

_METRICS_ON = re.compile(r"metrics on tcp:127\.0\.0\.1:(\d+)")


#: makeService tunes the interpreter for serving: put the test process back.
pytestmark = pytest.mark.usefixtures("restore_interpreter")


# -- makeService --------------------------------------------------------------------------

def test_make_service_with_metrics_runs_server_and_metrics_site(tmp_path):
    """With --metrics: a MultiService of the metrics site, then the unchanged server service."""
    options = Options()
    options.parseOptions(["--journal", str(tmp_path / "j"), "--users", "alice",
                          "--metrics", "tcp:0:interface=127.0.0.1"])
    service = makeService(options)
    try:
        assert isinstance(service, MultiService)
        assert list(service) == [service.metrics, service.server]
        assert isinstance(service.server, CServerService)
        assert service.server.exit_cleanly
        assert service.metrics.factory.resource.children[b"metrics"].registry is not None
    finally:
        service.server.factory.journal.close()


# -- end to end ---------------------------------------------------------------------------

def _metrics_port(process, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(process.output):
            match = _METRICS_ON.search(line)
            if match:
                return int(match.group(1))
        time.sleep(0.05)
    raise AssertionError("no 'metrics on' line:\n" + "".join(process.output))


def scrape(port):
    """The /metrics page parsed: {(name, sorted labels): value}, and the content type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        kind = response.headers["Content-Type"]
        text = response.read().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }, kind


@pytest.fixture
def server(server):
    """
    The real servers of conftest's ``server``, each serving ``--metrics`` on
    a free loopback port.
    """
    return lambda *args: server("--metrics", "tcp:0:interface=127.0.0.1", *args)


def test_twistd_serves_metrics_that_count_real_traffic(server):
    """A real twistd --metrics: after 3 acked MSGs and a failed AUTH, /metrics says so."""
    process = server()
    port = _metrics_port(process)
    before, kind = scrape(port)
    assert kind.startswith("text/plain")
    assert before[("cserver_messages_total", ())] == 0
    client = process.connect()
    assert client.request("AUTH mallory").startswith("ERR auth")
    assert client.request("AUTH alice") == "OK alice"
    for i in range(3):
        assert client.request(f"MSG m{i}").startswith("OK ")
    after, _ = scrape(port)
    assert after[("cserver_messages_total", ())] == 3
    assert after[("cserver_messages_served_total", ())] == 3
    assert after[("cserver_connections", ())] == 1
    assert after[("cserver_connections_peak", ())] == 1
    assert after[("cserver_inflight", ())] == 0
    assert after[("cserver_auth_failures_total", ())] == 1
    assert after[("cserver_journal_bytes", ())] > before[("cserver_journal_bytes", ())] > 0
    assert after[("cserver_journal_fsync_seconds_count", ())] >= 3
    assert ("process_resident_memory_bytes", ()) in after
    client.close()
    assert process.stop() == 0
    assert not any("Traceback" in line for line in process.output)


def test_twistd_workers_serve_totals_and_per_worker_metrics(server):
    """--workers 2 --metrics: the parent's /metrics has the sums and each worker's share."""
    process = server("--workers", "2")
    port = _metrics_port(process)
    sent = 0
    for i in range(10):
        client = process.connect()
        assert client.request("AUTH bob") == "OK bob"
        assert client.request(f"MSG w{i}").startswith("OK ")
        sent += 1
        client.close()
    deadline = time.monotonic() + 10
    while True:  # the workers publish their counters every 0.2 s
        got, _ = scrape(port)
        if got[("cserver_messages_served_total", ())] == sent or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert got[("cserver_messages_total", ())] == sent
    assert got[("cserver_messages_served_total", ())] == sent
    per_worker = [got[("cserver_worker_messages_served_total", (("worker", str(i)),))]
                  for i in range(2)]
    assert sum(per_worker) == sent
    assert got[("cserver_workers", ())] == 2
    assert got[("cserver_worker_up", (("worker", "0"),))] == 1
    assert got[("cserver_journal_bytes", ())] > 0
    assert process.stop() == 0


def test_twistd_with_a_busy_metrics_port_exits_before_the_start_record(tmp_path):
    """A --metrics port already in use: twistd exits 1 with one line naming the port and the
    option, and leaves no file behind (no journal, no lock)."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    journal = tmp_path / "j.jsonl"
    try:
        done = subprocess.run(
            twistd_command() + [
                "-n", "--pidfile=", "cserver", "--port", "tcp:0:interface=127.0.0.1",
                "--journal", str(journal),
                "--metrics", f"tcp:{port}:interface=127.0.0.1",
            ],
            cwd=tmp_path, capture_output=True, text=True, timeout=30,
        )
    finally:
        busy.close()
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (f"cserver: cannot listen on tcp:{port}:interface="
                           "127.0.0.1:backlog=4096 (--metrics): the address is already in use "
                           "(is another server running there?)\n")
    assert list(tmp_path.iterdir()) == []
