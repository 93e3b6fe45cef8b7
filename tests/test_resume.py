"""Exact resume in place: a run killed after an epoch and resumed ends as if never interrupted."""

import json
import sys
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

import fetalbrain.train
import fetalbrain.training.fit
from fetalbrain.data.datamodule import UltrasoundDataset
from fetalbrain.runs.layout import LAST_CHECKPOINT
from fetalbrain.runs.resume import ResumeError
from fetalbrain.training.tracking import WANDB_RUN_FILE
from tests.conftest import CONF, TINY

EPOCHS, KILLED_AT = 3, 2  # trained: epochs 0 and 1, then killed as epoch 2 starts
BEST_CHECKPOINT = "ModelCheckpoint{'monitor': 'val/f1_macro'"  # the callback keeping the best (and best-k)
RUN = [
    *(o for o in TINY if o.split("=")[0] not in ("trainer.max_epochs", "logger", "callbacks")),
    f"trainer.max_epochs={EPOCHS}",
    "model=cnn",
    "seed=7",
    "logger=wandb",  # offline (conftest): the W&B run id must carry over
    "callbacks=default",  # checkpoints, early stopping, LR monitor
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]


class Killed(RuntimeError):
    pass


class KillAtEpoch(Callback):
    """A crash after the checkpoint of the previous epoch was written, like a kill -9 between epochs."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Killed(f"killed as epoch {self.epoch} starts")


def train_cli(monkeypatch, *arguments):
    """``python -m fetalbrain.train ARGUMENTS`` in this process, errors raised rather than printed."""
    monkeypatch.setattr(sys, "argv", ["fetalbrain.train", f"--config-path={CONF}", *arguments])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    GlobalHydra.instance().clear()
    try:
        return fetalbrain.train.main()
    finally:
        GlobalHydra.instance().clear()


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def evaluation_metrics(run_dir: Path) -> dict:
    return {k: v for k, v in summary_of(run_dir)["metrics"].items() if k.startswith(("test/", "val/"))}


def callback_state(checkpoint: dict, name: str) -> dict:
    return next(state for key, state in checkpoint["callbacks"].items() if key.startswith(name))


def folder_bytes(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_killed_run_resumed_in_place_ends_like_the_uninterrupted_run(tmp_path, monkeypatch, workers):
    """With persistent loader workers too (slow): they start at the resumed epoch, not at epoch 0."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    run = [o for o in RUN if not o.startswith("data.num_workers=")] + [f"data.num_workers={workers}"]
    train_cli(monkeypatch, f"hydra.run.dir={full}", *run)

    build = fetalbrain.training.fit.build

    def build_then_kill(cfg):
        datamodule, model, trainer = build(cfg)
        trainer.callbacks.append(KillAtEpoch(KILLED_AT))
        return datamodule, model, trainer

    with monkeypatch.context() as patch:
        patch.setattr(fetalbrain.training.fit, "build", build_then_kill)
        with pytest.raises(Killed):
            train_cli(patch, f"hydra.run.dir={killed}", *run)
    assert not (killed / "metrics.json").exists()
    assert torch.load(killed / LAST_CHECKPOINT, weights_only=True)["epoch"] == KILLED_AT - 1
    hydra_before, config_before = folder_bytes(killed / ".hydra"), (killed / "config.yaml").read_bytes()
    wandb_id = json.loads((killed / WANDB_RUN_FILE).read_text())["id"]

    train_cli(monkeypatch, f"resume={killed}")

    # The same folder, its .hydra/ and config.yaml as the original run wrote them.
    assert folder_bytes(killed / ".hydra") == hydra_before and (killed / "config.yaml").read_bytes() == config_before
    summary = summary_of(killed)
    assert summary["run"]["resumed"] and summary["run"]["epochs_trained"] == EPOCHS
    # Exactly the uninterrupted run's metrics, weights, best-k and early-stopping state.
    assert evaluation_metrics(killed) == evaluation_metrics(full)
    best = {run: Path(summary_of(run)["run"]["best_checkpoint"]) for run in (full, killed)}
    assert best[killed].relative_to(killed) == best[full].relative_to(full)
    last = {run: torch.load(run / LAST_CHECKPOINT, weights_only=True) for run in (full, killed)}
    for key, value in last[full]["state_dict"].items():
        assert torch.equal(value, last[killed]["state_dict"][key]), key
    assert "val_best.max_value" in last[killed]["state_dict"]  # the best-so-far travels in checkpoints
    checkpointing = {run: callback_state(last[run], BEST_CHECKPOINT) for run in (full, killed)}
    assert checkpointing[killed]["best_model_score"] == checkpointing[full]["best_model_score"]
    assert {Path(p).name: float(s) for p, s in checkpointing[killed]["best_k_models"].items()} == {
        Path(p).name: float(s) for p, s in checkpointing[full]["best_k_models"].items()
    }
    early_stopping = {run: callback_state(last[run], "EarlyStopping") for run in (full, killed)}
    assert early_stopping[killed]["wait_count"] == early_stopping[full]["wait_count"]
    assert early_stopping[killed]["best_score"] == early_stopping[full]["best_score"]
    # One W&B run, continued: two offline segments with the recorded id.
    segments = sorted((killed / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(f"-{wandb_id}") for s in segments)


def fake_run(folder: Path, last_checkpoint: bool = True, written_in: Path | None = None) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(f"paths:\n  output_dir: {written_in or folder}\n")
    if last_checkpoint:
        (folder / LAST_CHECKPOINT).write_bytes(b"")
    return folder


def test_resume_refuses_what_it_cannot_continue_exactly(tmp_path, monkeypatch):
    missing = tmp_path / "missing"
    with pytest.raises(ResumeError, match=f"cannot resume {missing}: no such folder"):
        train_cli(monkeypatch, f"resume={missing}")
    assert not missing.exists()  # refused before Hydra created anything
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ResumeError, match=f"cannot resume {empty}: not a run folder \\(no config.yaml"):
        train_cli(monkeypatch, f"resume={empty}")
    assert not any(empty.iterdir())
    no_last = fake_run(tmp_path / "no_last", last_checkpoint=False)
    with pytest.raises(ResumeError, match=f"cannot resume {no_last}: the run has no checkpoints/last.ckpt"):
        train_cli(monkeypatch, f"resume={no_last}")

    run = fake_run(tmp_path / "run")
    with pytest.raises(ResumeError, match="remove the override\\(s\\) model, trainer.max_epochs.*ckpt_path="):
        train_cli(monkeypatch, f"resume={run}", "model=cnn", "trainer.max_epochs=9")
    with pytest.raises(ResumeError, match="drop hydra.run.dir"):
        train_cli(monkeypatch, f"resume={run}", f"hydra.run.dir={tmp_path / 'elsewhere'}")
    # The other spelling: ckpt_path=last in the run's own folder.
    with pytest.raises(ResumeError, match="remove the override\\(s\\) seed"):
        train_cli(monkeypatch, f"hydra.run.dir={run}", "ckpt_path=last", "seed=3")
    with pytest.raises(ResumeError, match="not a run folder"):
        train_cli(monkeypatch, f"hydra.run.dir={empty}", "ckpt_path=last")
    assert not (run / ".hydra").exists() and not (empty / ".hydra").exists()
    finished = fake_run(tmp_path / "finished")
    (finished / "metrics.json").write_text("{}")
    with pytest.raises(ResumeError, match=f"cannot resume {finished}: the run has finished"):
        train_cli(monkeypatch, f"resume={finished}")
    moved = fake_run(tmp_path / "moved", written_in=tmp_path / "original")
    with pytest.raises(ResumeError, match=f"written for {tmp_path / 'original'} \\(a moved or copied run\\)"):
        train_cli(monkeypatch, f"resume={moved}")


