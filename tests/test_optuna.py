"""The Optuna sweeper on a persistent study (hydra_plugins/fetalbrain_plugins/optuna_sweeper.py) and the pruning
callback (fetalbrain/training/pruning.py): real sweeps from the command line, plus the pieces that need no training."""

import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

# Read the sweeper's names through the module: Hydra's plugin scan executes it again, rebinding its classes.
import hydra_plugins.fetalbrain_plugins.optuna_sweeper as sweeper_module
from fetalbrain.training.pruning import StudyStorageError, display_storage, open_storage
from hydra_plugins.fetalbrain_plugins import optuna_files, optuna_space, optuna_trials
from tests.conftest import CONF, ROOT, TINY, run_cli, run_main

SWEEP = ["hparams_search=optuna", *TINY, "model=cnn"]
TOLERANT = ["hydra.sweeper.max_failure_rate=0.5"]  # one failed trial of 2 or 3 is fine
ALWAYS_PRUNE = ["~hydra.sweeper.pruner", "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:2.0}"]
# Every knob pinned but the label smoothing, whose second value makes the loss raise in the first step.
PINNED = [
    "optimizer.lr=0.001",
    "optimizer.weight_decay=0.01",
    "data/transforms=default",
    "model.label_smoothing=choice(0.0, 2.0)",
]
GRID = ["~hydra.sweeper.sampler", "+hydra.sweeper.sampler={_target_:optuna.samplers.GridSampler,seed:0}"]
TrialState = optuna.trial.TrialState


def run_sweep_expecting_failure(*arguments: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "fetalbrain.train", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode != 0, result.stdout[-2000:]
    return result


def load(storage, study_name: str = "fetalbrain") -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=open_storage(str(storage), must_exist=True))


def job_folders(sweep_dir) -> list[str]:
    return sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())


# ------------------------------------------------------------------------------------ command line


def test_study_runs_survives_a_failure_resumes_and_prunes(tmp_path):
    # A grid over one label smoothing that trains and one the loss refuses: the failure is recorded and the
    # study goes on. n_trials is capped at the grid's 2 points; the study is a journal file in the sweep folder.
    first = tmp_path / "first"
    run_main("train", *SWEEP, *PINNED, *GRID, *TOLERANT, "hydra.sweeper.n_trials=5", f"hydra.sweep.dir={first}")
    storage = first / "optuna_study.journal"
    assert job_folders(first) == ["0", "1"] and storage.is_file()
    trials = pd.read_csv(first / optuna_files.TRIALS_FILE).set_index("model.label_smoothing")
    assert trials.loc[0.0, "state"] == "COMPLETE" and trials.loc[2.0, "state"] == "FAIL"
    assert "label_smoothing" in trials.loc[2.0, "note"] and trials.loc[0.0, "job_dir"].startswith(str(first))
    results = yaml.safe_load((first / optuna_files.RESULTS_FILE).read_text())
    assert results["best_params"] == {"model.label_smoothing": 0.0} and 0 <= results["best_value"] <= 1
    assert results["n_trials"] == 2 and results["trials"]["FAIL"] == 1 and results["storage"] == str(storage)
    assert "2 completed trials" in results["param_importances_note"]

    # The same search on the same storage resumes: n_trials counts the study's trials, so one new job, here a
    # trial queued from Python. A pruner that prunes everything below 2 stops it after its first validation.
    load(storage).enqueue_trial({"model.label_smoothing": 0.0})
    second = tmp_path / "second"
    run_main(
        "train",
        *SWEEP,
        *PINNED,
        *TOLERANT,
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.n_trials=3",
        *ALWAYS_PRUNE,
        f"hydra.sweep.dir={second}",
    )
    assert job_folders(second) == ["2"] and not (second / "2" / "metrics.json").is_file()
    pruned = load(storage).trials[2]
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [0]  # epoch 0, no sanity check
    assert yaml.safe_load((second / optuna_files.RESULTS_FILE).read_text())["trials"] == {
        "RUNNING": 0,
        "COMPLETE": 1,
        "PRUNED": 1,
        "FAIL": 1,
        "WAITING": 0,
    }


