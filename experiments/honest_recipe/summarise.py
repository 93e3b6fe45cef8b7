"""Tables of the honest-recipe study (grouped 5-fold CV by case).

    python experiments/honest_recipe/summarise.py GRID_DIR [--search DIR] [--ensembles DIR] --out RESULTS_DIR
    python experiments/honest_recipe/summarise.py --best-overrides SEARCH_DIR   # the search's best, as overrides
    python experiments/honest_recipe/summarise.py --readme-tables RESULTS_DIR   # README tables from results/ alone

GRID_DIR holds one folder per setting with one run per test fold (``<setting>/fold<k>``). Writes to RESULTS_DIR:

* ``honest_recipe_runs.csv``: one row per run (setting, fold, epochs, minutes, every metric tabled);
* ``honest_recipe.csv``: per setting and metric, n, mean, std and the 95 % t-interval over folds (``mean_interval``,
  as ``compare`` computes them), and the paired difference from ``default`` (same folds) with its interval and the
  folds it wins;
* ``honest_recipe.md``: the table, the hierarchical view, with ``--search`` the Optuna trials, and with
  ``--ensembles`` (``<DIR>/<setting>``: ``evaluate`` of the setting's fold models as one ensemble on the external
  normal heads) the ensemble's specificity there beside its members';
* ``readme_*.csv``: the README's tables (its generated blocks), from the three files above only:
  ``readme_primary.csv`` (the pre-stated primary endpoint, macro F1), ``readme_paired.csv`` (paired differences
  from ``default``: the primary endpoint and the secondary one the README discusses), ``readme_secondary.csv``,
  ``readme_hierarchy.csv`` (with the folds each setting has), ``readme_ensembles.csv`` and ``readme_search.csv``.
  ``python summarise.py --readme-tables RESULTS_DIR`` rewrites them from the committed files alone (no run folder).

A setting "wins across folds" when its macro F1 beats the default's on every fold it has and the 95 % interval of
the paired difference lies above 0.
"""

import re
import sys
from pathlib import Path

import pandas as pd
import yaml

from fetalbrain.evaluation.intervals import mean_interval
from fetalbrain.runs.layout import find_runs, read_summary

BASE = "default"
FOLD = re.compile(r"data.fold=\d+ ?")
MAIN = {
    "test/f1_macro": "macro F1",
    "test/accuracy": "accuracy",
    "test/balanced_accuracy": "balanced accuracy",
    "test/auroc_macro": "macro AUROC",
    "test/ece_temperature_scaled": "ECE (calibrated)",
    "screening/test_auroc": "screening AUROC",
    "external/normal_specificity": "external normal specificity",
}
HIERARCHY = {
    "hierarchy/abnormal_test_accuracy": "normal vs abnormal accuracy",
    "hierarchy/anomaly_test_f1_macro": "anomaly macro F1 (if abnormal)",
    "hierarchy/ventriculomegaly_merged_test_f1_macro": "macro F1, ventriculomegaly grades merged",
    "hierarchy/ventriculomegaly_grade_test_accuracy": "grade accuracy (if ventriculomegaly)",
}


def run_rows(grid: Path) -> pd.DataFrame:
    rows = []
    for run in find_runs([grid], task="classification"):
        summary = read_summary(run)
        fold = re.fullmatch(r"fold(\d+)", run.name)
        if fold is None:
            continue
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
        rows.append(
            {
                "setting": run.parent.name,
                "fold": int(fold.group(1)),
                "overrides": " ".join(
                    o for o in overrides if not o.startswith(("data.num_workers", "callbacks.", "logger"))
                ),
                "epochs": summary["run"]["epochs_trained"],
                "minutes": summary["run"]["train_seconds"] / 60,
                **{key: summary["metrics"].get(key) for key in {**MAIN, **HIERARCHY}},
            }
        )
    if not rows:
        raise FileNotFoundError(f"no finished run under {grid}/<setting>/fold<k>")
    return pd.DataFrame(rows).sort_values(["setting", "fold"])


