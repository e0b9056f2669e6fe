"""The scenario table of the throughput analysis: one row per load, cserver alone.

Each row starts a fresh ``twistd -n cserver`` on a free loopback port with a
fresh journal in a temporary directory, runs ``cserver-client bench ... --json``
against it once, then (for every row) opens one more connection for ``AUTH`` and
``STATS``, and stops the server.  That is repeated ``--runs`` times (3), the
rows alternating within each run so that drift on a busy machine hits all of
them alike; the table shows medians over the runs that succeeded.

The rows (by the number that ``--only`` takes)::

    1  1000 x 1 (the seed's job)   bench -c 1000 -n 1
    2  1000 x 100 closed loop      bench -c 1000 -n 100
    3  1000 x 100, pipeline 10     bench -c 1000 -n 100 -d 10
    4  1000 x 50, fsync always     server --fsync always,   bench -c 1000 -n 50
    5  1000 x 50, fsync interval   server --fsync interval, bench -c 1000 -n 50
    6  1000 x 50, fsync never      server --fsync never,    bench -c 1000 -n 50
    7  10,000 x 1                  server --max-connections 20000, bench -c 10000 -n 1
    8  1000 x 1, --work-delay 3    server --work-delay 3,   bench -c 1000 -n 1

Columns: acked MSGs (per run; a range when the runs differ), errors (by code,
summed over all runs), the server's own ``peak`` of open connections (the
lowest over the runs), total_ms (connect+auth, messages and quit), msg/s (the
message phase only: from the barrier to the last ack), MSG latency p50 and p99
(send to ack), and for row 8 the server's ``inflight_peak`` read from STATS
after the bench (the most MSGs in service at once: 1000 means all 1000 slept
their 3 s at the same time, so the row takes about 3 s, not 3000 s).

    python benchmarks/scenarios.py                        # all rows, 3 runs each
    python benchmarks/scenarios.py --only 7 8 --runs 5
    python benchmarks/scenarios.py --results raw.json     # also save every report
    python benchmarks/scenarios.py --from-results raw.json   # re-render, measure nothing

Every bench run is killed after ``--timeout`` seconds (120); every server is
stopped (SIGTERM, then SIGKILL) when its run ends, whatever happened.  The
client runs on the same machine as the server and shares its CPUs.  Exit
status 1 when a run failed or a row missed what it should show.
"""

import argparse
import getpass
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter

import _servers

# (name, server options, bench options); the row number is the position, from 1.
SCENARIOS = [
    ("1000 x 1 (the seed's job)", [], ["-c", "1000", "-n", "1"]),
    ("1000 x 100 closed loop", [], ["-c", "1000", "-n", "100"]),
    ("1000 x 100, pipeline 10", [], ["-c", "1000", "-n", "100", "-d", "10"]),
    ("1000 x 50, fsync always", ["--fsync", "always"], ["-c", "1000", "-n", "50"]),
    ("1000 x 50, fsync interval", ["--fsync", "interval"], ["-c", "1000", "-n", "50"]),
    ("1000 x 50, fsync never", ["--fsync", "never"], ["-c", "1000", "-n", "50"]),
    ("10,000 x 1", ["--max-connections", "20000"], ["-c", "10000", "-n", "1"]),
    ("1000 x 1, --work-delay 3", ["--work-delay", "3"], ["-c", "1000", "-n", "1"]),
]
# Rows whose table shows the server's inflight_peak (read after every run regardless).
SHOW_INFLIGHT = {"1000 x 1, --work-delay 3"}
# A --work-delay row should finish in about one delay: allowed total, as a multiple of it.
DELAY_SLACK = 5 / 3


