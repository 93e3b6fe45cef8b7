"""Optuna inside a training job: the study's storage, and pruning by intermediate validation metrics.

The sweeper (``hydra_plugins/fetalbrain_plugins/optuna_sweeper.py``) and every job it launches open the
same persistent storage with :func:`open_storage`: a journal file (safe for several processes, also on a
shared filesystem) or an RDB URL. :class:`OptunaPruning` rebuilds the job's trial from storage, study name
and trial number (set per job by the sweeper through overrides), reports the monitored validation metric
after each validation epoch and raises ``optuna.TrialPruned`` when the pruner says so; the sweeper then
records the trial as PRUNED, not FAIL.
"""

import json
import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

log = logging.getLogger(__name__)

JOURNAL_LOCKS = ("symlink", "open")
# An RDB URL with a password reaches the jobs in this variable, never in their configs (config.yaml, W&B):
# the sweeper sets it and passes ``storage=env`` (submitit and sbatch hand the environment on).
STORAGE_ENV = "FETALBRAIN_OPTUNA_STORAGE"


class StudyStorageError(ValueError):
    """A storage that cannot hold the study: a file that is not a journal, an RDB URL that does not open."""


def is_rdb_url(storage: str) -> bool:
    return "://" in storage


def display_storage(storage: str) -> str:
    """The storage as messages and summaries show it: an RDB URL without its password."""
    if not is_rdb_url(storage):
        return storage
    try:
        from sqlalchemy.engine import make_url

        return make_url(storage).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: the error that follows says so; hide nothing it needs
        return storage


def _check_journal_file(path: Path) -> None:
    """Refuse a file that is not an Optuna journal (Optuna itself fails with an assertion deep in its replay)."""
    if path.is_dir():
        raise StudyStorageError(f"Optuna storage {path} is a folder: give a journal file path or an RDB URL")
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        first = f.readline(1 << 20)
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        hint = " (an SQLite database: use sqlite:///PATH)" if first.startswith(b"SQLite format") else ""
        raise StudyStorageError(f"Optuna storage {path} is not an Optuna journal file{hint}")


def open_storage(storage: str, journal_lock: str = "symlink", must_exist: bool = False):
    """An Optuna storage from its spelling: an RDB URL (``sqlite:///x.db``, ``postgresql://...``) or the path
    of a journal file (created with its folder, unless ``must_exist``). ``journal_lock``: ``symlink`` (Optuna's
    default) or ``open`` (``O_EXCL`` lock files, for filesystems without symbolic links)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalFileSymlinkLock

    if is_rdb_url(storage):
        try:
            return optuna.storages.get_storage(storage)
        except Exception as error:
            raise StudyStorageError(f"cannot open Optuna storage {display_storage(storage)}: {error}") from error
    if journal_lock not in JOURNAL_LOCKS:
        raise StudyStorageError(f"journal_lock={journal_lock}: choose one of {', '.join(JOURNAL_LOCKS)}")
    path = Path(storage).expanduser().absolute()
    _check_journal_file(path)
    if must_exist and not path.is_file():
        raise StudyStorageError(f"Optuna storage {path} does not exist")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = (JournalFileSymlinkLock if journal_lock == "symlink" else JournalFileOpenLock)(str(path))
    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


class OptunaPruning(Callback):
    """Report ``monitor`` to the job's Optuna trial after each validation epoch (not the sanity check) and
    stop the job with ``optuna.TrialPruned`` when the study's ``pruner`` says so (``None``: report only).

    Inactive without ``trial_number`` (a run outside a sweep) and for a trial that has already finished
    (a trial's run resumed by hand). The step is the epoch, so a pruner's ``n_warmup_steps`` counts epochs.
    Under DDP rank 0 reports and decides, and every rank stops together."""

    def __init__(
        self,
        monitor: str,
        storage: str | None = None,
        study_name: str | None = None,
        trial_number: int | None = None,
        pruner: Any = None,
        journal_lock: str = "symlink",
    ) -> None:
        super().__init__()
        self.monitor = monitor
        self.storage = storage
        self.study_name = study_name
        self.trial_number = trial_number
        self.pruner = pruner
        self.journal_lock = journal_lock
        self._trial = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.trial_number is None:
            return
        missing = [key for key in ("storage", "study_name") if getattr(self, key) is None]
        if missing:  # on every rank (the same config): no rank is left waiting in a collective
            raise ValueError(
                f"callbacks.optuna_pruning: trial_number={self.trial_number} needs {' and '.join(missing)} "
                "(the Optuna sweeper sets all three)"
            )
        if not trainer.is_global_zero:
            return
        import optuna

        if self.storage == "env":
            if STORAGE_ENV not in os.environ:
                raise ValueError(f"callbacks.optuna_pruning.storage=env, but {STORAGE_ENV} is not set in this job")
            self.storage = os.environ[STORAGE_ENV]
        storage = open_storage(self.storage, self.journal_lock, must_exist=True)
        try:
            study_id = storage.get_study_id_from_name(self.study_name)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(self.trial_number))
        except KeyError as error:
            raise ValueError(
                f"callbacks.optuna_pruning: no trial {self.trial_number} of study '{self.study_name}' in "
                f"{display_storage(self.storage)}"
            ) from error
        state = storage.get_trial(trial_id).state
        if state != optuna.trial.TrialState.RUNNING:
            log.warning("Optuna trial %s has already ended (%s): not reporting to it", self.trial_number, state.name)
            return
        study = optuna.load_study(
            study_name=self.study_name,
            storage=storage,
            sampler=optuna.samplers.RandomSampler(),  # the job never samples: the sweeper did
            pruner=self.pruner if self.pruner is not None else optuna.pruners.NopPruner(),
        )
        self._trial = optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer, pl_module) -> None:
        # on_validation_end, not on_validation_epoch_end: callbacks' epoch-end hooks run before the module's,
        # which logs the epoch's metrics.
        if trainer.sanity_checking or self.trial_number is None:
            return
        if self.monitor not in trainer.callback_metrics:  # every rank logs the same metrics: every rank raises
            raise ValueError(
                f"callbacks.optuna_pruning.monitor={self.monitor} is not a logged metric; "
                f"logged: {', '.join(sorted(trainer.callback_metrics))}"
            )
        prune = False
        if trainer.is_global_zero and self._trial is not None:
            value = float(trainer.callback_metrics[self.monitor])
            self._trial.report(value, step=trainer.current_epoch)
            prune = self._trial.should_prune()
        if trainer.world_size > 1:
            prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            import optuna

            raise optuna.TrialPruned(
                f"trial {self.trial_number} pruned at epoch {trainer.current_epoch} ({self.monitor})"
            )
