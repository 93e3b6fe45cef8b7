"""Benchmark models and the data pipeline: ``python -m fetalbrain.benchmark [key=value ...]``.

For each model (``conf/model/`` names) and image size: parameters, forward GFLOPs per image, the FLOPs of
one training step (forward and backward at the batch and image size, counted), training throughput through
Lightning and through a bare PyTorch loop on the same real batches (their ratio is the framework's
overhead), the FLOP/s achieved and the model FLOP utilisation (MFU: achieved ÷ the device's peak), batch-1
inference latency, batched inference throughput and peak memory. Then the data pipeline alone (decode +
augment) at several loader worker counts, with and without the decoded-image cache, against the fastest
model's training speed; optionally the same training benchmark as K processes at once on one device
(``parallel.jobs``). Writes ``benchmark.json`` and ``benchmark.md`` (with the machine's description) into
the run directory. Settings: ``conf/benchmark.yaml``; ``benchmark=gpu`` is the GPU measurement's preset.
"""

import copy
import ctypes
import gc
import itertools
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path

import hydra
import lightning as L
import psutil
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import Container, DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from fetalbrain.evaluation.ood import penultimate_features  # noqa: E402
from fetalbrain.training.fit import build_model  # noqa: E402

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # what @hydra.main's config_path="../conf" names
PARALLEL_JOB = "--parallel-job"  # argv[1] of a child process of the parallel-jobs section


def release_freed_memory() -> None:
    """Hand memory freed by earlier models back to the OS, so RSS growth measures this one."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS growth is then a lower bound
        pass


class PeakMemory:
    """Peak memory during a block: CUDA's allocator statistics, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            self._process, self._stop = psutil.Process(), threading.Event()
            self._base = self._peak = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (self._peak - self._base) / 2**20


class StepTimer(L.Callback):
    """Wall-clock time at the end of every training batch (device-synchronised)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, *args):
        synchronize(trainer.strategy.root_device)
        self.ends.append(time.perf_counter())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_throughput(ends: list[float], warmup: int, batch_size: int, average=statistics.median) -> float:
    steps = [b - a for a, b in zip(ends[warmup:], ends[warmup + 1 :])]
    return batch_size / average(steps)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def lightning_throughput(
    model,
    batches,
    device,
    bf16: bool,
    warmup: int,
    batch_size: int,
    average=statistics.median,
    root_dir=None,
    timer: "StepTimer | None" = None,
    callbacks: tuple = (),
) -> tuple[float, float]:
    """Training images per second through ``Trainer.fit`` and peak memory; ``timer`` keeps the step times."""
    timer = timer if timer is not None else StepTimer()
    trainer = L.Trainer(
        default_root_dir=root_dir,
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if bf16 else "32-true",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
    )
    with PeakMemory(device) as memory:
        trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return median_step_throughput(timer.ends, warmup, batch_size, average), memory.peak_mb


def bare_throughput(
    net, optimizer_factory, batches, device, bf16, channels_last, compile, warmup, batch_size
) -> tuple[float, float]:
    """The same training step with nothing around it: the reference for the framework's cost.

    Measured under the same memory sampler as the Lightning run, so both pay the same for it."""
    net = net.to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    step_net = torch.compile(net) if compile else net
    optimizer = optimizer_factory(params=net.parameters())
    ends = []
    with PeakMemory(device) as memory:
        for images, targets in batches:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, bf16):
                loss = F.cross_entropy(step_net(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            synchronize(device)
            ends.append(time.perf_counter())
    return median_step_throughput(ends, warmup, batch_size), memory.peak_mb


@torch.no_grad()
def inference_speed(
    net, image_size, device, bf16, channels_last, repeats: int, batch_size: int, channels: int = 1
) -> tuple[float, float]:
    net = net.to(device).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def timed(batch: int, runs: int) -> float:
        images = torch.randn(batch, channels, image_size, image_size, device=device)
        images = images.contiguous(memory_format=memory_format)
        times = []
        for run in range(runs + 2):  # two warm-up calls
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, bf16):
                net(images)
            synchronize(device)
            if run >= 2:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    latency_ms = timed(1, repeats) * 1000
    throughput = batch_size / timed(batch_size, max(3, repeats // 4))
    return latency_ms, throughput


# ---- FLOPs and model FLOP utilisation ------------------------------------------------------------------
def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """A convolution's backward pass: each gradient computed costs what the forward pass did.

    Replaces torch's formula (torch 2.14), which counts the weight gradient of a grouped convolution
    ``groups`` times over (a depthwise convolution's by its channel count: EfficientNet's training step
    came out at 42× its forward pass); see pytorch/pytorch#183405."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _count_flops(net, input_shape: tuple[int, ...], backward: bool, device: str) -> int:
    images = torch.randn(input_shape, device=device)
    targets = torch.zeros(input_shape[0], dtype=torch.long, device=device)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        if backward:
            F.cross_entropy(net(images), targets).backward()
        else:
            with torch.no_grad():
                net(images)
    return counter.get_total_flops()