def augmented_epochs(epochs: range, num_workers: int = 2) -> list[torch.Tensor]:
    """Every augmented image of each epoch: one image repeated, so only the augmentation differs."""
    image = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    transform = A.Compose([A.Affine(rotate=(-30, 30), p=1.0), A.GaussNoise(std_range=(0.1, 0.2), p=1.0), ToTensorV2()])
    dataset = UltrasoundDataset(["image.png"] * 8, [0] * 8, transform, images=[image] * 8)
    loader = DataLoader(dataset, batch_size=2, num_workers=num_workers, persistent_workers=num_workers > 0)
    augmented = []
    for epoch in epochs:
        dataset.set_epoch(epoch)  # what ReproducibleEpochs does as each training epoch starts
        augmented.append(torch.cat([images for images, _ in loader]))
    return augmented


def test_augmentation_follows_the_epoch_even_in_persistent_workers():
    uninterrupted = augmented_epochs(range(3))
    assert not torch.equal(uninterrupted[0], uninterrupted[1])  # new augmentations every epoch
    assert torch.equal(augmented_epochs(range(2, 3))[0], uninterrupted[2])  # a resumed loader sees the same
    assert not torch.equal(uninterrupted[0][0], uninterrupted[0][2])  # worker 0's and worker 1's first images
    assert torch.equal(augmented_epochs(range(3))[1], uninterrupted[1])  # reproducible


def test_a_sweep_started_again_skips_finished_jobs_and_continues_the_killed_one(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    arguments = ["-m", "seed=1,2", *(o for o in RUN if not o.startswith(("seed=", "logger="))), "logger=none"]
    arguments.append(f"hydra.sweep.dir={sweep}")
    build = fetalbrain.training.fit.build

    def kill_seed_2(cfg):
        datamodule, model, trainer = build(cfg)
        if cfg.seed == 2:
            trainer.callbacks.append(KillAtEpoch(KILLED_AT))
        return datamodule, model, trainer

    with monkeypatch.context() as patch:
        patch.setattr(fetalbrain.training.fit, "build", kill_seed_2)
        with pytest.raises(Killed):
            train_cli(patch, *arguments)
    finished, killed = sweep / "0", sweep / "1"
    assert (finished / "metrics.json").is_file() and not (killed / "metrics.json").exists()
    before = {job: folder_bytes(job) for job in (finished, killed)}

    train_cli(monkeypatch, *arguments)  # the same sweep again, into its folder

    after = folder_bytes(finished)
    assert b"has finished: skipped" in after.pop(Path("train.log"))
    assert after == {p: b for p, b in before[finished].items() if p != Path("train.log")}  # skipped: untouched
    assert {p: b for p, b in folder_bytes(killed).items() if p.parts[0] == ".hydra"} == {
        p: b for p, b in before[killed].items() if p.parts[0] == ".hydra"
    }
    summary = summary_of(killed)
    assert summary["run"]["resumed"] and summary["run"]["epochs_trained"] == EPOCHS

    with pytest.raises(ResumeError, match=f"{finished} holds a run with another config \\(model"):
        train_cli(monkeypatch, *arguments, "model=separable")
