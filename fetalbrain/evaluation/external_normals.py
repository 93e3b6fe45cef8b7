"""The external normal check of every classification run: normal heads from another hospital, never trained on.

The dataset's ``normal`` class comes from another acquisition than its anomalies, so a model can call "normal"
whatever looks like that source. Normal fetal heads from a third hospital (HC18, Radboud UMC, shipped in
``data/hc18-normal-heads/``) ask whether the normal decision is anatomy or source: a model that learnt anatomy
calls most of them normal, one that learnt the source calls them abnormal. The run's tested weights, its
inference preprocessing (``ood.image_features``) and its validation-chosen screening thresholds are applied as
they are; nothing is fitted on these images, and they never enter training.

Metrics (``external/...``, names in ``fetalbrain.evaluation.metrics``): ``normal_specificity`` at the threshold
of ``evaluation.external.rule`` and ``normal_specificity_<rule>`` at each of the run's rules (uncalibrated
abnormal score 1 - p(normal), the scale the thresholds were chosen on), ``fraction_predicted_normal`` (argmax),
each with ``_ci_low``/``_ci_high`` from a bootstrap over subjects (frames of one examination are not
independent); ``ood_flag_rate`` when the run has an OOD detector; ``images`` and ``subjects``; and for
comparison the same numbers on the run's in-distribution test normals (``test_normal_...``). With
``evaluation.external.by`` (a column of ``labels.csv`` and bin edges: the shipped set's head width, a proxy of
gestational age), the same rates per bin with intervals over the bin's subjects
(``external/<by.key>_<bin>/...``): a check that holds on later pregnancies may fail on early ones. Files:
``external_normals.csv`` (one row per image), ``external_normals_by_bin.csv`` and ``external_normals.png`` (the
abnormal-score histograms).

The folder's layout (``labels.csv`` with ``file``, ``subject`` and optionally ``frame`` and ``label`` columns,
images under ``images/``) is read by ``read_labelled_folder``; ``fetalbrain.data.compact`` makes such copies.
"""

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fetalbrain.data.classes import NORMAL_CLASS
from fetalbrain.data.readers import DatasetError, read_labelled_folder
from fetalbrain.evaluation.intervals import check_bootstrap, subject_bootstrap
from fetalbrain.runs.choices import screening_thresholds

log = logging.getLogger(__name__)

CSV_FILE = "external_normals.csv"
FIGURE_FILE = "external_normals.png"
PREFIX = "external/"
SPECIFICITY = f"{PREFIX}normal_specificity"
FRACTION_NORMAL = f"{PREFIX}fraction_predicted_normal"
OOD_FLAG_RATE = f"{PREFIX}ood_flag_rate"
TEST_PREFIX = f"{PREFIX}test_"  # the in-distribution test normals, for comparison
DEFAULT_WARN_BELOW = 0.5  # evaluation.external.warn_below's default, for a run whose config is not at hand


# ---- options ---------------------------------------------------------------------------------------------------
def check_options(options, rules: list[str] | None = None) -> None:
    """Refuse bad ``evaluation.external`` settings by key (cheap: callable before training starts); with ``rules``
    (``screening_rules`` of the run), also a ``rule`` the run will choose no threshold for."""
    for key in ("root", "label", "rule", "name"):
        if not isinstance(options.get(key), str) or not options.get(key):
            raise ValueError(f"evaluation.external.{key}={options.get(key)!r}: a non-empty string")
    if rules is not None and options.rule not in rules:
        raise ValueError(
            f"evaluation.external.rule={options.rule!r}: not a screening rule of the run; choose one of "
            f"{', '.join(rules)} (named after evaluation.screening_min_sensitivity)"
        )
    check_bootstrap(options.get("bootstrap"), "evaluation.external.bootstrap")
    warn = options.get("warn_below")
    if not isinstance(warn, (int, float)) or isinstance(warn, bool) or not 0 <= warn <= 1:
        raise ValueError(f"evaluation.external.warn_below={warn!r}: a fraction between 0 and 1")
    if not isinstance(options.get("histogram_bins"), int) or options.histogram_bins < 2:
        raise ValueError(f"evaluation.external.histogram_bins={options.get('histogram_bins')!r}: a whole number >= 2")
    by = options.get("by")
    if by is not None:
        for key in ("column", "key", "name"):
            if not isinstance(by.get(key), str) or not by.get(key):
                raise ValueError(f"evaluation.external.by.{key}={by.get(key)!r}: a non-empty string")
        edges = list(by.get("edges") or [])
        if len(edges) < 2 or any(not isinstance(e, (int, float)) or isinstance(e, bool) for e in edges):
            raise ValueError(f"evaluation.external.by.edges={edges!r}: at least two numbers (the bins' edges)")
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"evaluation.external.by.edges={edges!r}: must increase")


