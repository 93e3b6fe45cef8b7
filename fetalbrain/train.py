"""Train one model: ``python -m fetalbrain.train [hydra overrides]`` (configs in ``conf/``).

Task-agnostic: the model config names the LightningModule (a classifier, the WGAN-GP generator),
the same data, trainer, callbacks and loggers serve every task, and after ``fit`` the module writes
its own report (``model.report``: a classifier tests its best checkpoint). Every run directory
gets ``config.yaml`` (resolved; ``.hydra/`` keeps the composed one and the overrides), checkpoints,
``metrics.json`` and a model card (see ``fetalbrain.runs.layout``). ``main`` returns the optimised metric
so Hydra sweepers (grid, Optuna) can use it. ``resume=RUN_DIR`` continues a killed run in its own
folder, exactly (see ``fetalbrain.runs.resume``). DDP on one node starts its ranks from the run's config,
so that a DDP job of a multirun stays one job (see ``fetalbrain.training.ddp``). Settings read only by the
report after training (``evaluation.ood``, ``evaluation.external``) are checked before anything is built.
"""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fetalbrain.runs.layout import SUMMARY_FILE, read_summary
from fetalbrain.runs.resume import resume_config
from fetalbrain.training.fit import train
from fetalbrain.training.tracking import finish_tracking

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    cfg = resume_config(cfg)  # resume=RUN_DIR, or a sweep job run again into its folder: that run's config
    if cfg.get("resume") is not None and (Path(cfg.resume) / SUMMARY_FILE).is_file():
        log.info("%s has finished: skipped (its metrics.json answers the sweeper)", cfg.resume)
        return read_summary(cfg.resume)["metrics"].get(cfg.get("optimized_metric"))
    try:
        summary, _ = train(cfg)
    finally:
        finish_tracking()
    return summary["metrics"].get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
