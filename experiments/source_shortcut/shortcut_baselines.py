"""Shortcut baselines under each harmonisation setting, on grouped 5-fold CV by case (no network trained).

For every fold of the default split and every setting below, the deterministic preprocessing of that setting
is applied to the fold's training and test images (at the network's size), and the report's two trivial
baselines are fitted on train and scored on test: a logistic regression on image statistics, and one on the
border strips alone (where there is no anatomy). AUROC near 0.5 means the setting leaves no such cue.

    python experiments/source_shortcut/shortcut_baselines.py [--image-size 128] [--out DIR]
"""

import argparse
import time
from pathlib import Path

import albumentations as A
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fetalbrain.data.classes import NORMAL_CLASS
from fetalbrain.data.harmonise import HARMONISE_DEFAULTS
from fetalbrain.data.transforms import preprocessing
from fetalbrain.evaluation.shortcut import shortcut_metrics

ROOT = Path(__file__).resolve().parents[2]
MASK_CROP_PERCENTILE = {"mask_outside_sector": True, "crop_to_sector": True, "intensity": "percentile"}
SETTINGS = {  # name -> data.harmonise overrides: each step alone, then combinations
    "none": {},
    "remove_overlays": {"remove_overlays": True},
    "mask_outside_sector": {"mask_outside_sector": True},
    "crop_to_sector": {"crop_to_sector": True},
    "vignette 0.8": {"vignette": 0.8},
    "intensity percentile": {"intensity": "percentile"},
    "intensity equalise": {"intensity": "equalise"},
    "letterbox": {"letterbox": True},
    "mask+crop": {"mask_outside_sector": True, "crop_to_sector": True},
    "mask+percentile": {"mask_outside_sector": True, "intensity": "percentile"},
    "mask+crop+percentile": MASK_CROP_PERCENTILE,
    "crop+vignette 0.8+percentile": {"crop_to_sector": True, "vignette": 0.8, "intensity": "percentile"},
    "mask+crop+vignette 0.9+percentile": {**MASK_CROP_PERCENTILE, "vignette": 0.9},
    "mask+crop+vignette 0.8+percentile": {**MASK_CROP_PERCENTILE, "vignette": 0.8},
    "overlays+mask+crop+vignette 0.8+percentile": {**MASK_CROP_PERCENTILE, "vignette": 0.8, "remove_overlays": True},
    "mask+crop+vignette 0.8+equalise": {**MASK_CROP_PERCENTILE, "vignette": 0.8, "intensity": "equalise"},
    "mask+crop+vignette 0.8+percentile+letterbox": {**MASK_CROP_PERCENTILE, "vignette": 0.8, "letterbox": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = []
    for fold in range(args.folds):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", [f"data.fold={fold}"])
        datamodule = instantiate(cfg.data, _recursive_=False)
        datamodule.setup()
        train, test = datamodule.part_images("train"), datamodule.part_images("test")
        normal = datamodule.class_names.index(NORMAL_CLASS)
        for name, overrides in SETTINGS.items():
            started = time.perf_counter()
            steps = A.Compose(preprocessing(args.image_size, harmonise={**HARMONISE_DEFAULTS, **overrides}))
            apply = lambda images: [steps(image=image)["image"] for image in images]  # noqa: E731
            metrics, notes = shortcut_metrics((apply(train[0]), train[1]), (apply(test[0]), test[1]), normal)
            rows.append({"setting": name, "fold": fold, **metrics, "notes": "; ".join(notes)})
            print(fold, name, {k: round(v, 3) for k, v in metrics.items()}, f"{time.perf_counter() - started:.1f} s")
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "shortcut_baselines_folds.csv", index=False)
    summary = table.groupby("setting", sort=False)[[c for c in table if c.startswith("shortcut/")]].agg(["mean", "std"])
    summary.columns = [f"{metric.split('/')[1]}_{stat}" for metric, stat in summary.columns]
    summary.round(3).to_csv(args.out / "shortcut_baselines.csv")
    print(summary.round(3).to_string())


if __name__ == "__main__":
    main()
