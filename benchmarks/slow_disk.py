"""A slow disk: where the journal is fdatasync'd, ``--sync reactor|thread|auto``.

Builds tests/e2e/fsync_fault.c, the LD_PRELOAD shim of the fsync tests, which
here makes every fdatasync of the server sleep DELAY ms before the real one
(a slower disk than this one).  For each DELAY in ``--delays`` (0 is this
disk as it is) and each ``--sync`` mode, it starts ``twistd -n cserver`` with
the shim, runs ``cserver-client bench -c C -n N`` against it, and meanwhile
a probe connection sends STATS, one every 5 ms, timing each round trip: how
long a request that needs no sync waits while the syncs run.  Every
combination is run ``--runs`` times (3), alternating; the table gives
medians: the bench's msg/s (message phase) and MSG latency, and the probe's
STATS latency.

    python benchmarks/slow_disk.py [--delays 0 5 20] [--runs 3] [-c 1000] [-n 20]
"""

import argparse
import getpass
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _servers  # noqa: E402

SHIM = os.path.join(_servers.REPO, "tests", "e2e", "fsync_fault.c")
MODES = ("reactor", "thread", "auto")


def build_shim(directory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        sys.exit("slow_disk: a C compiler (cc or gcc) is needed to build the fsync shim")
    library = os.path.join(directory, "fsync_fault.so")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", library, SHIM, "-ldl"], check=True)
    return library


class Probe(threading.Thread):
    """
    One connection sending STATS every ``interval`` seconds until stopped;
    :attr:`rtts` are the round trips, in seconds.
    """

    def __init__(self, port, user, interval=0.005):
        super().__init__(daemon=True)
        self.port, self.user, self.interval = port, user, interval
        self.rtts = []
        self.error = None
        self._halt = threading.Event()
        self._connected = threading.Event()

    def run(self):
        try:
            with (socket.create_connection(("127.0.0.1", self.port), timeout=30) as s,
                  s.makefile("rb") as replies):
                replies.readline()
                s.sendall(f"AUTH {self.user}\r\n".encode())
                if not replies.readline().startswith(b"OK"):
                    raise RuntimeError("AUTH refused")
                self._connected.set()
                while not self._halt.is_set():
                    start = time.perf_counter()
                    s.sendall(b"STATS\r\n")
                    if not replies.readline().startswith(b"OK "):
                        raise RuntimeError("STATS refused")
                    self.rtts.append(time.perf_counter() - start)
                    self._halt.wait(self.interval)
        except Exception as e:  # reported in the table
            self.error = e
        finally:
            self._connected.set()

    def start(self):
        super().start()
        self._connected.wait(30)
        return self

    def stop(self):
        self._halt.set()
        self.join(30)


def one_run(delay, options, shim, args):
    work = tempfile.mkdtemp(prefix="cserver-slow-disk-")
    env = {"LD_PRELOAD": shim, "CSERVER_FAULT_FSYNC_DELAY_MS": str(delay)}
    try:
        with _servers.cserver(work, *options, user=args.user, env=env) as server:
            probe = Probe(server.port, args.user).start()
            report = _servers.run_bench(server.port, args.user,
                                        ["-c", str(args.connections), "-n", str(args.messages)],
                                        args.timeout)
            probe.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if probe.error is not None:
        report["ok"] = False
        report.setdefault("notes", []).append(f"probe: {probe.error}")
    rtts = sorted(probe.rtts)
    report["stats_ms"] = {
        "p50": rtts[len(rtts) // 2] * 1e3 if rtts else None,
        "p99": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1e3 if rtts else None,
        "max": rtts[-1] * 1e3 if rtts else None,
    }
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 5, 20],
                        help="ms each fdatasync sleeps first (0: the disk as it is)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("-c", "--connections", type=int, default=1000)
    parser.add_argument("-n", "--messages", type=int, default=20)
    parser.add_argument("--user", default=getpass.getuser())
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    _servers.raise_open_files()
    build = tempfile.mkdtemp(prefix="cserver-shim-")
    try:
        shim = build_shim(build)
        results = {(d, m): [] for d in args.delays for m in MODES}
        for run in range(1, args.runs + 1):
            for delay in args.delays:
                for mode in MODES:
                    report = one_run(delay, ("--sync", mode), shim, args)
                    results[delay, mode].append(report)
                    state = "" if report["ok"] else "  FAILED: " + "; ".join(report["notes"])
                    print(f"slow_disk: run {run}/{args.runs}  fdatasync +{delay:>3} ms  "
                          f"{mode:<7}  {report.get('msg_per_s', 0):>8.0f} msg/s  "
                          f"STATS p99 {report['stats_ms']['p99'] or 0:7.2f} ms{state}",
                          file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    print(f"slow_disk: {_servers.machine()}, Python {sys.version.split()[0]}; "
          f"bench -c {args.connections} -n {args.messages}, a STATS every 5 ms on one more "
          f"connection; median of {args.runs} runs")
    print("command: python benchmarks/" + " ".join(
        [os.path.basename(sys.argv[0]), *sys.argv[1:]]))
    print()
    head = ["fdatasync delay", "mode", "msg/s", "MSG p50 ms", "MSG p99 ms",
            "STATS p50 ms", "STATS p99 ms", "STATS max ms", "good runs"]
    body = []
    for (delay, mode), reports in results.items():
        good = [r for r in reports if r["ok"]]

        def median(get, fmt="{:,.2f}", good=good):
            values = [v for v in (get(r) for r in good) if v is not None]
            return fmt.format(statistics.median(values)) if values else "-"

        body.append([
            "none (this disk)" if delay == 0 else f"+{delay} ms",
            f"``--sync {mode}``",
            median(lambda r: r["msg_per_s"], "{:,.0f}"),
            median(lambda r: r["latency_ms"]["p50"]),
            median(lambda r: r["latency_ms"]["p99"]),
            median(lambda r: r["stats_ms"]["p50"]),
            median(lambda r: r["stats_ms"]["p99"]),
            median(lambda r: r["stats_ms"]["max"]),
            f"{len(good)}/{len(reports)}",
        ])
    print(_servers.rst_table(head, body, left=(0, 1)))


if __name__ == "__main__":
    main()
