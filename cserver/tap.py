"""``twistd cserver``: the command-line options and the service they make."""

import gc
import getpass
import os
import resource
import sys

from twisted.cred import strcred
from twisted.cred.credentials import IUsernamePassword
from twisted.python import usage

from cserver.endpoints import BACKLOG, check_server, with_backlog
from cserver.journal import FSYNC_MODES

__all__ = ["BACKLOG", "Options", "makeService", "with_backlog"]

DEFAULT_PORT = "tcp:31337:interface=127.0.0.1"
#: The --writes modes: see cserver.eager.
WRITE_MODES = ("eager", "queued")
#: The --sync modes: see make_syncer.
SYNC_MODES = ("auto", "reactor", "thread")
#: What Twisted puts before the message of a coercion that failed.
_COERCE_PREFIX = "Parameter type enforcement failed: "


def _number(option, kind, least, unit=""):
    """
    A coercer for ``option``: a number of ``kind`` (int or float), at least
    ``least``; its errors name the option.
    """

    def coerce(value):
        try:
            number = kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"{option} must be {what}, not {value!r}") from None
        if not number >= least:
            raise ValueError(f"{option} must be at least {least:g}{unit}, not {value}")
        return number

    what = "A whole number" if kind is int else "Seconds" if unit else "A number"
    coerce.coerceDoc = f"{what}, {least:g} or more."
    return coerce


