"""Tables of the reproduction study: ``python experiments/reproduction/summarise.py RUNS_DIR RESULTS_DIR``,
and the log of the runs that chose the presets: ``... summarise.py --tuning TUNE_DIR RESULTS_DIR``.

Reads every finished classification run under RUNS_DIR (one per preset and seed; the preset is
``reproduce_<model>``), and writes to RESULTS_DIR:

* ``reproduction.csv``: per preset and metric, n, mean, std and the 95 % t-interval over seeds (``mean_interval``,
  as ``compare`` and the model card compute them);
* ``reproduction.md``: reproduced against published (``published.csv`` beside this script) with the 1-NN
  raw-pixel baseline on the same split, and the hierarchical view;
* ``reproduction_runs.csv``: one row per run (seed, epochs, best epoch, minutes, the metrics tabled);
* with ``--tuning``: ``tuning.csv`` and ``tuning.md``, one row per tuning run (its overrides, best validation
  macro F1 and test scores).
"""

import re
import sys
from pathlib import Path

import pandas as pd
import yaml

from fetalbrain.evaluation.intervals import mean_interval
from fetalbrain.runs.layout import find_runs, read_summary

HERE = Path(__file__).resolve().parent
MAIN = {
    "test/accuracy": "accuracy",
    "test/f1_macro": "macro F1",
    "baseline/nn1_test_accuracy": "1-NN accuracy",
    "baseline/nn1_test_f1_macro": "1-NN macro F1",
    "baseline/nn1_test_same_source": "1-NN nearest is a copy",
}
COPY = ("model accuracy, copy found", "model accuracy, no copy found")  # split by the 1-NN's nearest image
HIERARCHY = {
    "hierarchy/abnormal_test_accuracy": "normal vs abnormal accuracy",
    "hierarchy/abnormal_test_sensitivity": "sensitivity",
    "hierarchy/abnormal_test_specificity": "specificity",
    "hierarchy/anomaly_test_f1_macro": "anomaly macro F1 (if abnormal)",
    "test/f1_macro": "16 classes macro F1",
    "hierarchy/ventriculomegaly_merged_test_f1_macro": "ventriculomegaly merged macro F1",
    "hierarchy/ventriculomegaly_test_recall": "ventriculomegaly found",
    "hierarchy/ventriculomegaly_grade_test_accuracy": "grade accuracy (if ventriculomegaly)",
}


def accuracy_by_copy(run: Path) -> dict:
    """The model's test accuracy where the 1-NN baseline's nearest training image is a copy of the same source,
    and where it is not (``nearest_neighbour.csv`` joined with ``predictions.csv`` by path)."""
    nearest, predictions = run / "nearest_neighbour.csv", run / "predictions.csv"
    if not (nearest.is_file() and predictions.is_file()):
        return {}
    joined = pd.read_csv(nearest)[["path", "same_source"]].merge(pd.read_csv(predictions), on="path")
    right = joined["true"] == joined["predicted"]
    copy = joined["same_source"].astype(bool)
    return {
        "model accuracy, copy found": right[copy].mean(),
        "model accuracy, no copy found": right[~copy].mean(),
        "images with a copy found": int(copy.sum()),
    }


def run_rows(runs_dir: Path) -> pd.DataFrame:
    rows = []
    for run in find_runs([runs_dir], task="classification"):
        summary = read_summary(run)
        info, metrics = summary["run"], summary["metrics"]
        best = re.search(r"epoch_(\d+)", info.get("best_checkpoint") or "")
        rows.append(
            {
                "preset": f"reproduce_{info['model']}",
                "run": str(run.relative_to(runs_dir)),
                "seed": info["seed"],
                "image_size": info["image_size"],
                "epochs": info["epochs_trained"],
                "best_epoch": int(best.group(1)) + 1 if best else None,  # 1-based, as epochs are counted
                "minutes": None if info.get("resumed") else info["train_seconds"] / 60,  # a resumed run: its last part
                **{key: metrics.get(key) for key in {**MAIN, **HIERARCHY}},
                **accuracy_by_copy(run),
            }
        )
    if not rows:
        raise FileNotFoundError(f"no finished classification run under {runs_dir}")
    return pd.DataFrame(rows).sort_values(["preset", "seed"])


