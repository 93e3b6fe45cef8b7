"""Compare runs: ``python -m fetalbrain.compare outputs/multirun/<date>/<time> [more dirs] [--out DIR]``.

Reads run directories only (``metrics.json``, ``per_class.csv``, ``predictions.csv``, ``.hydra/``),
groups runs by model, split and every other override that differs between them except the fold and
the seed, and writes per group: mean ± std and a 95% t-interval of the main metrics, mean per-class
recall, and the confusion matrix of the pooled out-of-fold predictions. Outputs: ``comparison.csv``,
``comparison.md``, ``comparison.png``, ``per_class_recall.csv``, ``confusion_<group>.png``; with
``--wandb`` the table is logged to W&B as well.
"""

import argparse
import logging
import os
import re
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score  # noqa: E402

from fetalbrain.evaluation.intervals import mean_interval  # noqa: E402
from fetalbrain.evaluation.metrics import COMPARED  # noqa: E402
from fetalbrain.evaluation.plots import confusion_matrix_figure  # noqa: E402
from fetalbrain.runs import find_runs, read_summary  # noqa: E402

log = logging.getLogger(__name__)

NOT_A_SETTING = re.compile(
    r"^(data\.fold|data\.synthetic|seed|hydra\.|ckpt_path|model|data/split|data\.splitter|data\.num_workers|logger)\b"
)


def classification_runs(directories: list[Path]) -> list[Path]:
    runs = find_runs(directories, task="classification")
    if not runs:
        raise FileNotFoundError(
            f"no run directories of classification runs (with metrics.json) under {', '.join(map(str, directories))}"
        )
    return runs


def load_run(run: Path) -> dict:
    summary = read_summary(run)
    overrides_file = run / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    config_file = run / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return {
        "run": str(run),
        "model": summary["run"].get("model"),
        "split": summary["data"]["split"]["splitter"],
        "fold": (config.get("data") or {}).get("fold"),
        "overrides": [o for o in overrides or [] if not NOT_A_SETTING.match(o.lstrip("+~"))],
        **summary["metrics"],
    }


def label_groups(runs: pd.DataFrame) -> pd.Series:
    """model · split · the overrides that differ between runs (the swept keys)."""
    varying = set()
    all_overrides = [set(o) for o in runs["overrides"]]
    common = set.intersection(*all_overrides) if all_overrides else set()
    for overrides in all_overrides:
        varying |= overrides - common
    return runs.apply(
        lambda r: " · ".join([r["model"], r["split"], *sorted(o for o in r["overrides"] if o in varying)]), axis=1
    )


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for group, members in runs.groupby("group", sort=True):
        for metric in COMPARED:
            values = members[metric].dropna().to_numpy() if metric in members else []
            rows.append({"group": group, "metric": metric, **mean_interval(values)})
    return pd.DataFrame(rows)


