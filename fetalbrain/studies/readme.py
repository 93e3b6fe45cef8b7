"""Numbers never typed by hand: a study README's tables are generated from its ``results/`` files.

A block sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; NAME is one of ``BLOCKS``
(written from the study runner's tables) or ``table:FILE.csv`` (any CSV of ``results/``, as it is: studies whose
results predate the runner). ``write_readme`` fills every block of a README; ``stale_blocks`` lists those that
differ from their results (a test runs it on every study), ``blocks_in`` what a README carries.
"""

import math
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from fetalbrain.studies.statistics import LABELS

BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w./:-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _with_interval(value, low, high) -> str:
    if not all(isinstance(v, float) and math.isfinite(v) for v in (low, high)):
        return _number(value)
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _p(value) -> str:
    if not isinstance(value, float) or not math.isfinite(value):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _read(results: Path, name: str) -> pd.DataFrame:
    path = results / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (run python -m fetalbrain.study NAME --summarise)")
    return pd.read_csv(path)


def headline(results: Path) -> str:
    pooled = _read(results, "pooled.csv")
    metrics = list(dict.fromkeys(pooled.sort_values("endpoint", key=lambda e: e != "primary")["metric"]))
    primary = pooled.loc[pooled["endpoint"] == "primary", "metric"].iloc[0]
    header = ["condition", "replicates (runs)", "images (cases)"]
    header += [f"**{LABELS[m]}** (primary)" if m == primary else LABELS[m] for m in metrics]
    rows = []
    for condition, group in pooled.groupby("condition", sort=False):
        first = group.iloc[0]
        values = group.set_index("metric")
        rows.append(
            [condition, f"{first.replicates} ({first.runs})", f"{first.images} ({first.cases})"]
            + [_with_interval(*values.loc[m, ["value", "ci_low", "ci_high"]]) for m in metrics]
        )
    return _table(header, rows)


def comparisons(results: Path) -> str:
    table = _read(results, "comparisons.csv")
    if not len(table):
        return "No comparison (one condition).\n"
    rows = [
        [
            r.condition,
            r.baseline,
            f"{LABELS[r.metric]}",
            _with_interval(r.difference, r.ci_low, r.ci_high),
            _p(r.p_bootstrap),
            _number(r.t, 2) + (f" (df {int(r.df)})" if math.isfinite(r.df) else ""),
            _p(r.p_t),
            _p(r.p_holm),
        ]
        for r in table.itertuples()
    ]
    header = [
        "condition",
        "baseline",
        "endpoint",
        "difference [paired case bootstrap]",
        "p (bootstrap)",
        "corrected t",
        "p (t)",
        f"p (Holm, {_count(int(table['comparisons'].iloc[0]), 'comparison')})",
    ]
    return _table(header, rows)


def per_class(results: Path) -> str:
    table = _read(results, "per_class_recall.csv")
    conditions = list(dict.fromkeys(table["condition"]))
    rows = []
    for name, group in table.groupby("class", sort=False):
        values = group.set_index("condition")
        first = group.iloc[0]
        if not first.images:
            continue  # a class no pooled image has (a single-case class outside the test part, say)
        rows.append(
            [name, f"{first.images} ({first.cases})"]
            + [_with_interval(*values.loc[c, ["recall", "ci_low", "ci_high"]]) for c in conditions]
        )
    return _table(["class", "images (cases)", *conditions], rows)


def validation(results: Path) -> str:
    table = _read(results, "validation.csv")
    metric = next(c for c in table.columns if c.startswith("val/"))
    rows = [
        [
            r["condition"],
            str(int(r["runs"])) if math.isfinite(r["runs"]) else "0",
            _number(r[metric]),
            "yes" if r["best on validation"] else "",
        ]
        for _, r in table.iterrows()
    ]
    return _table(
        ["condition", "runs", f"validation {LABELS[metric[4:]]} (mean over runs)", "best on validation"], rows
    )


def nested(results: Path) -> str:
    table = _read(results, "nested.csv")
    counts = table["chosen"].value_counts()
    rows = [[condition, str(count)] for condition, count in counts.items()]
    return _table(["condition chosen on the outer fold's own validation part", "outer folds (of all replicates)"], rows)


def ensemble_table(results: Path) -> str:
    table = _read(results, "ensembles.csv")
    metric = next(c for c in table.columns if c.startswith("val/"))
    tested = [
        c
        for c in table.columns
        if c.startswith("test/") and not c.endswith(("_ci_low", "_ci_high")) and f"{c}_ci_low" in table
    ]
    extra = [c for c in ("test/mean_confidence", "test/ece") if c in table]
    rows = [
        [r["members"], str(r["replicates"]), _number(r[metric]), "yes" if r["chosen on validation"] else ""]
        + [_with_interval(r[c], r[f"{c}_ci_low"], r[f"{c}_ci_high"]) for c in tested]
        + [_number(r[c]) for c in extra]
        for _, r in table.iterrows()
    ]
    header = ["members", "replicates", f"validation {LABELS[metric[4:]]}", "chosen on validation"]
    names = {"test/mean_confidence": "mean confidence", "test/ece": "ECE"}
    return _table(header + [f"test {LABELS[c[5:]]}" for c in tested] + [names[c] for c in extra], rows)


