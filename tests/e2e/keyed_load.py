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


def main():
    port, user, clients, messages, report = sys.argv[1:]
    task.react(run, (int(port), user, int(clients), int(messages), report))


if __name__ == "__main__":
    main()
