"""Evaluate a trained classifier on other data, with the choices its run made on its own validation part.

A run chose its screening thresholds and its temperature on validation; here they are applied as they
are and never fitted again on the evaluated images (that would flatter the numbers and answer another
question). What the labels allow is computed: the whole test report when two or more classes are
labelled; accuracy, specificity or sensitivity at the run's thresholds, calibration, the fraction called
each class and the confidence distributions when only one is (e.g. only ``normal``); the distributions
alone for unlabelled images. Everything else is listed as not computable, with why. A single dataset has
no folds to spread over, so intervals are percentile bootstraps over images: the scorer that computes a
number on the whole set computes it on every resample.

When the run has an out-of-distribution detector fitted on the checkpoint, every image also gets its OOD score
(from the forward pass that gives its class) and a flag above the run's threshold: ``eval/ood/flag_rate`` asks
"is this a fetal brain ultrasound?" whatever the labels. On labelled scans from a real hospital a high rate says
the detector, and the model with it, knows the training source rather than fetal brain ultrasound.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score

from fetalbrain.data.classes import NORMAL_CLASS, display_name
from fetalbrain.data.readers import DatasetError, detect_format, read_image_folder, read_roboflow_csv
from fetalbrain.evaluation import calibration, plots
from fetalbrain.evaluation.metrics import STAGE_METRICS
from fetalbrain.evaluation.report import Predictions, per_class_table, predictions_table
from fetalbrain.evaluation.screening import both_classes, operating_point
from fetalbrain.runs import CONFIG_FILE, SUMMARY_FILE, best_checkpoint, read_summary, run_directory, task_of

FORMATS = ("auto", "roboflow", "folder", "unlabeled")
PREFIX = "eval/"
DEFAULT_CALIBRATION_BINS = 15  # training's evaluation.calibration_bins default, for a checkpoint without its run
SINGLE_CLASS_METRICS = ("accuracy", "balanced_accuracy")  # stage metrics that mean something on one class
CALIBRATION_KEYS = [f"{PREFIX}{k}" for k in ("ece", "nll", "ece_temperature_scaled", "nll_temperature_scaled")]
OOD_FLAG_RATE = f"{PREFIX}ood/flag_rate"  # fraction above the run's OOD threshold: "not a fetal brain ultrasound"
OOD_THRESHOLD = f"{PREFIX}ood/threshold"
OOD_SCORE = "ood_score"  # the predictions.csv column, and the name of its quantiles (eval/ood_score/q50, ...)


class UnknownClassError(DatasetError):
    """The evaluated data name classes the checkpoint was not trained on."""


# ---- the checkpoint and its run's choices ----------------------------------------------------------------
@dataclass
class RunChoices:
    """What the checkpoint's run fitted on its validation part, and where that was read."""

    checkpoint: Path
    run_dir: Path | None = None
    thresholds: dict[str, float] = field(default_factory=dict)  # screening rule -> abnormal-probability threshold
    temperature: float | None = None
    calibration_bins: int = DEFAULT_CALIBRATION_BINS
    source: str | None = None  # the metrics.json the values come from
    ood_test_flag_rate: float | None = None  # the run's own test part flagged by its OOD detector
    notes: list[str] = field(default_factory=list)
    no_temperature: str = "needs the run's temperature, which was not found"  # why, when temperature is None
    ensemble: str | None = None  # for several checkpoints: how their outputs and choices are combined


def resolve_checkpoint(ckpt: str | Path) -> Path:
    """A checkpoint as given, or a run folder's best checkpoint: the one in its own ``checkpoints/`` (a run moved or
    copied elsewhere), else the path its metrics.json records."""
    path = Path(ckpt)
    if path.suffix == ".onnx":
        raise ValueError(
            f"ckpt={ckpt}: an ONNX export carries one screening threshold, not its run's metrics.json; evaluate "
            "needs the run's checkpoint (.ckpt) or its run folder"
        )
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"ckpt={ckpt}: no such checkpoint or run folder")
    if not (path / SUMMARY_FILE).is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: a folder but not a finished run (no {SUMMARY_FILE}); pass a .ckpt")
    summary = read_summary(path)
    if task_of(summary) != "classification":
        raise ValueError(f"ckpt={ckpt}: a {task_of(summary)} run, not a classification run")
    found = best_checkpoint(path, summary)
    if found is not None:
        return found
    recorded = summary.get("run", {}).get("best_checkpoint") or ""
    raise FileNotFoundError(f"ckpt={ckpt}: its best checkpoint {recorded or '(none recorded)'} is not on disk")


