"""Benchmark models and the data pipeline: ``python -m fetalbrain.benchmark [key=value ...]``.

For each model (``conf/model/`` names) and image size: parameters, forward GFLOPs per image, the FLOPs of
one training step (forward and backward at the batch and image size, counted), training throughput through
Lightning and through a bare PyTorch loop on the same real batches (their ratio is the framework's
overhead), the FLOP/s achieved and the model FLOP utilisation (MFU: achieved ÷ the device's peak), batch-1
inference latency, batched inference throughput and peak memory. Then the data pipeline alone (decode +
augment) at several loader worker counts, with and without the decoded-image cache, against the fastest
model's training speed; optionally the same training benchmark as K processes at once on one device
(``parallel.jobs``). Writes ``benchmark.json`` and ``benchmark.md`` (with the machine's description) into
the run directory. Settings: ``conf/benchmark.yaml``; ``benchmark=gpu`` is the GPU measurement's preset.
The measurements live in ``fetalbrain.benchmarks``; this module is the command.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fetalbrain.benchmarks.parallel import PARALLEL_JOB, parallel_job
from fetalbrain.benchmarks.report import markdown
from fetalbrain.benchmarks.suite import run


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    results = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    print(markdown(results))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == PARALLEL_JOB:
        parallel_job(Path(sys.argv[2]))  # a child of the parallel-jobs section, not a Hydra run
    else:
        main()
