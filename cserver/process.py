"""What a server process sets up for itself: limits, interpreter, signals, parent watch.

Shared by the single-process server (:mod:`cserver.tap`), the ``--workers``
parent (:mod:`cserver.workers.parent`) and each worker
(:mod:`cserver.workers.worker`): the open-file limit, the interpreter's
tuning for many small requests, SIGTERM/SIGINT/SIGHUP handling, how a
listening address is written in the log, and the watch that tells a worker
its parent is gone.
"""

from __future__ import annotations

import gc
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "ParentWatch",
    "describe_address",
    "describe_socket",
    "open_files_for",
    "raise_open_file_limit",
    "stop_cleanly_on_signals",
    "tune_interpreter",
]


def raise_open_file_limit(wanted: int) -> int:
    """
    Raise the soft open-file limit toward ``wanted``, as far as the hard
    limit allows.

    :param wanted: the descriptors the process may need.
    :returns: the soft limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def open_files_for(connections: int, log: Logger) -> None:
    """
    Raise the soft open-file limit for ``connections`` connections (and a
    few more descriptors); log a warning when the hard limit is too low.
    """
    wanted = connections + 64
    files = raise_open_file_limit(wanted)
    if files < wanted:
        log.warn(
            "the open-file limit is {files}: fewer than --max-connections={wanted} "
            "connections can be open at once (raise the hard limit: ulimit -Hn)",
            files=files,
            wanted=connections,
        )


def tune_interpreter() -> None:
    """
    Settings for a process that serves many small requests:

    - everything loaded at start moves out of the collector's sight
      (:func:`gc.freeze`), and the young generation is collected every
      10,000 allocations instead of 700 -- each MSG makes a few short-lived
      objects;
    - a thread waiting for the interpreter lock (the journal's sync thread,
      done with an fdatasync, or a password check) gets it within 0.5 ms
      instead of 5 ms.
    """
    gc.collect()
    gc.freeze()
    _threshold, middle, old = gc.get_threshold()
    gc.set_threshold(10000, middle, old)
    sys.setswitchinterval(0.0005)


def stop_cleanly_on_signals(reactor: Any, log: Logger,
                            hangup: Callable[[], object] | None = None) -> None:
    """
    Make SIGTERM and SIGINT stop ``reactor`` (a graceful stop: the services'
    ``stopService`` run) and let the process exit with status 0.  twistd's
    own handlers make it exit by the signal instead.  A second signal while
    stopping is ignored.

    :param reactor: the running reactor.
    :param log: where the signals are logged.
    :param hangup: what SIGHUP (which would otherwise end the process) calls
        in the reactor thread -- the single-process server reopens its
        journal; without it (the ``--workers`` parent), SIGHUP is logged
        and ignored.
    """

    def stop() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    def handler(number: int, frame: object) -> None:
        log.info("received signal {number}, stopping", number=number)
        reactor.callFromThread(stop)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, handler)

    def ignore_hangup(number: int, frame: object) -> None:
        log.warn("received SIGHUP: ignored (the journal is not reopened with --workers)")

    def reopen_on_hangup(number: int, frame: object) -> None:
        log.info("received SIGHUP, reopening the journal")
        reactor.callFromThread(hangup)

    signal.signal(signal.SIGHUP, ignore_hangup if hangup is None else reopen_on_hangup)


def describe_address(address: Any, tls: bool = False) -> str:
    """
    How the log writes a listening address.

    :param address: an :class:`twisted.internet.address.IPv4Address`,
        :class:`~twisted.internet.address.IPv6Address` or
        :class:`~twisted.internet.address.UNIXAddress`.
    :param tls: the port listens with TLS.
    :returns: ``tcp:HOST:PORT`` (``tcp6:`` for IPv6; ``ssl:`` with
        ``tls``) or ``unix:PATH``.
    """
    host = getattr(address, "host", None)
    if host is None:
        name = getattr(address, "name", None)
        if isinstance(name, bytes):
            name = name.decode("utf-8", "backslashreplace")
        return f"unix:{name or '?'}"
    if tls:
        kind = "ssl"
    else:
        kind = "tcp6" if isinstance(address, IPv6Address) else address.type.lower()
    return f"{kind}:{host}:{address.port}"


def describe_socket(sock: socket.socket) -> str:
    """
    :func:`describe_address` of a listening TCP socket of ours.

    :returns: ``tcp:HOST:PORT`` or ``tcp6:HOST:PORT``.
    """
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        return describe_address(IPv6Address("TCP", host, port))
    return describe_address(IPv4Address("TCP", host, port))


@implementer(IReadDescriptor)
@attrs.define(eq=False)  # hashed by identity, as a reactor's readers are
class ParentWatch:
    """
    Calls ``gone()`` once the parent's end of a pipe is closed: the parent
    exited, however it died.  What the parent writes there is ignored.

    :ivar reactor: the reactor it is a reader of.
    :ivar fd: the read end of the pipe (made non-blocking).
    :ivar gone: what to call, once; None once called.
    """

    reactor: Any
    fd: int
    gone: Callable[[], object] | None

    def __attrs_post_init__(self) -> None:
        os.set_blocking(self.fd, False)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "parent-watch"

    def doRead(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self.reactor.removeReader(self)
            self._lost()
        return None

    def connectionLost(self, reason: Failure) -> None:
        # epoll reports a pipe whose writer is gone as a hang-up, without
        # readable data: the reactor then calls this instead of doRead.
        self._lost()

    def _lost(self) -> None:
        gone, self.gone = self.gone, None
        if gone is not None:
            gone()
