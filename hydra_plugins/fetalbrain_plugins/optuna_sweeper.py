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

Hydra imports this module at start-up to find plugins: Optuna, pandas and matplotlib are imported lazily.
"""

import logging
import math
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SEARCH_SPACE_ATTR = "fetalbrain:search_space"  # study user attr: {param: Optuna distribution JSON}
FIXED_OVERRIDES_ATTR = "fetalbrain:fixed_overrides"  # study user attr: the first sweeper's fixed overrides
HEARTBEAT_ATTR = "fetalbrain:heartbeat"  # trial system attr: when its sweeper was last seen alive (epoch s)
VOID_ATTR = "void"  # trial user attr on FAIL trials that do not count (interrupted, or beyond n_trials)
JOB_DIR_ATTR = "job_dir"
FAIL_REASON_ATTR = "fail_reason"
REQUEUED_FROM_ATTR = "requeued_from"

RESULTS_FILE = "optimization_results.yaml"
TRIALS_FILE = "trials.csv"
IMPORTANCE_PLOT = "param_importances.png"
HISTORY_PLOT = "optimization_history.png"
DEFAULT_JOURNAL = "optuna_study.journal"
DIRECTIONS = ("maximize", "minimize")


class OptunaSweepError(CompactHydraException):
    """A sweep that cannot start or go on: Hydra prints the message without a traceback."""


class StudyMismatchError(OptunaSweepError):
    """The configured study differs from the one in the storage (search space, direction)."""


# --------------------------------------------------------------------------------------- search space


def search_space(params: dict[str, str], arguments: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Optuna distributions from Hydra's sweep grammar, and the fixed overrides to pass to every job.

    ``params`` (``hydra.sweeper.params``, key -> grammar) come first, then the command line, so a command-line
    sweep replaces a configured one and a fixed command-line value (``optimizer.lr=0.001``) takes the key
    out of the search. ``choice(a, b)`` and ``a,b``: categorical; ``range(a, b[, step])``: ints (or floats)
    from a, b excluded, by step; ``interval(a, b)``: floats (ints with ``int(interval(a, b))``);
    ``tag(log, interval(...))`` or ``tag(log, range(a, b))``: log scale."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = [f"{key}={value}" for key, value in params.items()] + list(arguments)
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in parser.parse_overrides(lines):
        name = override.get_key_element()
        space.pop(name, None)
        fixed.pop(name, None)
        if override.is_sweep_override():
            space[name] = _distribution(name, override)
        else:
            fixed[name] = override.input_line
    return space, list(fixed.values())


def _distribution(name: str, override) -> Any:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    tags = set(getattr(value, "tags", ()) or ())
    log_scale = "log" in tags
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        if low is None or high is None or not low < high:
            raise OptunaSweepError(f"{name}: interval({low}, {high}) needs low < high")
        if log_scale and low <= 0:
            raise OptunaSweepError(f"{name}: a log-scale interval needs low > 0, got {low}")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log_scale)
        return FloatDistribution(float(low), float(high), log=log_scale)
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise OptunaSweepError(f"{name}: range({value.start}, {value.stop}, {value.step}) is empty")
        low, high, step = min(values), max(values), abs(value.step)
        if log_scale and (step != 1 or not all(isinstance(v, int) for v in values)):
            raise OptunaSweepError(f"{name}: tag(log, range(...)) needs integers and step 1")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(low, high, step=1 if log_scale else step, log=log_scale)
        return FloatDistribution(float(low), float(high), step=float(step))
    if isinstance(value, ChoiceSweep):
        if log_scale:
            raise OptunaSweepError(f"{name}: tag(log, ...) applies to interval(...) and range(...), not choice(...)")
        choices = list(override.sweep_iterator())
        if not all(isinstance(c, (str, int, float, bool)) for c in choices):
            raise OptunaSweepError(f"{name}: choice(...) takes strings, numbers and booleans, got {choices}")
        return CategoricalDistribution(choices)
    raise OptunaSweepError(f"{name}={override.get_value_element_as_str()}: Optuna cannot sample this sweep")


_PLAIN = re.compile(r"[A-Za-z_/][\w\-./]*")


def format_value(value: Any) -> str:
    """A parameter value as a Hydra override value that parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in ("true", "false", "null", "inf", "nan"):
        return text
    return "'" + text.replace("'", "\\'") + "'"


