"""A cserver node whose journal is a JetStream stream (``--journal
nats://...``): the stream is opened once the reactor runs (reaching NATS
takes the network), and only then does the node listen and serve.  A stream
that cannot be had ends the process with one line and exit status 1.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cserver.journal.stream_open import StreamRefused, open_stream
from cserver.journal.stream_url import parse_stream_url
from cserver.server import CServerFactory, Limits
from cserver.service import CServerService


def _exit_with(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class StreamNodeService(MultiService):
    """
    Opens the stream, then runs the :class:`cserver.service.CServerService`
    on it (a child, once the stream is ready).

    :param open_journal: ``open_journal(url, reactor, node=..., replicas=...,
        dedup_window=..., deadline=...)`` gives a Deferred of the journal
        (:func:`cserver.journal.stream_open.open_stream`; tests hand in
        another).
    :ivar server: the CServerService once started, else None.
    """

    log = Logger(namespace="cserver.stream")

    def __init__(self, config: Any, portal: Any, reactor: Any, auth: str | None = None,
                 open_journal: Any = open_stream, exit: Any = _exit_with) -> None:
        super().__init__()
        self.config = config
        self.url = parse_stream_url(config.journal)
        self.portal = portal
        self.reactor = reactor
        self.auth = auth
        self._open_journal = open_journal
        self._exit = exit
        self._opening: Any = None
        self.server: CServerService | None = None
        self._watch: LoopingCall | None = None
        self._connected = False

    def startService(self) -> None:
        super().startService()
        config = self.config
        self.log.info("opening stream {url} as node {node}", url=str(self.url), node=config.node)
        self._opening = self._open_journal(
            self.url, self.reactor, node=config.node, replicas=config.nats_replicas,
            dedup_window=config.dedup_window, deadline=config.nats_deadline,
            ca=config.nats_ca)
        self._opening.addCallbacks(self._opened, self._refused)

    def _opened(self, journal: Any) -> None:
        self._opening = None
        config = self.config
        if not self.running:
            journal.close()
            return
        factory = CServerFactory(journal, self.portal, self.reactor, Limits.from_config(config))
        server = CServerService(factory, serverFromString(self.reactor, config.port),
                                self.reactor, exit_cleanly=True, eager=config.writes == "eager",
                                auth=self.auth)
        try:
            server.listen()
        except Exception as e:
            journal.close()
            self._fail(f"cannot listen on --port {config.port}: {e}")
            return
        self.server = server
        server.setServiceParent(self)
        if config.metrics is not None:
            self._serve_metrics(factory)
        self._connected = journal.connected
        self._watch = LoopingCall(self._watch_connection, server, journal)
        self._watch.clock = self.reactor
        self._watch.start(1.0, now=False)

    def _serve_metrics(self, factory: CServerFactory) -> None:
        """``--metrics``: the site, once the factory exists (after the stream)."""
        from cserver.metrics import MetricsService, metrics_site, server_registry

        site = MetricsService(serverFromString(self.reactor, self.config.metrics),
                              metrics_site(server_registry(factory)))
        try:
            site.listen()
        except Exception as e:
            self._fail(f"cannot listen on --metrics {self.config.metrics}: {e}")
            return
        site.setServiceParent(self)

    def _watch_connection(self, server: CServerService, journal: Any) -> None:
        """Tell systemd (STATUS=) when the NATS connection goes or comes back."""
        connected = journal.connected
        if connected != self._connected:
            self._connected = connected
            server.notifier.status(journal.status())

    def _refused(self, failure: Failure) -> None:
        self._opening = None
        if not self.running:
            return
        if failure.check(StreamRefused):
            self._fail(str(failure.value))
        else:
            self.log.failure("opening the stream failed", failure)
            self._fail(f"cannot open stream {self.url}: {failure.getErrorMessage()}")

    def _fail(self, why: str) -> None:
        """End the process: one line, exit status 1."""
        self.log.critical("cserver: {why}", why=why)
        self.reactor.addSystemEventTrigger("after", "shutdown", self._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Any:
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        opening, self._opening = self._opening, None
        stopped = super().stopService()
        if opening is not None:
            opening.cancel()  # _refused sees the service stopped: nothing to say
        return stopped
