#!/usr/bin/env bash
# The published protocol on the official (leaky) split, one preset per model family, three seeds each, then
# the tables (reproduced vs published, the 1-NN raw-pixel baseline of each run's report, the hierarchical view).
#
#   bash experiments/reproduction/run.sh                        # CPU, PARALLEL=2 jobs at once, 1 thread each
#   PARALLEL=3 TRAINER=gpu bash experiments/reproduction/run.sh # a GPU: several small jobs share it
#
# A stopped study continues where it stopped: start it again (finished jobs are skipped, unfinished ones resume).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/study/reproduction/runs}
RESULTS=${RESULTS:-experiments/reproduction/results}
PRESETS=${PRESETS:-reproduce_cnn,reproduce_separable,reproduce_efficientnet_lite0}
SEEDS=${SEEDS:-42,1,2}   # 42: the seed of the committed table's runs
PARALLEL=${PARALLEL:-2}
TRAINER=${TRAINER:-cpu}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline NO_ALBUMENTATIONS_UPDATE=1
LAUNCH="hydra/launcher=local_parallel hydra.launcher.max_parallel=$PARALLEL"
[ "$TRAINER" = cpu ] && LAUNCH="$LAUNCH hydra.launcher.cpus_per_task=1" || LAUNCH="$LAUNCH hydra.launcher.jobs_per_gpu=$PARALLEL"

$PY -m fetalbrain.train -m experiment="$PRESETS" seed="$SEEDS" trainer="$TRAINER" data.num_workers=0 logger=csv \
  callbacks.progress_bar=null callbacks.model_summary=null $LAUNCH hydra.sweep.dir="$OUT" ${EXTRA:-}
$PY -m fetalbrain.compare "$OUT" --out "$RESULTS"
$PY experiments/reproduction/summarise.py "$OUT" "$RESULTS"
