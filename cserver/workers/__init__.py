"""``--workers N``: what the parent and its worker processes agree on.

The parent (made by :mod:`cserver.workers.parent`, run by
:class:`cserver.workers.supervisor.WorkerSupervisor`) starts each worker as
``python -m cserver.workers.worker`` (:data:`WORKER_MODULE`) with these
descriptors:

- 0: a pipe from the parent, which writes one line to it, the worker's
  :class:`WorkerStart` as JSON, and nothing more: end of file on it then
  means the parent is gone, and the worker stops;
- 1, 2: pipes to the parent, which logs what the worker prints;
- 3 (:data:`LISTEN_FD`): the listening socket, adopted with
  ``adoptStreamPort``;
- 4 (:data:`SHARED_FD`): the shared memory (:class:`cserver.journal.header.Shared`);
- 5 (:data:`LOCK_FD`): the journal's lock file (:mod:`cserver.journal.lock`), held
  open, and with it the lock, for as long as the worker lives.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from cserver.config import Config

__all__ = ["LISTEN_FD", "LOCK_FD", "SHARED_FD", "WORKER_MODULE", "WorkerStart"]

LISTEN_FD = 3
SHARED_FD = 4
LOCK_FD = 5
#: What ``python -m`` runs in a worker process.
WORKER_MODULE = "cserver.workers.worker"


@attrs.frozen
class WorkerStart:
    """
    What a worker is told when it starts.

    :ivar index: the worker's index, 0 to N-1: its slot in the shared memory.
    :ivar family: the listening socket's family, ``inet`` or ``inet6``.
    :ivar base_served: messages a dead predecessor in this slot had served
        (the sums keep counting from the server's start).
    :ivar base_auth_failures: the same for failed AUTHs.
    :ivar config: the server's options.
    """

    index: int
    family: str
    config: Config
    base_served: int = 0
    base_auth_failures: int = 0

    def encode(self) -> bytes:
        """:returns: one line of JSON, ending in a newline."""
        fields: dict[str, Any] = attrs.asdict(self, recurse=False)
        fields["config"] = self.config.as_dict()
        return json.dumps(fields).encode("utf-8") + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> WorkerStart:
        """
        :returns: the :class:`WorkerStart` that :meth:`encode` gave ``line``.
        :raises ValueError: ``line`` is not one.
        """
        fields = json.loads(line)
        fields["config"] = Config.from_dict(fields["config"])
        return cls(**fields)
