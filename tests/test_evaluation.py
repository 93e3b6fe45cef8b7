"""Calibration, screening thresholds, shortcut baselines and per-class tables on controlled inputs."""

import numpy as np
import pytest

from fetalbrain.evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
)
from fetalbrain.evaluation.report import per_class_table
from fetalbrain.evaluation.screening import screening_metrics
from fetalbrain.evaluation.shortcut import shortcut_metrics

RNG = np.random.default_rng(0)


def calibrated_sample(n: int, classes: int = 4, sharpness: float = 3.0):
    """Targets drawn from the predicted distribution itself: calibrated by construction."""
    logits = RNG.normal(size=(n, classes)) * sharpness
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    targets = np.array([RNG.choice(classes, p=p) for p in probs])
    return probs, targets


def test_ece_is_small_when_calibrated_and_large_when_overconfident():
    probs, targets = calibrated_sample(4000)
    assert expected_calibration_error(probs, targets) < 0.03
    overconfident = apply_temperature(probs, 0.3)
    assert expected_calibration_error(overconfident, targets) > 0.1


def test_temperature_scaling_recovers_the_distortion_and_keeps_predictions():
    probs, targets = calibrated_sample(4000)
    distorted = apply_temperature(probs, 0.4)
    temperature = fit_temperature(distorted[:2000], targets[:2000])
    assert temperature == pytest.approx(1 / 0.4, rel=0.15)
    rescaled = apply_temperature(distorted[2000:], temperature)
    assert (rescaled.argmax(axis=1) == distorted[2000:].argmax(axis=1)).all()
    assert expected_calibration_error(rescaled, targets[2000:]) < 0.5 * expected_calibration_error(
        distorted[2000:], targets[2000:]
    )


def screening_sample(n: int, separation: float):
    """Class 0 is normal; the normal probability is high for normals by ``separation``."""
    targets = RNG.integers(0, 3, n)
    p_normal = np.clip(0.5 + separation * np.where(targets == 0, 1, -1) + RNG.normal(0, 0.2, n), 0.01, 0.99)
    probs = np.column_stack([p_normal, (1 - p_normal) / 2, (1 - p_normal) / 2])
    return probs, targets


def test_screening_thresholds_come_from_validation_and_hold_on_test():
    metrics, notes = screening_metrics(screening_sample(2000, 0.2), screening_sample(2000, 0.2), normal_index=0)
    assert not notes
    assert metrics["screening/test_auroc"] > 0.9
    assert metrics["screening/sensitivity_0.95/test_sensitivity"] == pytest.approx(0.95, abs=0.02)
    assert metrics["screening/youden/test_specificity"] > metrics["screening/sensitivity_0.95/test_specificity"]
    j = metrics["screening/youden/test_sensitivity"] + metrics["screening/youden/test_specificity"] - 1
    assert j > 0.6


def test_screening_explains_what_it_cannot_compute():
    probs, targets = screening_sample(100, 0.2)
    metrics, notes = screening_metrics((probs, np.ones_like(targets)), (probs, targets), normal_index=0)
    assert "screening/test_auroc" in metrics and "screening/youden/threshold" not in metrics
    assert any("validation part has only" in n for n in notes)


def test_shortcut_check_finds_a_border_that_gives_the_source_away():
    def images(normal: bool, n: int):
        out = []
        for _ in range(n):
            image = RNG.integers(40, 200, (64, 64)).astype(np.uint8)
            image[:6] = 250 if normal else 10  # a bright banner only on one source
            out.append(image)
        return out

    train = (images(True, 30) + images(False, 30), np.array([0] * 30 + [1] * 30))
    test = (images(True, 20) + images(False, 20), np.array([0] * 20 + [2] * 20))
    metrics, _ = shortcut_metrics(train, test, normal_index=0)
    assert metrics["shortcut/border_only_test_auroc"] > 0.95
    plain = (images(False, 30) + images(False, 30), np.array([0] * 30 + [1] * 30))
    plain_test = (images(False, 20) + images(False, 20), np.array([0] * 20 + [1] * 20))
    assert shortcut_metrics(plain, plain_test, normal_index=0)[0]["shortcut/border_only_test_auroc"] < 0.8


def test_per_class_table_marks_absent_classes():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    table = per_class_table(probs, np.array([0, 1, 0, 1]), ["a", "b", "normal"])
    assert list(table["support"]) == [2, 2, 0]
    assert table.loc[0, "recall"] == 1.0 and np.isnan(table.loc[2, "auroc"])
    assert table.loc[2, "name"] == "Normal"
