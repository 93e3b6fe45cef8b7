"""Evaluating a checkpoint on other data (python -m fetalbrain.evaluate), and predict's listing of unreadable files."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

import fetalbrain.evaluate
from fetalbrain.data.evaluation_data import UnknownClassError
from fetalbrain.evaluate import evaluate
from fetalbrain.evaluation.calibration import fit_temperature
from fetalbrain.evaluation.ood import DETECTOR_FILE
from fetalbrain.evaluation.ood_images import package_file
from fetalbrain.evaluation.screening import youden_threshold
from fetalbrain.inference.predictor import Predictor
from fetalbrain.predict import predict
from tests.conftest import CONF, DATA, bad_files, read_split_csv, write_split_csv

FAST = ["bootstrap.samples=100"]  # intervals from 100 resamples: enough to test, a second on 2 cores


def compose_evaluate(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=[*FAST, *overrides])


def run_summary(checkpoint: Path) -> dict:
    return json.loads((checkpoint.parent.parent / "metrics.json").read_text())


def normal_images(count: int) -> list[Path]:
    frame = read_split_csv("test")
    return [DATA / "test" / name for name in frame.loc[frame["normal"] == 1, "filename"][:count]]


def run_without_detector(checkpoint: Path, copy: Path) -> Path:
    """The checkpoint's run folder (hard links) without its ood_detector.pt: a run trained before OOD detection."""
    shutil.copytree(checkpoint.parent.parent, copy, copy_function=os.link, ignore=shutil.ignore_patterns(DETECTOR_FILE))
    return copy / "checkpoints" / checkpoint.name


class OnePass(Predictor):
    """The evaluate's predictor, counting the images its net sees once it is loaded: each must pass once."""

    images = 0

    def features(self, batch):
        if hasattr(self, "ood_status"):  # set once the detector is loaded (the load probes the feature size)
            OnePass.images += len(batch)
        return super().features(batch)

    def logits(self, batch):
        raise AssertionError("a second forward pass: with a detector, features and logits come from one pass")


