"""Launchers: a local sweep of 2 jobs in parallel processes, GPU pinning on a fake 4-GPU machine, and the
sbatch script a SLURM sweep submits (rendered through submitit with a stand-in ``sbatch``; no cluster here).

Setting errors are matched as ValueError: Hydra's plugin scan re-executes the launchers module, so its error
class may be a fresh copy of the one imported here."""

import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import HydraContext
from omegaconf import OmegaConf

from hydra_plugins.fetalbrain_plugins.launchers import (
    LocalParallelLauncher,
    check_gpu_shaping_is_fixed,
    gpu_slots,
    run_pool,
    trainer_gpus,
    usable_cores,
)
from tests.conftest import CONF, TINY, run_main


def _started_and_ended(job_folder: Path) -> tuple[datetime, datetime]:
    """When a submitit job's process started (its log's first line) and ended (its result file)."""
    out = next(job_folder.glob("*_log.out")).read_text()
    started = datetime.strptime(out.split("(", 1)[1][:23], "%Y-%m-%d %H:%M:%S,%f")
    return started, datetime.fromtimestamp(next(job_folder.glob("*_result.pkl")).stat().st_mtime)


def test_local_parallel_sweep_runs_two_jobs_at_once_each_in_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the launcher gives each job its share of the cores
    sweep = tmp_path / "sweep"
    run_main(
        "train",
        "-m",
        "model=cnn,separable",
        "hydra/launcher=local_parallel",
        "hydra.launcher.max_parallel=2",
        "hydra.launcher.poll_interval_s=0.2",
        *[o for o in TINY if not o.startswith("logger=")],
        "logger=wandb",
        f"hydra.sweep.dir={sweep}",
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    models, wandb_runs = set(), set()
    cores = usable_cores()
    for job in jobs:
        summary = json.loads((job / "metrics.json").read_text())
        models.add(summary["run"]["model"])
        assert "test/f1_macro" in summary["metrics"]
        assert summary["run"]["torch_threads"] == max(1, cores // 2)  # the cores shared by the 2 jobs at once
        (offline,) = (job / "wandb").glob("offline-run-*")
        wandb_runs.add(offline.name.rsplit("-", 1)[-1])
    assert models == {"cnn", "separable"} and len(wandb_runs) == 2
    processes = [p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    assert len(processes) == 2  # each job in its own process
    (start_a, end_a), (start_b, end_b) = (_started_and_ended(p) for p in processes)
    assert start_a < end_b and start_b < end_a  # they ran at the same time


# ------------------------------------------------------------------------------------- pool and pinning
class FakeJob:
    """A job that finishes after a given number of polls."""

    def __init__(self, polls: int):
        self.polls, self.cancelled = polls, False

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def cancel(self) -> None:
        self.cancelled = True


def _run_fake_pool(durations: list[int], slots, max_parallel: int):
    running: dict[int, tuple[str, ...]] = {}
    handles: dict[int, FakeJob] = {}
    history = []  # the GPU sets in use each time a job starts

    def submit(job: int, gpus: tuple[str, ...]):
        for other in [j for j in running if handles[j].polls < 0]:
            del running[other]
        running[job] = gpus
        history.append(dict(running))
        handles[job] = FakeJob(durations[job])
        return handles[job]

    results = run_pool(list(range(len(durations))), slots, max_parallel, submit, lambda j, h: f"job {j}", 0)
    return results, history


def test_pool_pins_each_job_to_its_own_gpus_and_honours_max_parallel():
    gpus = ["0", "1", "2", "3"]
    assert gpu_slots(gpus, 1, 1) == [("0",), ("1",), ("2",), ("3",)]
    assert gpu_slots(gpus, 2, 1) == [("0", "1"), ("2", "3")]
    assert gpu_slots(gpus, 3, 1) == [("0", "1", "2")]  # GPU 3 cannot make a second group of 3
    durations = [3, 1, 4, 1, 5, 2, 6, 1, 2]
    results, history = _run_fake_pool(durations, gpu_slots(gpus, 1, 1), max_parallel=3)
    assert results == [f"job {j}" for j in range(len(durations))]  # in job order, whatever finished first
    assert max(len(r) for r in history) == 3
    for running in history:  # disjoint GPU sets
        used = [g for gpus_of_job in running.values() for g in gpus_of_job]
        assert len(used) == len(set(used))
    results, history = _run_fake_pool(durations, gpu_slots(gpus, 2, 1), max_parallel=8)
    assert max(len(r) for r in history) == 2 and all(len(g) == 2 for r in history for g in r.values())


def test_jobs_per_gpu_shares_each_gpu_evenly():
    slots = gpu_slots(["0", "1", "2"], 1, 2)
    assert slots == [("0",), ("1",), ("2",), ("0",), ("1",), ("2",)]
    for max_parallel in (2, 3, 5, 6):
        _, history = _run_fake_pool([5, 1, 3, 1, 4, 1, 5, 2, 6, 1], slots, max_parallel)
        assert max(len(r) for r in history) == max_parallel
        for running in history:
            load = [gpu for gpus in running.values() for gpu in gpus]
            assert max(load.count(g) for g in "012") - min(load.count(g) for g in "012") <= 1  # balanced
            assert max(load.count(g) for g in "012") <= 2  # jobs_per_gpu


def test_interrupted_pool_cancels_running_jobs():
    handles = []

    def submit(job, gpus):
        handles.append(FakeJob(10**6))
        if len(handles) == 2:
            raise KeyboardInterrupt
        return handles[-1]

    with pytest.raises(KeyboardInterrupt):
        run_pool([0, 1, 2], [()] * 2, 2, submit, lambda j, h: None, 0)
    assert handles[0].cancelled


def _planned(monkeypatch, visible: str, trainer: dict, **options) -> LocalParallelLauncher:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    launcher = LocalParallelLauncher(**{"submitit_folder": "unused", **options})
    launcher._plan(OmegaConf.create(trainer))
    return launcher


def test_gpus_per_job_follows_the_trainer_and_errors_name_the_key(monkeypatch):
    gpu = {"accelerator": "gpu", "devices": 1}
    launcher = _planned(monkeypatch, "0,1,2,3", gpu, jobs_per_gpu=2)
    assert (launcher.gpus_per_job, launcher.parallel) == (1, 8)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # run inside a SLURM allocation: each job is still a local process
    assert launcher._job_environment(("2",)) == [
        "export CUDA_VISIBLE_DEVICES=2",
        "export OMP_NUM_THREADS=" + str(max(1, usable_cores() // 8)),
        "unset " + " ".join(sorted(k for k in os.environ if k.startswith("SLURM_"))),
    ]
    monkeypatch.delenv("SLURM_NTASKS")
    ddp = _planned(monkeypatch, "GPU-aa,GPU-bb,GPU-cc,GPU-dd", {"accelerator": "gpu", "devices": 2}, max_parallel=1)
    assert (ddp.gpus_per_job, ddp.parallel, ddp.slots()) == (2, 1, [("GPU-aa", "GPU-bb"), ("GPU-cc", "GPU-dd")])
    cpu = _planned(monkeypatch, "", {"accelerator": "auto", "devices": 1}, max_parallel=3)
    assert (cpu.gpus_per_job, cpu.parallel, cpu.slots()) == (0, 3, [(), (), ()])
    assert cpu._job_environment(())[0] == "export CUDA_VISIBLE_DEVICES=''"
    assert trainer_gpus("gpu", "auto", 4) == 4 and trainer_gpus("cuda", "0,1", 4) == 2
    assert trainer_gpus("cpu", 4, 4) == 0 and trainer_gpus("auto", 1, 0) == 0

    with pytest.raises(ValueError, match=r"hydra.launcher.gpus_per_job=4 .* this machine has 1 GPU "):
        _planned(monkeypatch, "0", gpu, gpus_per_job=4)
    with pytest.raises(ValueError, match=r"trainer.devices=8 .* this machine has 4 GPUs"):
        _planned(monkeypatch, "0,1,2,3", {"accelerator": "gpu", "devices": 8})
    with pytest.raises(ValueError, match=r"trainer.accelerator=gpu but this machine has no GPU"):
        _planned(monkeypatch, "", gpu)
    with pytest.raises(ValueError, match=r"trainer.devices=\[2, 3\] names GPUs by index"):
        _planned(monkeypatch, "0,1,2,3", {"accelerator": "gpu", "devices": [2, 3]})
    with pytest.raises(ValueError, match=r"devices=2 needs 2 GPU\(s\) per job, but hydra.launcher.gpus_per_job=1"):
        _planned(monkeypatch, "0,1,2,3", {"accelerator": "gpu", "devices": 2}, gpus_per_job=1)
    with pytest.raises(ValueError, match=r"hydra.launcher.max_parallel=0"):
        _planned(monkeypatch, "0", gpu, max_parallel=0)
    with pytest.raises(ValueError, match=r"varies trainer.devices \(1, 2\).*gpus_per_job"):
        check_gpu_shaping_is_fixed(
            [["model=cnn", "trainer.devices=1"], ["model=cnn", "trainer.devices=2"]], "gpus_per_job=auto"
        )
    check_gpu_shaping_is_fixed(
        [["model=cnn", "trainer.devices=2"], ["model=separable", "trainer.devices=2"]], "gpus_per_job=auto"
    )


# ----------------------------------------------------------------------------------------------- SLURM
def _slurm_launcher(overrides: list[str], conf: Path = CONF):
    """The launcher `python -m fetalbrain.train -m hydra/launcher=slurm ...` would build, set up."""
    from hydra.core.utils import setup_globals
    from hydra.utils import instantiate

    import fetalbrain  # noqa: F401  (its config resolvers)
    from fetalbrain.train import main

    GlobalHydra.instance().clear()
    setup_globals()
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
        launcher = instantiate(cfg.hydra.launcher)
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=None)
        try:
            launcher.setup(hydra_context=context, task_function=main, config=cfg)
        finally:
            GlobalHydra.instance().clear()
    return launcher, cfg


def _fake_slurm(folder: Path, monkeypatch) -> Path:
    """`srun` present (submitit checks for it) and an `sbatch` that keeps the script and refuses the job."""
    folder.mkdir()
    (folder / "srun").write_text("#!/bin/sh\nexit 0\n")
    (folder / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {folder}/submitted.sh\necho "test: not queued" >&2\nexit 1\n')
    for tool in ("srun", "sbatch"):
        (folder / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder / "submitted.sh"


def test_slurm_sweep_submits_one_array_with_one_task_per_gpu(tmp_path, monkeypatch):
    script = _fake_slurm(tmp_path / "bin", monkeypatch)
    launcher, cfg = _slurm_launcher(
        [
            "trainer=ddp",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=lab",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.array_parallelism=2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ]
    )
    with pytest.raises(Exception, match="test: not queued"):
        launcher.launch([["model=cnn"], ["model=separable"], ["model=xception"]], initial_job_idx=0)
    sbatch = script.read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --time=90",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",  # one task per GPU: Lightning's DDP ranks
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --array=0-2%2",  # 3 jobs, at most 2 at once
        "#SBATCH --signal=USR2@120",  # time to requeue before the limit
    ):
        assert line in sbatch, line
    assert launcher.params["max_num_timeout"] > 0  # timed-out or preempted jobs come back
    script.unlink()
    with pytest.raises(ValueError, match=r"varies trainer.devices \(2, 4\).*one SLURM array has one shape"):
        launcher.launch([["trainer.devices=2"], ["trainer.devices=4"]], initial_job_idx=0)
    assert not script.exists()  # refused before anything was queued


def test_slurm_settings_are_checked_before_anything_is_queued(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"hydra.launcher.partition is not set.*conf/local/slurm.example"):
        _slurm_launcher([])
    with pytest.raises(ValueError, match=r"hydra.launcher.tasks_per_node=2 but trainer.devices=4"):
        _slurm_launcher(["hydra.launcher.partition=gpu", "trainer.devices=4", "hydra.launcher.tasks_per_node=2"])
    with pytest.raises(ValueError, match=r"trainer.devices='auto'.*e.g. trainer.devices=4"):
        _slurm_launcher(["hydra.launcher.partition=gpu", "trainer=ddp"])
    cpu, _ = _slurm_launcher(["hydra.launcher.partition=cpu", "trainer=cpu"])
    assert cpu.params["gpus_per_node"] is None  # no GPUs reserved for CPU jobs
    # Site settings come from conf/local/slurm.yaml (git-ignored), only when the SLURM launcher is chosen:
    # the example copied there composes, and refuses to queue until its required settings are filled in.
    conf = shutil.copytree(CONF, tmp_path / "conf")
    site = conf / "local" / "slurm.yaml"
    shutil.copyfile(CONF / "local" / "slurm.example.yaml", site)
    with pytest.raises(ValueError, match=r"hydra.launcher.account is not set"):
        _slurm_launcher(["hydra.launcher.partition=gpu"], conf)
    site.write_text(site.read_text().replace("account: null", "account: my-lab"))
    launcher, cfg = _slurm_launcher(["hydra.launcher.partition=gpu"], conf)
    assert launcher.params["account"] == "my-lab" and launcher.params["timeout_min"] == 720
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf), version_base="1.3"):
        local = compose("train", overrides=["hydra/launcher=local_parallel"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert "account" not in local.hydra.launcher  # the SLURM site settings stay out of the other launchers
