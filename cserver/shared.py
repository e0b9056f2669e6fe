"""Shared memory between the parent and its worker processes (``--workers``).

One anonymous file (``memfd``) that the parent creates and every worker maps:

- a *journal header* -- the state the workers' journals agree on under the
  journal file's lock: the last seq written, the end offset of the last
  whole record, a busy mark (the pid of a worker writing now; a worker killed
  mid-write leaves it set, and the next writer cuts the file back to
  ``end``), the count of message records, and a broken flag (an fsync failed
  somewhere: every worker refuses MSGs until restart); ``commit_seq`` and
  ``commit_messages`` are the values a writer is publishing (set while it
  updates ``last_seq``/``end``/``messages`` one by one, so that the next writer
  can finish the update if it was killed in the middle of it);
- one *slot* of counters per worker, which only that worker writes and
  anyone reads (the parent sums them; STATS reports the sums).

Values are int64s read and written through a ``memoryview.cast("q")``: one
aligned 8-byte store each, which no reader sees half-done.
"""

import mmap
import os
from functools import partial

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
_HEADER_SIZE = 8  # int64s
_SLOT_SIZE = 16  # int64s


def _size(workers):
    return 8 * (_HEADER_SIZE + _SLOT_SIZE * workers)


class Shared:
    """
    The mapped memory: :attr:`header` and :meth:`slot`.

    Create it in the parent with :meth:`create`; open it in a worker with
    :meth:`attach`, from the file descriptor the parent passed down.
    """

    def __init__(self, fd, workers):
        self.fd = fd
        self.workers = workers
        self._map = mmap.mmap(fd, _size(workers))
        self._ints = memoryview(self._map).cast("q")
        self.header = Fields(self._ints, 0, HEADER_FIELDS)

    @classmethod
    def create(cls, workers):
        fd = os.memfd_create("cserver-shared", 0)  # not CLOEXEC: workers inherit it
        os.ftruncate(fd, _size(workers))
        shared = cls(fd, workers)
        shared.header.magic = _MAGIC
        return shared

    @classmethod
    def attach(cls, fd, workers):
        shared = cls(fd, workers)
        if shared.header.magic != _MAGIC:
            raise ValueError("not a cserver shared memory segment")
        return shared

    def slot(self, index):
        """
        The counters of worker ``index`` (0-based).
        """
        if not 0 <= index < self.workers:
            raise IndexError(f"worker {index} of {self.workers}")
        return Fields(self._ints, _HEADER_SIZE + _SLOT_SIZE * index, SLOT_FIELDS)

    def totals(self):
        """
        Every counter summed over the workers (``peak`` and ``inflight_peak``
        summed too: the most open at once across workers is at most that).
        """
        sums = dict.fromkeys(SLOT_FIELDS, 0)
        for index in range(self.workers):
            slot = self.slot(index)
            for name in SLOT_FIELDS:
                sums[name] += getattr(slot, name)
        del sums["pid"]
        return sums

    def close(self):
        self._ints.release()
        self._map.close()


class Fields:
    """
    Named int64 fields at an offset of a shared ``memoryview.cast("q")``.
    """

    __slots__ = ("_ints", "_index")

    def __init__(self, ints, offset, names):
        object.__setattr__(self, "_ints", ints)
        object.__setattr__(self, "_index", {name: offset + i for i, name in enumerate(names)})

    def __getattr__(self, name):
        try:
            return self._ints[self._index[name]]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        try:
            self._ints[self._index[name]] = value
        except KeyError:
            raise AttributeError(name) from None

    def reader(self, name):
        """
        A callable that returns the field's current value: cheaper than the
        attribute where it is read once per message.
        """
        return partial(self._ints.__getitem__, self._index[name])

    def add(self, name, amount=1):
        """
        Add to one field (only its owner writes it, so no lock is needed).
        """
        index = self._index[name]
        self._ints[index] += amount
