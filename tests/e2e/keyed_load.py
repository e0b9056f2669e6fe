"""A load of keyed messages through RetryingSenders, for the exactly-once
test: ``python -m tests.e2e.keyed_load PORT USER CLIENTS MESSAGES REPORT``.

What ``cserver-client bench --keyed --retry`` runs
(:func:`cserver.client.retry_bench.run_retrying`), 8 unacknowledged at a
time per client, printing ``acked N`` at every 100th ack (the test waits on
those to time its kills) and writing REPORT: the run's report as JSON, with
``seqs``, the seq each key was finally told.  Exits 1 when a message failed
for good.
"""

import json
import sys
from collections import Counter

import attrs
from twisted.internet import defer, task

from cserver.client.bench import BenchConfig
from cserver.client.retry_bench import run_retrying


@defer.inlineCallbacks
def run(reactor, port, user, clients, messages, report):
    config = BenchConfig(endpoint=f"tcp:host=127.0.0.1:port={port}", user=user,
                         connections=clients, messages=messages, pipeline=8, text="text of")
    result = yield run_retrying(reactor, config,
                                progress=lambda n: print(f"acked {n}", flush=True))
    with open(report, "w") as f:
        json.dump(attrs.asdict(result), f)
    print(f"done {result.acked}", flush=True)
    if not result.ok:
        raise SystemExit(1)


def check_exactly_once(records, result, count):
    """
    The journal's ``records`` against the load's ``result`` (its report): seqs
    contiguous from 1, each key once (0 doubled), all ``count`` of them (0
    lost), each at the seq its sender was finally told, none given up.
    """
    told = result["seqs"]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    keyed = [r for r in records if r["event"] == "message"]
    doubled = [key for key, n in Counter(r["key"] for r in keyed).items() if n > 1]
    assert doubled == []
    assert len(told) == count
    assert {r["key"]: r["seq"] for r in keyed} == told
    assert result["failed"] == []
    return keyed


def main():
    port, user, clients, messages, report = sys.argv[1:]
    task.react(run, (int(port), user, int(clients), int(messages), report))


if __name__ == "__main__":
    main()
