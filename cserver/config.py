"""Every server option once: its name, default, help text and check (:class:`Config`).

:class:`Config` is what ``twistd cserver`` was asked to run, checked: the
command line (:class:`cserver.tap.Options`, generated from the fields here)
fills it with :meth:`Config.from_options`, and the ``--workers`` parent hands
it to each worker as a dict (:meth:`Config.as_dict`, :meth:`Config.from_dict`).
``python -m cserver.config --rst`` prints the options table of
``docs/options.rst``.
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from cserver.endpoints import check_server
from cserver.journal import FSYNC_MODES, SYNC_MODES
from cserver.journal.stream_url import is_stream_url, parse_stream_url

__all__ = [
    "DEFAULT_PORT", "POLL_MODES", "SYNC_MODES", "WRITE_MODES", "Config", "Option", "options_rst",
]

DEFAULT_PORT = "tcp:31337:interface=127.0.0.1"
#: The --writes modes: see :mod:`cserver.eager`.
WRITE_MODES = ("eager", "queued")
#: The --poll modes: see :mod:`cserver.poll`.
POLL_MODES = ("lean", "twisted")

#: The key of a field's :class:`Option` in its attrs metadata.
_OPTION = "cserver.option"


@attrs.frozen
class Option:
    """
    How one :class:`Config` field is given as ``--NAME`` (the field's name,
    dashed).

    :ivar help: the help text (``--help`` and ``docs/options.rst``).
    :ivar short: the one-letter form, or None.
    :ivar check: ``check(flag, value)``: the value to keep for what was
        given (the default included); raises :exc:`ValueError` with one line
        naming ``flag`` and what is wrong.
    :ivar coerce_doc: for the numbers, checked while the command line is read
        (a :mod:`twisted.python.usage` coercer): what ``--help`` adds.
    :ivar shown_default: the default as the docs table shows it, when not
        the field's own default.
    :ivar generated: False for ``--auth``, whose parameter
        :class:`twisted.cred.strcred.AuthOptionMixin` gives.
    """

    help: str
    short: str | None = None
    check: Callable[[str, Any], Any] | None = None
    coerce_doc: str | None = None
    shown_default: str | None = None
    generated: bool = True


def _option(default: Any, help: str, **kwargs: Any) -> Any:
    """An attrs field with ``default`` and its :class:`Option`."""
    converter = kwargs.pop("converter", None)
    factory = kwargs.pop("factory", None)
    metadata = {_OPTION: Option(help, **kwargs)}
    if factory is not None:
        return attrs.field(factory=factory, converter=converter, metadata=metadata)
    return attrs.field(default=default, converter=converter, metadata=metadata)


def _number(kind: type, least: float, unit: str = "") -> dict[str, Any]:
    """
    The :class:`Option` arguments of a number of ``kind`` (int or float),
    at least ``least``.
    """

    def check(flag: str, value: Any) -> Any:
        try:
            number = kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"{flag} must be {what}, not {value!r}") from None
        if not number >= least:
            raise ValueError(f"{flag} must be at least {least:g}{unit}, not {value}")
        return number

    what = "A whole number" if kind is int else "Seconds" if unit else "A number"
    return {"check": check, "coerce_doc": f"{what}, {least:g} or more."}


def _one_of(modes: tuple[str, ...]) -> Callable[[str, Any], Any]:
    def check(flag: str, value: Any) -> Any:
        if value not in modes:
            raise ValueError(f"{flag} must be one of {', '.join(modes)}, not {value!r}")
        return value

    return check


def _endpoint(flag: str, value: Any) -> Any:
    return None if value is None else check_server(value, flag)


def _file(flag: str, value: Any) -> Any:
    if not value or os.path.isdir(value):
        raise ValueError(f"{flag} must name a file, not {value!r}")
    return value


def _readable(flag: str, value: Any) -> Any:
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        raise ValueError(f"{flag}: cannot read {value!r}")
    return value


def _journal(flag: str, value: Any) -> Any:
    if isinstance(value, str) and is_stream_url(value):
        try:
            parse_stream_url(value)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
        return value
    return _file(flag, value)


def _names(flag: str, value: Any) -> tuple[str, ...]:
    if value is None:
        value = getpass.getuser()
    if not isinstance(value, str):
        value = ",".join(value)
    return tuple(name.strip() for name in value.split(",") if name.strip())


def _current_user() -> tuple[str, ...]:
    return (getpass.getuser(),)


@attrs.frozen
class Config:
    """
    The server's options, checked.  Each field is the option ``--NAME``
    (its name dashed); its metadata holds the :class:`Option`.
    """

    port: str = _option(
        DEFAULT_PORT, "Endpoint description to listen on (a bare number N means "
        "tcp:N:interface=127.0.0.1).", short="p", check=_endpoint)
    journal: str = _option(
        "cserver.jsonl", "The journal: a file (JSON Lines, append-only), or a NATS "
        "JetStream stream, nats://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/STREAM "
        "(tls:// for TLS to NATS).", short="j", check=_journal)
    fsync: str = _option(
        "always", f"When to fsync the journal: {', '.join(FSYNC_MODES)}.",
        check=_one_of(FSYNC_MODES))
    sync: str = _option(
        "auto", "Where the journal is fdatasync'd (--fsync always): reactor (in the "
        "reactor thread, at the end of the turn that wrote the batch), thread (in a "
        "thread of its own, so that a slow disk does not hold up the reactor) or auto "
        "(in the reactor while syncs take under 2 ms on average, else in the thread).",
        check=_one_of(SYNC_MODES))
    writes: str = _option(
        "eager", "How replies are written: eager (sent at once when nothing is queued "
        "ahead) or queued (Twisted's default: sent when the reactor next finds the "
        "socket writable).", check=_one_of(WRITE_MODES))
    poll: str = _option(
        "lean", "How the epoll reactor calls a connection that is ready: lean (directly) "
        "or twisted (Twisted's own loop, which also sets a legacy logging context per "
        "call).", check=_one_of(POLL_MODES))
    users: tuple[str, ...] = _option(
        None, "Comma-separated user names AUTH accepts without --auth (default: the "
        "account running the server).", short="u", check=_names, converter=tuple,
        factory=_current_user, shown_default="the account running the server")
    auth: tuple[str, ...] = _option(
        (), "Specify an authentication method for the server (a twisted.cred checker: "
        "memory:alice:pw, file:PATH, hashfile:PATH...); repeatable, a user is accepted "
        "when any accepts; twistd cserver --help-auth lists them.", converter=tuple,
        generated=False, shown_default="none")
    max_connections: int = _option(10000, "Connections open at once.", **_number(int, 1))
    idle_timeout: float = _option(
        300.0, "Seconds without a request before a connection is closed (0: never).",
        **_number(float, 0, " s"))
    auth_timeout: float = _option(
        30.0, "Seconds a connection has to authenticate (0: no limit).",
        **_number(float, 0, " s"))
    max_line: int = _option(65536, "The longest request line, in bytes.", **_number(int, 1))
    work_delay: float = _option(
        0.0, "Seconds each MSG waits before it is journaled (to show requests "
        "overlapping).", **_number(float, 0, " s"))
    auth_throttle: int = _option(
        5, "Failed AUTHs in a row from one address after which its AUTHs are refused "
        "for 60 s (0: no limit).", **_number(int, 0))
    dedup_window: float = _option(
        120.0, "Seconds a PUT key is remembered: a PUT with the same key and text within "
        "them gets the first one's seq back (OK <seq> dup) and journals nothing (0: PUT "
        "is refused).", **_number(float, 0, " s"))
    dedup_keys: int = _option(
        1_000_000, "The most PUT keys remembered at once (the oldest leave first).",
        **_number(int, 1))
    workers: int = _option(
        1, "Server processes (1: one process; N > 1: a parent and N workers sharing one "
        "tcp port and the journal).", **_number(int, 1))
    restart_delay: float = _option(
        0.5, "With --workers: seconds before a dead worker is restarted; doubled for "
        "each death within 10 s of its start.", **_number(float, 0, " s"))
    restart_max_delay: float = _option(
        30.0, "With --workers: the longest wait before a restart.",
        **_number(float, 0, " s"))
    node: str = _option(
        None, "This node's name in the records it writes to a stream journal (default: "
        "the host name).", check=lambda flag, value: value or socket.gethostname(),
        factory=socket.gethostname, shown_default="the host name")
    nats_replicas: int = _option(
        3, "With a stream journal: the copies of the stream (created with them; an "
        "existing stream with fewer refuses the start).", **_number(int, 1))
    nats_deadline: float = _option(
        30.0, "With a stream journal: seconds a record is published again while NATS has "
        "no leader or no connection, before it is refused (ERR unavailable).",
        **_number(float, 1, " s"))
    nats_ca: str | None = _option(
        None, "With a stream journal over tls://: a PEM file of the certificates to "
        "trust for the NATS servers (default: the system's trust roots).",
        check=lambda flag, value: value if value is None else _readable(flag, value),
        shown_default="the system's")
    metrics: str | None = _option(
        None, "Endpoint description to serve Prometheus metrics on, at /metrics (e.g. "
        "tcp:9100:interface=127.0.0.1; needs the metrics extra). Default: none.",
        check=_endpoint, shown_default="none")

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> Config:
        """
        The checked config for option values keyed ``NAME`` (dashed, as
        :mod:`twisted.python.usage` keeps them); a missing one takes its
        default.

        :raises ValueError: with one line naming the option and what is wrong.
        """
        given = {}
        for field in attrs.fields(cls):
            option = field.metadata[_OPTION]
            value = values.get(flag_name(field), _default(field))
            if option.check is not None:
                value = option.check(f"--{flag_name(field)}", value)
            given[field.name] = value
        config = cls(**given)
        config._check_together()
        return config

    def _check_together(self) -> None:
        """The checks of several options at once."""
        if not self.users and not self.auth:
            raise ValueError("--users names nobody: no one could authenticate")
        if self.workers > 1 and self.port.split(":", 1)[0] not in ("tcp", "tcp6"):
            raise ValueError("--workers needs a tcp: or tcp6: --port (each worker gets its "
                             "own SO_REUSEPORT socket)")
        if is_stream_url(self.journal) and self.workers > 1:
            raise ValueError("--workers with a stream journal is not supported yet: run one "
                             "node per process, several nodes on one stream")
        if self.restart_max_delay < self.restart_delay:
            raise ValueError("--restart-max-delay must be at least --restart-delay")
        if self.metrics is not None:
            try:
                import prometheus_client  # noqa: F401
            except ImportError:
                raise ValueError(
                    "--metrics needs prometheus_client: pip install 'cserver[metrics]'"
                ) from None

    def as_dict(self) -> dict[str, Any]:
        """The fields, as :func:`json.dumps` takes them."""
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        """
        The config :meth:`as_dict` gave: trusted (checked where it was made),
        not checked again.
        """
        return cls(**values)


def flag_name(field: attrs.Attribute) -> str:
    """``max-connections`` for the field ``max_connections``."""
    return field.name.replace("_", "-")


def _default(field: attrs.Attribute) -> Any:
    """The default a field has on the command line (None for --users: the account)."""
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        return None
    return field.default


def option_of(field: attrs.Attribute) -> Option:
    """The :class:`Option` of a :class:`Config` field."""
    return field.metadata[_OPTION]


def option_help(name: str) -> str:
    """The help text of the :class:`Config` field ``name``."""
    return option_of(attrs.fields_dict(Config)[name]).help


def option_parameters() -> list[list[Any]]:
    """
    :class:`Config`'s options as :mod:`twisted.python.usage` ``optParameters``
    (``--auth`` left out: :class:`twisted.cred.strcred.AuthOptionMixin` gives it).
    """
    parameters: list[list[Any]] = []
    for field in attrs.fields(Config):
        option = option_of(field)
        if not option.generated:
            continue
        parameter = [flag_name(field), option.short, _default(field), option.help]
        if option.coerce_doc is not None:
            parameter.append(_coercer(f"--{flag_name(field)}", option))
        parameters.append(parameter)
    return parameters


def _coercer(flag: str, option: Option) -> Callable[[str], Any]:
    check = option.check
    assert check is not None

    def coerce(value: str) -> Any:
        return check(flag, value)

    coerce.coerceDoc = option.coerce_doc  # type: ignore[attr-defined]
    return coerce


def options_rst(width: int = 48) -> str:
    """
    The table of every option, its default and its help text, in
    reStructuredText: what ``docs/options.rst`` holds.
    """
    rows = []
    for field in attrs.fields(Config):
        option = option_of(field)
        default = option.shown_default or f"``{_default(field)}``"
        rows.append((f"``--{flag_name(field)}``", default,
                     textwrap.wrap(option.help, width) or [""]))
    first = max(len("option"), *(len(row[0]) for row in rows))
    second = max(len("default"), *(len(row[1]) for row in rows))
    rule = f"{'=' * first}  {'=' * second}  {'=' * width}"
    lines = [
        "Options",
        "=======",
        "",
        "``twistd cserver`` takes these options (``twistd cserver --help`` lists them",
        "too).  This file is generated from ``cserver.config.Config``:",
        "``python -m cserver.config --rst > docs/options.rst``.",
        "",
        rule,
        f"{'option':<{first}}  {'default':<{second}}  meaning",
        rule,
    ]
    for name, default, meaning in rows:
        lines.append(f"{name:<{first}}  {default:<{second}}  {meaning[0]}".rstrip())
        lines.extend(f"{'':<{first}}  {'':<{second}}  {more}" for more in meaning[1:])
    lines.append(rule)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m cserver.config --rst``: print :func:`options_rst`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--rst"]:
        print("usage: python -m cserver.config --rst", file=sys.stderr)
        return 2
    sys.stdout.write(options_rst())
    return 0


if __name__ == "__main__":
    sys.exit(main())
