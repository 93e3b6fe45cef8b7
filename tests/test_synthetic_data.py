"""The synthetic-data workflow end to end on a small real export: train the WGAN-GP through the
training entry point, generate, mix into a classifier's training part, and measure quality."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from fetalbrain.data.images import read_grayscale
from fetalbrain.data.synthetic import SyntheticLeakError
from fetalbrain.generate import generate
from fetalbrain.synth_quality import evaluate_quality
from fetalbrain.training.fit import train
from tests.conftest import CONF, TINY, make_export, run_main, train_config

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
def judge(small_root, tmp_path_factory) -> Path:
    """A real-only classifier of the generator's split with its OOD detector: the quality curve's judge."""
    run_dir = tmp_path_factory.mktemp("judge")
    overrides = [*TINY, "model=cnn", f"data.root={small_root}", "data.num_folds=3", "evaluation.ood.enabled=true"]
    with train_config(run_dir, overrides) as cfg:
        summary, _ = train(cfg)
    return Path(summary["run"]["best_checkpoint"])


@pytest.fixture(scope="module")
def generator_run(small_root, judge, tmp_path_factory):
    """The generator of these tests, DiffAugment on, scored by the judge after every generator step."""
    run_dir = tmp_path_factory.mktemp("gan")
    quality = [
        "callbacks=generator",
        "callbacks.progress_bar=null",
        f"callbacks.generator_quality.classifier={judge}",
        "callbacks.generator_quality.every_n_generator_steps=1",
        "callbacks.generator_quality.kid_subsets=5",
        "model.diffaugment=[translation,cutout,color]",
    ]
    with train_config(run_dir, [*GAN, *quality, f"data.root={small_root}", "data.fold=0"]) as cfg:
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
        cfg.data.synthetic, cfg.data.mix, cfg.data.synthetic_ratio = str(synthetic) if synthetic else None, mix, ratio
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


def test_the_quality_curve_scores_every_point_against_the_real_scale(generator_run):
    run_dir, summary, dm = generator_run
    curve = pd.read_csv(run_dir / "quality_curve.csv")
    assert list(curve["generator_step"]) == [0, 1, 2]  # the untrained generator, then every step
    assert curve["cpu_hours"].is_monotonic_increasing and (curve["cpu_hours"] > 0).iloc[1:].all()
    assert (curve["gpu_hours"] == 0).all() and (curve["wall_hours"] > 0).iloc[1:].all()
    for column in ("precision", "recall", "ood_acceptance", "cas", "memorised_pixels", "memorised_features"):
        assert curve[column].between(0, 1).all(), column
    assert (curve["fid"] > 0).all() and curve["reference_fid"].nunique() == 1
    assert curve["reference_memorised_pixels"].iloc[0] == 0.05
    # The reference is real validation through the same judge: its CAS is the judge's own validation accuracy.
    assert 0 <= curve["reference_cas"].iloc[0] <= 1 and 0 < curve["reference_ood_acceptance"].iloc[0] <= 1
    assert (run_dir / "quality_curve.png").is_file()
    assert summary["metrics"]["quality/generator_step"] == 2 and "quality/fid" in summary["metrics"]
    assert any(note.startswith("Quality at generator step 2") for note in summary["notes"])
    assert summary["metrics"]["gan/generator_steps"] == 2


def test_a_resumed_generator_continues_its_curve_and_its_clocks_from_the_checkpoint(
    small_root, judge, generator_run, tmp_path
):
    from types import SimpleNamespace

    from fetalbrain.training.generator_quality import GeneratorQuality

    shutil.copy(generator_run[0] / "quality_curve.csv", tmp_path / "quality_curve.csv")  # points at steps 0, 1, 2
    dm = datamodule(small_root, None, "real")
    trainer = SimpleNamespace(is_global_zero=True, datamodule=dm, default_root_dir=tmp_path)
    gan = SimpleNamespace(hparams=SimpleNamespace(class_names=dm.class_names, latent_dim=128), generator_steps=1)
    callback = GeneratorQuality(classifier=str(judge))
    assert callback.state_dict() == {}  # nothing measured yet: nothing to save
    callback.load_state_dict({"cpu_seconds": 7200.0, "wall_seconds": 3600.0})  # as Lightning does on resume
    callback.on_fit_start(trainer, gan)
    assert [r["generator_step"] for r in callback.rows] == [0, 1]  # step 2 came after the checkpoint: redone
    state = callback.state_dict()
    assert 7200 <= state["cpu_seconds"] < 7200 + 600 and 3600 <= state["wall_seconds"] < 3600 + 600


def test_the_quality_judge_must_be_a_real_only_classifier_of_the_same_split(small_root, judge, tmp_path):
    from types import SimpleNamespace

    from fetalbrain.training.generator_quality import GeneratorQuality

    other_fold = datamodule(small_root, None, "real", fold=1)
    trainer = SimpleNamespace(is_global_zero=True, datamodule=other_fold, default_root_dir=tmp_path)
    gan = SimpleNamespace(hparams=SimpleNamespace(class_names=other_fold.class_names, latent_dim=8))
    with pytest.raises(ValueError, match=r"real-only classifier of the generator's split.*data.fold: 0 vs 1"):
        GeneratorQuality(classifier=str(judge)).on_fit_start(trainer, gan)
    with pytest.raises(FileNotFoundError, match="callbacks.generator_quality.classifier=.*no such checkpoint"):
        GeneratorQuality(classifier=str(tmp_path / "missing.ckpt")).on_fit_start(trainer, gan)
    with pytest.raises(ValueError, match="every_n_generator_steps=0"):
        GeneratorQuality(classifier=str(judge), every_n_generator_steps=0)


def test_abnormal_shares_the_images_by_the_training_counts_with_largest_remainders():
    from fetalbrain.generate import images_per_class

    seen = pd.Series(["a"] * 7 + ["b"] * 2 + ["c"] + ["normal"] * 30)
    assert images_per_class("abnormal", ["a", "b", "c"], 4, seen) == {"a": 3, "b": 1}  # 2.8, 0.8, 0.4
    assert images_per_class("Abnormal", ["a", "b", "c"], 10, seen) == {"a": 7, "b": 2, "c": 1}
    assert images_per_class("b", ["b"], 5, seen) == {"b": 5}
    with pytest.raises(ValueError, match="class=abnormal: the generator's training part holds no abnormal"):
        images_per_class("abnormal", ["a"], 3, pd.Series(["normal"]))


def test_abnormal_draws_the_anomaly_classes_in_their_training_proportions(generator_run, generated, tmp_path):
    checkpoint = Path(generator_run[1]["run"]["best_checkpoint"])
    manifest = generate(checkpoint, tmp_path / "abnormal", num=20, classes="abnormal", seed=3)
    seen = pd.read_csv(generator_run[0] / "train_images.csv")["label"]
    abnormal = seen[seen != "normal"].value_counts(normalize=True)
    counts = manifest["class"].value_counts()
    assert len(manifest) == 20 and "normal" not in counts
    for label, share in abnormal.items():  # largest remainders: within one image of the exact share
        assert abs(counts.get(label, 0) - 20 * share) < 1, label
    info = json.loads((tmp_path / "abnormal" / "manifest.json").read_text())
    assert info["requested"] == "abnormal" and info["images_per_class"] == counts.to_dict()
    all_classes = pd.read_csv(generated / "manifest.csv")
    label = counts.index[0]  # each class draws from its own seed: the first images of class=all's rows
    for a, b in zip(manifest[manifest["class"] == label]["file"], all_classes[all_classes["class"] == label]["file"]):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "abnormal" / a)), np.asarray(Image.open(generated / b)))


def test_generate_refuses_a_classifier_checkpoint(judge, tmp_path):
    with pytest.raises(ValueError, match="not a WGAN-GP checkpoint"):
        generate(judge, tmp_path / "out", num=1)


def test_generate_command_line(generator_run, tmp_path):
    checkpoint = generator_run[1]["run"]["best_checkpoint"]
    printed = run_main("generate", f"ckpt={checkpoint}", "num=2", "class=normal", f"out={tmp_path / 'cli'}", "seed=1")
    assert "2 images" in printed and len(list((tmp_path / "cli" / "normal").glob("*.png"))) == 2


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
            assert dm.synthetic["synthetic_share_per_class"][label] == pytest.approx(n / (n + counts[label]), abs=1e-4)
    if mix == "oversample":
        counts = train["label"].value_counts()
        largest = real["label"].value_counts().max()
        assert all(counts[label] == min(largest, real["label"].eq(label).sum() + 4) for label in counts.index)


def test_a_generator_that_saw_this_test_part_is_refused(small_root, generated):
    with pytest.raises(SyntheticLeakError, match="trained on .* test image"):
        datamodule(small_root, generated, "hybrid", fold=1)  # the generator trained on fold 0's train part


def copy_with_seen(generated: Path, folder: Path, seen: pd.DataFrame) -> Path:
    shutil.copytree(generated, folder)
    seen.to_csv(folder / "generator_train_images.csv", index=False)
    return folder


@pytest.mark.parametrize("part", ["test", "val"])
def test_a_generator_that_saw_only_a_case_or_only_validation_is_refused(small_root, generated, tmp_path, part):
    dm = datamodule(small_root, generated, "real")
    row = dm.part_table(part).iloc[[0]][["path", "label", "case", "group"]]
    if part == "test":  # another frame of the case, under another file name: the case alone must be caught
        row = row.assign(path="elsewhere/another-frame.jpg")
    folder = copy_with_seen(generated, tmp_path / part, row)
    with pytest.raises(
        SyntheticLeakError,
        match=f"trained on 0 {part} image\\(s\\) and 1 {part} case" if part == "test" else f"1 {part} image",
    ):
        datamodule(small_root, folder, "hybrid")


def test_a_generator_refuses_synthetic_training_data(small_root, generated, tmp_path):
    with train_config(
        tmp_path, [*GAN, f"data.root={small_root}", f"data.synthetic={generated}", "data.mix=hybrid"]
    ) as cfg:
        with pytest.raises(ValueError, match="trains on real images only"):
            train(cfg)


def test_a_diverged_generator_keeps_its_record_of_seen_images(small_root, tmp_path):
    from fetalbrain.models.gan import GANDivergedError

    with train_config(tmp_path, [*GAN, f"data.root={small_root}", "model.max_critic_loss=1e-9"]) as cfg:
        with pytest.raises(GANDivergedError, match="diverged at epoch 0"):
            train(cfg)
    assert len(pd.read_csv(tmp_path / "train_images.csv")) > 0


def test_a_changed_generator_checkpoint_is_refused(generator_run, tmp_path):
    from fetalbrain.runs.integrity import CheckpointIntegrityError

    run = tmp_path / "run"
    shutil.copytree(generator_run[0], run)
    checkpoint = run / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    key = next(k for k in state["state_dict"] if k.startswith("generator."))
    state["state_dict"][key] += 0.5
    torch.save(state, checkpoint)
    with pytest.raises(CheckpointIntegrityError, match="last.ckpt"):
        generate(checkpoint, tmp_path / "out", num=1)
    assert len(generate(checkpoint, tmp_path / "out", num=1, verify=False)) == 16


def test_classifier_loaders_refuse_a_generator_checkpoint(generator_run):
    from fetalbrain.models.classifier import load_classifier

    with pytest.raises(ValueError, match="WGAN-GP generator checkpoint"):
        load_classifier(generator_run[1]["run"]["best_checkpoint"])


def test_hybrid_run_records_the_mix_and_generator(small_root, generated, tmp_path):
    overrides = [*TINY, "model=cnn", f"data.root={small_root}", "data.num_folds=3", f"data.synthetic={generated}"]
    with train_config(tmp_path, [*overrides, "data.mix=hybrid"]) as cfg:
        summary, _ = train(cfg)
    recorded = json.loads((tmp_path / "metrics.json").read_text())["data"]["synthetic"]
    manifest = json.loads((generated / "manifest.json").read_text())
    assert recorded["mix"] == "hybrid" and recorded["ratio"] == 0.5
    assert recorded["generator_sha256"] == manifest["generator_sha256"]
    assert summary["run"]["task"] == "classification"


def copies_of_training_images(generated: Path, seen_run: Path, folder: Path) -> Path:
    """A 'generator' that copies its training images: the same folder, each PNG replaced by a real one."""
    shutil.copytree(generated, folder)
    seen = pd.read_csv(seen_run / "train_images.csv")
    manifest = pd.read_csv(folder / "manifest.csv")
    for i, row in manifest.iterrows():
        same_class = seen[seen["label"] == row["class"]]
        source = (same_class if len(same_class) else seen).iloc[i % max(len(same_class), 1)]["path"]
        image = cv2.resize(read_grayscale(source), (32, 32), interpolation=cv2.INTER_AREA)
        Image.fromarray(image).save(folder / row["file"])
    return folder


def test_quality_report_flags_a_generator_that_copies(generator_run, generated, judge, tmp_path):
    options = [f"classifier={judge}", "min_images=4", "kid_subsets=5", "repeats=2"]
    copies = copies_of_training_images(generated, generator_run[0], tmp_path / "copies")
    with initialize_config_dir(str(CONF), version_base="1.3"):  # in-process: the CLI is tested by generate's test
        for folder, out in ((generated, "gan"), (copies, "copied")):
            evaluate_quality(compose("synth_quality", [f"synthetic={folder}", f"out={tmp_path / out}", *options]))
    gan, copied = (json.loads((tmp_path / n / "quality.json").read_text())["metrics"] for n in ("gan", "copied"))
    assert copied["memorisation/pixels_fraction_below"] > 0.9 > gan["memorisation/pixels_fraction_below"]
    assert copied["quality/fid"] < gan["quality/fid"]  # copies look like the training images; a 4-batch GAN does not
    assert 0 <= gan["quality/precision"] <= 1 and "quality/reference_fid_train_vs_val" in gan
    for name in ("quality.md", "per_class_quality.csv", "closest_pairs_pixels.png", "closest_pairs_features.png"):
        assert (tmp_path / "gan" / name).is_file(), name


def test_a_copied_generated_folder_without_its_manifest_is_refused(small_root, generated, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(generated, broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not a generated folder"):
        datamodule(small_root, broken, "hybrid")
