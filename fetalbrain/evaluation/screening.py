"""The clinical screening question: abnormal (any anomaly) versus normal.

The abnormal score is 1 - p(normal). Operating thresholds are chosen on validation, never on test:
Youden's J (max sensitivity + specificity - 1) and the most specific threshold that keeps
sensitivity at or above a target (default 0.95: a screen should miss few anomalies).
"""

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def abnormal_scores(probs: np.ndarray, targets: np.ndarray, normal_index: int) -> tuple[np.ndarray, np.ndarray]:
    return (targets != normal_index).astype(int), 1.0 - probs[:, normal_index]


def both_classes(is_abnormal: np.ndarray) -> bool:
    return 0 < is_abnormal.sum() < len(is_abnormal)


def youden_threshold(is_abnormal: np.ndarray, score: np.ndarray) -> float:
    fpr, tpr, thresholds = roc_curve(is_abnormal, score)
    return float(min(thresholds[np.argmax(tpr - fpr)], 1.0))


def sensitivity_threshold(is_abnormal: np.ndarray, score: np.ndarray, min_sensitivity: float) -> float:
    fpr, tpr, thresholds = roc_curve(is_abnormal, score)
    return float(min(thresholds[np.argmax(tpr >= min_sensitivity)], 1.0))


def operating_point(is_abnormal: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    flagged = score >= threshold
    return {
        "threshold": threshold,
        "sensitivity": float(flagged[is_abnormal == 1].mean()) if (is_abnormal == 1).any() else float("nan"),
        "specificity": float((~flagged[is_abnormal == 0]).mean()) if (is_abnormal == 0).any() else float("nan"),
    }


def screening_rules(min_sensitivity: float) -> list[str]:
    """The names of the operating points a run chooses on validation (``screening/<rule>/threshold``)."""
    return ["youden", f"sensitivity_{min_sensitivity:g}"]


def screening_metrics(
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    normal_index: int,
    min_sensitivity: float = 0.95,
) -> tuple[dict[str, float], list[str]]:
    """Flat ``screening/...`` metrics, and notes on what could not be computed and why."""
    metrics, notes = {}, []
    val_y, val_score = abnormal_scores(*val, normal_index)
    test_y, test_score = abnormal_scores(*test, normal_index)
    if both_classes(test_y):
        metrics["screening/test_auroc"] = float(roc_auc_score(test_y, test_score))
    else:
        notes.append("test part has only normal or only abnormal images: no screening AUROC")
    if not both_classes(val_y):
        notes.append("validation part has only normal or only abnormal images: no operating threshold")
        return metrics, notes
    metrics["screening/val_auroc"] = float(roc_auc_score(val_y, val_score))
    youden, sensitivity = screening_rules(min_sensitivity)
    rules = {
        youden: youden_threshold(val_y, val_score),
        sensitivity: sensitivity_threshold(val_y, val_score, min_sensitivity),
    }
    for rule, threshold in rules.items():
        for key, value in operating_point(test_y, test_score, threshold).items():
            metrics[f"screening/{rule}/{key if key == 'threshold' else 'test_' + key}"] = value
    return metrics, notes
