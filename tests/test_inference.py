"""Prediction, export and the predict CLI on real images with a checkpoint trained in the test."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from fetalbrain.data.classes import DISPLAY_NAMES
from fetalbrain.data.images import read_grayscale
from fetalbrain.evaluation.calibration import softmax
from fetalbrain.export import export
from fetalbrain.inference.predictor import Predictor
from fetalbrain.predict import predict
from fetalbrain.runs.checkpoints import latest_checkpoint
from tests.conftest import CONF, DATA, ROOT, bad_files, run_main

REAL = sorted(DATA.glob("test/*.jpg"))[:8]
HC18_HEAD = ROOT / "data" / "hc18-normal-heads" / "images" / "300_HC.jpg"


@pytest.fixture(scope="module")
def predictor(trained_checkpoint):
    return Predictor(trained_checkpoint)


@pytest.fixture(scope="module")
def onnx_export(trained_checkpoint, tmp_path_factory) -> Path:
    """The trained run exported once (the dynamo exporter takes seconds), alone in its folder."""
    return export(trained_checkpoint, "onnx", tmp_path_factory.mktemp("onnx") / "model.onnx")


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "US", "Anonymous"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_predictions_on_real_images(predictor, trained_checkpoint):
    results = predictor.predict_files(REAL)
    metrics = json.loads((trained_checkpoint.parent.parent / "metrics.json").read_text())["metrics"]
    for result in results:
        assert result.error is None
        probs = list(result.probabilities.values())
        assert abs(sum(probs) - 1) < 1e-5 and probs == sorted(probs, reverse=True)
        assert result.name in DISPLAY_NAMES.values() and result.label in predictor.class_names
        assert result.confidence == pytest.approx(probs[0])
        # Thresholded on the scale it was chosen on (validation, before temperature scaling).
        logits = predictor.logits(predictor.tensor(read_grayscale(result.file)))
        raw_normal = softmax(logits, 1.0)[0][predictor.class_names.index("normal")]
        assert result.abnormal_probability == pytest.approx(1 - raw_normal, abs=1e-6)
        assert result.screening_threshold == pytest.approx(metrics["screening/youden/threshold"])
        assert result.heatmap.dtype == np.uint8 and result.heatmap.shape == (256, 256, 3)
    assert predictor.temperature == pytest.approx(metrics["calibration/temperature"])
    assert predictor.card["test_metrics"]["test/accuracy"] == pytest.approx(metrics["test/accuracy"])


def test_every_input_format_is_read_like_training_images(predictor, tmp_path):
    gray = read_grayscale(REAL[0])
    files = {
        "png": tmp_path / "scan.png",
        "bmp": tmp_path / "scan.bmp",
        "tiff16": tmp_path / "scan16.tif",
        "rgba": tmp_path / "scan_rgba.png",
    }
    Image.fromarray(gray).save(files["png"])
    Image.fromarray(gray).save(files["bmp"])
    Image.fromarray(gray.astype(np.uint16) * 257).save(files["tiff16"])
    Image.fromarray(gray).convert("RGBA").save(files["rgba"])
    files["dicom"] = write_dicom(tmp_path / "scan.dcm", gray.astype(np.uint16) * 16)
    files["dicom_no_suffix"] = write_dicom(tmp_path / "IMG0001", gray.astype(np.uint16) * 16)
    reference = predictor.predict_file(files["png"], heatmap=False)
    for kind, path in files.items():
        result = predictor.predict_file(path, heatmap=False)
        assert result.error is None, kind
        assert result.label == reference.label, kind
        assert abs(result.confidence - reference.confidence) < 0.02, kind
    inverted = write_dicom(tmp_path / "inverted.dcm", (255 - gray).astype(np.uint16), photometric="MONOCHROME1")
    restored = read_grayscale(inverted).astype(float)  # min-max scaled, and un-inverted
    assert np.corrcoef(restored.ravel(), gray.astype(float).ravel())[0, 1] > 0.999


def test_the_fetal_head_is_outlined_and_measured_in_mm_where_a_dicom_says_its_pixel_size(predictor, tmp_path):
    """The shipped finder outlines the head (this run saw whole frames); its circumference is in pixels, and in mm
    for a DICOM with PixelSpacing or an ultrasound region calibrated in cm; a head it does not trust withholds the
    answer. HC18's pixel sizes are 0.05-0.3 mm."""
    from fetalbrain.inference.predictor import NO_HEAD, predictions_frame

    gray = read_grayscale(HC18_HEAD)
    plain = predictor.predict_file(HC18_HEAD)
    assert plain.head.found and plain.head.confidence > 0.8 and not plain.withheld
    assert plain.head_circumference_px == pytest.approx(plain.head.ellipse.circumference)
    assert plain.head_circumference_mm is None  # a JPEG says nothing of its pixel size
    assert plain.head_outline.shape == (*gray.shape, 3) and not np.array_equal(plain.head_outline[..., 1], gray)
    spaced = write_dicom(tmp_path / "spaced.dcm", gray.astype(np.uint16), PixelSpacing=[0.2, 0.2])
    region = pydicom.Dataset()
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.02
    calibrated = write_dicom(tmp_path / "region.dcm", gray.astype(np.uint16), SequenceOfUltrasoundRegions=[region])
    for path in (spaced, calibrated):
        result = predictor.predict_file(path, heatmap=False)
        assert result.head_circumference_mm == pytest.approx(0.2 * result.head_circumference_px, rel=1e-3), path
    malformed = write_dicom(tmp_path / "one_value.dcm", gray.astype(np.uint16), PixelSpacing=0.2)
    result = predictor.predict_file(malformed, heatmap=False)  # no calibration: the measure stays in pixels
    assert result.error is None and result.head_circumference_mm is None and result.head_circumference_px
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((120, 160), np.uint8)).save(black)
    frame = predictions_frame([plain, predictor.predict_file(black, heatmap=False)])
    assert frame["predicted"].iloc[0] == plain.label and frame["head_found"].tolist() == [True, False]
    assert pd.isna(frame["predicted"].iloc[1]) and NO_HEAD in frame["withheld"].iloc[1]
    assert "a flat image" in frame["head_reason"].iloc[1]
    assert Predictor(predictor.path, heads=False).predict_file(black, heatmap=False).head is None


