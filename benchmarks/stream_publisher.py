"""The floor for a journal on a stream: a bare Twisted publisher of the
records two cserver nodes would write, with ``Nats-Msg-Id``, against the same
JetStream stream, ``--inflight`` at a time (a closed loop, as ``-c``
clients each awaiting their ack), ``--messages`` in all::

    python benchmarks/stream_publisher.py nats://HOST:PORT[,...]/STREAM \\
        [--inflight 1000] [--messages 50000]

Prints one JSON line: ``acked``, ``seconds``, ``per_s``.  It uses the same
NATS client as the server (:mod:`cserver.nats`), so the ratio of the two is
what the server adds: the line protocol, AUTH, the reply queues.
"""

import argparse
import json
import os
import sys
import time

from twisted.internet import defer, task

from cserver.journal.record import message_body
from cserver.journal.stream_open import stream_config
from cserver.journal.stream_url import parse_stream_url
from cserver.nats.client import NATSClient
from cserver.nats.jetstream import JetStream
from cserver.nats.wire import NoResponders


@defer.inlineCallbacks
def publish(reactor, url, inflight, messages):
    stream = parse_stream_url(url)
    client = NATSClient(reactor, stream.server_urls, name="stream-publisher")
    yield client.start()
    jetstream = JetStream(client)
    # The stream as a node makes it (file storage, 3 replicas), if missing.
    yield jetstream.create_stream(stream_config(stream, 3, 120.0))
    pid, prefix = os.getpid(), f"floor {os.getpid()} "
    sent = acked = 0
    done = defer.Deferred()
    start = time.perf_counter()

    def one(_=None):
        nonlocal sent
        if sent >= messages:
            return
        sent += 1
        body = message_body(time.time(), pid, "bench", f"text of {sent}", "tcp:127.0.0.1:1",
                            node="floor")
        send(body, prefix + str(sent))

    def answered(_ack):
        nonlocal acked
        acked += 1
        if acked == messages:
            done.callback(None)
        else:
            one()

    def failed(failure, body, msg_id):
        if failure.check(NoResponders) and time.perf_counter() - start < 10:
            # The stream's interest has not reached this server yet (it was
            # just created): the same publish again, shortly.
            reactor.callLater(0.05, send, body, msg_id)
        elif not done.called:
            done.errback(failure)

    def send(body, msg_id):
        d = jetstream.publish(stream.subject, body, msg_id=msg_id,
                              expected_stream=stream.stream, timeout=30)
        d.addCallbacks(answered, failed, errbackArgs=(body, msg_id))

    for _ in range(min(inflight, messages)):
        one()
    yield done
    seconds = time.perf_counter() - start
    print(json.dumps({"acked": acked, "seconds": round(seconds, 3),
                      "per_s": round(acked / seconds, 1)}), flush=True)
    yield client.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--inflight", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50_000)
    args = parser.parse_args(argv)
    task.react(lambda reactor: publish(reactor, args.url, args.inflight, args.messages))


if __name__ == "__main__":
    sys.exit(main())