def test_evaluating_the_runs_test_images_reproduces_its_test_report(trained_checkpoint, tmp_path):
    """A Roboflow export of the very images the run tested (its predictions.csv), next to a decoy part: with
    data.split=[test], every test metric of the run comes back, scored at the run's thresholds and temperature."""
    run_dir = trained_checkpoint.parent.parent
    summary = run_summary(trained_checkpoint)
    tested = pd.read_csv(run_dir / "predictions.csv")
    classes = summary["classes"]
    export = tmp_path / "export"
    for part, rows in (("test", tested), ("train", tested.iloc[:2])):  # the decoy part must not be evaluated
        (export / part).mkdir(parents=True)
        for path in rows["path"]:
            shutil.copyfile(path, export / part / Path(path).name)
        table = pd.DataFrame({"filename": [Path(p).name for p in rows["path"]]})
        for name in classes:
            table[name] = (rows["true"] == name).astype(int).to_numpy()
        write_split_csv(table, export / part / "_classes.csv")
    out = tmp_path / "eval"
    result = evaluate(compose_evaluate(f"ckpt={run_dir}", f"data.root={export}", "data.split=[test]", f"out={out}"))

    metrics, run = result["metrics"], summary["metrics"]
    assert result["data"]["format"] == "roboflow" and result["data"]["images"] == len(tested)
    assert result["model"]["integrity"] == "verified" and result["model"]["checkpoint"] == str(trained_checkpoint)
    for name in ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc_macro"):
        assert metrics[f"eval/{name}"] == pytest.approx(run[f"test/{name}"], abs=1e-6), name
        assert metrics[f"eval/{name}_ci_low"] <= metrics[f"eval/{name}"] <= metrics[f"eval/{name}_ci_high"]
    for name in ("ece", "nll", "ece_temperature_scaled", "nll_temperature_scaled"):
        assert metrics[f"eval/{name}"] == pytest.approx(run[f"test/{name}"], abs=1e-5), name
    assert metrics["eval/screening_auroc"] == pytest.approx(run["screening/test_auroc"], abs=1e-6)
    rules = [k.split("/")[1] for k in run if k.startswith("screening/") and k.endswith("/threshold")]
    assert rules and result["applied"]["source"] == str(run_dir / "metrics.json")
    for rule in rules:
        assert metrics[f"eval/screening/{rule}/threshold"] == run[f"screening/{rule}/threshold"]
        for kind in ("sensitivity", "specificity"):
            assert metrics[f"eval/screening/{rule}/{kind}"] == pytest.approx(run[f"screening/{rule}/test_{kind}"])
    assert result["applied"]["temperature"] == run["calibration/temperature"]

    # Fitting again on these images would have given other values, so the equalities above prove they were not.
    written = pd.read_csv(out / "predictions.csv")
    probs = written.filter(like="p_").to_numpy()
    targets = np.asarray([classes.index(t) for t in written["true"]])
    assert fit_temperature(probs, targets) != pytest.approx(run["calibration/temperature"], rel=0.1)
    is_abnormal, score = targets != classes.index("normal"), 1 - probs[:, classes.index("normal")]
    assert youden_threshold(is_abnormal, score) != pytest.approx(run["screening/youden/threshold"])
    assert np.allclose(written.filter(like="p_").to_numpy(), tested.filter(like="p_").to_numpy(), atol=1e-5)

    # The run's OOD detector scores each image as the run's own report scored it (ood_scores.csv), at its threshold.
    run_scores = pd.read_csv(run_dir / "ood_scores.csv").query("set == 'test'").set_index("image")["score"]
    run_scores.index = [Path(p).name for p in run_scores.index]
    assert np.allclose(written["ood_score"], run_scores.loc[[Path(p).name for p in written["path"]]], atol=1e-5)
    assert metrics["eval/ood/threshold"] == run["ood/threshold"]
    assert metrics["eval/ood/flag_rate"] == pytest.approx((written["ood_score"] > run["ood/threshold"]).mean())
    assert written["ood_flagged"].tolist() == (written["ood_score"] > run["ood/threshold"]).tolist()

    per_class = pd.read_csv(out / "per_class.csv")
    assert per_class["support"].sum() == len(tested) and per_class["predicted_fraction"].sum() == pytest.approx(1)
    for name in ("confusion_matrix", "confusion_matrix_normalised", "roc", "screening_roc", "reliability"):
        assert (out / f"{name}.png").is_file(), name
    present = per_class[per_class["support"] > 0]
    assert (present["recall_ci_low"] <= present["recall"] + 1e-9).all()
    assert (present["recall"] <= present["recall_ci_high"] + 1e-9).all()
    report = (out / "report.md").read_text()
    assert "](per_class_recall.png)" in report and (out / "per_class_recall.png").is_file()
    assert "not fitted on these images" in report and f"youden {run['screening/youden/threshold']:.6g}" in report
    assert "## Is it a fetal brain ultrasound?" in report and "source-bound" in report  # labelled: what a rate means


