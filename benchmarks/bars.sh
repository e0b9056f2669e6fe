#!/usr/bin/env bash
# The server's speed bars, measured side by side with a C reference server and
# a bare Twisted floor by the bench kit's `compare` (which builds its own C load
# generator).  Usage, from the repository root, with the project installed in
# .venv:
#
#     benchmarks/bars.sh [path/to/compare] [runs] [server options...]
#
# e.g. `benchmarks/bars.sh ../shared/bench/compare 7 --fsync never`.  Prints,
# for each bar, compare's table and its RATIO line.
set -euo pipefail
compare=${1:-../shared/bench/compare}
runs=${2:-5}
shift $(( $# < 2 ? $# : 2 ))
twistd=${TWISTD:-.venv/bin/twistd}
server=("$twistd" -n --pidfile= cserver --port 'tcp:{port}:interface=127.0.0.1' --journal '{journal}' "$@")

echo "== 1000 connections x 50 MSGs, closed loop, server options: ${*:-(defaults)} (bar: floor_tput >= 0.7)"
"$compare" -n 1000 -k 50 -r "$runs" -- "${server[@]}"
echo
echo "== 1000 concurrent clients: connect + AUTH + 1 MSG + QUIT, server options: ${*:-(defaults)} (bar: floor_time <= 1.2)"
"$compare" -n 1000 -k 1 -r "$runs" -- "${server[@]}"
