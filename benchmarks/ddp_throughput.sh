#!/usr/bin/env bash
# Data-parallel throughput: the reference MLP (fmnist-mlp, synthesis) trained for EPOCHS epochs
# with 1 process (all cores) and with NPROC processes (cores / NPROC threads each), for the csr
# backend and the dense baseline. Prints seconds per epoch (median) and examples per second.
# Usage: bash benchmarks/ddp_throughput.sh [EPOCHS=3] [NPROC=2]   (on a quiet machine)
set -euo pipefail
EPOCHS=${1:-3}
NPROC=${2:-2}
PY=${PY:-.venv/bin/python}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for backend in csr dense; do
  for n in 1 "$NPROC"; do
    "$PY" -m synthprune train --preset fmnist-mlp --backend "$backend" --epochs "$EPOCHS" --quiet --no-plots \
      --nproc "$n" --out "$OUT/$backend-$n" > /dev/null
    "$PY" - "$OUT/$backend-$n" "$backend" "$n" <<'PYEOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1] + "/metrics.csv")))
seconds = statistics.median(float(r["epoch_seconds"]) for r in rows)
print(f"{sys.argv[2]:6} processes {sys.argv[3]}: {seconds:6.2f} s/epoch  {60000 / seconds:8.0f} examples/s  "
      f"final test {100 * float(rows[-1]['test_accuracy']):.2f}%")
PYEOF
  done
done
