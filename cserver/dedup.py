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

import math
import re
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from xxhash import xxh3_64_intdigest

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


def digest(text: str) -> int:
    """
    A text's digest: the 64-bit XXH3 of its JSON, as a record holds it (so
    a record's text is digested without decoding it).  The same in every
    process, unlike ``hash()``.
    """
    return xxh3_64_intdigest(_encode(text))


#: The low 64 bits of a packed entry hold the text's digest.
_MASK = (1 << 64) - 1


class DedupWindow:
    """
    The keys of the last ``seconds`` seconds (at most ``keys`` of them).

    Each key costs one dict entry, ``"<user> <key>"`` (neither holds a
    space: AUTH reads a user name up to one) to one int, the seq and the
    text's digest packed (seq 0 while the record is in flight), and a place
    in a per-second bucket list (the second it was taken).  Duplicates
    waiting for a key in flight sit apart.

    :param clock: ``seconds()`` gives the time (the reactor, a task.Clock).
    """

    def __init__(self, clock: Any, seconds: float = DEFAULT_SECONDS,
                 keys: int = DEFAULT_KEYS) -> None:
        self.clock = clock
        self.seconds = seconds
        self.keys = keys
        #: name -> seq << 64 | digest; seq 0: in flight.
        self._entries: dict[str, int] = {}
        #: The duplicates waiting for a key in flight.
        self._waiting: dict[str, list[Answer]] = {}
        #: Keys another worker wrote while this one had them in flight.
        self._elsewhere: dict[str, int] = {}
        #: Names of refused keys, still in a bucket: how many places.
        self._stale: dict[str, int] = {}
        self._buckets: deque[tuple[int, deque[str]]] = deque()
        #: The newest bucket's names, and the end of its second; when the
        #: oldest bucket is out of the window (kept beside the buckets: the
        #: hot path reads them rather than index the deque).
        self._tail: deque[str] = deque()
        self._tail_end = -math.inf
        self._expiry_at = math.inf
        #: Requests answered as duplicates since start.
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        buckets, entries = self._buckets, self._entries
        # A bucket holds the keys of one whole second: it goes once all of
        # that second is out of the window (a key may stay up to a second
        # longer than its window, never less).  A key still in flight stays,
        # moved to the newest second.
        cutoff = now - self.seconds - 1
        while buckets and buckets[0][0] <= cutoff:
            kept = []
            for name in buckets.popleft()[1]:
                if self._stale and self._unstale(name):
                    continue
                packed = entries.get(name)
                if packed is None:
                    continue
                if packed >> 64:
                    del entries[name]
                else:
                    kept.append(name)
            if kept:
                self._into_bucket(int(now), kept)
        while len(entries) > self.keys and buckets:
            names = buckets[0][1]
            if self._stale and self._unstale(names[0]):
                names.popleft()
                if not names:
                    buckets.popleft()
                continue
            packed = entries.get(names[0])
            if packed is not None and not packed >> 64:
                break  # the oldest is in flight: it goes once it is durable
            name = names.popleft()
            if packed is not None:
                del entries[name]
            if not names:
                buckets.popleft()
        self._retail()

    def _unstale(self, name: str) -> bool:
        """Whether this place of ``name`` is a refused key's (then it is gone)."""
        count = self._stale.get(name)
        if count is None:
            return False
        if count == 1:
            del self._stale[name]
        else:
            self._stale[name] = count - 1
        return True

    def _retail(self) -> None:
        buckets = self._buckets
        if buckets:
            self._tail_end = buckets[-1][0] + 1
            self._tail = buckets[-1][1]
            self._expiry_at = buckets[0][0] + 1 + self.seconds
        else:
            self._tail_end = -math.inf
            self._expiry_at = math.inf

    def _into_bucket(self, second: int, names: Iterable[str]) -> None:
        buckets = self._buckets
        if buckets and buckets[-1][0] >= second:
            buckets[-1][1].extend(names)
        else:
            buckets.append((second, deque(names)))
        self._retail()

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
        now = self.clock.seconds()
        entries = self._entries
        if now >= self._expiry_at or len(entries) > self.keys:
            self._expire(now)
        name = f"{user} {key}"
        packed = entries.get(name)
        if packed is None:
            entries[name] = xxh3_64_intdigest(_encode(text))
            if now < self._tail_end:
                self._tail.append(name)
            else:
                self._into_bucket(int(now), (name,))
            return "new", name
        if packed & _MASK == xxh3_64_intdigest(_encode(text)):
            return "duplicate", name
        return "conflict", name

    def wait(self, name: str, answer: Answer) -> None:
        """
        Answer a duplicate of the key ``name`` (:meth:`check` said so) with
        the first record's seq: ``answer(seq, None)`` at once if it is
        durable, else once it is (``answer(None, reason)`` if it is refused).
        (:attr:`duplicates` counts them as they are answered: see the
        factory's ``duplicate_done``.)
        """
        seq = self._entries[name] >> 64
        if seq:
            answer(seq, None)
        else:
            self._waiting.setdefault(name, []).append(answer)

    def done(self, name: str, seq: int | None, reason: str | None) -> None:
        """
        The journal answered the message of the key ``name``: durable at
        ``seq``, or refused for ``reason`` (then the key leaves the window,
        unless another worker wrote it).  Duplicates that waited get the same
        answer.
        """
        entries = self._entries
        packed = entries.get(name)
        if packed is not None and not packed >> 64:
            other = self._elsewhere.pop(name, None) if self._elsewhere else None
            if reason is None and seq is not None:
                entries[name] = seq << 64 | packed
            elif other is not None:
                entries[name] = other
            else:
                # Refused: the key leaves; its name's place in its bucket is
                # passed over when that bucket expires (a later PUT of the key
                # has a place of its own, and must not leave early).
                del entries[name]
                self._stale[name] = self._stale.get(name, 0) + 1
        waiting = self._waiting.pop(name, None) if self._waiting else None
        if waiting:
            for answer in waiting:
                answer(seq, reason)

    def learn(self, record: Any) -> None:
        """
        A keyed message record another worker wrote (``user``, ``key``,
        ``seq``, ``time``, ``text`` as the record's JSON): in the window from
        now on, unless it is older than the window or the key is known.
        """
        name = record.user + " " + record.key
        if record.time < self.clock.seconds() - self.seconds:
            return
        packed = self._entries.get(name)
        entry = record.seq << 64 | xxh3_64_intdigest(record.text)
        if packed is None:
            self._entries[name] = entry
            self._into_bucket(int(record.time), (name,))
        elif not packed >> 64:
            self._elsewhere[name] = entry  # this worker has it in flight

    def written(self, user: str, key: str, text: str) -> tuple[int | None, Any] | None:
        """
        Whether another worker wrote ``user``'s ``key`` while this worker
        has it in flight: ``(seq, DUPLICATE)`` with the same text, ``(None,
        CONFLICT)`` with another, None when it did not.
        """
        name = f"{user} {key}"
        packed = self._elsewhere.get(name)
        if packed is None:
            # Known durable without this worker's check (a journal fed
            # directly): as good as written elsewhere.
            packed = self._entries.get(name)
            if packed is None or not packed >> 64:
                return None
        if packed & _MASK == digest(text):
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
        entries, buckets = self._entries, self._buckets
        names: deque[str] = buckets[-1][1] if buckets else deque()
        second = buckets[-1][0] if buckets else None
        for record in records:
            when = record.time
            if when < cutoff:
                continue
            name = record.user + " " + record.key
            entries[name] = record.seq << 64 | xxh3_64_intdigest(record.text)
            if int(when) != second:
                second = int(when)
                names = deque()
                buckets.append((second, names))
            names.append(name)
        self._retail()
        self._expire(self.clock.seconds())
