"""Harmonised preprocessing: each step removes its cue and keeps the anatomy, and the whole pipeline (the head frame
and every other step) gives identical tensors in training, predict (checkpoint) and predict (ONNX export)."""

from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from fetalbrain.data.harmonise import IntensityNorm, PadToSquare, RemoveOverlays, Sector, Vignette, sector_mask
from fetalbrain.data.head_finding import SHIPPED_FINDER
from fetalbrain.data.head_frame import SHARED_DECISIONS
from fetalbrain.data.images import read_grayscale
from fetalbrain.data.transforms import preprocessing
from fetalbrain.project import sha256_file
from fetalbrain.training.fit import HEAD_FRAME_FILE
from tests.conftest import DATA, TINY, make_export, train_config

ANATOMY = "data/harmonise=anatomy"


def fan_on_grey_fill(seed: int = 0) -> np.ndarray:
    """A speckled fan-shaped sector (the anatomy) on a flat grey fill, like the export's rotated copies."""
    rng = np.random.default_rng(seed)
    image = np.full((200, 240), 60, np.uint8)
    yy, xx = np.mgrid[:200, :240]
    angle, radius = np.arctan2(xx - 120, yy + 20), np.hypot(xx - 120, yy + 20)
    fan = (np.abs(angle) < 0.6) & (radius > 40) & (radius < 210)
    image[fan] = np.clip(rng.normal(110, 30, fan.sum()), 0, 255).astype(np.uint8)
    image[90:110, 100:140][fan[90:110, 100:140]] = 5  # dark fluid inside the sector: a hole to keep
    return image, fan


def test_sector_is_found_by_texture_and_the_fill_goes():
    image, fan = fan_on_grey_fill()
    mask = sector_mask(image)
    assert (mask & fan).sum() / fan.sum() > 0.95  # the sector, with its dark hole, is kept
    assert (mask & ~fan).sum() / (~fan).sum() < 0.06  # the flat fill is not the sector (bar the hull over the arc)
    masked = Sector(mask=True, crop=False).apply(image)
    assert np.median(masked[~fan & ~mask]) == 0 and masked.shape == image.shape
    cropped = Sector(mask=False, crop=True).apply(image)
    rows, cols = np.flatnonzero(fan.any(axis=1)), np.flatnonzero(fan.any(axis=0))
    assert (
        abs(cropped.shape[0] - (rows[-1] - rows[0] + 1)) <= 4 and abs(cropped.shape[1] - (cols[-1] - cols[0] + 1)) <= 4
    )


def test_a_failed_detection_on_a_dark_real_frame_keeps_the_whole_frame():
    """On this low-gain frame the speckle is too faint: the largest textured region is 1 % of the frame, and a crop to
    it would show no head. Below data.harmonise.sector_min_area the whole frame is kept."""
    dark = read_grayscale(
        DATA / "train" / "Copy-of-encephalocele-4-32a_aug_1_png_jpg.rf.fc2f9c8e7091f5f3168757e830001e45.jpg"
    )
    assert sector_mask(dark, min_area=0.0).mean() < 0.05
    assert sector_mask(dark).all()
    assert Sector(mask=True, crop=True).apply(dark).shape == dark.shape
    ordinary = read_grayscale(DATA.parent / "hc18-normal-heads" / "images" / "300_HC.jpg")
    assert 0.25 < sector_mask(ordinary).mean() < 0.95  # an ordinary fan: found, and smaller than the frame


def test_a_flat_image_keeps_everything():
    assert sector_mask(np.full((50, 60), 30, np.uint8)).all()


def test_small_bright_marks_go_and_bone_echoes_stay():
    image, _ = fan_on_grey_fill()
    marked = image.copy()
    marked[60:75, 119:121] = 255  # a caliper cross
    marked[66:68, 112:128] = 255
    marked[150:170, 60:180] = 250  # a large bright echo (bone)
    cleaned = RemoveOverlays(level=245, max_area=0.002).apply(marked)
    assert cleaned[60:75, 119:121].max() < 200 and cleaned[66:68, 112:128].max() < 200
    assert (cleaned[150:170, 60:180] == 250).all()
    assert np.array_equal(cleaned[:50], marked[:50])  # far from the marks nothing changes


def test_intensity_vignette_and_letterbox():
    image = np.zeros((40, 80), np.uint8)
    image[:, 20:60] = np.linspace(50, 150, 40 * 40).reshape(40, 40).astype(np.uint8)
    stretched = IntensityNorm("percentile").apply(image)
    assert stretched[:, :20].max() == 0 and stretched.max() == 255 and stretched[:, 20:60].min() == 0
    equalised = IntensityNorm("equalise").apply(image)
    assert equalised[:, :20].max() == 0 and equalised.max() == 255
    window = Vignette(0.8).apply(np.full((100, 100), 200, np.uint8))
    assert window[50, 50] == 200 and window[0, 0] == 0 and window[50, 5] == 0 and window[50, 15] == 200
    square = PadToSquare()(image=image)["image"]
    assert square.shape == (80, 80) and square[:20].max() == 0 and np.array_equal(square[20:60], image)
    # the pipeline's letterbox keeps the aspect ratio, a stretch does not
    content = A.Compose(preprocessing(32, harmonise={"letterbox": True}))(image=np.full((40, 80), 9, np.uint8))["image"]
    assert content.shape == (32, 32) and content[:7].max() == 0 and content[12:20].min() == 9