class Options(usage.Options, strcred.AuthOptionMixin):
    """
    Options of ``twistd cserver``.
    """

    synopsis = "[options]"
    longdesc = (
        "An authenticated append-only message server: clients AUTH, then each "
        "MSG is appended to a JSON Lines journal and acknowledged once durable. "
        "Without --auth, AUTH <user> is accepted for the names in --users; with "
        "--auth, AUTH <user> <password> is checked against those checkers."
    )
    supportedInterfaces = (IUsernamePassword,)

    optParameters = [
        ["port", "p", DEFAULT_PORT, "Endpoint description to listen on (a bare number N "
         "means tcp:N:interface=127.0.0.1)."],
        ["journal", "j", "cserver.jsonl", "The journal file (JSON Lines, append-only)."],
        ["fsync", None, "always", f"When to fsync the journal: {', '.join(FSYNC_MODES)}."],
        ["sync", None, "auto", "Where the journal is fdatasync'd (--fsync always): reactor "
         "(in the reactor thread, at the end of the turn that wrote the batch), thread (in "
         "a thread of its own, so that a slow disk does not hold up the reactor) or auto "
         "(in the reactor while syncs take under 2 ms on average, else in the thread)."],
        ["writes", None, "eager", "How replies are written: eager (sent at once when "
         "nothing is queued ahead) or queued (Twisted's default: sent when the reactor "
         "next finds the socket writable)."],
        ["users", "u", None, "Comma-separated user names AUTH accepts without --auth "
         "(default: the account running the server)."],
        ["max-connections", None, 10000, "Connections open at once.",
         _number("--max-connections", int, 1)],
        ["idle-timeout", None, 300.0, "Seconds without a request before a "
         "connection is closed (0: never).", _number("--idle-timeout", float, 0, " s")],
        ["auth-timeout", None, 30.0, "Seconds a connection has to authenticate "
         "(0: no limit).", _number("--auth-timeout", float, 0, " s")],
        ["max-line", None, 65536, "The longest request line, in bytes.",
         _number("--max-line", int, 1)],
        ["work-delay", None, 0.0, "Seconds each MSG waits before it is journaled "
         "(to show requests overlapping).", _number("--work-delay", float, 0, " s")],
        ["auth-throttle", None, 5, "Failed AUTHs in a row from one address after which "
         "its AUTHs are refused for 60 s (0: no limit).", _number("--auth-throttle", int, 0)],
        ["workers", None, 1, "Server processes (1: one process; N > 1: a parent and N "
         "workers sharing one tcp port and the journal).", _number("--workers", int, 1)],
        ["restart-delay", None, 0.5, "With --workers: seconds before a dead worker is "
         "restarted; doubled for each death within 10 s of its start.",
         _number("--restart-delay", float, 0, " s")],
        ["restart-max-delay", None, 30.0, "With --workers: the longest wait before a "
         "restart.", _number("--restart-max-delay", float, 0, " s")],
        ["metrics", None, None, "Endpoint description to serve Prometheus metrics on, at "
         "/metrics (e.g. tcp:9100:interface=127.0.0.1; needs the metrics extra). "
         "Default: none."],
    ]

    def opt_auth(self, description):
        super().opt_auth(description)
        # The workers (--workers N) rebuild the checkers from the descriptions.
        self.setdefault("auth_descriptions", []).append(description)

    opt_auth.__doc__ = strcred.AuthOptionMixin.opt_auth.__doc__

    def opt_version(self):
        """
        Print the version and exit.
        """
        from cserver import __version__

        print(f"cserver {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options=None):
        """
        Parse as usage.Options does; under twistd, a bad option ends the
        process with one line saying what is wrong (exit status 1), rather
        than twistd's whole usage text above it.
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

    def postOptions(self):
        if self["fsync"] not in FSYNC_MODES:
            raise usage.UsageError(
                f"--fsync must be one of {', '.join(FSYNC_MODES)}, not {self['fsync']!r}"
            )
        if self["sync"] not in SYNC_MODES:
            raise usage.UsageError(
                f"--sync must be one of {', '.join(SYNC_MODES)}, not {self['sync']!r}"
            )
        if self["writes"] not in WRITE_MODES:
            raise usage.UsageError(
                f"--writes must be one of {', '.join(WRITE_MODES)}, not {self['writes']!r}"
            )
        if self["users"] is None:
            self["users"] = getpass.getuser()
        users = [name.strip() for name in self["users"].split(",") if name.strip()]
        if not users and not self.get("credCheckers"):
            raise usage.UsageError("--users names nobody: no one could authenticate")
        self["user_list"] = users
        try:
            self["port"] = check_server(self["port"], "--port")
            if self["metrics"] is not None:
                self["metrics"] = check_server(self["metrics"], "--metrics")
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if not self["journal"] or os.path.isdir(self["journal"]):
            raise usage.UsageError(f"--journal must name a file, not {self['journal']!r}")
        if self["workers"] > 1 and self["port"].split(":", 1)[0] not in ("tcp", "tcp6"):
            raise usage.UsageError("--workers needs a tcp: or tcp6: --port (each worker "
                                   "gets its own SO_REUSEPORT socket)")
        if self["restart-max-delay"] < self["restart-delay"]:
            raise usage.UsageError("--restart-max-delay must be at least --restart-delay")
        if self["metrics"] is not None:
            try:
                import prometheus_client  # noqa: F401
            except ImportError:
                raise usage.UsageError(
                    "--metrics needs prometheus_client: pip install 'cserver[metrics]'"
                ) from None


def raise_open_file_limit(wanted):
    """
    Raise the soft open-file limit toward ``wanted`` (as far as the hard
    limit allows); return the soft limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def makeService(config, reactor=None):
    """
    Build the server from parsed :class:`Options`: take the journal's lock,
    recover the journal, listen.  Whatever fails here ends the process with
    one line (``SystemExit``), before twistd daemonizes, and leaves nothing
    behind: no lock, no new journal file, no port.

    @param reactor: the reactor to run on (default: the global one).
    """
    if reactor is None:
        from twisted.internet import reactor
    if config.get("workers", 1) > 1:
        from cserver.workers import make_service

        raise_open_file_limit(config["max-connections"] + 64)
        supervisor = make_service(config, reactor)
        if config.get("metrics") is None:
            return supervisor
        from cserver.metrics import workers_registry

        try:
            return with_metrics(supervisor, reactor, config["metrics"],
                                workers_registry(supervisor.shared))
        except BaseException:
            supervisor.abandon()
            raise
    lock = take_journal_lock(config["journal"])
    try:
        return _single_process(config, reactor, lock)
    except BaseException:
        lock.release()
        raise


def _single_process(config, reactor, lock):
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import Logger

    from cserver.auth import allow_list_portal, describe_checkers, password_portal
    from cserver.journal import FileJournal
    from cserver.recovery import JournalDamaged
    from cserver.server import CServerFactory, Limits
    from cserver.service import CServerService

    log = Logger(namespace="cserver.tap")
    limits = Limits(
        max_connections=config["max-connections"],
        idle_timeout=config["idle-timeout"],
        auth_timeout=config["auth-timeout"],
        max_line=config["max-line"],
        work_delay=config["work-delay"],
        auth_throttle=config["auth-throttle"],
    )
    files = raise_open_file_limit(limits.max_connections + 64)
    if files < limits.max_connections + 64:
        log.warn(
            "the open-file limit is {files}: fewer than --max-connections={wanted} "
            "connections can be open at once (raise the hard limit: ulimit -Hn)",
            files=files,
            wanted=limits.max_connections,
        )
    try:
        journal = FileJournal.open(
            config["journal"],
            reactor,
            fsync=config["fsync"],
            syncer=make_syncer(config["sync"], reactor),
        )
    except JournalDamaged as e:
        raise SystemExit(f"cserver: {e}") from None
    except OSError as e:
        raise SystemExit(f"cserver: cannot open journal {config['journal']}: "
                         f"{e.strerror or e}") from None
    try:
        if config.get("credCheckers"):
            portal = password_portal(config.get("credCheckers"))
        else:
            portal = allow_list_portal(config["user_list"])
        factory = CServerFactory(journal, portal, reactor, limits)
        endpoint = serverFromString(reactor, config["port"])
        service = CServerService(
            factory, endpoint, reactor, exit_cleanly=True, eager=config["writes"] == "eager",
            lock=lock,
            auth=describe_checkers(config.get("auth_descriptions"), config["user_list"]),
        )
        listen_now(service, config["port"], "--port")
        if config.get("metrics") is not None:
            from cserver.metrics import server_registry

            try:
                service = with_metrics(service, reactor, config["metrics"],
                                       server_registry(factory))
            except BaseException:
                service.abandon()
                raise
    except BaseException:
        discard_journal(journal)
        raise
    tune_interpreter()
    return service


def take_journal_lock(path):
    """
    The journal's :class:`cserver.lock.JournalLock`; a second server on the
    journal ends here, in one line, having touched nothing.
    """
    from cserver.lock import JournalInUse, JournalLock

    try:
        return JournalLock.acquire(path)
    except JournalInUse as e:
        raise SystemExit(f"cserver: {e}") from None
    except OSError as e:
        where = os.path.dirname(os.path.abspath(path))
        if isinstance(e, FileNotFoundError) and not os.path.isdir(where):
            raise SystemExit(f"cserver: cannot open journal {path}: the directory {where} "
                             "does not exist") from None
        raise SystemExit(f"cserver: cannot lock journal {path}: {e.strerror or e} "
                         f"({e.filename or path})") from None


def discard_journal(journal):
    """
    Close a journal that a failed start opened, and remove it if this start
    created it (it holds nothing).
    """
    from cserver.recovery import fsync_directory

    journal.close()
    if journal.recovery.created and journal.size == 0:
        try:
            os.unlink(journal.path)
            fsync_directory(journal.path)
        except OSError:
            pass


def listen_now(service, description, option):
    """
    Make ``service`` listen now (:meth:`listen`), so that a port that cannot
    be had ends the start in one line naming it.
    """
    from twisted.internet.error import CannotListenError

    try:
        service.listen()
    except (CannotListenError, OSError) as e:
        raise SystemExit(f"cserver: cannot listen on {description} ({option}): "
                         f"{describe_listen_error(e)}") from None


def describe_listen_error(error):
    """
    What stopped a listen (a CannotListenError, or the OSError of a bind),
    and where a fix is likely.
    """
    import errno

    cause = getattr(error, "socketError", None) or error
    number = getattr(cause, "errno", None)
    if number == errno.EADDRINUSE:
        return "the address is already in use (is another server running there?)"
    if number == errno.EACCES:
        return ("permission denied (ports below 1024 need root or "
                "CAP_NET_BIND_SERVICE)")
    if number == errno.EADDRNOTAVAIL:
        return "this machine has no such address"
    return getattr(cause, "strerror", None) or str(cause)


def make_syncer(mode, reactor):
    """
    What makes the journal's written batches durable (``--fsync always``),
    for a ``--sync`` mode: ``reactor``, an
    :class:`cserver.journal.InlineSyncer` (fdatasync in the reactor thread,
    at the end of the turn that wrote the batch); ``thread``, a
    :class:`cserver.journal.SyncThread`; ``auto``, an
    :class:`cserver.journal.AutoSyncer` (the first while syncs are quick,
    the second while they are slow).
    """
    from cserver.journal import AutoSyncer, InlineSyncer, SyncThread

    if mode == "reactor":
        return InlineSyncer()
    if mode == "thread":
        return SyncThread(reactor.callFromThread)
    return AutoSyncer(reactor.callFromThread)


def with_metrics(server, reactor, description, registry):
    """
    A MultiService running, on the endpoint ``description`` (listening
    already, see :func:`listen_now`), the metrics site for ``registry``,
    and ``server``; ``.metrics`` and ``.server`` are the two.  The metrics
    site stops last (it answers while the server drains).
    """
    from twisted.application.service import MultiService
    from twisted.internet.endpoints import serverFromString

    from cserver.metrics import MetricsService, metrics_site

    parent = MultiService()
    parent.server = server
    parent.metrics = MetricsService(serverFromString(reactor, description),
                                    metrics_site(registry))
    listen_now(parent.metrics, description, "--metrics")
    parent.metrics.setServiceParent(parent)
    server.setServiceParent(parent)
    return parent


def tune_interpreter():
    """
    Settings for a process that serves many small requests:

    - everything loaded at start moves out of the collector's sight
      (``gc.freeze``), and the young generation is collected every 10,000
      allocations instead of 700 -- each MSG makes a few short-lived objects;
    - a thread waiting for the interpreter lock (the journal's sync thread,
      done with an fdatasync, or a password check) gets it within 0.5 ms
      instead of 5 ms.
    """
    gc.collect()
    gc.freeze()
    _threshold, middle, old = gc.get_threshold()
    gc.set_threshold(10000, middle, old)
    sys.setswitchinterval(0.0005)