def per_class_recall(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean recall per class over the runs whose test part holds that class."""
    frames = []
    for run, group in zip(runs["run"], runs["group"]):
        table = pd.read_csv(Path(run) / "per_class.csv")
        frames.append(table[table["support"] > 0].assign(group=group))
    joined = pd.concat(frames)
    recall = joined.pivot_table(index="group", columns="name", values="recall", aggfunc="mean")
    return recall.round(3)


def pooled_predictions(runs: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Pool out-of-fold predictions per group: one confusion matrix and one set of pooled scores."""
    rows = []
    for group, members in runs.groupby("group", sort=True):
        predictions = pd.concat([pd.read_csv(Path(r) / "predictions.csv") for r in members["run"]])
        classes = [c[2:] for c in predictions.columns if c.startswith("p_")]
        index = {c: i for i, c in enumerate(classes)}
        true, predicted = predictions["true"].map(index), predictions["predicted"].map(index)
        matrix = confusion_matrix(true, predicted, labels=list(range(len(classes))))
        confusion_matrix_figure(
            matrix,
            classes,
            out / f"confusion_{slug(group)}.png",
            f"{group}: pooled out-of-fold predictions (n={len(predictions)})",
        )
        with warnings.catch_warnings():  # classes predicted but absent from every test part are expected
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            balanced = balanced_accuracy_score(true, predicted)
        rows.append(
            {
                "group": group,
                "pooled_images": len(predictions),
                "pooled_accuracy": float((true == predicted).mean()),
                "pooled_balanced_accuracy": balanced,
                "pooled_f1_macro": f1_score(true, predicted, average="macro", labels=sorted(set(true))),
            }
        )
    return pd.DataFrame(rows)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def markdown_table(summary: pd.DataFrame, pooled: pd.DataFrame) -> str:
    header = ["group", "runs", *COMPARED.values(), "pooled OOF macro F1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, rows in summary.groupby("group", sort=True):
        cells = [group, str(int(rows["n"].max()))]
        for metric in COMPARED:
            r = rows[rows["metric"] == metric].iloc[0]
            if r["n"] == 0:
                cells.append("–")
            elif r["n"] == 1:
                cells.append(f"{r['mean']:.3f}")
            else:
                cells.append(f"{r['mean']:.3f} ± {r['std']:.3f} [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]")
        cells.append(f"{pooled.set_index('group').loc[group, 'pooled_f1_macro']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_figure(summary: pd.DataFrame, path: Path) -> None:
    shown = ["test/balanced_accuracy", "test/f1_macro", "test/auroc_macro"]
    groups = sorted(summary["group"].unique())
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.5))
    width = 0.8 / len(shown)
    for k, metric in enumerate(shown):
        rows = summary[summary["metric"] == metric].set_index("group").loc[groups]
        error = np.nan_to_num(rows["mean"] - rows["ci95_low"])
        ax.bar(np.arange(len(groups)) + k * width, rows["mean"], width, yerr=error, capsize=3, label=COMPARED[metric])
    ax.set_xticks(np.arange(len(groups)) + width * (len(shown) - 1) / 2, groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test score (mean, 95% CI over runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_wandb(table: pd.DataFrame, figure: Path, mode: str, project: str, out: Path) -> None:
    import wandb

    from fetalbrain.tracking import resolve_mode

    run = wandb.init(project=project, job_type="compare", mode=resolve_mode(mode), dir=str(out))
    try:
        run.log({"comparison": wandb.Table(dataframe=table), "comparison_plot": wandb.Image(str(figure))})
    finally:
        run.finish()


def compare(directories: list[Path], out: Path, wandb_mode: str | None = None, project: str = "fetalbrain") -> str:
    runs = pd.DataFrame([load_run(r) for r in classification_runs(directories)])
    runs["group"] = label_groups(runs)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    pooled = pooled_predictions(runs, out)
    summary.to_csv(out / "comparison.csv", index=False)
    pooled.to_csv(out / "pooled_out_of_fold.csv", index=False)
    per_class_recall(runs).to_csv(out / "per_class_recall.csv")
    base = Path(os.path.commonpath(runs["run"].tolist()))
    listing = runs.drop(columns=["overrides"]).assign(run=[str(Path(r).relative_to(base)) for r in runs["run"]])
    listing.to_csv(out / "runs.csv", index=False)  # paths relative to the runs' common folder
    table = markdown_table(summary, pooled)
    (out / "comparison.md").write_text(
        f"# Comparison of {len(runs)} runs\n\nmean ± std [95% t-interval] over runs; "
        "pooled OOF = all test predictions of a group pooled.\n\n" + table + "\n"
    )
    comparison_figure(summary, out / "comparison.png")
    if wandb_mode:
        wide = summary.pivot(index="group", columns="metric", values="mean").reset_index()
        log_to_wandb(wide, out / "comparison.png", wandb_mode, project, out)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+", type=Path, help="multirun or outputs directories")
    parser.add_argument("--out", type=Path, help="where to write (default: <first directory>/comparison)")
    parser.add_argument("--wandb", choices=("auto", "online", "offline"), help="also log the table to W&B")
    parser.add_argument("--project", default="fetalbrain", help="W&B project")
    args = parser.parse_args(argv)
    print(compare(args.directories, args.out or args.directories[0] / "comparison", args.wandb, args.project))


if __name__ == "__main__":
    main()
