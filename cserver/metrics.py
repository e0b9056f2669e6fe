"""``--metrics ENDPOINT``: the server's figures as Prometheus text at ``/metrics``.

Nothing here runs per message.  The collectors read the live counters when
Prometheus scrapes: :class:`ServerCollector` reads a
:class:`cserver.server.CServerFactory` (one process); :class:`WorkersCollector`
reads the shared memory of ``--workers N`` (the totals, and each worker's
figures labelled ``worker="0"`` .. ``worker="N-1"``).  The only timing on a
hot path is the fsync histogram: :func:`time_fsync` wraps a journal's
``_os_fdatasync`` on the instance (one ``perf_counter`` pair per fdatasync,
in the reactor thread or in the sync thread, as ``--sync`` has it;
prometheus_client's histogram is thread-safe).

The page is rendered by :class:`MetricsResource` on the reactor thread, so
the figures of one scrape are one consistent snapshot; it does not use
``prometheus_client.twisted`` (which imports the reactor when imported and
renders in a thread pool).  This module needs ``prometheus_client`` (the
``metrics`` extra); :mod:`cserver.tap` imports it only when ``--metrics`` is
given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from cserver.process import describe_address
from cserver.startup import listen_now

#: Upper bounds, in seconds, of the fsync latency histogram's buckets.
FSYNC_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
)


class ServerCollector:
    """
    The figures of one :class:`cserver.server.CServerFactory`, read at
    scrape time.
    """

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        f = self.factory
        yield CounterMetricFamily(
            "cserver_messages", "Message records in the journal, all time.", value=f.total)
        yield CounterMetricFamily(
            "cserver_messages_served", "Messages acknowledged since the server started.",
            value=f.served)
        yield GaugeMetricFamily("cserver_connections", "Connections open now.",
                                value=f.connections)
        yield GaugeMetricFamily("cserver_connections_peak",
                                "The most connections open at once since start.", value=f.peak)
        yield GaugeMetricFamily("cserver_inflight", "MSGs received and not yet answered.",
                                value=f.inflight)
        yield GaugeMetricFamily("cserver_inflight_peak",
                                "The most MSGs in flight at once since start.",
                                value=f.inflight_peak)
        yield CounterMetricFamily("cserver_auth_failures", "Failed AUTHs since start.",
                                  value=f.auth_failures)
        yield CounterMetricFamily(
            "cserver_duplicates",
            "PUTs answered OK <seq> dup since start: sent again, journaled once.",
            value=f.dedup.duplicates if f.dedup is not None else 0)
        yield CounterMetricFamily(
            "cserver_auth_throttled",
            "AUTHs refused unchecked since start: too many failures from the address.",
            value=f.auth_throttled)
        journal = f.journal
        if hasattr(journal, "size"):
            yield GaugeMetricFamily("cserver_journal_bytes", "The journal file's size in bytes.",
                                    value=journal.size)
        if hasattr(journal, "stats"):  # a stream journal (cserver.journal.jetstream)
            stats = journal.stats()
            yield GaugeMetricFamily("cserver_nats_connected",
                                    "1 while the stream journal's NATS connection is up.",
                                    value=1 if stats["nats"] == "up" else 0)
            yield CounterMetricFamily("cserver_nats_reconnects",
                                      "NATS connections made after the first, since start.",
                                      value=stats["nats_reconnects"])
            yield CounterMetricFamily(
                "cserver_republished",
                "Records published to the stream again after a failure, since start.",
                value=stats["republished"])


#: (metric suffix, shared slot field, kind, help) of the per-worker figures.
_WORKER_FIGURES = (
    ("messages_served", "served", "counter", "Messages acknowledged since the server started."),
    ("connections", "connections", "gauge", "Connections open now."),
    ("connections_peak", "peak", "gauge", "The most connections open at once since start."),
    ("inflight", "inflight", "gauge", "MSGs received and not yet answered."),
    ("inflight_peak", "inflight_peak", "gauge", "The most MSGs in flight at once since start."),
    ("auth_failures", "auth_failures", "counter", "Failed AUTHs since start."),
)


class WorkersCollector:
    """
    The figures of ``--workers N``, read from the shared memory
    (:class:`cserver.journal.header.Shared`) in the parent: ``cserver_*`` are the
    totals (the names a single process exports; the peaks are summed over
    the workers, an upper bound), ``cserver_worker_*{worker="i"}`` each
    worker's own.  The workers publish their counters every 0.2 s, so a
    scrape may lag that much.
    """

    def __init__(self, shared: Any) -> None:
        self.shared = shared

    def collect(self) -> Iterator[Metric]:
        shared = self.shared
        header = shared.header
        totals = shared.totals()
        slots = [shared.slot(index) for index in range(shared.workers)]
        yield CounterMetricFamily(
            "cserver_messages", "Message records in the journal, all time.",
            value=header.messages)
        yield GaugeMetricFamily("cserver_journal_bytes", "The journal file's size in bytes.",
                                value=header.end)
        yield GaugeMetricFamily("cserver_workers", "Worker processes running now.",
                                value=sum(1 for slot in slots if slot.pid))
        for suffix, field, kind, documentation in _WORKER_FIGURES:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"cserver_{suffix}", documentation + " Sum over the workers.",
                         value=totals[field])
            per_worker = family(f"cserver_worker_{suffix}", documentation + " One worker.",
                                labels=["worker"])
            for index, slot in enumerate(slots):
                per_worker.add_metric([str(index)], getattr(slot, field))
            yield per_worker
        up = GaugeMetricFamily("cserver_worker_up", "1 while the worker runs.",
                               labels=["worker"])
        for index, slot in enumerate(slots):
            up.add_metric([str(index)], 1 if slot.pid else 0)
        yield up


def fsync_histogram(registry: CollectorRegistry) -> Histogram:
    """
    The ``cserver_journal_fsync_seconds`` histogram, registered in ``registry``.
    """
    return Histogram(
        "cserver_journal_fsync_seconds", "Time each fdatasync of the journal took.",
        buckets=FSYNC_BUCKETS, registry=registry,
    )


def time_fsync(journal: Any, histogram: Histogram,
               clock: Callable[[], float] = time.perf_counter) -> bool:
    """
    Time every fdatasync of ``journal`` into ``histogram`` by wrapping the
    journal's ``_os_fdatasync`` attribute on the instance (the seam
    :class:`cserver.journal.FileJournal` keeps for tests).  A failed call is
    timed too.

    :returns: False, changing nothing, for a journal without that attribute
        (:class:`cserver.testing.MemoryJournal`), else True.
    """
    fdatasync = getattr(journal, "_os_fdatasync", None)
    if fdatasync is None:
        return False

    def timed_fdatasync(fd: int) -> None:
        start = clock()
        try:
            return fdatasync(fd)
        finally:
            histogram.observe(clock() - start)

    journal._os_fdatasync = timed_fdatasync
    return True


def server_registry(factory: Any, process: bool = True) -> CollectorRegistry:
    """
    A registry for one process: the factory's figures, the fsync histogram
    (wired to the factory's journal) and, with ``process``, the process's
    own (CPU, memory, open files).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(factory))
    time_fsync(factory.journal, fsync_histogram(registry))
    if process:
        ProcessCollector(registry=registry)
    return registry