# ---- the figure ------------------------------------------------------------------------------------------------
def external_figure(
    external: np.ndarray,
    test: dict[str, np.ndarray],
    thresholds: dict[str, float],
    rule: str,
    path: Path,
    name: str,
    bins: int,
) -> Path:
    """Histograms (density) of the abnormal score: the external normals against the run's test normals and test
    abnormals (``test``: label -> scores), with the run's thresholds. Normals right of a threshold are called
    abnormal."""
    import matplotlib.pyplot as plt  # Agg: set by fetalbrain.evaluation.plots

    from fetalbrain.evaluation import plots

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    edges = np.linspace(0, 1, bins + 1)
    styles = (
        {"color": "0.55", "alpha": 0.55, "histtype": "stepfilled"},
        {"color": "C3", "histtype": "step", "lw": 1.2, "ls": ":"},
    )
    for (label, values), style in zip(test.items(), styles):
        if len(values):
            ax.hist(values, bins=edges, density=True, label=f"{label} ({len(values)})", **style)
    ax.hist(
        external,
        bins=edges,
        density=True,
        color="C0",
        histtype="step",
        lw=2.0,
        label=f"external normals: {name} ({len(external)})",
    )
    for index, (rule_name, threshold) in enumerate(thresholds.items()):
        called_normal = float(np.mean(external < threshold)) if len(external) else float("nan")
        ax.axvline(
            threshold,
            color=f"C{index + 1}" if index else "k",
            ls="--" if rule_name == rule else ":",
            lw=1.2,
            label=f"{rule_name} threshold {threshold:.6g}: {called_normal:.0%} of external normals called normal",
        )
    ax.set_xlim(0, 1)
    ax.set_xlabel("abnormal score 1 - p(normal) (uncalibrated; thresholds chosen on the run's validation)")
    ax.set_ylabel("density")
    ax.set_title(f"{name}: normal heads from another hospital, never trained on, against the test part", fontsize=9)
    ax.legend(fontsize=7, loc="upper center")
    return plots._save(fig, path)


# ---- by bin (gestational age) -------------------------------------------------------------------------------
BINS_FILE = "external_normals_by_bin.csv"


def bin_labels(edges: list[float]) -> list[str]:
    """``0.35-0.45`` style names of the bins (low, high] between ``edges`` (the first one includes its low)."""
    return [f"{low:g}-{high:g}" for low, high in zip(edges, edges[1:])]


def assign_bins(table: pd.DataFrame, by) -> tuple[pd.Series | None, str | None]:
    """Each image's bin of ``by.column`` (NaN outside the edges or without a value), or (None, the reason)."""
    if by.column not in table.columns:
        return None, f"labels.csv has no {by.column} column, so no check by {by.name}"
    values = pd.to_numeric(table[by.column].replace("", np.nan), errors="coerce")
    bad = table["file"][values.isna() & (table[by.column] != "")].tolist()
    if bad:
        return None, f"{by.column} of {bad[0]} is not a number, so no check by {by.name}"
    edges = list(by.edges)
    return pd.cut(values, edges, labels=bin_labels(edges), include_lowest=True), None


