"""Fold ensembles: several runs predict, evaluate and serve the GUI as one model that averages the members'
calibrated probabilities. Two real members: the session's EfficientNet-Lite0 run (64 px) and a plain CNN (32 px)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fetalbrain.app import describe, model_choices
from fetalbrain.evaluate import evaluate
from fetalbrain.evaluation.calibration import expected_calibration_error
from fetalbrain.inference.ensemble import Ensemble, load_model
from fetalbrain.inference.predictor import Predictor
from fetalbrain.predict import predict
from fetalbrain.runs.checkpoints import model_paths
from tests.conftest import CONF, DATA, TINY, train_config

REAL = sorted(DATA.glob("test/*.jpg"))[:6]


@pytest.fixture(scope="module")
def sweep(trained_checkpoint, tmp_path_factory) -> Path:
    """A sweep folder as Hydra multirun writes it: the Lite0 run and a tiny CNN run (with its OOD detector)."""
    from fetalbrain.training.fit import train

    folder = tmp_path_factory.mktemp("sweep")
    shutil.copytree(trained_checkpoint.parent.parent, folder / "0")
    with train_config(folder / "1", [*TINY, "model=cnn", "evaluation.ood.enabled=true"]) as cfg:
        train(cfg)
    (folder / "multirun.yaml").write_text("hydra: {}\n")
    return folder


@pytest.fixture(scope="module")
def members(sweep) -> list[Path]:
    return model_paths(sweep)


def test_a_folder_of_runs_is_its_runs_best_checkpoints(sweep, members, trained_checkpoint, tmp_path):
    assert [p.parent.parent.name for p in members] == ["0", "1"]
    assert members[0].read_bytes() == trained_checkpoint.read_bytes()  # the copy's own checkpoints/ (run moved)
    assert model_paths([sweep / "1", sweep / "0", members[1]]) == [members[1], members[0]]  # each once, in order
    assert isinstance(load_model(sweep / "0"), Predictor) and isinstance(load_model(sweep), Ensemble)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="ckpt=.*empty: a folder with no finished classification run"):
        model_paths(tmp_path / "empty")


def test_the_ensemble_averages_the_members_calibrated_probabilities(members):
    ensemble = Ensemble(members)
    singles = [Predictor(p) for p in members]
    assert singles[0].temperature != 1.0 or singles[1].temperature != 1.0  # calibration is there to keep
    assert singles[0].card["preprocessing"]["image_size"] != singles[1].card["preprocessing"]["image_size"]
    for path in REAL:
        together, apart = ensemble.predict_file(path), [s.predict_file(path) for s in singles]
        for name, p in together.probabilities.items():  # each member's own size, normalisation and temperature
            assert p == pytest.approx(np.mean([a.probabilities[name] for a in apart]), abs=1e-6)
        assert together.name == max(together.probabilities, key=together.probabilities.get)
        assert together.abnormal_probability == pytest.approx(np.mean([a.abnormal_probability for a in apart]))
        assert together.screening_threshold == pytest.approx(np.mean([a.screening_threshold for a in apart]))
        ratio = np.mean([a.ood_score / a.ood_threshold for a in apart])
        assert together.ood_score == pytest.approx(ratio) and together.ood_threshold == 1.0
        assert together.heatmap is not None and together.heatmap.shape[2] == 3
        assert not any("first member only" in w for w in together.warnings)  # same region: averaged
    from fetalbrain.data.images import read_grayscale

    batch = ensemble.batch_scores([read_grayscale(p) for p in REAL])  # evaluate's path: the same numbers
    first = ensemble.predict_file(REAL[0])  # (one image against a batch: float rounding apart)
    assert batch.probs[0].max() == pytest.approx(first.confidence, abs=1e-4)
    assert batch.abnormal[0] == pytest.approx(first.abnormal_probability, abs=1e-4)
    assert batch.ood[0] == pytest.approx(first.ood_score, rel=1e-3)


def test_the_heatmap_is_the_members_heatmaps_of_the_ensembles_class_averaged(members):
    import cv2

    from fetalbrain.data.images import read_grayscale
    from fetalbrain.models.gradcam import overlay

    ensemble = Ensemble(members)
    result = ensemble.predict_file(REAL[1])
    top = ensemble.class_names.index(result.label)
    outputs = [m.image_outputs(read_grayscale(REAL[1])) for m in ensemble.members]
    view = outputs[0][0]
    cams = [
        cv2.resize(m.heatmap(batch, top), (view.shape[1], view.shape[0]))
        for m, (_, batch, _, _) in zip(ensemble.members, outputs)
    ]
    assert np.abs(result.heatmap.astype(int) - overlay(view, np.mean(cams, axis=0)).astype(int)).max() <= 1
    assert np.abs(result.heatmap.astype(int) - overlay(view, cams[0]).astype(int)).max() > 1  # not one member's


def test_an_ensemble_of_one_model_twice_is_that_model_calibration_included(members):
    """Averaging keeps calibration: the same member twice gives exactly its calibrated probabilities, and so the
    same ECE; averaging uncalibrated probabilities would not."""
    twice, single = Ensemble([members[0], members[0]]), Predictor(members[0])
    from fetalbrain.data.images import read_grayscale

    images = [read_grayscale(p) for p in sorted(DATA.glob("test/*.jpg"))[:40]]
    targets = np.arange(len(images)) % len(single.class_names)
    ours, theirs = twice.batch_scores(images).probs, single.batch_scores(images).probs
    assert np.allclose(ours, theirs, atol=1e-6)
    assert expected_calibration_error(ours, targets) == pytest.approx(expected_calibration_error(theirs, targets))
    raw = Predictor(members[0], calibrated=False).batch_scores(images).probs
    assert single.temperature == 1.0 or not np.allclose(ours, raw, atol=1e-4)


def test_members_must_share_their_classes(members, tmp_path, monkeypatch):
    import fetalbrain.inference.ensemble

    class OtherOrder(Predictor):  # the second run's classes in another order
        def __init__(self, path, *args, **kwargs):
            super().__init__(path, *args, **kwargs)
            if path == members[1]:
                self.class_names = list(reversed(self.class_names))

    monkeypatch.setattr(fetalbrain.inference.ensemble, "Predictor", OtherOrder)
    with pytest.raises(ValueError, match=f"ckpt: {members[1]} has classes .* must share their classes"):
        Ensemble(members)
    with pytest.raises(ValueError, match=r"checkpoints \(.ckpt\), not ONNX"):
        Ensemble([members[0], tmp_path / "model.onnx"])


def test_evaluate_an_ensemble(members, sweep, tmp_path):
    """Labelled real images through evaluate with ckpt=<sweep>: its probabilities are the ensemble's, its ECE is the
    calibrated ensemble's (no temperature on top), screening at the mean of the members' thresholds."""
    images = sorted(DATA.glob("test/*.jpg"))[:24]
    table = pd.read_csv(DATA / "test" / "_classes.csv")
    table.columns = [c.strip() for c in table.columns]
    export = tmp_path / "export" / "test"
    export.mkdir(parents=True)
    for path in images:
        shutil.copyfile(path, export / path.name)
    table[table["filename"].isin([p.name for p in images])].to_csv(export / "_classes.csv", index=False)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt={sweep}", f"data.root={export.parent}", f"out={tmp_path / 'e'}"])
    result = evaluate(cfg, tmp_path / "e")
    assert result["model"]["checkpoint"] == [str(p) for p in members]
    predicted = pd.read_csv(tmp_path / "e" / "predictions.csv")
    ensemble = Ensemble(members, heatmaps=False)
    for row in predicted.head(3).itertuples():
        expected = ensemble.predict_file(row.path)
        assert row.confidence == pytest.approx(expected.confidence, abs=1e-5)
        assert row.abnormal_probability == pytest.approx(expected.abnormal_probability, abs=1e-5)
    thresholds = [json.loads((p.parent.parent / "metrics.json").read_text())["metrics"] for p in members]
    assert result["metrics"]["eval/screening/youden/threshold"] == pytest.approx(
        np.mean([m["screening/youden/threshold"] for m in thresholds])
    )
    assert "eval/ece" in result["metrics"] and "eval/ece_temperature_scaled" in result["not_computable"]
    assert "already the calibrated ones" in result["not_computable"]["eval/ece_temperature_scaled"]
    assert any("an ensemble of 2 checkpoints" in note for note in result["notes"])
    report = (tmp_path / "e" / "report.md").read_text()
    assert "- ensemble: 2 runs" in report and "already the calibrated ones" in report


def test_predict_and_the_gui_offer_the_ensemble(members, sweep, tmp_path):
    out = tmp_path / "predictions.csv"
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("predict", overrides=[f"ckpt=[{members[0]},{members[1]}]", f"inputs={REAL[0]}", f"out={out}"])
        empty = compose("predict", overrides=["ckpt=[]", f"inputs={REAL[0]}", f"out={out}"])
    frame = predict(cfg)
    expected = Ensemble(members, heatmaps=False).predict_file(REAL[0])
    assert frame.loc[0, "confidence"] == pytest.approx(expected.confidence)
    with pytest.raises(ValueError, match=r"ckpt=\[\]: name at least one"):  # not "the newest run"
        predict(empty)
    text = describe(Ensemble(members, heatmaps=False))
    assert "mean of the members' calibrated probabilities" in text and "Test metrics: the mean" in text


def test_the_gui_lists_a_cross_validation_as_one_model_but_not_a_search(sweep, tmp_path):
    """A sweep of one recipe on two folds is offered as an ensemble; the mixed sweep (two models) is not."""
    from fetalbrain.training.fit import train

    folds = tmp_path / "folds"
    for fold in (0, 1):
        with train_config(folds / str(fold), [*TINY, "model=cnn", f"data.fold={fold}"]) as cfg:
            train(cfg)
    (folds / "multirun.yaml").write_text("hydra: {}\n")
    choices = model_choices(OmegaConf.create({"ckpt": None, "paths": {"log_dir": str(tmp_path)}}))
    ensembles = {label: paths for label, paths in choices.items() if label.startswith("ensemble of")}
    assert len(ensembles) == 1 and len(choices) == 3
    assert [p.parent.parent.name for p in next(iter(ensembles.values()))] == ["0", "1"]
    mixed = model_choices(OmegaConf.create({"ckpt": None, "paths": {"log_dir": str(sweep)}}))
    assert len(mixed) == 2 and not any(label.startswith("ensemble") for label in mixed)