def row_numbers(words):
    """``--only`` values: ``4 5``, ``4,5`` or ``4-6``, as sorted row numbers."""
    numbers = set()
    for word in words:
        for part in word.split(","):
            if not part:
                continue
            low, _, high = part.partition("-")
            try:
                first, last = int(low), int(high or low)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a row number: {part!r}") from None
            if not 1 <= first <= last <= len(SCENARIOS):
                raise argparse.ArgumentTypeError(
                    f"rows are 1 to {len(SCENARIOS)}, not {part!r}")
            numbers.update(range(first, last + 1))
    return sorted(numbers)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="rows:\n" + "\n".join(
            f"  {i}  {name:<28} server {' '.join(server) or '(defaults)'}; "
            f"bench {' '.join(bench)}"
            for i, (name, server, bench) in enumerate(SCENARIOS, 1)))
    add = parser.add_argument
    add("--runs", type=int, default=3, help="runs per row; medians are shown (%(default)s)")
    add("--only", nargs="+", metavar="ROW", default=None,
        help="only these rows, by number: 4 5, 4,5 or 4-6 (all)")
    add("--user", default=getpass.getuser(),
        help="the server's --users and the user the bench AUTHs as (%(default)s)")
    add("--timeout", type=float, default=120.0,
        help="seconds one bench run may take before it is killed (%(default)s)")
    add("--results", metavar="PATH", help="also save every run's raw report as JSON here")
    add("--from-results", metavar="PATH",
        help="measure nothing: print the table from results saved with --results")
    args = parser.parse_args(argv)
    try:
        args.only = row_numbers(args.only) if args.only else None
    except argparse.ArgumentTypeError as e:
        parser.error(f"--only: {e}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def reproducing(argv):
    """The command that reruns this measurement."""
    kept = _servers.reproducing(argv, ("--results", "--from-results"))
    return " ".join(["python benchmarks/scenarios.py", *kept])


def server_command(options, user):
    """The exact server command line of a row, the journal's directory written as DIR."""
    return ["twistd", "-n", "--pidfile=", "cserver", "--port", "tcp:0:interface=127.0.0.1",
            "--journal", "DIR/journal.jsonl", "--users", user, *options]


def bench_command(options, user, port="PORT"):
    """The exact bench command line of a row."""
    return ["cserver-client", "bench", "--port", str(port), "--user", user, *options, "--json"]


def bench(port, options, args):
    """One bench run; its JSON report, ``ok`` False on any failure, ``notes`` saying why."""
    return _servers.run_bench(port, args.user, options, args.timeout)


def run_row(number, args, attempts=2):
    """Start a fresh server, bench it once, read its STATS, stop it; the report.

    A server that does not start is tried once more; then the run counts as failed.
    """
    name, server_options, bench_options = SCENARIOS[number - 1]
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory(prefix="cserver-scenarios-") as directory:
            server = _servers.cserver(directory, *server_options, user=args.user)
            try:
                with server:
                    report = bench(server.port, bench_options, args)
                    try:
                        report["server_stats"] = _servers.stats(server.port, args.user)
                    except (OSError, RuntimeError) as e:
                        report["ok"] = False
                        report.setdefault("notes", []).append(f"STATS failed: {e}")
                    status = server.stop()
                    if status:
                        report.setdefault("notes", []).append(f"server exit status {status}")
                    return report
            except RuntimeError as e:
                why = str(e).strip().splitlines()
                print(f"scenarios: row {number}: {why[0]} ({why[-1]})",
                      file=sys.stderr, flush=True)
            finally:
                server.stop()
        if attempt + 1 < attempts:
            time.sleep(2)
    return {"ok": False, "notes": ["the server did not start"]}


def measure(args):
    """Every chosen row ``--runs`` times; the results dict (what ``--results`` saves)."""
    _servers.raise_open_files()
    numbers = args.only or list(range(1, len(SCENARIOS) + 1))
    results = {
        "machine": _servers.machine(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": reproducing(sys.argv[1:]),
        "runs": args.runs,
        "user": args.user,
        "timeout": args.timeout,
        "rows": [{"number": n, "name": SCENARIOS[n - 1][0],
                  "server_options": SCENARIOS[n - 1][1], "bench_options": SCENARIOS[n - 1][2],
                  "reports": []} for n in numbers],
    }
    for run in range(args.runs):
        for row in results["rows"]:
            report = run_row(row["number"], args)
            row["reports"].append(report)
            inflight = report.get("server_stats", {}).get("inflight_peak", "-")
            state = "" if report["ok"] else "  FAILED: " + "; ".join(report.get("notes", []))
            print(f"scenarios: run {run + 1}/{args.runs}  {row['number']}. {row['name']:<28} "
                  f"acked {report.get('acked', 0):>7}  total {report.get('total_ms', 0):>9.0f} ms"
                  f"  {report.get('msg_per_s', 0):>8.0f} msg/s  inflight_peak {inflight}{state}",
                  file=sys.stderr, flush=True)
    return results


def expected_acked(row):
    """MSGs the row's bench sends: connections x messages."""
    options = row["bench_options"]
    return int(options[options.index("-c") + 1]) * int(options[options.index("-n") + 1])


def literal(words):
    """Command-line words as reStructuredText inline literal text (empty for none)."""
    return f"``{' '.join(words)}``" if words else ""


def summarize(results):
    """One summary dict per row: medians over the good runs, and what the row failed to show."""
    summaries = []
    for row in results["rows"]:
        reports = row["reports"]
        good = [r for r in reports if r.get("ok")]
        connections = int(row["bench_options"][row["bench_options"].index("-c") + 1])
        s = {"number": row["number"], "name": row["name"],
             "server": literal(row["server_options"]) or "(defaults)",
             "bench": literal(row["bench_options"]),
             "good": len(good), "runs": len(reports), "problems": []}
        acked = [r["acked"] for r in reports if "acked" in r]
        if acked:
            s["acked"] = (f"{min(acked):,}" if min(acked) == max(acked)
                          else f"{min(acked):,}-{max(acked):,}")
        errors = Counter()
        for r in reports:
            errors.update(r.get("errors") or {})
        s["errors"] = ", ".join(f"{code} {count}" for code, count in sorted(errors.items()))
        s["errors"] = s["errors"] or "0"
        peaks = [r["peak"] for r in reports if r.get("peak") is not None]
        s["peak"] = min(peaks) if peaks else None
        if good:
            s["total_ms"] = statistics.median(r["total_ms"] for r in good)
            s["msg_per_s"] = statistics.median(r["msg_per_s"] for r in good)
            s["p50"] = statistics.median(r["latency_ms"]["p50"] for r in good)
            s["p99"] = statistics.median(r["latency_ms"]["p99"] for r in good)
        inflight = [r["server_stats"]["inflight_peak"] for r in reports
                    if "inflight_peak" in r.get("server_stats", {})]
        if row["name"] in SHOW_INFLIGHT and inflight:
            s["inflight_peak"] = min(inflight)
        # What every row must show, and what the --work-delay row must show besides.
        if len(good) < len(reports):
            s["problems"].append(f"{len(reports) - len(good)} of {len(reports)} runs failed")
        if acked and min(acked) != expected_acked(row):
            s["problems"].append(f"acked {s['acked']}, not {expected_acked(row):,}")
        if s["peak"] is not None and s["peak"] < connections:
            s["problems"].append(f"server peak {s['peak']:,} < {connections:,} connections")
        if "--work-delay" in row["server_options"]:
            delay = float(row["server_options"][row["server_options"].index("--work-delay") + 1])
            if inflight and min(inflight) < connections:
                s["problems"].append(f"inflight_peak {min(inflight):,} < {connections:,}")
            if "total_ms" in s and s["total_ms"] > delay * DELAY_SLACK * 1000:
                s["problems"].append(f"total {s['total_ms'] / 1000:.1f} s, not about {delay:g} s")
        for i, r in enumerate(reports, 1):
            if not r.get("ok"):
                s["problems"].append(f"run {i}: " + ("; ".join(r.get("notes", [])) or "failed"))
        summaries.append(s)
    return summaries


def rst_table(summaries):
    """The summaries as a reStructuredText simple table."""
    head = ["row", "scenario", "server options", "bench options", "acked", "errors",
            "server peak", "total ms", "msg/s", "p50 ms", "p99 ms", "inflight peak",
            "good runs"]
    left = {1, 2, 3, 5}

    def cell(s, key, form):
        value = s.get(key)
        return "" if value is None else form.format(value)

    body = [[
        str(s["number"]), s["name"], s["server"], s["bench"], s.get("acked", ""),
        s["errors"], cell(s, "peak", "{:,}"), cell(s, "total_ms", "{:,.0f}"),
        cell(s, "msg_per_s", "{:,.0f}"), cell(s, "p50", "{:,.2f}"), cell(s, "p99", "{:,.2f}"),
        cell(s, "inflight_peak", "{:,}"), f"{s['good']}/{s['runs']}",
    ] for s in summaries]
    return _servers.rst_table(head, body, left)


def main(argv=None):
    args = parse_args(argv)
    results = _servers.results(args, measure)
    if args.from_results and args.only:
        results["rows"] = [r for r in results["rows"] if r["number"] in args.only]
    summaries = summarize(results)
    runs = f"median of {results['runs']} runs" if results["runs"] > 1 else "one run"
    print(f"scenarios: {results['machine']}, Python {results['python']}, {results['date']}; "
          f"loopback, client and server on the same machine; {runs}")
    print()
    print(rst_table(summaries))
    print()
    print(f"server: {' '.join(server_command(['OPTIONS'], results['user']))}"
          "  (defaults: --fsync always, --max-connections 10000, --work-delay 0)")
    print(f"bench:  {' '.join(bench_command(['OPTIONS'], results['user']))}")
    print("msg/s counts the message phase only; total ms is connect+auth, messages and quit; "
          "acked per run; errors summed over the runs; server peak and inflight peak "
          "(STATS after the bench) the lowest over the runs.")
    print(f"reproduce: {results['command']}")
    problems = [f"row {s['number']}: {p}" for s in summaries for p in s["problems"]]
    if problems:
        print()
        print("\n".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
