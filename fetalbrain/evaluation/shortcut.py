"""Shortcut check: can trivial image statistics tell normal from abnormal?

The `normal` images come from another dataset and acquisition. If a logistic regression on global
intensity statistics, or on the image border alone (where there is no anatomy), separates normal
from abnormal about as well as the network does, the network's screening score may measure the
source, not the anatomy. Both baselines are fitted on the training part and scored on test.
"""

import cv2
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

BORDER_FRACTION = 0.1
THUMBNAIL = 64  # statistics on 64x64 thumbnails: the same distribution, 16x less work per image


def _thumbnail(image: np.ndarray) -> np.ndarray:
    return cv2.resize(image, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)


def _stats(pixels: np.ndarray) -> list[float]:
    pixels = pixels.astype(np.float64).ravel() / 255.0
    histogram = np.histogram(pixels, bins=8, range=(0, 1))[0] / pixels.size
    return [
        pixels.mean(),
        pixels.std(),
        *np.percentile(pixels, [5, 25, 50, 75, 95]),
        (pixels < 0.02).mean(),
        *histogram,
    ]


def global_features(image: np.ndarray) -> list[float]:
    return _stats(_thumbnail(image))


def border_features(image: np.ndarray) -> list[float]:
    """Statistics of the four edge strips only (10% of the side each)."""
    image = _thumbnail(image)
    h, w = image.shape
    bh, bw = max(1, int(h * BORDER_FRACTION)), max(1, int(w * BORDER_FRACTION))
    strips = [image[:bh], image[-bh:], image[:, :bw], image[:, -bw:]]
    return [value for strip in strips for value in _stats(strip)[:3]]


def shortcut_metrics(
    train: tuple[list[np.ndarray], np.ndarray], test: tuple[list[np.ndarray], np.ndarray], normal_index: int
) -> tuple[dict[str, float], list[str]]:
    train_images, train_targets = train
    test_images, test_targets = test
    y_train, y_test = (train_targets != normal_index).astype(int), (test_targets != normal_index).astype(int)
    if not (0 < y_train.sum() < len(y_train) and 0 < y_test.sum() < len(y_test)):
        return {}, ["train or test part lacks normal or abnormal images: no shortcut check"]
    metrics = {}
    for name, features in (("image_stats", global_features), ("border_only", border_features)):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
        model.fit(np.array([features(i) for i in train_images]), y_train)
        score = model.predict_proba(np.array([features(i) for i in test_images]))[:, 1]
        metrics[f"shortcut/{name}_test_auroc"] = float(roc_auc_score(y_test, score))
    return metrics, []