def by_bin(indicators: dict[str, np.ndarray], subjects: np.ndarray, bins: pd.Series, by, boot) -> pd.DataFrame:
    """Every bin's images, subjects and each indicator's rate with a bootstrap interval over the bin's subjects
    (``metric`` is the indicator's name without ``external/``). A bin without images has a row of its own."""
    rows, edges = [], list(by.edges)
    for label, low, high in zip(bins.cat.categories, edges, edges[1:]):
        inside = (bins == label).to_numpy()
        base = {"bin": label, "low": float(low), "high": float(high), "images": int(inside.sum())}
        base["subjects"] = int(len(set(subjects[inside])))
        if not inside.any():
            rows += [{**base, "metric": name.removeprefix(PREFIX)} for name in indicators]
            continue
        part = {name: values[inside] for name, values in indicators.items()}
        intervals = subject_bootstrap(part, subjects[inside], boot.samples, boot.seed, boot.confidence)
        for name, values in part.items():
            interval = intervals.get(name) or (None, None)
            rows.append(
                {
                    **base,
                    "metric": name.removeprefix(PREFIX),
                    "value": float(np.mean(values)),
                    "ci_low": interval[0],
                    "ci_high": interval[1],
                }
            )
    return pd.DataFrame(
        rows, columns=["bin", "low", "high", "images", "subjects", "metric", "value", "ci_low", "ci_high"]
    )


def bin_metrics(table: pd.DataFrame, key: str) -> dict[str, float]:
    """The per-bin rows as report metrics: ``external/<key>_<bin>/<metric>`` (+ ``_ci_low``/``_ci_high``), and
    each bin's ``images`` and ``subjects``."""
    metrics = {}
    for row in table.itertuples():
        prefix = f"{PREFIX}{key}_{row.bin}/"
        metrics[f"{prefix}images"], metrics[f"{prefix}subjects"] = float(row.images), float(row.subjects)
        if pd.notna(row.value):
            metrics[f"{prefix}{row.metric}"] = row.value
        if pd.notna(row.ci_low) and pd.notna(row.ci_high):
            metrics[f"{prefix}{row.metric}_ci_low"], metrics[f"{prefix}{row.metric}_ci_high"] = row.ci_low, row.ci_high
    return metrics


