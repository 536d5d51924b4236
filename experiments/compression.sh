#!/usr/bin/env bash
# The compression experiment of docs/RESULTS.md on the reference preset: synthesis, SET and
# static sparse (whose compression is plain gradual pruning), each at its fixed budget and
# compressed to 2%, 1%, 0.5% and 0.2% of the sparse layers' dense weights, plus the dense baseline.
# Finished runs are skipped and interrupted ones resumed, so re-running it adds seeds.
#   usage: experiments/compression.sh [EPOCHS] [SEEDS...]      (default: 10 epochs, seed 0)
set -euo pipefail
EPOCHS=${1:-10}
shift || true
SEEDS=${*:-0}
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/reference}
for seed in $SEEDS; do
  for grow in synthesis random none dense; do
    for target in full 0.02 0.01 0.005 0.002; do
      [[ $grow == dense && $target != full ]] && continue
      run="$OUT/e$EPOCHS/$grow-$target-s$seed"
      [[ -f $run/final/model.safetensors ]] && continue
      flags=()
      [[ $target != full ]] && flags=(--compress-to "$target")
      resume=()
      [[ -f $run/checkpoint.pt ]] && resume=(--resume)
      if [[ ${#resume[@]} -gt 0 ]]; then
        $PY -m synthprune train --resume --out "$run" --quiet --no-plots
      else
        strategy=(--grow "$grow")
        [[ $grow == dense ]] && strategy=(--backend dense)
        $PY -m synthprune train --preset fmnist-mlp "${strategy[@]}" --epochs "$EPOCHS" --seed "$seed" \
          "${flags[@]}" --out "$run" --quiet --no-plots
      fi
      echo "finished $run"
    done
  done
done
