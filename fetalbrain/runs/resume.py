"""Exact resume in place: ``python -m fetalbrain.train resume=RUN_DIR`` continues a killed run.

The run goes on in its own folder with its own resolved ``config.yaml`` (other overrides are refused),
from ``checkpoints/last.ckpt``, written after every epoch (``conf/callbacks/default.yaml``). Lightning
restores weights, optimizer, LR scheduler, loop counters and the callbacks' states (best-k of
``ModelCheckpoint``, which needs the same ``dirpath``; early stopping). Added here and elsewhere: the
RNG states (this module's callback, saved in every checkpoint), augmentation seeded from the epoch
rather than from the process's history (``UltrasoundDataset.set_epoch``), shuffling unshifted by
persistent workers starting late (``FetalBrainDataModule._loader``), the best-so-far metric (a
persistent ``MaxMetric``) and the W&B run (``training.tracking.record_wandb_run``). Hydra's run folder is the
resumed one and its ``.hydra/`` stays as the original run wrote it (``conf/hydra/default.yaml``).

A ``last.ckpt`` cut short (a run killed while writing it before checkpoint writes were atomic,
``training.checkpointing``) or missing: the run goes on from the newest checkpoint in ``checkpoints/`` that holds the
training state, exactly from its epoch (every checkpoint holds all of it, RNG states included), and says so; the
damaged file is kept as ``NAME.corrupt`` (``resume_checkpoint``).

Sweeps: a multirun job whose folder already holds its run (the same sweep started again with
``hydra.sweep.dir=`` of the earlier one, or a SLURM job requeued after preemption) continues it the same way,
or is skipped when the run has finished: ``resume`` of a sweep runs only what is left.
"""

import logging
import random
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from fetalbrain.runs.layout import CHECKPOINT_DIR, CONFIG_FILE, LAST_CHECKPOINT, SUMMARY_FILE, flatten_config

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"  # a damaged checkpoint passed over by resume: kept, out of the way of the run's next ones
TRAINING_STATE = ("state_dict", "epoch", "global_step", "loops", "optimizer_states")  # what continuing a fit reads


class ResumeError(CompactHydraException, InterpolationResolutionError):
    """A run that ``resume=`` cannot continue. Hydra prints it as a message, not a traceback, also when
    the run-folder resolver raises it (before Hydra creates or writes anything)."""


