"""Calibration, screening thresholds, shortcut baselines and per-class tables on controlled inputs."""

import numpy as np
import pytest

from fetalbrain.evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
)
from fetalbrain.evaluation.screening import screening_metrics
from fetalbrain.evaluation.shortcut import shortcut_metrics
from fetalbrain.evaluation.test_report import per_class_table

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


def textured(seed: int, size: int = 48) -> np.ndarray:
    """A smooth random image: its turned and mirrored copies are far from it in pixel space."""
    import cv2

    noise = np.random.default_rng(seed).integers(0, 255, (8, 8)).astype(np.uint8)
    return cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)


def test_nearest_neighbour_baseline_finds_copies_and_counts_the_shared_sources(tmp_path):
    import pandas as pd
    from omegaconf import OmegaConf

    from fetalbrain.evaluation.baselines import CSV_FILE, nearest_neighbour_report

    classes = ["a", "b", "normal"]
    sources = [textured(seed) for seed in range(6)]
    train = (sources, np.array([0, 0, 1, 1, 2, 2]))
    table = pd.DataFrame({"path": [f"s{i}.jpg" for i in range(6)], "source": [f"s{i}" for i in range(6)]})
    table["case"] = table["source"]
    # test: noisy copies of sources 0, 2, 4 (same source), and source 5 turned by 90 degrees
    noisy = [
        np.clip(sources[i].astype(int) + RNG.integers(-8, 9, sources[i].shape), 0, 255).astype(np.uint8)
        for i in (0, 2, 4)
    ]
    test_images = [*noisy, np.rot90(sources[5]).copy()]
    test = (test_images, np.array([0, 1, 2, 2]))
    test_table = pd.DataFrame({"path": ["t0", "t1", "t2", "t3"], "source": ["s0", "s2", "s4", "s5"]})
    test_table["case"] = test_table["source"]
    options = OmegaConf.create({"size": 16, "distance": "euclidean", "dihedral": False})
    metrics, notes = nearest_neighbour_report(train, test, classes, options, (table, test_table), tmp_path)
    frame = pd.read_csv(tmp_path / CSV_FILE)
    assert not notes and list(frame["nearest_train_path"][:3]) == ["s0.jpg", "s2.jpg", "s4.jpg"]
    assert metrics["baseline/nn1_test_same_source"] == pytest.approx(3 / 4) == frame["same_source"].mean()
    assert metrics["baseline/nn1_test_accuracy"] == pytest.approx((frame["true"] == frame["predicted"]).mean())
    turned = nearest_neighbour_report(
        train, test, classes, OmegaConf.merge(options, {"dihedral": True}), (table, test_table)
    )
    assert turned[0]["baseline/nn1_test_same_source"] == 1.0 and turned[0]["baseline/nn1_test_accuracy"] == 1.0
    cosine = nearest_neighbour_report(train, test, classes, OmegaConf.merge(options, {"distance": "cosine"}))[0]
    assert cosine["baseline/nn1_test_f1_macro"] <= 1.0 and "baseline/nn1_test_same_source" not in cosine
    with pytest.raises(ValueError, match="evaluation.nearest_neighbour.distance='manhattan'"):
        nearest_neighbour_report(train, test, classes, OmegaConf.merge(options, {"distance": "manhattan"}))


def test_label_scores_are_the_stage_metrics_of_the_argmax():
    import torch

    from fetalbrain.evaluation.metrics import classification_metrics, label_scores

    probs, targets = calibrated_sample(300, classes=5)
    targets[targets == 4] = 0  # a class only ever predicted, never true: counted as the stage metrics count it
    stage = classification_metrics(5)(torch.as_tensor(probs), torch.as_tensor(targets))
    scores = label_scores(probs.argmax(axis=1), targets, 5)
    assert scores == pytest.approx({k: float(stage[k]) for k in scores}, abs=1e-6)


