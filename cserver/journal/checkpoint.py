"""Checkpoints: where the next start may begin reading a journal.

A server that stops cleanly has read its journal whole at its own start
(recovery) and written the rest itself, every batch of it durable: it
leaves ``<journal>.checkpoint`` saying how far that is -- the byte offset,
the records, the last seq, the messages and the messages per user there --
so that the next start reads only what comes after (Kafka's recovery
point, PostgreSQL's checkpoint).  A checkpoint is taken only for the file
it names (its device and inode) and only while the file still holds the
bytes it saw before that offset (a hash of the last 4 KiB of them); else
the start reads the journal whole, as it does without one.  What a
checkpoint skips is not read again at start: ``cserver-journal verify``
always reads every record.
"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

import msgspec

from cserver.fs import replace_atomically

#: What a checkpoint's name adds to the journal's.
SUFFIX = ".checkpoint"
#: How many bytes before the checkpointed offset its hash covers.
TAIL = 4096


class Checkpoint(msgspec.Struct, forbid_unknown_fields=True):
    """
    One checkpoint, as its file holds it (one JSON object).
    """

    version: int
    dev: int
    ino: int
    size: int
    records: int
    last_seq: int
    messages: int
    carried: int
    users: dict[str, int]
    tail: str


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Checkpoint).decode


def path_for(journal: str) -> str:
    """The checkpoint file of the journal at ``journal``."""
    return journal + SUFFIX


def _tail_hash(f: BinaryIO, size: int) -> str | None:
    """
    The hash of the ``TAIL`` bytes before ``size`` in ``f``, or None if they
    do not end a line there.
    """
    start = max(0, size - TAIL)
    f.seek(start)
    data = f.read(size - start)
    if len(data) != size - start or not data.endswith(b"\n"):
        return None
    return hashlib.sha256(data).hexdigest()


def write(journal: str, size: int, records: int, last_seq: int, messages: int, carried: int,
          users: dict[str, int]) -> None:
    """
    Write the checkpoint of the journal at ``journal``, durable up to
    ``size`` bytes that hold ``records`` records up to ``last_seq``
    (``messages`` messages, ``carried`` of them from the files before it;
    ``users``: this file's messages per user), atomically.

    :raises OSError: it cannot be written (the old one, if any, stays).
    """
    with open(journal, "rb") as f:
        status = os.fstat(f.fileno())
        tail = _tail_hash(f, size)
    if tail is None or not records:
        return
    replace_atomically(path_for(journal), _encode(Checkpoint(
        version=1, dev=status.st_dev, ino=status.st_ino, size=size, records=records,
        last_seq=last_seq, messages=messages, carried=carried, users=users, tail=tail,
    )), prefix=".cserver-checkpoint-")


def read(journal: str, f: BinaryIO) -> Checkpoint | None:
    """
    The checkpoint of the journal at ``journal`` (open as ``f``), if there is
    one and it still holds for ``f``: the same file, at least as long, the
    same bytes before the checkpointed offset.  None otherwise (no file, not
    a checkpoint, another file's, a file cut or rewritten since).
    """
    try:
        with open(path_for(journal), "rb") as source:
            checkpoint = _decode(source.read(1 << 20))
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    status = os.fstat(f.fileno())
    if (checkpoint.version != 1 or (checkpoint.dev, checkpoint.ino)
            != (status.st_dev, status.st_ino) or not 0 < checkpoint.size <= status.st_size
            or _tail_hash(f, checkpoint.size) != checkpoint.tail):
        return None
    return checkpoint