def test_evaluate_on_a_normal_only_folder_reports_specificity_and_what_it_cannot(
    trained_checkpoint, tmp_path, monkeypatch, capsys
):
    """The command line (in this process): a folder holding only `Normal` (the clinical spelling), with a broken
    link and a text file in it, evaluated with a run that has no OOD detector."""
    folder = tmp_path / "normal_only" / "Normal"
    folder.mkdir(parents=True)
    images = normal_images(6)
    for path in images:
        shutil.copyfile(path, folder / path.name)
    os.symlink(tmp_path / "moved_away.jpg", folder / "moved.jpg")
    (folder / "notes.txt").write_text("scanned on the second machine")
    checkpoint = run_without_detector(trained_checkpoint, tmp_path / "run_without_detector")
    out = tmp_path / "eval"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "fetalbrain.evaluate",
            f"--config-path={CONF}",
            f"ckpt={checkpoint}",
            f"data.root={folder.parent}",
            f"out={out}",
            *FAST,
        ]
        + ["data.on_bad_image=skip"],
    )
    GlobalHydra.instance().clear()
    try:
        fetalbrain.evaluate.main()
    finally:
        GlobalHydra.instance().clear()
    printed = capsys.readouterr().out
    assert "6 images (Normal 6)" in printed and (out / ".hydra" / "overrides.yaml").is_file()

    result = json.loads((out / "metrics.json").read_text())
    metrics, run = result["metrics"], run_summary(trained_checkpoint)["metrics"]
    predictions = pd.read_csv(out / "predictions.csv")
    for rule in ("youden", "sensitivity_0.95"):
        threshold = run[f"screening/{rule}/threshold"]
        called_normal = (predictions["abnormal_probability"] < threshold).mean()
        assert metrics[f"eval/screening/{rule}/specificity"] == pytest.approx(called_normal)
        assert metrics[f"eval/screening/{rule}/flagged"] == pytest.approx(1 - called_normal)
        assert f"eval/screening/{rule}/sensitivity" in result["not_computable"]
    assert metrics["eval/accuracy"] == pytest.approx((predictions["predicted"] == "normal").mean())
    fractions = [metrics[f"eval/predicted/{c}"] for c in result["classes"]]
    assert sum(fractions) == pytest.approx(1)
    assert metrics["eval/confidence/q50"] == pytest.approx(predictions["confidence"].median())
    assert "eval/confidence_temperature_scaled/q95" in metrics and (out / "distributions.png").is_file()
    assert "needs images of 2 or more classes" in result["not_computable"]["eval/auroc_macro"]
    assert "all are normal" in result["not_computable"]["eval/screening_auroc"]
    assert not (out / "roc.png").exists() and not (out / "screening_roc.png").exists()
    assert [Path(s["path"]).name for s in result["data"]["skipped_images"]] == ["moved.jpg"]
    assert "broken symbolic link" in result["data"]["skipped_images"][0]["error"]
    assert [Path(s["path"]).name for s in result["data"]["ignored_files"]] == ["notes.txt"]
    report = (out / "report.md").read_text()
    assert "## Not computable on these data" in report and "macro AUROC (`eval/auroc_macro`)" in report
    # no detector: no OOD numbers, and the predictor's reason, never an error
    assert not any(k.startswith(("eval/ood", "eval/ood_score")) for k in metrics) and "ood_score" not in predictions
    assert f"no {DETECTOR_FILE}" in result["not_computable"]["eval/ood/flag_rate"]
    assert f"no {DETECTOR_FILE}" in result["applied"]["ood"]["status"] and "No OOD scores" in report


def test_unknown_class_names_are_refused_before_anything_is_predicted(trained_checkpoint, tmp_path):
    root = tmp_path / "other_hospital"
    normal = normal_images(3)
    for folder, image in zip(("normal", "Mild ventriculomegaly", "tumour"), normal):  # either spelling is known
        (root / folder).mkdir(parents=True)
        shutil.copyfile(image, root / folder / image.name)
    out = tmp_path / "eval"
    with pytest.raises(UnknownClassError) as error:
        evaluate(compose_evaluate(f"ckpt={trained_checkpoint}", f"data.root={root}", f"out={out}"))
    message = str(error.value)
    assert "does not know: tumour." in message and "Mild" not in message.split("It knows")[0]
    assert "intracranial-tumor (Intracranial tumour)" in message and "normal (Normal)" in message
    assert "data.format=unlabeled" in message and not out.exists()