def test_bad_harmonise_settings_name_the_key():
    with pytest.raises(ValueError, match="data.harmonise: unknown key"):
        preprocessing(32, harmonise={"crop_to_secter": True})
    with pytest.raises(ValueError, match="data.harmonise.intensity"):
        preprocessing(32, harmonise={"intensity": "zscore"})
    with pytest.raises(ValueError, match="data.harmonise.vignette"):
        preprocessing(32, harmonise={"vignette": 3})
    with pytest.raises(ValueError, match="data.harmonise.vignette=True"):
        preprocessing(32, harmonise={"vignette": True})
    with pytest.raises(ValueError, match="data.harmonise.crop_to_sector='no': true or false"):
        preprocessing(32, harmonise={"crop_to_sector": "no"})
    with pytest.raises(ValueError, match="data.harmonise.sector_min_area"):
        preprocessing(32, harmonise={"sector_min_area": 1.5})


@pytest.fixture(scope="module")
def harmonised_run(tmp_path_factory):
    from fetalbrain.training.fit import train

    run_dir = tmp_path_factory.mktemp("harmonised")
    export = make_export(tmp_path_factory.mktemp("export"))  # a few dozen images: the finder runs on each once
    head = ["data.harmonise.head_frame=true", f"data.head_cache={run_dir / 'cache'}"]
    overrides = [*TINY, "model=cnn", ANATOMY, *head, f"data.root={export}", "data/split=official"]
    with train_config(run_dir, overrides) as cfg:
        summary, objects = train(cfg)
    return Path(summary["run"]["best_checkpoint"]), objects["datamodule"], summary


def test_the_harmonised_pipeline_gives_identical_tensors_in_training_predict_and_onnx(harmonised_run, tmp_path):
    from fetalbrain.export import export
    from fetalbrain.inference.predictor import Predictor

    checkpoint, datamodule, summary = harmonised_run
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]["preprocessing"]
    assert stored["harmonise"] == dict(datamodule.hparams.harmonise) and stored["harmonise"]["crop_to_sector"] is True
    assert stored["harmonise"]["head_finder_sha256"] == sha256_file(SHIPPED_FINDER)  # the finder it was framed by
    framed = pd.read_csv(checkpoint.parent.parent / HEAD_FRAME_FILE)
    assert len(framed) == len(datamodule.table) and framed["framed"].mean() > 0.6
    assert (framed.loc[~framed["framed"], "reason"].str.len() > 0).all()  # every whole frame kept says why
    card = (checkpoint.parent.parent / "model_card.md").read_text()
    assert "### Head frame (`data/harmonise=head`)" in card
    assert f"{int(framed['framed'].sum())} of {len(framed)} images framed on their fetal head" in card
    config = OmegaConf.load(checkpoint.parent.parent / "config.yaml")  # what a resumed run checks its finder against
    assert config.data.harmonise.head_finder_sha256 == sha256_file(SHIPPED_FINDER)
    assert set(summary["data"]["head_frame"]["found_by_class"]) == set(datamodule.table["label"])
    by_class = summary["data"]["head_frame"]["framed_by_class"]
    assert set(by_class) == set(datamodule.table["label"]) and all(0 <= v <= 1 for v in by_class.values())
    SHARED_DECISIONS.clear()  # the predictors find each head themselves, as in another process
    predictors = [Predictor(checkpoint, heatmaps=False), Predictor(export(checkpoint, "onnx", tmp_path / "m.onnx"))]
    chosen = {}  # (part, index) of a framed image and of a whole frame kept, from the parts that are not augmented
    for part in ("val", "test"):
        dataset = datamodule.datasets[part]
        for index, is_framed in enumerate(framed.set_index("path").loc[dataset.paths, "framed"]):
            chosen.setdefault(bool(is_framed), (dataset, index))
    assert set(chosen) == {True, False}, "the export's val and test parts hold framed heads and whole frames kept"
    for dataset, index in chosen.values():
        trained_on = dataset[index][0].unsqueeze(0)
        gray = read_grayscale(dataset.paths[index])
        for predictor in predictors:
            assert torch.equal(predictor.tensor(gray), trained_on)
    from fetalbrain.app import describe

    steps = "framed on the fetal head (margin 0.15), outside the sector blanked, cropped to the sector"
    assert f"harmonised: {steps}, elliptical window 0.8" in describe(predictors[0])
    harmonised = datamodule.preprocessed_images("val")[0][0]
    first = datamodule.datasets["val"].paths[0]
    plain = A.Compose(preprocessing(datamodule.hparams.image_size))(image=read_grayscale(first))["image"]
    assert not np.array_equal(harmonised, plain)  # the steps did something