def grid_values(name: str, distribution) -> list:
    """The values GridSampler walks for one parameter: choices, or the steps of a range."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    step = getattr(distribution, "step", None)
    if step is None or getattr(distribution, "log", False) and step != 1:
        raise OptunaSweepError(
            f"{name}: GridSampler needs choice(...) or range(...); this parameter is continuous (interval)"
        )
    count = int(round((distribution.high - distribution.low) / step)) + 1
    return [type(distribution.low)(distribution.low + i * step) for i in range(count)]


def space_differences(stored: dict[str, str], configured: dict[str, str]) -> list[str]:
    """What differs between two search spaces given as {param: distribution JSON}."""
    from optuna.distributions import json_to_distribution

    differences = []
    for name in sorted(stored.keys() | configured.keys()):
        if name not in configured:
            differences.append(f"{name} only in the stored study ({json_to_distribution(stored[name])})")
        elif name not in stored:
            differences.append(f"{name} only in the config ({json_to_distribution(configured[name])})")
        elif json_to_distribution(stored[name]) != json_to_distribution(configured[name]):
            differences.append(
                f"{name}: stored {json_to_distribution(stored[name])}, configured "
                f"{json_to_distribution(configured[name])}"
            )
    return differences


# ------------------------------------------------------------------------------------------- sweeper


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
        self.storage_spec = self._storage_spec()

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
        pruner = self._instantiate("pruner", self.pruner_config)
        self.importance_evaluator = self._instantiate("importance_evaluator", self.importance_evaluator_config)
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
        self._check_study(study, {name: distribution_to_json(d) for name, d in space.items()}, fixed)
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
            self._take_over_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            self._check_failures(study, trials, n_trials)
            finished, running = _count(trials)
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

    def _storage_spec(self) -> str:
        """The storage as the jobs must see it: an RDB URL as given, a journal file as an absolute path."""
        storage = self.storage
        if storage is None or str(storage).strip() == "":
            return str(self.sweep_dir / DEFAULT_JOURNAL)
        storage = str(storage)
        if "://" in storage:
            if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
                return "sqlite:///" + os.path.abspath(storage[len("sqlite:///") :])  # jobs may run elsewhere
            return storage
        return str(Path(storage).expanduser().absolute())

    def _instantiate(self, key: str, config: DictConfig | None, **kwargs) -> Any:
        if config is None:
            return None
        from hydra.utils import instantiate

        try:
            return instantiate(config, **kwargs)
        except Exception as error:
            raise OptunaSweepError(f"hydra.sweeper.{key}: {error}") from error

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
            return self._instantiate("sampler", config), self.n_trials
        grid = {name: grid_values(name, distribution) for name, distribution in space.items()}
        size = math.prod(len(values) for values in grid.values())
        if size < self.n_trials:
            log.info("GridSampler: %d grid points, so %d trials (n_trials=%d)", size, size, self.n_trials)
        return self._instantiate("sampler", config, search_space=grid), min(self.n_trials, size)

    # -- the study

    def _check_study(self, study, configured: dict[str, str], fixed: list[str]) -> None:
        """Record the search space in a new study; refuse a study created with another space or direction."""
        where = f"Optuna study '{self.study_name}' in {self.shown_storage}"
        stored_direction = study.direction.name.lower()
        if stored_direction != self.direction:
            raise StudyMismatchError(
                f"{where} {stored_direction}s its objective, not hydra.sweeper.direction={self.direction}: "
                "resume it with its own direction, or start another study (hydra.sweeper.study_name or storage)"
            )
        attrs = study.user_attrs
        if SEARCH_SPACE_ATTR not in attrs:
            study.set_user_attr(SEARCH_SPACE_ATTR, configured)
            study.set_user_attr(FIXED_OVERRIDES_ATTR, fixed)
            attrs = study.user_attrs  # a sweeper that started at the same time may have written first
        differences = space_differences(attrs[SEARCH_SPACE_ATTR], configured)
        if differences:
            raise StudyMismatchError(
                f"{where} was created with another search space: {'; '.join(differences)}. Resume it with the "
                "search space it was created with, or start another study (hydra.sweeper.study_name or "
                "hydra.sweeper.storage)"
            )
        before = attrs.get(FIXED_OVERRIDES_ATTR)
        if before is not None and sorted(before) != sorted(fixed):
            log.warning(
                "%s was started with other fixed overrides: %s there, %s here. Its trials may not be comparable",
                where,
                " ".join(sorted(set(before) - set(fixed))) or "none",
                " ".join(sorted(set(fixed) - set(before))) or "none",
            )

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

    def _take_over_stale_trials(self, study) -> None:
        """Fail RUNNING trials whose sweeper has not been seen for grace_period seconds (killed, preempted),
        so that they count neither as done nor as failed; queue them again if requeue_interrupted."""
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError

        now = time.time()
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            last_seen = trial.system_attrs.get(HEARTBEAT_ATTR)
            if last_seen is None and trial.datetime_start is not None:
                last_seen = trial.datetime_start.timestamp()
            if last_seen is None or now - last_seen <= self.grace_period:
                continue
            reason = (
                f"interrupted: its sweeper was last seen {now - last_seen:.0f} s ago (grace_period={self.grace_period})"
            )
            trial_id = self.storage_object.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
            try:
                self.storage_object.set_trial_user_attr(trial_id, VOID_ATTR, reason)
                self.storage_object.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # another sweeper took it over (or it just ended)
            log.warning("Trial %d %s", trial.number, reason)
            if self.requeue_interrupted:
                study.enqueue_trial(trial.params, user_attrs={REQUEUED_FROM_ATTR: trial.number})
                log.info("Trial %d queued again with the same parameters", trial.number)

    def _check_failures(self, study, trials, n_trials: int) -> None:
        failed = [t for t in trials if _is_failure(t)]
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
            self._beat(trial)
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
            with _Heartbeat(self, batch):
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
            study.sampler = self._instantiate("sampler", self.sampler_config, seed=int(seed) + trial.number)
        for name, distribution in self.space.items():
            _suggest(trial, name, distribution)
        return trial

    def _job_overrides(self, trial, pruning: list[str]) -> list[str]:
        params = [f"{name}={format_value(value)}" for name, value in trial.params.items()]
        trial_number = [f"{self.pruning_callback}.trial_number={trial.number}"] if pruning else []
        return [*self.fixed, *params, *pruning, *trial_number, f"hydra.sweep.subdir={trial.number}"]

    def _drop_surplus(self, study, batch: list, n_trials: int) -> list:
        """Sweepers that asked at the same moment may together pass n_trials: the trials numbered beyond the
        first n_trials that count are failed as void (they count for nothing) and not run."""
        import optuna

        counting = sorted(t.number for t in study.get_trials(deepcopy=False) if not _is_void(t))
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

    def _beat(self, trial) -> None:
        trial_id = self.storage_object.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
        self.storage_object.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

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


class _Heartbeat:
    """While a batch runs, mark its trials alive every heartbeat_interval seconds, so that other sweepers
    (or this command run again) can tell a live trial from one whose sweeper died."""

    def __init__(self, sweeper: OptunaStudySweeper, trials: list) -> None:
        self.sweeper = sweeper
        self.trials = trials
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.sweeper.heartbeat_interval):
            for trial in self.trials:
                try:
                    self.sweeper._beat(trial)
                except Exception as error:  # a storage hiccup must not stop the batch; the next beat retries
                    log.warning("Heartbeat of trial %d not recorded: %s", trial.number, error)


def _suggest(trial, name: str, distribution) -> Any:
    """Draw one parameter through the public suggest API (a queued trial gets its queued value)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    suggest = trial.suggest_float if isinstance(distribution, FloatDistribution) else trial.suggest_int
    return suggest(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


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


def _is_void(trial) -> bool:
    return VOID_ATTR in trial.user_attrs


def _is_failure(trial) -> bool:
    import optuna

    return trial.state == optuna.trial.TrialState.FAIL and not _is_void(trial)


def _count(trials) -> tuple[int, int]:
    """(trials that ended and count, trials running), void ones left out."""
    import optuna

    TrialState = optuna.trial.TrialState
    finished = sum(1 for t in trials if t.state.is_finished() and not _is_void(t))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return finished, running


# ------------------------------------------------------------------------------------------- summary


def _replace_atomically(path: Path, write) -> None:
    """Write through a temporary file: sweepers sharing a sweep folder never leave a half-written file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def trials_table(study):
    """One row per trial: number, state, value, duration, job folder, note, then one column per parameter."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        note = t.user_attrs.get(VOID_ATTR) or t.user_attrs.get(FAIL_REASON_ATTR) or ""
        if REQUEUED_FROM_ATTR in t.user_attrs:
            note = f"requeued from trial {t.user_attrs[REQUEUED_FROM_ATTR]}; {note}".rstrip("; ")
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "duration_s": round(duration, 1) if duration is not None else None,
                "datetime_start": t.datetime_start,
                "job_dir": t.user_attrs.get(JOB_DIR_ATTR, ""),
                "note": note,
                **t.params,
            }
        )
    return pd.DataFrame(rows)


