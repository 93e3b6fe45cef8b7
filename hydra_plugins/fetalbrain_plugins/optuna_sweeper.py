"""An Optuna sweeper on a persistent study: ``hydra/sweeper=optuna_study`` (used by ``hparams_search=optuna``).

Why not hydra-optuna-sweeper: 1.3.0 pins optuna < 3, whose RDB storage breaks with SQLAlchemy 2, and one
failed trial stops its sweep. This one drives Optuna's ask/tell API:

- The study lives in a storage that outlives the process: by default a journal file in the sweep folder
  (safe for several processes, on a shared filesystem too), or any path or RDB URL (``sqlite:///x.db``,
  ``postgresql://...``). Sweepers started on one storage and study name share the study and together stop
  at ``n_trials`` trials counted in the study. Running the same command again resumes: finished trials
  are kept, and trials whose sweeper died (no heartbeat for ``grace_period`` seconds) are marked FAIL and,
  with ``requeue_interrupted``, queued again with the same parameters.
- The search space is stored with the study; a study created with another one is refused, naming the
  storage, the study and the parameters that differ.
- Trials run through the configured Hydra launcher in batches of ``n_jobs``, trial N in
  ``<sweep dir>/N``. A failed job fails its trial and the study goes on; the sweep stops only when more
  than ``max_failure_rate`` x ``n_trials`` trials have failed. A job stopped by ``optuna.TrialPruned``
  (``fetalbrain.training.pruning.OptunaPruning``, told its trial through overrides) is recorded as PRUNED.
- A seeded sampler draws trial N with seed + N: a resumed study, or sweepers sharing one, never repeat
  each other's draws.
- After every batch the sweep folder gets ``optimization_results.yaml``, ``trials.csv``,
  ``optimization_history.png`` once a trial has completed and ``param_importances.png`` once two have.

The search space is in ``optuna_space``, trial bookkeeping in ``optuna_trials``, the storage and the sweep folder's
files in ``optuna_files``. Hydra imports these modules at start-up to find plugins: Optuna, pandas and
matplotlib are imported lazily.
"""

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.fetalbrain_plugins.optuna_files import (
    RESULTS_FILE,
    storage_spec,
    write_summary,
)
from hydra_plugins.fetalbrain_plugins.optuna_space import (
    OptunaSweepError,
    check_study,
    format_value,
    grid_values,
    search_space,
    suggest,
)
from hydra_plugins.fetalbrain_plugins.optuna_trials import (
    FAIL_REASON_ATTR,
    JOB_DIR_ATTR,
    REQUEUED_FROM_ATTR,
    VOID_ATTR,
    Heartbeat,
    count_trials,
    is_failure,
    is_void,
    mark_alive,
    take_over_stale_trials,
)

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")