def run_choices(checkpoint: Path) -> RunChoices:
    """The thresholds (``screening/<rule>/threshold``), temperature (``calibration/temperature``) and
    calibration bins of the run the checkpoint belongs to; notes say what is missing or may not fit."""
    from omegaconf import OmegaConf

    choices = RunChoices(checkpoint=checkpoint)
    run_dir = run_directory(checkpoint)
    if not (run_dir / SUMMARY_FILE).is_file():
        choices.notes.append(
            f"no {SUMMARY_FILE} in {run_dir} (the checkpoint is not inside its run folder): the run's screening "
            "thresholds and temperature are unknown, so nothing is scored at them"
        )
        return choices
    summary = read_summary(run_dir)
    metrics = summary.get("metrics") or {}
    choices.run_dir, choices.source = run_dir, str(run_dir / SUMMARY_FILE)
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] == "screening" and len(parts) == 3 and parts[2] == "threshold":
            choices.thresholds[parts[1]] = float(value)
    if metrics.get("calibration/temperature") is not None:
        choices.temperature = float(metrics["calibration/temperature"])
    if metrics.get("ood/test_flag_rate") is not None:
        choices.ood_test_flag_rate = float(metrics["ood/test_flag_rate"])
    if (run_dir / CONFIG_FILE).is_file():
        bins = OmegaConf.select(OmegaConf.load(run_dir / CONFIG_FILE), "evaluation.calibration_bins")
        choices.calibration_bins = int(bins) if bins is not None else DEFAULT_CALIBRATION_BINS
    best = Path(summary.get("run", {}).get("best_checkpoint") or "").name
    if best and best != checkpoint.name:
        choices.notes.append(
            f"the run fitted its thresholds and temperature with {best}'s validation predictions; {checkpoint.name} "
            "is another checkpoint of that run, so they may not suit it"
        )
    return choices


# ---- the evaluated data ----------------------------------------------------------------------------------
@dataclass
class EvaluationData:
    """The images to evaluate, their labels (None: unlabelled), and what was found but cannot be evaluated."""

    root: Path
    format: str
    paths: list[str]
    labels: list[str] | None
    parts: list[str] = field(default_factory=list)  # the split parts used ("all" without split folders)
    bad: list[dict] = field(default_factory=list)  # image-like entries that cannot be read: data.on_bad_image
    ignored: list[dict] = field(default_factory=list)  # files that are not images at all: listed, never read


def _scan(folder: Path, recursive: bool) -> tuple[list[Path], list[dict], list[dict]]:
    """predict's listing of a folder: readable files, unreadable image-like entries, other files."""
    from fetalbrain.predict import NOT_AN_IMAGE, input_files

    files, bad, ignored = [], [], []
    for path, problem in input_files(folder, recursive):
        if problem is None:
            files.append(path)
        elif problem.startswith(NOT_AN_IMAGE):
            ignored.append({"path": str(path), "error": problem})
        else:
            bad.append({"path": str(path), "error": f"{path}: {problem}"})
    return files, bad, ignored


def _detect(root: Path) -> str:
    if root.is_file() or not any(child.is_dir() for child in root.iterdir()):
        return "unlabeled"
    return detect_format(root)


def _folder_table(root: Path) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """The folder-per-class reader, plus what it passes over in a class folder without a word: broken links
    and unreadable entries (bad images), DICOM files (evaluated too), other files (listed as ignored)."""
    table, _ = read_image_folder(root)
    bad, ignored, extra = [], [], []
    known = set(table["path"])
    for (split, label), rows in table.groupby(["split", "label"], sort=False):
        files, class_bad, class_ignored = _scan(Path(rows["path"].iloc[0]).parent, recursive=False)
        extra += [{"path": str(p), "label": label, "split": split} for p in files if str(p) not in known]
        bad += [{**entry, "split": split} for entry in class_bad]
        ignored += [{**entry, "split": split} for entry in class_ignored]
    table = pd.concat([table, pd.DataFrame(extra, columns=table.columns)], ignore_index=True)
    return table.sort_values("path", kind="stable").reset_index(drop=True), bad, ignored


def check_classes(labels: list[str], class_names: list[str], root: Path) -> list[str]:
    """The labels in the checkpoint's spelling (its label or the clinical name, in any case); unknown names are
    refused, listing the known ones."""
    spellings = {c.lower(): c for c in class_names} | {display_name(c).lower(): c for c in class_names}
    known_as = {label: spellings.get(str(label).strip().lower()) for label in set(labels)}
    unknown = sorted(label for label, known in known_as.items() if known is None)
    if unknown:
        known = ", ".join(f"{c} ({display_name(c)})" for c in class_names)
        raise UnknownClassError(
            f"data.root={root}: class name(s) the checkpoint does not know: {', '.join(unknown)}. It knows "
            f"{len(class_names)}: {known}. Either spelling is accepted, in any case; rename the folders or CSV "
            "columns, or use data.format=unlabeled to evaluate the images without their labels."
        )
    return [known_as[label] for label in labels]