def paired(runs: pd.DataFrame, setting: str, key: str = "test/f1_macro") -> dict:
    """The setting's score minus the default's on the folds both have."""
    mine = runs[runs["setting"] == setting].set_index("fold")[key]
    base = runs[runs["setting"] == BASE].set_index("fold")[key]
    difference = (mine - base).dropna()
    stats = mean_interval(difference)
    wins = int((difference > 0).sum())
    return {
        "n": stats["n"],
        "mean": stats["mean"],
        "ci95_low": stats["ci95_low"],
        "ci95_high": stats["ci95_high"],
        "wins": wins,
        "wins_across_folds": bool(stats["n"] >= 2 and wins == stats["n"] and stats["ci95_low"] > 0),
    }


def cell(values: pd.Series, interval: bool = True) -> str:
    stats = mean_interval(values.dropna())
    if stats["n"] == 0:
        return "–"
    if stats["n"] == 1:
        return f"{stats['mean']:.3f}"
    text = f"{stats['mean']:.3f} ± {stats['std']:.3f}"
    return text + (f" [{stats['ci95_low']:.3f}, {stats['ci95_high']:.3f}]" if interval else "")


def search_table(search: Path) -> list[str]:
    results = yaml.safe_load((search / "optimization_results.yaml").read_text())
    trials = pd.read_csv(search / "trials.csv")
    lines = [
        "",
        f"## Optuna search ({results['study_name']}): {len(trials)} trials on fold 0's training part, "
        f"at most {trial_epochs(search, results['best_trial'])} epochs each",
        "",
        f"Objective: best validation macro F1 (the test fold is not seen). Best: trial {results['best_trial']}, "
        f"{results['best_value']:.3f}, with `{best_overrides(search)}`.",
        "",
    ]
    params = list(results.get("best_params") or [])  # the searched keys, as the trials table names them
    lines += ["| trial | state | value | " + " | ".join(params) + " |"]
    lines += ["|" + "---|" * (3 + len(params))]
    for _, row in trials.iterrows():
        value = "–" if pd.isna(row["value"]) else f"{row['value']:.3f}"
        values = [f"{row[p]:.2g}" if isinstance(row[p], float) else str(row[p]) for p in params]
        lines.append(f"| {row['number']} | {row['state']} | {value} | " + " | ".join(values) + " |")
    importances = results.get("param_importances") or {}
    if importances:
        lines += ["", "Parameter importances (fANOVA over the completed trials): "]
        lines[-1] += ", ".join(f"{k} {v:.2f}" for k, v in importances.items())
    return lines


def ensemble_table(ensembles: Path, runs: pd.DataFrame) -> list[str]:
    """Each setting's fold models as one ensemble on the external normals, beside the members' own check."""
    lines = [
        "",
        "## The fold models as one ensemble, on the external normal heads",
        "",
        "| setting | members | ensemble: specificity (Youden) | members: specificity (Youden) | ensemble: called "
        "normal | ensemble: OOD flagged |",
        "|---|---|---|---|---|---|",
    ]
    for folder in sorted(p for p in ensembles.iterdir() if (p / "metrics.json").is_file()):
        summary = yaml.safe_load((folder / "metrics.json").read_text())
        metrics, members = summary["metrics"], runs[runs["setting"] == folder.name]
        checkpoints = summary["model"]["checkpoint"]
        if "eval/screening/youden/flagged" not in metrics:  # the members share no Youden threshold
            continue
        specificity = 1.0 - metrics["eval/screening/youden/flagged"]
        low, high = (
            1.0 - metrics["eval/screening/youden/flagged_ci_high"],
            1.0 - metrics["eval/screening/youden/flagged_ci_low"],
        )
        lines.append(
            f"| {folder.name} | {len(checkpoints) if isinstance(checkpoints, list) else 1} | "
            f"{specificity:.3f} [{low:.3f}, {high:.3f}] | "
            f"{cell(members['external/normal_specificity'], interval=False)} | "
            f"{metrics['eval/predicted/normal']:.3f} | {metrics.get('eval/ood/flag_rate', float('nan')):.3f} |"
        )
    return lines


def trial_epochs(search: Path, trial: int) -> str:
    """A trial's epoch budget, from its run folder's resolved config."""
    config = search / str(trial) / "config.yaml"
    return str(yaml.safe_load(config.read_text())["trainer"]["max_epochs"]) if config.is_file() else "?"


