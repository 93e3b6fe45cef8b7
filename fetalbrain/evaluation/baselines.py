"""The 1-nearest-neighbour baseline on raw pixels: how much of a split's score needs no learning at all.

Each test image gets the label of the training image closest to it in pixel space (the images as the
deterministic preprocessing gives them to the network, downscaled to ``evaluation.nearest_neighbour.size``).
Nothing is learned, so on a split whose test images are copies of training images (the official split) a high
score here is memory, and beside a model's score it shows how much of that score memory alone reaches. The
table's ``source`` and ``case`` columns also say how often the nearest training image is a copy of the same
source image, or a frame of the same case: the leak made visible, image by image, in ``nearest_neighbour.csv``.
The export's copies are rotated, mirrored, sheared and re-lit, so plain pixel distance finds only some of them:
``dihedral`` also matches every training image turned by right angles and mirrored (8 orientations), a closer
bound on what memory of the training images alone can do.

Metrics: ``baseline/nn1_test_{accuracy,balanced_accuracy,f1_macro}`` (the stage metrics' definitions, see
``metrics.label_scores``), ``baseline/nn1_test_same_source`` and ``baseline/nn1_test_same_case``.
"""

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from fetalbrain.evaluation.metrics import label_scores

DISTANCES = ("euclidean", "cosine")
CSV_FILE = "nearest_neighbour.csv"
PREFIX = "baseline/nn1_test_"


def check_options(options) -> None:
    """Refuse a bad ``evaluation.nearest_neighbour`` block by key, before anything is computed."""
    if options.get("distance") not in DISTANCES:
        raise ValueError(
            f"evaluation.nearest_neighbour.distance={options.get('distance')!r}: choose {' or '.join(DISTANCES)}"
        )
    if not isinstance(options.get("dihedral", False), bool):
        raise ValueError(f"evaluation.nearest_neighbour.dihedral={options.get('dihedral')!r}: true or false")
    size = options.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(
            f"evaluation.nearest_neighbour.size={size!r}: a side in pixels (a positive integer), "
            "or null for the run's image size"
        )


def pixel_features(images: list[np.ndarray], size: int | None) -> np.ndarray:
    """One row of pixel values in [0, 1] per image, the image first resized to ``size`` x ``size`` (area
    averaging); ``None`` keeps every pixel."""
    rows = []
    for image in images:
        if size is not None and image.shape[:2] != (size, size):
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        rows.append(np.asarray(image, dtype=np.float32).ravel() / 255.0)
    if len({len(r) for r in rows}) > 1:
        raise ValueError("images of different sizes: set evaluation.nearest_neighbour.size to compare them at one size")
    return np.stack(rows)


def dihedral_orientations(image: np.ndarray) -> list[np.ndarray]:
    """The image turned by 0, 90, 180 and 270 degrees, each also mirrored."""
    turned = [np.rot90(image, k) for k in range(4)]
    return [view for t in turned for view in (t, t[:, ::-1])]


def nearest_training_image(train: np.ndarray, test: np.ndarray, distance: str) -> tuple[np.ndarray, np.ndarray]:
    """For each test row, the index of the nearest training row and its distance (the first of ties)."""
    if distance == "cosine":
        train = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
        test = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
        distances = 1.0 - test @ train.T
    else:  # squared Euclidean by expansion: one matrix product, not a (test, train, pixels) array
        distances = (test**2).sum(1)[:, None] - 2.0 * test @ train.T + (train**2).sum(1)[None, :]
    index = distances.argmin(axis=1)
    nearest = distances[np.arange(len(test)), index]
    return index, np.sqrt(np.maximum(nearest, 0.0)) if distance == "euclidean" else nearest


def nearest_neighbour_report(
    train: tuple[list[np.ndarray], np.ndarray],
    test: tuple[list[np.ndarray], np.ndarray],
    class_names: list[str],
    options,
    tables: tuple[pd.DataFrame, pd.DataFrame] | None = None,
    out_dir: Path | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Fit on ``train`` (images, targets), label ``test``; with the parts' tables (rows in the images' order,
    with ``path``, ``source`` and ``case``) count the nearest images that share a source or case, and write
    ``nearest_neighbour.csv`` into ``out_dir``. Returns the metrics and notes on what could not be computed."""
    check_options(options)
    (train_images, train_targets), (test_images, test_targets) = train, test
    if not len(train_images) or not len(test_images):
        return {}, ["no training or no test images: no nearest-neighbour baseline"]
    views, owner = train_images, np.arange(len(train_images))
    if options.get("dihedral", False):
        views = [view for image in train_images for view in dihedral_orientations(image)]
        owner = np.repeat(owner, 8)
    index, distance = nearest_training_image(
        pixel_features(views, options.get("size")),
        pixel_features(test_images, options.get("size")),
        options["distance"],
    )
    index = owner[index]
    predicted = np.asarray(train_targets)[index]
    scores = label_scores(predicted, test_targets, len(class_names))
    metrics = {f"{PREFIX}{name}": value for name, value in scores.items()}
    if tables is None:
        return metrics, []
    train_table, test_table = (t.reset_index(drop=True) for t in tables)
    nearest = train_table.iloc[index].reset_index(drop=True)
    test_table = test_table.iloc[: len(test_images)]
    frame = pd.DataFrame(
        {
            "path": test_table["path"],
            "true": [class_names[t] for t in test_targets],
            "predicted": [class_names[p] for p in predicted],
            "nearest_train_path": nearest["path"],
            "distance": distance,
        }
    )
    for level in ("source", "case"):
        if level in test_table and level in nearest:
            frame[f"same_{level}"] = (test_table[level].to_numpy() == nearest[level].to_numpy()) & test_table[
                level
            ].notna().to_numpy()
            metrics[f"{PREFIX}same_{level}"] = float(frame[f"same_{level}"].mean())
    if out_dir is not None:
        frame.to_csv(Path(out_dir) / CSV_FILE, index=False)
    return metrics, []
