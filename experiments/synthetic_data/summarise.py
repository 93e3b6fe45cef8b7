"""Collect the synthetic-data study into ``results/``: ``python summarise.py STUDY_DIR RESULTS_DIR``.

Copies compare's tables (mean ± std, 95% t-interval over folds, per-class recall, pooled
out-of-fold), gathers each fold's quality report into ``quality_per_fold.csv`` with its mean, and
copies the per-class sample grids, the closest memorisation pairs and each fold's GAN loss curve.

Then writes the README's tables (its generated blocks) from those results files alone:
``readme_comparison.csv`` (mean ± std over folds, no t-interval), ``readme_pooled.csv`` (pooled
out-of-fold beside the mean over folds), ``readme_per_class.csv``, ``readme_quality.csv`` and
``readme_hybrid_share.csv`` (the synthetic share of each class's training images under
``data.mix=hybrid``: the real training images per class of each fold, from the generator's training
part in ``per_class_quality_fold*.csv``, the same fold's training part as the classifiers', and the
synthetic images the mix could add, at most the ``NUM`` generated per class). Only those, from the
committed results (no study folder): ``python summarise.py --readme-tables RESULTS_DIR``.
"""

import json
import shutil
import sys
from pathlib import Path

import pandas as pd

MODELS = ["cnn", "efficientnet_lite0"]
MIXES = ["real", "synthetic", "hybrid", "oversample"]
GENERATED_PER_CLASS = 100  # run.sh's NUM: images generated per class and fold
HYBRID_RATIO = 0.5  # data.synthetic_ratio (conf/data/fetal_brain.yaml): hybrid wants as many synthetic as real


def collect(study: Path, results: Path) -> None:
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


def _group(model: str, mix: str) -> str:
    return f"{model} · grouped · data.mix={mix}"


def readme_tables(results: Path) -> None:
    """The README's tables, from the results files alone (no study folder, no training)."""
    comparison = pd.read_csv(results / "comparison.csv")
    pairs = [(model, mix) for model in MODELS for mix in MIXES]
    metrics = {
        "test/f1_macro": "macro F1 (mean over folds)",
        "test/balanced_accuracy": "balanced accuracy",
        "test/auroc_macro": "macro AUROC",
        "screening/test_auroc": "screening AUROC",
        "test/accuracy": "accuracy",
    }
    rows = []
    for model, mix in pairs:
        table = comparison[comparison["group"] == _group(model, mix)].set_index("metric")
        row = {"model": model, "data.mix": mix, "folds": int(table["n"].iloc[0])}
        row |= {title: f"{table.loc[k, 'mean']:.3f} ± {table.loc[k, 'std']:.3f}" for k, title in metrics.items()}
        rows.append(row)
    pd.DataFrame(rows).to_csv(results / "readme_comparison.csv", index=False)

    pooled = pd.read_csv(results / "pooled_out_of_fold.csv").set_index("group")
    f1 = comparison[comparison["metric"] == "test/f1_macro"].set_index("group")
    rows = [
        {
            "model": model,
            "data.mix": mix,
            "test images pooled": int(pooled.loc[_group(model, mix), "pooled_images"]),
            "macro F1, mean over folds": f1.loc[_group(model, mix), "mean"],
            "macro F1, pooled out of fold": pooled.loc[_group(model, mix), "pooled_f1_macro"],
            "balanced accuracy, pooled": pooled.loc[_group(model, mix), "pooled_balanced_accuracy"],
            "accuracy, pooled": pooled.loc[_group(model, mix), "pooled_accuracy"],
        }
        for model, mix in pairs
    ]
    pd.DataFrame(rows).to_csv(results / "readme_pooled.csv", index=False, float_format="%.4f")

    # Recall per class (mean over the folds whose test part holds the class); classes at 0 everywhere left out.
    recall = pd.read_csv(results / "per_class_recall.csv").set_index("group").loc[[_group(*p) for p in pairs]]
    recall = recall.loc[:, (recall.fillna(0) > 0).any()].T
    recall.columns = [f"{model} · {mix}" for model, mix in pairs]
    recall.index.name = "class"
    recall.reset_index().to_csv(results / "readme_per_class.csv", index=False)

    quality = pd.read_csv(results / "quality_per_fold.csv")
    quality = quality[quality["fold"] != "std"]
    columns = {
        "quality/fid": "FID synthetic",
        "quality/reference_fid_train_vs_val": "FID real val (scale)",
        "quality/kid": "KID synthetic",
        "quality/reference_kid_train_vs_val": "KID real val (scale)",
        "quality/precision": "k-NN precision synthetic",
        "quality/reference_precision_train_vs_val": "k-NN precision real val (scale)",
        "quality/recall": "k-NN recall synthetic",
        "quality/reference_recall_train_vs_val": "k-NN recall real val (scale)",
        "memorisation/pixels_fraction_below": "'memorised' in pixels (not valid)",
        "memorisation/features_fraction_below": "'memorised' in features",
        "tstr/f1_macro": "TSTR macro F1 (Lite0)",
    }
    quality[["fold", *columns]].rename(columns=columns).to_csv(results / "readme_quality.csv", index=False)

    counts = {}
    for path in sorted(results.glob("per_class_quality_fold*.csv")):
        fold = int(path.stem.removeprefix("per_class_quality_fold"))
        table = pd.read_csv(path)
        counts[fold] = table[table["class"] != "overall"].set_index("display_name")["n_real"]
    real = pd.DataFrame(counts).sort_index(axis=1)  # classes × folds: real training images
    wanted = (real * HYBRID_RATIO / (1 - HYBRID_RATIO)).round().astype(int)
    added = wanted.clip(upper=GENERATED_PER_CLASS)
    share = added / (real + added)
    real.loc["all classes"], added.loc["all classes"] = real.sum(), added.sum()
    share.loc["all classes"] = added.loc["all classes"] / (real.loc["all classes"] + added.loc["all classes"])
    joined = lambda row, form: " / ".join("–" if pd.isna(v) else form.format(v) for v in row)  # noqa: E731
    pd.DataFrame(
        {
            "class": real.index,
            "real training images, folds " + "/".join(map(str, real.columns)): [
                joined(r, "{:.0f}") for r in real.to_numpy()
            ],
            "synthetic added by hybrid": [joined(r, "{:.0f}") for r in added.to_numpy()],
            "synthetic share of the class's training images (0.50 = 50/50)": [
                joined(r, "{:.2f}") for r in share.to_numpy()
            ],
        }
    ).to_csv(results / "readme_hybrid_share.csv", index=False)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] == ["--readme-tables"] and len(arguments) == 2:
        readme_tables(Path(arguments[1]))
    elif len(arguments) == 2:
        collect(Path(arguments[0]), Path(arguments[1]))
        readme_tables(Path(arguments[1]))
    else:
        sys.exit(__doc__)