# ------------------------------------------------------------------------------------ the sweeper in-process
# Composed and instantiated as Hydra does, on a real storage; only the launcher is a stand-in, so these run
# in a second each. The command-line tests above and below run real jobs.


class FakeLauncher:
    """Returns ``outcome(params)`` for each job (a value, or an exception the job raised), recording the jobs."""

    def __init__(self, outcome):
        self.outcome = outcome
        self.batches: list[list[list[str]]] = []

    def launch(self, job_overrides, initial_job_idx):
        self.batches.append([list(o) for o in job_overrides])
        results = []
        for overrides in job_overrides:
            params = dict(o.split("=", 1) for o in overrides if not o.startswith(("hydra.", "callbacks.")))
            value = self.outcome(params)
            result = JobReturn()
            result.status = JobStatus.FAILED if isinstance(value, Exception) else JobStatus.COMPLETED
            result.return_value = value
            results.append(result)
        return results


def sweep(tmp_path, *overrides, outcome=lambda params: float(params["optimizer.lr"])) -> FakeLauncher:
    """One sweep of ``hparams_search=optuna`` with the given overrides, its jobs answered by ``outcome``."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext, RunMode

    arguments = ["hparams_search=optuna", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            cfg = loader.load_configuration("train", arguments, run_mode=RunMode.MULTIRUN)
            context = HydraContext(config_loader=loader, callbacks=Callbacks())
            sweeper = Plugins.instance().instantiate_sweeper(config=cfg, hydra_context=context, task_function=print)
            sweeper.launcher = launcher = FakeLauncher(outcome)
            sweeper.sweep(list(cfg.hydra.overrides.task))
    finally:
        GlobalHydra.instance().clear()
    return launcher


def test_sweepers_on_one_storage_count_the_study_s_trials_and_refuse_another_space(tmp_path):
    storage = tmp_path / "study.journal"
    first = sweep(tmp_path, f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2")
    assert [len(batch) for batch in first.batches] == [2, 1]  # batches of n_jobs, up to n_trials
    jobs = [job for batch in first.batches for job in batch]
    for number, job in enumerate(jobs):  # trial N runs in <sweep dir>/N, its pruning callback told its trial
        assert f"hydra.sweep.subdir={number}" in job and f"callbacks.optuna_pruning.trial_number={number}" in job
        assert f"callbacks.optuna_pruning.storage={storage}" in job and "hparams_search=optuna" in job
    study = load(storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert study.best_value == max(float(dict(o.split("=", 1) for o in j)["optimizer.lr"]) for j in jobs)

    assert sweep(tmp_path, f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=3").batches == []
    assert len(sweep(tmp_path, f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=4").batches) == 1

    with pytest.raises(optuna_space.StudyMismatchError) as refused:
        sweep(tmp_path, f"hydra.sweeper.storage={storage}", "optimizer.lr=interval(0.001, 0.1)")
    assert str(storage) in str(refused.value) and "optimizer.lr: stored" in str(refused.value)
    assert len(load(storage).trials) == 4


def test_failures_count_against_max_failure_rate_and_stop_the_sweep_beyond_it(tmp_path):
    outcomes = iter([None, ValueError("out of memory"), 0.5, ValueError("out of memory")])  # None: no metric
    with pytest.raises(optuna_space.OptunaSweepError, match="max_failure_rate=0.25 x n_trials=8") as stopped:
        sweep(
            tmp_path,
            "hydra.sweeper.n_trials=8",
            "hydra.sweeper.max_failure_rate=0.25",
            outcome=lambda _: next(outcomes),
        )
    assert "ValueError: out of memory" in str(stopped.value)
    trials = pd.read_csv(tmp_path / "sweep" / optuna_files.TRIALS_FILE)
    assert trials["state"].tolist() == ["FAIL", "FAIL", "COMPLETE", "FAIL"]  # 3 failures > 0.25 x 8
    assert "not a finite number" in trials["note"][0]


def test_a_launcher_refusing_its_settings_stops_the_sweep_with_its_trials_queued_again(tmp_path):
    from hydra.errors import CompactHydraException

    def refuse(params):
        raise CompactHydraException("hydra.launcher.partition: missing")

    with pytest.raises(CompactHydraException, match="partition"):
        sweep(tmp_path, "hydra.sweeper.n_trials=2", outcome=refuse)
    refused, queued = load(tmp_path / "sweep" / "optuna_study.journal").trials
    assert refused.state == TrialState.FAIL and "launcher refused" in refused.user_attrs["void"]
    assert queued.state == TrialState.WAITING and queued.user_attrs["requeued_from"] == 0


def test_trials_of_a_dead_sweeper_are_voided_and_queued_again(tmp_path):
    storage = tmp_path / "study.journal"
    sweep(tmp_path, f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=1")
    backend = open_storage(str(storage))
    study = optuna.load_study(study_name="fetalbrain", storage=backend)
    orphan = study.ask({"optimizer.lr": FloatDistribution(0.0001, 0.01, log=True)})  # as a killed sweeper left it
    orphan_id = backend.get_trial_id_from_study_id_trial_number(
        backend.get_study_id_from_name("fetalbrain"), orphan.number
    )
    backend.set_trial_system_attr(orphan_id, optuna_trials.HEARTBEAT_ATTR, time.time() - 600)  # 10 min silent

    resumed = sweep(tmp_path, f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=3")
    trials = load(storage).trials
    assert trials[orphan.number].state == TrialState.FAIL and "interrupted" in trials[orphan.number].user_attrs["void"]
    (requeued,) = [t for t in trials if t.user_attrs.get("requeued_from") == orphan.number]
    assert requeued.params["optimizer.lr"] == orphan.params["optimizer.lr"] and requeued.state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3 and len(resumed.batches) == 2
    results = yaml.safe_load((tmp_path / "sweep" / optuna_files.RESULTS_FILE).read_text())
    assert results["void_trials"] == 1 and results["trials"]["COMPLETE"] == 3


# ------------------------------------------------------------------------------------ pieces


def test_sweep_grammar_becomes_optuna_distributions():
    params = {
        "optimizer.lr": "tag(log, interval(0.0001, 0.01))",
        "data.batch_size": "choice(16, 32, 64)",
        "model.depth": "range(1, 10, 3)",
        "model.width": "int(interval(8, 64))",
        "optimizer.weight_decay": "interval(0.0, 0.1)",
        "data/transforms": "choice(default, strong)",
    }
    space, fixed = optuna_space.search_space(
        params, ["optimizer.weight_decay=0.01", "+trainer.limit_train_batches=2", "s=a,b"]
    )
    assert space == {
        "optimizer.lr": FloatDistribution(0.0001, 0.01, log=True),
        "data.batch_size": CategoricalDistribution([16, 32, 64]),
        "model.depth": IntDistribution(1, 7, step=3),  # Hydra's range excludes its end
        "model.width": IntDistribution(8, 64),
        "data/transforms": CategoricalDistribution(["default", "strong"]),
        "s": CategoricalDistribution(["a", "b"]),
    }
    assert fixed == ["optimizer.weight_decay=0.01", "+trainer.limit_train_batches=2"]  # a fixed value pins a key
    for bad in ("x=glob(*)", "x=tag(log, interval(0, 1))", "x=tag(log, choice(1, 2))"):
        with pytest.raises(optuna_space.OptunaSweepError, match="x"):
            optuna_space.search_space({}, [bad])


def test_trial_n_draws_with_seed_plus_n_so_a_resumed_study_draws_what_an_unbroken_one_would():
    from omegaconf import OmegaConf

    def sweeper():
        tpe = OmegaConf.create({"_target_": "optuna.samplers.TPESampler", "seed": 7, "n_startup_trials": 2})
        instance = sweeper_module.OptunaStudySweeper(study_name="s", sampler=tpe)
        instance.space, instance.grid = {"x": FloatDistribution(0.0, 1.0), "k": IntDistribution(1, 9)}, False
        return instance

    def run(study, instance, n):
        for _ in range(n):
            trial = instance._ask(study)
            study.tell(trial, trial.params["x"])

    unbroken, resumed = optuna.create_study(direction="maximize"), optuna.create_study(direction="maximize")
    run(unbroken, sweeper(), 4)
    run(resumed, sweeper(), 1)
    run(resumed, sweeper(), 3)  # a new process: its sampler starts afresh
    assert [t.params for t in resumed.trials] == [t.params for t in unbroken.trials]
    assert len({t.params["x"] for t in resumed.trials}) == 4


def test_parameter_values_parse_back_from_their_overrides():
    parser = OverridesParser.create()
    for value in (0.0001, 1e-05, 3, 2.0, True, "default", "strong/v2", "a b", "it's", "1e-3", "null", "x:y"):
        assert parser.parse_override(f"key={optuna_space.format_value(value)}").value() == value, value


def test_space_differences_name_the_parameters():
    from optuna.distributions import distribution_to_json

    def as_json(space):
        return {k: distribution_to_json(v) for k, v in space.items()}

    stored = as_json({"lr": FloatDistribution(1e-4, 1e-2, log=True), "bs": CategoricalDistribution([16, 32])})
    configured = as_json({"lr": FloatDistribution(1e-3, 1e-1, log=True), "wd": FloatDistribution(0.0, 0.1)})
    differences = optuna_space.space_differences(stored, configured)
    assert [d.split()[0] for d in differences] == ["bs", "lr:", "wd"]
    assert optuna_space.space_differences(stored, dict(stored)) == []


def test_storage_refuses_files_that_are_not_journals(tmp_path):
    notes = tmp_path / "notes.yaml"
    notes.write_text("a: 1\n")
    with pytest.raises(StudyStorageError, match=str(notes)):
        open_storage(str(notes))
    database = tmp_path / "study.db"
    optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
    with pytest.raises(StudyStorageError, match="sqlite:///"):
        open_storage(str(database))
    assert len(load(f"sqlite:///{database}", "s").trials) == 0  # as an RDB URL it opens
    with pytest.raises(StudyStorageError, match="does not exist"):
        open_storage(str(tmp_path / "missing.journal"), must_exist=True)
    assert display_storage("postgresql://me:secret@db/optuna") == "postgresql://me:***@db/optuna"


def test_job_results_become_trial_states():
    def outcome(status, value):
        result = JobReturn()
        result.status, result.return_value = status, value
        return sweeper_module._outcome(result)

    assert outcome(JobStatus.COMPLETED, 0.25)[:2] == (TrialState.COMPLETE, 0.25)
    assert outcome(JobStatus.FAILED, optuna.TrialPruned("pruned at epoch 2"))[0] == TrialState.PRUNED
    assert outcome(JobStatus.FAILED, ValueError("bad batch size")) == (
        TrialState.FAIL,
        None,
        "ValueError: bad batch size",
    )
    for returned in (None, math.nan, math.inf, "n/a"):  # a missing or non-finite metric is a failure
        state, _, reason = outcome(JobStatus.COMPLETED, returned)
        assert state == TrialState.FAIL and "optimized_metric" in reason
    assert sweeper_module._outcome(RuntimeError("SLURM job lost"))[0] == TrialState.FAIL  # the launcher itself failed


def test_summary_has_best_trial_importances_and_plots(tmp_path):
    study = optuna.create_study(storage=open_storage(str(tmp_path / "s.journal")), study_name="s", direction="maximize")
    study.optimize(lambda t: t.suggest_float("lr", 0.0, 1.0) - 0.1 * t.suggest_int("depth", 1, 4), n_trials=8)
    results = optuna_files.write_summary(study, tmp_path / "sweep", storage="s.journal", n_trials=8)
    assert results["best_value"] == pytest.approx(study.best_value) and results["best_params"] == study.best_params
    assert set(results["param_importances"]) == {"lr", "depth"}
    assert (tmp_path / "sweep" / optuna_files.IMPORTANCE_PLOT).is_file()
    assert len(pd.read_csv(tmp_path / "sweep" / optuna_files.TRIALS_FILE)) == 8


# ------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_requeues_its_interrupted_trial(tmp_path):
    storage = tmp_path / "study.journal"
    command = [
        *SWEEP,
        "trainer.max_epochs=3",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=4",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "fetalbrain.train", *command, f"hydra.sweep.dir={tmp_path / 'killed'}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not (storage.is_file() and any(t.state == TrialState.RUNNING for t in load(storage).trials)):
            assert process.poll() is None and time.time() < deadline, "the sweep never started a trial"
            time.sleep(0.2)
    finally:  # killed like a preempted job: no chance to mark its trial
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    (killed,) = [t for t in load(storage).trials if t.state == TrialState.RUNNING]

    run_cli("train", *command, f"hydra.sweep.dir={tmp_path / 'resumed'}")
    trials = load(storage).trials
    assert trials[killed.number].state == TrialState.FAIL and "interrupted" in trials[killed.number].user_attrs["void"]
    requeued = [t for t in trials if t.user_attrs.get("requeued_from") == killed.number]
    assert len(requeued) == 1 and requeued[0].params == killed.params and requeued[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2 and len(trials) == 3
    results = yaml.safe_load((tmp_path / "resumed" / optuna_files.RESULTS_FILE).read_text())
    assert results["void_trials"] == 1 and results["trials"]["COMPLETE"] == 2


@pytest.mark.slow
def test_two_sweepers_share_one_sqlite_study_and_stop_together(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = [sys.executable, "-m", "fetalbrain.train", *SWEEP, "hydra.sweeper.n_trials=3"]
    command += [f"hydra.sweeper.storage='{storage}'", "hydra.sweeper.heartbeat_interval=1"]
    workers = [
        subprocess.Popen([*command, f"hydra.sweep.dir={tmp_path / f'worker{i}'}"], cwd=ROOT, stderr=subprocess.PIPE)
        for i in range(2)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=900)
        assert worker.returncode == 0, stderr.decode()[-3000:]
    trials = load(storage).trials
    counted = [t for t in trials if "void" not in t.user_attrs]
    assert len(counted) == 3 and all(t.state == TrialState.COMPLETE for t in counted)
    ran = sorted(int(n) for i in range(2) for n in job_folders(tmp_path / f"worker{i}"))
    assert ran == sorted(t.number for t in counted)  # each trial ran once, in one worker
    for i in range(2):  # both wrote the same study's summary
        assert (
            yaml.safe_load((tmp_path / f"worker{i}" / optuna_files.RESULTS_FILE).read_text())["trials"]["COMPLETE"] == 3
        )


@pytest.mark.slow
def test_another_search_space_on_a_study_is_refused_from_the_command_line(tmp_path):
    storage = tmp_path / "study.journal"
    run_cli(
        "train",
        *SWEEP,
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.n_trials=1",
        f"hydra.sweep.dir={tmp_path / 'a'}",
    )
    refused = run_sweep_expecting_failure(
        *SWEEP,
        f"hydra.sweeper.storage={storage}",
        "optimizer.lr=interval(0.001, 0.1)",
        f"hydra.sweep.dir={tmp_path / 'b'}",
    )
    assert str(storage) in refused.stderr and "optimizer.lr" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and len(load(storage).trials) == 1


@pytest.mark.slow
def test_too_many_failures_stop_the_sweep_with_the_reason(tmp_path):
    failed = run_sweep_expecting_failure(
        *SWEEP,
        "model.label_smoothing=2.0",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.max_failure_rate=0",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert "Optuna sweep stopped" in failed.stderr and "label_smoothing" in failed.stderr, failed.stderr[-2000:]
    assert job_folders(tmp_path) == ["0"]
    assert yaml.safe_load((tmp_path / optuna_files.RESULTS_FILE).read_text())["trials"]["FAIL"] == 1
