"""A study's finished runs, read back from their folders: which condition, seed, split seed and fold each is,
and its validation and test predictions (with the run's temperature, as the run's own report calibrates).

A run belongs to the condition whose overrides it was started with (``.hydra/overrides.yaml``), however it was
launched (``fetalbrain.study``, a hand-made multirun, a cluster); a run matching two conditions is an error.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from fetalbrain.evaluation.calibration import apply_temperature
from fetalbrain.runs.layout import CONFIG_FILE, find_runs, read_summary
from fetalbrain.studies.spec import Study, StudyError
from fetalbrain.studies.statistics import scores

PREDICTION_FILES = {"val": "val_predictions.csv", "test": "predictions.csv"}


@dataclass
class StudyRun:
    folder: Path
    condition: str
    seed: int
    split_seed: int | None
    fold: int | None
    test_train_ratio: float  # n_test / n_train of its split (the t-test's correction)
    metrics: dict  # its metrics.json metrics: the report's numbers, the temperature
    _tables: dict = field(default_factory=dict, repr=False, compare=False)  # part -> predictions, read once

    @property
    def replicate(self) -> tuple:
        """Runs of one replicate together score every image once (one seed, one split seed, all folds)."""
        return (self.seed, self.split_seed)

    @property
    def temperature(self) -> float:
        return float(self.metrics.get("calibration/temperature", 1.0) or 1.0)

    def predictions(self, part: str) -> pd.DataFrame:
        """One row per image: path, true, case and the temperature-scaled class probabilities ``p_<class>``.
        Read once per run and part; callers must not change it."""
        if part in self._tables:
            return self._tables[part]
        path = self.folder / PREDICTION_FILES[part]
        if not path.is_file():
            raise StudyError(f"{self.folder}: no {path.name} (runs from before studies kept validation predictions)")
        table = pd.read_csv(path)
        columns = [c for c in table.columns if c.startswith("p_")]
        if self.temperature != 1.0:
            table[columns] = apply_temperature(table[columns].to_numpy(float), self.temperature)
        if "case" not in table:
            raise StudyError(f"{path}: no case column (needed for case-level intervals); rerun with this version")
        self._tables[part] = table
        return table

    def scores(self, part: str, metrics) -> dict[str, float]:
        """The named metrics of this run's predictions of ``part`` (``statistics.scores``)."""
        table = self.predictions(part)
        classes = [c[2:] for c in table.columns if c.startswith("p_")]
        true = table["true"].map({c: i for i, c in enumerate(classes)}).to_numpy()
        return scores(true, table[[f"p_{c}" for c in classes]].to_numpy(float), metrics)


def _overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def condition_of(study: Study, overrides: list[str], where: Path) -> str | None:
    given = set(overrides)
    matches = [c for c, wanted in study.conditions.items() if set(wanted) <= given]
    if len(matches) > 1:  # the most specific wins when one condition's overrides contain another's
        most = max(len(study.conditions[c]) for c in matches)
        matches = [c for c in matches if len(study.conditions[c]) == most]
    if len(matches) > 1:
        raise StudyError(f"{where}: its overrides match the conditions {', '.join(matches)}: make them distinct")
    return matches[0] if matches else None


def collect_runs(study: Study) -> list[StudyRun]:
    """The study's finished classification runs under ``study.runs`` that belong to its declared grid."""
    if not study.runs.is_dir():
        raise StudyError(f"{study.runs}: no runs yet; start them with python -m fetalbrain.study {study.name}")
    found = []
    for folder in find_runs([study.runs], task="classification"):
        condition = condition_of(study, _overrides(folder), folder)
        if condition is None:
            continue
        config, summary = OmegaConf.load(folder / CONFIG_FILE), read_summary(folder)
        data = config.data
        grouped = data.get("splitter") == "grouped"
        run = StudyRun(
            folder=folder,
            condition=condition,
            seed=int(config.seed),
            split_seed=int(data.split_seed) if grouped and study.folds else None,
            fold=int(data.fold) if grouped and study.folds else None,
            test_train_ratio=_test_train_ratio(summary),
            metrics=summary["metrics"],
        )
        if run.seed not in study.seeds or (study.folds and (run.split_seed not in study.split_seeds)):
            continue  # a run of another grid in the same folder (an earlier seed list, say)
        found.append(run)
    return found


def _test_train_ratio(summary: dict) -> float:
    sizes = summary.get("data", {}).get("split", {}).get("part_sizes", {})
    return sizes["test"] / sizes["train"] if sizes.get("train") and sizes.get("test") else np.nan


def missing_jobs(study: Study, runs: list[StudyRun]) -> dict[str, int]:
    """Per condition, how many jobs of its grid have no finished run."""
    done: dict[str, set] = {c: set() for c in study.conditions}
    for run in runs:
        done[run.condition].add((run.seed, run.split_seed, run.fold))
    return {c: study.jobs_per_condition() - len(d) for c, d in done.items()}
