"""Throughput against the number of connections: cserver, the Twisted floor, the C reference.

For each N in ``--connections`` (10, 100, 1000, 10000) and each server, this
starts the server on a free loopback port with a fresh journal, runs
``cserver-client bench -c N -n K --json`` against it (closed loop, K MSGs per
connection with K = ceil(``--total`` / N), so every point sends at least
``--total`` MSGs, 20,000 by default), and stops the server.  Every point is run
``--runs`` times (3), the servers and points alternating so that drift on a
busy machine hits all of them alike; medians of msg/s and of the p50 and p99
MSG latencies are reported.  msg/s counts the message phase only (after all N
sessions are authenticated at the barrier, until the last ack).

The servers:

- ``cserver``: ``twistd -n cserver`` with ``--fsync`` MODE (one line per mode
  given) and ``--work-delay``;
- ``floor``: ../shared/bench/floor.py, a bare Twisted protocol answering every
  line with ``OK 1`` (the least any Twisted server costs; the bench works
  against it, its STATS just carries no ``peak``);
- ``c``: ../shared/bench/refsrv.c, built with gcc into a temporary directory; it
  fdatasyncs each batch when ``always`` is among the modes, and runs without
  sync as well when another mode is.

The shared reference files are run from where they are, never copied.  It
prints a reStructuredText table and draws docs/scaling.svg (msg/s against
connections, log x), a hand-written SVG::

    python benchmarks/scaling.py                       # 10 100 1000 10000, fsync always
    python benchmarks/scaling.py --fsync always interval never --connections 1000
    python benchmarks/scaling.py --from-results results.json   # redraw saved runs

The client runs on the same machine as the server and shares its CPUs.
"""

import argparse
import getpass
import math
import os
import statistics
import sys
import tempfile
import time
from xml.sax.saxutils import escape

import _servers

FSYNC_MODES = ("always", "interval", "never")
SERVERS = ("cserver", "floor", "c")
DEFAULT_SVG = os.path.join(_servers.REPO, "docs", "scaling.svg")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--connections", "-c", type=int, nargs="+", default=[10, 100, 1000, 10000],
        metavar="N", help="connection counts to measure (10 100 1000 10000)")
    add("--total", type=int, default=20000,
        help="MSGs per point at least: K = ceil(TOTAL / N) per connection (%(default)s)")
    add("--runs", type=int, default=3, help="runs per point; medians are shown (%(default)s)")
    add("--fsync", nargs="+", choices=FSYNC_MODES, default=["always"], metavar="MODE",
        help="cserver --fsync modes, one series each: always, interval, never (always)")
    add("--work-delay", type=float, default=0.0,
        help="cserver --work-delay SECONDS (%(default)s)")
    add("--pipeline", "-d", type=int, default=1, help="bench --pipeline (%(default)s)")
    add("--servers", nargs="+", choices=SERVERS, default=list(SERVERS), metavar="SERVER",
        help="which servers to measure: cserver, floor, c (all)")
    add("--user", default=getpass.getuser(), help="the user to AUTH as (%(default)s)")
    add("--shared", default=_servers.SHARED_BENCH,
        help="the directory of floor.py and refsrv.c (%(default)s)")
    add("--timeout", type=float, default=120.0,
        help="seconds one bench run may take before it is killed (%(default)s)")
    add("--svg", default=DEFAULT_SVG, help="where to draw the plot (%(default)s)")
    add("--no-svg", action="store_true", help="do not draw the plot")
    add("--results", metavar="PATH", help="also save every run's report as JSON here")
    add("--from-results", metavar="PATH",
        help="measure nothing: print the table and draw the plot from saved results")
    return parser.parse_args(argv)


def per_connection(connections, total):
    """MSGs per connection so that the point sends at least ``total``."""
    return max(1, math.ceil(total / connections))


