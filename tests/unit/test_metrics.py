"""Tests for ``--metrics``: the collectors, the fsync timing, and the options.

Unit layer: StringTransport connections on a task.Clock, files in temporary
directories; a real ``twistd -n cserver --metrics`` scraped over HTTP, and
makeService listening for real, are in tests/e2e/test_metrics.py."""

import pathlib
import sys

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from cserver.journal import FileJournal
from cserver.journal.header import Shared
from cserver.metrics import (
    ServerCollector,
    WorkersCollector,
    fsync_histogram,
    server_registry,
    time_fsync,
)
from cserver.tap import Options
from cserver.testing import MemoryJournal

from ..common import connect, make_factory, replies, send
from .base import Temporary


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

class ServerCollectorTests(SynchronousTestCase):
    """The single-process collector."""

    def test_server_collector_exports_the_factory_counters(self):
        """Each factory counter comes out as its own sample, with the value the factory
        holds."""
        factory = make_factory()
        factory.total, factory.served = 41, 7
        factory.connections, factory.peak = 3, 9
        factory.inflight, factory.inflight_peak = 2, 5
        factory.auth_failures, factory.throttle.refused = 4, 1
        factory.dedup.duplicates = 6
        factory.journal.size = 12345
        assert samples(registry_of(ServerCollector(factory))) == {
            ("cserver_messages_total", ()): 41,
            ("cserver_messages_served_total", ()): 7,
            ("cserver_connections", ()): 3,
            ("cserver_connections_peak", ()): 9,
            ("cserver_inflight", ()): 2,
            ("cserver_inflight_peak", ()): 5,
            ("cserver_auth_failures_total", ()): 4,
            ("cserver_duplicates_total", ()): 6,
            ("cserver_auth_throttled_total", ()): 1,
            ("cserver_journal_bytes", ()): 12345,
        }

    def test_server_collector_reads_live_figures_at_each_scrape(self):
        """Traffic after the registry is made shows up in the next scrape (nothing is
        cached)."""
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


class FsyncTimingTests(Temporary, SynchronousTestCase):
    """time_fsync, and server_registry's fsync histogram."""

    def test_time_fsync_observes_each_fdatasync(self):
        """The wrapped fdatasync still runs, and each call adds its duration to the
        histogram."""
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
        # pytest.approx's default tolerance: a millionth of the value.
        self.assertAlmostEqual(get("cserver_journal_fsync_seconds_sum"), 0.502,
                               delta=0.502e-6)
        assert get("cserver_journal_fsync_seconds_bucket", {"le": "0.0025"}) == 1
        assert get("cserver_journal_fsync_seconds_bucket", {"le": "0.5"}) == 2

    def test_time_fsync_times_a_failed_call_and_reraises(self):
        """An fdatasync that fails is counted, and its error still reaches the journal."""
        registry = CollectorRegistry()
        journal = _FakeJournal(fail=True)
        time_fsync(journal, fsync_histogram(registry))
        with self.assertRaises(OSError):
            journal._os_fdatasync(3)
        assert registry.get_sample_value("cserver_journal_fsync_seconds_count") == 1

    def test_time_fsync_leaves_a_memory_journal_alone(self):
        """A journal without _os_fdatasync (MemoryJournal) is not touched."""
        journal = MemoryJournal(Clock())
        assert time_fsync(journal, fsync_histogram(CollectorRegistry())) is False
        assert "_os_fdatasync" not in vars(journal)

    def test_server_registry_times_a_file_journal_fsyncs(self):
        """With a real FileJournal, each acked MSG's fdatasync lands in the histogram."""
        tmp_path = pathlib.Path(self.temp_dir())
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

class WorkersCollectorTests(SynchronousTestCase):
    """The --workers collector."""

    def test_workers_collector_exports_totals_and_each_worker(self):
        """From the shared memory: the sums unlabelled, each worker's figures with
        worker="i"."""
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


# -- options ------------------------------------------------------------------------------

class MetricsOptionsTests(Temporary, SynchronousTestCase):
    """The --metrics option."""

    def test_metrics_is_off_by_default(self):
        """Without --metrics nothing is served and makeService's result is the server
        itself."""
        options = Options()
        options.parseOptions([])
        assert options["metrics"] is None

    def test_metrics_without_prometheus_client_names_the_extra(self):
        """--metrics with prometheus_client missing is a usage error naming the metrics
        extra."""
        missing = object()
        before = sys.modules.get("prometheus_client", missing)

        def restore():
            if before is missing:
                sys.modules.pop("prometheus_client", None)
            else:
                sys.modules["prometheus_client"] = before

        self.addCleanup(restore)
        sys.modules["prometheus_client"] = None
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--metrics", "tcp:0"])
        self.assertRegex(str(caught.exception), r"cserver\[metrics\]")

    def test_a_bad_metrics_endpoint_is_refused_with_the_options(self):
        """A --metrics description that is no endpoint is refused when the options are parsed,
        naming the option, before anything is opened."""
        tmp_path = pathlib.Path(self.temp_dir())
        options = Options()
        with self.assertRaises(UsageError) as caught:
            options.parseOptions(["--journal", str(tmp_path / "j"), "--metrics", "nonsense:1"])
        self.assertRegex(str(caught.exception),
                         "^--metrics 'nonsense:1' is not a server endpoint")
        assert list(tmp_path.iterdir()) == []
