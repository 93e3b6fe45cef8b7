"""Exact resume in place: a run killed after an epoch and resumed ends as if never interrupted."""

import json
import multiprocessing
import os
import re
import sys
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
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
from fetalbrain.runs.resume import ResumeError, resume_checkpoint
from fetalbrain.training.checkpointing import PARTIAL_SUFFIX, AtomicCheckpointIO
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


def train_until_killed(monkeypatch, run_dir: Path, run: list[str], inspect=lambda trainer: None) -> None:
    """Train ``run`` into ``run_dir`` and kill it as epoch KILLED_AT starts (``inspect`` sees the trainer first)."""
    build = fetalbrain.training.fit.build

    def build_then_kill(cfg):
        datamodule, model, trainer = build(cfg)
        inspect(trainer)
        trainer.callbacks.append(KillAtEpoch(KILLED_AT))
        return datamodule, model, trainer

    with monkeypatch.context() as patch:
        patch.setattr(fetalbrain.training.fit, "build", build_then_kill)
        with pytest.raises(Killed):
            train_cli(patch, f"hydra.run.dir={run_dir}", *run)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_killed_run_resumed_in_place_ends_like_the_uninterrupted_run(tmp_path, monkeypatch, workers):
    """With persistent loader workers too (slow): they start at the resumed epoch, not at epoch 0."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    run = [o for o in RUN if not o.startswith("data.num_workers=")] + [f"data.num_workers={workers}"]
    train_cli(monkeypatch, f"hydra.run.dir={full}", *run)

    train_until_killed(monkeypatch, killed, run)
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


def training_checkpoint(path: Path, epoch: int = 0) -> Path:
    """What resume needs of a checkpoint: the training state (here empty)."""
    torch.save({"state_dict": {}, "epoch": epoch, "global_step": 1, "loops": {}, "optimizer_states": []}, path)
    return path


def fake_run(folder: Path, last_checkpoint: bool = True, written_in: Path | None = None) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(f"paths:\n  output_dir: {written_in or folder}\n")
    if last_checkpoint:
        training_checkpoint(folder / LAST_CHECKPOINT)
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


def test_a_run_whose_last_checkpoint_was_cut_short_goes_on_from_its_newest_whole_one(tmp_path, monkeypatch):
    """A kill while Lightning wrote last.ckpt in place (before atomic writes) left it truncated."""
    killed, checkpoints = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    run = [*(o for o in RUN if not o.startswith("logger=")), "logger=none"]

    def writes_atomically(trainer) -> None:  # every run does
        assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)

    train_until_killed(monkeypatch, killed, run, writes_atomically)
    assert not list(checkpoints.glob(f"*{PARTIAL_SUFFIX}"))
    last = killed / LAST_CHECKPOINT
    damaged = last.read_bytes()[: last.stat().st_size // 2]
    last.write_bytes(damaged)

    train_cli(monkeypatch, f"resume={killed}")

    log = (killed / "train.log").read_text()
    assert f"{last} is truncated or not a checkpoint" in log and "(kept as last.ckpt.corrupt)" in log
    assert re.search(f"continuing from {re.escape(str(checkpoints))}/epoch_00[01].ckpt", log)
    assert (checkpoints / "last.ckpt.corrupt").read_bytes() == damaged  # kept, not overwritten by the run
    summary = summary_of(killed)
    assert summary["run"]["resumed"] and summary["run"]["epochs_trained"] == EPOCHS
    assert torch.load(last, weights_only=True)["epoch"] == EPOCHS - 1
    # one CSV log per start of the run; together they hold every epoch, which the training curves draw
    logs = sorted(killed.glob("csv/version_*/metrics.csv"))
    epochs = {int(e) for p in logs for e in pd.read_csv(p).dropna(subset=["val/loss"])["epoch"]}
    assert len(logs) == 2 and epochs == set(range(EPOCHS)) and (killed / "training_curves.png").is_file()


def test_resume_passes_over_damaged_checkpoints_and_refuses_when_none_will_do(tmp_path, monkeypatch, caplog):
    run = fake_run(tmp_path / "run", last_checkpoint=False)
    checkpoints = run / "checkpoints"
    (checkpoints / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    training_checkpoint(checkpoints / "epoch_000.ckpt", epoch=0)
    torch.save({"state_dict": {}, "epoch": 1}, checkpoints / "epoch_001.ckpt")  # newer, weights only
    os.utime(checkpoints / "epoch_000.ckpt", (0, 0))
    with caplog.at_level("WARNING", logger="fetalbrain.runs.resume"):
        assert resume_checkpoint(run) == checkpoints / "epoch_000.ckpt"
    assert f"{checkpoints / 'last.ckpt'} is truncated or not a checkpoint (14 bytes" in caplog.text
    assert "(kept as last.ckpt.corrupt)" in caplog.text
    assert f"{checkpoints / 'epoch_001.ckpt'} is not a training checkpoint (no global_step, loops" in caplog.text
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_000.ckpt", "epoch_001.ckpt", "last.ckpt.corrupt"]

    (checkpoints / "epoch_000.ckpt").write_bytes(b"")
    before = folder_bytes(run)
    found = re.escape(f"cannot resume {run}: no checkpoint in checkpoints/ holds a training state to continue from")
    passed_over = (
        "last.ckpt: missing; epoch_000.ckpt: truncated or not a checkpoint \\(0 bytes.*; epoch_001.ckpt: not a"
    )
    with pytest.raises(ResumeError, match=f"{found} \\({passed_over}"):
        train_cli(monkeypatch, f"resume={run}")
    assert folder_bytes(run) == before  # refused before Hydra created anything; nothing renamed


def _killed_while_saving(path: Path) -> None:
    """A process killed (no exception handler runs) halfway through writing a checkpoint."""

    def write_half_then_die(checkpoint, file):
        file.write(b"PK\x03\x04" + bytes(1000))
        file.flush()
        os._exit(9)

    torch.save = write_half_then_die
    AtomicCheckpointIO().save_checkpoint({"epoch": 1, "weight": torch.ones(4)}, path)


def test_a_checkpoint_write_cut_short_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic = AtomicCheckpointIO()
    atomic.save_checkpoint({"epoch": 0, "weight": torch.zeros(4)}, path)
    saved = path.read_bytes()

    def fail_halfway(checkpoint, file):
        file.write(b"PK\x03\x04" + bytes(1000))
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", fail_halfway)
        with pytest.raises(OSError, match="No space left"):
            atomic.save_checkpoint({"epoch": 1, "weight": torch.ones(4)}, path)
    assert path.read_bytes() == saved and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]

    killed = multiprocessing.get_context("fork").Process(target=_killed_while_saving, args=(path,))
    killed.start()
    killed.join()
    assert killed.exitcode == 9
    assert path.read_bytes() == saved and torch.load(path, weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", f"last.ckpt{PARTIAL_SUFFIX}"]  # unread
    atomic.save_checkpoint({"epoch": 1, "weight": torch.ones(4)}, path)  # the next save replaces the stray part
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["epoch"] == 1


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
