"""The synthetic-data workflow end to end on a small real export: train the WGAN-GP through the
training entry point, generate, mix into a classifier's training part, and measure quality."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from PIL import Image

from fetalbrain.data.synthetic import SyntheticLeakError
from fetalbrain.generate import generate
from fetalbrain.train import train
from tests.conftest import TINY, make_export, run_cli, train_config

GAN = [
    *TINY,
    "model=wgan_gp",
    "data.image_size=32",
    "data.num_folds=3",
    "model.generator_width=8",
    "model.critic_width=8",
    "model.samples_per_class=2",
    "model.n_critic=2",
    "trainer.limit_train_batches=4",
]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("synthetic") / "export", per_class=3)


@pytest.fixture(scope="module")
def generator_run(small_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gan")
    with train_config(run_dir, [*GAN, f"data.root={small_root}", "data.fold=0"]) as cfg:
        summary, objects = train(cfg)
    return run_dir, summary, objects["datamodule"]


@pytest.fixture(scope="module")
def generated(generator_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated") / "fold0"
    generate(Path(generator_run[1]["run"]["best_checkpoint"]), out, num=4, seed=3)
    return out


def datamodule(root, synthetic, mix, fold=0, ratio=0.5):
    with train_config(
        Path("/tmp/unused"), [*TINY, f"data.root={root}", "data.num_folds=3", f"data.fold={fold}"]
    ) as cfg:
        cfg.data.synthetic, cfg.data.mix, cfg.data.synthetic_ratio = str(synthetic), mix, ratio
        dm = instantiate(cfg.data)
    dm.setup("fit")
    return dm


def test_the_generator_trains_through_the_training_entry_point(generator_run):
    run_dir, summary, dm = generator_run
    assert summary["run"]["task"] == "generation" and summary["run"]["model"] == "wgan_gp"
    assert summary["metrics"]["gan/critic_steps"] == 4 and summary["metrics"]["gan/generator_steps"] == 2
    for name in ("samples.png", "samples/epoch_000.png", "train_images.csv", "model_card.md", "model_card.json"):
        assert (run_dir / name).is_file(), name
    seen = pd.read_csv(run_dir / "train_images.csv")
    assert set(seen["path"]) == set(dm.part_table("train")["path"])  # the training part, nothing else
    assert not set(seen["path"]) & (set(dm.part_table("test")["path"]) | set(dm.part_table("val")["path"]))
    assert any("single case" in note for note in summary["notes"])  # five classes have one case
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["task"] == "generation" and "last.ckpt" in card["checkpoints"]


def test_generate_is_deterministic_and_writes_a_manifest(generator_run, generated, tmp_path):
    checkpoint = Path(generator_run[1]["run"]["best_checkpoint"])
    manifest = pd.read_csv(generated / "manifest.csv")
    assert list(manifest.columns) == ["file", "class", "seed", "index"] and len(manifest) == 4 * 16
    info = json.loads((generated / "manifest.json").read_text())
    assert len(info["generator_sha256"]) == 64 and info["split"]["splitter"] == "grouped"
    again = generate(checkpoint, tmp_path / "again", num=4, classes="Mild ventriculomegaly", seed=3)
    other = generate(checkpoint, tmp_path / "other", num=4, classes="mild-ventriculomegaly", seed=4)
    pixels = lambda folder, file: np.asarray(Image.open(folder / file))  # noqa: E731
    first = manifest[manifest["class"] == "mild-ventriculomegaly"]
    assert pixels(generated, first["file"].iloc[0]).shape == (32, 32)
    for a, b in zip(first["file"], again["file"]):  # class=X gives the X rows of class=all
        assert np.array_equal(pixels(generated, a), pixels(tmp_path / "again", b))
    assert not np.array_equal(
        pixels(tmp_path / "again", again["file"][0]), pixels(tmp_path / "other", other["file"][0])
    )
    with pytest.raises(ValueError, match="class='no-such-class' is not a class.*normal"):
        generate(checkpoint, tmp_path / "bad", classes="no-such-class")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        generate(checkpoint, tmp_path / "again", num=1)


def test_generate_refuses_a_classifier_checkpoint(trained_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="not a WGAN-GP checkpoint"):
        generate(trained_checkpoint, tmp_path / "out", num=1)


def test_generate_command_line(generator_run, tmp_path):
    checkpoint = generator_run[1]["run"]["best_checkpoint"]
    result = run_cli("generate", f"ckpt={checkpoint}", "num=2", "class=normal", f"out={tmp_path / 'cli'}", "seed=1")
    assert "2 images" in result.stdout and len(list((tmp_path / "cli" / "normal").glob("*.png"))) == 2


@pytest.mark.parametrize("mix", ["hybrid", "synthetic", "oversample"])
def test_synthetic_images_enter_only_the_training_part(small_root, generated, mix):
    dm = datamodule(small_root, generated, mix)
    synthetic = str(generated)
    for part in ("val", "test"):
        assert not any(p.startswith(synthetic) for p in dm.datasets[part].paths), part
    train = dm.part_table("train")
    added = train[train["path"].str.startswith(synthetic)]
    real = train[~train["path"].str.startswith(synthetic)]
    assert dm.synthetic["mix"] == mix and sum(dm.synthetic["added"].values()) == len(added) > 0
    if mix == "synthetic":
        assert real.empty
    if mix == "hybrid":  # per class: as many synthetic as real, up to the 4 generated
        counts = real["label"].value_counts()
        for label, n in added["label"].value_counts().items():
            assert n == min(counts.get(label, 0), 4)
    if mix == "oversample":
        counts = train["label"].value_counts()
        largest = real["label"].value_counts().max()
        assert all(counts[label] == min(largest, real["label"].eq(label).sum() + 4) for label in counts.index)


def test_a_generator_that_saw_this_test_part_is_refused(small_root, generated):
    with pytest.raises(SyntheticLeakError, match="trained on .* test image"):
        datamodule(small_root, generated, "hybrid", fold=1)  # the generator trained on fold 0's train part


def test_hybrid_run_records_the_mix_and_generator(small_root, generated, tmp_path):
    overrides = [*TINY, "model=cnn", f"data.root={small_root}", "data.num_folds=3", f"data.synthetic={generated}"]
    with train_config(tmp_path, [*overrides, "data.mix=hybrid"]) as cfg:
        summary, _ = train(cfg)
    recorded = json.loads((tmp_path / "metrics.json").read_text())["data"]["synthetic"]
    manifest = json.loads((generated / "manifest.json").read_text())
    assert recorded["mix"] == "hybrid" and recorded["ratio"] == 0.5
    assert recorded["generator_sha256"] == manifest["generator_sha256"]
    assert summary["run"]["task"] == "classification"


def test_quality_report_of_a_generated_folder(generated, trained_checkpoint, tmp_path):
    out = tmp_path / "quality"
    run_cli(
        "synth_quality",
        f"synthetic={generated}",
        f"classifier={trained_checkpoint}",
        f"out={out}",
        "min_images=4",
        "kid_subsets=5",
    )
    result = json.loads((out / "quality.json").read_text())
    metrics = result["metrics"]
    assert metrics["quality/fid"] > 0 and 0 <= metrics["quality/precision"] <= 1
    assert 0 <= metrics["memorisation/pixels_fraction_below"] <= 1
    assert "quality/reference_fid_train_vs_val" in metrics
    for name in ("quality.md", "per_class_quality.csv", "closest_pairs_pixels.png", "closest_pairs_features.png"):
        assert (out / name).is_file(), name


def test_a_copied_generated_folder_without_its_manifest_is_refused(small_root, generated, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(generated, broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not a generated folder"):
        datamodule(small_root, broken, "hybrid")