def read_evaluation_data(
    root: str | Path, format: str, parts: list[str] | None, class_names: list[str]
) -> EvaluationData:
    """The images of ``root`` in any supported layout, their labels checked against the checkpoint's classes
    before anything is predicted."""
    root = Path(root).expanduser()
    if format not in FORMATS:
        raise DatasetError(f"data.format={format!r}: unknown, choose one of {', '.join(FORMATS)}")
    if not root.exists():
        raise DatasetError(f"data.root={root}: no such file or folder")
    if format == "auto":
        format = _detect(root)
    if format == "unlabeled":
        if parts:
            raise DatasetError(f"data.split={list(parts)}: parts exist in roboflow and folder layouts, not unlabeled")
        files, bad, ignored = _scan(root, recursive=True) if root.is_dir() else ([root], [], [])
        if not files and not bad:
            raise DatasetError(f"data.root={root}: no image or DICOM files found")
        return EvaluationData(root, format, [str(p) for p in files], None, ["all"], bad, ignored)
    if not root.is_dir():
        raise DatasetError(f"data.root={root}: a {format} dataset is a folder")
    if format == "roboflow":
        (table, _), bad, ignored = read_roboflow_csv(root), [], []
    else:
        table, bad, ignored = _folder_table(root)
    available = list(dict.fromkeys(table["split"]))
    if parts:
        missing = [p for p in parts if p not in available]
        if missing:
            raise DatasetError(f"data.split={list(parts)}: {root} has no part {missing}; it has {available}")
        table = table[table["split"].isin(parts)]
        bad = [entry for entry in bad if entry["split"] in parts]
        ignored = [entry for entry in ignored if entry["split"] in parts]
    if table.empty:
        raise DatasetError(f"data.root={root}: no images found")
    labels = check_classes(list(table["label"]), class_names, root)
    return EvaluationData(root, format, list(table["path"]), labels, list(parts or available), bad, ignored)


# ---- the run's OOD detector on the evaluated images -------------------------------------------------------
@dataclass
class OODScores:
    """What the run's out-of-distribution detector says of each evaluated image: its score (higher: less like the
    training images) and whether it is above the run's threshold (chosen on the run's validation part). Without a
    detector for this checkpoint ``scores`` is None and ``status`` says why (``Predictor.ood_status``)."""

    status: str
    scores: np.ndarray | None = None
    flagged: np.ndarray | None = None
    threshold: float | None = None
    keep_in_distribution: float | None = None  # the fraction of the run's validation images the threshold keeps

    @classmethod
    def of(cls, detector, scores: np.ndarray | None, status: str) -> "OODScores":
        """From a fitted ``OODDetector`` (or None) and its scores: its own ``flag`` decides what is flagged."""
        if detector is None or scores is None:
            return cls(status)
        return cls(status, scores, detector.flag(scores), detector.threshold, detector.keep_in_distribution)

    @property
    def available(self) -> bool:
        return self.scores is not None

    def applied(self) -> dict:
        """metrics.json's record of the detector applied (nothing about it is fitted on the evaluated images)."""
        return {"status": self.status, "threshold": self.threshold, "keep_in_distribution": self.keep_in_distribution}


# ---- scoring ---------------------------------------------------------------------------------------------
def _fraction_key(label: str) -> str:
    return f"{PREFIX}predicted/{label}"


def quantile_key(prefix: str, q: float) -> str:
    return f"{PREFIX}{prefix}/q{100 * q:g}"


