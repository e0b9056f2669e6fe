"""Keyed messages (PUT) against plain MSGs, in one run.

1. Throughput: ``cserver-client bench -c 1000 -n 50`` and the same with
   ``--keyed`` (each PUT a new key) against fresh servers, alternating,
   ``--runs`` times; the medians and their ratio (the bar: keyed costs at
   most 15% of MSG's msg/s).
2. Memory: one server with a window of an hour, its RSS before and after
   ``--keys`` keyed messages (default 1,000,000) are in its window; the
   bytes per key.
3. Start-up: that server stopped and its journal opened again in this
   process the way a start does -- recovery (from the checkpoint the stop
   left), then the window read back from the end of the journal and
   rebuilt -- timed::

    python benchmarks/keyed_bench.py [--runs 3] [--keys 1000000]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

from _servers import cpu_seconds, cserver, memory, raise_open_files, run_bench
from twisted.internet.task import Clock

from cserver.dedup import DedupWindow
from cserver.journal import FileJournal
from cserver.journal.keyed import keyed_since

USER = "bench"


def rate(keyed):
    """msg/s of one bench run, and the server's CPU microseconds per message
    over it (the 1000 connections and AUTHs included, the same for both)."""
    with tempfile.TemporaryDirectory() as directory, cserver(directory, user=USER) as server:
        before = cpu_seconds(server.pid)
        report = run_bench(server.port, USER, ["-c", "1000", "-n", "50"]
                           + (["--keyed"] if keyed else []), timeout=300)
        used = cpu_seconds(server.pid) - before
    if not report.get("ok"):
        raise SystemExit(f"bench failed: {report.get('notes')}")
    return report["msg_per_s"], used / 50_000 * 1e6


class _Now:
    def seconds(self):
        return time.time()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keys", type=int, default=1_000_000,
                        help="keys for the memory and start-up parts (0: skip them)")
    args = parser.parse_args(argv)
    raise_open_files()
    rates = {"MSG": [], "PUT": []}
    costs = {"MSG": [], "PUT": []}
    for run in range(args.runs):
        for name in ("MSG", "PUT") if run % 2 == 0 else ("PUT", "MSG"):
            per_s, cost = rate(name == "PUT")
            rates[name].append(per_s)
            costs[name].append(cost)
            print(f"  run {run + 1}/{args.runs}: {name} {per_s:,.0f} msg/s, "
                  f"server {cost:.1f} us CPU a message", file=sys.stderr, flush=True)
    msg, put = (statistics.median(rates[n]) for n in ("MSG", "PUT"))
    msg_cost, put_cost = (statistics.median(costs[n]) for n in ("MSG", "PUT"))
    print(f"1000 x 50, closed loop, median of {args.runs}: MSG {msg:,.0f} msg/s, "
          f"PUT {put:,.0f} msg/s: keyed costs {(1 - put / msg) * 100:.1f}% (bar: 15%)")
    print(f"server CPU a message, median: MSG {msg_cost:.1f} us, PUT {put_cost:.1f} us "
          f"(+{(put_cost / msg_cost - 1) * 100:.1f}%)")
    if not args.keys:
        return 0

    with tempfile.TemporaryDirectory() as directory:
        options = ("--dedup-window", "3600", "--dedup-keys", str(args.keys),
                   "--max-connections", "2000")
        with cserver(directory, *options, user=USER) as server:
            before = memory(server.pid)[0]
            per = max(1, args.keys // 1000)
            report = run_bench(server.port, USER, ["-c", "1000", "-n", str(per), "-d", "10",
                                                   "--keyed"], timeout=900)
            if not report.get("ok"):
                raise SystemExit(f"bench failed: {report.get('notes')}")
            after = memory(server.pid)[0]
            keys = 1000 * per
        journal_path = os.path.join(directory, "journal.jsonl")
        print(f"{keys:,} keys in the window: RSS {before / 1e6:.1f} MB -> "
              f"{after / 1e6:.1f} MB, {(after - before) / keys:.0f} bytes per key")
        start = time.perf_counter()
        journal = FileJournal.open(journal_path, Clock(), fsync="never")
        opened = time.perf_counter()
        records = keyed_since(journal_path, time.time() - 3600, args.keys)
        read = time.perf_counter()
        window = DedupWindow(_Now(), 3600, args.keys)
        window.rebuild(records)
        rebuilt = time.perf_counter()
        journal.close()
        print(f"start-up on {journal.recovery.records:,} records, {len(window):,} keys: "
              f"recovery {opened - start:.3f} s (from the checkpoint at byte "
              f"{journal.recovery.checkpoint}), window read back {read - opened:.3f} s, "
              f"rebuilt {rebuilt - read:.3f} s, in all {rebuilt - start:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