def count_flops(net, input_shape: tuple[int, ...], backward: bool = True) -> int:
    """FLOPs of one step of ``net`` on a batch of ``input_shape``: the forward pass and, with ``backward``,
    the backward pass of a cross-entropy loss (every parameter's gradient, none for the input, as in training).

    ``FlopCounterMode`` counts matrix products and convolutions (the tensor-core work; a multiply-add is 2
    FLOPs) from the shapes the step really runs, so a backward pass is counted, not guessed as 2× the
    forward: the first layer computes no input gradient. It runs on the meta device (no memory, no compute,
    any batch and image size); a net with an operation the meta device lacks is counted on the CPU."""
    net = copy.deepcopy(net).cpu().train(backward)
    try:
        return _count_flops(copy.deepcopy(net).to("meta"), tuple(input_shape), backward, "meta")
    except (NotImplementedError, RuntimeError) as error:
        log.warning("Counting FLOPs on the CPU: the meta device cannot run this net (%s)", error)
        return _count_flops(net, tuple(input_shape), backward, "cpu")


def achieved_tflops(flops_per_step: float, images_per_s: float, batch_size: int) -> float:
    """FLOP/s actually done, in TFLOP/s: a step's FLOPs × steps per second (= images per second ÷ batch)."""
    return flops_per_step * images_per_s / batch_size / 1e12


def model_flop_utilisation(achieved: float, peak_tflops: float | None) -> float | None:
    """Achieved ÷ peak FLOP/s; unknown (None) without the device's peak."""
    return achieved / peak_tflops if peak_tflops else None


def table_peak_tflops(device_name: str, table: Mapping[str, float]) -> tuple[str, float] | None:
    """The ``peak_tflops_table`` entry for a GPU name: the longest key that occurs in it as whole words,
    ignoring case (``A100`` and ``A10G`` do not match ``A10``; ``H100 PCIe`` wins over ``H100``)."""
    name = device_name.lower()
    matches = [
        (str(key), float(value))
        for key, value in table.items()
        if re.search(rf"(?<![a-z0-9]){re.escape(str(key).lower())}(?![a-z0-9])", name)
    ]
    return max(matches, key=lambda match: len(match[0])) if matches else None


