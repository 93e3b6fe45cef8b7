"""Several copies of one training benchmark at once on one device (``parallel.jobs``): does a GPU serve K jobs
faster than one after the other? Each job is a process (``python -m fetalbrain.benchmark --parallel-job SPEC``,
whose entry is ``parallel_job``), released together with the others once all have warmed up."""

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from hydra import initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fetalbrain.benchmarks.pipeline import training_batches
from fetalbrain.benchmarks.settings import configure_backends, train_config
from fetalbrain.benchmarks.timing import StepTimer, lightning_throughput, release_freed_memory
from fetalbrain.project import plain
from fetalbrain.training.fit import build_model

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # what the command's @hydra.main config_path="../conf" names
PARALLEL_JOB = "--parallel-job"  # argv[1] of a child process of the parallel-jobs section


class ReleaseTogether(L.Callback):
    """Holds a parallel job before training step ``at_step`` (after its warm-up: compilation and autotuning
    take each process a different time) until every job has got there; ``ready`` is this job's flag file,
    ``go`` the parent's. The wait falls in an untimed step."""

    def __init__(self, ready: Path, go: Path, at_step: int, timeout_s: float):
        self.ready, self.go, self.at_step, self.timeout_s = ready, go, at_step, timeout_s

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx != self.at_step:
            return
        self.ready.touch()
        deadline = time.monotonic() + self.timeout_s
        while not self.go.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"parallel.timeout_s={self.timeout_s}: the other jobs never got ready")
            time.sleep(0.005)


def parallel_job(spec_file: Path) -> None:
    """One of K concurrent jobs, in its own process: set up, warm up, wait until all K have, train, and
    write the throughput and the wall-clock span of the timed steps (to check that the K spans overlap)."""
    spec = json.loads(Path(spec_file).read_text())
    bench = OmegaConf.create(spec["bench"])
    torch.set_num_threads(spec["threads"])
    configure_backends(bench)
    device = torch.device(spec["device"])
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = train_config(bench, spec["model"], spec["image_size"])
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batches = training_batches(datamodule, bench.warmup_steps + bench.steps + 1, device)
    model = build_model(cfg, datamodule)
    timer = StepTimer()
    images_per_s, peak_mb = lightning_throughput(
        model,
        batches,
        device,
        spec["bf16"],
        bench.warmup_steps,
        bench.batch_size,
        root_dir=spec["dir"],
        timer=timer,
        callbacks=(ReleaseTogether(Path(spec["ready"]), Path(spec["go"]), bench.warmup_steps, spec["timeout_s"]),),
    )
    to_wall_clock = time.time() - time.perf_counter()
    result = {
        "images_per_s": images_per_s,
        "peak_memory_mb_training": peak_mb,
        "timed_from": timer.ends[bench.warmup_steps] + to_wall_clock,
        "timed_to": timer.ends[-1] + to_wall_clock,
    }
    Path(spec["result"]).write_text(json.dumps(result) + "\n")


def _visible_device(device: torch.device) -> str:
    """The CUDA_VISIBLE_DEVICES entry that pins a child process to this process's GPU."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def _raise_if_failed(processes: list, logs: list[Path]) -> None:
    for process, log_file in zip(processes, logs):
        if process.poll() not in (None, 0):
            tail = log_file.read_text()[-3000:] if log_file.is_file() else ""
            raise RuntimeError(f"parallel job failed (exit {process.returncode}), see {log_file}:\n{tail}")


def _wait(processes: list, logs: list[Path], done: Callable[[], bool], deadline: float, what: str) -> None:
    """Wait until ``done()``; a job that fails or a deadline passed raises, naming the jobs' logs."""
    while not done():
        _raise_if_failed(processes, logs)
        if time.monotonic() > deadline:
            raise TimeoutError(f"parallel.timeout_s: jobs still not {what}; logs: {', '.join(map(str, logs))}")
        time.sleep(0.05)
    _raise_if_failed(processes, logs)


