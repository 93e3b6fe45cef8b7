"""A sweep's files: where its study is stored (by default a journal file in the sweep folder) and what every
sweeper writes into the sweep folder after each batch: the results, the trials table and the plots, from the study
alone, so that sweepers sharing a study write the same picture.

Hydra imports this module at start-up to find plugins: Optuna, pandas and matplotlib are imported lazily.
"""

import os
from collections import Counter
from pathlib import Path
from typing import Any

from hydra_plugins.fetalbrain_plugins.optuna_trials import (
    FAIL_REASON_ATTR,
    JOB_DIR_ATTR,
    REQUEUED_FROM_ATTR,
    VOID_ATTR,
    is_void,
)

RESULTS_FILE = "optimization_results.yaml"
TRIALS_FILE = "trials.csv"
IMPORTANCE_PLOT = "param_importances.png"
HISTORY_PLOT = "optimization_history.png"
DEFAULT_JOURNAL = "optuna_study.journal"


def storage_spec(storage: str | None, sweep_dir: Path) -> str:
    """The storage as the jobs must see it: an RDB URL as given, a journal file as an absolute path."""
    if storage is None or str(storage).strip() == "":
        return str(sweep_dir / DEFAULT_JOURNAL)
    storage = str(storage)
    if "://" in storage:
        if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
            return "sqlite:///" + os.path.abspath(storage[len("sqlite:///") :])  # jobs may run elsewhere
        return storage
    return str(Path(storage).expanduser().absolute())


def _replace_atomically(path: Path, write) -> None:
    """Write through a temporary file: sweepers sharing a sweep folder never leave a half-written file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def trials_table(study):
    """One row per trial: number, state, value, duration, job folder, note, then one column per parameter."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        note = t.user_attrs.get(VOID_ATTR) or t.user_attrs.get(FAIL_REASON_ATTR) or ""
        if REQUEUED_FROM_ATTR in t.user_attrs:
            note = f"requeued from trial {t.user_attrs[REQUEUED_FROM_ATTR]}; {note}".rstrip("; ")
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "duration_s": round(duration, 1) if duration is not None else None,
                "datetime_start": t.datetime_start,
                "job_dir": t.user_attrs.get(JOB_DIR_ATTR, ""),
                "note": note,
                **t.params,
            }
        )
    return pd.DataFrame(rows)


def write_summary(study, sweep_dir: Path, storage: str, n_trials: int, evaluator=None) -> dict:
    """optimization_results.yaml, trials.csv and the plots, from the study alone (so every sweeper on a
    shared study writes the same picture). Returns the results written."""
    import optuna
    import yaml

    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    void = sum(1 for t in trials if is_void(t))
    results: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "storage": storage,
        "direction": study.direction.name.lower(),
        "n_trials": n_trials,
        "trials": {s.name: states.get(s.name, 0) for s in optuna.trial.TrialState},
        "void_trials": void,  # FAIL trials that did not count: interrupted (and requeued) or beyond n_trials
        "best_trial": None,
        "best_value": None,
        "best_params": None,
        "best_job_dir": None,
    }
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if completed:
        best = study.best_trial
        results.update(
            best_trial=best.number,
            best_value=float(best.value),
            best_params=dict(best.params),
            best_job_dir=best.user_attrs.get(JOB_DIR_ATTR),
        )
    importances, why_not = _importances(study, completed, evaluator)
    results["param_importances"] = importances
    if why_not:
        results["param_importances_note"] = why_not
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _replace_atomically(sweep_dir / TRIALS_FILE, lambda p: trials_table(study).to_csv(p, index=False))
    if importances:
        _replace_atomically(
            sweep_dir / IMPORTANCE_PLOT, lambda p: _plot_importances(importances, study, len(completed), p)
        )
    if completed:
        _replace_atomically(sweep_dir / HISTORY_PLOT, lambda p: _plot_history(study, completed, p))
    _replace_atomically(
        sweep_dir / RESULTS_FILE,
        lambda p: p.write_text(yaml.safe_dump(results, sort_keys=False, allow_unicode=True)),
    )
    return results


def _importances(study, completed: list, evaluator) -> tuple[dict[str, float] | None, str | None]:
    """Parameter importances (Optuna's default evaluator unless one is configured), or why there are none."""
    import optuna

    if len(completed) < 2:
        return None, f"parameter importances need at least 2 completed trials, the study has {len(completed)}"
    if len({t.value for t in completed}) < 2:
        return None, "parameter importances say nothing: every completed trial has the same value"
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
        return None, f"parameter importances not computable: {error}"
    if not importances:
        return None, "parameter importances not computable: no parameter varies among the completed trials"
    return {name: float(value) for name, value in importances.items()}, None


def _plot_importances(importances: dict[str, float], study, n_completed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]  # most important at the top
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (normalised)")
    ax.set_title(f"Optuna study '{study.study_name}': {n_completed} completed trials", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def _plot_history(study, completed: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    completed = sorted(completed, key=lambda t: t.number)
    numbers = [t.number for t in completed]
    values = [t.value for t in completed]
    pick = max if study.direction.name == "MAXIMIZE" else min
    best = [pick(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(numbers, values, "o", color="tab:blue", label="trial")
    ax.step(numbers, best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.set_title(f"Optuna study '{study.study_name}' ({study.direction.name.lower()})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
