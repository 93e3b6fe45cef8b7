"""One model at one image size: parameters, FLOPs, training throughput through Lightning and through a bare
loop, achieved FLOP/s and MFU, inference latency and throughput, peak memory and its OOD feature size."""

import copy

import torch
from hydra.utils import instantiate

from fetalbrain.benchmarks.flops import achieved_tflops, count_flops, model_flop_utilisation
from fetalbrain.benchmarks.pipeline import training_batches
from fetalbrain.benchmarks.timing import bare_throughput, inference_speed, lightning_throughput
from fetalbrain.evaluation.ood import penultimate_features
from fetalbrain.training.fit import build_model


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