def best_overrides(search: Path) -> str:
    """The best trial's parameters as command-line overrides."""
    results = yaml.safe_load((search / "optimization_results.yaml").read_text())
    if not results.get("best_params"):
        raise SystemExit(f"{search}: no completed trial yet")
    return " ".join(f"{k}={v}" for k, v in results["best_params"].items())


def spread(values: pd.Series) -> str:
    """Mean ± std over the folds (a description of the spread between folds, no interval)."""
    values = values.dropna()
    if not len(values):
        return "–"
    return f"{values.mean():.3f}" if len(values) == 1 else f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def markdown_table(text: str, first_header: str) -> pd.DataFrame:
    """The markdown table of ``text`` whose header row starts with ``| first_header |``, as strings."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |")), None)
    if start is None:
        return pd.DataFrame()
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return pd.DataFrame(rows, columns=cells(lines[start]))


def readme_tables(out: Path) -> None:
    """The README's tables, from ``honest_recipe_runs.csv`` and ``honest_recipe.md`` of ``out`` alone.

    Test scores are described by mean ± std over the folds; the paired differences keep their 5-fold t-interval
    (``mean_interval``) only as a column marked not valid (overlapping training sets, one seed per fold)."""
    runs = pd.read_csv(out / "honest_recipe_runs.csv")
    settings = [BASE] + sorted(s for s in runs["setting"].unique() if s != BASE)
    by_setting = {setting: runs[runs["setting"] == setting] for setting in settings}

    primary = [
        {
            "setting": setting,
            "folds": len(group),
            "epochs trained": f"{group['epochs'].min()}–{group['epochs'].max()}",
            "macro F1 (primary), mean ± std over folds": spread(group["test/f1_macro"]),
        }
        for setting, group in by_setting.items()
    ]
    pd.DataFrame(primary).to_csv(out / "readme_primary.csv", index=False)

    paired_rows = []
    for endpoint, key in (("primary", "test/f1_macro"), ("secondary", "external/normal_specificity")):
        for setting in settings[1:]:
            difference = paired(runs, setting, key)
            paired_rows.append(
                {
                    "endpoint": f"{endpoint}: {MAIN[key]}",
                    "setting": setting,
                    "setting, mean": by_setting[setting][key].mean(),
                    "default, mean": by_setting[BASE][key].mean(),
                    "difference (paired, mean over folds)": difference["mean"],
                    "5-fold t-interval low (not valid)": difference["ci95_low"],
                    "5-fold t-interval high (not valid)": difference["ci95_high"],
                    "folds better": f"{difference['wins']} of {difference['n']}",
                }
            )
    pd.DataFrame(paired_rows).to_csv(out / "readme_paired.csv", index=False, float_format="%.4f")

    secondary = [
        {"setting": setting, **{MAIN[key]: spread(group[key]) for key in MAIN if key != "test/f1_macro"}}
        for setting, group in by_setting.items()
    ]
    pd.DataFrame(secondary).to_csv(out / "readme_secondary.csv", index=False)

    hierarchy = [
        {
            "setting": setting,
            "folds with a hierarchy report": int(group[next(iter(HIERARCHY))].notna().sum()),
            **{title: spread(group[key]) for key, title in HIERARCHY.items()},
        }
        for setting, group in by_setting.items()
    ]
    pd.DataFrame(hierarchy).to_csv(out / "readme_hierarchy.csv", index=False)

    text = (out / "honest_recipe.md").read_text()
    ensembles = markdown_table(text, "setting | members")
    if len(ensembles):
        interval = ensembles["ensemble: specificity (Youden)"].str.extract(r"([\d.]+) \[([\d.]+), ([\d.]+)\]")
        pd.DataFrame(
            {
                "setting": ensembles["setting"],
                "members": ensembles["members"].astype(int),
                "ensemble: external specificity (Youden)": interval[0].astype(float),
                "bootstrap 95 % low (images)": interval[1].astype(float),
                "bootstrap 95 % high (images)": interval[2].astype(float),
                "members: external specificity, mean ± std": ensembles["members: specificity (Youden)"],
                "ensemble: called normal (top class)": ensembles["ensemble: called normal"].astype(float),
                "ensemble: flagged not an ultrasound": ensembles["ensemble: OOD flagged"].astype(float),
            }
        ).to_csv(out / "readme_ensembles.csv", index=False)
    trials = markdown_table(text, "trial | state")
    if len(trials):
        table = pd.DataFrame(
            {
                "trial": trials["trial"].astype(int),
                "state": trials["state"],
                "validation macro F1 (objective)": trials["value"].replace("–", "nan").astype(float),
                "learning rate (× 1e-3)": trials["optimizer.lr"].astype(float) * 1000,
            }
        )
        for column in (
            "model.label_smoothing",
            "data/transforms",
            "model.loss",
            "model.class_weighting",
            "model.mixup_alpha",
        ):
            if column in trials:
                table[column] = trials[column]
        table.to_csv(out / "readme_search.csv", index=False)


def main(grid: Path, out: Path, search: Path | None, ensembles: Path | None = None) -> None:
    runs = run_rows(grid)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "honest_recipe_runs.csv", index=False, float_format="%.4f")
    settings = [BASE] + sorted(s for s in runs["setting"].unique() if s != BASE)
    summary = []
    for setting in settings:
        group = runs[runs["setting"] == setting]
        for key in [*MAIN, *HIERARCHY]:
            summary.append({"setting": setting, "metric": key, **mean_interval(group[key].dropna())})
        if setting != BASE:
            difference = paired(runs, setting)
            summary.append({"setting": setting, "metric": "test/f1_macro minus default (paired)", **difference})
    pd.DataFrame(summary).to_csv(out / "honest_recipe.csv", index=False, float_format="%.4f")

    header = ["setting", "folds", "epochs", "min/run", *MAIN.values(), "macro F1 − default (paired)", "folds won"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting in settings:
        group = runs[runs["setting"] == setting]
        difference = paired(runs, setting) if setting != BASE else None
        lines.append(
            "| "
            + " | ".join(
                [
                    f"**{setting}**" if difference and difference["wins_across_folds"] else setting,
                    str(len(group)),
                    f"{group['epochs'].min()}–{group['epochs'].max()}",
                    f"{group['minutes'].mean():.0f}",
                    *(cell(group[key], interval=key == "test/f1_macro") for key in MAIN),
                    "–"
                    if difference is None
                    else f"{difference['mean']:+.3f} [{difference['ci95_low']:+.3f}, {difference['ci95_high']:+.3f}]",
                    "–" if difference is None else f"{difference['wins']}/{difference['n']}",
                ]
            )
            + " |"
        )
    lines += ["", "| setting | " + " | ".join(HIERARCHY.values()) + " |", "|" + "---|" * (len(HIERARCHY) + 1)]
    for setting in settings:
        group = runs[runs["setting"] == setting]
        lines.append(f"| {setting} | " + " | ".join(cell(group[k], interval=False) for k in HIERARCHY) + " |")
    lines += ["", "| setting | overrides |", "|---|---|"]
    for setting in settings:
        first = runs[runs["setting"] == setting]["overrides"].iloc[0]
        lines.append(f"| {setting} | `{FOLD.sub('', first)}` |")
    if ensembles is not None and ensembles.is_dir():
        lines += ensemble_table(ensembles, runs)
    if search is not None and (search / "optimization_results.yaml").is_file():
        lines += search_table(search)
    text = "\n".join(lines)
    (out / "honest_recipe.md").write_text(
        "# Honest recipe: grouped 5-fold CV by case\n\nTest scores over the folds: mean ± std [95 % t-interval]; "
        "a setting in bold wins across folds (better on every fold, paired interval above 0).\n\n" + text + "\n"
    )
    readme_tables(out)
    print(text)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] == ["--best-overrides"] and len(arguments) == 2:
        print(best_overrides(Path(arguments[1])))
    elif arguments[:1] == ["--readme-tables"] and len(arguments) == 2:
        readme_tables(Path(arguments[1]))
    elif len(arguments) >= 3 and "--out" in arguments:
        out = Path(arguments[arguments.index("--out") + 1])
        search = Path(arguments[arguments.index("--search") + 1]) if "--search" in arguments else None
        ensembles = Path(arguments[arguments.index("--ensembles") + 1]) if "--ensembles" in arguments else None
        main(Path(arguments[0]), out, search, ensembles)
    else:
        sys.exit(__doc__)
