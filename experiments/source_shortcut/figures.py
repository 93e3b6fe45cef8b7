"""Pictures for the source-shortcut study: what harmonisation does to images of each source, and where the
default model looks on external normal heads before and after it.

    python figures.py --runs RUNS_DIR [--out RESULTS_DIR] [--fold 0]

``preprocessing.png``: an in-distribution normal, two in-distribution anomalies and two external (HC18) normal
heads, as the network receives them without and with ``data/harmonise=anatomy``. ``gradcam_external.png``:
Grad-CAM of the fold's EfficientNet-Lite0 runs (without / with harmonisation) on external normal heads, with
the predicted class and the abnormal score against the run's screening threshold.
"""

import argparse
from pathlib import Path

import albumentations as A
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from fetalbrain.data.images import read_grayscale  # noqa: E402
from fetalbrain.data.transforms import preprocessing  # noqa: E402
from fetalbrain.inference.predictor import Predictor  # noqa: E402
from fetalbrain.runs.layout import find_runs, read_summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "fetal-brain-ultrasound"
EXTERNAL = ROOT / "data" / "hc18-normal-heads"


def harmonise_preset(name: str) -> dict:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return dict(compose("train", [f"data/harmonise={name}"]).data.harmonise)


def example_images() -> list[tuple[str, Path]]:
    files = sorted((DATA / "test").glob("*.jpg"))
    normal = next(f for f in files if "Patient" in f.name)
    anomalies = [f for f in files if "Patient" not in f.name and "_aug_" not in f.name]
    external = sorted((EXTERNAL / "images").glob("*.jpg"))
    return [
        ("normal (BCNatal)", normal),
        ("anomaly (export)", anomalies[0]),
        ("anomaly (export)", anomalies[len(anomalies) // 2]),
        ("external normal (HC18)", external[0]),
        ("external normal (HC18)", external[len(external) // 2]),
    ]


def preprocessing_figure(out: Path, size: int = 128) -> Path:
    examples = example_images()
    settings = {"as stored": None, "none": harmonise_preset("none"), "anatomy": harmonise_preset("anatomy")}
    fig, axes = plt.subplots(len(settings), len(examples), figsize=(2.4 * len(examples), 2.5 * len(settings)))
    for col, (title, path) in enumerate(examples):
        gray = read_grayscale(path)
        for row, (name, options) in enumerate(settings.items()):
            shown = gray if options is None else A.Compose(preprocessing(size, harmonise=options))(image=gray)["image"]
            axes[row, col].imshow(shown, cmap="gray", vmin=0, vmax=255)
            axes[row, col].set_xticks([]), axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(f"{title}\n{gray.shape[1]}x{gray.shape[0]}", fontsize=8)
            if col == 0:
                axes[row, col].set_ylabel(name if options is None else f"data/harmonise={name}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "preprocessing.png", dpi=110)
    plt.close(fig)
    return out / "preprocessing.png"


def fold_runs(runs_dir: Path, fold: int, model: str = "efficientnet_lite0") -> dict[str, Path]:
    found = {}
    for run in find_runs([runs_dir / model / f"fold{fold}"], "classification"):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()))
        found[overrides.get("data/harmonise", "none")] = Path(read_summary(run)["run"]["best_checkpoint"])
    return found


def gradcam_figure(runs_dir: Path, out: Path, fold: int, count: int = 5) -> Path | None:
    checkpoints = fold_runs(runs_dir, fold)
    if not checkpoints:
        return None
    labels = pd.read_csv(EXTERNAL / "labels.csv")
    picked = labels.drop_duplicates("subject").iloc[:: max(1, labels["subject"].nunique() // count)].head(count)
    fig, axes = plt.subplots(len(checkpoints), count, figsize=(2.6 * count, 2.9 * len(checkpoints)), squeeze=False)
    for row, (name, checkpoint) in enumerate(sorted(checkpoints.items(), key=lambda kv: kv[0] != "none")):
        predictor = Predictor(checkpoint)
        for col, file in enumerate(picked["file"]):
            p = predictor.predict_file(EXTERNAL / "images" / file)
            ax = axes[row, col]
            ax.imshow(p.heatmap)
            ax.set_xticks([]), ax.set_yticks([])
            flag = "abnormal" if p.screening_positive else "normal"
            ax.set_title(f"{p.label}\nabnormal {p.abnormal_probability:.2f} → {flag}", fontsize=7)
            if col == 0:
                ax.set_ylabel(f"data/harmonise={name}", fontsize=8)
    fig.suptitle(f"Grad-CAM on external normal heads (HC18), EfficientNet-Lite0, fold {fold}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "gradcam_external.png", dpi=110)
    plt.close(fig)
    return out / "gradcam_external.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--fold", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(preprocessing_figure(args.out))
    print(gradcam_figure(args.runs, args.out, args.fold))


if __name__ == "__main__":
    main()
