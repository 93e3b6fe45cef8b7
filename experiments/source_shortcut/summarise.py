"""Tabulate the source-shortcut study: ``python summarise.py RUNS_DIR --out RESULTS_DIR``.

One row per (model, preprocessing) over the grouped folds: mean ± std and the 95 % t-interval of the
classification, screening, shortcut, external-normal and OOD metrics of each run's own report.
Writes ``runs.csv`` (every run) and ``summary.csv`` / ``summary.md``, and ``readme_classifiers.csv`` (the README's
table: metrics as rows, mean ± std over folds, no t-interval). ``python summarise.py --readme-tables RESULTS_DIR``
rewrites the README table from the committed ``summary.csv`` alone (no run folder needed).
"""

import argparse
import re
from pathlib import Path

import pandas as pd
import yaml

from fetalbrain.evaluation.intervals import mean_interval
from fetalbrain.runs.layout import find_runs, read_summary

METRICS = {  # metrics.json key -> column title
    "test/f1_macro": "macro-F1",
    "test/balanced_accuracy": "balanced accuracy",
    "screening/test_auroc": "screening AUROC",
    "screening/youden/test_sensitivity": "screening sensitivity (Youden)",
    "screening/youden/test_specificity": "screening specificity (Youden)",
    "shortcut/image_stats_test_auroc": "image-statistics baseline AUROC",
    "shortcut/border_only_test_auroc": "border-only baseline AUROC",
    "external/normal_specificity": "external normal specificity (HC18)",
    "external/fraction_predicted_normal": "external predicted normal",
    "external/ood_flag_rate": "external flagged OOD",
    "ood/auroc": "OOD AUROC",
    "ood/test_flag_rate": "OOD test flag rate",
}


def run_rows(runs_dir: Path) -> pd.DataFrame:
    rows = []
    for run in find_runs([runs_dir], "classification"):
        summary = read_summary(run)
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        chosen = dict(o.split("=", 1) for o in overrides if "=" in o)
        rows.append(
            {
                "model": summary["run"]["model"],
                "image_size": summary["run"]["image_size"],
                "harmonise": chosen.get("data/harmonise", "none"),
                "fold": int(chosen.get("data.fold", 0)),
                "epochs": summary["run"]["epochs_trained"],
                "run": str(run),
                **{key: summary["metrics"].get(key) for key in METRICS},
            }
        )
    return pd.DataFrame(rows).sort_values(["model", "harmonise", "fold"])


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (model, size, harmonise), group in runs.groupby(["model", "image_size", "harmonise"], sort=False):
        row = {"model": model, "image size": size, "harmonise": harmonise, "folds": len(group)}
        for key, title in METRICS.items():
            values = group[key].dropna()
            if len(values):
                stats = mean_interval(values)
                row[title] = (
                    f"{stats['mean']:.3f} ± {stats['std']:.3f} [{stats['ci95_low']:.3f}, {stats['ci95_high']:.3f}]"
                    if stats["n"] > 1
                    else f"{stats['mean']:.3f}"
                )
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """Metrics as rows, one column per (model, size, preprocessing): mean ± std [95 % interval] over folds."""
    columns = [
        f"{r['model']} {r['image size']} px, harmonise={r['harmonise']} ({r['folds']} folds)"
        for _, r in table.iterrows()
    ]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for title in METRICS.values():
        if title in table:
            lines.append(f"| {title} | " + " | ".join(str(v) if pd.notna(v) else "–" for v in table[title]) + " |")
    return "\n".join(lines) + "\n"


def readme_table(summary: pd.DataFrame) -> pd.DataFrame:
    """``summary.csv`` turned for the README: metrics as rows, one column per (model, size, preprocessing), mean ±
    std over the folds only (a description of the spread between folds: its 5-fold t-intervals are not valid)."""
    order = {
        ("cnn", "none"): 0,
        ("cnn", "anatomy"): 1,
        ("efficientnet_lite0", "none"): 2,
        ("efficientnet_lite0", "anatomy"): 3,
    }
    rows = sorted(summary.to_dict("records"), key=lambda r: order.get((r["model"], r["harmonise"]), len(order)))
    columns = {
        f"{r['model']} {r['image size']} px, {r['harmonise']} ({r['folds']} folds)": [
            re.sub(r" \[.*\]$", "", str(r[title])) if pd.notna(r.get(title)) else "–" for title in METRICS.values()
        ]
        for r in rows
    }
    return pd.DataFrame({"metric": list(METRICS.values()), **columns})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path, nargs="?")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--readme-tables",
        type=Path,
        metavar="RESULTS_DIR",
        help="only rewrite readme_classifiers.csv from RESULTS_DIR/summary.csv",
    )
    args = parser.parse_args()
    if args.readme_tables:
        readme_table(pd.read_csv(args.readme_tables / "summary.csv")).to_csv(
            args.readme_tables / "readme_classifiers.csv", index=False
        )
        return
    if args.runs is None:
        parser.error("RUNS_DIR is required (or --readme-tables RESULTS_DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = run_rows(args.runs)
    runs.drop(columns="run").to_csv(args.out / "runs.csv", index=False, float_format="%.4f")
    table = summary_table(runs)
    table.to_csv(args.out / "summary.csv", index=False)
    (args.out / "summary.md").write_text(markdown(table))
    readme_table(table).to_csv(args.out / "readme_classifiers.csv", index=False)
    print(table.set_index(["model", "image size", "harmonise"]).T.to_string())


if __name__ == "__main__":
    main()
