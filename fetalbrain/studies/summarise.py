"""One summariser for every study: from its run folders to ``results/`` (CSV tables and ``summary.md``).

Tables (``results/``):
- ``status.csv``: per condition, the jobs its grid declares and how many finished (a condition with no complete
  replicate is left out of the other tables, and said so here);
- ``runs.csv``: each run, its condition, seed, split seed, fold, validation and test scores;
- ``pooled.csv``: the headline, each endpoint per condition on pooled out-of-fold predictions (the mean over
  replicates of one score per replicate's pool), with a case-bootstrap interval;
- ``per_class_recall.csv``: recall per class and condition with case-bootstrap intervals;
- ``comparisons.csv``: each condition against the baseline on the primary endpoint, paired (same folds, seeds and
  images): the pooled difference with its case-level paired bootstrap, the corrected resampled t-test over
  repeated cross-validation, Holm-adjusted p over the number of comparisons;
- ``calibration.csv``: per condition, accuracy, mean top-class confidence and ECE of the temperature-scaled test
  probabilities (mean over replicates; ensembles carry the same columns);
- ``validation.csv``: each condition's validation score, what the study chooses on (``select``);
- ``nested.csv`` with ``select.per_fold``: the condition each outer fold chose on its own validation part, and the
  pooled outer result of that choice (a row "nested selection" of ``pooled.csv``);
- ``ensembles.csv`` with ``select.ensembles``: every ensemble of conditions (mean of the members' temperature-scaled
  probabilities, seed by seed), the one chosen on validation marked, each scored on test; the chosen one's test
  predictions in ``ensemble_predictions.csv``;
- ``published.csv`` with ``published``: each seed's test accuracy against the published one (exact binomial test);
- ``run_metrics.csv`` with ``run_metrics``: those keys of each run's ``metrics.json`` (its report: the 1-NN
  baseline, the hierarchy, the external check, ...), mean, min and max over the condition's runs.

Choices are made on validation only (``spec.check_selection``); test predictions are read for reporting.
"""

import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from fetalbrain.evaluation.calibration import expected_calibration_error
from fetalbrain.progress import step
from fetalbrain.project import PROJECT_ROOT
from fetalbrain.studies import statistics as st
from fetalbrain.studies.collect import StudyRun, collect_runs, missing_jobs
from fetalbrain.studies.spec import Study, StudyError, check_selection

log = logging.getLogger(__name__)
NESTED = "nested selection"


def portable(path) -> str:
    """A path as committed results may name it: relative to the project where it lies inside it."""
    path = Path(path)
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def _order(replicate: tuple) -> tuple:
    """Replicates (seed, split seed) in one order everywhere; no split seed sorts first."""
    return tuple(-1 if v is None else v for v in replicate)


class Pools:
    """Every condition's pooled test predictions, aligned on the images all of them scored: ``probs[c]`` is
    replicates x images x classes, ``true`` and ``cases`` follow the same image order."""

    def __init__(self, study: Study, runs: list[StudyRun], part: str = "test"):
        tables: dict[str, dict[tuple, pd.DataFrame]] = {}
        folds = study.folds or 1
        for condition in study.conditions:
            by_replicate: dict[tuple, list[StudyRun]] = {}
            for run in runs:
                if run.condition == condition:
                    by_replicate.setdefault(run.replicate, []).append(run)
            complete = {r: m for r, m in by_replicate.items() if len({x.fold for x in m}) == folds}
            for replicate in sorted(set(by_replicate) - set(complete), key=str):
                log.warning(
                    "%s, replicate %s: %d of %d folds finished; left out",
                    condition,
                    replicate,
                    len(by_replicate[replicate]),
                    folds,
                )
            tables[condition] = {
                r: pd.concat([x.predictions(part) for x in complete[r]]) for r in sorted(complete, key=_order)
            }
        empty = [c for c, t in tables.items() if not t]
        if study.baseline in empty or len(empty) == len(tables):
            raise StudyError(f"{study.name}: no complete replicate of {', '.join(empty)} under {study.runs}")
        for condition in empty:  # reported as unfinished (status.csv), left out of every table
            log.warning("%s: no complete replicate yet; left out of the summary", condition)
            del tables[condition]
        self.conditions = list(tables)
        first = next(iter(next(iter(tables.values())).values()))
        self.classes = [c[2:] for c in first.columns if c.startswith("p_")]
        common = set.intersection(*(set(t["path"]) for r in tables.values() for t in r.values()))
        self.paths = sorted(common)
        reference = first.drop_duplicates("path").set_index("path").loc[self.paths]
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(reference["true"]) - set(index))
        if unknown:
            raise StudyError(f"{study.name}: classes {unknown} in the predictions have no probability column")
        self.true = reference["true"].map(index).to_numpy()
        self.cases = reference["case"].astype(str).to_numpy()
        columns = [f"p_{c}" for c in self.classes]
        self.replicates = {c: list(t) for c, t in tables.items()}
        self.probs = {
            c: np.stack(
                [
                    t.drop_duplicates("path").set_index("path").loc[self.paths, columns].to_numpy(float)
                    for t in r.values()
                ]
            )
            for c, r in tables.items()
        }


