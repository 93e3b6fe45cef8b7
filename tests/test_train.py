"""End to end: `train(cfg)` for every model family on the embedded data, checkpoints, resume."""

import json

import pandas as pd
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write

from fetalbrain.models.classifier import load_classifier
from fetalbrain.training.fit import train
from fetalbrain.training.tracking import finish_tracking
from tests.conftest import TINY, train_config

REPORT_FILES = (
    "metrics.json",
    "per_class.csv",
    "per_class_recall.png",
    "training_curves.png",
    "confusion_matrix.png",
    "confusion_matrix_normalised.png",
    "config.yaml",
    "predictions.csv",
    "roc.png",
    "screening_roc.png",
    "reliability.png",
)
REPORT_METRICS = (
    "test/ece",
    "test/ece_temperature_scaled",
    "calibration/temperature",
    "screening/test_auroc",
    "screening/youden/threshold",
    "screening/youden/test_sensitivity",
    "screening/sensitivity_0.95/test_specificity",
    "shortcut/image_stats_test_auroc",
    "shortcut/border_only_test_auroc",
)


def run(tmp_path, *overrides):
    with train_config(tmp_path, [*TINY, *overrides]) as cfg:
        summary, objects = train(cfg)
    return summary, objects


@pytest.mark.parametrize(
    "model",
    # EfficientNet-B0 is one more timm backbone (lite0 and timm cover the path): slow, for the suite's budget.
    [
        "cnn",
        "separable",
        "xception",
        pytest.param("efficientnet_b0", marks=pytest.mark.slow),
        "efficientnet_lite0",
        "timm",
    ],
)
def test_each_model_family_trains_and_tests(tmp_path, model):
    summary, _ = run(tmp_path, f"model={model}", "evaluation.shortcut_check=true")  # off in TINY: on here
    for name in REPORT_FILES:
        assert (tmp_path / name).is_file(), name
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "test/accuracy",
        "test/balanced_accuracy",
        "test/f1_macro",
        "test/auroc_macro",
        "test/precision_macro",
        "test/recall_macro",
        "val/f1_macro_best",
    ):
        assert 0.0 <= written["metrics"][key] <= 1.0, key
    for key in REPORT_METRICS:
        assert key in written["metrics"], key
    assert written["run"]["model"] == model and written["run"]["image_size"] == 32
    resolved = (tmp_path / "config.yaml").read_text()
    assert "${" not in resolved and "fetal-brain-ultrasound" in resolved
    assert written["data"]["split"]["splitter"] == "grouped"
    if model == "efficientnet_lite0":
        assert written["run"]["pretrained_source"].startswith("file:")
    assert list(tmp_path.glob("checkpoints/*.ckpt"))


def test_every_run_draws_its_training_curves_and_per_class_recall(tmp_path):
    """With logger=none too: the CSV log behind training_curves.png is kept in every run; recall per class has
    case-bootstrap intervals around it, and a class the test part lacks has none."""
    run(tmp_path, "model=cnn", "trainer.max_epochs=2")
    log = pd.read_csv(next(tmp_path.glob("csv/*/metrics.csv")))
    fit = log.dropna(subset=["val/loss"])
    assert sorted(fit["epoch"]) == [0, 1] and log["train/f1_macro"].notna().sum() == 2
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    per_class = pd.read_csv(tmp_path / "per_class.csv")
    present = per_class[per_class["support"] > 0]
    assert (present["recall_ci_low"] <= present["recall"] + 1e-9).all()
    assert (present["recall"] <= present["recall_ci_high"] + 1e-9).all()
    assert present["recall_ci_high"].le(1).all() and present["recall_ci_low"].ge(0).all()
    assert per_class.loc[per_class["support"] == 0, "recall_ci_low"].isna().all()
    assert (present["cases"] >= 1).all()
    one_case = present[present["cases"] == 1]  # resampling cases, not images: its recall cannot vary
    assert len(one_case) and (one_case["recall_ci_low"] == one_case["recall"]).all()
    assert (one_case["recall_ci_high"] == one_case["recall"]).all()
    card = (tmp_path / "model_card.md").read_text()
    assert "(training_curves.png)" in card and "(per_class_recall.png)" in card


