#!/usr/bin/env bash
# The compression experiment of docs/RESULTS.md: synthesis vs SET (vs static pruning), each with
# and without compression to 2%, 1% and 0.5% of the sparse layers' dense weights, on the
# reference preset. Finished runs are skipped, so the script can be re-run to add seeds.
#   usage: experiments/compression.sh [EPOCHS] [SEEDS...]      (default: 10 epochs, seed 0)
set -euo pipefail
EPOCHS=${1:-10}
shift || true
SEEDS=${*:-0}
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/compression}
for seed in $SEEDS; do
  for grow in synthesis random none; do
    for target in full 0.02 0.01 0.005; do
      [[ $grow == none && $target == full ]] && continue   # static sparse without pruning: issue 3's table
      run="$OUT/e$EPOCHS/$grow-$target-s$seed"
      [[ -f $run/final/model.safetensors ]] && continue
      flags=()
      [[ $target != full ]] && flags=(--compress-to "$target")
      resume=()
      [[ -f $run/checkpoint.pt ]] && resume=(--resume)
      if [[ ${#resume[@]} -gt 0 ]]; then
        $PY -m synthprune train --resume --out "$run" --quiet --no-plots
      else
        $PY -m synthprune train --preset fmnist-mlp --grow "$grow" --epochs "$EPOCHS" --seed "$seed" \
          "${flags[@]}" --out "$run" --quiet --no-plots
      fi
      echo "finished $run"
    done
  done
done
