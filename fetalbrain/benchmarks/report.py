"""What the results say: the machine they were measured on, the markdown tables of ``benchmark.md`` and the
``targets`` summary (each measurement against what issues #10 and #11 want)."""

import os
import platform
from pathlib import Path

import lightning as L
import psutil
import torch
from omegaconf import DictConfig

from fetalbrain.project import plain


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


def target_summary(
    models: list[dict], pipeline: list[dict], wanted: DictConfig, prep: list[dict] = (), ood: list[dict] = ()
) -> dict:
    ratios = [r["lightning_vs_bare"] for r in models]
    harmonised = [p["ms"] - _plain_ms(prep, p) for p in prep if p["harmonise"] != "none"]
    mfu = {f"{r['model']} {r['image_size']} px": r["mfu_lightning"] for r in models}
    known = [v for v in mfu.values() if v is not None]
    return {
        "wanted": plain(wanted),
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


def throughput_figure(results: dict, path: Path) -> Path:
    """benchmark.png: training (Lightning and the bare loop) and inference images per second of each model and
    size, on a log scale (the models differ by 20x or more), with the machine in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = results["models"]
    labels = [f"{r['model']} {r['image_size']}px" for r in rows]
    series = {
        "train (Lightning)": [r["train_img_s_lightning"] for r in rows],
        "train (bare loop)": [r["train_img_s_bare"] for r in rows],
        f"inference (batch {results['settings']['batch_size']})": [r["infer_img_s_batch"] for r in rows],
    }
    y = np.arange(len(rows))
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) * len(series) / 2 + 1.6))
    for i, (name, values) in enumerate(series.items()):  # dots, not bars: a log axis has no zero to start from
        ax.plot([v if v else np.nan for v in values], y + (i - 1) * height, "o", ms=7, label=name)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("images per second (log scale)")
    machine = results["machine"]
    ax.set_title(f"{machine['device']}, {machine['cores']} cores, {results['precision']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