def device_peak(bench: DictConfig, device: torch.device, bf16: bool) -> dict:
    """The peak FLOP/s that MFU divides by (``peak_tflops``) and where it came from."""
    setting = bench.peak_tflops
    if setting is None:
        return {"tflops": None, "source": "peak_tflops=null"}
    if setting == "auto":
        if device.type != "cuda":
            return {"tflops": None, "source": "unknown on a CPU: set peak_tflops (TFLOP/s) to compute MFU"}
        name = torch.cuda.get_device_name(device)
        if not bf16:
            reason = f"peak_tflops_table holds bf16 peaks and this run is fp32 on {name}: set peak_tflops"
            log.warning("MFU not computed: %s", reason)
            return {"tflops": None, "source": reason}
        match = table_peak_tflops(name, bench.peak_tflops_table)
        if match is None:
            reason = f"{name!r} is not in peak_tflops_table: set peak_tflops (its dense bf16 TFLOP/s)"
            log.warning("MFU not computed: %s", reason)
            return {"tflops": None, "source": reason}
        return {"tflops": match[1], "source": f"peak_tflops_table[{match[0]!r}] ({name}, dense bf16)"}
    try:
        value = float(setting) if not isinstance(setting, bool) else float("nan")
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0:
        raise ValueError(f"peak_tflops={setting!r}: choose auto, null or the device's peak in TFLOP/s (> 0)")
    return {"tflops": value, "source": "peak_tflops"}


# ---- data ----------------------------------------------------------------------------------------------
def training_batches(datamodule, count: int, device: torch.device) -> list:
    """``count`` real augmented training batches, over as many epochs as that takes; pinned for a GPU,
    as the training loader pins them."""
    batches = []
    while len(batches) < count:
        for images, targets in datamodule.train_dataloader():
            if device.type == "cuda":
                images, targets = images.pin_memory(), targets.pin_memory()
            batches.append((images, targets))
            if len(batches) == count:
                break
    return batches


def worker_counts(setting) -> list[int]:
    counts = [setting] if isinstance(setting, int) else list(setting) if isinstance(setting, Container) else None
    if not counts or any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in counts):
        raise ValueError(f"data_workers={setting!r}: a worker count or a list of them, e.g. [0, 2, 4, 8]")
    return counts


def data_pipeline(bench: DictConfig, cfg: DictConfig, model_img_s: float) -> list[dict]:
    """Decode + augment throughput of the training loader at each ``data_workers`` count, with and without
    the cache, and its headroom: how many times ``model_img_s`` (the fastest model's training throughput at
    this configuration's image size) it delivers."""
    results = []
    for cache in (True, False):
        for workers in worker_counts(bench.data_workers):
            with open_dict(cfg):
                cfg.data.cache, cfg.data.num_workers = cache, workers
            datamodule = instantiate(cfg.data)
            datamodule.setup("fit")
            loader = datamodule.train_dataloader()
            stream = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch, same workers
            # Worker start-up, and the batches the workers prefetched meanwhile, are not throughput.
            for _ in range(1 + workers * (loader.prefetch_factor or 0)):
                next(stream)
            start, images = time.perf_counter(), 0
            for _ in range(bench.data_batches):
                images += len(next(stream)[0])
            images_per_s = images / (time.perf_counter() - start)
            stream.close()
            del stream, loader, datamodule  # stops the workers
            results.append(
                {
                    "cache": cache,
                    "workers": workers,
                    "image_size": cfg.data.image_size,
                    "images_per_s": images_per_s,
                    "headroom": images_per_s / model_img_s,
                }
            )
    return results