def _per_run_scores(run: StudyRun, metrics) -> dict:
    row = {
        "condition": run.condition,
        "seed": run.seed,
        "split_seed": run.split_seed,
        "fold": run.fold,
        "run": portable(run.folder),
    }
    for part in ("val", "test"):
        row.update({f"{part}/{m}": v for m, v in run.scores(part, metrics).items()})
    return row


def _fold_difference(runs_a: list[StudyRun], runs_b: list[StudyRun], metric: str) -> list[float]:
    """Per (replicate, fold) the test score difference a - b, on the fold's own test images."""
    b_by_job = {(r.replicate, r.fold): r for r in runs_b}
    return [
        run.scores("test", (metric,))[metric] - b_by_job[(run.replicate, run.fold)].scores("test", (metric,))[metric]
        for run in runs_a
        if (run.replicate, run.fold) in b_by_job
    ]


def _pooled_rows(name: str, pools_true, probs, resampler, study: Study, replicates: int, runs: int) -> list[dict]:
    values = st.pooled_with_intervals(pools_true, probs, resampler, study.bootstrap["confidence"], study.endpoints)
    return [
        {
            "condition": name,
            "endpoint": "primary" if m == study.primary else "secondary",
            "metric": m,
            "value": v,
            "ci_low": lo,
            "ci_high": hi,
            "replicates": replicates,
            "runs": runs,
            "images": len(pools_true),
            "cases": resampler.num_cases,
        }
        for m, (v, lo, hi) in values.items()
    ]


def _by_path(run: StudyRun, part: str) -> pd.DataFrame:
    return run.predictions(part).drop_duplicates("path").set_index("path")