def test_an_unlabelled_folder_gives_distributions_and_bad_images_follow_on_bad_image(
    trained_checkpoint, tmp_path, monkeypatch, capsys
):
    """Five scans and a colour photograph: the photograph gets the highest OOD score, each image one forward pass."""
    folder = tmp_path / "unlabelled"
    (folder / "day2").mkdir(parents=True)
    images = sorted(DATA.glob("test/*.jpg"))[:5]
    for i, path in enumerate(images):
        shutil.copyfile(path, (folder if i % 2 else folder / "day2") / path.name)
    Image.open(package_file("sklearn", "datasets/images/china.jpg")).save(folder / "photo.png")
    truncated = bad_files(tmp_path / "bad")["truncated"]
    shutil.copyfile(truncated, folder / truncated.name)
    unlabelled = [f"ckpt={trained_checkpoint}", f"data.root={folder}", "data.format=unlabeled"]  # day2/ is no class
    with pytest.raises(ValueError, match=f"{truncated.name}.*data.on_bad_image=skip"):
        evaluate(compose_evaluate(*unlabelled, f"out={tmp_path / 'a'}"))

    out = tmp_path / "eval"
    cfg = compose_evaluate(*unlabelled, "data.on_bad_image=skip", f"out={out}", "batch_size=2")
    monkeypatch.setattr(fetalbrain.evaluate, "Predictor", OnePass)
    capsys.readouterr()
    result = evaluate(cfg)
    assert re.search(r"Evaluating: reading and scoring images .* 7/7", capsys.readouterr().err)  # the progress bar
    metrics = result["metrics"]
    assert result["data"]["format"] == "unlabeled" and result["data"]["images"] == 6 and OnePass.images == 6
    assert [Path(s["path"]).name for s in result["data"]["skipped_images"]] == [truncated.name]
    assert not any(k.startswith(("eval/accuracy", "eval/ece", "eval/screening_auroc")) for k in metrics)
    assert result["not_computable"]["eval/accuracy"] == "needs labels (the images are unlabelled)"
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 6 and "true" not in predictions.columns
    assert Path(predictions.loc[predictions["ood_score"].idxmax(), "path"]).name == "photo.png"
    run = run_summary(trained_checkpoint)["metrics"]
    assert metrics["eval/ood/threshold"] == run["ood/threshold"] == result["applied"]["ood"]["threshold"]
    assert metrics["eval/ood/flag_rate"] == pytest.approx(predictions["ood_flagged"].mean())
    assert (
        metrics["eval/ood/flag_rate_ci_low"] <= metrics["eval/ood/flag_rate"] <= metrics["eval/ood/flag_rate_ci_high"]
    )
    assert metrics["eval/ood_score/q50"] == pytest.approx(predictions["ood_score"].median())
    assert "eval/ood/flag_rate" not in result["not_computable"]
    for label in result["classes"]:
        assert metrics[f"eval/predicted/{label}"] == pytest.approx((predictions["predicted"] == label).mean())
    threshold = result["applied"]["thresholds"]["youden"]
    flagged = (predictions["abnormal_probability"] >= threshold).mean()
    assert metrics["eval/screening/youden/flagged"] == pytest.approx(flagged)
    assert metrics["eval/confidence/q5"] <= metrics["eval/confidence/q50"] <= metrics["eval/confidence/q95"]
    assert sorted(p.name for p in out.glob("*.png")) == ["distributions.png"]


def test_predict_lists_every_file_it_cannot_read(trained_checkpoint, tmp_path, capsys):
    """A broken symbolic link, a pipe, a text file and a file that only claims to be DICOM each get a row with
    why; a link to an image and the images are predicted; a link back to the folder is not read twice."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    real = sorted(DATA.glob("test/*.jpg"))[1:3]  # heads the finder trusts (the first image shows two head-like regions)
    shutil.copyfile(real[0], inputs / "scan.jpg")
    os.symlink(real[1], inputs / "linked.jpg")
    os.symlink(tmp_path / "deleted.jpg", inputs / "dangling.jpg")
    os.mkfifo(inputs / "pipe.png")
    (inputs / "notes.txt").write_text("patient list")
    (inputs / "IMG0001").write_bytes(b"\0" * 128 + b"DICM" + b"not really")
    os.symlink(inputs, inputs / "loop")
    out = tmp_path / "preds.csv"
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("predict", overrides=[f"ckpt={trained_checkpoint}", f"inputs={inputs}", f"out={out}"])
    predict(cfg)
    assert re.search(r"Predicting .* 7/7", capsys.readouterr().err)  # a progress bar over every entry
    frame = pd.read_csv(out)
    frame.index = [Path(f).name for f in frame["file"]]
    assert sorted(frame.index) == sorted(
        ["scan.jpg", "linked.jpg", "dangling.jpg", "pipe.png", "notes.txt", "IMG0001", "loop"]
    )
    assert frame.loc[["scan.jpg", "linked.jpg"], "error"].isna().all()
    assert frame.loc[["scan.jpg", "linked.jpg"], "predicted"].notna().all()
    errors = frame["error"].dropna()
    assert "broken symbolic link" in errors["dangling.jpg"] and "deleted.jpg" in errors["dangling.jpg"]
    assert "not a regular file" in errors["pipe.png"]
    assert "not an image or DICOM file (suffix .txt)" in errors["notes.txt"]
    assert "not a readable DICOM image" in errors["IMG0001"]
    assert "folder already read" in errors["loop"]
    assert all(errors[name].startswith(str(inputs / name)) for name in errors.index)  # each error names its file
