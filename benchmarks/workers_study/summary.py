"""Summarize bench.py results per configuration.

A prototype for the design study in docs/workers-design.rst, not part of
cserver.  Run from the repository root on the JSON lines that matrix.sh
wrote::

    python benchmarks/workers_study/summary.py RESULTS.jsonl [MORE.jsonl ...]

Prints, per label: runs, median and min-max msg/s, median p50/p99 ms, median
CPU us/msg per process, loadgen CPU, their sum, the connections each worker
took, and any journal that did not recover cleanly.
"""

import json
import re
import statistics
import sys
from collections import defaultdict


def main(paths):
    rows = defaultdict(list)
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                rows[r["label"]].append(r)
    print(f"{'config':8} {'n':>2} {'msg/s med':>9} {'min-max':>13} {'p50ms':>6} {'p99ms':>6}  "
          "cpu us/msg per process (median)  loadgen  sum  conns/worker")
    for label, rs in rows.items():
        ok = [r for r in rs if not r.get("failed")]
        if not ok:
            print(label, "failed")
            continue
        m = [r["msg_s"] for r in ok]
        cpus = [statistics.median(r["cpu_us"][i] for r in ok) for i in range(len(ok[0]["cpu_us"]))]
        lg = statistics.median(r["loadgen_cpu_us"] for r in ok)
        conns = [re.findall(r"\d+, 0, \d+, (\d+)", r.get("counters", "")) for r in ok]
        bad = [r["journal"] for r in ok
               if not re.match(r"records=(\d+) last_seq=\1 torn=0", r["journal"])]
        failed = f" FAILED={len(rs) - len(ok)}" if len(rs) != len(ok) else ""
        print(f"{label:8} {len(ok):>2} {statistics.median(m):>9.0f} {min(m):>6}-{max(m):<6} "
              f"{statistics.median(r['p50'] for r in ok):>6.1f} "
              f"{statistics.median(r['p99'] for r in ok):>6.1f}  "
              f"{str(cpus):30} {lg:>6} {sum(cpus) + lg:6.1f}  {['/'.join(c) for c in conns]} "
              f"{bad or ''}{failed}")


if __name__ == "__main__":
    main(sys.argv[1:])
