#!/usr/bin/env bash
# Push the honest score: grouped 5-fold CV (by case) of the default model (EfficientNet-Lite0, ImageNet weights,
# 128 px, the default 15-epoch schedule) with one lever (or one group of levers that go together) changed at a
# time, then an Optuna search over the levers
# together (on fold 0's training part: the objective is its validation macro-F1, the test fold is never seen),
# then the search's best on all 5 folds, then each setting's 5 fold models as one ensemble on the external normal
# heads (HC18). summarise.py writes the table (mean, std, 95 % interval over folds).
# Runs STREAMS jobs at once, one CPU thread or one GPU share each. A stopped study continues where it stopped.
#
#   bash experiments/honest_recipe/run.sh                        # the CPU recipe (settings below)
#   STAGES=grid bash experiments/honest_recipe/run.sh            # grid search best ensemble table, any of them
#   TRAINER=gpu STREAMS=4 bash experiments/honest_recipe/run.sh  # several jobs share one GPU
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/study/honest_recipe}
RESULTS=${RESULTS:-experiments/honest_recipe/results}
FOLDS=${FOLDS:-"0 1 2 3 4"}
STREAMS=${STREAMS:-2}
TRIALS=${TRIALS:-6}         # the search's trials (the preset's n_trials is 8; 6 fit a CPU's budget)
SEARCH_EPOCHS=${SEARCH_EPOCHS:-10}   # a trial's schedule (the grid's is the default 15: a CPU's budget)
STAGES=${STAGES:-"grid search best ensemble table"}
TRAINER=${TRAINER:-cpu}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline NO_ALBUMENTATIONS_UPDATE=1
mkdir -p "$OUT"
[ "$TRAINER" = cpu ] && export OMP_NUM_THREADS=$(( $(nproc) / STREAMS > 0 ? $(nproc) / STREAMS : 1 ))
COMMON="model=efficientnet_lite0 data.image_size=128 data.num_workers=0 trainer=$TRAINER logger=csv \
callbacks.progress_bar=null callbacks.model_summary=null"

# One lever, or one group that goes together, at a time (the default recipe is "default"); name|overrides
SETTINGS=(
  "default|"
  "logit_adjusted|model.loss=logit_adjusted"
  "ultrasound_mixup|data/transforms=ultrasound model.mixup_alpha=0.2 trainer.max_epochs=25 scheduler.warmup_epochs=2"
)

one_run() {  # folder fold overrides...: one run; a finished one is kept, a killed one resumes exactly
  local dir="$1" fold="$2"; shift 2
  if [ -f "$dir/metrics.json" ]; then return 0; fi
  if [ -f "$dir/checkpoints/last.ckpt" ]; then $PY -m fetalbrain.train resume="$dir"; return; fi
  rm -rf "$dir"
  $PY -m fetalbrain.train $COMMON data.fold="$fold" "$@" hydra.run.dir="$dir" > /dev/null 2>&1 \
    || { echo "failed: $dir (see $dir/train.log)"; return 1; }
}
export -f one_run
export PY COMMON

if [[ " $STAGES " == *" grid "* ]]; then
  for k in $FOLDS; do for s in "${SETTINGS[@]}"; do echo "$OUT/grid/${s%%|*}/fold$k $k ${s#*|}"; done; done \
    | xargs -P "$STREAMS" -d '\n' -n 1 bash -c 'one_run $0'   # one line a job (-L would join a line ending in a blank)
fi
if [[ " $STAGES " == *" search "* ]]; then  # the levers together, on fold 0's training part (validation F1)
  $PY -m fetalbrain.train hparams_search=honest_recipe $COMMON data.fold=0 hydra.sweep.dir="$OUT/search" \
    hydra/launcher=local_parallel hydra.launcher.max_parallel="$STREAMS" \
    $([ "$TRAINER" = cpu ] && echo hydra.launcher.cpus_per_task="$OMP_NUM_THREADS" || echo hydra.launcher.jobs_per_gpu="$STREAMS") \
    hydra.sweeper.n_trials="$TRIALS" hydra.sweeper.n_jobs="$STREAMS" trainer.max_epochs="$SEARCH_EPOCHS" \
    > "$OUT/search.log" 2>&1
fi
if [[ " $STAGES " == *" best "* ]]; then  # the search's best parameters on every fold
  best=$($PY experiments/honest_recipe/summarise.py --best-overrides "$OUT/search")
  for k in $FOLDS; do echo "$OUT/grid/search_best/fold$k $k $best"; done | xargs -P "$STREAMS" -d '\n' -n 1 bash -c 'one_run $0'

fi
if [[ " $STAGES " == *" ensemble "* ]]; then  # each setting's fold models as one model, on the external normals
  for setting in "$OUT"/grid/*/; do
    setting=$(basename "$setting")
    [ -f "$OUT/ensembles/$setting/metrics.json" ] && continue
    $PY -m fetalbrain.evaluate ckpt="$OUT/grid/$setting" data.root=data/hc18-normal-heads/images \
      data.format=unlabeled out="$OUT/ensembles/$setting" > /dev/null 2>&1 || echo "no ensemble evaluation: $setting"
  done
fi
if [[ " $STAGES " == *" table "* ]]; then
  $PY experiments/honest_recipe/summarise.py "$OUT/grid" --search "$OUT/search" --ensembles "$OUT/ensembles" \
    --out "$RESULTS"
fi
