"""Per-class recall with intervals: how often each anomaly is found, and how sure that number is. With grouped
splits a class has few cases, so its interval resamples cases (frames of one case are alike), not images."""

import numpy as np
import pandas as pd

from fetalbrain.evaluation.intervals import bootstrap_intervals

FIGURE = "per_class_recall.png"


def recall_table(
    targets: np.ndarray, predicted: np.ndarray, class_names: list[str], bootstrap, groups=None
) -> pd.DataFrame:
    """class, recall, recall_ci_low, recall_ci_high, support (images) and, with ``groups``, cases; NaN for a class
    the data do not hold. ``bootstrap``: samples, seed, confidence."""
    targets, predicted = np.asarray(targets), np.asarray(predicted)

    def score(index: np.ndarray) -> dict[str, float]:
        t, p = targets[index], predicted[index]
        return {c: float(np.mean(p[t == i] == i)) if (t == i).any() else np.nan for i, c in enumerate(class_names)}

    point = score(np.arange(len(targets)))
    ci = bootstrap_intervals(
        score, point, len(targets), bootstrap["samples"], bootstrap["seed"], bootstrap["confidence"], groups
    )
    table = pd.DataFrame(
        {
            "class": class_names,
            "recall": [point[c] for c in class_names],
            "recall_ci_low": [ci.get(f"{c}_ci_low", np.nan) for c in class_names],
            "recall_ci_high": [ci.get(f"{c}_ci_high", np.nan) for c in class_names],
            "support": [int((targets == i).sum()) for i in range(len(class_names))],
        }
    )
    if groups is not None:
        groups = np.asarray(groups)
        table["cases"] = [len(set(groups[targets == i])) for i in range(len(class_names))]
    return table
