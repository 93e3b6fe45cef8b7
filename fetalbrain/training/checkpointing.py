"""Checkpoints written whole or not at all: a kill or a preemption while a run saves must not leave a
truncated ``last.ckpt`` that ``resume=RUN_DIR`` cannot read.

Lightning's ``TorchCheckpointIO`` writes a temporary file in the system's temporary folder and moves it into
place: a copy into the opened (truncated) checkpoint when that folder is on another filesystem, as on most
clusters. ``AtomicCheckpointIO`` writes ``NAME.partial`` next to the checkpoint, flushes it to the disk and
renames it over ``NAME`` (``os.replace``: atomic within a filesystem). Every checkpoint a fit saves goes through
the strategy's CheckpointIO (the ModelCheckpoint callbacks, ``save_last=True``, ``trainer.save_checkpoint``; a
``save_last="link"`` is a symbolic link, whole or absent anyway), on global rank 0 alone under DDP. A kill
mid-write leaves the previous checkpoint and a stray ``.partial`` file, which the next save of that name replaces
and nothing reads (every reader looks for ``*.ckpt``).
"""

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL_SUFFIX = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose checkpoints appear by a rename of a complete, synced file: whole or absent."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:  # a remote store (s3://, ...): Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself survive a crash of the machine (a kill of the process needs no sync)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError:  # some network filesystems cannot sync a folder: the rename is atomic all the same
        pass
    finally:
        os.close(descriptor)


def use_atomic_checkpoints(trainer) -> None:
    """Every checkpoint the trainer saves is written atomically: its strategy's default ``TorchCheckpointIO`` is
    replaced. Left alone: a CheckpointIO the config chose (``trainer.plugins``) or a strategy's own (XLA's)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
