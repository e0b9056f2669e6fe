"""A load of keyed messages through RetryingSenders, for the exactly-once
test: ``python -m tests.e2e.keyed_load PORT USER CLIENTS MESSAGES REPORT``.

CLIENTS senders each send MESSAGES keyed messages, ``c<client>-<n>``, up to
8 unacknowledged at a time, each until acknowledged, whatever happens to
the server meanwhile.  Prints ``acked N`` to stdout at every 100th ack (the
test waits on those to time its kills) and writes REPORT: one JSON object,
``{"acked": {key: seq}, "duplicates": N, "resends": N, "reconnects": N}``.
Exits 1 when a message fails for good (a refusal no resend can change).
"""

import json
import sys

from twisted.internet import defer, task

from cserver.client.retrying import RetryingSender

WINDOW = 8


@defer.inlineCallbacks
def run(reactor, port, user, clients, messages, report):
    acked = {}
    senders = [RetryingSender(reactor, f"tcp:host=127.0.0.1:port={port}", user,
                              initial_delay=0.05, max_delay=0.5)
               for _ in range(clients)]
    failed = []

    def one(sender, key):
        def done(seq):
            acked[key] = int(seq)
            if len(acked) % 100 == 0:
                print(f"acked {len(acked)}", flush=True)

        def refused(reason):
            failed.append(f"{key}: {reason.value}")

        return sender.send(key, f"text of {key}").addCallbacks(done, refused)

    @defer.inlineCallbacks
    def client(index, sender):
        for start in range(0, messages, WINDOW):
            yield defer.gatherResults([one(sender, f"c{index}-{n}")
                                       for n in range(start, min(messages, start + WINDOW))])

    yield defer.gatherResults([client(i, s) for i, s in enumerate(senders)])
    for sender in senders:
        sender.stop()
    with open(report, "w") as f:
        json.dump({"acked": acked, "failed": failed,
                   "duplicates": sum(s.duplicates for s in senders),
                   "resends": sum(s.resends for s in senders),
                   "reconnects": sum(s.reconnects for s in senders)}, f)
    print(f"done {len(acked)}", flush=True)
    if failed:
        raise SystemExit(1)


def main():
    port, user, clients, messages, report = sys.argv[1:]
    task.react(run, (int(port), user, int(clients), int(messages), report))


if __name__ == "__main__":
    main()
