"""Timing and peak memory of a training or inference step, the same way for every loop measured: Lightning's, a
bare PyTorch loop (the reference for the framework's overhead) and batched inference."""

import ctypes
import gc
import statistics
import threading
import time
from contextlib import nullcontext

import lightning as L
import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


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