HIERARCHY_CLASSES = ["arachnoid-cyst", "mild-ventriculomegaly", "moderate-ventriculomegaly", "normal"]
VENTRICULOMEGALY = {"ventriculomegaly": ["mild-ventriculomegaly", "moderate-ventriculomegaly"]}


def test_hierarchy_merges_a_group_and_grades_within_it(tmp_path):
    import pandas as pd

    from fetalbrain.evaluation.hierarchy import CSV_FILE, hierarchy_report

    probs = np.array(
        [  # true class: decided by argmax (by the group's columns alone for the grade)
            [0.1, 0.2, 0.6, 0.1],  # mild: called moderate (grade wrong, group right); among the group moderate
            [0.1, 0.5, 0.3, 0.1],  # mild: right
            [0.6, 0.1, 0.2, 0.1],  # moderate: called a cyst (group missed); among the group moderate (grade right)
            [0.2, 0.1, 0.1, 0.6],  # cyst: called normal (abnormal missed); among anomalies a cyst
            [0.1, 0.1, 0.1, 0.7],  # normal: right
            [0.1, 0.6, 0.1, 0.2],  # normal: called mild (false alarm)
        ]
    )
    targets = np.array([1, 1, 2, 0, 3, 3])
    metrics, notes = hierarchy_report(probs, targets, HIERARCHY_CLASSES, VENTRICULOMEGALY, tmp_path)
    assert not notes
    assert metrics["hierarchy/abnormal_test_accuracy"] == pytest.approx(4 / 6)
    assert metrics["hierarchy/abnormal_test_sensitivity"] == pytest.approx(3 / 4)
    assert metrics["hierarchy/abnormal_test_specificity"] == pytest.approx(1 / 2)
    assert metrics["hierarchy/anomaly_test_accuracy"] == pytest.approx(2 / 4)  # argmax among the 3 anomalies
    assert metrics["hierarchy/ventriculomegaly_test_recall"] == pytest.approx(2 / 3)
    assert metrics["hierarchy/ventriculomegaly_grade_test_accuracy"] == pytest.approx(2 / 3)
    assert metrics["hierarchy/ventriculomegaly_merged_test_accuracy"] == pytest.approx(3 / 6)  # grades apart: 2 / 6
    table = pd.read_csv(tmp_path / CSV_FILE).set_index("view")
    assert table.loc["all classes", "accuracy"] == pytest.approx(2 / 6)
    assert table.loc["ventriculomegaly grade", "images"] == 3 and table.loc["abnormal", "classes"] == 2


def test_hierarchy_groups_are_checked_against_the_run_classes():
    from fetalbrain.evaluation.hierarchy import check_groups, hierarchy_report

    with pytest.raises(
        ValueError, match=r"evaluation.hierarchy.groups.ventriculomegaly: 'severe-ventricolomegaly' not"
    ):
        check_groups({"ventriculomegaly": ["mild-ventriculomegaly", "severe-ventricolomegaly"]}, HIERARCHY_CLASSES)
    with pytest.raises(ValueError, match="evaluation.hierarchy.groups.cyst.*at least two"):
        check_groups({"cyst": ["arachnoid-cyst"]}, HIERARCHY_CLASSES)
    other_dataset = {"other": ["a", "b"], **VENTRICULOMEGALY}
    assert check_groups({"other": ["a", "b"]}, HIERARCHY_CLASSES) == {}  # none of its classes here: left out
    assert "no other view" in hierarchy_report(np.eye(4), np.arange(4), HIERARCHY_CLASSES, {"other": ["a", "b"]})[1][0]
    assert check_groups(other_dataset, HIERARCHY_CLASSES) == VENTRICULOMEGALY
    probs = np.eye(4)[[0, 3]]  # no ventriculomegaly image in test: the grade view is left out, with a note
    metrics, notes = hierarchy_report(probs, np.array([0, 3]), HIERARCHY_CLASSES, VENTRICULOMEGALY)
    assert "hierarchy/ventriculomegaly_merged_test_accuracy" in metrics
    assert "hierarchy/ventriculomegaly_grade_test_accuracy" not in metrics and "no grade view" in notes[0]