class OptunaStudySweeper(Sweeper):
    """Hydra sweeper over a persistent Optuna study (keys: ``conf/hydra/sweeper/optuna_study.yaml``)."""

    def __init__(
        self,
        study_name: str,
        storage: str | None = None,
        direction: str = "maximize",
        n_trials: int = 20,
        n_jobs: int = 1,
        max_failure_rate: float = 0.25,
        sampler: DictConfig | None = None,
        pruner: DictConfig | None = None,
        params: DictConfig | None = None,
        pruning_callback: str | None = None,
        heartbeat_interval: float = 30.0,
        grace_period: float = 120.0,
        requeue_interrupted: bool = True,
        journal_lock: str = "symlink",
        importance_evaluator: DictConfig | None = None,
    ) -> None:
        self.study_name = study_name
        self.storage = storage
        self.direction = direction
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.sampler_config = sampler
        self.pruner_config = pruner
        self.params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
        self.pruning_callback = pruning_callback
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.requeue_interrupted = requeue_interrupted
        self.journal_lock = journal_lock
        self.importance_evaluator_config = importance_evaluator
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    # -- Hydra's interface

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self._check_settings()
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()  # resolved once: ${now:} is cached
        self.storage_spec = storage_spec(self.storage, self.sweep_dir)

    def sweep(self, arguments: list[str]) -> None:
        import optuna
        from optuna.distributions import distribution_to_json

        from fetalbrain.training.pruning import display_storage, open_storage

        space, fixed = search_space(self.params, arguments)
        if not space:
            raise OptunaSweepError("hydra.sweeper.params: no parameter to search (give choice/range/interval sweeps)")
        self.space = space
        self.fixed = fixed
        self.shown_storage = display_storage(self.storage_spec)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")

        try:
            storage = open_storage(self.storage_spec, self.journal_lock)
        except ValueError as error:
            raise OptunaSweepError(f"hydra.sweeper.storage: {error}") from error
        sampler, n_trials = self._sampler(space)
        pruner = _instantiate("pruner", self.pruner_config)
        self.importance_evaluator = _instantiate("importance_evaluator", self.importance_evaluator_config)
        study = optuna.create_study(
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            study_name=self.study_name,
            direction=self.direction,
            load_if_exists=True,
        )
        self.storage_object = storage
        self.study_id = storage.get_study_id_from_name(self.study_name)
        configured = {name: distribution_to_json(d) for name, d in space.items()}
        check_study(
            study, f"Optuna study '{self.study_name}' in {self.shown_storage}", self.direction, configured, fixed
        )
        pruning = self._pruning_overrides()
        log.info(
            "Optuna study '%s' in %s: %d trial(s) so far, target %d; searching %s",
            self.study_name,
            self.shown_storage,
            len(study.trials),
            n_trials,
            ", ".join(space),
        )

        waiting_logged = None
        while True:
            take_over_stale_trials(
                study, self.storage_object, self.study_id, self.grace_period, self.requeue_interrupted
            )
            trials = study.get_trials(deepcopy=False)
            self._check_failures(study, trials, n_trials)
            finished, running = count_trials(trials)
            if finished >= n_trials:
                break
            to_launch = min(self.n_jobs, n_trials - finished - running)
            if to_launch <= 0:  # the remaining trials run in other sweepers (or in one that died: wait for it)
                numbers = sorted(t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING)
                if numbers != waiting_logged:
                    log.info("Waiting for trial(s) %s, run by other sweepers on this study", numbers)
                    waiting_logged = numbers
                time.sleep(self.heartbeat_interval)
                continue
            waiting_logged = None
            self._run_batch(study, to_launch, n_trials, pruning)
            self._write_summary(study, n_trials)
        self._write_summary(study, n_trials)
        self._log_best(study)

    # -- settings

    def _check_settings(self) -> None:
        def bad(key: str, value: Any, why: str) -> OptunaSweepError:
            return OptunaSweepError(f"hydra.sweeper.{key}={value}: {why}")

        if not isinstance(self.study_name, str) or not self.study_name:
            raise bad("study_name", self.study_name, "give the study a name (sweepers share a study by name)")
        if self.direction not in DIRECTIONS:
            raise bad("direction", self.direction, f"choose one of {', '.join(DIRECTIONS)}")
        for key in ("n_trials", "n_jobs"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, value, "must be a positive integer")
        if not 0 <= self.max_failure_rate <= 1:
            raise bad("max_failure_rate", self.max_failure_rate, "must lie in [0, 1]")
        if not self.heartbeat_interval > 0:
            raise bad("heartbeat_interval", self.heartbeat_interval, "must be positive (seconds)")
        if not self.grace_period > self.heartbeat_interval:
            raise bad(
                "grace_period",
                self.grace_period,
                f"must exceed heartbeat_interval={self.heartbeat_interval}, or live trials look abandoned",
            )
        if self.journal_lock not in ("symlink", "open"):
            raise bad("journal_lock", self.journal_lock, "choose symlink or open")

    def _sampler(self, space: dict) -> tuple[Any, int]:
        """The configured sampler (Optuna's default when null). GridSampler gets the grid of the search space,
        and n_trials is capped at the grid's size."""
        import optuna
        from hydra.utils import get_class

        config = self.sampler_config
        self.grid = False
        if config is None:
            return None, self.n_trials
        target = config.get("_target_")
        try:
            is_grid = target is not None and issubclass(get_class(target), optuna.samplers.GridSampler)
        except Exception as error:
            raise OptunaSweepError(f"hydra.sweeper.sampler._target_={target}: {error}") from error
        self.grid = is_grid
        if not is_grid:
            return _instantiate("sampler", config), self.n_trials
        grid = {name: grid_values(name, distribution) for name, distribution in space.items()}
        size = math.prod(len(values) for values in grid.values())
        if size < self.n_trials:
            log.info("GridSampler: %d grid points, so %d trials (n_trials=%d)", size, size, self.n_trials)
        return _instantiate("sampler", config, search_space=grid), min(self.n_trials, size)

    # -- the study

    def _pruning_overrides(self) -> list[str]:
        """Overrides telling the pruning callback its study (its trial number is added per job)."""
        path = self.pruning_callback
        if not path:
            return []
        node = OmegaConf.select(self.config, path, default=None)
        if node is None:
            log.warning(
                "hydra.sweeper.pruning_callback=%s is not in the config: trials report no intermediate values "
                "and are never pruned",
                path,
            )
            return []
        from fetalbrain.training.pruning import STORAGE_ENV, display_storage

        storage = self.storage_spec
        if display_storage(storage) != storage:  # a password: through the environment, not the job's config
            os.environ[STORAGE_ENV] = storage
            storage = "env"
        return [
            f"{path}.storage={format_value(storage)}",
            f"{path}.study_name={format_value(self.study_name)}",
        ]

    def _check_failures(self, study, trials, n_trials: int) -> None:
        failed = [t for t in trials if is_failure(t)]
        allowed = self.max_failure_rate * n_trials
        if len(failed) <= allowed:
            return
        self._write_summary(study, n_trials)
        last = "; ".join(
            f"trial {t.number} ({t.user_attrs.get(JOB_DIR_ATTR, 'no job folder')}): "
            f"{t.user_attrs.get(FAIL_REASON_ATTR, t.user_attrs.get(VOID_ATTR))}"
            for t in failed[-3:]
        )
        raise OptunaSweepError(
            f"Optuna sweep stopped: {len(failed)} trial(s) of study '{self.study_name}' failed, more than "
            f"hydra.sweeper.max_failure_rate={self.max_failure_rate} x n_trials={n_trials} allows. Last: {last}. "
            f"Fix the cause and run the same command again (storage {self.shown_storage}: finished trials are "
            "kept), or raise max_failure_rate"
        )

    # -- one batch

    def _run_batch(self, study, size: int, n_trials: int, pruning: list[str]) -> None:
        import optuna

        batch = [self._ask(study) for _ in range(size)]
        for trial in batch:
            mark_alive(self.storage_object, self.study_id, trial)
        batch = self._drop_surplus(study, batch, n_trials)
        if not batch:
            return
        overrides = []
        for trial in list(batch):
            trial.set_user_attr(JOB_DIR_ATTR, str(self.sweep_dir / str(trial.number)))
            job = self._job_overrides(trial, pruning)
            try:  # a value the config refuses fails its trial here, not the whole batch in the launcher
                self.validate_batch_is_legal([job])
            except Exception as error:
                reason = f"the job's overrides do not compose: {type(error).__name__}: {error}"
                trial.set_user_attr(FAIL_REASON_ATTR, reason[:2000])
                self._tell(study, trial, state=optuna.trial.TrialState.FAIL)
                log.warning("Trial %d failed: %s", trial.number, reason)
                batch.remove(trial)
                continue
            overrides.append(job)
        if not batch:
            return
        log.info("Launching Optuna trial(s) %s", ", ".join(str(t.number) for t in batch))
        try:
            with Heartbeat(self.storage_object, self.study_id, batch, self.heartbeat_interval):
                returns = list(self.launcher.launch(overrides, initial_job_idx=batch[0].number))
        except CompactHydraException:  # a launcher setting that cannot work: its message stops the sweep
            for trial in batch:
                self._interrupt(study, trial, "not run: the launcher refused its settings")
            raise
        except Exception as error:  # the launcher itself failed for this batch (a cluster job lost)
            log.error("The launcher failed for trial(s) %s: %s", [t.number for t in batch], error, exc_info=error)
            returns = [error] * len(batch)
        except BaseException:  # Ctrl-C: these trials were interrupted, not failed
            for trial in batch:
                self._interrupt(study, trial, "interrupted: the sweeper was stopped")
            raise
        returns += [RuntimeError("the launcher returned no result for this job")] * (len(batch) - len(returns))
        for trial, result in zip(batch, returns):
            state, value, reason = _outcome(result)
            if reason:
                trial.set_user_attr(FAIL_REASON_ATTR, reason[:2000])
            self._tell(study, trial, value, state=state)
            where = self.sweep_dir / str(trial.number)
            if state == optuna.trial.TrialState.COMPLETE:
                log.info("Trial %d: value %s with %s (%s)", trial.number, value, trial.params, where)
            elif state == optuna.trial.TrialState.PRUNED:
                log.info("Trial %d pruned: %s (%s)", trial.number, reason, where)
            else:
                error = result._return_value if isinstance(result, JobReturn) else result
                log.warning(
                    "Trial %d failed: %s (%s)",
                    trial.number,
                    reason,
                    where,
                    exc_info=error if isinstance(error, BaseException) else None,
                )

    def _ask(self, study):
        """A new trial (or a queued one) with its parameters drawn. A seeded sampler draws trial N with seed + N:
        a resumed study, or sweepers sharing one, never repeat each other's draws, and a study run anew
        draws the same trials again."""
        trial = study.ask()
        seed = self.sampler_config.get("seed") if self.sampler_config is not None else None
        if seed is not None and not self.grid:
            study.sampler = _instantiate("sampler", self.sampler_config, seed=int(seed) + trial.number)
        for name, distribution in self.space.items():
            suggest(trial, name, distribution)
        return trial

    def _job_overrides(self, trial, pruning: list[str]) -> list[str]:
        params = [f"{name}={format_value(value)}" for name, value in trial.params.items()]
        trial_number = [f"{self.pruning_callback}.trial_number={trial.number}"] if pruning else []
        return [*self.fixed, *params, *pruning, *trial_number, f"hydra.sweep.subdir={trial.number}"]

    def _drop_surplus(self, study, batch: list, n_trials: int) -> list:
        """Sweepers that asked at the same moment may together pass n_trials: the trials numbered beyond the
        first n_trials that count are failed as void (they count for nothing) and not run."""
        import optuna

        counting = sorted(t.number for t in study.get_trials(deepcopy=False) if not is_void(t))
        keep = []
        for trial in batch:
            if counting.index(trial.number) < n_trials:
                keep.append(trial)
                continue
            trial.set_user_attr(VOID_ATTR, f"not run: the study already had n_trials={n_trials} trials")
            self._tell(study, trial, state=optuna.trial.TrialState.FAIL)
            log.info("Trial %d not run: other sweepers already reached n_trials=%d", trial.number, n_trials)
        return keep

    def _interrupt(self, study, trial, reason: str) -> None:
        import optuna

        try:
            trial.set_user_attr(VOID_ATTR, reason)
            self._tell(study, trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        except Exception as error:  # stopping anyway: the heartbeat takes over what could not be marked
            log.warning("Could not mark trial %d as interrupted: %s", trial.number, error)
            return
        if self.requeue_interrupted:
            study.enqueue_trial(trial.params, user_attrs={REQUEUED_FROM_ATTR: trial.number})

    def _tell(self, study, trial, value: float | None = None, **kwargs) -> None:
        # Another sweeper may have voided the trial (no heartbeat seen): Optuna then warns and skips it.
        kwargs.setdefault("skip_if_finished", True)
        try:
            study.tell(trial, value, **kwargs)
        except RuntimeError as error:
            # GridSampler calls Study.stop() after the last grid point, which Optuna allows only inside
            # optimize(); the trial is stored before that, and n_trials is already capped at the grid's size.
            if not (self.grid and "Study.stop" in str(error)):
                raise

    # -- results

    def _write_summary(self, study, n_trials: int) -> None:
        write_summary(
            study,
            self.sweep_dir,
            storage=self.shown_storage,
            n_trials=n_trials,
            evaluator=self.importance_evaluator,
        )

    def _log_best(self, study) -> None:
        try:
            best = study.best_trial
        except ValueError:
            log.warning("Optuna study '%s': no completed trial", self.study_name)
            return
        log.info("Best trial %d (%s): value %s with %s", best.number, self.direction, best.value, best.params)
        log.info("Study summary: %s", self.sweep_dir / RESULTS_FILE)


def _instantiate(key: str, config: DictConfig | None, **kwargs) -> Any:
    """A ``hydra.sweeper.<key>`` object (sampler, pruner, importance evaluator) from its config; None for null."""
    if config is None:
        return None
    from hydra.utils import instantiate

    try:
        return instantiate(config, **kwargs)
    except Exception as error:
        raise OptunaSweepError(f"hydra.sweeper.{key}: {error}") from error


def _outcome(result: JobReturn | BaseException) -> tuple[Any, float | None, str | None]:
    """(trial state, value, reason) for what the launcher returned for one job."""
    import optuna

    TrialState = optuna.trial.TrialState
    if isinstance(result, BaseException):
        return TrialState.FAIL, None, f"{type(result).__name__}: {result}"
    if result.status == JobStatus.FAILED:
        error = result._return_value  # run_job keeps the job's exception here
        if isinstance(error, optuna.TrialPruned):
            return TrialState.PRUNED, None, str(error) or "pruned"
        return TrialState.FAIL, None, f"{type(error).__name__}: {error}"
    if result.status != JobStatus.COMPLETED:
        return TrialState.FAIL, None, f"the job ended with status {result.status.name}"
    value = result._return_value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if value is None or isinstance(value, bool) or not math.isfinite(number):
        return (
            TrialState.FAIL,
            None,
            f"the job returned {value!r}, not a finite number (is optimized_metric a metric the run logs?)",
        )
    return TrialState.COMPLETE, number, None
