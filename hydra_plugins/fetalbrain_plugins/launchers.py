"""Hydra launchers for fetalbrain sweeps: ``hydra/launcher=local_parallel`` and ``hydra/launcher=slurm``.

Both build on hydra-submitit-launcher: every job runs in a fresh process through submitit (its own
run folder, its own W&B run) and a job that times out or is preempted is requeued, to continue in
its folder. What they add:

- ``LocalParallelLauncher``: submitit's local launcher starts every job of a sweep at once and gives
  each the same GPUs. This one keeps at most ``max_parallel`` jobs running (a pool: the next job starts
  when one ends), pins each job to its own ``gpus_per_job`` GPUs (``jobs_per_gpu`` small jobs may share
  one) and splits the CPU threads between the jobs running together.
- ``SlurmLauncher``: checks the site settings and the DDP layout before anything is queued (a missing
  partition, ``tasks_per_node`` other than ``trainer.devices``...), each as an error naming the key.

Configs: ``conf/hydra/launcher/{local_parallel,slurm}.yaml`` over the schemas registered below; site
settings in ``conf/local/slurm.yaml`` (see ``conf/local/slurm.example.yaml``). Hydra imports this module
at start-up to find plugins, so submitit and torch are imported inside the methods.
"""

import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from hydra_plugins.hydra_submitit_launcher import config as submitit_config
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import MISSING, DictConfig

log = logging.getLogger(__name__)

SLURM_SITE_EXAMPLE = "conf/local/slurm.example.yaml"
SLURM_SITE_FILE = "conf/local/slurm.yaml"
GPU_ACCELERATORS = ("gpu", "cuda")
# Overrides that change how many GPUs a job uses: gpus_per_job=auto cannot follow them job by job.
GPU_SHAPING_OVERRIDE = re.compile(r"^[+~]*trainer(=|\.devices=|\.accelerator=|\.num_nodes=)")


def check_gpu_shaping_is_fixed(job_overrides: Sequence[Sequence[str]], why: str) -> None:
    """A launcher that reads the trainer's devices once for the whole sweep refuses a sweep that varies them."""
    per_job = [
        dict(o.lstrip("+~").partition("=")[::2] for o in overrides if GPU_SHAPING_OVERRIDE.match(o))
        for overrides in job_overrides
    ]
    for key in sorted({key for job in per_job for key in job}):
        values = {job.get(key) for job in per_job}  # None: the job keeps the config's value
        if len(values) > 1:
            listed = ", ".join(sorted(str(v) for v in values))
            raise LauncherConfigError(f"this sweep varies {key} ({listed}), but {why}")


class LauncherConfigError(CompactHydraException, ValueError):
    """A launcher setting that cannot work; Hydra prints the message alone, without a traceback."""


# ----------------------------------------------------------------------------------------------- schemas
@dataclass
class LocalParallelConf:
    """``hydra/launcher=local_parallel``'s keys and types; their defaults and meaning are in
    ``conf/hydra/launcher/local_parallel.yaml``."""

    _target_: str = "hydra_plugins.fetalbrain_plugins.launchers.LocalParallelLauncher"
    max_parallel: Optional[int] = MISSING
    gpus: Any = MISSING  # auto or a list of GPU names
    gpus_per_job: Any = MISSING  # auto or a number
    jobs_per_gpu: int = MISSING
    cpus_per_task: Optional[int] = MISSING
    timeout_min: int = MISSING
    max_num_timeout: int = MISSING
    signal_delay_s: int = MISSING
    poll_interval_s: float = MISSING
    stderr_to_stdout: bool = MISSING
    setup: Optional[list[str]] = MISSING
    submitit_folder: str = MISSING


@dataclass
class SlurmConf(submitit_config.SlurmQueueConf):
    """``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM keys plus ``required`` (the site settings
    that must be set); ``tasks_per_node``, ``nodes`` and ``gpus_per_node`` take interpolations and ``auto``.
    Defaults and meaning: ``conf/hydra/launcher/slurm.yaml``."""

    _target_: str = "hydra_plugins.fetalbrain_plugins.launchers.SlurmLauncher"
    tasks_per_node: Any = MISSING
    nodes: Any = MISSING
    gpus_per_node: Any = MISSING
    required: list[str] = MISSING