def test_colour_photographs_and_bad_files_are_flagged_not_answered(predictor, tmp_path):
    photo = tmp_path / "holiday.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(photo)
    result = predictor.predict_file(photo, heatmap=False)
    assert any("colour image" in w for w in result.warnings)
    assert not result.head.framed and result.head.reason.startswith("a colour image")  # no head looked for
    assert any("No fetal head found: a colour image" in reason for reason in result.withheld)
    bad = bad_files(tmp_path / "bad")
    results = predictor.predict_files([REAL[0], *bad.values(), REAL[1]], heatmap=False)
    assert results[0].error is None and results[-1].error is None  # the good ones are still predicted
    errors = {kind: r.error for kind, r in zip(bad, results[1:-1])}
    assert "not a readable image" in errors["not an image"] and "notes.jpg" in errors["not an image"]
    assert "not a readable image" in errors["truncated"]
    assert "empty file" in errors["empty"]
    assert "larger than the 67108864 pixel limit" in errors["enormous"]


def test_onnx_export_matches_pytorch_and_predicts_alone(predictor, trained_checkpoint, onnx_export, tmp_path):
    import onnx

    onnx_path = onnx_export
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["model.onnx"]  # one file: no external data
    graph = onnx.load(str(onnx_path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch dimension is symbolic
    onnx_predictor = Predictor(onnx_path)
    assert onnx_predictor.card["class_names"] == predictor.class_names
    batch = torch.cat([predictor.tensor(read_grayscale(p)) for p in REAL])
    for size in (1, 3, len(REAL)):  # any batch size, not only the example's
        part = batch[:size]
        difference = np.abs(onnx_predictor.probabilities(part) - predictor.probabilities(part)).max()
        assert difference < 1e-4, size
    with pytest.raises(ValueError, match="opset=17.*18 or newer"):
        export(trained_checkpoint, "onnx", tmp_path / "old.onnx", opset=17)
    result = onnx_predictor.predict_file(REAL[0])
    assert result.label == predictor.predict_file(REAL[0], heatmap=False).label
    assert result.heatmap is None and any("needs the PyTorch checkpoint" in w for w in result.warnings)


def test_torchscript_export_matches_pytorch(predictor, trained_checkpoint, tmp_path):
    path = export(trained_checkpoint, "torchscript", tmp_path / "model.pt")
    extra = {"fetalbrain.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["fetalbrain.json"])["class_names"] == predictor.class_names
    batch = torch.cat([predictor.tensor(read_grayscale(p)) for p in REAL[:4]])
    with torch.no_grad():
        assert torch.allclose(scripted(batch), torch.as_tensor(predictor.logits(batch)), atol=1e-4)
    with pytest.raises(ValueError, match="format='tflite'"):
        export(trained_checkpoint, "tflite")


def test_predict_cli_writes_a_row_per_file_and_lists_failures(trained_checkpoint, onnx_export, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in REAL[:3]:
        (inputs / path.name).write_bytes(path.read_bytes())
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    for model in (trained_checkpoint, onnx_export):
        out = tmp_path / f"preds_{model.suffix[1:]}.csv"
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose(
                "predict",
                overrides=[f"ckpt={model}", f"inputs={inputs}", f"out={out}", f"heatmaps={tmp_path / 'heatmaps'}"],
            )
        predict(cfg)
        frame = pd.read_csv(out)
        assert len(frame) == 4 and frame["error"].notna().sum() == 1
        assert "broken.jpg" in frame.loc[frame["error"].notna(), "error"].iloc[0]
        assert frame.filter(like="p_").shape[1] == 16
        assert np.allclose(frame.filter(like="p_").dropna().sum(axis=1), 1, atol=1e-5)
    assert len(list((tmp_path / "heatmaps").glob("*_gradcam.png"))) == 3


def test_export_command_line_and_default_checkpoint(trained_checkpoint, tmp_path):
    out = tmp_path / "cli.pt"  # the command line's wiring; the ONNX export itself is tested in-process above
    printed = run_main("export", f"ckpt={trained_checkpoint}", "format=torchscript", f"out={out}")
    assert out.is_file() and "exported" in printed
    assert latest_checkpoint(trained_checkpoint.parent.parent) == trained_checkpoint
    with pytest.raises(FileNotFoundError, match="no trained run with a checkpoint"):
        latest_checkpoint(tmp_path)


def test_a_changed_checkpoint_is_refused_unless_verification_is_off(trained_checkpoint, tmp_path):
    from fetalbrain.runs.integrity import CheckpointIntegrityError

    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parent.parent, run)
    checkpoint = run / "checkpoints" / trained_checkpoint.name
    assert Predictor(checkpoint).integrity == "verified"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    first = next(iter(state["state_dict"]))
    state["state_dict"][first] = state["state_dict"][first] + 0.01  # a tampered or corrupted weight
    torch.save(state, checkpoint)
    with pytest.raises(CheckpointIntegrityError, match=f"{checkpoint.name}.*verify=false"):
        Predictor(checkpoint)
    with pytest.raises(CheckpointIntegrityError):
        export(checkpoint, "onnx", tmp_path / "model.onnx")
    assert Predictor(checkpoint, verify=False).integrity == "skipped"