def preprocessing_speed(bench: DictConfig, datamodule, external_root: Path) -> list[dict]:
    """Milliseconds per image of the deterministic preprocessing alone (decoding excluded) for each
    ``data/harmonise`` preset, on real images of the training part and of the external normal heads, each first
    resized to every longest side in ``preprocessing.sides`` (the embedded copy's 256 px, an export's 640 px)."""
    import albumentations as A
    import cv2

    from fetalbrain.data.images import read_grayscale
    from fetalbrain.data.transforms import preprocessing

    count = bench.preprocessing.images
    sources = {"dataset": datamodule.part_images("train")[0][:count]}
    external = sorted((external_root / "images").glob("*.jpg"))[:count]  # evaluation.external.root
    if external:
        sources["external (HC18)"] = [read_grayscale(path) for path in external]
    results = []
    for preset in bench.preprocessing.harmonise:
        harmonise = compose("train", [f"data/harmonise={preset}"]).data.harmonise
        steps = A.Compose(preprocessing(datamodule.hparams.image_size, harmonise=OmegaConf.to_container(harmonise)))
        for source, images in sources.items():
            for side in bench.preprocessing.sides:
                resized = [cv2.resize(im, _fit(im.shape, side), interpolation=cv2.INTER_AREA) for im in images]
                steps(image=resized[0])  # warm-up
                started = time.perf_counter()
                for image in resized:
                    steps(image=image)
                ms = (time.perf_counter() - started) * 1000 / len(resized)
                results.append({"harmonise": preset, "source": source, "side": side, "images": len(resized), "ms": ms})
    return results


def _fit(shape: tuple[int, ...], side: int) -> tuple[int, int]:
    """(width, height) with the longest side ``side`` and the aspect ratio kept."""
    scale = side / max(shape[:2])
    return max(1, round(shape[1] * scale)), max(1, round(shape[0] * scale))


def ood_score_speed(feature_dims: dict[str, int], train_images: int, k: int) -> list[dict]:
    """Milliseconds to score one image with the k-NN OOD detector (the forward pass that gives the features is the
    model's), fitted on ``train_images`` features of each model's penultimate size: the cost depends on those two
    sizes only, so random unit vectors stand in for real features."""
    import numpy as np

    from fetalbrain.evaluation.ood import OODDetector, score_time_ms

    rng, results = np.random.default_rng(0), []
    for model, dim in feature_dims.items():
        features = rng.standard_normal((train_images, dim)).astype(np.float32)
        detector = OODDetector.fit("knn", features, np.zeros(train_images, int), k=k)
        results.append(
            {"model": model, "feature_dim": dim, "train_images": train_images, "ms": score_time_ms(detector, features)}
        )
    return results


def train_config(bench: DictConfig, model: str, image_size: int) -> DictConfig:
    overrides = [
        f"model={model}",
        f"data.image_size={image_size}",
        f"data.batch_size={bench.batch_size}",
        "data.num_workers=0",
        f"model.channels_last={bench.channels_last}",
        f"model.compile={bench.compile}",
        "model.freeze_backbone_epochs=0",  # a frozen backbone would time a different step
        *bench.overrides,
    ]
    cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        if "pretrained" in cfg.model.net:  # weights do not change speed; never wait on a download
            cfg.model.net.pretrained = False
    return cfg


def model_sizes(bench: DictConfig) -> list[tuple[str, int]]:
    """(model, image size) pairs: every model at every ``image_sizes`` entry, or at its ``sizes_by_model``."""
    by_model = bench.sizes_by_model or {}
    for name in by_model:
        if name not in bench.models:
            raise ValueError(f"sizes_by_model.{name}: {name!r} is not one of models={list(bench.models)}")
    pairs = [(name, size) for size in bench.image_sizes for name in bench.models if name not in by_model]
    pairs += [(name, size) for name in bench.models if name in by_model for size in by_model[name]]
    if not pairs:
        raise ValueError("models / image_sizes: nothing to benchmark (both must name at least one)")
    return pairs


def configure_backends(bench: DictConfig) -> None:
    if bench.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(bench.cudnn_benchmark)


