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

from fetalbrain.project import PROJECT_ROOT

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


def final_checkpoint(callback) -> str:
    """The checkpoint a run hands on: the best by its monitored metric, or with nothing monitored
    (a generator) the last one, which holds the final weights its report and samples describe."""
    if callback is None:
        return ""
    if callback.monitor is None:
        return callback.last_model_path or callback.best_model_path
    return callback.best_model_path or callback.last_model_path


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """A nested config as ``{"a.b.c": value}``: to compare runs' configs key by key."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