def tuning_log(tune_dir: Path, results: Path) -> None:
    """Each tuning run: what it changed (its command-line overrides, less the bookkeeping) and what it scored."""
    bookkeeping = ("data/split=", "data.num_workers=", "trainer=", "logger=", "callbacks.progress_bar=")
    rows = []
    for run in find_runs([tune_dir], task="classification"):
        summary = read_summary(run)
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
        best = re.search(r"epoch_(\d+)", summary["run"].get("best_checkpoint") or "")
        rows.append(
            {
                "run": run.name,
                "overrides": " ".join(
                    o for o in overrides if not o.startswith((*bookkeeping, "callbacks.model_summary"))
                ),
                "epochs": summary["run"]["epochs_trained"],
                "best_epoch": int(best.group(1)) + 1 if best else None,
                "minutes": round(summary["run"]["train_seconds"] / 60),
                **{k: summary["metrics"].get(k) for k in ("val/f1_macro_best", "test/accuracy", "test/f1_macro")},
            }
        )
        if rows[-1]["val/f1_macro_best"] is None:  # a run from before the summary kept it: its CSV log has it
            logged = [pd.read_csv(f) for f in sorted(run.glob("csv/*/metrics.csv"))]
            values = pd.concat(logged)["val/f1_macro"].dropna() if logged else pd.Series(dtype=float)
            rows[-1]["val/f1_macro_best"] = values.max() if len(values) else None
    log = pd.DataFrame(rows).sort_values("run")
    log.to_csv(results / "tuning.csv", index=False, float_format="%.3f")
    lines = [
        "| run | overrides | epochs (best) | val macro F1 | test accuracy | test macro F1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in log.itertuples():
        overrides = re.sub(r"\{_target_:albumentations\.(\w+)[^}]*\}", r"\1", r.overrides)  # transforms by name
        scores = " | ".join("–" if pd.isna(v) else f"{v:.3f}" for v in (r._6, r._7, r._8))
        lines.append(f"| {r.run} | `{overrides}` | {r.epochs} ({r.best_epoch}) | {scores} |")
    (results / "tuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cell(values: pd.Series, interval: bool = True) -> str:
    stats = mean_interval(values.dropna())
    if stats["n"] == 0:
        return "–"
    if stats["n"] == 1 or stats["std"] == 0:
        return f"{stats['mean']:.3f}"
    text = f"{stats['mean']:.3f} ± {stats['std']:.3f}"
    return text + (f" [{stats['ci95_low']:.3f}, {stats['ci95_high']:.3f}]" if interval else "")


def markdown(runs: pd.DataFrame, published: pd.DataFrame) -> str:
    header = ["preset", "runs", "px", "epochs (best)", "min/run", "accuracy", "macro F1", "published"]
    header += ["1-NN accuracy", "1-NN macro F1", "1-NN nearest is a copy", *COPY]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for preset, group in runs.groupby("preset", sort=False):
        claims = published[published["preset"] == preset]
        quoted = "; ".join(
            f"{r.published_model} {r.accuracy:.3f}" + (f" (F1 {r.f1_macro:.3f})" if pd.notna(r.f1_macro) else "")
            for r in claims.itertuples()
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    preset,
                    str(len(group)),
                    str(group["image_size"].iloc[0]),
                    f"{group['epochs'].iloc[0]} ({group['best_epoch'].min()}–{group['best_epoch'].max()})",
                    "–" if group["minutes"].isna().all() else f"{group['minutes'].mean():.0f}",
                    cell(group["test/accuracy"]),
                    cell(group["test/f1_macro"]),
                    quoted or "–",
                    *(cell(group[key], interval=False) for key in list(MAIN)[2:]),
                    *(cell(group[key], interval=False) if key in group else "–" for key in COPY),
                ]
            )
            + " |"
        )
    lines += ["", "| preset | " + " | ".join(HIERARCHY.values()) + " |", "|" + "---|" * (len(HIERARCHY) + 1)]
    for preset, group in runs.groupby("preset", sort=False):
        lines.append(f"| {preset} | " + " | ".join(cell(group[k], interval=False) for k in HIERARCHY) + " |")
    return "\n".join(lines)


def main(runs_dir: Path, results: Path) -> None:
    runs = run_rows(runs_dir)
    published = pd.read_csv(HERE / "published.csv")
    results.mkdir(parents=True, exist_ok=True)
    runs.to_csv(results / "reproduction_runs.csv", index=False, float_format="%.4f")
    summary = [
        {"preset": preset, "metric": key, **mean_interval(group[key].dropna())}
        for preset, group in runs.groupby("preset", sort=False)
        for key in [*MAIN, *COPY, *HIERARCHY]
        if key in group
    ]
    pd.DataFrame(summary).to_csv(results / "reproduction.csv", index=False, float_format="%.4f")
    table = markdown(runs, published)
    (results / "reproduction.md").write_text(
        "# Reproduction on the official split\n\nTest scores, mean ± std over seeds [95 % t-interval]; the 1-NN "
        "baseline does not depend on the seed (the official split is fixed). min/run: training minutes, on a CPU "
        "thread shared with other jobs (– for a run that was stopped and resumed).\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    tuning = arguments[:1] == ["--tuning"]
    if len(arguments) - tuning != 2:
        sys.exit(__doc__)
    source, out = Path(arguments[-2]), Path(arguments[-1])
    if tuning:
        out.mkdir(parents=True, exist_ok=True)
        tuning_log(source, out)
    else:
        main(source, out)
