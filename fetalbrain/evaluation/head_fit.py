"""How well a head finder finds heads: Dice of its mask and the errors of its fitted ellipse against the drawn one
(centre, semi-axes, circumference: HC18's measure), per image and summarised per head-width bin."""

import math

import numpy as np
import pandas as pd

from fetalbrain.data.ellipses import Ellipse


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A| + |B|) of two binary masks; 1 when both are empty."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    total = predicted.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (predicted & truth).sum() / total)


def ellipse_errors(found: Ellipse | None, truth: Ellipse) -> dict[str, float]:
    """Absolute errors in pixels (centre distance, each semi-axis, circumference) and the circumference's relative
    error; NaN when nothing was fitted."""
    if found is None:
        return dict.fromkeys(
            ("centre_px", "semi_major_px", "semi_minor_px", "circumference_px", "circumference_rel"), math.nan
        )
    return {
        "centre_px": math.hypot(found.cx - truth.cx, found.cy - truth.cy),
        "semi_major_px": abs(found.semi_major - truth.semi_major),
        "semi_minor_px": abs(found.semi_minor - truth.semi_minor),
        "circumference_px": abs(found.circumference - truth.circumference),
        "circumference_rel": abs(found.circumference - truth.circumference) / truth.circumference,
    }


SUMMARISED = ("dice", "centre_px", "semi_major_px", "semi_minor_px", "circumference_px", "circumference_rel")


def summarise_by_bin(per_image: pd.DataFrame, edges: list[float]) -> pd.DataFrame:
    """Per head-width bin and over all: images, subjects, the share found, and the mean and median of each error
    (errors over the found heads; Dice over every image, a miss scoring its mask's Dice)."""
    labels = [f"{low:g}-{high:g}" for low, high in zip(edges, edges[1:])]
    bins = pd.cut(per_image["head_width_fraction"], edges, labels=labels, include_lowest=True)
    rows = []
    for label, part in [*((label, per_image[bins == label]) for label in labels), ("all", per_image)]:
        row = {"bin": label, "images": len(part), "subjects": part["subject"].nunique()}
        row["found"] = float(part["found"].mean()) if len(part) else math.nan
        found = part[part["found"]]
        for column in SUMMARISED:
            values = part[column] if column == "dice" else found[column]
            row[f"{column}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{column}_median"] = float(values.median()) if len(values) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)
