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
the guarantee's bound, as JetStream's duplicate window is (a key leaves it
up to a second after its window, never before).  A message whose
record is refused (the journal broken) leaves the window, so that a retry
tries again.  At start the window is rebuilt from the end of the journal
(:func:`cserver.journal.keyed.keyed_since`).  With ``--workers`` each worker
keeps a window; under the journal's lock a worker learns the keys the others
wrote (:meth:`DedupWindow.learn`) and leaves out a record whose key one of
them wrote first (:meth:`DedupWindow.written`; see
:class:`cserver.journal.SharedFileJournal`).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from cserver.journal.interfaces import CONFLICT, DUPLICATE

#: What a key is made of, and how long it may be.
KEY = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
#: The bytes a key is made of (``bytes.translate`` deletes them: what is left
#: is not a key's).
KEY_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@/+=-"
#: The default window: JetStream's duplicate window.
DEFAULT_SECONDS = 120.0
DEFAULT_KEYS = 1_000_000

#: What a waiting duplicate is answered through: ``answer(seq, reason)``.
Answer = Callable[[Any, Any], object]

_encode = msgspec.json.Encoder().encode


#: The low 64 bits of a packed entry hold the text's digest.
_MASK = (1 << 64) - 1


class DedupWindow:
    """
    The keys of the last ``seconds`` seconds (at most ``keys`` of them).

    Each durable key costs one dict entry, ``"<user> <key>"`` (neither holds
    a space: AUTH reads a user name up to one) to one int (the
    seq and the text's digest packed), and a place in a per-second bucket
    list; keys still in flight sit apart, with the duplicates waiting for
    them.

    :param clock: ``seconds()`` gives the time (the reactor, a task.Clock).
    """

    def __init__(self, clock: Any, seconds: float = DEFAULT_SECONDS,
                 keys: int = DEFAULT_KEYS) -> None:
        self.clock = clock
        self.seconds = seconds
        self.keys = keys
        self._durable: dict[str, int] = {}
        self._inflight: dict[str, tuple[int, list[Answer]]] = {}
        self._buckets: deque[tuple[int, deque[str]]] = deque()
        #: Requests answered as duplicates since start.
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._durable) + len(self._inflight)

    def _expire(self, now: float) -> None:
        buckets, durable = self._buckets, self._durable
        # A bucket holds the keys of one whole second: it goes once all of
        # that second is out of the window (a key may stay up to a second
        # longer than its window, never less).
        cutoff = now - self.seconds - 1
        while buckets and buckets[0][0] <= cutoff:
            for name in buckets.popleft()[1]:
                durable.pop(name, None)
        while len(durable) > self.keys and buckets:
            names = buckets[0][1]
            durable.pop(names.popleft(), None)
            if not names:
                buckets.popleft()

    def check(self, user: str, key: str, text: str) -> tuple[str, str]:
        """
        Look ``user``'s ``key`` up for a request with ``text``.

        :returns: the verdict and the key's name in the window.  ``"new"``
            when the key was not in the window: it is now, in flight (the
            caller journals the message and calls :meth:`done`);
            ``"duplicate"`` when it is, with the same text (the caller
            answers it through :meth:`wait`); ``"conflict"`` when it is, with
            another text.
        """
        self._expire(self.clock.seconds())
        name = f"{user} {key}"
        inflight = self._inflight.get(name)
        if inflight is not None:
            known = inflight[0]
        else:
            packed = self._durable.get(name)
            if packed is None:
                self._inflight[name] = (hash(_encode(text)) & _MASK, [])
                return "new", name
            known = packed & _MASK
        return ("duplicate" if known == hash(_encode(text)) & _MASK else "conflict"), name

    def wait(self, name: str, answer: Answer) -> None:
        """
        Answer a duplicate of the key ``name`` (:meth:`check` said so) with
        the first record's seq: ``answer(seq, None)`` at once if it is
        durable, else once it is (``answer(None, reason)`` if it is refused).
        (:attr:`duplicates` counts them as they are answered: see the
        factory's ``duplicate_done``.)
        """
        inflight = self._inflight.get(name)
        if inflight is not None:
            inflight[1].append(answer)
        else:
            answer(self._durable[name] >> 64, None)

    def done(self, name: str, seq: int | None, reason: str | None) -> None:
        """
        The journal answered the message of the key ``name``: durable at
        ``seq``, or refused for ``reason`` (then the key leaves the window).
        Duplicates that waited get the same answer.
        """
        inflight = self._inflight.pop(name, None)
        if inflight is None:
            return
        known, waiting = inflight
        if reason is None and seq is not None:
            self._durable[name] = seq << 64 | known
            second = int(self.clock.seconds())
            buckets = self._buckets
            if buckets and buckets[-1][0] == second:
                buckets[-1][1].append(name)
            else:
                buckets.append((second, deque((name,))))
        for answer in waiting:
            answer(seq, reason)

    def learn(self, record: Any) -> None:
        """
        A keyed message record another worker wrote (``user``, ``key``,
        ``seq``, ``time``, ``text`` as the record's JSON): in the window from
        now on, unless it is older than the window or the key is known.
        """
        name = record.user + " " + record.key
        if name in self._durable or record.time < self.clock.seconds() - self.seconds:
            return
        self._durable[name] = record.seq << 64 | (hash(bytes(record.text)) & _MASK)
        second = int(record.time)
        buckets = self._buckets
        if buckets and buckets[-1][0] >= second:
            buckets[-1][1].append(name)
        else:
            buckets.append((second, deque((name,))))

    def written(self, user: str, key: str, text: str) -> tuple[int | None, Any] | None:
        """
        Whether another worker wrote ``user``'s ``key`` (it is durable in the
        window while this worker still has it in flight): ``(seq,
        DUPLICATE)`` with the same text, ``(None, CONFLICT)`` with another,
        None when it did not.
        """
        packed = self._durable.get(f"{user} {key}")
        if packed is None:
            return None
        if packed & _MASK == hash(_encode(text)) & _MASK:
            return packed >> 64, DUPLICATE
        return None, CONFLICT

    def rebuild(self, records: Iterable[Any]) -> None:
        """
        Put back the keyed message records that recovery read from the end of
        the journal, oldest first (:func:`cserver.journal.keyed.keyed_since`:
        ``user``, ``key``, ``seq``, ``time`` and ``text``, the text's JSON as
        the record holds it); those older than the window are not.
        """
        cutoff = self.clock.seconds() - self.seconds
        durable, buckets = self._durable, self._buckets
        names: deque[str] = buckets[-1][1] if buckets else deque()
        second = buckets[-1][0] if buckets else None
        for record in records:
            when = record.time
            if when < cutoff:
                continue
            name = record.user + " " + record.key
            durable[name] = record.seq << 64 | (hash(bytes(record.text)) & _MASK)
            if int(when) != second:
                second = int(when)
                names = deque()
                buckets.append((second, names))
            names.append(name)
        self._expire(self.clock.seconds())
