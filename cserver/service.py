"""The server as a twisted.application service: start and stop in order.

Start: journal the ``start`` record, then listen.  Stop (SIGTERM, SIGINT):
stop listening, answer every MSG in flight, journal the ``stop`` record,
close the journal.
"""

import signal

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from cserver import __version__


class CServerService(Service):
    """
    Runs one :class:`cserver.server.CServerFactory` on one endpoint.

    @ivar port: the listening port once started, else None.
    @ivar exit_cleanly: replace twistd's SIGTERM and SIGINT handlers, which
        make the process exit by the signal, with ones that stop the
        reactor so that a graceful stop exits with status 0.
    """

    log = Logger()

    def __init__(self, factory, endpoint, reactor, exit_cleanly=False):
        self.factory = factory
        self.endpoint = endpoint
        self.reactor = reactor
        self.exit_cleanly = exit_cleanly
        self.port = None
        self._listening = None

    def startService(self):
        super().startService()
        journal = self.factory.journal
        recovery = journal.recovery
        if recovery.torn_bytes:
            self.log.warn(
                "journal {path}: cut a torn tail of {count} bytes, saved in {side}",
                path=getattr(journal, "path", "-"),
                count=recovery.torn_bytes,
                side=recovery.torn_path,
            )
        self.factory.record_start()
        self._listening = self.endpoint.listen(self.factory)
        failures = []
        self._listening.addCallbacks(self._listened, failures.append)
        if failures:
            self.running = False
            failures[0].raiseException()
        if self.exit_cleanly:
            self.reactor.callWhenRunning(stop_cleanly_on_signals, self.reactor, self.log)

    def _listened(self, port):
        self.port = port
        journal = self.factory.journal
        self.log.info(
            "cserver {version} listening on {address}; journal {path} "
            "({records} records, last seq {seq})",
            version=__version__,
            address=_describe_address(port.getHost()),
            path=getattr(journal, "path", "-"),
            records=journal.recovery.records,
            seq=journal.recovery.last_seq,
        )
        return port

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None
        elif self._listening is not None:
            self._listening.cancel()
        yield self.factory.drain()
        yield self.factory.close_connections()
        try:
            yield self.factory.record_stop()
        except OSError as e:
            self.log.error("could not journal the stop record: {error}", error=e)
        self.factory.journal.close()
        self.log.info(
            "cserver stopped: served {served}, total {total}",
            served=self.factory.served,
            total=self.factory.total,
        )


def stop_cleanly_on_signals(reactor, log):
    """
    Make SIGTERM and SIGINT stop ``reactor`` (a graceful stop: the services'
    stopService run) and let the process exit with status 0.  twistd's own
    handlers make it exit by the signal instead.  A second signal while
    stopping is ignored.
    """

    def stop():
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    def handler(number, frame):
        log.info("received signal {number}, stopping", number=number)
        reactor.callFromThread(stop)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, handler)


def _describe_address(address):
    host = getattr(address, "host", None)
    if host is None:
        return f"unix:{getattr(address, 'name', '?')}"
    return f"{address.type.lower()}:{host}:{address.port}"
