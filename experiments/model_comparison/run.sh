#!/usr/bin/env bash
# Every model family under the same protocol: grouped 5-fold cross-validation by case (duplicates
# merged), and the official (leaky) split repeated with 5 seeds. Then one comparison table.
#
#   bash experiments/model_comparison/run.sh                 # sequential (CPU: hours)
#   PARALLEL=1 TRAINER=gpu bash experiments/model_comparison/run.sh   # one sweep per model at once
#
# Settings: 128 px, at most 15 epochs (early stopping, patience 8), batch 32, AdamW 1e-3, cosine.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/model_comparison}
TRAINER=${TRAINER:-default}
MODELS=${MODELS:-"cnn separable efficientnet_lite0 efficientnet_b0 xception"}
SPLITS=${SPLITS:-"grouped official"}
COMMON="data.image_size=128 trainer.max_epochs=15 trainer=$TRAINER logger=csv ${EXTRA:-}"

sweep_model() {
  local model=$1
  if [[ $SPLITS == *grouped* ]]; then
    $PY -m fetalbrain.train -m model="$model" data.fold=0,1,2,3,4 $COMMON hydra.sweep.dir="$OUT/grouped/$model"
  fi
  if [[ $SPLITS == *official* ]]; then
    $PY -m fetalbrain.train -m model="$model" data/split=official seed=1,2,3,4,5 $COMMON \
      hydra.sweep.dir="$OUT/official/$model"
  fi
}

for model in $MODELS; do
  if [ -n "${PARALLEL:-}" ]; then
    sweep_model "$model" > "$OUT.$model.log" 2>&1 &
  else
    sweep_model "$model"
  fi
done
wait
$PY -m fetalbrain.compare "$OUT" --out "${RESULTS:-experiments/model_comparison/results}"
# accuracy against efficiency, and the README's tables (readme_*.csv), when the results are this folder's
if [ -z "${RESULTS:-}" ]; then $PY experiments/model_comparison/efficiency.py; fi
