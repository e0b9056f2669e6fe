"""``twistd cserver``: the command line (:class:`Options`) and the service it makes."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.cred import strcred
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from cserver import __version__
from cserver.auth import allow_list_portal, describe_checkers, password_portal
from cserver.config import Config, option_help, option_parameters
from cserver.journal import FileJournal, make_syncer
from cserver.journal.stream_url import is_stream_url
from cserver.poll import lean_poll
from cserver.process import open_files_for, raise_open_file_limit, tune_interpreter
from cserver.server import CServerFactory, Limits
from cserver.service import CServerService
from cserver.startup import discard_journal, journal_errors, listen_now, take_journal_lock
from cserver.stream_service import StreamNodeService
from cserver.workers.parent import make_service as make_workers_service

__all__ = ["Options", "makeService"]

#: What Twisted puts before the message of a coercion that failed.
_COERCE_PREFIX = "Parameter type enforcement failed: "

log = Logger(namespace="cserver.tap")


class Options(usage.Options, strcred.AuthOptionMixin):
    """
    Options of ``twistd cserver``: :class:`cserver.config.Config`'s, made
    into :attr:`config` once parsed.

    :ivar config: the checked :class:`cserver.config.Config`, after parsing.
    """

    synopsis = "[options]"
    longdesc = (
        "An authenticated append-only message server: clients AUTH, then each "
        "MSG is appended to a JSON Lines journal and acknowledged once durable. "
        "Without --auth, AUTH <user> is accepted for the names in --users; with "
        "--auth, AUTH <user> <password> is checked against those checkers."
    )
    supportedInterfaces = (IUsernamePassword,)
    optParameters = option_parameters()
    config: Config

    def opt_auth(self, description: str) -> None:
        super().opt_auth(description)
        self.setdefault("auth", []).append(description)

    opt_auth.__doc__ = option_help("auth")

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"cserver {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse as :class:`twisted.python.usage.Options` does; under twistd, a
        bad option ends the process with one line saying what is wrong (exit
        status 1), rather than twistd's whole usage text above it.

        :raises twisted.python.usage.UsageError: a bad option, outside twistd.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            message = str(e)
            if message.startswith(_COERCE_PREFIX):
                message = message[len(_COERCE_PREFIX):]
            if self.parent is not None:
                if "not recognized" in message:
                    message += " (twistd cserver --help lists the options)"
                raise SystemExit(f"cserver: {message}") from None
            raise usage.UsageError(message) from None

    def postOptions(self) -> None:
        try:
            self.config = Config.from_options(self)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        for name, value in self.config.as_dict().items():
            if name not in ("users", "auth"):
                self[name.replace("_", "-")] = value
        self["users"] = ",".join(self.config.users)
        self["user_list"] = list(self.config.users)


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the server from parsed :class:`Options`: take the journal's lock,
    recover the journal, listen.  Whatever fails here ends the process with
    one line (:exc:`SystemExit`), before twistd daemonizes, and leaves
    nothing behind: no lock, no new journal file, no port.

    :param options: the parsed options.
    :param reactor: the reactor to run on (default: the global one).
    :returns: the server's service (with ``--metrics``, a
        :class:`cserver.metrics.ServerWithMetrics` around it).
    """
    if reactor is None:
        from twisted.internet import reactor
    config = options.config
    if config.poll == "lean":
        lean_poll(reactor)
    if config.workers > 1:
        raise_open_file_limit(config.max_connections + 64)
        supervisor = make_workers_service(config, reactor)
        if config.metrics is None:
            return supervisor
        from cserver.metrics import with_metrics, workers_registry

        return with_metrics(supervisor, reactor, config.metrics,
                            workers_registry(supervisor.shared))
    if is_stream_url(config.journal):
        return _stream_node(config, options.get("credCheckers"), reactor)
    lock = take_journal_lock(config.journal)
    try:
        service = _single_process(config, options.get("credCheckers"), reactor, lock)
    except BaseException:
        lock.release()
        raise
    tune_interpreter()
    return service


def _stream_node(config: Config, checkers: Any, reactor: Any) -> IService:
    """A node on a stream journal: it opens the stream once the reactor runs."""
    limits = Limits.from_config(config)
    open_files_for(limits.max_connections, log)
    portal = password_portal(checkers) if checkers else allow_list_portal(config.users)
    service = StreamNodeService(config, portal, reactor,
                                auth=describe_checkers(config.auth, config.users))
    tune_interpreter()
    return service


def _single_process(config: Config, checkers: Any, reactor: Any, lock: Any) -> IService:
    limits = Limits.from_config(config)
    open_files_for(limits.max_connections, log)
    with journal_errors(config.journal):
        journal = FileJournal.open(config.journal, reactor, fsync=config.fsync,
                                   syncer=make_syncer(config.sync, reactor))
    try:
        portal = password_portal(checkers) if checkers else allow_list_portal(config.users)
        factory = CServerFactory(journal, portal, reactor, limits)
        service: IService = CServerService(
            factory, serverFromString(reactor, config.port), reactor, exit_cleanly=True,
            eager=config.writes == "eager", lock=lock,
            auth=describe_checkers(config.auth, config.users),
        )
        listen_now(service, config.port, "--port")
        if config.metrics is not None:
            from cserver.metrics import server_registry, with_metrics

            service = with_metrics(service, reactor, config.metrics, server_registry(factory))
    except BaseException:
        discard_journal(journal)
        raise
    return service