def write_summary(study, sweep_dir: Path, storage: str, n_trials: int, evaluator=None) -> dict:
    """optimization_results.yaml, trials.csv and the plots, from the study alone (so every sweeper on a
    shared study writes the same picture). Returns the results written."""
    import optuna
    import yaml

    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    void = sum(1 for t in trials if _is_void(t))
    results: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "storage": storage,
        "direction": study.direction.name.lower(),
        "n_trials": n_trials,
        "trials": {s.name: states.get(s.name, 0) for s in optuna.trial.TrialState},
        "void_trials": void,  # FAIL trials that did not count: interrupted (and requeued) or beyond n_trials
        "best_trial": None,
        "best_value": None,
        "best_params": None,
        "best_job_dir": None,
    }
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if completed:
        best = study.best_trial
        results.update(
            best_trial=best.number,
            best_value=float(best.value),
            best_params=dict(best.params),
            best_job_dir=best.user_attrs.get(JOB_DIR_ATTR),
        )
    importances, why_not = _importances(study, completed, evaluator)
    results["param_importances"] = importances
    if why_not:
        results["param_importances_note"] = why_not
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _replace_atomically(sweep_dir / TRIALS_FILE, lambda p: trials_table(study).to_csv(p, index=False))
    if importances:
        _replace_atomically(
            sweep_dir / IMPORTANCE_PLOT, lambda p: _plot_importances(importances, study, len(completed), p)
        )
    if completed:
        _replace_atomically(sweep_dir / HISTORY_PLOT, lambda p: _plot_history(study, completed, p))
    _replace_atomically(
        sweep_dir / RESULTS_FILE,
        lambda p: p.write_text(yaml.safe_dump(results, sort_keys=False, allow_unicode=True)),
    )
    return results


def _importances(study, completed: list, evaluator) -> tuple[dict[str, float] | None, str | None]:
    """Parameter importances (Optuna's default evaluator unless one is configured), or why there are none."""
    import optuna

    if len(completed) < 2:
        return None, f"parameter importances need at least 2 completed trials, the study has {len(completed)}"
    if len({t.value for t in completed}) < 2:
        return None, "parameter importances say nothing: every completed trial has the same value"
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
        return None, f"parameter importances not computable: {error}"
    if not importances:
        return None, "parameter importances not computable: no parameter varies among the completed trials"
    return {name: float(value) for name, value in importances.items()}, None


def _plot_importances(importances: dict[str, float], study, n_completed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]  # most important at the top
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (normalised)")
    ax.set_title(f"Optuna study '{study.study_name}': {n_completed} completed trials", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def _plot_history(study, completed: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    completed = sorted(completed, key=lambda t: t.number)
    numbers = [t.number for t in completed]
    values = [t.value for t in completed]
    pick = max if study.direction.name == "MAXIMIZE" else min
    best = [pick(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(numbers, values, "o", color="tab:blue", label="trial")
    ax.step(numbers, best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.set_title(f"Optuna study '{study.study_name}' ({study.direction.name.lower()})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