def check_resumable(run_dir: str | Path) -> Path:
    """A run folder that can be continued: its resolved config, no metrics.json yet (written when a run finishes)
    and a checkpoint to continue from, chosen as ``resume_checkpoint`` chooses it (nothing is logged or renamed
    here: Hydra's run-folder resolver calls this before the run's logging starts)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ResumeError(f"cannot resume {run_dir}: no such folder")
    if not (path / CONFIG_FILE).is_file():
        raise ResumeError(f"cannot resume {run_dir}: not a run folder (no {CONFIG_FILE}, which every run writes first)")
    if (path / SUMMARY_FILE).is_file():
        raise ResumeError(f"cannot resume {run_dir}: the run has finished (it wrote its {SUMMARY_FILE})")
    _choose_checkpoint(path)
    return path


class _Examined(NamedTuple):
    path: Path
    epoch: int | None  # the epoch a checkpoint training can continue from was saved after; else None and why not
    problem: str = ""
    damaged: bool = False  # not a whole, loadable torch file (kept as NAME.corrupt when passed over)


def _examine(path: Path) -> _Examined:
    """Cheap: a file cut short has lost the zip archive's directory (torch.save writes it last); then the contents,
    memory-mapped (no tensor is read)."""
    try:
        size = path.stat().st_size
    except OSError:  # absent (or a link to nothing, or renamed by rank 0 meanwhile)
        return _Examined(path, None, "missing")
    if not zipfile.is_zipfile(path):
        return _Examined(path, None, f"truncated or not a checkpoint ({size} bytes, not a whole zip archive)", True)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # RuntimeError, UnpicklingError, EOFError, ...: any is a file training cannot load
        first_line = (str(error).strip().splitlines() or [""])[0]
        return _Examined(path, None, f"unreadable ({type(error).__name__}: {first_line})", True)
    missing = [key for key in TRAINING_STATE if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        return _Examined(path, None, f"not a training checkpoint (no {', '.join(missing)}: weights only?)")
    return _Examined(path, int(checkpoint["epoch"]))


def _choose_checkpoint(run_dir: Path) -> tuple[_Examined, list[_Examined]]:
    """The checkpoint to continue from, and those passed over before it: ``last.ckpt``, then the other checkpoints
    of the folder, newest first. ResumeError, naming each and why, when none will do."""
    last = run_dir / LAST_CHECKPOINT
    others = sorted(
        (p for p in (run_dir / CHECKPOINT_DIR).glob("*.ckpt") if p != last),
        key=lambda p: p.lstat().st_mtime_ns,
        reverse=True,
    )
    if not others and not last.is_file():
        raise ResumeError(
            f"cannot resume {run_dir}: the run has no {LAST_CHECKPOINT} "
            "(it stopped before its first epoch ended, or its checkpoint callback kept no last checkpoint)"
        )
    passed_over = []
    for path in (last, *others):
        examined = _examine(path)
        if examined.epoch is not None:
            return examined, passed_over
        passed_over.append(examined)
    found = "; ".join(f"{e.path.name}: {e.problem}" for e in passed_over)
    raise ResumeError(
        f"cannot resume {run_dir}: no checkpoint in {CHECKPOINT_DIR}/ holds a training state to continue from "
        f"({found}). Nothing in the folder was changed; train the run again in a new one"
    )


def resume_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint ``resume`` continues from: ``checkpoints/last.ckpt``, or when it is missing or damaged the
    newest checkpoint in ``checkpoints/`` that holds the training state (its later epochs are trained again, as the
    uninterrupted run trained them). Each passed over is logged by name and why; the damaged ones are renamed to
    ``NAME.corrupt`` (kept; a name the run writes again must be free). Rank 0 logs and renames; every rank chooses
    the same checkpoint, renamed files or not. ResumeError when no checkpoint will do."""
    chosen, passed_over = _choose_checkpoint(Path(run_dir))
    if passed_over and rank_zero_only.rank == 0:
        for examined in passed_over:
            kept = ""
            if examined.damaged:
                kept_as = examined.path.with_name(examined.path.name + CORRUPT_SUFFIX)
                try:
                    examined.path.replace(kept_as)
                except FileNotFoundError:  # renamed meanwhile by the first rank of another node (NODE_RANK runs)
                    pass
                kept = f" (kept as {kept_as.name})"
            log.warning("Resume: %s is %s%s", examined.path, examined.problem, kept)
        log.warning("Resume: continuing from %s (saved after epoch %d)", chosen.path, chosen.epoch)
    return chosen.path


