"""The reproduction presets (conf/experiment/reproduce_*.yaml) compose to the published protocol and train;
on the official split the report holds the 1-NN pixel baseline, the leak it sees, and the hierarchical view."""

import math

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fetalbrain.evaluation.baselines import nearest_neighbour_report
from fetalbrain.training.fit import build_model
from tests.conftest import CONF, TINY, train_config

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("reproduce_*.yaml"))
ONE_BATCH = ["trainer.limit_train_batches=1", "trainer.limit_val_batches=0", "+trainer.num_sanity_val_steps=0"]


def test_one_preset_per_model_family():
    assert PRESETS == ["reproduce_cnn", "reproduce_efficientnet_lite0", "reproduce_separable"]


@pytest.fixture(scope="module")
def datamodules() -> dict:
    """Set-up data modules by their data config: the presets share one at the tiny size."""
    return {}


def _datamodule(cfg, cache: dict):
    key = OmegaConf.to_yaml(cfg.data, resolve=True)
    if key not in cache:
        cache[key] = instantiate(cfg.data)
        cache[key].setup("fit")
    return cache[key]


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_is_the_published_protocol_and_trains_a_batch(tmp_path, preset, datamodules):
    with train_config(tmp_path, [f"experiment={preset}"]) as full:
        assert full.data.splitter == "official" and full.model.name == preset.removeprefix("reproduce_")
        assert full.callbacks.early_stopping is None and full.trainer.max_epochs >= 40
        assert full.data.image_size == (64 if full.model.name in ("cnn", "separable") else full.data.image_size)
    with train_config(tmp_path, [f"experiment={preset}", *TINY, *ONE_BATCH]) as cfg:
        datamodule = _datamodule(cfg, datamodules)
        model = build_model(cfg, datamodule)
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)  # one step, nothing to keep
        trainer.fit(model, datamodule=datamodule)
        assert trainer.global_step == 1 and math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_the_pixel_baseline_sees_the_official_split_leak(tmp_path, datamodules):
    """1-NN on the official split's real images: many nearest training images are copies of the test image's
    source, and it scores far above chance; a grouped split shares no source."""
    with train_config(tmp_path, ["experiment=reproduce_cnn", *TINY]) as cfg:
        datamodule = _datamodule(cfg, datamodules)
        options = cfg.evaluation.nearest_neighbour
    train, test = datamodule.preprocessed_images("train"), datamodule.preprocessed_images("test")
    tables = (datamodule.part_table("train"), datamodule.part_table("test"))
    metrics, _ = nearest_neighbour_report(train, test, datamodule.class_names, options, tables)
    assert metrics["baseline/nn1_test_same_source"] > 0.3 and metrics["baseline/nn1_test_accuracy"] > 0.4
    with train_config(tmp_path, [*TINY]) as cfg:  # the default grouped split
        grouped = _datamodule(cfg, datamodules)
    parts = [grouped.preprocessed_images(part) for part in ("train", "test")]
    tables = (grouped.part_table("train"), grouped.part_table("test"))
    metrics, _ = nearest_neighbour_report(*parts, grouped.class_names, options, tables)
    assert metrics["baseline/nn1_test_same_source"] == 0.0 and metrics["baseline/nn1_test_same_case"] == 0.0


@pytest.mark.slow
def test_a_reproduction_run_reports_the_baseline_and_the_hierarchy(tmp_path):
    from fetalbrain.training.fit import train

    with train_config(tmp_path, ["experiment=reproduce_cnn", *TINY]) as cfg:
        summary, _ = train(cfg)
    metrics = summary["metrics"]
    assert metrics["baseline/nn1_test_same_source"] > 0 and 0 <= metrics["baseline/nn1_test_f1_macro"] <= 1
    assert {"hierarchy/abnormal_test_accuracy", "hierarchy/ventriculomegaly_merged_test_f1_macro"} <= set(metrics)
    assert (tmp_path / "nearest_neighbour.csv").is_file() and (tmp_path / "hierarchy.csv").is_file()