class Scorer:
    """Every number one set of predictions allows, computed the same way on the whole set (``score()``) and
    on each bootstrap resample (``score(index)``); ``not_computable`` says what the whole set does not allow.

    ``probs`` are the model's own probabilities: a run's uncalibrated ones (it chose its thresholds on those; its
    temperature scales them for the calibrated ECE and NLL only), or an ensemble's (its members' calibrated ones
    averaged, with its own screening score ``abnormal``). ``ood``: the run's OOD detector's scores of
    the same images, in the same order."""

    def __init__(
        self,
        probs: np.ndarray,
        targets: np.ndarray | None,
        class_names: list[str],
        choices: RunChoices,
        calibration_bins: int,
        ood: OODScores | None = None,
        abnormal: np.ndarray | None = None,
    ):
        self.probs, self.targets, self.class_names = probs, targets, class_names
        self.choices, self.bins = choices, calibration_bins
        self.ood = ood if ood is not None else OODScores("no OOD scores were given")
        if self.ood.available and len(self.ood.scores) != len(probs):
            raise ValueError(f"{len(self.ood.scores)} OOD scores for {len(probs)} images")
        self.scaled = (
            calibration.apply_temperature(probs, choices.temperature) if choices.temperature is not None else None
        )
        self.normal = class_names.index(NORMAL_CLASS) if NORMAL_CLASS in class_names else None
        self.predicted = probs.argmax(axis=1)
        if self.normal is None:
            self.abnormal = None
        else:  # an ensemble's screening score is its own (ensemble.py); a run's is 1 - p(normal)
            self.abnormal = abnormal if abnormal is not None else 1.0 - probs[:, self.normal]
        # the training run's own metric objects (metrics.STAGE_METRICS), so that eval/x means what test/x means
        self.stage = {f"{PREFIX}{name}": factory(len(class_names)) for name, (_, factory, _) in STAGE_METRICS.items()}
        self.not_computable = self._requirements(targets, named=True)

    # what each number needs
    def _requirements(self, targets: np.ndarray | None, named: bool = False) -> dict[str, str]:
        """Key -> why it cannot be computed on these targets (``named``: say which classes the data hold)."""
        why: dict[str, str] = {}
        rules = self.choices.thresholds
        if targets is None:
            unlabelled = "needs labels (the images are unlabelled)"
            keys = [*(f"{PREFIX}{name}" for name in STAGE_METRICS), *CALIBRATION_KEYS, f"{PREFIX}screening_auroc"]
            keys += [f"{PREFIX}screening/{rule}/{kind}" for rule in rules for kind in ("sensitivity", "specificity")]
            why.update(dict.fromkeys(keys, unlabelled))
        else:
            present = np.unique(targets)
            if len(present) < 2:
                reason = (
                    "needs images of 2 or more classes (macro averages run over every class the model predicts, "
                    "and a one-vs-rest AUROC needs negatives)"
                )
                if named:
                    reason += f"; the data hold only {display_name(self.class_names[present[0]])}"
                why.update({f"{PREFIX}{name}": reason for name in STAGE_METRICS if name not in SINGLE_CLASS_METRICS})
            if self.scaled is None:
                why.update(dict.fromkeys(CALIBRATION_KEYS[2:], self.choices.no_temperature))
            if self.normal is not None:
                is_abnormal = (targets != self.normal).astype(int)
                if not both_classes(is_abnormal):
                    only = "abnormal" if is_abnormal.all() else "normal"
                    why[f"{PREFIX}screening_auroc"] = f"needs normal and abnormal images; all are {only}"
                for rule in rules:
                    if not (is_abnormal == 1).any():
                        why[f"{PREFIX}screening/{rule}/sensitivity"] = "needs abnormal images; all are normal"
                    if not (is_abnormal == 0).any():
                        why[f"{PREFIX}screening/{rule}/specificity"] = "needs normal images; all are abnormal"
        if not self.ood.available:
            why[OOD_FLAG_RATE] = f"needs the run's OOD detector for this checkpoint ({self.ood.status})"
        if self.normal is None:
            why[f"{PREFIX}screening"] = f"the checkpoint has no '{NORMAL_CLASS}' class: no abnormal-vs-normal score"
        elif not rules:
            source = self.choices.source
            where = f"{source} records none" if source else "the run's metrics.json is not found"
            why[f"{PREFIX}screening/<rule>"] = f"needs the run's validation-chosen thresholds: {where}"
        return why

    def score(self, index: np.ndarray | None = None) -> dict[str, float]:
        """The numbers on ``probs[index]`` (all images when None), leaving out those this subset does not allow."""
        index = np.arange(len(self.probs)) if index is None else index
        probs, predicted = self.probs[index], self.predicted[index]
        targets = self.targets[index] if self.targets is not None else None
        skip = self._requirements(targets)
        values = {}
        if targets is not None:
            probs_t, targets_t = torch.as_tensor(probs), torch.as_tensor(targets)
            for key, metric in self.stage.items():
                if key not in skip:
                    metric.update(probs_t, targets_t)
                    values[key] = float(metric.compute())
                    metric.reset()
            calibrated = [(probs, "")] + (
                [(self.scaled[index], "_temperature_scaled")] if self.scaled is not None else []
            )
            for scores, suffix in calibrated:
                values[f"{PREFIX}ece{suffix}"] = calibration.expected_calibration_error(scores, targets, self.bins)
                values[f"{PREFIX}nll{suffix}"] = calibration.negative_log_likelihood(scores, targets)
        if self.normal is not None:
            abnormal = self.abnormal[index]
            if targets is not None and f"{PREFIX}screening_auroc" not in skip:
                values[f"{PREFIX}screening_auroc"] = float(roc_auc_score(targets != self.normal, abnormal))
            for rule, threshold in self.choices.thresholds.items():
                if targets is not None:
                    point = operating_point((targets != self.normal).astype(int), abnormal, threshold)
                    for kind in ("sensitivity", "specificity"):
                        if f"{PREFIX}screening/{rule}/{kind}" not in skip:
                            values[f"{PREFIX}screening/{rule}/{kind}"] = point[kind]
                values[f"{PREFIX}screening/{rule}/flagged"] = float(np.mean(abnormal >= threshold))
        if self.ood.available:
            values[OOD_FLAG_RATE] = float(np.mean(self.ood.flagged[index]))
        values.update({_fraction_key(c): float(np.mean(predicted == i)) for i, c in enumerate(self.class_names)})
        return values


