"""Collect the synthetic-data study into ``results/``: ``python summarise.py STUDY_DIR RESULTS_DIR``.

Copies compare's tables (mean ± std, 95% t-interval over folds, per-class recall, pooled
out-of-fold), gathers each fold's quality report into ``quality_per_fold.csv`` with its mean, and
copies the per-class sample grids, the closest memorisation pairs and each fold's GAN loss curve.
"""

import json
import shutil
import sys
from pathlib import Path

import pandas as pd

study, results = Path(sys.argv[1]), Path(sys.argv[2])
results.mkdir(parents=True, exist_ok=True)
for name in ("comparison.md", "comparison.csv", "per_class_recall.csv", "pooled_out_of_fold.csv", "runs.csv"):
    shutil.copyfile(study / "comparison" / name, results / name)

rows = []
for fold_dir in sorted(study.glob("fold*/")):
    fold = fold_dir.name.removeprefix("fold")
    quality = json.loads((fold_dir / "quality" / "quality.json").read_text())
    gan = json.loads((fold_dir / "gan" / "metrics.json").read_text())
    rows.append(
        {
            "fold": int(fold),
            **quality["metrics"],
            "gan/epochs": gan["run"]["epochs_trained"] + 1,
            "gan/generator_steps": gan["metrics"]["gan/generator_steps"],
            "gan/train_seconds": gan["run"]["train_seconds"],
            "synthetic_images": quality["synthetic"]["images"],
        }
    )
    shutil.copyfile(fold_dir / "gan" / "samples.png", results / f"samples_fold{fold}.png")
    shutil.copyfile(fold_dir / "quality" / "closest_pairs_pixels.png", results / f"closest_pairs_fold{fold}.png")
    shutil.copyfile(fold_dir / "quality" / "per_class_quality.csv", results / f"per_class_quality_fold{fold}.csv")
    losses = next((fold_dir / "gan" / "csv").rglob("metrics.csv"))
    shutil.copyfile(losses, results / f"gan_losses_fold{fold}.csv")
per_fold = pd.DataFrame(rows).sort_values("fold")
mean = per_fold.drop(columns="fold").agg(["mean", "std"]).assign(fold=["mean", "std"])
pd.concat([per_fold, mean]).to_csv(results / "quality_per_fold.csv", index=False, float_format="%.4f")
print(pd.concat([per_fold, mean]).T.to_string(float_format=lambda v: f"{v:.3f}"))