def _collect_rng_states() -> dict:
    """Every RNG a training epoch draws from, as plain values and tensors: checkpoints load weights_only."""
    numpy_state = np.random.get_state(legacy=False)
    states = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(states["torch"])
    if "torch.cuda" in states and torch.cuda.is_available():
        for device, state in enumerate(states["torch.cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def _set_epoch(trainer, epoch: int) -> None:
    datamodule = trainer.datamodule
    if callable(getattr(datamodule, "set_epoch", None)):
        datamodule.set_epoch(epoch, rank=trainer.global_rank)


class ReproducibleEpochs(Callback):
    """Makes epoch k+1 of a resumed run the epoch k+1 of the uninterrupted one.

    Saves the Python, NumPy, torch (and CUDA) RNG states in every checkpoint and restores them with it, and
    tells the data module the epoch (``set_epoch``: augmentation is seeded from it). Both happen as the
    checkpoint is loaded: Lightning creates the first epoch's data iterator (shuffling, first batches)
    before any epoch hook runs; the sanity check in between runs with isolated RNGs.
    """

    def __init__(self):
        self._trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        # Checkpoints are written as an epoch ends: the run goes on with the next one.
        return {"rng": _collect_rng_states(), "next_epoch": self._trainer.current_epoch + 1}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._trainer is None or self._trainer.state.fn != TrainerFn.FITTING:
            return  # testing a checkpoint restores no training state
        _set_rng_states(state_dict["rng"])
        _set_epoch(self._trainer, state_dict["next_epoch"])

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self.state_key not in (checkpoint.get("callbacks") or {}):
            log.warning(
                "This checkpoint predates exact resume (no RNG states, no best-so-far metric): "
                "training goes on from it, but not exactly as the uninterrupted run would have"
            )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _set_epoch(trainer, trainer.current_epoch)


def _override_keys(overrides) -> list[str]:
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]


def _sweep_job_config(cfg: DictConfig, job_dir: Path) -> DictConfig:
    """A sweep job whose folder already holds a run: the sweep was started again into its folder
    (``hydra.sweep.dir=`` of an earlier sweep) or a cluster requeued the job. The run continues in place
    (``resume`` set; a finished one is then skipped by the caller), if it is the same job: same config."""
    if not (job_dir / CONFIG_FILE).is_file():
        return cfg
    saved = OmegaConf.load(job_dir / CONFIG_FILE)
    before = flatten_config(OmegaConf.to_container(saved, resolve=True))
    now = flatten_config(OmegaConf.to_container(cfg, resolve=True))
    # A key the run's config lacks was added to the project since it started (a new check, say): the run goes on
    # with its own config, so only the keys it has must agree.
    differing = sorted(k for k in before if k != "resume" and before.get(k) != now.get(k))
    if differing:
        raise ResumeError(
            f"{job_dir} holds a run with another config ({', '.join(differing[:6])} differ): a sweep goes on in "
            "its folder only with the same overrides; pass a new hydra.sweep.dir to start another sweep"
        )
    if not (job_dir / SUMMARY_FILE).is_file() and not any((job_dir / CHECKPOINT_DIR).glob("*.ckpt")):
        return cfg  # killed before its first epoch ended: nothing to continue, it starts again
    with open_dict(saved):
        saved.resume = str(job_dir)
    return saved


def resume_config(cfg: DictConfig) -> DictConfig:
    """The config to run: the composed one, or when resuming (``resume=RUN_DIR``, or ``ckpt_path=last``
    with ``hydra.run.dir=RUN_DIR``, or a sweep job whose folder already holds its run) the run's own
    resolved config.yaml, with ``resume`` set to its folder."""
    spelling = "resume" if cfg.get("resume") is not None else "ckpt_path" if cfg.get("ckpt_path") == "last" else None
    hydra = HydraConfig.get()
    if spelling is None:
        if hydra.mode == RunMode.MULTIRUN:
            return _sweep_job_config(cfg, Path(hydra.runtime.output_dir))
        if rank_zero_only.rank == 0 and (Path(hydra.runtime.output_dir) / CONFIG_FILE).is_file():
            raise ResumeError(
                f"{hydra.runtime.output_dir} already holds a run: continue it with resume={hydra.runtime.output_dir}"
                ", or choose another hydra.run.dir"
            )
        return cfg
    if hydra.mode == RunMode.MULTIRUN:
        raise ResumeError(f"{spelling}=...: resuming continues one run; it cannot be combined with -m (multirun)")
    run_dir = Path(hydra.runtime.output_dir)
    if spelling == "resume" and Path(cfg.resume).resolve() != run_dir.resolve():
        raise ResumeError(f"resume={cfg.resume} runs in that folder: drop hydra.run.dir={run_dir}")
    extra = [key for key in _override_keys(hydra.overrides.task) if key != spelling]
    if extra:
        raise ResumeError(
            f"{spelling}=...: {run_dir} resumes with its own config ({CONFIG_FILE}); remove the override(s) "
            f"{', '.join(extra)}. To train on with other settings, start a new run from its weights: "
            f"ckpt_path={run_dir / LAST_CHECKPOINT}"
        )
    check_resumable(run_dir)
    saved = OmegaConf.load(run_dir / CONFIG_FILE)
    recorded = OmegaConf.select(saved, "paths.output_dir")
    if recorded is None or Path(recorded).resolve() != run_dir.resolve():
        # The checkpoints name their folder too (best-k is only restored in the same dirpath).
        raise ResumeError(
            f"cannot resume {run_dir}: its {CONFIG_FILE} was written for {recorded} (a moved or copied run); "
            f"resume works in place. To train on from here, start a new run: ckpt_path={run_dir / LAST_CHECKPOINT}"
        )
    with open_dict(saved):
        saved.resume = str(run_dir)
    log.info("Resuming %s", run_dir)
    return saved