ConfigStore.instance().store(
    group="hydra/launcher", name="local_parallel_schema", node=LocalParallelConf, provider="fetalbrain"
)
ConfigStore.instance().store(group="hydra/launcher", name="slurm_schema", node=SlurmConf, provider="fetalbrain")


# -------------------------------------------------------------------------------------------- the trainer
def _as_int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def trainer_gpus(accelerator: Any, devices: Any, visible: int) -> int:
    """GPUs one job of this trainer uses on a machine with ``visible`` GPUs (Lightning's meaning of
    ``trainer.accelerator`` and ``trainer.devices``)."""
    accelerator = str(accelerator).lower()
    if accelerator not in ("auto", *GPU_ACCELERATORS) or (accelerator == "auto" and visible == 0):
        return 0
    if isinstance(devices, str) and "," in devices:  # Lightning reads "0,1" as GPU indices
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    count = _as_int(devices)
    if count is None or count == -1:  # "auto", -1: every GPU the job sees
        return visible
    if count < 1:
        raise LauncherConfigError(f"trainer.devices={devices!r}: give a number of devices (1 or more), or auto")
    return count


def _check_device_indices(devices: Any) -> None:
    """Each pinned job sees its GPUs numbered from 0: GPU indices in ``trainer.devices`` would name others."""
    indices = devices.split(",") if isinstance(devices, str) and "," in devices else devices
    if isinstance(indices, Sequence) and not isinstance(indices, str):
        named = [_as_int(i) for i in indices if str(i).strip()]
        if named != list(range(len(named))):
            raise LauncherConfigError(
                f"trainer.devices={devices!r} names GPUs by index, but each job of hydra/launcher=local_parallel "
                f"sees only its own GPUs, numbered from 0: use trainer.devices={len(named)}, and "
                "hydra.launcher.gpus=[...] to choose which GPUs the sweep may use"
            )


# ------------------------------------------------------------------------------------------------ the pool
def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA names them: CUDA_VISIBLE_DEVICES (indices or UUIDs, MIG included) when
    set, else every GPU torch counts. Never initialises CUDA."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        gpus = []
        for name in (n.strip() for n in listed.split(",")):
            if not name or name.startswith("-"):  # CUDA stops at the first invalid entry
                break
            gpus.append(name)
        return gpus
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_slots(gpus: Sequence[str], gpus_per_job: int, jobs_per_gpu: int) -> list[tuple[str, ...]]:
    """The GPU sets jobs run on: disjoint groups of ``gpus_per_job`` GPUs, each offered ``jobs_per_gpu``
    times (GPUs left over from the last incomplete group stay idle)."""
    groups = [tuple(gpus[i : i + gpus_per_job]) for i in range(0, len(gpus) - gpus_per_job + 1, gpus_per_job)]
    return [group for _ in range(jobs_per_gpu) for group in groups]


def run_pool(
    jobs: Sequence[Any],
    slots: Sequence[tuple[str, ...]],
    max_parallel: int,
    submit: Callable[[Any, tuple[str, ...]], Any],
    collect: Callable[[Any, Any], Any],
    poll_interval_s: float,
) -> list[Any]:
    """Run ``jobs`` with at most ``max_parallel`` at once, each on a free slot (the one whose GPUs carry the
    fewest running jobs): ``submit(job, gpus)`` starts one and returns a handle with ``done()``, and
    ``collect(job, handle)`` its result. Returns the results in job order; interrupted, it cancels the
    jobs still running."""
    limit = min(max_parallel, len(slots))
    results: list[Any] = [None] * len(jobs)
    running: dict[int, tuple[int, Any]] = {}  # slot -> (job index, handle)
    pending = list(range(len(jobs)))
    try:
        while pending or running:
            while pending and len(running) < limit:
                load: dict[str, int] = {}
                for busy in running:
                    for gpu in slots[busy]:
                        load[gpu] = load.get(gpu, 0) + 1
                free = [s for s in range(len(slots)) if s not in running]
                slot = min(free, key=lambda s: (max((load.get(g, 0) for g in slots[s]), default=0), s))
                index = pending.pop(0)
                running[slot] = (index, submit(jobs[index], slots[slot]))
            for slot, (index, handle) in list(running.items()):
                if handle.done():
                    results[index] = collect(jobs[index], handle)
                    del running[slot]
            if running:
                time.sleep(poll_interval_s)
    finally:
        for _, handle in running.values():
            handle.cancel()
    return results