def benchmark_model(bench, cfg, datamodule, device, bf16, peak_tflops: float | None = None) -> dict:
    batches = training_batches(datamodule, bench.warmup_steps + bench.steps + 1, device)
    model = build_model(cfg, datamodule)
    fresh_net = copy.deepcopy(model.net)
    params = sum(p.numel() for p in model.parameters())
    size, channels = cfg.data.image_size, cfg.data.channels
    forward_flops = count_flops(fresh_net, (1, channels, size, size), backward=False)
    step_flops = count_flops(fresh_net, (bench.batch_size, channels, size, size))
    lightning_img_s, lightning_mb = lightning_throughput(
        model, batches, device, bf16, bench.warmup_steps, bench.batch_size
    )
    bare_img_s, bare_mb = bare_throughput(
        copy.deepcopy(fresh_net),
        instantiate(cfg.optimizer),
        batches,
        device,
        bf16,
        bench.channels_last,
        bench.compile,
        bench.warmup_steps,
        bench.batch_size,
    )
    peak_mb = max(lightning_mb, bare_mb)
    with penultimate_features(fresh_net) as captured:  # the OOD detector's feature size
        fresh_net.eval().cpu()(torch.zeros(1, channels, size, size))
    feature_dim = int(captured[-1].flatten(1).shape[1])
    latency_ms, infer_img_s = inference_speed(
        fresh_net, size, device, bf16, bench.channels_last, bench.latency_repeats, bench.batch_size, channels
    )
    achieved = {
        loop: achieved_tflops(step_flops, img_s, bench.batch_size)
        for loop, img_s in (("lightning", lightning_img_s), ("bare", bare_img_s))
    }
    return {
        "model": cfg.model.name,
        "image_size": size,
        "params_m": params / 1e6,
        "gflops_per_image": forward_flops / 1e9,
        "train_gflops_per_image": step_flops / bench.batch_size / 1e9,
        "train_tflops_per_step": step_flops / 1e12,
        "train_img_s_lightning": lightning_img_s,
        "train_img_s_bare": bare_img_s,
        "lightning_vs_bare": lightning_img_s / bare_img_s,
        "achieved_tflops_lightning": achieved["lightning"],
        "achieved_tflops_bare": achieved["bare"],
        "mfu_lightning": model_flop_utilisation(achieved["lightning"], peak_tflops),
        "mfu_bare": model_flop_utilisation(achieved["bare"], peak_tflops),
        "latency_ms_batch1": latency_ms,
        "infer_img_s_batch": infer_img_s,
        "peak_memory_mb_training": peak_mb,
        "feature_dim": feature_dim,
    }


# ---- several jobs at once on one device ----------------------------------------------------------------
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
            "bench": {k: _plain(bench[k]) for k in keys},
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


