#!/usr/bin/env bash
# Anatomy, not source: grouped 5-fold CV (by case) of the default model (EfficientNet-Lite0, ImageNet weights)
# and the plain CNN, each without and with harmonised preprocessing (data/harmonise=none vs anatomy). Every
# run's report holds the shortcut baselines, screening, the external normal check (HC18 heads) and the OOD
# detector; summarise.py tabulates them, figures.py draws the preprocessing and Grad-CAM pictures.
# Runs STREAMS (model, fold) sweeps at once, one CPU thread or GPU each.
#
#   bash experiments/source_shortcut/run.sh                  # the CPU recipe (settings below)
#   OUT=/scratch/study TRAINER=gpu STREAMS=4 bash experiments/source_shortcut/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/study/source_shortcut}
FOLDS=${FOLDS:-"0 1 2 3 4"}
STREAMS=${STREAMS:-2}
SIZE=${SIZE:-128}          # the default model's image size (the project default)
CNN_SIZE=${CNN_SIZE:-64}   # the plain CNN's (the published protocol's size; 4x cheaper on a CPU)
EPOCHS=${EPOCHS:-15}       # the default schedule: 15 epochs, early stopping with patience 8
TRAINER=${TRAINER:-cpu}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline NO_ALBUMENTATIONS_UPDATE=1
[ "$TRAINER" = cpu ] && export OMP_NUM_THREADS=$(( $(nproc) / STREAMS > 0 ? $(nproc) / STREAMS : 1 ))

# Every step alone and combined, on the shortcut baselines only (no network: a few minutes).
$PY experiments/source_shortcut/shortcut_baselines.py --image-size "$SIZE" --out experiments/source_shortcut/results

one_run() {  # model size fold harmonise folder: one run; a finished one is kept, a killed one resumes exactly
  local dir="$OUT/runs/$1/fold$3/$5"
  if [ -f "$dir/metrics.json" ]; then return 0; fi
  if [ -f "$dir/checkpoints/last.ckpt" ]; then $PY -m fetalbrain.train resume="$dir"; return; fi
  rm -rf "$dir"
  $PY -m fetalbrain.train model="$1" data.image_size="$2" data.fold="$3" data/harmonise="$4" \
    data.num_workers=0 trainer="$TRAINER" trainer.max_epochs="$EPOCHS" logger=csv \
    callbacks.progress_bar=null callbacks.model_summary=null hydra.run.dir="$dir"
}
export -f one_run
export PY OUT TRAINER EPOCHS
for k in $FOLDS; do
  for h in "anatomy 1" "none 0"; do echo "efficientnet_lite0 $SIZE $k $h"; echo "cnn $CNN_SIZE $k $h"; done
done | xargs -P "$STREAMS" -L 1 bash -c 'one_run "$0" "$1" "$2" "$3" "$4"'
$PY experiments/source_shortcut/summarise.py "$OUT/runs" --out experiments/source_shortcut/results
$PY experiments/source_shortcut/figures.py --runs "$OUT/runs" --out experiments/source_shortcut/results
