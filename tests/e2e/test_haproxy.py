"""End-to-end tests: HAProxy, run with the shipped example configuration
(contrib/haproxy/cserver.cfg, loopback addresses substituted by
tests/haproxy.py), in front of two real ``twistd -n cserver`` nodes, each
with its own file journal.  What the balancer guarantees: 1000 clients spread
over both nodes and all served; a connection sent to a dead node redispatched
to a live one; a node killed with SIGKILL left out once its health check
fails and used again once it passes; a check that wants the cserver greeting,
not just a TCP connect; a keyed resend answered ``dup`` by the node that took
it; half-closing clients answered in full.  (Dedup across nodes needs the
replicated journal: not tested here.)  Skipped without the haproxy binary
(Debian package haproxy)."""

import contextlib
import json
import pathlib
import re
import socket
import subprocess
import sys
import threading

import pytest

from ..haproxy import EXAMPLE, HAProxyProcess, find_haproxy
from ..server_process import LineClient, ServerProcess, read_journal
from .test_halfclose import half_close

pytestmark = pytest.mark.skipif(find_haproxy() is None,
                                reason="needs haproxy (Debian package haproxy)")

USER = "alice"


def start_node(directory, *options, port=0, journal=None):
    """A cserver node on loopback (``port`` 0: a free one), its journal in ``directory``
    unless ``journal`` names one."""
    pathlib.Path(directory).mkdir(exist_ok=True)
    return ServerProcess(directory, "--users", USER, *options,
                         "--port", f"tcp:{port}:interface=127.0.0.1:backlog=1024",
                         journal=journal).start()


def messages(node, prefix):
    """The texts of the message records starting with ``prefix`` in ``node``'s journal."""
    return [r["text"] for r in read_journal(node.journal)
            if r["event"] == "message" and r["text"].startswith(prefix)]


def keys(node):
    """The keys of the keyed records in ``node``'s journal."""
    return {r["key"] for r in read_journal(node.journal) if r.get("key")}


class Cluster:
    """Two cserver nodes (``tmp_path``/node1, node2) and HAProxy in front of them."""

    def __init__(self, directory):
        self.directory = directory
        self.nodes = []
        self.proxy = None
        self._started = []

    def start(self, *options):
        for n in (1, 2):
            self.add(start_node(self.directory / f"node{n}", *options))
        self.proxy = HAProxyProcess(self.directory, [node.port for node in self.nodes]).start()
        return self

    def add(self, node):
        self._started.append(node)
        self.nodes.append(node)
        return node

    def connect(self):
        """A client through the balancer, authenticated."""
        client = LineClient(self.proxy.port)
        assert client.request(f"AUTH {USER}") == f"OK {USER}"
        return client

    def close(self):
        if self.proxy is not None:
            self.proxy.stop()
        for node in self._started:
            if node.process.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.stop(timeout=10)
            if node.process.poll() is None:
                node.kill()


@pytest.fixture
def cluster(tmp_path):
    """Start a :class:`Cluster` in ``tmp_path`` with ``cluster(*node options)``; every
    HAProxy and node still running is stopped after the test."""
    made = []

    def start(*options):
        made.append(Cluster(tmp_path))
        return made[-1].start(*options)

    yield start
    for each in made:
        each.close()


