"""Join cross-validated accuracy (results/comparison.csv) with efficiency (results/benchmark_cpu.json).

    .venv/bin/python experiments/model_comparison/efficiency.py

Writes results/accuracy_vs_efficiency.{csv,md,png}: grouped-CV macro-F1, balanced accuracy and
macro AUROC (mean ± std over 5 folds) beside parameters, GFLOPs, CPU latency and training speed
at the image size the models were trained at (128 px).

Also writes the README's tables (its generated blocks), from the committed results/ files alone
(comparison.csv, pooled_out_of_fold.csv, runs.csv, per_class_recall.csv, benchmark_cpu.json):
readme_comparison.csv, readme_pooled.csv, readme_per_class_grouped.csv, readme_shortcut.csv,
readme_calibration.csv and readme_efficiency.csv. Only those, without redrawing the figure:

    .venv/bin/python experiments/model_comparison/efficiency.py --readme-tables
"""

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

RESULTS = Path(__file__).parent / "results"
IMAGE_SIZE = 128
MODELS = ["cnn", "separable", "efficientnet_lite0", "efficientnet_b0", "xception"]  # the README's order
SPLITS = ["grouped", "official"]
OFFICIAL_TEST_IMAGES = 176  # the export's test part: every official run is scored on the same 176 images
Z95 = 1.959964


def _spread(mean: float, std: float) -> str:
    return "–" if not math.isfinite(mean) else f"{mean:.3f}" if not math.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def readme_tables() -> None:
    """The README's tables, from the committed results/ files alone (no run folder, no training)."""
    comparison = pd.read_csv(RESULTS / "comparison.csv")
    runs = pd.read_csv(RESULTS / "runs.csv")
    groups = [f"{m} · {s}" for m in MODELS for s in SPLITS]

    # Mean ± std over the 5 runs of a group: grouped = 5 folds (one seed each), official = 5 seeds on one test set.
    metrics = {
        "test/accuracy": "accuracy",
        "test/balanced_accuracy": "balanced accuracy",
        "test/f1_macro": "macro F1 (mean over runs)",
        "test/auroc_macro": "macro AUROC",
        "screening/test_auroc": "screening AUROC",
    }
    rows = []
    for group in groups:
        table = comparison[comparison["group"] == group].set_index("metric")
        model, split = group.split(" · ")
        row = {"model": model, "split": split, "runs": int(table["n"].iloc[0])}
        row |= {title: _spread(table.loc[key, "mean"], table.loc[key, "std"]) for key, title in metrics.items()}
        rows.append(row)
    pd.DataFrame(rows).to_csv(RESULTS / "readme_comparison.csv", index=False)

    # Pooled: every test prediction of a group in one confusion matrix. Grouped: each image once (out of fold).
    # Official: the same 176 test images once per seed, so not out of fold and not 880 independent images.
    pooled = pd.read_csv(RESULTS / "pooled_out_of_fold.csv").set_index("group")
    rows = []
    for group in groups:
        model, split = group.split(" · ")
        table = comparison[comparison["group"] == group].set_index("metric")
        accuracy = table.loc["test/accuracy", "mean"]
        margin = Z95 * math.sqrt(accuracy * (1 - accuracy) / OFFICIAL_TEST_IMAGES) if split == "official" else None
        rows.append(
            {
                "model": model,
                "split": split,
                "predictions pooled": int(pooled.loc[group, "pooled_images"]),
                "what they are": "each image once, out of fold"
                if split == "grouped"
                else f"the same {OFFICIAL_TEST_IMAGES} test images × {int(table['n'].iloc[0])} seeds",
                "macro F1, mean over runs": table.loc["test/f1_macro", "mean"],
                "macro F1, pooled": pooled.loc[group, "pooled_f1_macro"],
                "balanced accuracy, pooled": pooled.loc[group, "pooled_balanced_accuracy"],
                "accuracy, pooled": pooled.loc[group, "pooled_accuracy"],
                f"binomial 95 % margin of one run's accuracy ({OFFICIAL_TEST_IMAGES} images)": margin,
            }
        )
    pd.DataFrame(rows).to_csv(RESULTS / "readme_pooled.csv", index=False, float_format="%.4f")

    # Recall per class, grouped split: rows are classes, columns models.
    recall = pd.read_csv(RESULTS / "per_class_recall.csv").set_index("group")
    grouped = recall.loc[[f"{m} · grouped" for m in MODELS]].T
    grouped.columns = MODELS
    grouped.index.name = "class"
    grouped.reset_index().to_csv(RESULTS / "readme_per_class_grouped.csv", index=False)

    # The shortcut baselines are fitted on each run's training part and do not depend on the model.
    rows = []
    for split in SPLITS:
        one = runs[(runs["split"] == split) & (runs["model"] == MODELS[0])]
        row = {"split": split, "runs (of one model)": len(one)}
        for key, title in (
            ("shortcut/image_stats_test_auroc", "image-statistics baseline AUROC"),
            ("shortcut/border_only_test_auroc", "border-only baseline AUROC"),
        ):
            row[title] = _spread(one[key].mean(), one[key].std(ddof=1) if one[key].nunique() > 1 else float("nan"))
        rows.append(row)
    pd.DataFrame(rows).to_csv(RESULTS / "readme_shortcut.csv", index=False)

    rows = []
    for model in MODELS:
        part = runs[(runs["split"] == "grouped") & (runs["model"] == model)]
        rows.append(
            {
                "model (grouped)": model,
                "ECE": _spread(part["test/ece"].mean(), part["test/ece"].std(ddof=1)),
                "ECE after temperature scaling": _spread(
                    part["test/ece_temperature_scaled"].mean(), part["test/ece_temperature_scaled"].std(ddof=1)
                ),
                "temperature (fitted on validation)": _spread(
                    part["calibration/temperature"].mean(), part["calibration/temperature"].std(ddof=1)
                ),
            }
        )
    pd.DataFrame(rows).to_csv(RESULTS / "readme_calibration.csv", index=False)

    benchmark = json.loads((RESULTS / "benchmark_cpu.json").read_text())
    speed = {(m["model"], m["image_size"]): m for m in benchmark["models"]}
    macro_f1 = comparison[comparison["metric"] == "test/f1_macro"].set_index("group")
    rows = []
    for model in MODELS:
        small, large = speed[(model, IMAGE_SIZE)], speed.get((model, 224), {})
        f1 = macro_f1.loc[f"{model} · grouped"]
        # the benchmark's JSON names it infer_img_s_batch since its batch became a key (it was 32 here)
        infer = small.get("infer_img_s_batch", small.get("infer_img_s_batch32"))
        rows.append(  # units inside the cells keep them as written (a bare number is re-read as a float)
            {
                "model": model,
                "grouped macro F1 (mean ± std over folds)": _spread(f1["mean"], f1["std"]),
                "params": f"{small['params_m']:.2f} M",
                f"GFLOPs/img ({IMAGE_SIZE} px)": f"{small['gflops_per_image']:.2f}",
                f"latency b1 ({IMAGE_SIZE} px)": f"{small['latency_ms_batch1']:.1f} ms",
                f"training ({IMAGE_SIZE} px)": f"{small['train_img_s_lightning']:.0f} img/s",
                f"inference b32 ({IMAGE_SIZE} px)": f"{infer:.0f} img/s",
                f"peak training memory ({IMAGE_SIZE} px)": f"{small['peak_memory_mb_training']:.0f} MB",
                "latency b1 (224 px)": f"{large['latency_ms_batch1']:.1f} ms" if large else "–",
                "training (224 px)": f"{large['train_img_s_lightning']:.1f} img/s" if large else "–",
            }
        )
    pd.DataFrame(rows).to_csv(RESULTS / "readme_efficiency.csv", index=False)