def bootstrap_intervals(
    scorer: Scorer, point: dict[str, float], samples: int, seed: int, confidence: float
) -> dict[str, float]:
    """``<key>_ci_low`` / ``<key>_ci_high``: percentile bootstrap over images (resampled with replacement).

    Resamples where a number is undefined (e.g. one class drawn) are left out of that number's interval."""
    if samples <= 0:
        return {}
    rng = np.random.default_rng(seed)
    n = len(scorer.probs)
    draws: dict[str, list[float]] = {key: [] for key in point}
    for _ in range(samples):
        values = scorer.score(rng.integers(0, n, n))
        for key in point:
            draws[key].append(values.get(key, np.nan))
    tail = (1.0 - confidence) / 2
    intervals = {}
    for key, values in draws.items():
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            intervals[f"{key}_ci_low"], intervals[f"{key}_ci_high"] = (
                float(v) for v in np.quantile(values, [tail, 1 - tail])
            )
    return intervals


def distribution_metrics(scorer: Scorer, quantiles: list[float]) -> dict[str, float]:
    """Quantiles and means of the confidence (raw and at the run's temperature), of the abnormal score and of the
    OOD score."""
    series = {"confidence": scorer.probs.max(axis=1)}
    if scorer.scaled is not None:
        series["confidence_temperature_scaled"] = scorer.scaled.max(axis=1)
    if scorer.abnormal is not None:
        series["abnormal_probability"] = scorer.abnormal
    if scorer.ood.available:
        series[OOD_SCORE] = scorer.ood.scores
    metrics = {}
    for name, values in series.items():
        metrics.update({quantile_key(name, q): float(np.quantile(values, q)) for q in quantiles})
        metrics[f"{PREFIX}{name}/mean"] = float(values.mean())
    return metrics


# ---- the report ------------------------------------------------------------------------------------------
def distributions_figure(scorer: Scorer, path: Path, bins: int) -> Path:
    """Confidence histograms (raw and at the run's temperature), the abnormal score against the run's screening
    thresholds and the OOD score against the run's OOD threshold: what can be shown without labels."""
    import matplotlib.pyplot as plt  # Agg: set by fetalbrain.evaluation.plots

    panels = 1 + (scorer.abnormal is not None) + scorer.ood.available
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    ax = axes[0, 0]
    edges = np.linspace(0, 1, bins + 1)
    ax.hist(scorer.probs.max(axis=1), bins=edges, alpha=0.6, label="model's confidence")
    if scorer.scaled is not None:
        ax.hist(
            scorer.scaled.max(axis=1),
            bins=edges,
            alpha=0.6,
            label=f"at the run's temperature {scorer.choices.temperature:.3g}",
        )
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("images")
    ax.set_title(f"Confidence, {len(scorer.probs)} images")
    ax.legend(fontsize=8)
    if scorer.abnormal is not None:
        ax = axes[0, 1]
        ax.hist(scorer.abnormal, bins=edges, color="C2", alpha=0.7)
        for i, (rule, threshold) in enumerate(scorer.choices.thresholds.items()):
            flagged = float(np.mean(scorer.abnormal >= threshold))
            ax.axvline(threshold, color=f"C{3 + i}", ls="--", label=f"{rule} {threshold:.6g}: {flagged:.0%} flagged")
        ax.set_xlabel("abnormal probability (1 - p(normal))")
        ax.set_ylabel("images")
        ax.set_title("Screening score; run's thresholds (chosen on its validation)", fontsize=9)
        if scorer.choices.thresholds:
            ax.legend(fontsize=8)
    if scorer.ood.available:
        ood, ax = scorer.ood, axes[0, -1]
        low, high = min(ood.scores.min(), ood.threshold), max(ood.scores.max(), ood.threshold)
        ax.hist(ood.scores, bins=np.linspace(low, high, bins + 1) if high > low else bins, color="C1", alpha=0.7)
        ax.axvline(
            ood.threshold, color="k", ls="--", label=f"threshold {ood.threshold:.4g}: {ood.flagged.mean():.0%} flagged"
        )
        ax.set_xlabel("OOD score (higher: less like the training images)")
        ax.set_ylabel("images")
        keeps = f" (keeps {ood.keep_in_distribution:.0%} of its validation)" if ood.keep_in_distribution else ""
        ax.set_title(f"OOD score; run's threshold{keeps}", fontsize=9)
        ax.legend(fontsize=8)
    return plots._save(fig, path)


