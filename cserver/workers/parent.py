"""The parent of ``twistd cserver --workers N`` (N > 1) at start: lock, journal, sockets.

:func:`make_service` takes the journal's lock, recovers the journal and
sets up the shared memory's journal header, and makes N ``SO_REUSEPORT``
listening sockets on the one TCP port (one per worker; the parent keeps them
all open, so a restarting worker's queue is not reset); it returns the
:class:`cserver.workers.supervisor.WorkerSupervisor` that runs the workers.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import attrs

from cserver.auth import describe_checkers
from cserver.config import Config
from cserver.endpoints import parse_tcp
from cserver.journal import Shared, SharedFileJournal, make_syncer
from cserver.startup import cannot_listen, journal_errors, take_journal_lock
from cserver.workers.supervisor import WorkerSupervisor

__all__ = ["make_service", "reuseport_sockets"]


def reuseport_sockets(family: int, host: str, port: int, backlog: int,
                      count: int) -> list[socket.socket]:
    """
    Listening sockets bound with ``SO_REUSEPORT`` to one address.

    :param port: the port; 0 for the one the first socket gets.
    :param count: how many.
    :returns: the sockets, non-blocking.
    :raises OSError: one could not be bound (none is left open).
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def make_service(config: Config, reactor: Any) -> WorkerSupervisor:
    """
    The parent's service for ``--workers N``.

    :raises SystemExit: in one line, leaving nothing behind, when the journal
        is in use or damaged or the port cannot be bound.
    """
    count = config.workers
    family, host, port, backlog = parse_tcp(config.port)
    path = config.journal
    lock = take_journal_lock(path)
    try:
        try:
            sockets = reuseport_sockets(family, host, port, backlog, count)
        except OSError as e:
            raise cannot_listen(config.port, "--port", e) from None
        with journal_errors(path):
            try:
                shared = Shared.create(count)
                recovery = SharedFileJournal.prepare(path, shared)
                journal = SharedFileJournal.open(path, reactor, shared, fsync=config.fsync,
                                                 syncer=make_syncer(config.sync, reactor))
            except BaseException:
                for sock in sockets:
                    sock.close()
                raise
    except BaseException:
        lock.release()
        raise
    # The workers start after twistd has gone to its --rundir.
    for_workers = attrs.evolve(config, journal=os.path.abspath(path))
    return WorkerSupervisor(reactor, shared, journal, recovery, sockets, for_workers,
                            exit_cleanly=True, lock=lock,
                            auth=describe_checkers(config.auth, config.users))
