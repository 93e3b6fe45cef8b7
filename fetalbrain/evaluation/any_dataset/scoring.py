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

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fetalbrain.data.classes import NORMAL_CLASS, display_name
from fetalbrain.evaluation import calibration
from fetalbrain.evaluation.metrics import STAGE_METRICS
from fetalbrain.evaluation.screening import both_classes, operating_point
from fetalbrain.runs.choices import RunChoices

PREFIX = "eval/"
SINGLE_CLASS_METRICS = ("accuracy", "balanced_accuracy")  # stage metrics that mean something on one class
CALIBRATION_KEYS = [f"{PREFIX}{k}" for k in ("ece", "nll", "ece_temperature_scaled", "nll_temperature_scaled")]
OOD_FLAG_RATE = f"{PREFIX}ood/flag_rate"  # fraction above the run's OOD threshold: "not a fetal brain ultrasound"
OOD_THRESHOLD = f"{PREFIX}ood/threshold"
OOD_SCORE = "ood_score"  # the predictions.csv column, and the name of its quantiles (eval/ood_score/q50, ...)


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