def workers_registry(shared: Any, process: bool = True) -> CollectorRegistry:
    """
    A registry for the parent of ``--workers N``: the totals and per-worker
    figures, and, with ``process``, the parent process's own.  No fsync
    histogram: the workers do the fsyncs, in other processes.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkersCollector(shared))
    if process:
        ProcessCollector(registry=registry)
    return registry


class MetricsResource(Resource):
    """
    ``registry`` in the Prometheus text format, rendered on the reactor thread.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class _QuietSite(Site):
    """A site that keeps every scrape out of the log."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def metrics_site(registry: CollectorRegistry) -> Site:
    """
    The web site: ``/metrics`` (and ``/``) answer with ``registry``.
    """
    root = Resource()
    page = MetricsResource(registry)
    root.putChild(b"metrics", page)
    root.putChild(b"", page)
    return _QuietSite(root)


class MetricsService(StreamServerEndpointService):
    """
    Serves the metrics ``site`` (:func:`metrics_site`) on ``endpoint`` while
    running, and logs ``metrics on tcp:HOST:PORT`` once started and
    listening.  It can listen before it starts (:meth:`listen`); a port
    that cannot be bound then fails at once.
    """

    log = Logger(namespace="cserver.metrics")
    _raiseSynchronously = True

    def listen(self) -> None:
        """
        Listen now, before the service starts (see
        :meth:`cserver.service.CServerService.listen`).

        :raises Exception: what the endpoint's ``listen`` failed with, when it
            fails at once.
        """
        self.privilegedStartService()

    def privilegedStartService(self) -> None:
        # twistd calls this after makeService has had the service listen.
        if self._waitingForPort is None:
            super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.log.info("metrics on {address}", address=describe_address(port.getHost()))
        return port


class ServerWithMetrics(MultiService):
    """
    A server's service and its metrics site's: the site starts first and
    stops last (it answers while the server drains).

    :ivar server: the server's service.
    :ivar metrics: the :class:`MetricsService`.
    """

    def __init__(self, server: IService, metrics: MetricsService) -> None:
        super().__init__()
        self.server = server
        self.metrics = metrics
        metrics.setServiceParent(self)
        server.setServiceParent(self)


def with_metrics(server: IService, reactor: Any, description: str,
                 registry: CollectorRegistry) -> ServerWithMetrics:
    """
    ``server`` and, on the endpoint ``description``, the metrics site for
    ``registry``, listening already.

    :param server: a service with an ``abandon()``, given up when the site
        cannot listen.
    :raises SystemExit: the site cannot listen (one line naming ``--metrics``).
    """
    metrics = MetricsService(serverFromString(reactor, description), metrics_site(registry))
    try:
        listen_now(metrics, description, "--metrics")
    except BaseException:
        server.abandon()  # type: ignore[attr-defined]
        raise
    return ServerWithMetrics(server, metrics)
