"""The benchmark runs end to end at tiny settings and reports every quantity it promises."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from fetalbrain.benchmarks.report import markdown
from fetalbrain.benchmarks.suite import run
from tests.conftest import CONF

# Seconds, not minutes: tiny images, two timed steps, no loader workers. One torch thread: on a 2-core
# machine shared with other jobs, two threads stall each other at random (steps 10-80x slower).
TINY_BENCHMARK = [
    "threads=1",
    "image_sizes=[32]",
    "batch_size=8",
    "warmup_steps=1",
    "steps=2",
    "latency_repeats=2",
    "data_batches=2",
    "data_workers=0",
    "device=cpu",
    "generator.image_size=32",
    "generator.steps=2",
    "quality.images=40",
    "quality.image_size=32",
    "preprocessing.images=4",
    "preprocessing.sides=[64,640]",
]


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """``threads=`` sets torch's thread count for the process: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bf16_autocast_path_runs_on_cpu(tmp_path, monkeypatch):
    """The mixed-precision branch used on GPUs (bf16 autocast in training and inference)."""
    import torch

    dtypes, real_autocast = [], torch.autocast

    def spy(*args, **kwargs):
        dtypes.append(kwargs.get("dtype"))
        return real_autocast(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        results = run(
            compose(
                "benchmark",
                overrides=[
                    "models=[separable]",
                    "precision=bf16",
                    *TINY_BENCHMARK,
                    "generator.enabled=false",
                    "quality.enabled=false",
                    "preprocessing.enabled=false",
                ],
            ),
            tmp_path,
        )
    assert results["precision"] == "bf16" and results["models"][0]["train_img_s_bare"] > 0
    assert results["peak"]["tflops"] is None and results["models"][0]["mfu_lightning"] is None  # auto on a CPU
    assert results["models"][0]["achieved_tflops_lightning"] > 0
    assert dtypes.count(torch.bfloat16) >= 10  # every bare training step and every timed inference call


def test_benchmark_reports_models_pipeline_and_targets(tmp_path):
    overrides = [
        "models=[cnn,efficientnet_lite0]",
        *TINY_BENCHMARK,
        f"append_to={tmp_path / 'history.md'}",
        "peak_tflops=0.5",  # a CPU has no table entry: an explicit peak gives MFU
        "parallel.jobs=[2]",  # two processes at once
        'overrides=["data.cache=false"]',  # the parallel jobs start faster
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        bench = compose("benchmark", overrides=overrides)
        results = run(bench, tmp_path)
    written = json.loads((tmp_path / "benchmark.json").read_text())
    assert [m["model"] for m in written["models"]] == ["cnn", "efficientnet_lite0"]
    assert (tmp_path / "benchmark.png").stat().st_size > 10_000  # the throughput figure, shown in benchmark.md
    assert "](benchmark.png)" in (tmp_path / "benchmark.md").read_text()
    for row in written["models"]:
        for key in (
            "params_m",
            "gflops_per_image",
            "train_img_s_lightning",
            "train_img_s_bare",
            "latency_ms_batch1",
            "infer_img_s_batch",
        ):
            assert row[key] > 0, key
        assert 0.2 < row["lightning_vs_bare"] < 5
        # Forward + backward ≈ 3× forward (the first layer computes no input gradient: a little less).
        assert 2.5 < row["train_gflops_per_image"] / row["gflops_per_image"] <= 3
        assert row["train_tflops_per_step"] == pytest.approx(row["train_gflops_per_image"] * 8 / 1e3)
        steps_per_s = row["train_img_s_lightning"] / 8
        assert row["achieved_tflops_lightning"] == pytest.approx(row["train_tflops_per_step"] * steps_per_s)
        assert row["mfu_lightning"] == pytest.approx(row["achieved_tflops_lightning"] / 0.5)
        assert row["mfu_bare"] == pytest.approx(row["achieved_tflops_bare"] / 0.5)
    assert written["peak"] == {"tflops": 0.5, "source": "peak_tflops"}
    assert written["models"][0]["params_m"] < written["models"][1]["params_m"]
    fastest = max(written["models"], key=lambda r: r["train_img_s_lightning"])
    assert {d["cache"] for d in written["data_pipeline"]} == {True, False}
    for d in written["data_pipeline"]:
        assert d["workers"] == 0 and d["image_size"] == 32
        assert d["headroom"] == pytest.approx(d["images_per_s"] / fastest["train_img_s_lightning"])
    assert written["machine"]["cores"] >= 1 and written["precision"] == "fp32"

    (parallel,) = written["parallel"]  # the first model at its size, as 2 processes released together
    assert (parallel["jobs"], parallel["model"], parallel["image_size"]) == (2, "cnn", 32)
    assert parallel["threads_per_job"] == max(1, torch.get_num_threads() // 2)
    assert len(parallel["img_s_per_job"]) == 2 and min(parallel["img_s_per_job"]) > 0
    assert parallel["aggregate_img_s"] == pytest.approx(sum(parallel["img_s_per_job"]))
    assert 0 <= parallel["overlap"] <= 1 and parallel["vs_one_job"] is None
    job_results = sorted(p.name for p in (tmp_path / "parallel" / "2_jobs").glob("*.result.json"))
    assert job_results == ["job_0.result.json", "job_1.result.json"]

    generator = written["generator"]
    assert generator["model"] == "wgan_gp" and generator["image_size"] == 32 and generator["n_critic"] == 5
    assert generator["train_img_s"] > 0 and generator["params_m"] > 0
    quality = written["synthetic_quality"]
    assert quality["images_per_set"] == 40 and 0 < quality["fid_kid_seconds"] <= quality["total_seconds"]
    targets = written["targets"]
    # harmonisation and the OOD score: per preset, source and size; the k-NN score per model's feature size
    prep = written["preprocessing"]
    assert {(p["harmonise"], p["source"], p["side"]) for p in prep} == {
        (preset, source, side)
        for preset in ("none", "anatomy")
        for source in ("dataset", "external (HC18)")
        for side in (64, 640)
    }
    assert all(p["ms"] > 0 and p["images"] == 4 for p in prep)
    ood = {o["model"]: o for o in written["ood_score"]}
    assert ood["cnn 32 px"]["feature_dim"] == 256 and ood["efficientnet_lite0 32 px"]["feature_dim"] == 1280
    assert all(o["ms"] > 0 and o["train_images"] > 100 for o in ood.values())
    assert targets["ood_score_ms"] == max(o["ms"] for o in ood.values()) and targets["harmonise_added_ms"] is not None
    assert targets["wanted"] == {
        "lightning_vs_bare": 0.95,
        "mfu": 0.35,
        "pipeline_headroom": 3,
        "harmonise_ms": 2,
        "ood_score_ms": 1,
    }
    assert set(targets["mfu_lightning"]) == {"cnn 32 px", "efficientnet_lite0 32 px"}
    table = markdown(results)
    assert "| cnn | 32 |" in table and "| wgan_gp | 32 |" in table and "FID + KID of 40 vs 40" in table
    assert "MFU (Lightning)" in table and "peak 0.5 TFLOP/s" in table and "| 2 | " in table
    assert "Targets:" in table and "MFU (Lightning) ≥ 35%" in table and "harmonisation adds at most" in table
    assert "| data/harmonise=anatomy | external (HC18) | 640 |" in table and "| OOD score (k-NN" in table
    assert (tmp_path / "history.md").read_text().strip() == table.strip()


def test_training_flops_are_counted_forward_and_backward():
    """Hand counts: a Linear layer is 2·m·n·k FLOPs forward; backward computes the weight gradient (same
    again) and, except for the first layer, the input gradient (same again). Depthwise convolutions too:
    torch's own formula would count their weight gradient once per channel."""
    from torch import nn

    from fetalbrain.benchmarks.flops import count_flops

    m, k, h, n = 8, 5, 7, 3
    mlp = nn.Sequential(nn.Linear(k, h), nn.ReLU(), nn.Linear(h, n))
    assert count_flops(mlp, (m, k), backward=False) == 2 * m * k * h + 2 * m * h * n
    assert count_flops(mlp, (m, k)) == 3 * (2 * m * h * n) + 2 * (2 * m * k * h)

    c, batch = 6, 4
    depthwise = nn.Sequential(
        nn.Conv2d(c, c, 3, groups=c, bias=False),  # 10 px -> 8 px
        nn.Conv2d(c, c, 3, groups=c, bias=False),  # 8 px -> 6 px
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    first, second = 2 * batch * c * 8 * 8 * 9, 2 * batch * c * 6 * 6 * 9
    assert count_flops(depthwise, (batch, c, 10, 10), backward=False) == first + second
    assert count_flops(depthwise, (batch, c, 10, 10)) == 2 * first + 3 * second


def test_mfu_arithmetic_and_peak_table():
    from fetalbrain.benchmarks.flops import achieved_tflops, device_peak, model_flop_utilisation, table_peak_tflops

    # 3 TFLOP per step, 60 img/s at batch 30 = 2 steps/s = 6 TFLOP/s; against a 20 TFLOP/s peak: 30 %.
    achieved = achieved_tflops(3e12, images_per_s=60, batch_size=30)
    assert achieved == pytest.approx(6.0)
    assert model_flop_utilisation(achieved, 20.0) == pytest.approx(0.3)
    assert model_flop_utilisation(achieved, None) is None

    with initialize_config_dir(str(CONF), version_base="1.3"):
        bench = compose("benchmark")
    table = bench.peak_tflops_table
    assert table_peak_tflops("NVIDIA H100 80GB HBM3", table) == ("H100", 989.5)
    assert table_peak_tflops("NVIDIA H100 PCIe", table) == ("H100 PCIe", 756)
    assert table_peak_tflops("NVIDIA H100 NVL", table)[1] == 835.5
    assert table_peak_tflops("NVIDIA H200", table)[1] == 989.5
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB", table) == ("A100", 312)
    assert table_peak_tflops("NVIDIA L40S", table) == ("L40S", 362.05)
    assert table_peak_tflops("NVIDIA L4", table) == ("L4", 121)
    assert table_peak_tflops("NVIDIA A10G", table) is None  # not the A10: no datasheet, so no guess
    assert table_peak_tflops("NVIDIA GeForce RTX 4090", table) is None

    cpu = torch.device("cpu")
    assert device_peak(bench, cpu, bf16=True)["tflops"] is None  # auto: unknown on a CPU
    with open_dict(bench):
        bench.peak_tflops = 2.5
    assert device_peak(bench, cpu, bf16=False) == {"tflops": 2.5, "source": "peak_tflops"}
    for bad in ("fast", 0, -1, True):
        with open_dict(bench):
            bench.peak_tflops = bad
        with pytest.raises(ValueError, match="peak_tflops"):
            device_peak(bench, cpu, bf16=True)


def test_gpu_preset_composes():
    """benchmark=gpu: the issue's measurement (Xception 299 px, EfficientNet-Lite0 224 px, bf16, compile)."""
    from fetalbrain.benchmarks.parallel import parallel_plan
    from fetalbrain.benchmarks.settings import model_sizes

    with initialize_config_dir(str(CONF), version_base="1.3"):
        bench = compose("benchmark", overrides=["benchmark=gpu"])
        with pytest.raises(ValueError, match="sizes_by_model.cnn"):
            model_sizes(compose("benchmark", overrides=["models=[xception]", "sizes_by_model={cnn:[64]}"]))
    assert model_sizes(bench) == [("xception", 299), ("efficientnet_lite0", 224)]
    assert (bench.device, bench.precision, bench.compile, bench.channels_last) == ("cuda", "bf16", True, True)
    assert bench.warmup_steps >= 5 and bench.peak_tflops == "auto"
    assert parallel_plan(bench, model_sizes(bench)) == {"jobs": [1, 2, 4], "model": "xception", "image_size": 299}
    assert list(bench.data_workers) == [0, 2, 4, 8]


def test_parallel_speedup_is_against_one_job():
    from fetalbrain.benchmarks.parallel import parallel_speedups

    rows = parallel_speedups([{"jobs": 1, "aggregate_img_s": 100.0}, {"jobs": 2, "aggregate_img_s": 150.0}])
    assert [r["vs_one_job"] for r in rows] == [1.0, 1.5]
    assert parallel_speedups([{"jobs": 2, "aggregate_img_s": 150.0}])[0]["vs_one_job"] is None
