"""``cserver-client bench --keyed --retry``: keyed messages through
:class:`~cserver.client.retrying.RetryingSender` s, one per session, that
survive the server going away mid-run (a restart, a kill): every message is
sent until acknowledged, and the report says how many resends the server
answered ``dup``.

Each session sends ``messages`` keyed messages, ``<run>-<session>-<n>``, up
to ``pipeline`` unacknowledged at a time.  The run ends when every message
is acknowledged, or when one is refused for good (``ERR conflict``...).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer

from cserver.client.bench import BenchConfig
from cserver.client.retrying import RetryingSender


@attrs.define
class RetryReport:
    """What a retrying run found."""

    ok: bool
    messages: int
    acked: int
    duplicates: int
    resends: int
    reconnects: int
    seconds: float
    msg_per_s: float
    failed: list[str] = attrs.Factory(list)
    #: The seq each message's key got, key -> seq.
    seqs: dict[str, int] = attrs.Factory(dict)


@defer.inlineCallbacks
def run_retrying(reactor: Any, config: BenchConfig,
                 progress: Callable[[int], None] | None = None) -> Any:
    """
    Run ``config`` (its endpoint, user, connections, messages, pipeline and
    text) through RetryingSenders.

    :param progress: called with the count of acknowledged messages at every
        100th.
    :returns: a Deferred firing with a :class:`RetryReport`.
    """
    run = os.urandom(4).hex()
    senders = [RetryingSender(reactor, config.endpoint, config.user, config.password,
                              initial_delay=0.05, max_delay=0.5, timeout=config.timeout)
               for _ in range(config.connections)]
    seqs: dict[str, int] = {}
    failed: list[str] = []

    def one(sender: RetryingSender, key: str) -> defer.Deferred[None]:
        def acked(seq: int) -> None:
            seqs[key] = int(seq)
            if progress is not None and len(seqs) % 100 == 0:
                progress(len(seqs))

        def refused(reason: Any) -> None:
            failed.append(f"{key}: {reason.value}")

        return sender.send(key, f"{config.text} {key}").addCallbacks(acked, refused)

    @defer.inlineCallbacks
    def session(index: int, sender: RetryingSender) -> Any:
        step = max(1, config.pipeline)
        for start in range(0, config.messages, step):
            yield defer.gatherResults([
                one(sender, f"{run}-{config.first + index}-{n}")
                for n in range(start, min(config.messages, start + step))])

    started = time.perf_counter()
    yield defer.gatherResults([session(i, s) for i, s in enumerate(senders)])
    seconds = time.perf_counter() - started
    for sender in senders:
        sender.stop()
    total = config.connections * config.messages
    return RetryReport(
        ok=not failed and len(seqs) == total, messages=total, acked=len(seqs),
        duplicates=sum(s.duplicates for s in senders),
        resends=sum(s.resends for s in senders),
        reconnects=sum(s.reconnects for s in senders),
        seconds=round(seconds, 3), msg_per_s=round(len(seqs) / seconds, 1) if seconds else 0.0,
        failed=failed, seqs=seqs)