def calibration(true: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict[str, float]:
    """Mean over replicates of the mean top-class confidence and the ECE (``bins`` equal-width bins): an ensemble
    of members that disagree is less confident than it is accurate."""
    return {
        "mean_confidence": float(np.mean([p.max(axis=1).mean() for p in probs])),
        "ece": float(np.mean([expected_calibration_error(p, true, bins) for p in probs])),
    }


def ensembles(study: Study, runs: list[StudyRun], pools: Pools, resampler) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every ensemble of ``select.ensembles`` sizes over the conditions, scored on validation (the choice) and on
    test (the report); the chosen one's test predictions."""
    metric = study.select.metric
    columns = [f"p_{c}" for c in pools.classes]
    jobs: dict[tuple, dict[str, StudyRun]] = {}
    for run in runs:
        jobs.setdefault((run.replicate, run.fold), {})[run.condition] = run
    rows, chosen_predictions, best = [], None, None
    for size in study.select.ensembles:
        for members in itertools.combinations(pools.conditions, size):
            val_scores = []
            for job in jobs.values():
                if all(m in job for m in members):
                    tables = [_by_path(job[m], "val") for m in members]
                    common = sorted(set.intersection(*(set(t.index) for t in tables)))
                    mean = np.mean([t.loc[common, columns].to_numpy(float) for t in tables], axis=0)
                    true = tables[0].loc[common, "true"].map({c: i for i, c in enumerate(pools.classes)}).to_numpy()
                    val_scores.append(st.scores(true, mean, (metric,))[metric])
            shared = [r for r in pools.replicates[members[0]] if all(r in pools.replicates[m] for m in members)]
            probs = np.mean([pools.probs[m][[pools.replicates[m].index(r) for r in shared]] for m in members], axis=0)
            test = st.pooled_with_intervals(
                pools.true, probs, resampler, study.bootstrap["confidence"], study.endpoints
            )
            row = {
                "members": " + ".join(members),
                "size": size,
                "replicates": len(shared),
                f"val/{metric}": float(np.mean(val_scores)) if val_scores else np.nan,
            }
            for m, (v, lo, hi) in test.items():
                row.update({f"test/{m}": v, f"test/{m}_ci_low": lo, f"test/{m}_ci_high": hi})
            row.update({f"test/{k}": v for k, v in calibration(pools.true, probs).items()})
            rows.append(row)
            if best is None or row[f"val/{metric}"] > best:
                best, chosen_predictions = row[f"val/{metric}"], (members, shared, probs)
    table = pd.DataFrame(rows)
    table["chosen on validation"] = table[f"val/{metric}"] == best
    members, shared, probs = chosen_predictions
    frames = []
    for r, p in zip(shared, probs):
        frame = pd.DataFrame(
            {
                "members": " + ".join(members),
                "seed": r[0],
                "split_seed": r[1],
                "path": [portable(path) for path in pools.paths],
                "case": pools.cases,
                "true": [pools.classes[t] for t in pools.true],
                "predicted": [pools.classes[i] for i in p.argmax(axis=1)],
            }
        )
        frames.append(pd.concat([frame, pd.DataFrame(p, columns=columns)], axis=1))
    return table, pd.concat(frames, ignore_index=True)


def nested_selection(study: Study, runs: list[StudyRun], pools: Pools) -> tuple[pd.DataFrame, list, np.ndarray]:
    """Per (replicate, outer fold): the condition best on that job's validation part (inner, from its training
    data), and the pooled test predictions of the chosen runs: the outer result of the selection procedure.
    Among the conditions with finished runs (a condition not run at all, e.g. cut for time, is no candidate: the
    status table shows it); a job lacking one of them is left out."""
    metric = study.select.metric
    ran = {run.condition for run in runs}
    jobs: dict[tuple, list[StudyRun]] = {}
    for run in runs:
        jobs.setdefault((run.replicate, run.fold), []).append(run)
    rows, chosen_tables = [], {}
    for (replicate, fold), candidates in sorted(jobs.items(), key=lambda job: (_order(job[0][0]), job[0][1])):
        if {r.condition for r in candidates} != ran or len(ran) < 2:
            continue
        val = {r.condition: r.scores("val", (metric,))[metric] for r in candidates}
        winner = max(val, key=lambda c: (val[c], c == study.baseline))
        rows.append(
            {
                "seed": replicate[0],
                "split_seed": replicate[1],
                "fold": fold,
                "chosen": winner,
                f"val/{metric}": val[winner],
            }
        )
        chosen_tables.setdefault(replicate, []).append(next(r for r in candidates if r.condition == winner))
    columns = [f"p_{c}" for c in pools.classes]
    complete = [r for r in sorted(chosen_tables, key=_order) if len({x.fold for x in chosen_tables[r]}) == study.folds]
    probs = [
        pd.concat([x.predictions("test") for x in chosen_tables[r]])
        .drop_duplicates("path")
        .set_index("path")
        .loc[pools.paths, columns]
        .to_numpy(float)
        for r in complete
    ]
    return (
        pd.DataFrame(rows, columns=["seed", "split_seed", "fold", "chosen", f"val/{metric}"]),
        complete,
        np.stack(probs) if probs else np.empty((0, len(pools.paths), len(pools.classes))),
    )


def summarise(study: Study) -> dict[str, pd.DataFrame]:
    """Every results table of the study, from its finished runs (see the module docstring)."""
    check_selection(study.select, f"{study.folder / 'study.yaml'}")
    runs = collect_runs(study)
    missing = missing_jobs(study, runs)
    for condition, left in missing.items():
        if left:
            log.warning("%s: %d of %d jobs not finished", condition, left, study.jobs_per_condition())
    metrics = tuple(dict.fromkeys([*study.endpoints, study.select.metric]))
    tables: dict[str, pd.DataFrame] = {
        "status": pd.DataFrame(
            {
                "condition": list(missing),
                "jobs": study.jobs_per_condition(),
                "finished": [study.jobs_per_condition() - left for left in missing.values()],
            }
        )
    }
    with step(f"Study {study.name}: scores of {len(runs)} runs", log):
        tables["runs"] = pd.DataFrame([_per_run_scores(r, metrics) for r in runs]).sort_values(
            ["condition", "seed", "split_seed", "fold"], na_position="first"
        )
        pools = Pools(study, runs)
        boot = study.bootstrap
        resampler = st.CaseResampler(pools.cases, boot["samples"], boot["seed"])
    with step(f"Study {study.name}: pooled endpoints and per-class recall ({boot['samples']} case resamples)", log):
        pooled, recall, calibrated = [], [], []
        for condition in pools.conditions:
            probs = pools.probs[condition]
            calibrated.append(
                {
                    "condition": condition,
                    "accuracy": st.replicate_mean(pools.true, probs, None, ("accuracy",))["accuracy"],
                    **calibration(pools.true, probs),
                }
            )
            count = sum(r.condition == condition for r in runs)
            pooled += _pooled_rows(condition, pools.true, probs, resampler, study, len(probs), count)
            values = st.recall_with_intervals(pools.true, probs, resampler, boot["confidence"])
            for c, name in enumerate(pools.classes):
                recall.append(
                    {
                        "condition": condition,
                        "class": name,
                        "images": int((pools.true == c).sum()),
                        "cases": len(set(pools.cases[pools.true == c])),
                        "recall": values[c, 0],
                        "ci_low": values[c, 1],
                        "ci_high": values[c, 2],
                    }
                )
    validation = tables["runs"].groupby("condition", sort=False)[f"val/{study.select.metric}"].agg(["mean", "count"])
    validation = validation.reindex(list(study.conditions)).reset_index()
    validation.columns = ["condition", f"val/{study.select.metric}", "runs"]
    validation["best on validation"] = (
        validation[f"val/{study.select.metric}"] == validation[f"val/{study.select.metric}"].max()
    )
    tables["validation"] = validation
    compared = {c: (pools.replicates[c], pools.probs[c]) for c in pools.conditions}
    if study.select.per_fold:
        if not study.folds:
            raise StudyError(f"{study.folder / 'study.yaml'}: select.per_fold needs folds (nested cross-validation)")
        with step(f"Study {study.name}: nested selection on each outer fold's validation part", log):
            tables["nested"], nested_replicates, nested_probs = nested_selection(study, runs, pools)
            if len(nested_probs):
                pooled += _pooled_rows(
                    NESTED, pools.true, nested_probs, resampler, study, len(nested_probs), len(tables["nested"])
                )
                compared[NESTED] = (nested_replicates, nested_probs)
    tables["pooled"] = pd.DataFrame(pooled)
    tables["calibration"] = pd.DataFrame(calibrated)
    tables["per_class_recall"] = pd.DataFrame(recall)
    with step(f"Study {study.name}: paired comparisons against {study.baseline}", log):
        tables["comparisons"] = comparisons(study, runs, pools, compared, resampler)
    if study.select.ensembles:
        with step(f"Study {study.name}: ensembles, chosen on validation", log):
            tables["ensembles"], tables["ensemble_predictions"] = ensembles(study, runs, pools, resampler)
    if study.published:
        tables["published"] = published(study, pools)
    if study.run_metrics:
        tables["run_metrics"] = run_metrics(study, runs)
        if study.folds:
            tables["run_comparisons"] = run_metric_comparisons(study, runs)
    return tables


def run_metrics(study: Study, runs: list[StudyRun]) -> pd.DataFrame:
    rows = []
    for condition in study.conditions:
        summaries = [r.metrics for r in runs if r.condition == condition]
        for key in study.run_metrics:
            values = np.array([s[key] for s in summaries if isinstance(s.get(key), (int, float))], dtype=float)
            rows.append(
                {
                    "condition": condition,
                    "metric": key,
                    "runs": len(values),
                    "mean": values.mean() if len(values) else np.nan,
                    "min": values.min() if len(values) else np.nan,
                    "max": values.max() if len(values) else np.nan,
                }
            )
    return pd.DataFrame(rows)


def _number_or_nan(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan


def run_metric_comparisons(study: Study, runs: list[StudyRun]) -> pd.DataFrame:
    """Each run metric of each condition against the baseline's, paired by (replicate, fold): the mean difference
    with the corrected resampled t-test's interval and p, Holm-adjusted over the conditions of each metric. What a
    study whose endpoint is a run's own report (e.g. the external check) is judged by."""
    baseline = {(r.replicate, r.fold): r.metrics for r in runs if r.condition == study.baseline}
    rows = []
    for key in study.run_metrics:
        for condition in study.conditions:
            if condition == study.baseline:
                continue
            own = [r for r in runs if r.condition == condition and (r.replicate, r.fold) in baseline]
            pairs = [(r.metrics.get(key), baseline[(r.replicate, r.fold)].get(key)) for r in own]
            differences = np.array([_number_or_nan(mine) - _number_or_nan(theirs) for mine, theirs in pairs])
            ratio = float(np.nanmean([r.test_train_ratio for r in own])) if own else np.nan
            finite = differences[np.isfinite(differences)]
            row = {
                "metric": key,
                "condition": condition,
                "baseline": study.baseline,
                "pairs": len(finite),
                "difference": float(finite.mean()) if len(finite) else np.nan,
            }
            row.update(st.corrected_resampled_t(finite, ratio, study.bootstrap["confidence"]))
            rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table["p_holm"] = table.groupby("metric", sort=False)["p_t"].transform(lambda p: pd.Series(st.holm(p), p.index))
    return table


def comparisons(study: Study, runs, pools: Pools, compared: dict, resampler) -> pd.DataFrame:
    metric, baseline = study.primary, study.baseline
    rows = []
    base_replicates, base = compared[baseline]
    for condition, (replicates, probs) in compared.items():
        if condition == baseline:
            continue
        shared = [r for r in replicates if r in base_replicates]  # paired: the same seeds and splits
        mine = probs[[replicates.index(r) for r in shared]]
        theirs = base[[base_replicates.index(r) for r in shared]]
        row = {"condition": condition, "baseline": baseline, "metric": metric, "replicates": len(shared)}
        row.update(st.paired_bootstrap(pools.true, mine, theirs, resampler, metric, study.bootstrap["confidence"]))
        if study.folds and condition != NESTED:
            own = [r for r in runs if r.condition == condition]
            ratio = float(np.nanmean([r.test_train_ratio for r in own])) if own else np.nan
            row.update(
                st.corrected_resampled_t(
                    _fold_difference(own, [r for r in runs if r.condition == baseline], metric), ratio
                )
            )
        else:  # one split: seeds differ only in initialisation, so a t-test over them says nothing about new cases
            row.update({"t": np.nan, "df": np.nan, "p_t": np.nan})
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table["comparisons"] = len(table)
        primary_p = table["p_t"].where(table["p_t"].notna(), table["p_bootstrap"])
        table["p_holm"] = st.holm(primary_p)
    return table


def published(study: Study, pools: Pools) -> pd.DataFrame:
    rows = []
    for condition, numbers in study.published.items():
        if condition not in pools.conditions:
            continue
        for replicate, probs in zip(pools.replicates[condition], pools.probs[condition]):
            correct = int((probs.argmax(axis=1) == pools.true).sum())
            result = st.binomial_against(correct, len(pools.true), numbers["accuracy"], study.bootstrap["confidence"])
            rows.append(
                {
                    "condition": condition,
                    "seed": replicate[0],
                    "correct": correct,
                    "images": len(pools.true),
                    **result,
                    "published": numbers["accuracy"],
                }
            )
    return pd.DataFrame(rows)
