"""cserver beside Redis on the same job, in one run: N clients making
durable appends, closed loop.

- cserver: ``twistd -n cserver`` (``--fsync always``, the default: each
  MSG acknowledged once its record is fdatasync'd), single process and with
  ``--workers 2``, driven by ``cserver-client bench -c N -n K``;
- Redis: ``redis-server --appendonly yes --appendfsync always`` (each write
  acknowledged once the append-only file is fsync'd), driven by
  ``redis-benchmark -c N -n N*K XADD cserver-bench * text hello``: one
  append to a stream per request, the Redis Streams way of keeping a log.

Runs alternate (cserver, cserver --workers 2, Redis, cserver, ...) so drift
on a busy machine hits all of them alike; every run has a fresh server and
a fresh journal or AOF; the table shows medians::

    python benchmarks/peers.py [--connections N] [--messages K] [--runs R]

Both clients run on the same machine as the servers.  The two are not the
same program: ``cserver-client bench`` is Python on Twisted and takes a
larger share of the CPUs than ``redis-benchmark``, which is C -- so the
cserver figures here are a lower bound of what a C load generator gets
(docs/performance.rst has those, measured with one from outside this
repository).  Needs ``redis-server`` and ``redis-benchmark`` (Debian's
``redis-server`` and ``redis-tools``).
"""

import argparse
import csv
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from _servers import cserver, free_port, raise_open_files, rst_table, run_bench

USER = "bench"


def run_cserver(directory, connections, messages, *options):
    with cserver(directory, *options, user=USER) as server:
        report = run_bench(server.port, USER, ["-c", str(connections), "-n", str(messages)],
                           timeout=300)
    if not report.get("ok"):
        raise SystemExit(f"cserver {' '.join(options)}: {report.get('notes')}")
    return report["msg_per_s"]


def _wait_for_pong(port, process, timeout=30.0):
    """
    Wait until the Redis on ``port`` answers PING (it sends no greeting).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"redis-server exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"redis-server did not answer PING on port {port} within {timeout:g} s")


def run_redis(directory, connections, messages):
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
               "--appendonly", "yes", "--appendfsync", "always", "--save", "",
               "--dir", directory, "--maxclients", str(connections + 100),
               "--tcp-backlog", "4096", "--protected-mode", "no", "--daemonize", "no"]
    redis = subprocess.Popen(command, cwd=directory, stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT)
    try:
        _wait_for_pong(port, redis)
        done = subprocess.run(
            ["redis-benchmark", "-p", str(port), "-c", str(connections),
             "-n", str(connections * messages), "--csv",
             "XADD", "cserver-bench", "*", "text", "hello"],
            capture_output=True, text=True, timeout=300, check=False)
    finally:
        redis.terminate()
        redis.wait(30)
    rows = list(csv.reader(io.StringIO(done.stdout)))
    if done.returncode or len(rows) < 2:
        raise SystemExit(f"redis-benchmark failed: {done.stderr.strip() or done.stdout}")
    return float(rows[1][1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    for tool in ("redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            raise SystemExit(f"peers.py needs {tool} (apt-get install redis-server redis-tools)")
    raise_open_files()
    who = {
        "cserver": lambda d: run_cserver(d, args.connections, args.messages),
        "cserver --workers 2": lambda d: run_cserver(d, args.connections, args.messages,
                                                     "--workers", "2"),
        "redis (appendfsync always)": lambda d: run_redis(d, args.connections, args.messages),
    }
    rates = {name: [] for name in who}
    for run in range(args.runs):
        for name, measure in who.items():
            with tempfile.TemporaryDirectory() as directory:
                rate = measure(directory)
            rates[name].append(rate)
            print(f"  run {run + 1}/{args.runs}: {name}: {rate:,.0f} appends/s",
                  file=sys.stderr, flush=True)
    redis = statistics.median(rates["redis (appendfsync always)"])
    body = [[name, f"{statistics.median(values):,.0f}",
             f"{min(values):,.0f}-{max(values):,.0f}",
             f"{statistics.median(values) / redis:.2f}"]
            for name, values in rates.items()]
    print(f"{args.connections} clients x {args.messages} durable appends each, closed loop, "
          f"median of {args.runs} runs ({os.cpu_count()} CPUs):\n")
    print(rst_table(["server", "appends/s", "range", "x redis"], body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
