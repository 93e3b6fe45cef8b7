"""The README's tables of the GPU-scaling recipe, from results/ (``run.sh`` calls it after the benchmark).

    .venv/bin/python experiments/gpu_scaling/tables.py [RESULTS_DIR]

From each ``benchmark_<name>.json`` of RESULTS_DIR (``cpu_check``; ``gpu`` once it has run) it writes
``<name>_models.csv``, ``<name>_pipeline.csv`` and ``<name>_parallel.csv``: the numbers of the JSON, nothing
typed. And ``goals.csv``: what the MFU goal means at the GPU preset's models, sizes and batch
(``conf/benchmark/gpu.yaml``): the FLOPs of one training step counted as the benchmark counts them
(``fetalbrain.benchmarks.flops.count_flops``, on the meta device: no weights, no compute, seconds on a CPU),
and the training img/s that reaching ``targets.mfu`` of the dense bf16 peak of an H100 SXM
(``peak_tflops_table``) would take.
"""

import json
import sys
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[2]
GOAL_DEVICE = "H100"  # peak_tflops_table key: H100 SXM


def unit(value, digits: int, name: str) -> str:
    """A number with its unit: the README's renderer keeps such a cell as written (a bare number becomes a float
    with 3 decimals)."""
    return "–" if value is None else f"{value:,.{digits}f} {name}"


def json_tables(results: Path) -> list[Path]:
    written = []
    for path in sorted(results.glob("benchmark_*.json")):
        name = path.stem.removeprefix("benchmark_")
        bench = json.loads(path.read_text())
        models = pd.DataFrame(
            [
                {
                    "model": m["model"],
                    "size (px)": m["image_size"],
                    "params": unit(m["params_m"], 2, "M"),
                    "GFLOPs/img (forward)": m["gflops_per_image"],
                    "train GFLOPs/img (fwd + bwd)": m["train_gflops_per_image"],
                    "train (Lightning)": unit(m["train_img_s_lightning"], 1, "img/s"),
                    "train (bare loop)": unit(m["train_img_s_bare"], 1, "img/s"),
                    "Lightning ÷ bare": m["lightning_vs_bare"],
                    "achieved TFLOP/s (Lightning)": m["achieved_tflops_lightning"],
                    "MFU (Lightning)": m["mfu_lightning"],
                    "latency b1": unit(m["latency_ms_batch1"], 1, "ms"),
                    f"inference b{bench['settings']['batch_size']}": unit(
                        m.get("infer_img_s_batch", m.get("infer_img_s_batch32")), 1, "img/s"
                    ),
                    "peak train memory": unit(m["peak_memory_mb_training"], 0, "MB"),
                }
                for m in bench["models"]
            ]
        )
        pipeline = pd.DataFrame(
            [
                {
                    "data pipeline (decode + augment)": "cached decoded images" if p["cache"] else "decode every time",
                    "size (px)": p["image_size"],
                    "workers": p["workers"],
                    "throughput": unit(p["images_per_s"], 0, "img/s"),
                    "headroom (÷ fastest model's train img/s)": p["headroom"],
                }
                for p in bench.get("data_pipeline") or []
            ]
        )
        parallel = pd.DataFrame(
            [
                {
                    "jobs at once": p["jobs"],
                    "model": p["model"],
                    "size (px)": p["image_size"],
                    "threads per job": p["threads_per_job"],
                    "train img/s per job": " / ".join(f"{v:.1f}" for v in p["img_s_per_job"]) + " img/s",
                    "aggregate": unit(p["aggregate_img_s"], 1, "img/s"),
                    "aggregate ÷ one job": p["vs_one_job"],
                    "timed steps overlapping": unit(100 * p["overlap"], 0, "%"),
                }
                for p in bench.get("parallel") or []
            ]
        )
        for part, table in (("models", models), ("pipeline", pipeline), ("parallel", parallel)):
            if len(table):
                table.to_csv(results / f"{name}_{part}.csv", index=False)
                written.append(results / f"{name}_{part}.csv")
    return written


def goals(results: Path) -> Path:
    from fetalbrain.benchmarks.flops import count_flops

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        bench = compose("benchmark", ["benchmark=gpu"])
    peak = float(bench.peak_tflops_table[GOAL_DEVICE])
    needed = f"img/s needed for {bench.targets.mfu:.0%} MFU on an {GOAL_DEVICE} SXM ({peak} TFLOP/s bf16)"
    rows = []
    for model, sizes in bench.sizes_by_model.items():
        for size in sizes:
            with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("train", [f"model={model}", "model.net.pretrained=false", "model.net.weights=null"])
            net = instantiate(cfg.model.net, num_classes=16)  # the dataset's 16 classes; weights change no FLOP
            shape = (cfg.data.channels, size, size)
            params = sum(p.numel() for p in net.parameters())
            forward = count_flops(net, (1, *shape), backward=False)
            step = count_flops(net, (bench.batch_size, *shape))
            train_per_image = step / bench.batch_size
            rows.append(
                {
                    "model": model,
                    "size (px)": size,
                    "params": unit(params / 1e6, 2, "M"),
                    "forward GFLOPs/img": forward / 1e9,
                    f"training GFLOPs/img (fwd + bwd, batch {bench.batch_size})": train_per_image / 1e9,
                    "training ÷ forward": train_per_image / forward,
                    needed: unit(bench.targets.mfu * peak * 1e12 / train_per_image, 0, "img/s"),
                }
            )
    pd.DataFrame(rows).to_csv(results / "goals.csv", index=False)
    return results / "goals.csv"


if __name__ == "__main__":
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"
    for path in [*json_tables(results), goals(results)]:
        print(path)