def test_checkpoint_loads_weights_only_and_predicts_the_same(tmp_path):
    _, objects = run(tmp_path, "model=cnn")
    best = objects["trainer"].checkpoint_callback.best_model_path
    state = torch.load(best, map_location="cpu", weights_only=True)  # no pickled code needed
    assert state["hyper_parameters"]["class_names"][12] == "normal"
    assert state["hyper_parameters"]["preprocessing"]["image_size"] == 32
    restored = load_classifier(best)
    batch = next(iter(objects["datamodule"].test_dataloader()))[0]
    trained = objects["model"].cpu().eval()
    trained.load_state_dict(state["state_dict"])
    with torch.no_grad():
        assert torch.allclose(restored(batch), trained(batch), atol=1e-6)


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    run(tmp_path / "first", "model=separable")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    summary, objects = run(tmp_path / "second", "model=separable", "trainer.max_epochs=2", f"ckpt_path={last}")
    assert objects["trainer"].current_epoch == 2
    assert torch.load(last, weights_only=True)["epoch"] == 0


def test_same_seed_same_result_on_cpu(tmp_path):
    first, _ = run(tmp_path / "a", "model=cnn", "seed=5")
    second, _ = run(tmp_path / "b", "model=cnn", "seed=5")
    keys = [k for k in first["metrics"] if k.startswith(("test/", "val/"))]
    assert {k: first["metrics"][k] for k in keys} == {k: second["metrics"][k] for k in keys}


def test_imbalance_and_finetuning_options(tmp_path):
    summary, objects = run(
        tmp_path,
        "model=efficientnet_lite0",
        "model.class_weighting=balanced",
        "data.sampler=weighted",
        "model.label_smoothing=0.1",
        "model.freeze_backbone_epochs=1",
        "scheduler=plateau",
        "optimizer=sgd",
    )
    model = objects["model"]
    weights = model.class_weights
    counts = objects["datamodule"].train_class_counts()
    assert weights[counts.argmax()] < 1 < weights[counts[counts > 0].argmin()]
    assert not any(p.requires_grad for p in model.backbone_parameters())  # still in the frozen epoch
    assert all(p.requires_grad for p in model.head_parameters())


def test_a_backbone_without_pretrained_weights_is_never_frozen(tmp_path):
    _, objects = run(tmp_path, "model=timm", "model.net.pretrained=auto", "model.freeze_backbone_epochs=1")
    assert objects["model"].net.pretrained_source == "none (unavailable)"
    assert all(p.requires_grad for p in objects["model"].backbone_parameters())


def test_official_split_and_wandb_offline_run_grouped_by_sweep(tmp_path):
    """A multirun job's W&B run: in its sweep's group, the task as job_type, fold/seed/task as config keys."""
    with train_config(tmp_path, [*TINY, "model=cnn", "data/split=official", "logger=wandb", "seed=5"]) as cfg:
        with read_write(cfg.hydra):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(tmp_path / "multirun" / "2026-11-23" / "21-00-00-000001")
        HydraConfig.instance().set_config(cfg)
        summary, objects = train(cfg)
    assert summary["data"]["split"]["leaked"]["test"]["shared_source"] == 171
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    logger = objects["trainer"].loggers[0]
    assert logger._wandb_init["group"] == "multirun/2026-11-23/21-00-00-000001"
    assert logger._wandb_init["job_type"] == "classification"
    assert {k: logger.experiment.config[k] for k in ("task", "splitter", "fold", "seed")} == {
        "task": "classification",
        "splitter": "official",
        "fold": 0,
        "seed": 5,
    }
    finish_tracking()


@pytest.mark.slow
def test_compiled_training_keeps_checkpoints_loadable(tmp_path):
    """torch.compile on CPU (~30 s of compilation): checkpoints keep the plain net's parameter names."""
    _, objects = run(tmp_path, "model=cnn", "model.compile=true")
    best = objects["trainer"].checkpoint_callback.best_model_path
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)
    batch = next(iter(objects["datamodule"].test_dataloader()))[0]
    with torch.no_grad():
        assert load_classifier(best)(batch).shape == (len(batch), 16)
