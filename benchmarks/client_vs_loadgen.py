"""Is the client the bottleneck?  ``cserver-client bench`` against the bench
kit's C load generator, both driving the same cserver.

Builds ``loadgen.c`` from the bench kit (for measuring only) into a temporary
directory, starts ``twistd -n cserver`` on a free loopback port, and runs
the C load generator and ``cserver-client bench`` alternately (1000 x 1 and
1000 x 50 by default), printing medians and the ratios (bars: bench time at
most 2x the C generator's for 1000 x 1; bench msg/s at least 0.6x for
1000 x 50).

    python benchmarks/client_vs_loadgen.py [--kit ../shared/bench] [--runs 5]
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _servers  # noqa: E402


def run_loadgen(loadgen, port, connections, messages, user):
    out = subprocess.run(
        [loadgen, "-p", str(port), "-n", str(connections), "-k", str(messages), "-u", user],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    found = re.search(r"RESULT total_ms=([\d.]+) msg_per_s=(\d+)", out)
    return float(found.group(1)), float(found.group(2))


def run_bench(port, connections, messages, user):
    report = _servers.run_bench(port, user, ["-c", str(connections), "-n", str(messages)], 300)
    if not report["ok"]:
        sys.exit(f"client_vs_loadgen: bench failed: {report.get('notes')}")
    return float(report["total_ms"]), float(report["msg_per_s"])


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kit", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                     "shared", "bench"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--user", default=os.environ.get("USER") or "root")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="client-vs-loadgen-")
    try:
        loadgen = os.path.join(work, "loadgen")
        subprocess.run(["gcc", "-O2", "-o", loadgen, os.path.join(args.kit, "loadgen.c")],
                       check=True)
        with _servers.cserver(work, user=args.user) as server:
            for connections, messages in ((1000, 1), (1000, 50)):
                rows = {"C loadgen": [], "cserver-client bench": []}
                for _ in range(args.runs):
                    rows["C loadgen"].append(
                        run_loadgen(loadgen, server.port, connections, messages, args.user))
                    rows["cserver-client bench"].append(
                        run_bench(server.port, connections, messages, args.user))
                med = {name: [statistics.median(column) for column in zip(*runs, strict=True)]
                       for name, runs in rows.items()}
                print(f"{connections} x {messages} against cserver, median of {args.runs}:")
                for name, (total, rate) in med.items():
                    print(f"  {name:<22} total {total:8.1f} ms   {rate:9.0f} msg/s")
                c_total, c_rate = med["C loadgen"]
                b_total, b_rate = med["cserver-client bench"]
                print(f"  bench / C: time {b_total / c_total:.2f}x, msg/s {b_rate / c_rate:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
