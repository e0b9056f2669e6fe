"""The journal's logger: how the server hands its events to the journal.

The factory emits each record as a :class:`twisted.logger` event through a
:class:`JournalLogger`, whose observer is the journal (an
:class:`~cserver.journal.interfaces.IJournal`); a text log observer can
watch the same events.
"""

from __future__ import annotations

from time import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel

from cserver.journal.interfaces import Ack
from cserver.journal.record import ACK, EVENT, FIELDS, MESSAGE_FORMAT


class JournalLogger(Logger):
    """
    A Logger for the journal's events, lean enough for one event per
    message: its ``emit`` skips the validation of the level (callers pass
    :class:`LogLevel` constants) and the trace bookkeeping, and otherwise
    makes the same event; :meth:`message` makes a message's event in one
    step.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        kwargs["log_logger"] = self
        kwargs["log_level"] = level
        kwargs["log_namespace"] = self.namespace
        kwargs["log_source"] = self.source
        kwargs["log_format"] = format
        kwargs["log_time"] = time()
        self.observer(kwargs)

    def record(self, kind: str, fields: dict[str, Any], format: str) -> Deferred[int]:
        """
        Emit, at level info, a record other than a message (``start``,
        ``stop``, ``totals``...) with ``fields``; the Deferred fires with its
        seq once it is durable, or fails with OSError.
        """
        d: Deferred[int] = Deferred()

        def ack(seq: int, reason: str | None) -> None:
            if reason is None:
                d.callback(seq)
            else:
                d.errback(OSError(reason))

        self.emit(LogLevel.info, format, **{EVENT: kind, FIELDS: fields, ACK: ack}, **fields)
        return d

    def message(self, user: str, text: str, peer: str, ack: Ack,
                key: str | None = None) -> None:
        """
        Emit, at level info, the event of a message record: what
        ``emit(LogLevel.info, MESSAGE_FORMAT, cserver_event="message",
        cserver_ack=ack, user=user, text=text, peer=peer, key=key)`` emits
        (``key``: a ``PUT``'s, or None for a ``MSG``).
        """
        self.observer(
            {
                EVENT: "message",
                ACK: ack,
                "user": user,
                "text": text,
                "peer": peer,
                "key": key,
                "log_logger": self,
                "log_level": LogLevel.info,
                "log_namespace": self.namespace,
                "log_source": self.source,
                "log_format": MESSAGE_FORMAT,
                "log_time": time(),
            }
        )
