"""The steps of a start that may fail: each failure ends the process in one line.

Taking the journal's lock, opening the journal, listening: shared by the
single-process server (:mod:`cserver.tap`) and the ``--workers`` parent
(:mod:`cserver.workers.parent`).  Each raises :exc:`SystemExit` with one
line (``cserver: ...``) saying what is wrong and where a fix is likely;
twistd prints it and exits with status 1, before it daemonizes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.error import CannotListenError

from cserver.fs import fsync_directory
from cserver.journal import JournalDamaged, JournalInUse, JournalLock

__all__ = [
    "cannot_listen",
    "describe_listen_error",
    "discard_journal",
    "journal_errors",
    "listen_now",
    "take_journal_lock",
]


def take_journal_lock(path: str) -> JournalLock:
    """
    The journal's lock: a second server on the journal ends here, having
    touched nothing.

    :param path: the journal's path.
    :returns: the :class:`cserver.journal.lock.JournalLock`, held.
    :raises SystemExit: the journal is in use, or its directory cannot be
        written.
    """
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


@contextmanager
def journal_errors(path: str) -> Iterator[None]:
    """
    Turn what recovering or opening the journal at ``path`` failed with into
    one line.

    :raises SystemExit: for a :exc:`cserver.journal.recovery.JournalDamaged` or an
        :exc:`OSError` raised inside.
    """
    try:
        yield
    except JournalDamaged as e:
        raise SystemExit(f"cserver: {e}") from None
    except OSError as e:
        raise SystemExit(f"cserver: cannot open journal {path}: "
                         f"{e.strerror or e}") from None


def discard_journal(journal: Any, recovery: Any = None) -> None:
    """
    Close a journal that a failed start opened, and remove it if this start
    created it (it holds nothing).

    :param journal: a :class:`cserver.journal.FileJournal`.
    :param recovery: what recovering it found (default: its own
        ``recovery``; the ``--workers`` parent's journal has the shared one).
    """
    journal.close()
    recovery = journal.recovery if recovery is None else recovery
    if recovery.created and journal.size == 0:
        try:
            os.unlink(journal.path)
            fsync_directory(journal.path)
        except OSError:
            pass


def listen_now(service: Any, description: str, option: str) -> None:
    """
    Make ``service`` listen now (its ``listen()``), so that a port that
    cannot be had ends the start in one line naming it.

    :param description: the endpoint description, for the message.
    :param option: the option that gave it (``--port``, ``--metrics``).
    :raises SystemExit: the listen failed at once.
    """
    try:
        service.listen()
    except (CannotListenError, OSError) as e:
        raise cannot_listen(description, option, e) from None


def cannot_listen(description: str, option: str, error: BaseException) -> SystemExit:
    """
    :returns: the one-line exit for a listen on ``description`` (given as
        ``option``) that failed with ``error``.
    """
    return SystemExit(f"cserver: cannot listen on {description} ({option}): "
                      f"{describe_listen_error(error)}")


def describe_listen_error(error: BaseException) -> str:
    """
    What stopped a listen, and where a fix is likely.

    :param error: a :exc:`twisted.internet.error.CannotListenError`, or the
        :exc:`OSError` of a bind.
    """
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