def launch_parallel_jobs(spec: dict, jobs: int, folder: Path, env: dict, timeout_s: float) -> list[dict]:
    """Start ``jobs`` copies of ``python -m fetalbrain.benchmark --parallel-job SPEC``, release them together
    once all have warmed up (imports, data, model, Trainer, warm-up steps), and return each one's result."""
    folder.mkdir(parents=True, exist_ok=True)
    go = folder / "go"
    go.unlink(missing_ok=True)
    processes, logs, specs = [], [], []
    deadline = time.monotonic() + timeout_s
    try:
        for index in range(jobs):
            job = {
                **spec,
                "dir": str(folder),
                "go": str(go),
                "ready": str(folder / f"job_{index}.ready"),
                "result": str(folder / f"job_{index}.result.json"),
                "timeout_s": timeout_s,
            }
            for stale in (job["ready"], job["result"]):
                Path(stale).unlink(missing_ok=True)
            spec_file = folder / f"job_{index}.spec.json"
            spec_file.write_text(json.dumps(job, indent=2) + "\n")
            logs.append(folder / f"job_{index}.log")
            with open(logs[-1], "w") as log_handle:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "fetalbrain.benchmark", PARALLEL_JOB, str(spec_file)],
                        stdout=log_handle,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
            specs.append(job)
        _wait(processes, logs, lambda: all(Path(j["ready"]).exists() for j in specs), deadline, "ready")
        go.touch()
        _wait(processes, logs, lambda: all(p.poll() is not None for p in processes), deadline, "finished")
        return [json.loads(Path(j["result"]).read_text()) for j in specs]
    finally:
        for process in processes:  # only on failure are any still running
            if process.poll() is None:
                process.kill()
                process.wait()


def parallel_plan(bench: DictConfig, pairs: list[tuple[str, int]]) -> dict:
    """What the parallel-jobs section runs: ``parallel.jobs`` counts of ``parallel.model`` at
    ``parallel.image_size`` (by default the first benchmarked model at its first size)."""
    counts = list(bench.parallel.jobs)
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in counts):
        raise ValueError(f"parallel.jobs={counts}: process counts >= 1, e.g. [1, 2, 4]")
    name = bench.parallel.model or pairs[0][0]
    sizes = [size for model, size in pairs if model == name] or list(bench.image_sizes)
    return {"jobs": counts, "model": name, "image_size": bench.parallel.image_size or sizes[0]}


def parallel_section(bench: DictConfig, device, bf16: bool, out_dir: Path, plan: dict) -> list[dict]:
    """The same Lightning training benchmark as K processes at once on this device (its GPU, or its CPU
    cores split between them), for each K in ``parallel.jobs``: per-job and aggregate images per second."""
    name, size = plan["model"], plan["image_size"]
    release_freed_memory()
    if device.type == "cuda":  # this process's cached blocks would crowd the jobs out of the GPU's memory
        torch.cuda.empty_cache()
    total_threads = bench.threads or torch.get_num_threads()
    keys = ("batch_size", "warmup_steps", "steps", "channels_last", "compile", "cudnn_benchmark", "overrides")
    rows = []
    for jobs in plan["jobs"]:
        threads = max(1, total_threads // jobs)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        if device.type == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = _visible_device(device)
        spec = {
            "bench": {k: plain(bench[k]) for k in keys},
            "model": name,
            "image_size": size,
            "device": device.type,
            "bf16": bf16,
            "threads": threads,
        }
        log.info("Parallel jobs: %d x %s at %d px on %s, %d threads each", jobs, name, size, device, threads)
        folder = out_dir / "parallel" / f"{jobs}_jobs"
        results = launch_parallel_jobs(spec, jobs, folder, env, bench.parallel.timeout_s)
        starts, ends = [r["timed_from"] for r in results], [r["timed_to"] for r in results]
        rows.append(
            {
                "jobs": jobs,
                "model": name,
                "image_size": size,
                "threads_per_job": threads,
                "img_s_per_job": [r["images_per_s"] for r in results],
                "aggregate_img_s": sum(r["images_per_s"] for r in results),
                "peak_memory_mb_per_job": [r["peak_memory_mb_training"] for r in results],
                # Share of the timed span in which every job was in its timed steps: near 1, the jobs ran
                # together for the whole measurement.
                "overlap": max(0.0, min(ends) - max(starts)) / (max(ends) - min(starts)),
            }
        )
    return parallel_speedups(rows)


def parallel_speedups(rows: list[dict]) -> list[dict]:
    """Aggregate throughput of K jobs at once ÷ one job's (what running them one at a time gives)."""
    one = next((r["aggregate_img_s"] for r in rows if r["jobs"] == 1), None)
    for row in rows:
        row["vs_one_job"] = row["aggregate_img_s"] / one if one else None
    return rows
