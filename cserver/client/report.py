"""The bench report: one job, turning the :class:`~cserver.client.bench.RunResult`\\ s
of every client process into one :class:`Report`, printed as a table or as JSON.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import attrs

from cserver.client.bench import BenchConfig, RunResult

#: The latency percentiles reported, by name.
PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))

#: What to tell the user about each error code, when not every session opened.
HINTS = {
    "refused": "connection refused: is the server listening there?",
    "limit": "the open-file limit was reached: raise ulimit -n or use --processes",
    "ports": "no free local port: too many connections to one address",
    "reset": "connection reset by the server",
    "closed": "the server closed the connection early",
    "busy": "the server is at its --max-connections",
    "timeout": "no progress within --timeout seconds",
    "auth": "authentication refused: check --user/--password",
}


@attrs.define
class Report:
    """The bench report: printed as a table, or as one JSON object with ``--json``.

    Times are in milliseconds: ``connect_ms`` until the barrier passed,
    ``messages_ms`` from there to the last MSG answered, ``quit_ms`` from there
    to the end, ``total_ms`` the whole run.
    """

    connections: int
    processes: int
    messages: int
    pipeline: int
    rate: float | None
    opened: int
    authenticated: int
    acked: int
    failed: int
    errors: dict[str, int]
    peak: int | None
    server_connections: int | None
    connect_ms: float | None
    messages_ms: float | None
    quit_ms: float | None
    total_ms: float | None
    msg_per_s: float
    latency_ms: dict[str, float | None]
    notes: list[str]
    ok: bool


def percentiles(latencies: Iterable[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p90/p99/p99.9 and the max.

    :param latencies: in seconds, in any order.
    :returns: each in ms, rounded to the microsecond; all ``None`` when there is none.
    """
    values = sorted(latencies)
    n = len(values)
    if not n:
        none: dict[str, float | None] = {name: None for name, _ in PERCENTILES}
        return none | {"max": None}
    rank = {name: max(0, math.ceil(round(q * n, 6)) - 1) for name, q in PERCENTILES}
    out: dict[str, float | None] = {name: round(values[i] * 1e3, 3) for name, i in rank.items()}
    out["max"] = round(values[-1] * 1e3, 3)
    return out


def _ms(a: float | None, b: float | None) -> float | None:
    """From ``a`` to ``b`` (seconds) in ms, or ``None`` when either is unknown."""
    return None if a is None or b is None else round((b - a) * 1e3, 3)


def make_report(config: BenchConfig, results: Sequence[RunResult],
                processes: int = 1) -> Report:
    """Merge the results of all client processes into one report.

    :param config: the whole run's config (not one process's share).
    :param results: one per client process.
    :param processes: how many client processes there were.
    """
    t0 = min(r.t0 for r in results if r.t0 is not None) if any(r.t0 for r in results) else None
    started = [r.t1 for r in results]
    went = None not in started
    t1 = max(r.t1 for r in results if r.t1 is not None) if went else None
    t2 = max(r.t2 for r in results if r.t2 is not None) if went else None
    first = min(r.t1 for r in results if r.t1 is not None) if went else None
    t3 = max((r.t3 for r in results if r.t3 is not None), default=None)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    latencies = [x for r in results for x in r.latencies]
    acked = sum(r.acked for r in results)
    authenticated = sum(r.authenticated for r in results)
    messages_s = (t2 - first) if t2 is not None and first is not None else 0.0
    notes = [note for r in results for note in r.notes]
    if authenticated < config.connections:
        notes += [f"{code}: {HINTS[code]}" for code in sorted(errors) if code in HINTS]
    return Report(
        connections=config.connections,
        processes=processes,
        messages=config.total_messages(),
        pipeline=config.pipeline,
        rate=config.rate,
        opened=sum(r.opened for r in results),
        authenticated=authenticated,
        acked=acked,
        failed=sum(r.failed for r in results),
        errors=dict(errors),
        peak=max((r.peak for r in results if r.peak is not None), default=None),
        server_connections=max(
            (r.server_connections for r in results if r.server_connections is not None),
            default=None,
        ),
        connect_ms=_ms(t0, t1),
        messages_ms=_ms(first, t2),
        quit_ms=_ms(t2, t3),
        total_ms=_ms(t0, t3),
        msg_per_s=round(acked / messages_s, 1) if messages_s > 0 else 0.0,
        latency_ms=percentiles(latencies),
        notes=notes,
        ok=not errors and authenticated == config.connections
        and acked == config.total_messages(),
    )


def format_table(report: Report) -> str:
    """The human-readable report: one ``name  value`` row per line, no line end."""

    def num(value: float | None, unit: str = " ms") -> str:
        return "-" if value is None else f"{value:.1f}{unit}"

    lat = "  ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in report.latency_ms.items())
    errors = ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())) or "none"
    peak = "-" if report.peak is None else report.peak
    at_server = "-" if report.server_connections is None else report.server_connections
    plural = "es" if report.processes > 1 else ""
    rows = [
        ("connections", f"{report.connections} ({report.processes} process{plural}), "
                        f"{report.authenticated} authenticated"),
        ("server", f"{at_server} connections open at the barrier "
                   f"(peak {peak} since server start)"),
        ("messages", f"{report.acked}/{report.messages} acked, "
                     + (f"open loop at {report.rate:g}/s" if report.rate
                        else f"pipeline {report.pipeline}")),
        ("errors", errors),
        ("connect+auth", num(report.connect_ms)),
        ("messages", f"{num(report.messages_ms)}  ({report.msg_per_s:.0f} msg/s)"),
        ("quit", num(report.quit_ms)),
        ("total", num(report.total_ms)),
        ("latency ms", lat),
    ]
    return "\n".join(f"{name:<14}{value}" for name, value in rows)