def main() -> None:
    accuracy = pd.read_csv(RESULTS / "comparison.csv")
    accuracy = accuracy[accuracy["group"].str.endswith("· grouped")]
    wide = accuracy.pivot(index="group", columns="metric", values=["mean", "std"])
    benchmark = json.loads((RESULTS / "benchmark_cpu.json").read_text())
    speed = pd.DataFrame([m for m in benchmark["models"] if m["image_size"] == IMAGE_SIZE]).set_index("model")
    # The benchmark's JSON names it infer_img_s_batch since its batch became a key (it was 32 here).
    speed = speed.rename(columns={"infer_img_s_batch": "infer_img_s_batch32"})
    rows = []
    for group in wide.index:
        model = group.split(" · ")[0]
        row = {"model": model}
        for metric, name in (
            ("test/f1_macro", "macro_f1"),
            ("test/balanced_accuracy", "balanced_accuracy"),
            ("test/auroc_macro", "macro_auroc"),
        ):
            row[name], row[f"{name}_std"] = wide.loc[group, ("mean", metric)], wide.loc[group, ("std", metric)]
        row.update(
            speed.loc[
                model,
                [
                    "params_m",
                    "gflops_per_image",
                    "latency_ms_batch1",
                    "infer_img_s_batch32",
                    "train_img_s_lightning",
                    "peak_memory_mb_training",
                ],
            ].to_dict()
        )
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("gflops_per_image")
    table.to_csv(RESULTS / "accuracy_vs_efficiency.csv", index=False)

    machine = benchmark["machine"]
    lines = [
        f"Grouped 5-fold CV at {IMAGE_SIZE} px (mean ± std over folds); efficiency on {machine['cpu']}, "
        f"{machine['cores']} cores, {machine['torch_threads']} torch threads, fp32, batch 32.",
        "",
        "| model | macro F1 | balanced accuracy | macro AUROC | params (M) | GFLOPs/img | CPU latency b1 (ms) "
        "| CPU infer img/s b32 | CPU train img/s | peak train memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        lines.append(
            f"| {r.model} | {r.macro_f1:.3f} ± {r.macro_f1_std:.3f} | {r.balanced_accuracy:.3f} ± "
            f"{r.balanced_accuracy_std:.3f} | {r.macro_auroc:.3f} ± {r.macro_auroc_std:.3f} | {r.params_m:.2f} | "
            f"{r.gflops_per_image:.2f} | {r.latency_ms_batch1:.1f} | {r.infer_img_s_batch32:.0f} | "
            f"{r.train_img_s_lightning:.0f} | {r.peak_memory_mb_training:.0f} |"
        )
    (RESULTS / "accuracy_vs_efficiency.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, column, label in (
        (axes[0], "gflops_per_image", "forward GFLOPs per image (log)"),
        (axes[1], "latency_ms_batch1", "CPU latency, batch 1 (ms, log)"),
    ):
        ax.errorbar(table[column], table["macro_f1"], yerr=table["macro_f1_std"], fmt="o", capsize=4)
        for r in table.itertuples():
            ax.annotate(
                r.model, (getattr(r, column), r.macro_f1), textcoords="offset points", xytext=(6, 4), fontsize=8
            )
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test macro-F1, grouped 5-fold CV (± std)")
        ax.set_ylim(0, 0.3)
    fig.suptitle(
        f"Accuracy against cost ({IMAGE_SIZE} px; Lite0 ImageNet-pretrained, others from scratch)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy_vs_efficiency.png", dpi=120)
    plt.close(fig)
    readme_tables()
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme-tables"]:
        readme_tables()
    else:
        main()
