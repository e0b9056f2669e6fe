"""Tests for ``--metrics``: the collectors, the fsync timing, the options and
service wiring, and end to end a real ``twistd -n cserver --metrics`` scraped
over HTTP (one process, and ``--workers 2``)."""

import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import MultiService
from twisted.internet.task import Clock
from twisted.python.usage import UsageError

from cserver.journal import FileJournal, MemoryJournal
from cserver.metrics import (
    ServerCollector,
    WorkersCollector,
    fsync_histogram,
    server_registry,
    time_fsync,
)
from cserver.service import CServerService
from cserver.shared import Shared
from cserver.tap import Options, makeService

from .common import connect, make_factory, replies, send
from .server_process import twistd_command

_METRICS_ON = re.compile(r"metrics on tcp:127\.0\.0\.1:(\d+)")


#: makeService tunes the interpreter for serving: put the test process back.
pytestmark = pytest.mark.usefixtures("restore_interpreter")


def registry_of(collector):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def samples(registry):
    """Every sample of ``registry`` as {(name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


# -- the single-process collector ---------------------------------------------------------

def test_server_collector_exports_the_factory_counters():
    """Each factory counter comes out as its own sample, with the value the factory holds."""
    factory = make_factory()
    factory.total, factory.served = 41, 7
    factory.connections, factory.peak = 3, 9
    factory.inflight, factory.inflight_peak = 2, 5
    factory.auth_failures, factory.throttle.refused = 4, 1
    factory.journal.size = 12345
    assert samples(registry_of(ServerCollector(factory))) == {
        ("cserver_messages_total", ()): 41,
        ("cserver_messages_served_total", ()): 7,
        ("cserver_connections", ()): 3,
        ("cserver_connections_peak", ()): 9,
        ("cserver_inflight", ()): 2,
        ("cserver_inflight_peak", ()): 5,
        ("cserver_auth_failures_total", ()): 4,
        ("cserver_auth_throttled_total", ()): 1,
        ("cserver_journal_bytes", ()): 12345,
    }


def test_server_collector_reads_live_figures_at_each_scrape():
    """Traffic after the registry is made shows up in the next scrape (nothing is cached)."""
    clock = Clock()
    factory = make_factory(clock=clock)
    registry = registry_of(ServerCollector(factory))
    assert registry.get_sample_value("cserver_messages_total") == 0
    protocol, transport = connect(factory)
    send(protocol, "AUTH mallory", "AUTH alice", "MSG one", "MSG two")
    clock.advance(0)
    assert [line.split()[0] for line in replies(transport)[-2:]] == ["OK", "OK"]
    assert registry.get_sample_value("cserver_messages_total") == 2
    assert registry.get_sample_value("cserver_messages_served_total") == 2
    assert registry.get_sample_value("cserver_connections") == 1
    assert registry.get_sample_value("cserver_auth_failures_total") == 1
    assert registry.get_sample_value("cserver_journal_bytes") == factory.journal.size > 0


# -- fsync timing -------------------------------------------------------------------------

class _FakeJournal:
    def __init__(self, fail=False):
        self.calls = []
        self.fail = fail

    def _os_fdatasync(self, fd):
        self.calls.append(fd)
        if self.fail:
            raise OSError(5, "Input/output error")


def test_time_fsync_observes_each_fdatasync():
    """The wrapped fdatasync still runs, and each call adds its duration to the histogram."""
    registry = CollectorRegistry()
    histogram = fsync_histogram(registry)
    journal = _FakeJournal()
    ticks = iter([10.0, 10.002, 20.0, 20.5])
    assert time_fsync(journal, histogram, clock=lambda: next(ticks))
    journal._os_fdatasync(7)
    journal._os_fdatasync(7)
    assert journal.calls == [7, 7]
    get = registry.get_sample_value
    assert get("cserver_journal_fsync_seconds_count") == 2
    assert get("cserver_journal_fsync_seconds_sum") == pytest.approx(0.502)
    assert get("cserver_journal_fsync_seconds_bucket", {"le": "0.0025"}) == 1
    assert get("cserver_journal_fsync_seconds_bucket", {"le": "0.5"}) == 2


def test_time_fsync_times_a_failed_call_and_reraises():
    """An fdatasync that fails is counted, and its error still reaches the journal."""
    registry = CollectorRegistry()
    journal = _FakeJournal(fail=True)
    time_fsync(journal, fsync_histogram(registry))
    with pytest.raises(OSError):
        journal._os_fdatasync(3)
    assert registry.get_sample_value("cserver_journal_fsync_seconds_count") == 1


def test_time_fsync_leaves_a_memory_journal_alone():
    """A journal without _os_fdatasync (MemoryJournal) is not touched."""
    journal = MemoryJournal(Clock())
    assert time_fsync(journal, fsync_histogram(CollectorRegistry())) is False
    assert "_os_fdatasync" not in vars(journal)


def test_server_registry_times_a_file_journal_fsyncs(tmp_path):
    """With a real FileJournal, each acked MSG's fdatasync lands in the histogram."""
    clock = Clock()
    journal = FileJournal.open(str(tmp_path / "j.jsonl"), clock)
    try:
        factory = make_factory(clock=clock, journal=journal)
        registry = server_registry(factory, process=False)
        protocol, transport = connect(factory)
        send(protocol, "AUTH alice", "MSG one")
        clock.advance(0)
        assert replies(transport)[-1] == "OK 1"
        assert registry.get_sample_value("cserver_journal_fsync_seconds_count") >= 1
        assert registry.get_sample_value("cserver_journal_bytes") == (
            (tmp_path / "j.jsonl").stat().st_size)
    finally:
        journal.close()


