#!/usr/bin/env bash
# Issue #11, "GPU numbers": training throughput and model FLOP utilisation (MFU) of Xception at 299 px and
# EfficientNet-Lite0 at 224 px with bf16, channels_last and torch.compile; Lightning against a bare PyTorch
# loop; data-pipeline headroom at 0, 2, 4 and 8 loader workers; 1, 2 and 4 training jobs at once on the GPU
# against one. One benchmark run: python -m fetalbrain.benchmark benchmark=gpu (conf/benchmark/gpu.yaml).
#
#   bash experiments/gpu_scaling/run.sh                         # on a machine with a CUDA GPU
#   OUT=/some/folder bash experiments/gpu_scaling/run.sh        # results there instead of results/
#   bash experiments/gpu_scaling/run.sh batch_size=128          # any benchmark override goes last
#   CPU_CHECK=1 bash experiments/gpu_scaling/run.sh             # the small CPU check of the README
#
# Writes $OUT (default experiments/gpu_scaling/results/): benchmark_<name>.md, .json and .log, and
# nvidia-smi.txt, and the README's tables as CSV (tables.py); the benchmark's run folder (job logs of the
# parallel section) stays in outputs/gpu_scaling/.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# The project and its dependencies; nothing else is installed.
"$PY" -c "import fetalbrain" 2>/dev/null || "$PY" -m pip install --quiet -e .
export HF_HUB_OFFLINE=1 WANDB_MODE=offline NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

RESULTS=${OUT:-experiments/gpu_scaling/results}
mkdir -p "$RESULTS"
if [ -n "${CPU_CHECK:-}" ]; then
  # The same sections at CPU scale: does the recipe run end to end? (fp32, no compile, 64 px, few steps.)
  NAME=cpu_check
  SETTINGS=(benchmark=gpu device=cpu precision=32 compile=false cudnn_benchmark=null peak_tflops=null
            "models=[cnn,efficientnet_lite0]" sizes_by_model=null "image_sizes=[64]" batch_size=16
            warmup_steps=2 steps=6 latency_repeats=10 "data_workers=[0,1,2]" data_batches=20 "parallel.jobs=[1,2]")
else
  NAME=gpu
  SETTINGS=(benchmark=gpu)
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true; fi
fi
RUN_DIR=${RUN_DIR:-outputs/gpu_scaling/$NAME-$(date +%Y-%m-%d_%H-%M-%S)}

"$PY" -m fetalbrain.benchmark "${SETTINGS[@]}" hydra.run.dir="$RUN_DIR" "$@" 2>&1 | tee "$RESULTS/benchmark_$NAME.log"
cp "$RUN_DIR/benchmark.md" "$RESULTS/benchmark_$NAME.md"
cp "$RUN_DIR/benchmark.json" "$RESULTS/benchmark_$NAME.json"
"$PY" experiments/gpu_scaling/tables.py "$RESULTS"   # the README's tables: <name>_{models,pipeline,parallel}.csv, goals.csv
echo "Results: $RESULTS/benchmark_$NAME.md"
