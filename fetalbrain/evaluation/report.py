"""The test report every run writes into its directory: per-class table, confusion matrix, predictions."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402

from fetalbrain.data.classes import display_name  # noqa: E402


def per_class_table(probs: np.ndarray, targets: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    predicted = probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predicted, labels=labels, zero_division=0
    )
    return pd.DataFrame(
        {
            "class": class_names,
            "name": [display_name(c) for c in class_names],
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
            "predicted": np.bincount(predicted, minlength=len(class_names)),
        }
    )


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Counts in each cell, colour by row-normalised recall so rare classes are visible."""
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    names = [display_name(c) for c in class_names]
    size = 0.45 * len(names) + 3
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i, j in zip(*np.nonzero(matrix)):
        ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_test_report(
    out_dir: Path, probs: np.ndarray, targets: np.ndarray, class_names: list[str], paths: list[str], title: str
) -> dict[str, Path]:
    """Write per_class.csv, confusion_matrix.png and predictions.csv; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "per_class": out_dir / "per_class.csv",
        "confusion_matrix": out_dir / "confusion_matrix.png",
        "predictions": out_dir / "predictions.csv",
    }
    per_class_table(probs, targets, class_names).to_csv(files["per_class"], index=False)
    matrix = confusion_matrix(targets, probs.argmax(axis=1), labels=list(range(len(class_names))))
    plot_confusion_matrix(matrix, class_names, files["confusion_matrix"], title)
    predictions = pd.DataFrame(
        {
            "path": paths,
            "true": [class_names[t] for t in targets],
            "predicted": [class_names[p] for p in probs.argmax(axis=1)],
            "confidence": probs.max(axis=1),
        }
    )
    predictions = pd.concat([predictions, pd.DataFrame(probs, columns=[f"p_{c}" for c in class_names])], axis=1)
    predictions.to_csv(files["predictions"], index=False)
    return files


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