# -- the --workers collector --------------------------------------------------------------

def test_workers_collector_exports_totals_and_each_worker():
    """From the shared memory: the sums unlabelled, each worker's figures with worker="i"."""
    shared = Shared.create(2)
    try:
        shared.header.messages, shared.header.end = 30, 4096
        first, second = shared.slot(0), shared.slot(1)
        first.pid, first.served, first.connections, first.auth_failures = 100, 5, 2, 1
        second.pid, second.served, second.connections, second.peak = 0, 8, 0, 4
        got = samples(registry_of(WorkersCollector(shared)))
    finally:
        shared.close()
    assert got[("cserver_messages_total", ())] == 30
    assert got[("cserver_journal_bytes", ())] == 4096
    assert got[("cserver_workers", ())] == 1
    assert got[("cserver_messages_served_total", ())] == 13
    assert got[("cserver_worker_messages_served_total", (("worker", "0"),))] == 5
    assert got[("cserver_worker_messages_served_total", (("worker", "1"),))] == 8
    assert got[("cserver_connections", ())] == 2
    assert got[("cserver_worker_connections_peak", (("worker", "1"),))] == 4
    assert got[("cserver_auth_failures_total", ())] == 1
    assert got[("cserver_worker_up", (("worker", "0"),))] == 1
    assert got[("cserver_worker_up", (("worker", "1"),))] == 0


# -- options and makeService --------------------------------------------------------------

def test_metrics_is_off_by_default():
    """Without --metrics nothing is served and makeService's result is the server itself."""
    options = Options()
    options.parseOptions([])
    assert options["metrics"] is None


def test_metrics_without_prometheus_client_names_the_extra(monkeypatch):
    """--metrics with prometheus_client missing is a usage error naming the metrics extra."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(UsageError, match=r"cserver\[metrics\]"):
        Options().parseOptions(["--metrics", "tcp:0"])


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
        assert service.metrics.site.resource.children[b"metrics"].registry is not None
    finally:
        service.server.factory.journal.close()


def test_a_bad_metrics_endpoint_is_refused_with_the_options(tmp_path):
    """A --metrics description that is no endpoint is refused when the options are parsed,
    naming the option, before anything is opened."""
    options = Options()
    with pytest.raises(UsageError, match="^--metrics 'nonsense:1' is not a server endpoint"):
        options.parseOptions(["--journal", str(tmp_path / "j"), "--metrics", "nonsense:1"])
    assert list(tmp_path.iterdir()) == []


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
