"""Lean polling: the epoll reactor's loop without a logging context per event.

For every readiness event, Twisted's epoll reactor calls the selectable
through :func:`twisted.python.log.callWithLogger`, which asks the selectable
for its ``logPrefix()``, makes a context dict and pushes it for the call, so
that legacy ``log.msg`` calls made meanwhile are tagged with it.  For a
server whose every request is one event, that is about a tenth of the
reactor's Python work per request (``benchmarks/profile.py``), and cserver
logs through :class:`twisted.logger.Logger`, which does not read that
context.  :func:`lean_poll` gives an epoll reactor a ``doPoll`` that reads a
selectable that is only readable (nearly every event: a request, an
accept) directly; an exception is still caught, logged with the
selectable's ``logPrefix()`` as its system, and the selectable
disconnected, as Twisted does.  Every other event goes Twisted's way.

``twistd cserver`` does so unless ``--poll twisted``.  Other reactors are
left as they are.
"""

from __future__ import annotations

import errno
import sys
from select import EPOLLIN
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.error import ConnectionFdescWentAway
from twisted.python import log

#: What ``_doReadOrWrite`` disconnects a selectable with when its fileno()
#: is -1.
_NO_FILEDESC = ConnectionFdescWentAway("File descriptor lost")


def lean_poll(reactor: Any) -> bool:
    """
    Give ``reactor`` the lean ``doPoll`` (and ``doIteration``).

    :returns: True when done; False when ``reactor`` is not an epoll reactor.
    """
    if not isinstance(reactor, epollreactor.EPollReactor):
        return False

    def doPoll(timeout: float | None) -> None:
        _lean_do_poll(reactor, timeout)

    reactor.doPoll = reactor.doIteration = doPoll  # type: ignore[method-assign]
    return True


def _lean_do_poll(reactor: Any, timeout: float | None) -> None:
    """
    :meth:`twisted.internet.epollreactor.EPollReactor.doPoll`, but for the
    context around a plain read event: a selectable that is only readable
    is read at once, as ``_doReadOrWrite`` would read it; every other event
    (writable, hung up, an error) goes through Twisted's own
    ``callWithLogger(_doReadOrWrite)``.
    """
    if timeout is None:
        timeout = -1  # wait indefinitely
    selectables = reactor._selectables
    try:
        events = reactor._poller.poll(timeout, len(selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    do_read_or_write = reactor._doReadOrWrite
    for fd, event in events:
        try:
            selectable = selectables[fd]
        except KeyError:
            continue
        if event != EPOLLIN:
            log.callWithLogger(selectable, do_read_or_write, selectable, fd, event)
            continue
        try:
            why = _NO_FILEDESC if selectable.fileno() == -1 else selectable.doRead()
        except BaseException:
            # As _doReadOrWrite does, with the system callWithLogger gives it.
            why = sys.exc_info()[1]
            log.err(system=_prefix(selectable))
        if why:
            reactor._disconnectSelectable(selectable, why, True)


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except BaseException:
        return "(buggy logPrefix method)"
