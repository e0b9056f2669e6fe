"""``twistd cserver``: the command-line options and the service they make."""

import gc
import getpass
import resource
import sys

from twisted.cred import strcred
from twisted.cred.credentials import IUsernamePassword
from twisted.python import usage

from cserver.journal import FSYNC_MODES

DEFAULT_PORT = "tcp:31337:interface=127.0.0.1"
#: The listen backlog added to endpoint descriptions that do not set one:
#: Twisted's default of 50 makes 1000 simultaneous connects take seconds.
BACKLOG = 4096
#: The --writes modes: see cserver.eager.
WRITE_MODES = ("eager", "queued")
#: The --sync modes: see make_syncer.
SYNC_MODES = ("auto", "reactor", "thread")


def _positive_int(value):
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _seconds(value):
    number = float(value)
    if not number >= 0:
        raise ValueError("must be 0 or more seconds")
    return number


def _count(value):
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


_positive_int.coerceDoc = "A whole number, at least 1."
_count.coerceDoc = "A whole number, 0 or more."
_seconds.coerceDoc = "Seconds, 0 or more."


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
        ["port", "p", DEFAULT_PORT, "Endpoint description to listen on."],
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
        ["max-connections", None, 10000, "Connections open at once.", _positive_int],
        ["idle-timeout", None, 300.0, "Seconds without a request before a "
         "connection is closed (0: never).", _seconds],
        ["auth-timeout", None, 30.0, "Seconds a connection has to authenticate "
         "(0: no limit).", _seconds],
        ["max-line", None, 65536, "The longest request line, in bytes.", _positive_int],
        ["work-delay", None, 0.0, "Seconds each MSG waits before it is journaled "
         "(to show requests overlapping).", _seconds],
        ["auth-throttle", None, 5, "Failed AUTHs from one address after which its AUTHs "
         "are refused until it has not failed for 60 s (0: no limit).", _count],
        ["workers", None, 1, "Server processes (1: one process; N > 1: a parent and N "
         "workers sharing one tcp port and the journal).", _positive_int],
        ["restart-delay", None, 0.5, "With --workers: seconds before a dead worker is "
         "restarted; doubled for each death within 10 s of its start.", _seconds],
        ["restart-max-delay", None, 30.0, "With --workers: the longest wait before a "
         "restart.", _seconds],
        ["metrics", None, None, "Endpoint description to serve Prometheus metrics on, at "
         "/metrics (e.g. tcp:9100:interface=127.0.0.1; needs the metrics extra). "
         "Default: none."],
    ]

    def opt_auth(self, description):
        super().opt_auth(description)
        # The workers (--workers N) rebuild the checkers from the descriptions.
        self.setdefault("auth_descriptions", []).append(description)

    opt_auth.__doc__ = strcred.AuthOptionMixin.opt_auth.__doc__

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
        self["port"] = with_backlog(self["port"])
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


def with_backlog(description):
    """
    Add a large listen backlog to a tcp, ssl or unix endpoint description
    that does not set one.
    """
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl", "unix") and "backlog=" not in description:
        return f"{description}:backlog={BACKLOG}"
    return description


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


def makeService(config):
    """
    Recover the journal and build the server from parsed :class:`Options`.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import Logger

    from cserver.auth import allow_list_portal, password_portal
    from cserver.journal import FileJournal
    from cserver.recovery import JournalDamaged
    from cserver.server import CServerFactory, Limits
    from cserver.service import CServerService

    log = Logger(namespace="cserver.tap")
    metrics_endpoint = None
    if config.get("metrics"):
        try:
            metrics_endpoint = serverFromString(reactor, config["metrics"])
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"cserver: bad --metrics endpoint {config['metrics']!r}: {e}") \
                from None
    if config.get("workers", 1) > 1:
        from cserver.workers import make_service

        raise_open_file_limit(config["max-connections"] + 64)
        supervisor = make_service(config, reactor)
        if metrics_endpoint is None:
            return supervisor
        from cserver.metrics import workers_registry

        return with_metrics(supervisor, metrics_endpoint, workers_registry(supervisor.shared))
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
        raise SystemExit(f"cserver: cannot open journal {config['journal']}: {e}") from None
    if config.get("credCheckers"):
        portal = password_portal(config.get("credCheckers"))
    else:
        portal = allow_list_portal(config["user_list"])
    factory = CServerFactory(journal, portal, reactor, limits)
    endpoint = serverFromString(reactor, config["port"])
    service = CServerService(factory, endpoint, reactor, exit_cleanly=True,
                             eager=config["writes"] == "eager")
    if metrics_endpoint is not None:
        from cserver.metrics import server_registry

        service = with_metrics(service, metrics_endpoint, server_registry(factory))
    tune_interpreter()
    return service


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


def with_metrics(server, endpoint, registry):
    """
    A MultiService running, on ``endpoint``, the metrics site for
    ``registry`` and ``server``; ``.metrics`` and ``.server`` are the two.
    The metrics site starts first (a metrics port that cannot be bound stops
    the start before the journal gets a ``start`` record) and stops last
    (it answers while the server drains).
    """
    from twisted.application.service import MultiService

    from cserver.metrics import MetricsService, metrics_site

    parent = MultiService()
    parent.server = server
    parent.metrics = MetricsService(endpoint, metrics_site(registry))
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
