"""Build and run one fit from the config alone: data, model, trainer, callbacks, loggers; then the task's report, the
summary and the model card.
"""

import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from fetalbrain.evaluation.checks import check_options
from fetalbrain.evaluation.model_card import write_model_card
from fetalbrain.evaluation.plots import training_curves_figure
from fetalbrain.runs.layout import CONFIG_FILE, SUMMARY_FILE, write_json
from fetalbrain.runs.resume import ReproducibleEpochs, resume_checkpoint
from fetalbrain.training.checkpointing import use_atomic_checkpoints
from fetalbrain.training.ddp import ranks
from fetalbrain.training.summary import run_summary
from fetalbrain.training.tracking import continue_wandb_run, log_report, record_wandb_run

log = logging.getLogger(__name__)
HEAD_FRAME_FILE = "head_frame.csv"  # with data/harmonise=head: what the frame did with each image, and why
CSV_LOG_DIR = "csv"  # <run>/csv/version_N/metrics.csv: what logger=csv writes, kept in every run
CURVES_FILE = "training_curves.png"


def check_evaluation(cfg: DictConfig) -> None:
    """Refuse bad settings of the report's checks (``evaluation.checks``) by key, before anything is built or
    trained: the report reads them only after training, where a typo would cost the whole run and then give only a
    note. Classification runs only (a generator writes no such report)."""
    if getattr(get_class(cfg.model._target_), "task", None) == "classification":
        check_options(cfg.get("evaluation") or {})


def instantiate_group(group: DictConfig | None, **defaults) -> list:
    """Instantiate every entry of a ``callbacks``/``logger`` group (entries may be null to drop them).
    ``defaults`` fill an entry's keys that are null (the W&B logger's job_type is the model's task)."""
    return [
        instantiate(entry, **{k: v for k, v in defaults.items() if k in entry and entry[k] is None})
        for entry in (group or {}).values()
        if entry and "_target_" in entry
    ]


def build_model(cfg: DictConfig, datamodule) -> L.LightningModule:
    """The model config's LightningModule, given what every task needs from the (set-up) data."""
    return instantiate(
        cfg.model,
        class_names=datamodule.class_names,
        preprocessing=datamodule.preprocessing_config(),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )


def build(cfg: DictConfig):
    """Data module (set up), model, trainer: everything a run needs, from the config alone."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = build_model(cfg, datamodule)
    if model.task == "classification":  # the checks' class names (hierarchy groups), now that the data are read
        check_options(cfg.get("evaluation") or {}, datamodule.class_names)
    loggers = instantiate_group(cfg.get("logger"), job_type=model.task)
    if not any(isinstance(logger, CSVLogger) for logger in loggers):  # every run keeps its curves, whatever logs it
        loggers.append(CSVLogger(cfg.paths.output_dir, name=CSV_LOG_DIR))
    callbacks = [ReproducibleEpochs(), *instantiate_group(cfg.get("callbacks"))]  # resumable exactly: not a choice
    try:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    except InstantiationException as error:  # e.g. more devices than the machine has: name the keys
        if not isinstance(error.__cause__, MisconfigurationException):
            raise
        keys = " ".join(f"trainer.{k}={cfg.trainer.get(k)}" for k in ("accelerator", "devices", "strategy"))
        gpus = torch.cuda.device_count()
        raise ValueError(f"{keys}: {error.__cause__} (this machine has {gpus} CUDA GPU(s))") from error
    use_atomic_checkpoints(trainer)  # not a config choice either: a kill while saving must leave whole checkpoints
    # Top-level keys W&B groups and filters by: seed and task here; Lightning adds the data module's
    # (fold, splitter, ...) and the model's hyper-parameters as fit starts.
    for logger in loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "task": model.task})
    return datamodule, model, trainer


def record_head_finder(cfg: DictConfig, datamodule, output_dir: Path) -> None:
    """The head finder's SHA256 (known once the data are set up) into the run's config.yaml, so that a resumed run
    frames its images with the same finder or refuses another by name."""
    harmonise = getattr(datamodule.hparams, "harmonise", None) or {}
    digest = harmonise.get("head_finder_sha256")
    if digest and OmegaConf.select(cfg, "data.harmonise.head_finder_sha256") != digest:
        OmegaConf.update(cfg, "data.harmonise.head_finder_sha256", digest, force_add=True)
        OmegaConf.save(cfg, output_dir / CONFIG_FILE, resolve=True)


def write_training_curves(trainer, run_dir: Path) -> Path | None:
    """``training_curves.png`` from the run's CSV logs (loss, macro F1, learning rate per epoch; a resumed run has
    one log per start), before the model card that shows it. None without a log or an epoch in it, or when the
    figure fails: a missing picture must not cost the finished run its card."""
    folders = {Path(logger.log_dir).parent for logger in trainer.loggers if isinstance(logger, CSVLogger)}
    logs = sorted(
        (p for folder in folders for p in folder.glob("version_*/metrics.csv")),
        key=lambda p: int(p.parent.name.removeprefix("version_")) if p.parent.name[8:].isdigit() else -1,
    )
    try:
        return training_curves_figure(logs, run_dir / CURVES_FILE) if logs else None
    except Exception as error:  # noqa: BLE001 (a figure, never a reason to lose the run)
        log.warning("No %s: %s", CURVES_FILE, error)
        return None


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit, write the task's report, the summary and the model card. Returns (summary, objects).
    With ``cfg.resume`` (set by ``resume_config``), continue that run from its last checkpoint.
    Under DDP every rank runs this; rank 0 alone writes the run folder (the summary is rank 0's)."""
    check_evaluation(cfg)  # before the run folder is written: a bad setting leaves nothing behind
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("resume") is None:
        if rank_zero_only.rank == 0:  # .hydra/ keeps the unresolved config
            OmegaConf.save(cfg, output_dir / CONFIG_FILE, resolve=True)
    else:  # the run's config.yaml stays as it started
        continue_wandb_run(cfg, output_dir)
    datamodule, model, trainer = build(cfg)
    if cfg.get("resume") is None and rank_zero_only.rank == 0:
        record_head_finder(cfg, datamodule, output_dir)
    record_wandb_run(trainer.loggers, output_dir)
    ckpt_path = str(resume_checkpoint(output_dir)) if cfg.get("resume") is not None else cfg.get("ckpt_path")
    with ranks(trainer, cfg, output_dir):
        started = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        train_seconds = time.perf_counter() - started
        fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        report = model.report(trainer, datamodule, output_dir, cfg.evaluation)  # every rank tests its share
        metrics = {**fit_metrics, **{k: float(v) for k, v in trainer.callback_metrics.items()}, **report.metrics}
        summary = run_summary(cfg, model, trainer, datamodule, metrics, report.notes, train_seconds)  # DDP threads
    if not trainer.is_global_zero:
        return summary, {"datamodule": datamodule, "model": model, "trainer": trainer}
    for note in report.notes:
        log.warning("Report: %s", note)
    if getattr(datamodule, "head_frame", None) is not None:
        datamodule.head_frame.to_csv(output_dir / HEAD_FRAME_FILE, index=False)
    curves = write_training_curves(trainer, output_dir)
    if curves is not None:
        report.figures["training/curves"] = curves
    write_json(output_dir / SUMMARY_FILE, summary)
    write_model_card(output_dir, rehash=True)  # these weights are the ones the metrics above describe
    log_report(trainer.loggers, report)
    log.info("Test: %s", {k: round(v, 4) for k, v in metrics.items() if k.startswith("test/")})
    log.info("Run directory: %s", output_dir)
    return summary, {"datamodule": datamodule, "model": model, "trainer": trainer}
