"""The benchmark runs end to end at tiny settings and reports every quantity it promises."""

import json

from hydra import compose, initialize_config_dir

from fetalbrain.benchmark import markdown, run
from tests.conftest import CONF

# Seconds, not minutes: tiny images, two timed steps, no loader workers.
TINY_BENCHMARK = [
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
]


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
                ],
            ),
            tmp_path,
        )
    assert results["precision"] == "bf16" and results["models"][0]["train_img_s_bare"] > 0
    assert dtypes.count(torch.bfloat16) >= 10  # every bare training step and every timed inference call


def test_benchmark_reports_models_pipeline_and_targets(tmp_path):
    overrides = ["models=[cnn,efficientnet_lite0]", *TINY_BENCHMARK, f"append_to={tmp_path / 'history.md'}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        bench = compose("benchmark", overrides=overrides)
        results = run(bench, tmp_path)
    written = json.loads((tmp_path / "benchmark.json").read_text())
    assert [m["model"] for m in written["models"]] == ["cnn", "efficientnet_lite0"]
    for row in written["models"]:
        for key in (
            "params_m",
            "gflops_per_image",
            "train_img_s_lightning",
            "train_img_s_bare",
            "latency_ms_batch1",
            "infer_img_s_batch32",
        ):
            assert row[key] > 0, key
        assert 0.2 < row["lightning_vs_bare"] < 5
    assert written["models"][0]["params_m"] < written["models"][1]["params_m"]
    assert {d["cache"] for d in written["data_pipeline"]} == {True, False}
    assert written["machine"]["cores"] >= 1 and written["precision"] == "fp32"
    generator = written["generator"]
    assert generator["model"] == "wgan_gp" and generator["image_size"] == 32 and generator["n_critic"] == 5
    assert generator["train_img_s"] > 0 and generator["params_m"] > 0
    quality = written["synthetic_quality"]
    assert quality["images_per_set"] == 40 and 0 < quality["fid_kid_seconds"] <= quality["total_seconds"]
    table = markdown(results)
    assert "| cnn | 32 |" in table and "| wgan_gp | 32 |" in table and "FID + KID of 40 vs 40" in table
    assert "Targets:" in table
    assert (tmp_path / "history.md").read_text().strip() == table.strip()
