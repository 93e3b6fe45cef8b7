"""Trial bookkeeping on a study shared by several sweepers: the attributes a trial carries, which trials count,
heartbeats that tell a live trial from one whose sweeper died, and taking over those dead trials.

Hydra imports this module at start-up to find plugins: Optuna is imported lazily.
"""

import logging
import threading
import time

log = logging.getLogger(__name__)

HEARTBEAT_ATTR = "fetalbrain:heartbeat"  # trial system attr: when its sweeper was last seen alive (epoch s)
VOID_ATTR = "void"  # trial user attr on FAIL trials that do not count (interrupted, or beyond n_trials)
JOB_DIR_ATTR = "job_dir"
FAIL_REASON_ATTR = "fail_reason"
REQUEUED_FROM_ATTR = "requeued_from"


def is_void(trial) -> bool:
    return VOID_ATTR in trial.user_attrs


def is_failure(trial) -> bool:
    import optuna

    return trial.state == optuna.trial.TrialState.FAIL and not is_void(trial)


def count_trials(trials) -> tuple[int, int]:
    """(trials that ended and count, trials running), void ones left out."""
    import optuna

    TrialState = optuna.trial.TrialState
    finished = sum(1 for t in trials if t.state.is_finished() and not is_void(t))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return finished, running


def mark_alive(storage, study_id: int, trial) -> None:
    """Record that this trial's sweeper is alive now (the trial's heartbeat)."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())


class Heartbeat:
    """While a batch runs, mark its trials alive every ``interval`` seconds (heartbeat_interval), so that other sweepers
    (or this command run again) can tell a live trial from one whose sweeper died."""

    def __init__(self, storage, study_id: int, trials: list, interval: float) -> None:
        self.storage, self.study_id, self.trials, self.interval = storage, study_id, trials, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            for trial in self.trials:
                try:
                    mark_alive(self.storage, self.study_id, trial)
                except Exception as error:  # a storage hiccup must not stop the batch; the next beat retries
                    log.warning("Heartbeat of trial %d not recorded: %s", trial.number, error)


def take_over_stale_trials(study, storage, study_id: int, grace_period: float, requeue: bool) -> None:
    """Fail RUNNING trials whose sweeper has not been seen for grace_period seconds (killed, preempted),
    so that they count neither as done nor as failed; queue them again with ``requeue`` (requeue_interrupted)."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError

    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        last_seen = trial.system_attrs.get(HEARTBEAT_ATTR)
        if last_seen is None and trial.datetime_start is not None:
            last_seen = trial.datetime_start.timestamp()
        if last_seen is None or now - last_seen <= grace_period:
            continue
        reason = f"interrupted: its sweeper was last seen {now - last_seen:.0f} s ago (grace_period={grace_period})"
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, VOID_ATTR, reason)
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another sweeper took it over (or it just ended)
        log.warning("Trial %d %s", trial.number, reason)
        if requeue:
            study.enqueue_trial(trial.params, user_attrs={REQUEUED_FROM_ATTR: trial.number})
            log.info("Trial %d queued again with the same parameters", trial.number)
