"""DDP with 2 gloo processes on CPU: one run folder per job, a report on the whole test set, once."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from fetalbrain.evaluation.metrics import classification_metrics
from fetalbrain.models.classifier import load_classifier
from fetalbrain.training.fit import build
from tests.conftest import TINY, make_export, train_config, write_split_csv
from tests.test_resume import train_cli

# Whole validation and test parts (no batch limits): every image must be counted once, padding or not.
DDP = [o for o in TINY if not o.startswith(("+trainer.limit_test_batches", "+trainer.limit_val_batches"))] + [
    "trainer=ddp_cpu",
    "data/split=official",
]


class RaiseOnEveryRank(Callback):
    """What a pruned trial or an error every rank meets does: each rank raises in the same epoch."""

    def on_train_epoch_start(self, trainer, pl_module):
        raise RuntimeError(f"stopped on rank {trainer.global_rank}")


def odd_sized_export(folder):
    """A small export whose validation and test parts have an odd number of images: 2 ranks must pad them,
    and must not count the repeated image twice."""
    export = make_export(folder, per_class=2)
    for split in ("valid", "test"):
        table = pd.read_csv(export / split / "_classes.csv", skipinitialspace=True)
        table.columns = [c.strip() for c in table.columns]
        if len(table) % 2 == 0:
            (export / split / table["filename"].iloc[-1]).unlink()
            write_split_csv(table.iloc[:-1], export / split / "_classes.csv")
    return export


def single_process_predictions(run_dir, part: str = "test"):
    """The run's best weights on a part, in this one process: what DDP must reproduce."""
    summary = json.loads((run_dir / "metrics.json").read_text())
    model = load_classifier(summary["run"]["best_checkpoint"])
    datamodule = instantiate(OmegaConf.load(run_dir / "config.yaml").data)
    datamodule.setup("fit")
    loader = datamodule.test_dataloader() if part == "test" else datamodule.val_dataloader()
    probs, targets = model.predict_proba(loader)
    return summary, probs, targets, list(datamodule.part_table(part)["path"])


def assert_metrics_equal(summary, stage: str, probs, targets):
    expected = classification_metrics(probs.shape[1]).clone(prefix=f"{stage}/")(probs, targets)
    for name, value in expected.items():
        assert summary["metrics"][name] == pytest.approx(float(value), abs=1e-5), name


def test_a_ddp_sweep_gives_one_folder_per_job_and_reports_each_test_image_once(tmp_path, monkeypatch):
    export = odd_sized_export(tmp_path / "export")
    sweep, logs = tmp_path / "sweep", tmp_path / "logs"
    arguments = [*DDP, "model=cnn", f"data.root={export}", f"paths.log_dir={logs}", f"hydra.sweep.dir={sweep}"]
    threads = torch.get_num_threads()
    train_cli(monkeypatch, "-m", "seed=1,2", *arguments)

    # Exactly the 2 jobs: the second rank ran the job's config, not the command line (no second sweep).
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert not logs.exists()
    assert torch.get_num_threads() == threads  # this process's threads are given back after the ranks ran
    for job in ("0", "1"):
        summary, probs, targets, paths = single_process_predictions(sweep / job)
        assert summary["run"]["processes"] == 2
        assert len(paths) % 2 == 1
        predictions = pd.read_csv(sweep / job / "predictions.csv")
        assert list(predictions["path"]) == paths  # every test image once, in the table's order
        reported = predictions[[c for c in predictions.columns if c.startswith("p_")]].to_numpy()
        np.testing.assert_allclose(reported, probs.numpy(), atol=1e-5)
        assert_metrics_equal(summary, "test", probs, targets)
        nll = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), targets).item()
        assert summary["metrics"]["test/loss"] == pytest.approx(nll, abs=1e-4)
    # Validation too (what picks the checkpoint and stops early): one epoch, so its weights are the best's.
    summary, probs, targets, paths = single_process_predictions(sweep / "0", part="val")
    assert len(paths) % 2 == 1  # odd: the sampler padded it
    assert_metrics_equal(summary, "val", probs, targets)
    assert not (sweep / "0" / "ddp_config.yaml").exists()  # the run keeps one resolved config


def test_an_error_on_every_rank_ends_the_ddp_run_cleanly(tmp_path, monkeypatch):
    """Not a SIGKILL of this process (it would end a whole in-process sweep): the error, and the ranks gone."""
    export = odd_sized_export(tmp_path / "export")
    callback = f"+callbacks.stop._target_={RaiseOnEveryRank.__module__}.RaiseOnEveryRank"
    with pytest.raises(RuntimeError, match="stopped on rank 0"):
        train_cli(monkeypatch, *DDP, "model=cnn", f"data.root={export}", callback, f"hydra.run.dir={tmp_path / 'run'}")
    assert "LOCAL_RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    assert not torch.distributed.is_initialized()


def test_more_gpus_than_the_machine_has_is_an_error_naming_the_keys(tmp_path):
    requested = torch.cuda.device_count() + 1
    overrides = [*TINY, "trainer.accelerator=gpu", "trainer=ddp", f"trainer.devices={requested}", "model=cnn"]
    with train_config(tmp_path, overrides) as cfg:
        named = f"trainer.accelerator=gpu trainer.devices={requested} trainer.strategy=ddp"
        with pytest.raises(ValueError, match=named):
            build(cfg)