# ---- the training report's part ---------------------------------------------------------------------------------
def external_report(
    model,
    run_dir: Path,
    options,
    class_names: list[str],
    test: tuple[np.ndarray, np.ndarray],
    report_metrics: dict,
    detector_file: Path | None = None,
) -> tuple[dict, list[str], dict]:
    """Predict the external normals with the model's (tested) weights, score them at the run's thresholds and
    write ``external_normals.csv`` and ``.png`` into ``run_dir``. ``test``: the test part's (probs, targets);
    ``report_metrics``: the report's metrics so far (the thresholds); ``detector_file``: the run's OOD detector
    to flag the external images with. Returns (metrics, notes, figures).

    An absent folder, a run without a ``normal`` class or a bad setting gives a note, never an error: the run has
    trained, and its report must not be lost over the check."""
    try:
        check_options(options)
    except ValueError as error:
        log.error("No external normal check: %s", error)
        return {}, [f"no external normal check: {error}"], {}
    root = Path(options.root).expanduser()
    if not root.is_dir():
        return {}, [f"no external normal check: evaluation.external.root={root} does not exist"], {}
    if NORMAL_CLASS not in class_names:
        return {}, [f"no external normal check: the run has no '{NORMAL_CLASS}' class"], {}
    from fetalbrain.data.images import ImageReadError, read_grayscale
    from fetalbrain.evaluation.calibration import softmax
    from fetalbrain.evaluation.ood import OODDetector, OODDetectorError, image_features

    started = time.perf_counter()
    try:
        table = read_labelled_folder(root, options.label)
    except DatasetError as error:
        log.error("No external normal check: %s", error)
        return {}, [f"no external normal check: {error}"], {}
    images, unreadable = [], []
    for path in table["path"]:  # an unreadable file is left out and named; the others are still checked
        try:
            images.append(read_grayscale(path))
        except ImageReadError as error:
            unreadable.append((path, str(error)))
    notes = []
    if unreadable:
        table = table[~table["path"].isin([path for path, _ in unreadable])].reset_index(drop=True)
        notes.append(f"external normal check: {len(unreadable)} unreadable image(s) left out, e.g. {unreadable[0][1]}")
        log.warning("External normal check: %s", notes[-1])
    if not images:
        return {}, [f"no external normal check: none of the images under {root} could be read", *notes], {}
    features, logits = image_features(model, images)
    normal = class_names.index(NORMAL_CLASS)
    probs = softmax(logits)  # uncalibrated: the scale the thresholds were chosen on
    score, predicted = 1.0 - probs[:, normal], probs.argmax(axis=1)
    test_probs, test_targets = test
    test_normal = test_probs[test_targets == normal]
    test_score = 1.0 - test_normal[:, normal]
    thresholds = screening_thresholds(report_metrics)

    subjects = table["subject"].to_numpy()
    metrics = {f"{PREFIX}images": float(len(table)), f"{PREFIX}subjects": float(len(set(subjects)))}
    metrics[f"{PREFIX}test_normal_images"] = float(len(test_normal))
    indicators = {FRACTION_NORMAL: predicted == normal}
    test_values = {f"{TEST_PREFIX}fraction_predicted_normal": test_normal.argmax(axis=1) == normal}
    for rule, threshold in thresholds.items():
        indicators[f"{SPECIFICITY}_{rule}"] = score < threshold  # the screening calls score >= threshold abnormal
        test_values[f"{TEST_PREFIX}normal_specificity_{rule}"] = test_score < threshold
    if thresholds and options.rule in thresholds:
        indicators[SPECIFICITY] = indicators[f"{SPECIFICITY}_{options.rule}"]
        test_values[f"{TEST_PREFIX}normal_specificity"] = test_values[f"{TEST_PREFIX}normal_specificity_{options.rule}"]
    elif thresholds:
        notes.append(
            f"external normal check: evaluation.external.rule={options.rule!r} is not one of the run's screening "
            f"rules ({', '.join(thresholds)}): no {SPECIFICITY}"
        )
    else:
        notes.append("external normal check: the run has no screening thresholds, so no specificity on its normals")

    flagged = None
    if detector_file is not None and Path(detector_file).is_file():
        try:
            detector = OODDetector.load(detector_file, feature_dim=features.shape[1])
            ood_scores = detector.score(features)
            flagged = detector.flag(ood_scores)
            indicators[OOD_FLAG_RATE] = flagged
        except (OODDetectorError, ValueError) as error:
            notes.append(f"external normal check: no OOD flags ({error})")
    metrics.update({name: float(np.mean(values)) for name, values in indicators.items()})
    metrics.update({name: float(np.mean(v)) if len(v) else float("nan") for name, v in test_values.items()})
    boot = options.bootstrap
    intervals = subject_bootstrap(indicators, subjects, boot.samples, boot.seed, boot.confidence)
    for name, (low, high) in ((n, i) for n, i in intervals.items() if i is not None):
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
    if not len(test_normal):
        notes.append("external normal check: the test part holds no normal image to compare with")
    bins, by = None, options.get("by")
    if by is not None:
        bins, reason = assign_bins(table, by)
        if reason:
            notes.append(f"external normal check: {reason}")
        else:
            headline = {n: indicators[n] for n in (SPECIFICITY, FRACTION_NORMAL, OOD_FLAG_RATE) if n in indicators}
            binned = by_bin(headline, subjects, bins, by, boot)
            binned.to_csv(run_dir / BINS_FILE, index=False)
            metrics.update(bin_metrics(binned, by.key))
            outside = int(bins.isna().sum())
            if outside:
                notes.append(
                    f"external normal check: {outside} image(s) outside the bins of {by.name} "
                    f"({by.edges[0]:g} to {by.edges[-1]:g}) or without a value: in the totals, in no bin"
                )

    columns = {
        "file": table["file"],
        "subject": table["subject"],
        "frame": table["frame"],
        "abnormal_score": score,
        "predicted": [class_names[p] for p in predicted],
    }
    if bins is not None:
        columns[by.column] = table[by.column]
        columns["bin"] = bins.astype(object).fillna("")
    columns |= {f"called_abnormal_{rule}": score >= t for rule, t in thresholds.items()}
    if flagged is not None:
        columns |= {"ood_score": ood_scores, "ood_flagged": flagged}
    pd.DataFrame(columns).to_csv(run_dir / CSV_FILE, index=False)
    test_abnormal = 1.0 - test_probs[test_targets != normal][:, normal]
    figure = external_figure(
        score,
        {"test normals": test_score, "test abnormals": test_abnormal},
        thresholds,
        options.rule,
        run_dir / FIGURE_FILE,
        options.name,
        options.histogram_bins,
    )
    specificity = metrics.get(SPECIFICITY)
    if specificity is not None and specificity < options.warn_below:
        test_specificity = metrics.get(f"{TEST_PREFIX}normal_specificity", float("nan"))
        test_text = f"{test_specificity:.0%}" if np.isfinite(test_specificity) else "none in the test part"
        notes.append(
            f"only {specificity:.0%} of {len(table)} normal heads from another hospital ({options.name}) are called "
            f"normal at the {options.rule} threshold (the test part's normals: {test_text}): the model's "
            "normal-vs-abnormal decision may follow the acquisition source rather than the anatomy (or these heads "
            "differ in plane or gestational age from the training normals)"
        )
    log.info(
        "External normals (%s): specificity %s, %.3f predicted normal, %d images of %d subjects (%.1f s)",
        options.name,
        f"{specificity:.3f}" if specificity is not None else "n/a",
        metrics[FRACTION_NORMAL],
        len(table),
        len(set(subjects)),
        time.perf_counter() - started,
    )
    return metrics, notes, {"external/normal_heads": figure}


