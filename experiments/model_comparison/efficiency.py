"""Join cross-validated accuracy (results/comparison.csv) with efficiency (results/benchmark_cpu.json).

    .venv/bin/python experiments/model_comparison/efficiency.py

Writes results/accuracy_vs_efficiency.{csv,md,png}: grouped-CV macro-F1, balanced accuracy and
macro AUROC (mean ± std over 5 folds) beside parameters, GFLOPs, CPU latency and training speed
at the image size the models were trained at (128 px).
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

RESULTS = Path(__file__).parent / "results"
IMAGE_SIZE = 128


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
    print("\n".join(lines))


if __name__ == "__main__":
    main()
