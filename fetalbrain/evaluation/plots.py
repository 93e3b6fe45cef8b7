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


def _epochs_of(metrics_csv: Path):
    """One CSV log's values per epoch: the mean of each train/val metric, and the learning rate in force at the
    epoch's last step (logged by step)."""
    import pandas as pd

    log = pd.read_csv(metrics_csv)
    fit = log[log.filter(regex="^(train|val)/").notna().any(axis=1)].dropna(subset=["epoch"])  # not test's rows
    epochs = fit.groupby("epoch").mean(numeric_only=True)
    lr_columns = [c for c in log if c.startswith("lr-")]
    if lr_columns and not epochs.empty:
        ends = fit.groupby("epoch")["step"].max()
        rates = log[["step", *lr_columns]].dropna(how="all", subset=lr_columns).sort_values("step")
        at_end = pd.merge_asof(ends.reset_index().sort_values("step"), rates, on="step").set_index("epoch")
        epochs = epochs.drop(columns=lr_columns, errors="ignore").join(at_end[lr_columns])
    return epochs


def training_curves_figure(metrics_csvs: list[Path], path: Path) -> Path | None:
    """Loss, macro F1 and learning rate per epoch from a run's CSV logs (Lightning's ``CSVLogger``, one per start
    of the run: a resumed run adds one; for an epoch trained again the newest log wins), train and validation side
    by side; a generator's losses alike. None when the logs hold no epoch yet."""
    import pandas as pd

    tables = [_epochs_of(metrics_csv) for metrics_csv in metrics_csvs]
    tables = [table for table in tables if not table.empty]
    if not tables:
        return None
    epochs = pd.concat(tables).groupby(level=0).last()
    panels = {
        "loss": [c for c in epochs if c.endswith("loss") and c.startswith(("train/", "val/"))],
        "macro F1": [c for c in epochs if c in ("train/f1_macro", "val/f1_macro")],
        "learning rate": [c for c in epochs if c.startswith("lr-")],
    }
    panels = {title: columns for title, columns in panels.items() if columns}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, columns) in zip(axes[0], panels.items()):
        for column in columns:
            values = epochs[column].dropna()
            ax.plot(values.index + 1, values.values, marker="o", ms=3, label=column)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def per_class_recall_figure(table, path: Path, title: str, confidence: float) -> Path:
    """Recall per class with its interval; a class without images is named as such, not drawn as 0."""
    rows = table.iloc[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.4))
    y = np.arange(len(rows))
    present = rows["support"].to_numpy() > 0
    recall = rows["recall"].to_numpy()
    low = np.nan_to_num(recall - rows["recall_ci_low"].to_numpy(), nan=0.0)
    high = np.nan_to_num(rows["recall_ci_high"].to_numpy() - recall, nan=0.0)
    ax.errorbar(recall[present], y[present], xerr=[low[present], high[present]], fmt="o", color="C0", capsize=3)
    counts = (
        [f"{n} img, {k} cases" for n, k in zip(rows["support"], rows["cases"])]
        if "cases" in rows
        else [f"{n} img" for n in rows["support"]]
    )
    labels = [
        f"{display_name(c)} ({n})" if s else f"{display_name(c)} (none)"
        for c, n, s in zip(rows["class"], counts, present)
    ]
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel(f"recall ({confidence:.0%} bootstrap interval)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