@dataclass
class EvaluationReport:
    metrics: dict[str, float]  # point values, ``_ci_low``/``_ci_high``, quantiles, the run's thresholds
    scored: list[str]  # the keys scored per image (with bootstrap intervals), in the order computed
    not_computable: dict[str, str]  # key -> why
    notes: list[str]
    files: list[str]


def write_evaluation_report(
    out_dir: Path,
    probs: np.ndarray,
    targets: np.ndarray | None,
    paths: list[str],
    class_names: list[str],
    choices: RunChoices,
    title: str,
    calibration_bins: int,
    bootstrap: dict,
    quantiles: list[float],
    histogram_bins: int = 20,
    ood: OODScores | None = None,
    abnormal: np.ndarray | None = None,
) -> EvaluationReport:
    """Write the tables and figures the data allow; return the metrics (with intervals) and what was not
    computable. ``bootstrap``: ``samples``, ``seed``, ``confidence``; ``ood``: the run's OOD detector's scores of
    the images (None or without scores: ``eval/ood/...`` not computable, with why); ``abnormal``: the screening
    score when it is not 1 - p(normal) of ``probs`` (an ensemble's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(probs, targets, class_names, choices, calibration_bins, ood, abnormal)
    point = scorer.score()
    metrics = {
        **point,
        **bootstrap_intervals(scorer, point, bootstrap["samples"], bootstrap["seed"], bootstrap["confidence"]),
        **distribution_metrics(scorer, quantiles),
        **{
            f"{PREFIX}screening/{rule}/threshold": t
            for rule, t in choices.thresholds.items()
            if scorer.abnormal is not None
        },
        **({OOD_THRESHOLD: scorer.ood.threshold} if scorer.ood.available else {}),
        f"{PREFIX}images": float(len(probs)),
    }
    notes: list[str] = list(choices.notes)
    indices = list(range(len(class_names)))

    labelled = targets is not None
    # predictions.csv: report.predictions_table wants targets; unlabelled rows get placeholders, then no column
    placeholder = targets if labelled else np.zeros(len(probs), dtype=int)
    table = predictions_table(Predictions(probs, placeholder, paths), class_names)
    if not labelled:
        table = table.drop(columns="true")
    extra = {}
    if scorer.scaled is not None:
        extra["confidence_temperature_scaled"] = scorer.scaled.max(axis=1)
    if scorer.abnormal is not None:
        extra["abnormal_probability"] = scorer.abnormal
        extra.update({f"flagged_{rule}": scorer.abnormal >= t for rule, t in choices.thresholds.items()})
    if scorer.ood.available:
        extra[OOD_SCORE], extra["ood_flagged"] = scorer.ood.scores, scorer.ood.flagged
    position = table.columns.get_loc("confidence") + 1
    for offset, (name, values) in enumerate(extra.items()):
        table.insert(position + offset, name, values)
    table.to_csv(out_dir / "predictions.csv", index=False)

    per_class = (
        per_class_table(probs, targets, class_names)
        if labelled
        else pd.DataFrame(
            {
                "class": class_names,
                "name": [display_name(c) for c in class_names],
                "predicted": np.bincount(scorer.predicted, minlength=len(class_names)),
            }
        )
    )
    per_class["predicted_fraction"] = [metrics[_fraction_key(c)] for c in class_names]
    for side in ("low", "high"):
        per_class[f"predicted_fraction_ci_{side}"] = [
            metrics.get(f"{_fraction_key(c)}_ci_{side}", np.nan) for c in class_names
        ]
    per_class.to_csv(out_dir / "per_class.csv", index=False)

    files = ["predictions.csv", "per_class.csv"]
    if labelled:
        present = np.unique(targets)
        absent = [display_name(c) for i, c in enumerate(class_names) if i not in present]
        if absent:
            notes.append(f"classes of the checkpoint absent from the data: {', '.join(absent)}")
        matrix = confusion_matrix(targets, scorer.predicted, labels=indices)
        plots.confusion_matrix_figure(matrix, class_names, out_dir / "confusion_matrix.png", title)
        plots.confusion_matrix_figure(
            matrix, class_names, out_dir / "confusion_matrix_normalised.png", f"{title} (row-normalised)", True
        )
        files += ["confusion_matrix.png", "confusion_matrix_normalised.png"]
        if len(present) >= 2:
            plots.roc_figure(probs, targets, class_names, out_dir / "roc.png")
            files.append("roc.png")
        scaled_bins = None
        if scorer.scaled is not None:
            scaled_bins = calibration.reliability_bins(scorer.scaled, targets, calibration_bins)
        plots.reliability_figure(
            calibration.reliability_bins(probs, targets, calibration_bins),
            scaled_bins,
            (point[f"{PREFIX}ece"], point.get(f"{PREFIX}ece_temperature_scaled", float("nan"))),
            out_dir / "reliability.png",
        )
        files.append("reliability.png")
        if scorer.normal is not None:
            is_abnormal, score = (targets != scorer.normal).astype(int), scorer.abnormal  # an ensemble's own score
            if both_classes(is_abnormal):
                plots.screening_figure(is_abnormal, score, choices.thresholds, out_dir / "screening_roc.png")
                files.append("screening_roc.png")
    distributions_figure(scorer, out_dir / "distributions.png", histogram_bins)
    files.append("distributions.png")
    return EvaluationReport(dict(sorted(metrics.items())), list(point), scorer.not_computable, notes, files)


METRIC_LABELS = {
    **{f"{PREFIX}{name}": label for name, (label, _, _) in STAGE_METRICS.items()},
    f"{PREFIX}ece": "ECE",
    f"{PREFIX}nll": "NLL",
    f"{PREFIX}ece_temperature_scaled": "ECE at the run's temperature",
    f"{PREFIX}nll_temperature_scaled": "NLL at the run's temperature",
    f"{PREFIX}screening_auroc": "screening AUROC (abnormal vs normal)",
    f"{PREFIX}screening": "screening",
    f"{PREFIX}screening/<rule>": "screening at the run's thresholds",
    OOD_FLAG_RATE: "flagged not a fetal brain ultrasound (OOD)",
    OOD_THRESHOLD: "OOD threshold (the run's)",
}


def metric_label(key: str) -> str:
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    parts = key.removeprefix(PREFIX).split("/")
    if parts[0] == "screening" and len(parts) == 3:
        return {"flagged": "flagged abnormal", "sensitivity": "sensitivity", "specificity": "specificity"}.get(
            parts[2], parts[2]
        ) + f" at the {parts[1]} threshold"
    return key


def _fmt(value) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _ood_section(summary: dict) -> list[str]:
    """Is it a fetal brain ultrasound? The run's OOD detector on these images, and what its flag rate means here."""
    metrics, ood = summary["metrics"], summary["applied"].get("ood") or {}
    lines = ["", "## Is it a fetal brain ultrasound? (the run's OOD detector)", ""]
    if OOD_FLAG_RATE not in metrics:
        why = ood.get("status", "none was applied")
        return lines + [f"No OOD scores, so no image is checked. The run's OOD detector for this checkpoint: {why}."]
    low, high = metrics.get(f"{OOD_FLAG_RATE}_ci_low"), metrics.get(f"{OOD_FLAG_RATE}_ci_high")
    interval = f" (interval {_fmt(low)} – {_fmt(high)})" if low is not None else ""
    reference = []
    if ood.get("keep_in_distribution") is not None:
        reference.append(f"{1 - ood['keep_in_distribution']:.0%} of the run's validation images by construction")
    if ood.get("run_test_flag_rate") is not None:
        reference.append(f"{ood['run_test_flag_rate']:.1%} of its test images")
    lines += [
        f"Detector: {ood['status']}. The score is how unlike the run's training images an image is, in the "
        "network's penultimate features; above the threshold (chosen on the run's validation part, not on these "
        "images) an image is flagged as not a fetal brain ultrasound.",
        "",
        f"**{metrics[OOD_FLAG_RATE]:.1%} of these {summary['data']['images']} images are flagged**{interval}"
        + (f"; the threshold flags {' and '.join(reference)}." if reference else "."),
        "Flagged images are marked in `predictions.csv` (`ood_score`, `ood_flagged`): their predicted classes are "
        "no answer.",
    ]
    if summary["data"]["labelled"]:
        lines += [
            "",
            "These images are labelled, so they are meant to be fetal brain ultrasound: here the flag rate says "
            "whether the detector knows fetal brain ultrasound or only its training source. A high rate on a real "
            "hospital's scans says the detector (and the model) is source-bound: it learnt the acquisition of its "
            "training images, not fetal brain anatomy.",
        ]
    return lines