def make_series(args, directory):
    """The servers to measure: ``(label, kind, sync, start)``; ``start(dir)`` -> ServerProcess."""
    series = []
    if "cserver" in args.servers:
        for mode in args.fsync:
            options = ["--fsync", mode, "--max-connections", "20000"]
            if args.work_delay:
                options += ["--work-delay", repr(args.work_delay)]
            series.append((f"cserver, fsync {mode}", "cserver", mode == "always",
                           lambda d, o=options: _servers.cserver(d, *o, user=args.user)))
    if "floor" in args.servers:
        series.append(("Twisted floor", "floor", False,
                       lambda d: _servers.floor(d, args.shared)))
    if "c" in args.servers:
        exe = _servers.build_reference(directory, args.shared)
        if exe is None:
            print("scaling: the C reference did not build (gcc); skipping it", file=sys.stderr)
        else:
            syncs = []
            if "always" in args.fsync or "cserver" not in args.servers:
                syncs.append(True)
            if any(mode != "always" for mode in args.fsync) and "cserver" in args.servers:
                syncs.append(False)
            for sync in syncs:
                label = "C reference, fdatasync" if sync else "C reference, no sync"
                series.append((label, "c", sync,
                               lambda d, s=sync: _servers.reference(exe, d, s)))
    return series


def bench(port, connections, messages, args):
    """One ``cserver-client bench --json`` run; its report (``ok`` False on any failure)."""
    options = ["-c", str(connections), "-n", str(messages), "-d", str(args.pipeline),
               "--timeout", "30"]
    return _servers.run_bench(port, args.user, options, args.timeout)


def run_point(start, connections, messages, args, attempts=2):
    """Start a server with a fresh journal, bench it once, stop it; the bench report.

    A server that does not start is tried once more; then the run counts as failed.
    """
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory(prefix="cserver-scaling-") as directory:
            try:
                with start(directory) as server:
                    return bench(server.port, connections, messages, args)
            except RuntimeError as e:
                why = str(e).strip().splitlines()
                print(f"scaling: {why[0]} ({why[-1]})", file=sys.stderr, flush=True)
        if attempt + 1 < attempts:
            time.sleep(2)
    return {"ok": False, "notes": ["the server did not start"]}


def reproducing(argv):
    """``argv`` without the options that only say where output goes (shown on the plot)."""
    return [word for word in _servers.reproducing(argv, ("--results", "--svg"))
            if word != "--no-svg"]


def measure(args):
    """Run every point; returns the results dict (what ``--results`` saves)."""
    _servers.raise_open_files()
    results = {
        "machine": _servers.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python benchmarks/scaling.py", *reproducing(sys.argv[1:])]),
        "total": args.total, "runs": args.runs, "pipeline": args.pipeline,
        "fsync": args.fsync, "work_delay": args.work_delay, "series": [],
    }
    with tempfile.TemporaryDirectory(prefix="cserver-scaling-") as build:
        series = make_series(args, build)
        for label, kind, sync, _ in series:
            results["series"].append({"label": label, "kind": kind, "sync": sync,
                                      "points": {str(n): [] for n in args.connections}})
        for run in range(args.runs):
            for n in args.connections:
                k = per_connection(n, args.total)
                for (label, _, _, start), saved in zip(series, results["series"], strict=True):
                    report = run_point(start, n, k, args)
                    saved["points"][str(n)].append(report)
                    state = "" if report["ok"] else "  FAILED " + "; ".join(
                        report.get("notes", [])) + f" errors {report.get('errors')}"
                    print(f"scaling: run {run + 1}/{args.runs}  {label:<24} {n:>6} x {k:<5} "
                          f"{report.get('msg_per_s', 0):>9.0f} msg/s{state}",
                          file=sys.stderr, flush=True)
    return results


def summarize(results):
    """One row per (series, N): medians of the good runs, and ratios to the references."""
    rows = []
    medians = {}
    for s in results["series"]:
        for n, reports in s["points"].items():
            good = [r for r in reports if r.get("ok")]
            row = {"label": s["label"], "kind": s["kind"], "sync": s["sync"],
                   "connections": int(n), "good": len(good), "runs": len(reports),
                   "messages": per_connection(int(n), results["total"])}
            if good:
                row["msg_per_s"] = statistics.median(r["msg_per_s"] for r in good)
                row["p50"] = statistics.median(r["latency_ms"]["p50"] for r in good)
                row["p99"] = statistics.median(r["latency_ms"]["p99"] for r in good)
                row["connect_ms"] = statistics.median(r["connect_ms"] for r in good)
                peaks = [r["peak"] for r in good if r.get("peak") is not None]
                row["peak"] = min(peaks) if peaks else None
                medians[(s["kind"], s["sync"], int(n))] = row["msg_per_s"]
            rows.append(row)
    for row in rows:
        n, value = row["connections"], row.get("msg_per_s")
        floor = medians.get(("floor", False, n))
        c = medians.get(("c", row["sync"], n)) or medians.get(("c", not row["sync"], n))
        if value and row["kind"] != "floor" and floor:
            row["vs_floor"] = value / floor
        if value and row["kind"] != "c" and c:
            row["vs_c"] = value / c
    return rows