# ---- the generator and synthetic-image quality ---------------------------------------------------------
def benchmark_generator(bench: DictConfig, device, bf16: bool) -> dict:
    """WGAN-GP training (``model=wgan_gp``) on real batches: images per second and peak memory.

    The mean step time, not the median: every n_critic-th step also trains the generator."""
    cfg = compose(
        "train",
        overrides=[
            "model=wgan_gp",
            f"data.image_size={bench.generator.image_size}",
            f"data.batch_size={bench.batch_size}",
            "data.num_workers=0",
            *bench.generator.overrides,
        ],
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batches = training_batches(datamodule, bench.warmup_steps + bench.generator.steps + 1, device)
    model = build_model(cfg, datamodule)
    with tempfile.TemporaryDirectory() as root:  # its sample grids are not benchmark output
        img_s, peak_mb = lightning_throughput(
            model, batches, device, bf16, bench.warmup_steps, bench.batch_size, statistics.mean, root
        )
    return {
        "model": "wgan_gp",
        "image_size": cfg.data.image_size,
        "params_m": sum(p.numel() for p in (*model.generator.parameters(), *model.critic.parameters())) / 1e6,
        "n_critic": cfg.model.n_critic,
        "train_img_s": img_s,
        "peak_memory_mb_training": peak_mb,
    }


def quality_metrics_seconds(images: int, image_size: int, feature_batch: int = 64) -> dict:
    """Time FID + KID of ``images`` synthetic vs ``images`` real images, feature extraction included.

    Features come from the plain CNN's penultimate layer (random weights: the cost, not the value,
    is measured), as ``synth_quality`` does with a trained classifier."""
    from fetalbrain.evaluation.synthetic import fid_kid
    from fetalbrain.models.cnn import SmallCNN

    net = SmallCNN(16).eval()
    generator = torch.Generator().manual_seed(0)
    sets = [torch.randn(images, 1, image_size, image_size, generator=generator) for _ in range(2)]
    started = time.perf_counter()
    with torch.no_grad():
        features = [
            torch.cat([net.forward_features(b).mean(dim=(2, 3)) for b in x.split(feature_batch)]).numpy() for x in sets
        ]
    extracted = time.perf_counter()
    fid_kid(*features)
    finished = time.perf_counter()
    return {
        "images_per_set": images,
        "image_size": image_size,
        "feature_seconds": extracted - started,
        "fid_kid_seconds": finished - extracted,
        "total_seconds": finished - started,
    }


def machine_description(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def markdown(results: dict) -> str:
    m, bench, peak = results["machine"], results["settings"], results["peak"]
    peak_text = (
        f"peak {peak['tflops']:g} TFLOP/s from {peak['source']}" if peak["tflops"] else f"MFU n/a ({peak['source']})"
    )
    lines = [
        f"## Benchmark {results['started']}",
        "",
        f"Machine: {m['device']} / {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, torch {m['torch']} "
        f"({m['torch_threads']} threads), Lightning {m['lightning']}. Batch {bench['batch_size']}, "
        f"precision {results['precision']}, channels_last {bench['channels_last']}, compile {bench['compile']}; "
        f"median of {bench['steps']} training steps after {bench['warmup_steps']} warm-up steps. "
        f"Training FLOPs (forward + backward) counted with torch's FlopCounterMode; {peak_text}.",
        "",
        "| model | size | params (M) | GFLOPs/img (forward) | train GFLOPs/img (fwd+bwd) | train img/s (Lightning) | "
        "train img/s (bare loop) | Lightning/bare | achieved TFLOP/s (Lightning) | MFU (Lightning) | MFU (bare) | "
        f"latency b1 (ms) | infer img/s b{bench['batch_size']} | peak train memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r['params_m']:.2f} | {r['gflops_per_image']:.2f} | "
            f"{r['train_gflops_per_image']:.2f} | {r['train_img_s_lightning']:.1f} | {r['train_img_s_bare']:.1f} | "
            f"{r['lightning_vs_bare']:.2f} | {r['achieved_tflops_lightning']:.3g} | {_fraction(r['mfu_lightning'])} | "
            f"{_fraction(r['mfu_bare'])} | {r['latency_ms_batch1']:.1f} | {r['infer_img_s_batch']:.1f} | "
            f"{r['peak_memory_mb_training']:.0f} |"
        )
    lines += [
        "",
        "| data pipeline (decode + augment) | size | workers | img/s | headroom (÷ fastest model's train img/s) |",
        "|---|---|---|---|---|",
    ]
    for d in results["data_pipeline"]:
        lines.append(
            f"| {'cached decoded images' if d['cache'] else 'decode every time'} | {d['image_size']} | "
            f"{d['workers']} | {d['images_per_s']:.0f} | {d['headroom']:.1f} |"
        )
    if results.get("preprocessing"):
        lines += [
            "",
            "| preprocessing (no augmentation, decoding excluded) | source | longest side (px) | ms/img |",
            "|---|---|---|---|",
        ]
        for p in results["preprocessing"]:
            lines.append(f"| data/harmonise={p['harmonise']} | {p['source']} | {p['side']} | {p['ms']:.2f} |")
    if results.get("ood_score"):
        lines += ["", "| OOD score (k-NN, per image) | feature size | training images | ms |", "|---|---|---|---|"]
        for o in results["ood_score"]:
            lines.append(f"| {o['model']} | {o['feature_dim']} | {o['train_images']} | {o['ms']:.3f} |")
    if results.get("parallel"):
        first = results["parallel"][0]
        lines += [
            "",
            f"Parallel jobs: {first['model']} at {first['image_size']} px, Lightning training, K processes at once "
            f"on {m['device']} (CPU threads split between them), released together after their warm-up steps.",
            "",
            "| jobs | threads per job | train img/s per job | aggregate img/s | aggregate ÷ one job | "
            "timed steps overlapping |",
            "|---|---|---|---|---|---|",
        ]
        for p in results["parallel"]:
            per_job = ", ".join(f"{v:.1f}" for v in p["img_s_per_job"])
            vs_one = "n/a" if p["vs_one_job"] is None else f"{p['vs_one_job']:.2f}"
            lines.append(
                f"| {p['jobs']} | {p['threads_per_job']} | {per_job} | {p['aggregate_img_s']:.1f} | {vs_one} | "
                f"{p['overlap']:.0%} |"
            )
    if results.get("generator"):
        g = results["generator"]
        lines += [
            "",
            "| generator | size | params G+D (M) | n_critic | train img/s (critic steps) | peak train memory (MB) |",
            "|---|---|---|---|---|---|",
            f"| {g['model']} | {g['image_size']} | {g['params_m']:.2f} | {g['n_critic']} | {g['train_img_s']:.1f} | "
            f"{g['peak_memory_mb_training']:.0f} |",
        ]
    if results.get("synthetic_quality"):
        q = results["synthetic_quality"]
        lines += [
            "",
            f"FID + KID of {q['images_per_set']} vs {q['images_per_set']} images at {q['image_size']} px: "
            f"{q['total_seconds']:.1f} s ({q['feature_seconds']:.1f} s features, {q['fid_kid_seconds']:.1f} s "
            "FID + KID; target < 60 s).",
        ]
    t = results["targets"]
    wanted = t["wanted"]
    if t["models_meeting_mfu"] is None:
        mfu_text = "unknown without the device's peak (peak_tflops)"
    else:
        values = ", ".join(f"{k} {_fraction(v)}" for k, v in t["mfu_lightning"].items())
        mfu_text = f"{t['models_meeting_mfu']} of {len(t['mfu_lightning'])} models ({values})"
    lines += [
        "",
        f"Targets: data pipeline / fastest model training = {t['pipeline_over_fastest_model']:.1f} "
        f"(≥ {wanted['pipeline_headroom']:g} wanted); Lightning / bare loop ≥ {wanted['lightning_vs_bare']:g} for "
        f"{t['models_meeting_lightning_vs_bare']} of {len(results['models'])} models (lowest "
        f"{t['lowest_lightning_vs_bare']:.2f}); MFU (Lightning) ≥ {wanted['mfu']:.0%}: {mfu_text}"
        + (
            f"; harmonisation adds at most {t['harmonise_added_ms']:.2f} ms/img (≤ {wanted['harmonise_ms']:g} wanted)"
            if t.get("harmonise_added_ms") is not None
            else ""
        )
        + (
            f"; OOD score at most {t['ood_score_ms']:.3f} ms/img (≤ {wanted['ood_score_ms']:g} wanted)"
            if t.get("ood_score_ms") is not None
            else ""
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value


def target_summary(
    models: list[dict], pipeline: list[dict], wanted: DictConfig, prep: list[dict] = (), ood: list[dict] = ()
) -> dict:
    ratios = [r["lightning_vs_bare"] for r in models]
    harmonised = [p["ms"] - _plain_ms(prep, p) for p in prep if p["harmonise"] != "none"]
    mfu = {f"{r['model']} {r['image_size']} px": r["mfu_lightning"] for r in models}
    known = [v for v in mfu.values() if v is not None]
    return {
        "wanted": _plain(wanted),
        "pipeline_over_fastest_model": max(d["headroom"] for d in pipeline),
        "lowest_lightning_vs_bare": min(ratios),
        "models_meeting_lightning_vs_bare": sum(r >= wanted.lightning_vs_bare for r in ratios),
        "mfu_lightning": mfu,
        "models_meeting_mfu": sum(v >= wanted.mfu for v in known) if known else None,
        "harmonise_added_ms": max(harmonised) if harmonised else None,
        "ood_score_ms": max(o["ms"] for o in ood) if ood else None,
    }


def _plain_ms(prep: list[dict], row: dict) -> float:
    """The same source and size without harmonisation: what a preset adds is the difference."""
    same = [
        p["ms"] for p in prep if p["harmonise"] == "none" and (p["source"], p["side"]) == (row["source"], row["side"])
    ]
    return same[0] if same else 0.0


def run(bench: DictConfig, out_dir: Path) -> dict:
    if bench.threads:
        torch.set_num_threads(bench.threads)
    if bench.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={bench.device!r}: choose auto, cpu or cuda")
    if bench.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda: no CUDA device is available here (device=auto uses the CPU then)")
    use_cuda = bench.device == "cuda" or (bench.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    bf16 = bench.precision == "bf16" or (bench.precision == "auto" and device.type == "cuda")
    configure_backends(bench)
    # Settings are checked before any measurement: a typo must not cost a long run.
    peak = device_peak(bench, device, bf16)
    worker_counts(bench.data_workers)
    pairs = model_sizes(bench)
    plan = parallel_plan(bench, pairs)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    models, datamodules = [], {}
    for name, image_size in pairs:
        cfg = train_config(bench, name, image_size)
        if image_size not in datamodules:
            datamodules[image_size] = instantiate(cfg.data)
            datamodules[image_size].setup("fit")
        log.info("Benchmarking %s at %d px on %s", name, image_size, device)
        models.append(benchmark_model(bench, cfg, datamodules[image_size], device, bf16, peak["tflops"]))
    fastest = max(range(len(models)), key=lambda i: models[i]["train_img_s_lightning"])
    pipeline = data_pipeline(bench, train_config(bench, *pairs[fastest]), models[fastest]["train_img_s_lightning"])
    first = datamodules[pairs[0][1]]
    evaluation = train_config(bench, *pairs[0]).evaluation
    prep = preprocessing_speed(bench, first, Path(evaluation.external.root)) if bench.preprocessing.enabled else []
    ood = ood_score_speed(
        {f"{m['model']} {m['image_size']} px": m["feature_dim"] for m in models},
        int((first.table["part"] == "train").sum()),
        evaluation.ood.k,
    )
    parallel = parallel_section(bench, device, bf16, out_dir, plan) if plan["jobs"] else []
    generator = benchmark_generator(bench, device, bf16) if bench.generator.enabled else None
    quality = quality_metrics_seconds(bench.quality.images, bench.quality.image_size) if bench.quality.enabled else None
    settings = (
        "batch_size",
        "warmup_steps",
        "steps",
        "channels_last",
        "compile",
        "cudnn_benchmark",
        "threads",
        "data_workers",
        "data_batches",
        "sizes_by_model",
        "overrides",
    )
    results = {
        "started": started,
        "machine": machine_description(device),
        "precision": "bf16" if bf16 else "fp32",
        "peak": peak,
        "settings": {k: _plain(bench[k]) for k in settings},
        "models": models,
        "data_pipeline": pipeline,
        "preprocessing": prep,
        "ood_score": ood,
        "parallel": parallel,
        "generator": generator,
        "synthetic_quality": quality,
        "targets": target_summary(models, pipeline, bench.targets, prep, ood),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out_dir / "benchmark.md").write_text(table)
    if bench.append_to:
        with open(bench.append_to, "a") as handle:
            handle.write(table + "\n")
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    results = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    print(markdown(results))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == PARALLEL_JOB:
        parallel_job(Path(sys.argv[2]))  # a child of the parallel-jobs section, not a Hydra run
    else:
        main()
