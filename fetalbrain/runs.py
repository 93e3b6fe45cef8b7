"""The run directory: one home for what a training run writes, and for finding runs again.

``<run>/`` holds ``config.yaml`` (resolved), ``.hydra/``, ``checkpoints/``, ``metrics.json`` (the
summary: metrics, run facts, data and split, notes), ``model_card.md``/``.json``, the task's report
files and, with W&B, ``wandb_run.json`` (the run id, so that a resumed run continues the same W&B run).
``predict``, ``export``, ``generate``, ``compare`` and the GUI find runs here.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from fetalbrain import PROJECT_ROOT

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = f"{CHECKPOINT_DIR}/last.ckpt"
DEFAULT_LOG_DIR = PROJECT_ROOT / "outputs"


@dataclass
class Report:
    """What a task's end-of-run report returns: metrics for metrics.json, notes, figures for the loggers."""

    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)  # logger key -> PNG in the run directory


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_checkpoint(checkpoint: str | Path) -> dict:
    """A checkpoint's contents, read with weights_only: a checkpoint never runs pickled code."""
    import torch

    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def run_directory(checkpoint: str | Path) -> Path:
    """Checkpoints live in ``<run>/checkpoints/``."""
    return Path(checkpoint).resolve().parent.parent


def read_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no {SUMMARY_FILE})")
    return json.loads(path.read_text())


def task_of(summary: dict) -> str:
    return summary.get("run", {}).get("task", "classification")  # runs from before the task key classify


def find_runs(directories, task: str | None = None) -> list[Path]:
    """Run directories (those with a metrics.json) under the given folders, of one task if given."""
    runs = sorted({p.parent for d in directories for p in Path(d).rglob(SUMMARY_FILE)})
    return [r for r in runs if task is None or task_of(read_summary(r)) == task]


def best_checkpoint(run_dir: Path, summary: dict) -> Path | None:
    """The run's best checkpoint on disk: in its own ``checkpoints/`` (a run moved or copied elsewhere), else the
    path its summary records; None if neither is there."""
    recorded = summary.get("run", {}).get("best_checkpoint") or ""
    if not recorded:
        return None
    for candidate in (Path(run_dir) / CHECKPOINT_DIR / Path(recorded).name, Path(recorded)):
        if candidate.is_file():
            return candidate
    return None


def available_runs(log_dir: str | Path = DEFAULT_LOG_DIR, task: str = "classification") -> list[dict]:
    """Finished runs of a task with their best checkpoint on disk, newest first."""
    runs = []
    for run_dir in find_runs([log_dir], task):
        summary = read_summary(run_dir)
        checkpoint = best_checkpoint(run_dir, summary)
        if checkpoint is not None:
            modified = (run_dir / SUMMARY_FILE).stat().st_mtime
            runs.append(
                {"run_dir": run_dir, "checkpoint": checkpoint, "model": summary["run"]["model"], "modified": modified}
            )
    return sorted(runs, key=lambda r: r["modified"], reverse=True)


def latest_checkpoint(log_dir: str | Path = DEFAULT_LOG_DIR, task: str = "classification") -> Path:
    runs = available_runs(log_dir, task)
    if not runs:
        raise FileNotFoundError(
            f"no trained run with a checkpoint under {log_dir} (a {task} run is needed): train one or pass ckpt=PATH"
        )
    return runs[0]["checkpoint"]


def final_checkpoint(callback) -> str:
    """The checkpoint a run hands on: the best by its monitored metric, or with nothing monitored
    (a generator) the last one, which holds the final weights its report and samples describe."""
    if callback is None:
        return ""
    if callback.monitor is None:
        return callback.last_model_path or callback.best_model_path
    return callback.best_model_path or callback.last_model_path


def run_summary(cfg: DictConfig, model, trainer, datamodule, metrics: dict, notes: list[str], seconds: float) -> dict:
    """The metrics.json of a run: every number under stable names and the facts needed to trust them."""
    import torch  # here, not at the top: commands that only read runs (card, compare) start faster

    checkpoint = trainer.checkpoint_callback
    net = cfg.model.get("net")
    return {
        "metrics": dict(sorted(metrics.items())),
        "run": {
            "task": model.task,
            "model": cfg.model.get("name"),
            "net": (net.get("name", net.get("_target_")) if net else cfg.model.get("_target_")),
            "pretrained_source": getattr(getattr(model, "net", None), "pretrained_source", "none"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "image_size": cfg.data.image_size,
            "epochs_trained": trainer.current_epoch,
            "max_epochs": cfg.trainer.max_epochs,
            "train_seconds": round(seconds, 1),
            "best_checkpoint": final_checkpoint(checkpoint),
            "device": str(trainer.strategy.root_device),
            "processes": trainer.world_size,  # DDP ranks; the report covers the whole test set once
            "torch_threads": torch.get_num_threads(),
            "seed": cfg.get("seed"),
            "resumed": cfg.get("resume") is not None,  # then train_seconds counts the resumed part only
        },
        "data": datamodule.data_summary(),
        "classes": datamodule.class_names,
        "notes": notes,
    }


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """A nested config as ``{"a.b.c": value}``: to compare runs' configs key by key."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
