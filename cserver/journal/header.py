"""Shared memory between the parent and its worker processes (``--workers``).

One anonymous file (``memfd``) that the parent creates and every worker maps,
seen through :mod:`ctypes` structures laid over the mapping:

- a *journal header* (:class:`Header`) -- the state the workers' journals
  agree on under the journal file's lock: the last seq written, the end
  offset of the last whole record, a busy mark (the pid of a worker writing
  now; a worker killed mid-write leaves it set, and the next writer cuts the
  file back to ``end``), the count of message records, and a broken flag (an
  fsync failed somewhere: every worker refuses MSGs until restart);
  ``commit_seq`` and ``commit_messages`` are the values a writer is
  publishing (set while it updates ``last_seq``/``end``/``messages`` one by
  one, so that the next writer can finish the update if it was killed in the
  middle of it);
- one *slot* of counters per worker (:class:`Slot`), which only that worker
  writes and anyone reads (the parent sums them; STATS reports the sums).

Every field is an aligned int64: each read or write is one 8-byte load or
store, which no reader sees half-done.  A field access through a
:class:`ctypes.Structure` costs a fraction of what indexing a
``memoryview.cast("q")`` by name did, and a batch touches the header about
fourteen times under the lock (``benchmarks/header_bench.py``).
"""

from __future__ import annotations

import ctypes
import mmap
import os

#: Journal header fields, in order.
HEADER_FIELDS = (
    "magic", "last_seq", "end", "busy", "messages", "broken", "commit_seq", "commit_messages",
)
#: Per-worker counter fields, in order.
SLOT_FIELDS = (
    "pid", "connections", "peak", "served", "inflight", "inflight_peak", "auth_failures",
    "started",
)
_MAGIC = 0x63736572766572  # "cserver"
#: int64s per slot: room for more counters without changing the layout.
_SLOT_INTS = 16


class Header(ctypes.Structure):
    """
    The journal header: the fields of :data:`HEADER_FIELDS`, int64 each.
    """

    __slots__ = ()  # an unknown field name raises instead of landing in a __dict__
    _fields_ = [(name, ctypes.c_int64) for name in HEADER_FIELDS]


class Slot(ctypes.Structure):
    """
    One worker's counters: the fields of :data:`SLOT_FIELDS`, int64 each,
    padded to 16 int64s.
    """

    __slots__ = ()
    _fields_ = [(name, ctypes.c_int64) for name in SLOT_FIELDS] + [
        ("_spare", ctypes.c_int64 * (_SLOT_INTS - len(SLOT_FIELDS)))
    ]

    def add(self, name: str, amount: int = 1) -> None:
        """
        Add to one field (only its owner writes it, so no lock is needed).
        """
        setattr(self, name, getattr(self, name) + amount)


def _size(workers: int) -> int:
    return ctypes.sizeof(Header) + ctypes.sizeof(Slot) * workers


class Shared:
    """
    The mapped memory: :attr:`header` and :meth:`slot`.

    Create it in the parent with :meth:`create`; open it in a worker with
    :meth:`attach`, from the file descriptor the parent passed down.
    """

    def __init__(self, fd: int, workers: int) -> None:
        self.fd = fd
        self.workers = workers
        self._map = mmap.mmap(fd, _size(workers))
        self.header = Header.from_buffer(self._map)
        self._slots = [
            Slot.from_buffer(self._map, ctypes.sizeof(Header) + ctypes.sizeof(Slot) * index)
            for index in range(workers)
        ]

    @classmethod
    def create(cls, workers: int) -> Shared:
        """
        A new segment for ``workers`` workers, zeroed, in the parent.
        """
        fd = os.memfd_create("cserver-shared", 0)  # not CLOEXEC: workers inherit it
        os.ftruncate(fd, _size(workers))
        shared = cls(fd, workers)
        shared.header.magic = _MAGIC
        return shared

    @classmethod
    def attach(cls, fd: int, workers: int) -> Shared:
        """
        The segment the parent made, from its descriptor ``fd``, in a worker.

        :raises ValueError: ``fd`` is not such a segment.
        """
        shared = cls(fd, workers)
        if shared.header.magic != _MAGIC:
            shared.close()
            raise ValueError("not a cserver shared memory segment")
        return shared

    def slot(self, index: int) -> Slot:
        """
        The counters of worker ``index`` (0-based).
        """
        if not 0 <= index < self.workers:
            raise IndexError(f"worker {index} of {self.workers}")
        return self._slots[index]

    def totals(self) -> dict[str, int]:
        """
        Every counter summed over the workers (``peak`` and ``inflight_peak``
        summed too: the most open at once across workers is at most that).
        """
        sums = dict.fromkeys(SLOT_FIELDS, 0)
        for slot in self._slots:
            for name in SLOT_FIELDS:
                sums[name] += getattr(slot, name)
        del sums["pid"]
        return sums

    def close(self) -> None:
        """
        Unmap the segment once nothing here points into it any more (a
        journal or a server still holding the header or a slot keeps the
        mapping alive until it lets go).
        """
        del self.header
        self._slots = []
        try:
            self._map.close()
        except BufferError:  # a structure is still held elsewhere
            pass
