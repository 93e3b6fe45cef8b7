"""Figures of the test report. Class names are shown as clinicians write them."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from fetalbrain.data.classes import display_name  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def confusion_matrix_figure(
    matrix: np.ndarray, class_names: list[str], path: Path, title: str, normalised_values: bool = False
) -> Path:
    """Colour by row-normalised recall so rare classes stay visible; cells show the counts, or with
    ``normalised_values`` the fraction of each true class."""
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    names = [display_name(c) for c in class_names]
    size = 0.45 * len(names) + 3
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i, j in zip(*np.nonzero(matrix)):
        ax.text(
            j,
            i,
            f"{normalised[i, j]:.2f}" if normalised_values else int(matrix[i, j]),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if normalised[i, j] > 0.5 else "black",
        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class (row-normalised)")
    return _save(fig, path)


def roc_figure(probs: np.ndarray, targets: np.ndarray, class_names: list[str], path: Path) -> Path:
    """One-vs-rest ROC per class present in the test part; absent classes are named in the legend."""
    fig, ax = plt.subplots(figsize=(7.5, 6))
    absent = []
    for index, name in enumerate(class_names):
        positive = targets == index
        if not positive.any() or positive.all():
            absent.append(display_name(name))
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, index])
        ax.plot(fpr, tpr, lw=1.2, label=f"{display_name(name)} (AUC {roc_auc_score(positive, probs[:, index]):.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    title = "One-vs-rest ROC, test"
    if absent:
        title += f"\nnot in test: {', '.join(absent)}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def screening_figure(is_abnormal: np.ndarray, score: np.ndarray, points: dict[str, float], path: Path) -> Path:
    fpr, tpr, _ = roc_curve(is_abnormal, score)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(fpr, tpr, label=f"abnormal vs normal (AUC {roc_auc_score(is_abnormal, score):.3f})")
    for rule, threshold in points.items():
        flagged = score >= threshold
        sensitivity, fp_rate = flagged[is_abnormal == 1].mean(), flagged[is_abnormal == 0].mean()
        ax.plot(fp_rate, sensitivity, "o", label=f"{rule} (threshold {threshold:.3f}, chosen on val)")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("Screening ROC, test")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def reliability_figure(bins_before: dict, bins_after: dict | None, ece: tuple, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    centres = (bins_before["edges"][:-1] + bins_before["edges"][1:]) / 2
    width = bins_before["edges"][1] - bins_before["edges"][0]
    ax.bar(
        centres,
        np.nan_to_num(bins_before["accuracy"]),
        width=width * 0.9,
        alpha=0.6,
        label=f"uncalibrated (ECE {ece[0]:.3f})",
    )
    if bins_after is not None:
        ax.plot(
            bins_after["confidence"],
            bins_after["accuracy"],
            "o-",
            color="C3",
            label=f"temperature scaled (ECE {ece[1]:.3f})",
        )
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram, test")
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)
