"""The deduplication window: what makes a keyed message (``PUT <key>
<text>``) safe to send again.

The window remembers, per user and key, the seq its message was journaled
at (or, while the record is not yet durable, who waits for it) and a hash
of its text, for ``--dedup-window`` seconds after the message was taken
and for at most ``--dedup-keys`` keys (the oldest go first).  A request
whose key is in the window:

- with the same text gets the original seq back, marked ``dup``, and
  journals nothing -- at once if the record is durable, else when it is;
- with another text gets ``ERR conflict``.

A request whose key has left the window is a new message: the window is
the guarantee's bound, as JetStream's duplicate window is.  A message whose
record is refused (the journal broken) leaves the window, so that a retry
tries again.  At start the window is rebuilt from the end of the journal
(:func:`cserver.journal.reading.keyed_since`).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

#: What a key is made of, and how long it may be.
KEY = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
#: The default window: JetStream's duplicate window.
DEFAULT_SECONDS = 120.0
DEFAULT_KEYS = 1_000_000

#: What a waiting duplicate is answered through: ``answer(seq, reason)``.
Answer = Callable[[Any, Any], object]


class _Entry:
    """
    One key in the window: its text's hash, when it was taken, its seq once
    durable, and the duplicates waiting until then.
    """

    __slots__ = ("digest", "time", "seq", "waiting")

    def __init__(self, digest: int, time: float, seq: int | None = None) -> None:
        self.digest = digest
        self.time = time
        self.seq = seq
        self.waiting: list[Answer] = []


class DedupWindow:
    """
    The keys of the last ``seconds`` seconds (at most ``keys`` of them).

    :param clock: ``seconds()`` gives the time (the reactor, a task.Clock).
    """

    def __init__(self, clock: Any, seconds: float = DEFAULT_SECONDS,
                 keys: int = DEFAULT_KEYS) -> None:
        self.clock = clock
        self.seconds = seconds
        self.keys = keys
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        #: Requests answered as duplicates since start.
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        cutoff = now - self.seconds
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.time >= cutoff and len(entries) <= self.keys:
                return
            if entry.seq is None:
                return  # in flight: it leaves once answered
            entries.popitem(last=False)

    def check(self, user: str, key: str, text: str) -> str:
        """
        Look ``user``'s ``key`` up for a request with ``text``.

        :returns: ``"new"`` when the key is not in the window (the caller
            journals the message between :meth:`taken` and :meth:`done`);
            ``"duplicate"`` when it is, with the same text (the caller
            answers it through :meth:`wait`); ``"conflict"`` when it is, with
            another text.
        """
        self._expire(self.clock.seconds())
        entry = self._entries.get((user, key))
        if entry is None:
            return "new"
        return "duplicate" if entry.digest == hash(text) else "conflict"

    def wait(self, user: str, key: str, answer: Answer) -> None:
        """
        Answer a duplicate of ``user``'s ``key`` (:meth:`check` said so) with
        the first record's seq: ``answer(seq, None)`` at once if it is
        durable, else once it is (``answer(None, reason)`` if it is refused).
        """
        self.duplicates += 1
        entry = self._entries[(user, key)]
        if entry.seq is not None:
            answer(entry.seq, None)
        else:
            entry.waiting.append(answer)

    def taken(self, user: str, key: str, text: str) -> None:
        """
        ``user``'s message with ``key`` and ``text`` was handed to the
        journal: duplicates wait for it from now on.
        """
        self._entries[(user, key)] = _Entry(hash(text), self.clock.seconds())

    def done(self, user: str, key: str, seq: int | None, reason: str | None) -> None:
        """
        The journal answered the message of ``user``'s ``key``: durable at
        ``seq``, or refused for ``reason`` (then the key leaves the window).
        Duplicates that waited get the same answer.
        """
        entry = self._entries.get((user, key))
        if entry is None:
            return
        if reason is None:
            entry.seq = seq
        else:
            del self._entries[(user, key)]
        waiting, entry.waiting = entry.waiting, []
        for answer in waiting:
            answer(seq, reason)

    def rebuild(self, records: Iterable[Any]) -> None:
        """
        Put back the keyed message records (``user``, ``key``, ``text``,
        ``seq``, ``time``; oldest first) that recovery read from the end of
        the journal (:func:`cserver.journal.keyed.keyed_since`).
        """
        for record in records:
            self.remember(record.user, record.key, record.text, record.seq, record.time)

    def remember(self, user: str, key: str, text: str, seq: int, time: float) -> None:
        """
        Put a durable keyed message back in the window (recovery), oldest
        first; one older than the window is not.
        """
        if time < self.clock.seconds() - self.seconds:
            return
        self._entries[(user, key)] = _Entry(hash(text), time, seq)
        self._entries.move_to_end((user, key))
        self._expire(self.clock.seconds())
