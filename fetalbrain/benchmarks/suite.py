"""The whole benchmark: checks every setting first (a typo must not cost a long run), runs each section and
writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png``."""

import json
import logging
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from fetalbrain.benchmarks.flops import device_peak
from fetalbrain.benchmarks.generator import benchmark_generator, quality_metrics_seconds
from fetalbrain.benchmarks.models import benchmark_model
from fetalbrain.benchmarks.ood_score import ood_score_speed
from fetalbrain.benchmarks.parallel import parallel_plan, parallel_section
from fetalbrain.benchmarks.pipeline import data_pipeline, worker_counts
from fetalbrain.benchmarks.preprocessing import preprocessing_speed
from fetalbrain.benchmarks.report import machine_description, markdown, target_summary, throughput_figure
from fetalbrain.benchmarks.settings import configure_backends, model_sizes, train_config
from fetalbrain.progress import track
from fetalbrain.project import plain

log = logging.getLogger(__name__)
FIGURE = "benchmark.png"  # throughput of every model, beside benchmark.md


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
    for name, image_size in track(pairs, "Benchmark: models"):
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
        "settings": {k: plain(bench[k]) for k in settings},
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
    if models:
        throughput_figure(results, out_dir / FIGURE)
    table = markdown(results)
    (out_dir / "benchmark.md").write_text(table + (f"\n![throughput]({FIGURE})\n" if models else ""))
    if bench.append_to:
        with open(bench.append_to, "a") as handle:
            handle.write(table + "\n")
    return results
