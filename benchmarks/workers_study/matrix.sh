#!/bin/bash
# Alternating runs of every configuration; one JSON line per run in $OUT.
#
# A prototype for the design study in docs/workers-design.rst, not part of
# cserver.  Run from the repository root (twistd finds the cserver plugin there):
#
#   RUNS=5 bash benchmarks/workers_study/matrix.sh
#   K=1 RUNS=5 CONFIGS="single A-2r B-2r C-2r" OUT=results_k1.jsonl \
#       bash benchmarks/workers_study/matrix.sh
#
# Environment: RUNS (rounds, default 5), CONFIGS (default: all nine), K
# (messages per connection, default 50), OUT (default: results.jsonl in a new
# temporary directory, printed at the end), PY (default: python; twistd is
# taken from the same bin directory), LOADGEN (default: built from
# ../shared/bench/loadgen.c, relative to the repository root, into a
# temporary directory).  Journals go to bench.py's temporary directory, i.e.
# $TMPDIR or /tmp.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=${PY:-python}
PYBIN=$(dirname "$(command -v "$PY")")
TWISTD=${TWISTD:-$PYBIN/twistd}
OUT=${OUT:-$(mktemp -d -t workers-study-XXXXXX)/results.jsonl}
RUNS=${RUNS:-5}
CONFIGS=${CONFIGS:-"single A-1 A-2 B-1 B-2 C-2 A-2r B-2r C-2r"}
BUILD=$(mktemp -d -t workers-study-loadgen-XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
if [[ -z ${LOADGEN:-} ]]; then
  LOADGEN=$BUILD/loadgen
  gcc -O2 -o "$LOADGEN" "$REPO/../shared/bench/loadgen.c" || exit 1
fi
export LOADGEN
PROTO="$PY $HERE/proto.py"
for r in $(seq 1 "$RUNS"); do
  for c in $CONFIGS; do
    case $c in
      single) cmd="$TWISTD -n --pidfile= cserver --port tcp:{port}:interface=127.0.0.1:backlog=4096 --journal {journal} --users bench";;
      *a1) d=${c%%-*}; cmd="env PROTO_ACCEPTS=1 $PROTO parent --design $d --workers 2 --share adopt --port {port} --journal {journal} --users bench";;
      *a8) d=${c%%-*}; cmd="env PROTO_ACCEPTS=8 $PROTO parent --design $d --workers 2 --share adopt --port {port} --journal {journal} --users bench";;
      *) d=${c%%-*}; rest=${c#*-}; n=${rest%r}; share=adopt; [[ $rest == *r ]] && share=reuseport
         cmd="$PROTO parent --design $d --workers $n --share $share --port {port} --journal {journal} --users bench";;
    esac
    # shellcheck disable=SC2086  # $cmd is a command line, split on purpose
    timeout 120 "$PY" "$HERE/bench.py" "$c" -- $cmd >> "$OUT" || echo "{\"label\": \"$c\", \"failed\": true}" >> "$OUT"
  done
done
echo "results: $OUT" >&2
