"""The data side: real training batches for the models to train on, and the training loader's own throughput
(decode + augment) at several worker counts, with and without the decoded-image cache."""

import itertools
import time

import torch
from hydra.utils import instantiate
from omegaconf import Container, DictConfig, open_dict


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
