"""Train and test one model: ``python -m fetalbrain.train [hydra overrides]`` (configs in ``conf/``).

Fits on the train part, picks the best epoch on validation, tests that checkpoint, and writes the
run directory: ``config.yaml`` (resolved; ``.hydra/`` keeps the composed one and the overrides),
checkpoints, ``metrics.json``, ``per_class.csv``,
``confusion_matrix.png`` and ``predictions.csv``. ``main`` returns the optimised metric so Hydra
sweepers (grid, Optuna) can use it.
"""

import logging
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from fetalbrain.evaluation.report import Predictions, write_json, write_test_report

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a ``callbacks``/``logger`` group (entries may be null to drop them)."""
    return [instantiate(entry) for entry in (group or {}).values() if entry and "_target_" in entry]


def build(cfg: DictConfig):
    """Data module (set up), model, trainer: everything a run needs, from the config alone."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(
        cfg.model,
        class_names=datamodule.class_names,
        preprocessing=datamodule.preprocessing_config(),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = [
        c for c in instantiate_group(cfg.get("callbacks")) if loggers or not isinstance(c, LearningRateMonitor)
    ]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return datamodule, model, trainer


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit, test the best checkpoint, write the report. Returns (metrics, objects)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)  # .hydra/ keeps the unresolved one
    datamodule, model, trainer = build(cfg)
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    train_seconds = time.perf_counter() - started
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best:
        log.warning("No best checkpoint (no checkpoint callback or no validation): testing the last weights")
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
    metrics = {**fit_metrics, **{k: float(v) for k, v in trainer.callback_metrics.items()}}

    # The test loader is not shuffled: predictions follow the table (a limit_test_batches run
    # predicts only its first rows). Validation predictions (best weights) choose thresholds.
    test = Predictions(model.test_results["probs"].numpy(), model.test_results["targets"].numpy())
    test.paths = list(datamodule.part_table("test")["path"])[: len(test.targets)]
    val = Predictions(*(t.numpy() for t in model.predict_proba(datamodule.val_dataloader())))
    options = cfg.evaluation
    report_metrics, notes = write_test_report(
        output_dir,
        val,
        test,
        datamodule.class_names,
        title=f"{cfg.model.get('name', '')} test, split {cfg.data.splitter}",
        calibration_bins=options.calibration_bins,
        temperature_scaling=options.temperature_scaling,
        min_sensitivity=options.screening_min_sensitivity,
        shortcut_data=(datamodule.part_images("train"), datamodule.part_images("test"))
        if options.shortcut_check
        else None,
    )
    metrics.update(report_metrics)
    for note in notes:
        log.warning("Report: %s", note)
    summary = {
        "metrics": dict(sorted(metrics.items())),
        "run": {
            "model": cfg.model.get("name"),
            "net": cfg.model.net.get("name", cfg.model.net._target_),
            "pretrained_source": getattr(model.net, "pretrained_source", "none"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "image_size": cfg.data.image_size,
            "epochs_trained": trainer.current_epoch,
            "max_epochs": cfg.trainer.max_epochs,
            "train_seconds": round(train_seconds, 1),
            "best_checkpoint": best,
            "device": str(trainer.strategy.root_device),
            "torch_threads": torch.get_num_threads(),
            "seed": cfg.get("seed"),
        },
        "data": datamodule.data_summary(),
        "classes": datamodule.class_names,
        "notes": notes,
    }
    write_json(output_dir / "metrics.json", summary)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):  # once, at test end
            logger.log_metrics(report_metrics)
            for figure in ("confusion_matrix", "roc", "screening_roc", "reliability"):
                if (output_dir / f"{figure}.png").is_file():
                    logger.log_image(key=f"test/{figure}", images=[str(output_dir / f"{figure}.png")])
    log.info("Test: %s", {k: round(v, 4) for k, v in metrics.items() if k.startswith("test/")})
    log.info("Run directory: %s", output_dir)
    return summary, {"datamodule": datamodule, "model": model, "trainer": trainer}


def finish_tracking() -> None:
    """Close the W&B run so that each job of a multirun becomes its own run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        summary, _ = train(cfg)
    finally:
        finish_tracking()
    return summary["metrics"].get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
