"""Transforms and the DataModule on real images: shapes, normalisation, denoising, bad files."""

import albumentations as A
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fetalbrain.data.datamodule import FetalBrainDataModule
from fetalbrain.data.images import ImageReadError, read_grayscale
from fetalbrain.data.readers import DatasetError
from fetalbrain.data.transforms import Denoise, build_pipeline, preprocessing
from tests.conftest import CONF, DATA

IMAGE = read_grayscale(next(DATA.glob("train/*.jpg")))


def test_eval_pipeline_is_deterministic_and_normalised():
    pipeline = build_pipeline(preprocessing(64), [], mean=IMAGE.mean() / 255, std=IMAGE.std() / 255)
    first, second = pipeline(image=IMAGE)["image"], pipeline(image=IMAGE)["image"]
    assert first.shape == (1, 64, 64) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert abs(first.mean().item()) < 0.1 and abs(first.std().item() - 1) < 0.15


@pytest.mark.parametrize("option", ["default", "strong", "none"])
def test_every_augmentation_preset_runs_on_a_real_image(option):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"data/transforms={option}", "data.image_size=64"])
    augment = [instantiate(t) for t in cfg.data.transforms.augment]
    pipeline = build_pipeline(preprocessing(64), augment, 0.25, 0.2)
    outputs = [pipeline(image=IMAGE)["image"] for _ in range(4)]
    assert all(o.shape == (1, 64, 64) for o in outputs)
    if option != "none":
        assert any(not torch.equal(outputs[0], o) for o in outputs[1:]), "augmentation never changed the image"


@pytest.mark.parametrize("method", ["median", "bilateral", "wiener"])
def test_denoising_reduces_speckle_and_keeps_the_image(method):
    rng = np.random.default_rng(0)
    clean = np.full((64, 64), 120, dtype=np.uint8)
    noisy = np.clip(clean * rng.gamma(16.0, 1 / 16, clean.shape), 0, 255).astype(np.uint8)
    out = Denoise(method, 5)(image=noisy)["image"]
    assert out.shape == noisy.shape and out.dtype == np.uint8
    assert out.std() < 0.6 * noisy.std()


def test_clahe_and_bad_denoise_options():
    steps = preprocessing(32, denoise="median", clahe=True)
    assert [type(s) for s in steps] == [Denoise, A.CLAHE, A.Resize]
    with pytest.raises(ValueError, match="data.denoise='gaussian'"):
        preprocessing(32, denoise="gaussian")
    with pytest.raises(ValueError, match="data.denoise_kernel=4"):
        Denoise("median", 4)


def test_datamodule_batches_cache_and_class_counts(small_export):
    dm = FetalBrainDataModule(str(small_export), splitter="official", image_size=32, batch_size=4, num_workers=0)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 1, 32, 32) and targets.dtype == torch.int64
    assert dm.datasets["train"].images is not None  # decoded once, kept in memory
    assert dm.train_class_counts().sum() == len(dm.datasets["train"])
    assert 0 < dm.mean < 1 and 0 < dm.std < 1
    three = FetalBrainDataModule(
        str(small_export),
        splitter="official",
        image_size=32,
        channels=3,
        num_workers=0,
        cache=False,
        sampler="weighted",
    )
    three.setup()
    batch = next(iter(three.train_dataloader()))[0]
    assert batch.shape[1] == 3 and torch.equal(batch[:, 0], batch[:, 2])
    assert three.datasets["train"].images is None


def _corrupt_one(export):
    victim = sorted((export / "train").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated JPEG
    return victim


def test_corrupt_image_fails_setup_naming_the_file(small_export):
    victim = _corrupt_one(small_export)
    dm = FetalBrainDataModule(str(small_export), splitter="official", num_workers=0)
    with pytest.raises(DatasetError, match=f"{victim.name}.*data.on_bad_image=skip"):
        dm.setup()


def test_skip_bad_images_lists_them_and_keeps_the_rest(small_export):
    victim = _corrupt_one(small_export)
    (small_export / "valid").joinpath(sorted((small_export / "valid").glob("*.jpg"))[0].name).write_bytes(b"")
    dm = FetalBrainDataModule(str(small_export), splitter="official", num_workers=0, on_bad_image="skip")
    dm.setup()
    skipped = {s["path"]: s["error"] for s in dm.data_summary()["skipped_images"]}
    assert len(skipped) == 2 and str(victim) in skipped
    assert any("empty file" in e for e in skipped.values())
    assert victim.exists()  # nothing is deleted
    assert str(victim) not in set(dm.table["path"])


def test_image_reader_handles_modes_and_refuses_non_images(tmp_path):
    from PIL import Image

    sixteen = tmp_path / "scan16.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(sixteen)
    array = read_grayscale(sixteen)
    assert array.dtype == np.uint8 and array.min() == 0 and array.max() == 255
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (200, 200, 200, 255)).save(rgba)
    assert read_grayscale(rgba).shape == (8, 8)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.jpg: not a readable image"):
        read_grayscale(text)


def test_bad_datamodule_options_name_the_key():
    with pytest.raises(ValueError, match="data.channels=2"):
        FetalBrainDataModule(str(DATA), channels=2)
    with pytest.raises(ValueError, match="data.sampler='oversample'"):
        FetalBrainDataModule(str(DATA), sampler="oversample")
