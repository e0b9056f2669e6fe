"""The journal's seams: what a journal is to the server, and what a syncer
is to a journal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zope.interface import Attribute, Interface

#: What a journal calls once per record: ``ack(seq, None)`` once it is
#: durable, ``ack(None, reason)`` when it was refused (then it is not in the
#: journal).
Ack = Callable[[Any, Any], object]


class KeyVerdict(str):
    """
    Why a journal did not write a keyed record it took: another writer (a
    worker) had written its key first.  An ack gets ``ack(seq, DUPLICATE)``
    (the other record's seq, once it is durable) or ``ack(None, CONFLICT)``;
    ``code`` is what the client's ``ERR`` or ``OK`` says.
    """

    code: str = ""


#: The key was written by another worker with the same text.
DUPLICATE = KeyVerdict("journaled by another worker")
DUPLICATE.code = "dup"
#: The key was written by another worker with another text.
CONFLICT = KeyVerdict("key was sent with another text")
CONFLICT.code = "conflict"


class IJournal(Interface):
    """
    An append-only record store fed as a :mod:`twisted.logger` observer.
    """

    last_seq = Attribute("The seq of the newest record taken (written or not yet).")
    messages = Attribute("Message records written, all time.")
    broken = Attribute("None, or why the journal takes no more records until restart.")

    def __call__(event: dict[str, Any]) -> None:
        """
        Take one log event (:class:`twisted.logger.ILogObserver`).  Events
        without ``cserver_event`` are ignored; one with ``cserver_ack`` is
        acknowledged through it.
        """

    def flush() -> None:
        """
        Write (and, by the fsync mode, sync) every record taken so far and
        acknowledge them now, rather than at the end of the reactor turn.
        """

    def close() -> None:
        """
        Flush, stop any periodic sync and release the storage.
        """


class ISyncer(Interface):
    """
    What makes a journal's written batches durable (``--fsync always``).

    A journal binds its syncer to three of its methods, then tells it how
    far it is written; the syncer calls back, in the reactor thread and in
    order, how far that is durable -- or that a sync failed.
    """

    def bind(sync: Callable[[], None], durable: Callable[[int], None],
             failed: Callable[[int, BaseException], None]) -> None:
        """
        :param sync: makes everything written so far durable (fdatasync);
            raises OSError when it cannot.
        :param durable: ``durable(seq)``: everything up to ``seq`` is synced.
        :param failed: ``failed(seq, error)``: the sync covering ``seq``
            failed.
        """

    def request(seq: int) -> None:
        """
        The journal is written up to ``seq``: make it durable (now, or soon
        and from another thread, reported through the reactor).
        """

    def stop() -> None:
        """
        The journal closes: finish the sync under way, if any, and stop.
        """
