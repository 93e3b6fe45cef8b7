"""Compare runs: ``python -m fetalbrain.compare outputs/multirun/<date>/<time> [more dirs] [--out DIR]``,
or from W&B: ``python -m fetalbrain.compare --wandb-source ENTITY/PROJECT [--group G]``.

Reads run directories (``metrics.json``, ``per_class.csv``, ``predictions.csv``, ``.hydra/``) or, when
W&B is online, the W&B runs of a project (each run's config and summary), groups runs by model, split
and every other setting that differs between them except the fold and the seeds, and writes per group:
mean ± std and a 95% t-interval of the main metrics and, from run folders (they hold the predictions),
mean per-class recall and the confusion matrix of the pooled out-of-fold predictions. Outputs:
``comparison.csv``, ``comparison.md``, ``comparison.png``, ``runs.csv``, and from run folders
``per_class_recall.csv``, ``pooled_out_of_fold.csv``, ``confusion_<group>.png``; with ``--wandb`` the
table is logged to W&B as well.
"""

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from fetalbrain.evaluation.intervals import mean_interval  # noqa: E402
from fetalbrain.evaluation.metrics import COMPARED  # noqa: E402
from fetalbrain.evaluation.plots import confusion_matrix_figure  # noqa: E402
from fetalbrain.progress import track  # noqa: E402
from fetalbrain.runs.layout import CONFIG_FILE, DEFAULT_LOG_DIR, find_runs, flatten_config, read_summary  # noqa: E402
from fetalbrain.studies import statistics as st  # noqa: E402

log = logging.getLogger(__name__)

# Overrides that do not define a group: what a group averages over (folds, seeds), paths, the model and
# split (already in the label), tracking. `model=X` only: `model.<key>=...` is a setting.
NOT_A_SETTING = re.compile(
    r"^(data\.fold|data\.synthetic|seed|hydra\.|ckpt_path|resume|data/split|data\.splitter|data\.num_workers|logger)\b"
    r"|^model=|^[\w.]*seed=|^callbacks\.optuna_pruning\."  # the sweeper's bookkeeping of each trial
)
EXTERNAL_NOTE = (
    "External normals: normal heads from another hospital (evaluation.external), never trained on, called normal "
    "at each run's screening threshold (specificity) or by its top class; far below the test part's specificity, "
    "the normal-vs-abnormal decision may follow the acquisition source; – where runs had no external check."
)


def classification_runs(directories: list[Path]) -> list[Path]:
    runs = find_runs(directories, task="classification")
    if not runs:
        raise FileNotFoundError(
            f"no run directories of classification runs (with metrics.json) under {', '.join(map(str, directories))}"
        )
    return runs


def wandb_group_of(run: Path) -> str | None:
    """The W&B group a run folder's run was logged under: as recorded beside its W&B run id, else
    ``logger.wandb.group`` of its resolved config."""
    from fetalbrain.training.tracking import WANDB_RUN_FILE  # here: only --group needs it

    record = run / WANDB_RUN_FILE
    recorded = json.loads(record.read_text()).get("group") if record.is_file() else None
    if recorded:
        return recorded
    config_file = run / CONFIG_FILE
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    return ((config.get("logger") or {}).get("wandb") or {}).get("group")


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


