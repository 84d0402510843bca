#!/usr/bin/env bash
# Run every fermoposta benchmark once at its default size, one after the other
# (they must not overlap: the machine has 2 cores).  Not part of `make test`.
# Usage: bench/run_all.sh            (from anywhere; about 13 minutes in all)
set -u
cd "$(dirname "$0")/.."
# FERMOPOSTA_BENCH_VENV: run them all with another venv's Python (bench/system_venv.sh).
PY=${FERMOPOSTA_BENCH_VENV:-.venv}/bin/python
[ -x "$PY" ] || { echo "no $PY: run 'make test' or 'make run' once to create the venv" >&2; exit 1; }
status=0
for bench in mx_intake drain fetchmail_drain atrn_latency push_latency big_message outbound store_engines intake_floor customer_pull session_cost; do
    echo "=== bench/$bench.py ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    "$PY" "bench/$bench.py" || { echo "*** bench/$bench.py failed ($?)"; status=1; }
    echo
done
exit $status