def test_the_shipped_example_is_a_valid_haproxy_config():
    """``haproxy -c -f contrib/haproxy/cserver.cfg`` accepts the example as it stands."""
    done = subprocess.run([find_haproxy(), "-c", "-f", str(EXAMPLE)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_1000_clients_through_haproxy_are_all_served_by_both_nodes(cluster):
    """``cserver-client bench -c 1000 -n 1`` through HAProxy: 1000 sessions open at
    once, all authenticated, every MSG acknowledged; the two journals together hold
    each text exactly once, and leastconn gave each node a real share (over a
    third of the 1000)."""
    made = cluster()
    nodes, proxy = made.nodes, made.proxy
    done = subprocess.run(
        [sys.executable, "-m", "cserver.client", "bench", "--port", str(proxy.port),
         "--user", USER, "-c", "1000", "-n", "1", "--text", "lb", "--json"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + proxy.output()[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert (report["connections"], report["acked"], report["errors"]) == (1000, 1000, {})
    per_node = [messages(node, "lb ") for node in nodes]
    assert sorted(per_node[0] + per_node[1]) == sorted(f"lb {c} 0" for c in range(1000))
    assert min(len(texts) for texts in per_node) > 333, [len(t) for t in per_node]
    # The one node the barrier's STATS reached had its share open at once.
    assert 333 < report["server_connections"] < 667, report


def test_a_killed_node_is_left_out_and_used_again_once_back(cluster):
    """A node killed with SIGKILL: its client's connection through HAProxy is
    closed; new clients connecting at once, before the health check noticed, are
    redispatched to the other node and served; once the check marks it DOWN (seen
    on the stats socket) every new client is served by the other node, and the
    dropped client's PUT resent with its key through the balancer is acknowledged
    there.  Restarted on its port and journal, the node passes its check again
    (UP, L7OK), and new clients go to it: with leastconn, all of them while the
    other node holds more sessions."""
    made = cluster()
    proxy = made.proxy
    first = made.connect()
    reply = first.request("PUT k-before-kill before the kill")
    assert re.fullmatch(r"OK \d+", reply), reply
    victim = next(n for n, node in enumerate(made.nodes) if "k-before-kill" in keys(node))
    survivor = 1 - victim
    victim_name, survivor_name = proxy.names()[victim], proxy.names()[survivor]
    made.nodes[victim].kill()
    with pytest.raises(ConnectionError):
        first.request("STATS")
    first.close()

    # Before the check notices (it needs two failures, 500 ms apart), a new
    # connection sent to the dead node is refused and redispatched.
    early = [made.connect() for _ in range(6)]
    acks = [client.request(f"MSG early {n}") for n, client in enumerate(early)]
    assert all(re.fullmatch(r"OK \d+", ack) for ack in acks), acks
    [row] = [row for row in proxy.stats() if row["svname"] == victim_name]
    assert int(row["wredis"]) >= 1 and row["status"] != "DOWN", row
    for client in early:
        client.close()

    proxy.wait_for_servers({victim_name: "DOWN", survivor_name: "UP"})
    clients = [made.connect() for _ in range(20)]
    acks = [client.request(f"MSG while down {n}") for n, client in enumerate(clients)]
    assert all(re.fullmatch(r"OK \d+", ack) for ack in acks), acks
    assert sorted(messages(made.nodes[survivor], "while down ")) == sorted(
        f"while down {n}" for n in range(20))
    retry = made.connect()
    # "OK <seq> dup" needs the node that took the key first, or a journal shared
    # with it: here the survivor journals it as new.
    assert re.fullmatch(r"OK \d+( dup)?", retry.request("PUT k-before-kill before the kill"))
    assert "k-before-kill" in keys(made.nodes[survivor])
    clients.append(retry)

    old = made.nodes[victim]
    made.nodes[victim] = made.add(start_node(old.directory, port=old.port,
                                             journal=old.journal))
    servers = proxy.wait_for_servers({victim_name: "UP", survivor_name: "UP"})
    assert servers[survivor_name][2] == 21, servers
    back = [made.connect() for _ in range(10)]
    acks = [client.request(f"MSG after return {n}") for n, client in enumerate(back)]
    assert all(re.fullmatch(r"OK \d+", ack) for ack in acks), acks
    assert sorted(messages(made.nodes[victim], "after return ")) == sorted(
        f"after return {n}" for n in range(10))
    assert messages(made.nodes[survivor], "after return ") == []
    for client in clients + back:
        client.close()


def test_a_keyed_resend_is_a_dup_on_the_node_that_took_it(cluster):
    """A client's PUT, its connection then dropped, resent with its key through the
    balancer: reaching the node that took it (the other node drained through the
    stats socket, as an operator drains one), it is answered ``OK <seq> dup`` with
    the first seq and journaled once; reaching the other node (the first one
    drained), it is acknowledged there as well -- that one answers ``dup`` only once
    the nodes share a journal (not tested here)."""
    made = cluster()
    proxy = made.proxy
    first = made.connect()
    reply = first.request("PUT k-resent the text")
    assert re.fullmatch(r"OK \d+", reply), reply
    [took] = proxy.serving()
    [other] = [name for name in proxy.names() if name != took]
    first.close()
    proxy.wait_idle()

    proxy.set_state(other, "drain")
    proxy.wait_for_servers({other: "DRAIN"})
    same = made.connect()
    assert proxy.serving() == [took]
    assert same.request("PUT k-resent the text") == f"{reply} dup"
    same.close()
    proxy.wait_idle()
    node = made.nodes[proxy.names().index(took)]
    assert [r["key"] for r in read_journal(node.journal) if r.get("key")] == ["k-resent"]

    proxy.set_state(other, "ready")
    proxy.set_state(took, "drain")
    proxy.wait_for_servers({other: "UP", took: "DRAIN"})
    elsewhere = made.connect()
    assert proxy.serving() == [other]
    assert re.fullmatch(r"OK \d+( dup)?", elsewhere.request("PUT k-resent the text"))
    elsewhere.close()
    proxy.set_state(took, "ready")


class NotCserver:
    """A TCP service on loopback that is not cserver: it accepts, sends an SSH
    banner and closes."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.sock.accept()
                with connection:
                    connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    def close(self):
        self.sock.close()


def test_the_health_check_wants_the_cserver_greeting(tmp_path):
    """A backend that accepts TCP connections but does not greet ``HELLO cserver``
    fails the layer-7 check (L7RSP) and is DOWN; every client goes to the real
    node."""
    node = start_node(tmp_path / "node1")
    impostor = NotCserver()
    proxy = HAProxyProcess(tmp_path, [node.port, impostor.port])
    try:
        proxy.start(wanted={"node1": "UP", "node2": "DOWN"})
        assert proxy.servers()["node2"][:2] == ("DOWN", "L7RSP"), proxy.servers()
        clients = [LineClient(proxy.port) for _ in range(10)]
        for n, client in enumerate(clients):
            assert client.request(f"AUTH {USER}") == f"OK {USER}"
            assert re.fullmatch(r"OK \d+", client.request(f"MSG real {n}"))
        assert len(messages(node, "real ")) == 10
        for client in clients:
            client.close()
    finally:
        proxy.stop()
        impostor.close()
        node.stop()


def test_half_closing_clients_through_haproxy_get_every_reply(cluster):
    """Nodes that answer each MSG 0.5 s late (--work-delay), so every reply is
    sent after the client's FIN went through HAProxy to the node: twenty clients
    each send AUTH, three MSGs and QUIT then shutdown(SHUT_WR), and one sends 200
    MSGs without QUIT; each gets every reply in order (the greeting, OK alice, an
    OK <seq> per MSG, OK bye), then the close."""
    proxy = cluster("--work-delay", "0.5").proxy
    results = [None] * 21

    def client(n):
        lines = "".join(f"MSG hc{n} {i}\n" for i in range(3)) + "QUIT\n"
        results[n] = half_close(proxy.port, f"AUTH {USER}\n{lines}".encode())

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    results[20] = half_close(proxy.port, f"AUTH {USER}\n".encode() + b"".join(
        b"MSG pipelined %d\n" % i for i in range(200)))
    for thread in threads:
        thread.join(60)
    for lines in results:
        assert lines[0].startswith("HELLO cserver ") and lines[1] == f"OK {USER}", lines
        seqs = [int(line[3:]) for line in lines[2:] if re.fullmatch(r"OK \d+", line)]
        assert seqs == sorted(seqs), lines
    for lines in results[:20]:
        assert len(lines) == 6 and lines[5] == "OK bye", lines
    assert len(results[20]) == 202, results[20][-3:]