# ------------------------------------------------------------------------------------------ from W&B
def _as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def wandb_record(run) -> tuple[dict, dict] | None:
    """A W&B run as ``load_run`` makes a run folder's record (overrides left empty), with its flat config;
    None for runs without a test report (generators, unfinished runs)."""
    config, summary = run.config or {}, run.summary_metrics or {}
    metrics = {
        key: float(value)
        for key, value in summary.items()
        if not key.startswith("_") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    if not any(metric in metrics for metric in COMPARED) or "model" not in config or "data" not in config:
        return None
    data = config["data"]
    record = {
        "run": "/".join(run.path),
        "model": config["model"].get("name"),
        "split": data.get("splitter"),
        "fold": data.get("fold"),
        "overrides": [],
        **metrics,
    }
    return record, flatten_config(config)


def swept_settings(records: list[dict], configs: list[dict]) -> None:
    """Fill each W&B record's ``overrides`` with its swept settings. W&B keeps the resolved config (and
    Lightning adds the model's and data module's hyper-parameters at the top level), not the command line,
    so a setting is a key that differs between runs of one model and split with the same fold and seed:
    not what follows from the fold or seed (the split, its normalisation), nor values naming the run's own
    folder (paths, checkpoints, loggers). Of keys that always agree (``label_smoothing`` and
    ``model.label_smoothing``), the config's own path is kept."""
    own_paths = set()
    for config in configs:
        folder = config.get("paths.output_dir")
        own_paths |= {k for k, v in config.items() if folder and isinstance(v, str) and str(folder) in v}
    keys = sorted({k for config in configs for k in config} - own_paths)
    replicates: dict[tuple, list[int]] = {}  # runs that differ only in their settings
    for index, (record, config) in enumerate(zip(records, configs)):
        replicate = (record["model"], record["split"], _as_text(config.get("data.fold")), _as_text(config.get("seed")))
        replicates.setdefault(replicate, []).append(index)
    varying = {
        key
        for members in replicates.values()
        for key in keys
        if len({_as_text(configs[i].get(key)) for i in members}) > 1 and not NOT_A_SETTING.match(f"{key}=")
    }
    by_values: dict[tuple, str] = {}
    for key in sorted(varying, key=lambda k: (-k.count("."), k)):  # dotted config paths first
        by_values.setdefault(tuple(_as_text(config.get(key)) for config in configs), key)
    for record, config in zip(records, configs):
        record["overrides"] = sorted(f"{key}={_as_text(config.get(key))}" for key in by_values.values())


def wandb_runs(path: str, group: str | None = None) -> list[dict]:
    """The finished classification runs of a W&B project (``ENTITY/PROJECT`` or ``PROJECT``), optionally
    one group, as run records."""
    import wandb

    filters = {"group": group} if group else {}
    try:
        pairs = [pair for run in wandb.Api().runs(path, filters=filters) if (pair := wandb_record(run))]
    except Exception as error:  # unknown entity or project, permissions, network
        raise RuntimeError(f"--wandb-source {path}: cannot read its runs from W&B ({error})") from error
    if not pairs:
        raise FileNotFoundError(
            f"--wandb-source {path}{f' --group {group}' if group else ''}: no W&B run with a test report "
            "(finished classification runs log one)"
        )
    records, configs = (list(x) for x in zip(*pairs))
    swept_settings(records, configs)
    return records


def read_runs(directories: list[Path], wandb_source: str | None = None, group: str | None = None) -> tuple:
    """(records, where they came from): W&B when a source is given and W&B is online, else run folders."""
    if wandb_source:
        from fetalbrain.training.tracking import resolve_mode

        mode = resolve_mode("auto")
        if mode == "online":
            return wandb_runs(wandb_source, group), f"W&B {wandb_source}" + (f", group {group}" if group else "")
        why = f"WANDB_MODE={os.environ['WANDB_MODE']}" if os.environ.get("WANDB_MODE") else "no API key or no server"
        print(f"W&B is {mode} ({why}): reading run folders instead of {wandb_source}", file=sys.stderr)
    directories = list(directories) or [DEFAULT_LOG_DIR]
    runs = [r for r in classification_runs(directories) if group is None or wandb_group_of(r) == group]
    if not runs:
        raise FileNotFoundError(
            f"no run of W&B group {group} under {', '.join(map(str, directories))} (a run folder knows its "
            f"group from wandb_run.json or logger.wandb.group): give the sweep's folder instead of --group"
        )
    return [load_run(r) for r in track(runs, "Compare: reading run folders")], "run folders"


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
    """Pool the test predictions of each group's runs: one confusion matrix and one set of pooled scores (the
    metrics' definitions of ``fetalbrain.studies.statistics``). Out-of-fold only where every image is scored once
    (folds of a grouped split); runs that scored the same images (seeds on one split) are pooled and said so."""
    rows = []
    for group, members in runs.groupby("group", sort=True):
        predictions = pd.concat([pd.read_csv(Path(r) / "predictions.csv") for r in members["run"]])
        classes = [c[2:] for c in predictions.columns if c.startswith("p_")]
        true = predictions["true"].map({c: i for i, c in enumerate(classes)}).to_numpy()
        probs = predictions[[f"p_{c}" for c in classes]].to_numpy(float)
        distinct = predictions["path"].nunique()
        what = (
            f"pooled out-of-fold predictions (n={len(predictions)})"
            if distinct == len(predictions)
            else f"{len(members)} runs' predictions of the same {distinct} images, pooled (n={len(predictions)})"
        )
        matrix = confusion_matrix(true, probs.argmax(axis=1), labels=list(range(len(classes))))
        confusion_matrix_figure(matrix, classes, out / f"confusion_{slug(group)}.png", f"{group}: {what}")
        scores = st.scores(true, probs, ("accuracy", "balanced_accuracy", "f1_macro"))
        rows.append(
            {
                "group": group,
                "pooled_images": len(predictions),
                "distinct_images": distinct,
                **{f"pooled_{name}": value for name, value in scores.items()},
            }
        )
    return pd.DataFrame(rows)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def markdown_table(summary: pd.DataFrame, pooled: pd.DataFrame | None) -> str:
    header = ["group", "runs", *COMPARED.values(), *(["pooled macro F1"] if pooled is not None else [])]
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
        if pooled is not None:
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

    from fetalbrain.training.tracking import resolve_mode

    run = wandb.init(project=project, job_type="compare", mode=resolve_mode(mode), dir=str(out))
    try:
        run.log({"comparison": wandb.Table(dataframe=table), "comparison_plot": wandb.Image(str(figure))})
    finally:
        run.finish()


def compare(
    directories: list[Path],
    out: Path,
    wandb_mode: str | None = None,
    project: str = "fetalbrain",
    wandb_source: str | None = None,
    group: str | None = None,
) -> str:
    records, source = read_runs(directories, wandb_source, group)
    runs = pd.DataFrame(records)
    runs["group"] = label_groups(runs)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    summary.to_csv(out / "comparison.csv", index=False)
    from_folders = source == "run folders"
    pooled = None
    if from_folders:  # per-class recall and pooled predictions need each run's per_class.csv and predictions.csv
        pooled = pooled_predictions(runs, out)
        pooled.to_csv(out / "pooled_out_of_fold.csv", index=False)
        per_class_recall(runs).to_csv(out / "per_class_recall.csv")
    base = Path(os.path.commonpath(runs["run"].tolist()))
    listing = runs.drop(columns=["overrides"]).assign(run=[str(Path(r).relative_to(base)) for r in runs["run"]])
    listing.to_csv(out / "runs.csv", index=False)  # paths relative to the runs' common folder (or W&B project)
    table = markdown_table(summary, pooled)
    external = summary[summary["metric"] == "external/normal_specificity"]
    external_checked = bool((external["n"] > 0).any())
    pooled_note = (
        "pooled = all test predictions of a group pooled (out-of-fold where each image was scored once)."
        if from_folders
        else "Per-class recall and the pooled out-of-fold confusion matrices need each run's predictions: "
        "compare the run folders for them."
    )
    (out / "comparison.md").write_text(
        f"# Comparison of {len(runs)} runs\n\nSource: {source}. mean ± std [95% t-interval] over runs; "
        f"{pooled_note}{' ' + EXTERNAL_NOTE if external_checked else ''}\n\n" + table + "\n"
    )
    comparison_figure(summary, out / "comparison.png")
    if wandb_mode:
        wide = summary.pivot(index="group", columns="metric", values="mean").reset_index()
        log_to_wandb(wide, out / "comparison.png", wandb_mode, project, out)
    return table


EXAMPLES = """examples:
  python -m fetalbrain.compare outputs/multirun/DATE/TIME       # a sweep: one row per setting, mean and interval
  python -m fetalbrain.compare outputs/runs outputs/multirun --out comparison/
  python -m fetalbrain.compare --wandb-source ENTITY/PROJECT --group multirun/DATE/TIME

read more: docs/evaluation.md ("Comparing runs")"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fetalbrain.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument(
        "directories",
        nargs="*",
        type=Path,
        help="multirun or outputs directories (with --wandb-source: read when W&B is offline; default outputs/)",
    )
    parser.add_argument("--out", type=Path, help="where to write (default: <first directory>/comparison)")
    parser.add_argument(
        "--wandb-source",
        metavar="ENTITY/PROJECT",
        help="read the runs from this W&B project when W&B is online (else from the directories)",
    )
    parser.add_argument(
        "--group", help="only the runs of this W&B group (logger.wandb.group), from W&B or the run folders"
    )
    parser.add_argument("--wandb", choices=("auto", "online", "offline"), help="also log the table to W&B")
    parser.add_argument("--project", default="fetalbrain", help="W&B project to log the table to")
    args = parser.parse_args(argv)
    if not args.directories and not args.wandb_source:
        parser.error("give run directories, or --wandb-source ENTITY/PROJECT")
    if args.out:
        out = args.out
    elif args.directories:
        out = args.directories[0] / "comparison"
    else:
        out = DEFAULT_LOG_DIR / "comparison" / slug("_".join(filter(None, [args.wandb_source, args.group])) or "all")
    table = compare(args.directories, out, args.wandb, args.project, args.wandb_source, args.group)
    print(table)
    print(f"Written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
