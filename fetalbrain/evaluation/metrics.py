"""Every classification metric, named once: how it is computed, how it is labelled, where it shows.

A stage metric (one torchmetrics object per stage) is logged as ``val/<name>`` and ``test/<name>``;
a report metric is computed by the test report (calibration, screening, baselines, hierarchy). ``compare``
tables the ``compared`` ones and the GUI's model card shows the ``shown`` ones, so a new metric is one entry
here. ``label_scores`` applies the stage definitions to hard decisions made elsewhere (a baseline, a coarser
view of the model's decisions), so that their numbers read exactly like ``test/...``.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.utilities import dim_zero_cat


class BalancedAccuracy(Metric):
    """Mean recall over the classes present in the targets (sklearn's definition).

    Unlike macro recall it ignores classes that are only predicted, never present: grouped splits
    leave rare classes out of a part, and they should not count as zero.
    """

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.add_state("correct", torch.zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("support", torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        predicted = preds.argmax(dim=1) if preds.ndim == 2 else preds
        self.support += torch.bincount(target, minlength=self.num_classes).float()
        self.correct += torch.bincount(target[predicted == target], minlength=self.num_classes).float()

    def compute(self) -> torch.Tensor:
        present = self.support > 0
        return (self.correct[present] / self.support[present]).mean()


class MacroAUROC(MulticlassAUROC):
    """Macro one-vs-rest AUROC over the classes present in the targets.

    torchmetrics' own macro average counts a class absent from the targets as AUROC 0, which
    drags the mean down whenever a grouped split leaves a rare class out of a part.
    """

    def __init__(self, num_classes: int):
        super().__init__(num_classes=num_classes, average="none")

    def compute(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No positive samples in targets")
            per_class = super().compute()
        present = torch.bincount(dim_zero_cat(self.target), minlength=self.num_classes) > 0
        return per_class[present].mean()


@dataclass(frozen=True)
class MetricSpec:
    key: str  # the name in metrics.json, W&B and compare
    label: str  # how tables and the GUI write it
    shown: bool = False  # on the GUI's model card
    compared: bool = True  # a column of compare's tables


def _macro(metric: type) -> Callable[[int], Metric]:
    return lambda n: metric(num_classes=n, average="macro")


STAGE_METRICS = {  # name -> (label, factory, shown)
    "accuracy": ("accuracy", lambda n: MulticlassAccuracy(num_classes=n, average="micro"), True),
    "balanced_accuracy": ("balanced accuracy", BalancedAccuracy, True),
    "precision_macro": ("macro precision", _macro(MulticlassPrecision), False),
    "recall_macro": ("macro recall", _macro(MulticlassRecall), False),
    "f1_macro": ("macro F1", _macro(MulticlassF1Score), True),
    "auroc_macro": ("macro AUROC", MacroAUROC, True),
}
CLASSIFICATION_METRICS = (
    *(MetricSpec(f"test/{name}", label, shown) for name, (label, _, shown) in STAGE_METRICS.items()),
    MetricSpec("screening/test_auroc", "screening AUROC", shown=True),
    MetricSpec("test/ece", "ECE", shown=True),
    # the external normal check (evaluation/external_normals.py): normal heads from another hospital, never trained
    # on, called normal at the run's screening threshold / by argmax. Low values: "normal" follows the source.
    MetricSpec("external/normal_specificity", "external normals: specificity", shown=True),
    MetricSpec("external/fraction_predicted_normal", "external normals: predicted normal", shown=True),
    # beside every model, on the same split (evaluation/baselines.py): each test image labelled as its nearest
    # training image in pixel space. High on a split that leaks: that much of a score needs no learning.
    MetricSpec("baseline/nn1_test_accuracy", "1-NN pixels: accuracy"),
    MetricSpec("baseline/nn1_test_f1_macro", "1-NN pixels: macro F1"),
    MetricSpec("baseline/nn1_test_balanced_accuracy", "1-NN pixels: balanced accuracy", compared=False),
    MetricSpec("baseline/nn1_test_same_source", "1-NN pixels: nearest is a copy"),
    MetricSpec("baseline/nn1_test_same_case", "1-NN pixels: nearest is the same case", compared=False),
    # coarser views of the model's own decisions (evaluation/hierarchy.py); per class group G also
    # hierarchy/G_merged_test_{accuracy,f1_macro}, hierarchy/G_test_recall, hierarchy/G_grade_test_{accuracy,f1_macro}
    MetricSpec("hierarchy/abnormal_test_accuracy", "normal vs abnormal: accuracy"),
    MetricSpec("hierarchy/abnormal_test_sensitivity", "normal vs abnormal: sensitivity", compared=False),
    MetricSpec("hierarchy/abnormal_test_specificity", "normal vs abnormal: specificity", compared=False),
    MetricSpec("hierarchy/anomaly_test_accuracy", "anomaly if abnormal: accuracy", compared=False),
    MetricSpec("hierarchy/anomaly_test_f1_macro", "anomaly if abnormal: macro F1"),
)
COMPARED = {m.key: m.label for m in CLASSIFICATION_METRICS if m.compared}
SHOWN = tuple(m.key for m in CLASSIFICATION_METRICS if m.shown)


LABEL_SCORES = ("accuracy", "balanced_accuracy", "f1_macro")  # the stage metrics that need only hard decisions


def label_scores(predicted: np.ndarray, targets: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 of hard decisions by the stage metrics' own definitions (macro F1
    over the classes that occur in targets or decisions, as ``test/f1_macro``); NaN for no images."""
    if len(targets) == 0:
        return {name: float("nan") for name in LABEL_SCORES}
    predicted, targets = torch.as_tensor(np.asarray(predicted)), torch.as_tensor(np.asarray(targets))
    return {name: float(STAGE_METRICS[name][1](num_classes)(predicted, targets)) for name in LABEL_SCORES}


def classification_metrics(num_classes: int) -> MetricCollection:
    """The stage metrics, unprefixed: clone them with ``prefix="val/"`` or ``"test/"``."""
    return MetricCollection({name: factory(num_classes) for name, (_, factory, _) in STAGE_METRICS.items()})