def markdown_report(summary: dict) -> str:
    """report.md: what was evaluated with what, the numbers with intervals, what could not be computed."""
    metrics, model, data, applied, boot = (summary[k] for k in ("metrics", "model", "data", "applied", "bootstrap"))
    level = f"{boot['confidence']:.0%}"
    lines = [
        f"# Evaluation of {model['name']} on {data['root']}",
        "",
        "Research software, not a medical device and not for diagnosis.",
        "",
        f"- checkpoint: `{model['checkpoint']}` (integrity: {model['integrity']})",
        f"- ensemble: {applied['ensemble']}"
        if applied.get("ensemble")
        else (f"- run: `{model['run_dir']}`" if model.get("run_dir") else "- run: not found"),
        f"- data: {data['format']} layout, parts {', '.join(data['parts'])}, {data['images']} images evaluated"
        + (f", {len(data['skipped_images'])} unreadable skipped" if data["skipped_images"] else "")
        + (f", {len(data['ignored_files'])} non-image files ignored" if data["ignored_files"] else ""),
    ]
    if data.get("class_counts"):
        lines.append("- labels: " + ", ".join(f"{display_name(c)} {n}" for c, n in data["class_counts"].items()))
    else:
        lines.append("- labels: none (unlabelled images: distributions only)")
    lines += ["", "## Applied from the run, not fitted on these images", ""]
    if applied["thresholds"]:
        lines.append(
            "Screening thresholds on the abnormal probability (1 - p(normal), uncalibrated as when chosen), "
            + ("the mean of the members', each " if applied.get("ensemble") else "")
            + f"chosen on the run's validation part, from `{applied['source']}`: "
            + ", ".join(f"{rule} {t:.6g}" for rule, t in applied["thresholds"].items())
            + "."
        )
    else:
        lines.append("No screening thresholds: the run recorded none, or its metrics.json was not found.")
    lines.append(
        f"Temperature {applied['temperature']:.4g} (`calibration/temperature`, fitted on the run's validation part)."
        if applied["temperature"] is not None
        else f"No temperature: {applied.get('no_temperature') or 'the run recorded none'}."
    )
    lines.append(f"Calibration bins: {applied['calibration_bins']}.")
    ood = applied.get("ood") or {}
    if ood.get("threshold") is not None and applied.get("ensemble"):
        lines.append("OOD: each member's score over its own threshold (chosen on its validation part), averaged.")
    elif ood.get("threshold") is not None:
        lines.append(f"OOD threshold {ood['threshold']:.4g} (`ood/threshold`, chosen on the run's validation part).")
    scored = [k for k in summary["scored"] if not k.startswith(f"{PREFIX}predicted/")]
    if scored:
        lines += [
            "",
            f"## Metrics ({level} bootstrap intervals, {boot['samples']} resamples of the images)",
            "",
            "| metric | key | value | interval |",
            "|---|---|---|---|",
        ]
        for key in scored:
            low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            interval = f"{_fmt(low)} – {_fmt(high)}" if low is not None else "—"
            lines.append(f"| {metric_label(key)} | `{key}` | {_fmt(metrics[key])} | {interval} |")
    lines += ["", "## Predicted classes", "", "| class | fraction | interval |", "|---|---|---|"]
    for label in summary["classes"]:
        key = _fraction_key(label)
        if metrics.get(key):
            interval = f"{_fmt(metrics.get(f'{key}_ci_low'))} – {_fmt(metrics.get(f'{key}_ci_high'))}"
            lines.append(f"| {display_name(label)} | {_fmt(metrics[key])} | {interval} |")
    lines += _ood_section(summary)
    lines += ["", "## Distributions (see distributions.png)", "", "| score | quantiles | mean |", "|---|---|---|"]
    for name in ("confidence", "confidence_temperature_scaled", "abnormal_probability", OOD_SCORE):
        quantiles = {float(k.rsplit("/q", 1)[1]): v for k, v in metrics.items() if k.startswith(f"{PREFIX}{name}/q")}
        if quantiles:
            text = ", ".join(f"q{q:g} {v:.3f}" for q, v in sorted(quantiles.items()))
            lines.append(f"| {name.replace('_', ' ')} | {text} | {_fmt(metrics[f'{PREFIX}{name}/mean'])} |")
    if summary["not_computable"]:
        lines += ["", "## Not computable on these data", ""]
        lines += [f"- {metric_label(k)} (`{k}`): {why}" for k, why in summary["not_computable"].items()]
    if summary["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in summary["notes"]]
    lines += ["", "## Files", "", ", ".join(f"`{f}`" for f in summary["files"]), ""]
    return "\n".join(lines)