def published(results: Path) -> str:
    table = _read(results, "published.csv")
    rows = [
        [
            r.condition,
            str(r.seed),
            f"{r.correct}/{r.images}",
            _with_interval(r.accuracy, r.ci_low, r.ci_high),
            _number(r.published),
            _p(r.p_binomial),
        ]
        for r in table.itertuples()
    ]
    header = ["condition", "seed", "correct", "test accuracy [exact 95 % interval]", "published", "p (exact binomial)"]
    return _table(header, rows)


def _range(row) -> str:
    if not row["runs"]:
        return "–"
    if row["runs"] == 1:
        return _number(row["mean"])
    return f"{_number(row['mean'])} ({_number(row['min'])}–{_number(row['max'])})"


def run_metric_table(results: Path) -> str:
    table = _read(results, "run_metrics.csv")
    conditions = list(dict.fromkeys(table["condition"]))
    rows = []
    for key, group in table.groupby("metric", sort=False):
        values = group.set_index("condition")
        rows.append([f"`{key}`"] + [_range(values.loc[c]) for c in conditions])
    return _table(["from each run's report: mean (min–max) over runs", *conditions], rows)


def run_comparisons(results: Path) -> str:
    table = _read(results, "run_comparisons.csv")
    if not len(table):
        return "No comparison (one condition).\n"
    conditions = table["condition"].nunique()
    rows = [
        [
            f"`{r.metric}`",
            f"{r.condition} − {r.baseline}",
            str(int(r.pairs)),
            _with_interval(r.difference, r.t_ci_low, r.t_ci_high),
            _p(r.p_t),
            _p(r.p_holm),
        ]
        for r in table.itertuples()
    ]
    header = [
        "from each run's report",
        "difference",
        "pairs (split seed, fold)",
        "mean difference [corrected t interval]",
        "p (corrected t)",
        f"p (Holm, {_count(conditions, 'comparison')} per metric)",
    ]
    return _table(header, rows)


def calibration(results: Path) -> str:
    table = _read(results, "calibration.csv")
    rows = [[r.condition, _number(r.accuracy), _number(r.mean_confidence), _number(r.ece)] for r in table.itertuples()]
    return _table(["condition", "test accuracy", "mean confidence", "ECE (15 bins)"], rows)


def status(results: Path) -> str:
    table = _read(results, "status.csv")
    rows = [
        [r.condition, f"{r.finished} of {r.jobs}", "" if r.finished == r.jobs else "**not finished**"]
        for r in table.itertuples()
    ]
    return _table(["condition", "jobs finished", ""], rows)


def any_table(results: Path, file: str) -> str:
    table = _read(results, file)
    return _table([str(c) for c in table.columns], [[_number(v) for v in row] for row in table.itertuples(index=False)])


# name -> (results file, title in summary.md, renderer), in the order summary.md shows them
BLOCKS: dict[str, tuple[str, str, Callable[[Path], str]]] = {
    "status": ("status.csv", "Jobs finished", status),
    "headline": ("pooled.csv", "Pooled out-of-fold endpoints (case-bootstrap intervals)", headline),
    "published": ("published.csv", "Against the published numbers", published),
    "comparisons": ("comparisons.csv", "Paired comparisons against the baseline", comparisons),
    "validation": ("validation.csv", "Validation (what is chosen on)", validation),
    "nested": ("nested.csv", "Nested selection", nested),
    "ensembles": ("ensembles.csv", "Ensembles", ensemble_table),
    "calibration": ("calibration.csv", "Calibration (temperature-scaled, mean over replicates)", calibration),
    "run_metrics": ("run_metrics.csv", "From each run's report", run_metric_table),
    "run_comparisons": ("run_comparisons.csv", "From each run's report, paired against the baseline", run_comparisons),
    "per_class": ("per_class_recall.csv", "Recall per class (case-bootstrap intervals)", per_class),
}


def render(name: str, results: Path) -> str:
    if name.startswith("table:"):
        return any_table(results, name[len("table:") :])
    if name not in BLOCKS:
        raise ValueError(f"generated block {name!r} unknown: one of {', '.join(BLOCKS)} or table:FILE.csv")
    return BLOCKS[name][2](results)


def blocks_in(readme: Path) -> list[str]:
    return [m.group("name") for m in BLOCK.finditer(readme.read_text())]


def write_readme(readme: Path, results: Path) -> list[str]:
    """Fill every generated block of ``readme`` from ``results``; returns the blocks written."""
    text = readme.read_text()
    new = BLOCK.sub(lambda m: m.group(1) + render(m.group("name"), results) + m.group(4), text)
    if new != text:
        readme.write_text(new)
    return blocks_in(readme)


def stale_blocks(readme: Path, results: Path) -> list[str]:
    """The blocks whose text differs from what ``results`` gives (or whose results file is missing)."""
    stale = []
    for match in BLOCK.finditer(readme.read_text()):
        try:
            fresh = render(match.group("name"), results)
        except (FileNotFoundError, ValueError, KeyError):
            fresh = None
        if fresh != match.group("body"):
            stale.append(match.group("name"))
    return stale


def summary_markdown(name: str, results: Path) -> str:
    """``results/summary.md``: every block the results allow, in one page."""
    parts = [
        f"# Study {name}: results\n\nWritten by `python -m fetalbrain.study {name} --summarise`; "
        "README blocks are generated from the same files.\n"
    ]
    for file, title, renderer in BLOCKS.values():
        if (results / file).is_file():
            parts.append(f"## {title}\n\n{renderer(results)}")
    return "\n".join(parts)