def rst_table(rows):
    """The rows as a reStructuredText simple table."""
    head = ["server", "connections", "MSGs each", "msg/s", "p50 ms", "p99 ms",
            "connect+auth ms", "server peak", "vs floor", "vs C", "good runs"]

    def cell(row, key, form):
        value = row.get(key)
        return "-" if value is None else form.format(value)

    body = [[
        row["label"], f"{row['connections']:,}", f"{row['messages']:,}",
        cell(row, "msg_per_s", "{:,.0f}"), cell(row, "p50", "{:.2f}"),
        cell(row, "p99", "{:.2f}"), cell(row, "connect_ms", "{:,.0f}"),
        cell(row, "peak", "{:,}"), cell(row, "vs_floor", "{:.2f}x"),
        cell(row, "vs_c", "{:.2f}x"), f"{row['good']}/{row['runs']}",
    ] for row in sorted(rows, key=lambda r: (r["connections"]))]
    return _servers.rst_table(head, body)


# -- the plot -----------------------------------------------------------------------------

COLORS = {"cserver": ["#1565c0", "#6a1b9a", "#00838f"], "floor": ["#ef6c00"],
          "c": ["#2e7d32", "#9e9d24"]}
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"


def nice_step(span, ticks=6):
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) giving about ``ticks`` ticks."""
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def short(value):
    """Tick label of a msg/s value: 0, 5k, 12.5k, 1.2M."""
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e3:
        return f"{value / 1e3:g}k"
    return f"{value:g}"


def svg(results, rows):
    """msg/s against connections (log x), one line per server, as an SVG document."""
    width, height = 960, 560
    left, right, top, bottom = 86, 250, 92, 78
    plot_w, plot_h = width - left - right, height - top - bottom
    points = [r for r in rows if r.get("msg_per_s")]
    ns = sorted({r["connections"] for r in rows})
    lo, hi = math.log10(min(ns)), math.log10(max(ns))
    if hi - lo < 1:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.06
    lo, hi = lo - pad, hi + pad
    top_value = max((r["msg_per_s"] for r in points), default=1.0)
    step = nice_step(top_value * 1.05)
    y_max = step * math.ceil(top_value * 1.05 / step)

    def x(n):
        return left + (math.log10(n) - lo) / (hi - lo) * plot_w

    def y(value):
        return top + plot_h - value / y_max * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="{FONT}">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    modes = ", ".join(results["fsync"])
    delay = f", work delay {results['work_delay']:g} s" if results.get("work_delay") else ""
    title = "Throughput against concurrent connections"
    subtitle = (f"{results['machine']}, {results['date']}: closed loop, pipeline "
                f"{results['pipeline']}, cserver fsync {modes}{delay}")
    runs = f"median of {results['runs']} runs" if results["runs"] > 1 else "one run"
    subtitle2 = (f"at least {results['total']:,} MSGs per point, {runs}; "
                 "client (cserver-client bench) on the same machine")
    out += [
        f'<text x="{left}" y="34" font-size="21" font-weight="bold" fill="#212121">'
        f'{escape(title)}</text>',
        f'<text x="{left}" y="58" font-size="13" fill="#424242">{escape(subtitle)}</text>',
        f'<text x="{left}" y="76" font-size="13" fill="#616161">{escape(subtitle2)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        f'stroke="#bdbdbd"/>',
    ]
    # y grid and ticks
    value = 0.0
    while value <= y_max + step / 2:
        ty = y(value)
        out.append(f'<line x1="{left}" y1="{ty:.1f}" x2="{left + plot_w}" y2="{ty:.1f}" '
                   f'stroke="#e0e0e0"/>')
        out.append(f'<line x1="{left - 5}" y1="{ty:.1f}" x2="{left}" y2="{ty:.1f}" '
                   f'stroke="#757575"/>')
        out.append(f'<text x="{left - 9}" y="{ty + 4.5:.1f}" font-size="13" '
                   f'text-anchor="end" fill="#424242">{short(value)}</text>')
        value += step
    # x grid and ticks: decades, with minor ticks at 2..9
    for decade in range(math.floor(lo), math.ceil(hi) + 1):
        for m in range(1, 10):
            n = m * 10 ** decade
            if not lo <= math.log10(n) <= hi:
                continue
            tx = x(n)
            if m == 1:
                out.append(f'<line x1="{tx:.1f}" y1="{top}" x2="{tx:.1f}" '
                           f'y2="{top + plot_h}" stroke="#e0e0e0"/>')
                out.append(f'<line x1="{tx:.1f}" y1="{top + plot_h}" x2="{tx:.1f}" '
                           f'y2="{top + plot_h + 6}" stroke="#757575"/>')
                out.append(f'<text x="{tx:.1f}" y="{top + plot_h + 22}" font-size="13" '
                           f'text-anchor="middle" fill="#424242">{n:,}</text>')
            else:
                out.append(f'<line x1="{tx:.1f}" y1="{top + plot_h}" x2="{tx:.1f}" '
                           f'y2="{top + plot_h + 3}" stroke="#9e9e9e"/>')
    # axis labels
    out += [
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 30}" font-size="14" '
        f'text-anchor="middle" fill="#212121">concurrent connections (log scale)</text>',
        f'<text transform="translate(22 {top + plot_h / 2:.1f}) rotate(-90)" font-size="14" '
        f'text-anchor="middle" fill="#212121">acknowledged MSGs per second</text>',
    ]
    # the lines, then the legend
    used = {kind: 0 for kind in COLORS}
    legend_y = top + 8
    for s in results["series"]:
        kind = s["kind"]
        color = COLORS[kind][used[kind] % len(COLORS[kind])]
        used[kind] += 1
        dash = "" if kind == "cserver" else ' stroke-dasharray="7 4"'
        mine = sorted((r for r in points if r["label"] == s["label"]),
                      key=lambda r: r["connections"])
        coords = " ".join(f"{x(r['connections']):.1f},{y(r['msg_per_s']):.1f}" for r in mine)
        if len(mine) > 1:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" '
                       f'stroke-width="2.5" stroke-linejoin="round"{dash}/>')
        for r in mine:
            tip = (f"{s['label']}: {r['connections']:,} connections, "
                   f"{r['msg_per_s']:,.0f} msg/s, p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms")
            out.append(f'<circle cx="{x(r["connections"]):.1f}" cy="{y(r["msg_per_s"]):.1f}" '
                       f'r="4.5" fill="#ffffff" stroke="{color}" stroke-width="2.5">'
                       f'<title>{escape(tip)}</title></circle>')
        lx = left + plot_w + 22
        out.append(f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 30}" y2="{legend_y}" '
                   f'stroke="{color}" stroke-width="2.5"{dash}/>')
        out.append(f'<circle cx="{lx + 15}" cy="{legend_y}" r="4.5" fill="#ffffff" '
                   f'stroke="{color}" stroke-width="2.5"/>')
        out.append(f'<text x="{lx + 40}" y="{legend_y + 4.5}" font-size="13" '
                   f'fill="#212121">{escape(s["label"])}</text>')
        legend_y += 26
    notes = [
        "Twisted floor: answers every line",
        "with OK 1, no journal (floor.py)",
        "C reference: one-thread epoll",
        "server of the protocol (refsrv.c)",
    ]
    legend_y += 10
    for note in notes:
        out.append(f'<text x="{left + plot_w + 22}" y="{legend_y}" font-size="11.5" '
                   f'fill="#757575">{escape(note)}</text>')
        legend_y += 17
    out.append(f'<text x="{width - 12}" y="{height - 10}" font-size="11" text-anchor="end" '
               f'fill="#9e9e9e">{escape(results["command"])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse_args(argv)
    results = _servers.results(args, measure)
    rows = summarize(results)
    print(f"scaling: {results['machine']}, {results['date']}; closed loop, pipeline "
          f"{results['pipeline']}, at least {results['total']:,} MSGs per point, "
          + (f"median of {results['runs']} runs" if results["runs"] > 1 else "one run"))
    print(f"command: {results['command']}")
    print()
    print(rst_table(rows))
    if not args.no_svg:
        with open(args.svg, "w") as f:
            f.write(svg(results, rows))
        print(f"\nplot: {args.svg}")
    return 0 if all(r["good"] == r["runs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
