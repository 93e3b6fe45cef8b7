"""Benchmark models and the data pipeline: ``python -m fetalbrain.benchmark [key=value ...]``.

For each model (``conf/model/`` names) and image size: parameters, forward GFLOPs per image,
training throughput through Lightning and through a bare PyTorch loop on the same real batches
(their ratio is the framework's overhead), batch-1 inference latency, batch-32 inference throughput
and peak memory. Then the data pipeline alone (decode + augment) with and without the decoded-image
cache. Writes ``benchmark.json`` and ``benchmark.md`` (with the machine's description) into the run
directory. Settings: ``conf/benchmark.yaml``.
"""

import copy
import ctypes
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import lightning as L
import psutil
import torch
import torch.nn.functional as F
from hydra import compose
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from fetalbrain.train import build_model  # noqa: E402

log = logging.getLogger(__name__)


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
    model, batches, device, bf16: bool, warmup: int, batch_size: int, average=statistics.median, root_dir=None
) -> tuple[float, float]:
    timer = StepTimer()
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
        callbacks=[timer],
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
def inference_speed(net, image_size, device, bf16, channels_last, repeats: int, batch_size: int) -> tuple[float, float]:
    net = net.to(device).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def timed(batch: int, runs: int) -> float:
        images = torch.randn(batch, 1, image_size, image_size, device=device).contiguous(memory_format=memory_format)
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


def forward_gflops(net, image_size: int) -> float:
    net = copy.deepcopy(net).cpu().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 1, image_size, image_size))
    return counter.get_total_flops() / 1e9


def data_pipeline(cfg: DictConfig, bench: DictConfig) -> list[dict]:
    """Decode + augment throughput of the training loader, with and without the cache."""
    results = []
    for cache in (True, False):
        with open_dict(cfg):
            cfg.data.cache, cfg.data.num_workers = cache, bench.data_workers
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        loader = iter(datamodule.train_dataloader())
        next(loader)  # worker start-up is not throughput
        start, images = time.perf_counter(), 0
        for _ in range(bench.data_batches):
            images += len(next(loader)[0])
        results.append(
            {"cache": cache, "workers": bench.data_workers, "images_per_s": images / (time.perf_counter() - start)}
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


def benchmark_model(bench, cfg, datamodule, device, bf16) -> dict:
    steps = bench.warmup_steps + bench.steps + 1
    loader = iter(datamodule.train_dataloader())
    batches = [next(loader) for _ in range(steps)]  # real augmented images, reused by both loops
    model = build_model(cfg, datamodule)
    fresh_net = copy.deepcopy(model.net)
    params = sum(p.numel() for p in model.parameters())
    gflops = forward_gflops(fresh_net, cfg.data.image_size)
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
    latency_ms, infer_img_s = inference_speed(
        fresh_net, cfg.data.image_size, device, bf16, bench.channels_last, bench.latency_repeats, bench.batch_size
    )
    return {
        "model": cfg.model.name,
        "image_size": cfg.data.image_size,
        "params_m": params / 1e6,
        "gflops_per_image": gflops,
        "train_img_s_lightning": lightning_img_s,
        "train_img_s_bare": bare_img_s,
        "lightning_vs_bare": lightning_img_s / bare_img_s,
        "latency_ms_batch1": latency_ms,
        "infer_img_s_batch32": infer_img_s,
        "peak_memory_mb_training": peak_mb,
    }


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
    loader = iter(datamodule.train_dataloader())
    batches = [next(loader) for _ in range(bench.warmup_steps + bench.generator.steps + 1)]
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


def markdown(results: dict) -> str:
    m, bench = results["machine"], results["settings"]
    lines = [
        f"## Benchmark {results['started']}",
        "",
        f"Machine: {m['device']} / {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, torch {m['torch']} "
        f"({m['torch_threads']} threads), Lightning {m['lightning']}. Batch {bench['batch_size']}, "
        f"precision {results['precision']}, channels_last {bench['channels_last']}, compile {bench['compile']}; "
        f"median of {bench['steps']} training steps after {bench['warmup_steps']} warm-up steps.",
        "",
        "| model | size | params (M) | GFLOPs/img | train img/s (Lightning) | train img/s (bare loop) | "
        "Lightning/bare | latency b1 (ms) | infer img/s b32 | peak train memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r['params_m']:.2f} | {r['gflops_per_image']:.2f} | "
            f"{r['train_img_s_lightning']:.1f} | {r['train_img_s_bare']:.1f} | {r['lightning_vs_bare']:.2f} | "
            f"{r['latency_ms_batch1']:.1f} | {r['infer_img_s_batch32']:.1f} | {r['peak_memory_mb_training']:.0f} |"
        )
    lines += ["", "| data pipeline (decode + augment) | workers | img/s |", "|---|---|---|"]
    for d in results["data_pipeline"]:
        lines.append(
            f"| {'cached decoded images' if d['cache'] else 'decode every time'} | {d['workers']} | "
            f"{d['images_per_s']:.0f} |"
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
    targets = results["targets"]
    lines += [
        "",
        f"Targets: data pipeline / fastest model training = {targets['pipeline_over_fastest_model']:.1f} "
        f"(≥ 3 wanted); Lightning / bare loop ≥ 0.9 for {targets['models_at_least_0.9']} of "
        f"{len(results['models'])} models (lowest {targets['lowest_lightning_vs_bare']:.2f}).",
        "",
    ]
    return "\n".join(lines)


def run(bench: DictConfig, out_dir: Path) -> dict:
    if bench.threads:
        torch.set_num_threads(bench.threads)
    if bench.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={bench.device!r}: choose auto, cpu or cuda")
    use_cuda = bench.device == "cuda" or (bench.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    bf16 = bench.precision == "bf16" or (bench.precision == "auto" and device.type == "cuda")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    models, datamodules = [], {}
    for image_size in bench.image_sizes:
        for name in bench.models:
            cfg = train_config(bench, name, image_size)
            if image_size not in datamodules:
                datamodules[image_size] = instantiate(cfg.data)
                datamodules[image_size].setup("fit")
            log.info("Benchmarking %s at %d px on %s", name, image_size, device)
            models.append(benchmark_model(bench, cfg, datamodules[image_size], device, bf16))
    pipeline = data_pipeline(train_config(bench, bench.models[0], bench.image_sizes[0]), bench)
    generator = benchmark_generator(bench, device, bf16) if bench.generator.enabled else None
    quality = quality_metrics_seconds(bench.quality.images, bench.quality.image_size) if bench.quality.enabled else None
    fastest = max(r["train_img_s_lightning"] for r in models)
    ratios = [r["lightning_vs_bare"] for r in models]
    results = {
        "started": started,
        "machine": machine_description(device),
        "precision": "bf16" if bf16 else "fp32",
        "settings": {
            k: bench[k] for k in ("batch_size", "warmup_steps", "steps", "channels_last", "compile", "data_workers")
        },
        "models": models,
        "data_pipeline": pipeline,
        "generator": generator,
        "synthetic_quality": quality,
        "targets": {
            "pipeline_over_fastest_model": max(d["images_per_s"] for d in pipeline) / fastest,
            "lowest_lightning_vs_bare": min(ratios),
            "models_at_least_0.9": sum(r >= 0.9 for r in ratios),
        },
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
    main()
