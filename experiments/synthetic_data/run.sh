#!/usr/bin/env bash
# The synthetic-data study: grouped 5-fold CV, one conditional WGAN-GP per fold trained on that fold's
# training part only, then the same classifier recipe (plain CNN and EfficientNet-Lite0 ImageNet) on
# real-only, synthetic-only (TSTR), hybrid 50/50 and real + synthetic oversampling of the rare classes,
# and the synthetic-quality report per fold. Runs STREAMS folds at once (one CPU thread or GPU each).
#
#   bash experiments/synthetic_data/run.sh                 # the CPU recipe (settings below)
#   OUT=/scratch/study GAN_EPOCHS=300 GAN_WIDTH=64 SIZE=128 EPOCHS=30 TRAINER=gpu STREAMS=5 bash ...
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/study/synthetic_data}
FOLDS=${FOLDS:-"0 1 2 3 4"}
STREAMS=${STREAMS:-2}
SIZE=${SIZE:-64}               # image size of the generator and the classifiers
GAN_EPOCHS=${GAN_EPOCHS:-40}
GAN_WIDTH=${GAN_WIDTH:-16}     # generator and critic width (64 on a GPU)
NUM=${NUM:-100}                # synthetic images per class
EPOCHS=${EPOCHS:-10}           # classifier epochs
TRAINER=${TRAINER:-cpu}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline NO_ALBUMENTATIONS_UPDATE=1
[ "$TRAINER" = cpu ] && export OMP_NUM_THREADS=$(( $(nproc) / STREAMS > 0 ? $(nproc) / STREAMS : 1 ))

fold_study() {
  local k=$1 dir=$OUT/fold$1
  # A finished generator (its run has metrics.json) is reused: the study can be continued after a stop.
  [ -f "$dir/gan/metrics.json" ] || $PY -m fetalbrain.train model=wgan_gp data.fold="$k" data.image_size="$SIZE" data.num_workers=0 \
    trainer="$TRAINER" trainer.max_epochs="$GAN_EPOCHS" model.generator_width="$GAN_WIDTH" \
    model.critic_width="$GAN_WIDTH" model.sample_every_n_epochs=10 logger=csv hydra.run.dir="$dir/gan"
  $PY -m fetalbrain.generate ckpt="$dir/gan/checkpoints/last.ckpt" num="$NUM" out="$dir/synthetic" seed=0 overwrite=true
  $PY -m fetalbrain.train -m model=cnn,efficientnet_lite0 data.mix=real,synthetic,hybrid,oversample \
    data.synthetic="$dir/synthetic" data.fold="$k" data.image_size="$SIZE" data.num_workers=0 \
    trainer="$TRAINER" trainer.max_epochs="$EPOCHS" logger=csv callbacks=minimal hydra.sweep.dir="$dir/classifiers"
  # Feature space: the fold's real-only EfficientNet-Lite0; TSTR: its synthetic-only twin.
  local real tstr
  real=$($PY experiments/synthetic_data/find_run.py "$dir/classifiers" efficientnet_lite0 real checkpoint)
  tstr=$($PY experiments/synthetic_data/find_run.py "$dir/classifiers" efficientnet_lite0 synthetic dir)
  $PY -m fetalbrain.synth_quality synthetic="$dir/synthetic" classifier="$real" tstr_run="$tstr" out="$dir/quality"
}

mkdir -p "$OUT"
running=0
for k in $FOLDS; do
  fold_study "$k" > "$OUT/fold$k.log" 2>&1 &
  running=$((running + 1))
  if [ "$running" -ge "$STREAMS" ]; then wait -n; running=$((running - 1)); fi
done
wait
$PY -m fetalbrain.compare "$OUT" --out "$OUT/comparison"
$PY experiments/synthetic_data/summarise.py "$OUT" experiments/synthetic_data/results
