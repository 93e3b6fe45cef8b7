"""The files of an evaluation on any dataset: predictions, per-class table, figures, and the metrics with intervals."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from fetalbrain.data.classes import display_name
from fetalbrain.evaluation import calibration, plots
from fetalbrain.evaluation.any_dataset.scoring import (
    OOD_SCORE,
    OOD_THRESHOLD,
    PREFIX,
    OODScores,
    Scorer,
    _fraction_key,
    distribution_metrics,
)
from fetalbrain.evaluation.checks import Predictions
from fetalbrain.evaluation.intervals import bootstrap_intervals
from fetalbrain.evaluation.per_class import FIGURE, recall_table
from fetalbrain.evaluation.screening import both_classes
from fetalbrain.evaluation.test_report import per_class_table, predictions_table
from fetalbrain.runs.choices import RunChoices


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
        **bootstrap_intervals(
            scorer.score, point, len(probs), bootstrap["samples"], bootstrap["seed"], bootstrap["confidence"]
        ),
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
    files = ["predictions.csv", "per_class.csv"]
    if labelled:  # recall per class with image-bootstrap intervals (one dataset: no case labels to resample)
        recall = recall_table(targets, scorer.predicted, class_names, bootstrap)
        for column in ("recall_ci_low", "recall_ci_high"):
            per_class[column] = recall[column]
        title = f"{title}: recall per class ({bootstrap['confidence']:.0%} intervals resampling images)"
        plots.per_class_recall_figure(recall, out_dir / FIGURE, title, bootstrap["confidence"])
        files.append(FIGURE)
    per_class.to_csv(out_dir / "per_class.csv", index=False)
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