def usable_cores() -> int:
    """The CPU cores this process may use (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LocalParallelLauncher(submitit_launcher.LocalLauncher):
    """Several jobs at once on one machine, each in its own process pinned to its own GPUs.

    The job itself is submitit's (``BaseSubmititLauncher.__call__``: a fresh process that composes the
    job's config and runs it); ``launch`` replaces submitit's all-at-once map with a pool over GPU slots.
    A job that uses several GPUs (DDP on this node) gets them all and starts its own ranks.
    """

    OWN_KEYS = ("max_parallel", "gpus", "gpus_per_job", "jobs_per_gpu", "cpus_per_task", "poll_interval_s")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.options = {key: self.params.pop(key, None) for key in self.OWN_KEYS}
        self.gpus: list[str] = []  # the GPUs the sweep may use
        self.gpus_per_job = 0
        self.jobs_per_gpu = 1
        self.parallel = 1  # jobs at once
        self.threads = 1  # CPU threads per job

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self._plan(config.get("trainer") or {})

    def _option(self, key: str, minimum: int) -> Optional[int]:
        """A whole-number option (null allowed), or an error naming its key."""
        value = self.options[key]
        number = _as_int(value)
        if value is not None and (number is None or number < minimum):
            raise LauncherConfigError(f"hydra.launcher.{key}={value!r}: give a whole number >= {minimum}, or null")
        return number

    def _plan(self, trainer: Any) -> None:
        """GPUs per job, jobs at once and threads per job, checked before any job starts."""
        self.gpus = self._gpu_list(self.options["gpus"])
        accelerator, devices = trainer.get("accelerator", "auto"), trainer.get("devices", 1)
        where = (
            f"hydra.launcher.gpus={self.options['gpus']}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}"
        )
        if str(accelerator).lower() in GPU_ACCELERATORS and not self.gpus:
            raise LauncherConfigError(
                f"trainer.accelerator={accelerator} but this machine has no GPU for the sweep ({where}): "
                "use trainer.accelerator=cpu (or auto) for CPU jobs"
            )
        if self.options["gpus_per_job"] in (None, "auto"):
            self.gpus_per_job = trainer_gpus(accelerator, devices, len(self.gpus))
            asked = f"trainer.devices={devices} (with hydra.launcher.gpus_per_job=auto)"
        else:
            self.gpus_per_job = self._option("gpus_per_job", 0)
            asked = f"hydra.launcher.gpus_per_job={self.gpus_per_job}"
            needed = trainer_gpus(accelerator, devices, self.gpus_per_job)
            if needed > self.gpus_per_job or (str(accelerator).lower() in GPU_ACCELERATORS and not needed):
                raise LauncherConfigError(
                    f"trainer.accelerator={accelerator} with trainer.devices={devices} needs {needed or 'a'} GPU(s) "
                    f"per job, but {asked} gives each job {self.gpus_per_job}"
                )
        if self.gpus_per_job > len(self.gpus):
            count = f"{len(self.gpus)} GPU{'' if len(self.gpus) == 1 else 's'}"
            raise LauncherConfigError(
                f"{asked} asks for {self.gpus_per_job} GPUs per job but this machine has {count} for the sweep "
                f"({where})"
            )
        if self.gpus_per_job:
            _check_device_indices(devices)
        self.jobs_per_gpu = self._option("jobs_per_gpu", 1) or 1
        cpus_per_task, max_parallel = self._option("cpus_per_task", 1), self._option("max_parallel", 1)
        cores = usable_cores()
        if self.gpus_per_job:  # one job per GPU slot, or fewer
            slots = len(gpu_slots(self.gpus, self.gpus_per_job, self.jobs_per_gpu))
            self.parallel = min(max_parallel or slots, slots)
        else:  # CPU jobs: as many as asked, or one per cpus_per_task cores, else one job with every core
            self.parallel = max_parallel or (max(1, cores // cpus_per_task) if cpus_per_task else 1)
        self.threads = cpus_per_task or max(1, cores // self.parallel)

    @staticmethod
    def _gpu_list(gpus: Any) -> list[str]:
        if gpus in (None, "auto"):
            return visible_gpus()
        if isinstance(gpus, str):
            gpus = [g for g in gpus.split(",") if g.strip()]
        if not isinstance(gpus, Sequence):
            raise LauncherConfigError(f"hydra.launcher.gpus={gpus!r}: give auto or a list of GPUs, e.g. [0,1]")
        return [str(g).strip() for g in gpus]

    def slots(self) -> list[tuple[str, ...]]:
        if self.gpus_per_job:
            return gpu_slots(self.gpus, self.gpus_per_job, self.jobs_per_gpu)
        return [()] * self.parallel

    def _job_environment(self, gpus: tuple[str, ...]) -> list[str]:
        """Shell lines run before the job's process starts: its GPUs and its share of the CPU threads. Inside
        a SLURM allocation, the allocation's SLURM_* variables are dropped: Lightning would take the local
        job for a SLURM task (and refuse a DDP job whose devices differ from the allocation's tasks)."""
        lines = [f"export CUDA_VISIBLE_DEVICES={shlex.quote(','.join(gpus))}"]
        if self.options["cpus_per_task"] or "OMP_NUM_THREADS" not in os.environ:
            lines.append(f"export OMP_NUM_THREADS={self.threads}")
        slurm = sorted(name for name in os.environ if name.startswith("SLURM_"))
        if slurm:
            lines.append(f"unset {' '.join(slurm)}")
        return lines + list(self.params.get("setup") or [])

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        if self.options["gpus_per_job"] in (None, "auto"):
            check_gpu_shaping_is_fixed(
                job_overrides,
                "hydra.launcher.gpus_per_job=auto reads the GPUs per job from the trainer once for the whole sweep: "
                "set hydra.launcher.gpus_per_job to the most any job needs",
            )
        params = self.params
        executor = submitit.LocalExecutor(folder=params["submitit_folder"], max_num_timeout=params["max_num_timeout"])
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        where = f"GPUs {', '.join(self.gpus)}, {self.gpus_per_job} per job" if self.gpus_per_job else "CPU"
        log.info(
            f"Local parallel sweep ({where}; at most {self.parallel} jobs at once, {self.threads} CPU threads "
            f"each), output dir: {sweep_dir}"
        )
        jobs = []
        for number, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
            jobs.append((list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state()))

        def submit(job: tuple, gpus: tuple[str, ...]):
            executor.update_parameters(
                timeout_min=params["timeout_min"],
                signal_delay_s=params["signal_delay_s"],
                stderr_to_stdout=params["stderr_to_stdout"],
                tasks_per_node=1,  # a DDP job starts its own ranks (fetalbrain.distributed)
                setup=self._job_environment(gpus),
            )
            handle = executor.submit(self, *job)
            log.info(f"\t#{job[2]} started (job {handle.job_id}) on {'GPU ' + ','.join(gpus) if gpus else 'CPU'}")
            return handle

        def collect(job: tuple, handle) -> JobReturn:
            try:
                return handle.results()[0]
            except Exception as error:  # the process died (killed, out of memory): fail this job, not the pool
                return JobReturn(overrides=job[0], status=JobStatus.FAILED, _return_value=error)

        return run_pool(jobs, self.slots(), self.parallel, submit, collect, self.options["poll_interval_s"])


# ----------------------------------------------------------------------------------------------------- SLURM
class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher, checked before anything is queued.

    DDP on SLURM: every GPU is one SLURM task (``tasks_per_node = trainer.devices``, ``nodes =
    trainer.num_nodes``), and Lightning's SLURM environment takes the tasks as its ranks. A job that times
    out or is preempted is requeued (``max_num_timeout``) and continues from its run folder.
    """

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.required = list(self.params.pop("required", None) or [])

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self._check(config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        check_gpu_shaping_is_fixed(
            job_overrides,
            "one SLURM array has one shape (tasks, nodes, GPUs per node): run one sweep per trainer setting",
        )
        return super().launch(job_overrides, initial_job_idx)

    def _check(self, config: DictConfig) -> None:
        params = self.params
        for key in self.required:
            if key not in params:
                raise LauncherConfigError(
                    f"hydra.launcher.required names {key}, which is not a key of hydra/launcher=slurm "
                    f"({', '.join(sorted(params))})"
                )
            if params.get(key) in (None, ""):
                raise LauncherConfigError(
                    f"hydra.launcher.{key} is not set: this cluster's SLURM jobs need it (hydra.launcher.required="
                    f"{self.required}). Put your site's settings in {SLURM_SITE_FILE} (copy {SLURM_SITE_EXAMPLE}) "
                    f"or pass hydra.launcher.{key}=..."
                )
        trainer = config.get("trainer") or {}
        accelerator, devices = trainer.get("accelerator", "auto"), trainer.get("devices", 1)
        num_nodes = trainer.get("num_nodes", 1)
        per_node = _as_int(devices)
        if per_node is None or per_node < 1:
            raise LauncherConfigError(
                f"trainer.devices={devices!r}: on SLURM each device is one task (hydra.launcher.tasks_per_node), "
                "so give their number per node, e.g. trainer.devices=4"
            )
        expected = {"tasks_per_node": (per_node, "trainer.devices"), "nodes": (_as_int(num_nodes), "trainer.num_nodes")}
        for key, (value, source) in expected.items():
            if _as_int(params.get(key)) != value:
                raise LauncherConfigError(
                    f"hydra.launcher.{key}={params.get(key)} but {source}={value}: Lightning takes the SLURM tasks "
                    f"as its DDP ranks, so keep them equal ({key} defaults to {source})"
                )
            params[key] = value
        uses_gpus = str(accelerator).lower() in ("auto", *GPU_ACCELERATORS)
        if params.get("gpus_per_node") in (None, "auto"):
            params["gpus_per_node"] = per_node if uses_gpus else 0
        gpus = _as_int(params["gpus_per_node"])
        if gpus is None or gpus < 0:
            raise LauncherConfigError(
                f"hydra.launcher.gpus_per_node={params['gpus_per_node']!r}: give a whole number, or auto"
            )
        if gpus < per_node and (gpus or str(accelerator).lower() in GPU_ACCELERATORS):
            raise LauncherConfigError(
                f"hydra.launcher.gpus_per_node={gpus} but trainer.devices={per_node}: each task (rank) needs its GPU"
            )
        if not uses_gpus and gpus:
            raise LauncherConfigError(
                f"hydra.launcher.gpus_per_node={gpus} reserves GPUs that trainer.accelerator={accelerator} will not "
                "use: set hydra.launcher.gpus_per_node=0 (or auto)"
            )
        params["gpus_per_node"] = gpus or None  # no --gpus-per-node line for CPU jobs
        for key in ("timeout_min", "array_parallelism"):
            if (_as_int(params.get(key)) or 0) < 1:
                raise LauncherConfigError(f"hydra.launcher.{key}={params.get(key)!r}: give 1 or more")
        if not params.get("max_num_timeout"):
            log.warning(
                "hydra.launcher.max_num_timeout=0: a job that reaches its time limit or is preempted is not "
                "requeued (with 1 or more it continues from its run folder)"
            )
