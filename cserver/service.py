"""The server as a twisted.application service: start and stop in order.

Start: listen (``twistd cserver`` has it listen before it daemonizes, see
:meth:`CServerService.listen`), journal the ``start`` record; no connection
is served before the reactor runs, so the ``start`` record comes first.
Stop (SIGTERM, SIGINT): stop listening, answer every MSG in flight, journal
the ``stop`` record, close the journal, let go of the journal's lock.
Under systemd (``Type=notify``), ``READY=1`` goes out once the ``start``
record is durable and the port is listening, ``WATCHDOG=1`` while running,
``STOPPING=1`` when the stop begins (see :mod:`cserver.notify`).
SIGHUP reopens the journal at its path (log rotation).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cserver import __version__
from cserver.eager import eager_writes
from cserver.notify import Notifier
from cserver.process import describe_address, stop_cleanly_on_signals


class CServerService(Service):
    """
    Runs one :class:`cserver.server.CServerFactory` on one endpoint.

    :ivar port: the listening port once started, else None.
    :ivar exit_cleanly: replace twistd's SIGTERM and SIGINT handlers, which
        make the process exit by the signal, with ones that stop the
        reactor so that a graceful stop exits with status 0
        (:func:`cserver.process.stop_cleanly_on_signals`).
    :ivar notifier: a :class:`cserver.notify.Notifier` (default: one for
        this process's environment: silent unless ``$NOTIFY_SOCKET`` is set).
    :ivar eager: give a TCP port's connections eager writes
        (:mod:`cserver.eager`).
    :ivar lock: the journal's :class:`cserver.journal.lock.JournalLock`, released
        once the journal is closed at stop, or None.
    :ivar auth: how AUTH is checked, for the log at start, or None.
    """

    log = Logger()

    def __init__(self, factory: Any, endpoint: Any, reactor: Any, exit_cleanly: bool = False,
                 notifier: Notifier | None = None, eager: bool = False, lock: Any = None,
                 auth: str | None = None) -> None:
        self.factory = factory
        self.eager = eager
        self.lock = lock
        self.auth = auth
        self.notifier = Notifier() if notifier is None else notifier
        self.endpoint = endpoint
        self.reactor = reactor
        self.exit_cleanly = exit_cleanly
        self.port: Any = None
        self._listening: defer.Deferred[Any] | None = None
        self._announced = False

    def listen(self) -> None:
        """
        Listen on the endpoint now, before the service starts (``twistd
        cserver`` does so before it daemonizes, so that a port that cannot
        be had is reported where the server was started).

        :raises Exception: what the endpoint's ``listen`` failed with, when
            it fails at once.
        """
        failures: list[Failure] = []
        listening = self._listening = self.endpoint.listen(self.factory)
        listening.addCallbacks(self._listened, failures.append)
        if failures:
            self._listening = None
            failures[0].raiseException()

    def abandon(self) -> None:
        """
        Give up a service that will not be started: stop listening.
        """
        if self.port is not None:
            self.port.stopListening()
            self.port = None

    def startService(self) -> None:
        super().startService()
        if self.lock is not None:
            self.lock.write_pid()  # twistd forks to daemonize after makeService
        journal = self.factory.journal
        recovery = journal.recovery
        if recovery.torn_bytes:
            self.log.warn(
                "journal {path}: cut a torn tail of {count} bytes, saved in {side}",
                path=getattr(journal, "path", "-"),
                count=recovery.torn_bytes,
                side=recovery.torn_path,
            )
        if self._listening is None:
            try:
                self.listen()
            except BaseException:
                self.running = False
                raise
        started = self.factory.record_start()
        assert self._listening is not None
        # The Deferreds keep their own results (and errors): this only watches.
        defer.DeferredList([started, self._listening]).addCallback(self._ready)
        started.addErrback(log_start_not_journaled, self.log)
        self.notifier.start_watchdog(self.reactor)
        if self.exit_cleanly:
            self.reactor.callWhenRunning(stop_cleanly_on_signals, self.reactor, self.log,
                                         hangup=self.reopen_journal)
            # Once the signals are ours: a SIGHUP after this line reopens.
            self.reactor.callWhenRunning(self._log_listening)
        else:
            self._log_listening()

    def _listened(self, port):
        self.port = port
        if self.eager:
            eager_writes(port)
        half_closeable_tls(port)
        if self.running:
            self._log_listening()
        return port

    def _log_listening(self):
        if self.port is None or self._announced:
            return
        self._announced = True
        journal = self.factory.journal
        self.log.info(
            "cserver {version} listening on {address}; journal {path} "
            "({records} records, last seq {seq})",
            version=__version__,
            address=self.address(),
            path=getattr(journal, "path", None) or str(journal),
            records=journal.recovery.records,
            seq=journal.recovery.last_seq,
        )
        if getattr(journal.recovery, "checkpoint", 0):
            self.log.info("journal read from its checkpoint on, byte {offset}: the records "
                          "before it were read at an earlier start (cserver-journal verify "
                          "reads them all)", offset=journal.recovery.checkpoint)
        if self.auth:
            self.log.info("{auth}", auth=self.auth)

    def address(self) -> str:
        """
        Where the service listens: ``tcp:HOST:PORT``, ``ssl:HOST:PORT``,
        ``unix:PATH``.
        """
        return describe_address(self.port.getHost(), tls=is_tls(self.endpoint))

    def _ready(self, results):
        if not self.running or self.port is None or not all(ok for ok, _ in results):
            return
        journal = self.factory.journal
        self.notifier.ready(
            f"listening on {self.address()}; "
            f"{journal.recovery.records} records in the journal"
        )

    def reopen_journal(self) -> defer.Deferred:
        """
        Reopen the journal at its path (SIGHUP, ``systemctl reload``), for
        log rotation; see :meth:`cserver.journal.FileJournal.reopen`.  A
        failure is logged (by the journal too) and the server goes on with
        the old file.

        :returns: a Deferred that fires with the ``reopen`` record's seq, or
            None when nothing was reopened; it never fails.
        """
        reopen = getattr(self.factory.journal, "reopen", None)
        if reopen is None:
            self.log.warn("this journal cannot be reopened")
            return defer.succeed(None)

        def failed(failure):
            failure.trap(OSError)
            self.log.error("journal not reopened: {error}", error=failure.value)

        return defer.maybeDeferred(reopen).addErrback(failed)

    def _leave_checkpoint(self, journal: Any) -> None:
        """
        Once the journal closed cleanly, leave its checkpoint, so that the
        next start reads only what follows it; a checkpoint that cannot be
        written costs the next start a whole read, nothing more.
        """
        write = getattr(journal, "write_checkpoint", None)
        if write is None:
            return
        try:
            if write(dict(self.factory.users)):
                self.log.info("journal checkpoint left at byte {size}, seq {seq}",
                              size=journal.size, seq=journal.last_seq)
        except OSError as e:
            self.log.warn("journal checkpoint not written ({error}): the next start reads "
                          "the whole journal", error=e)

    @defer.inlineCallbacks
    def stopService(self) -> Generator[Any, Any, None]:
        super().stopService()
        self.notifier.stopping()
        self.notifier.stop_watchdog()
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
        journal = self.factory.journal
        journal.close()
        self._leave_checkpoint(journal)
        if self.lock is not None:
            self.lock.release()
        self.log.info(
            "cserver stopped: served {served}, total {total}",
            served=self.factory.served,
            total=self.factory.total,
        )


def log_start_not_journaled(failure: Failure, log: Logger) -> None:
    """
    The ``start`` record was refused (disk full, fsync failed): say so.  The
    server goes on listening; its MSGs get what the journal says (``ERR
    unavailable ...``), and READY=1 is not sent.

    :param failure: why, an :exc:`OSError` (anything else is passed on).
    :param log: where to say it.
    """
    failure.trap(OSError)
    log.critical("could not journal the start record: {error}", error=failure.value)


def is_tls(endpoint: object) -> bool:
    """
    :returns: whether ``endpoint`` listens with TLS (``ssl:``).
    """
    return type(endpoint).__name__ == "SSL4ServerEndpoint"


def half_closeable_tls(port: object) -> bool:
    """
    Let the TLS connections of ``port`` be half-closed (see :mod:`cserver.tls`);
    nothing for other ports or without the TLS libraries.

    :returns: whether ``port`` was changed.
    """
    try:
        from cserver.tls import half_closeable_tls as make_half_closeable
    except ImportError:
        return False
    return make_half_closeable(port)