# ---- the sentence the GUI shows ----------------------------------------------------------------------------------
def describe_external(
    metrics: dict, rule: str = "youden", name: str | None = None, warn_below: float = DEFAULT_WARN_BELOW
) -> str:
    """One line on a run's external normal check from its metrics: how many normal heads from another hospital it
    calls normal at ``rule``'s threshold (the GUI's), against its own test normals, or that it has none."""
    where = f"another hospital ({name})" if name else "another hospital"
    key = f"{SPECIFICITY}_{rule}" if f"{SPECIFICITY}_{rule}" in metrics else SPECIFICITY
    test_key = f"{TEST_PREFIX}{key.removeprefix(PREFIX)}"
    specificity = metrics.get(key)
    if specificity is None:
        if FRACTION_NORMAL in metrics:
            return f"normal heads from {where} predicted normal: {metrics[FRACTION_NORMAL]:.0%} (no screening rule)"
        return (
            "none: this run has no external normal check (trained before it existed, with "
            "evaluation.external.enabled=false, or without the external folder)"
        )
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    text = f"normal heads from {where} called normal: {specificity:.0%}"
    if low is not None and high is not None:
        text += f" ({low:.0%}–{high:.0%} over subjects)"
    test = metrics.get(test_key)
    if test is not None and np.isfinite(test):
        text += f"; this run's own test normals: {test:.0%}"
    if specificity < warn_below:
        text += ". ⚠️ Its normal-vs-abnormal decision may follow the acquisition source rather than the anatomy"
    return text
