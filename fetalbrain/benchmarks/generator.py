"""The generative side: WGAN-GP training throughput and memory, and how long FID + KID take on a set of
synthetic images (what ``synth_quality`` computes)."""

import statistics
import tempfile
import time

import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import DictConfig

from fetalbrain.benchmarks.pipeline import training_batches
from fetalbrain.benchmarks.timing import lightning_throughput
from fetalbrain.training.fit import build_model


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
