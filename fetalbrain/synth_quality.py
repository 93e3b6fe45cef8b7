"""Quality of a synthetic folder, offline: ``python -m fetalbrain.synth_quality synthetic=DIR [classifier=CKPT]``.

Compares the generated images with the real training images their generator saw (its run's
split, rebuilt from the run's config) and, as the scale of what "close" means, the real training
images with the real validation images of the same split:

* FID and KID per class and overall in the feature space of a trained fetalbrain classifier (the
  penultimate layer: domain-relevant, no download; Inception's weights cannot be had offline);
* k-NN precision (fidelity) and recall (diversity, mode collapse), Kynkäänniemi et al. 2019;
* memorisation: each synthetic image's distance to its nearest training image against the
  real-validation-to-train distances, in intensity-normalised pixels (``pixel_normalise``: brightness alone would
  pair every dark fake with the darkest training image) and in features, with the closest pairs shown;
* TSTR (train on synthetic, test on real) from a ``data.mix=synthetic`` run on the same split.

Writes ``quality.md``, ``quality.json``, ``per_class_quality.csv``, ``reference_per_class.csv`` and
``closest_pairs_pixels.png`` / ``closest_pairs_features.png``.
"""

import logging
import time
from pathlib import Path

import cv2
import hydra
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from fetalbrain.data.images import read_grayscale
from fetalbrain.data.synthetic import read_synthetic_folder
from fetalbrain.data.transforms import inference_pipeline
from fetalbrain.evaluation.synthetic import (
    PIXEL_SPACES,
    closest_pairs_figure,
    fid_kid,
    knn_precision_recall,
    matched_subsample,
    memorisation,
    per_class_quality,
    pixel_vectors,
)
from fetalbrain.models.classifier import load_classifier
from fetalbrain.progress import track
from fetalbrain.runs.integrity import verify_checkpoint
from fetalbrain.runs.layout import CONFIG_FILE, read_summary, write_json

log = logging.getLogger(__name__)
# torchmetrics' Inception features need torch-fidelity and weights downloaded from GitHub: not offline.
INCEPTION_NOTE = (
    "Inception FID not computed: its weights cannot be downloaded offline; the classifier's features are used"
)
TSTR_METRICS = ("test/accuracy", "test/balanced_accuracy", "test/f1_macro", "test/auroc_macro")


class FeatureSpace:
    """A trained classifier's penultimate layer (the input of its head), with its own preprocessing."""

    def __init__(self, checkpoint: Path, batch_size: int = 64):
        self.model = load_classifier(checkpoint)
        prep = self.model.hparams.preprocessing
        self.channels = prep["channels"]
        self.transform = inference_pipeline(prep)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        captured = []
        hook = self.model.net.get_classifier().register_forward_hook(lambda m, i, o: captured.append(i[0].flatten(1)))
        try:
            for start in track(range(0, len(images), self.batch_size), "Features: batches"):
                batch = torch.stack(
                    [self.transform(image=im)["image"] for im in images[start : start + self.batch_size]]
                )
                if self.channels == 3:
                    batch = batch.expand(-1, 3, -1, -1)
                self.model(batch.contiguous())
        finally:
            hook.remove()
        return torch.cat(captured).double().numpy()


def generator_split(info: dict):
    """The real train and validation parts the generator's run used, rebuilt from its config."""
    run_dir = Path(info["generator_run"])
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / CONFIG_FILE}: the generator's run is needed to rebuild its split")
    data = OmegaConf.load(run_dir / CONFIG_FILE).data
    with open_dict(data):
        data.num_workers, data.synthetic, data.mix = 0, None, "real"
    datamodule = instantiate(data)
    datamodule.setup("fit")
    return datamodule


def tstr(run_dir: Path | None, folder: Path) -> tuple[dict, list[str]]:
    if run_dir is None:
        return {}, ["TSTR: no tstr_run given (train one with data.mix=synthetic data.synthetic=DIR on this split)"]
    summary = read_summary(run_dir)
    synthetic = summary["data"].get("synthetic") or {}
    notes = []
    if synthetic.get("mix") != "synthetic" or Path(synthetic.get("folder", "")).resolve() != folder.resolve():
        raise ValueError(f"tstr_run={run_dir} was not trained with data.mix=synthetic data.synthetic={folder}")
    return {f"tstr/{k.split('/', 1)[1]}": summary["metrics"][k] for k in TSTR_METRICS if k in summary["metrics"]}, notes


def memorisation_summary(result: dict, labels: np.ndarray, class_names: list[str]) -> dict:
    below = result["nearest_distance"] < result["threshold"]
    return {
        "fraction_below": result["fraction_below"],
        "threshold": result["threshold"],
        "percentile": result["percentile"],
        "per_class": {c: float(below[labels == c].mean()) for c in class_names if (labels == c).any()},
    }


def matched_comparison(feats: dict, fake_labels: np.ndarray, val_labels: np.ndarray, cfg: DictConfig) -> dict:
    """Synthetic vs real train on the same footing as real validation vs real train.

    FID grows as sets shrink and every score follows the class mix, so the synthetic set is subsampled
    to the validation part's size and per-class counts (``cfg.repeats`` draws, mean and std)."""
    rng = np.random.default_rng(cfg.seed)
    kid = dict(kid_subset_size=cfg.kid_subset_size, kid_subsets=cfg.kid_subsets, seed=cfg.seed)
    draws = []
    for _ in track(range(cfg.repeats), "Quality: FID, KID and k-NN on matched subsets"):
        index = matched_subsample(fake_labels, val_labels, rng)
        quality = fid_kid(feats["train"], feats["fake"][index], **kid)
        draws.append({**quality, **knn_precision_recall(feats["train"], feats["fake"][index], k=cfg.knn_k)})
    reference = {
        **fid_kid(feats["train"], feats["val"], **kid),
        **knn_precision_recall(feats["train"], feats["val"], k=cfg.knn_k),
    }
    metrics = {}
    for key, name in (("fid", "fid"), ("kid_mean", "kid"), ("precision", "precision"), ("recall", "recall")):
        values = [d[key] for d in draws]
        metrics[f"quality/{name}"] = float(np.mean(values))
        metrics[f"quality/{name}_std"] = float(np.std(values))
        metrics[f"quality/reference_{name}_train_vs_val"] = float(reference[key])
    return metrics


def evaluate_quality(cfg: DictConfig) -> dict:
    started = time.perf_counter()
    folder = Path(cfg.synthetic).expanduser()
    manifest, info, _ = read_synthetic_folder(folder)
    out = Path(cfg.out) if cfg.out else folder / "quality"
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(cfg.classifier)
    verify_checkpoint(checkpoint, cfg.verify)
    space = FeatureSpace(checkpoint, cfg.batch_size)
    datamodule = generator_split(info)
    class_names = datamodule.class_names
    unknown = sorted(set(space.model.hparams.class_names) ^ set(class_names))
    if unknown:
        raise ValueError(f"classifier={checkpoint} was trained on other classes than the generator: {unknown}")
    # Real images pass through the generator's resolution first, so that both sets reach the classifier
    # equally sharp: otherwise the distances measure the upsampling blur of the synthetic images.
    size = int(info["image_size"])
    train_images, train_targets = datamodule.part_images("train")
    val_images, val_targets = datamodule.part_images("val")
    train_images, val_images = (
        [cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images]
        for images in (train_images, val_images)
    )
    train_labels = np.array([class_names[t] for t in train_targets])
    val_labels = np.array([class_names[t] for t in val_targets])
    fake_images = [read_grayscale(p) for p in manifest["path"]]
    fake_labels = manifest["class"].to_numpy()
    log.info("Features of %d train, %d val, %d synthetic images", len(train_images), len(val_images), len(fake_images))
    feats = {
        name: space(images) for name, images in (("train", train_images), ("val", val_images), ("fake", fake_images))
    }
    options = dict(
        min_images=cfg.min_images, k=cfg.knn_k, kid_subset_size=cfg.kid_subset_size, kid_subsets=cfg.kid_subsets
    )
    per_class = per_class_quality(feats["train"], train_labels, feats["fake"], fake_labels, class_names, **options)
    reference = per_class_quality(feats["train"], train_labels, feats["val"], val_labels, class_names, **options)
    per_class.to_csv(out / "per_class_quality.csv", index=False)
    reference.to_csv(out / "reference_per_class.csv", index=False)

    normalise = cfg.get("pixel_normalise", True)
    px = {
        name: pixel_vectors(images, cfg.pixel_size, normalise)
        for name, images in (("train", train_images), ("val", val_images), ("fake", fake_images))
    }
    memo = {}
    for space_name, vectors in (("pixels", px), ("features", feats)):
        result = memorisation(vectors["train"], vectors["fake"], reference=vectors["val"], percentile=cfg.percentile)
        memo[space_name] = memorisation_summary(result, fake_labels, class_names)
        closest_pairs_figure(
            fake_images, train_images, result, out / f"closest_pairs_{space_name}.png", n=cfg.closest_pairs
        )
    tstr_metrics, notes = tstr(Path(cfg.tstr_run) if cfg.tstr_run else None, folder)
    notes.append(INCEPTION_NOTE)
    matched = matched_comparison(feats, fake_labels, val_labels, cfg)
    metrics = {
        **matched,
        "memorisation/pixels_fraction_below": memo["pixels"]["fraction_below"],
        "memorisation/features_fraction_below": memo["features"]["fraction_below"],
        **tstr_metrics,
    }
    result = {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "memorisation": memo,
        "synthetic": {
            "folder": str(folder),
            "images": len(manifest),
            **{k: info.get(k) for k in ("generator_checkpoint", "generator_sha256", "image_size")},
        },
        "feature_space": {"classifier": str(checkpoint), "dims": int(feats["train"].shape[1])},
        "real": {"train_images": len(train_images), "val_images": len(val_images), "split": info.get("split")},
        "notes": notes,
        "settings": {
            **{k: cfg[k] for k in ("repeats", "min_images", "knn_k", "percentile", "pixel_size", "seed")},
            "pixel_normalise": bool(normalise),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / "quality.json", result)
    (out / "quality.md").write_text(markdown(result, per_class, reference))
    log.info("Quality report -> %s", out)
    return result


def markdown(result: dict, per_class: pd.DataFrame, reference: pd.DataFrame) -> str:
    m = result["metrics"]
    memo = result["memorisation"]
    lines = [
        "# Synthetic image quality",
        "",
        f"{result['synthetic']['images']} synthetic images from `{result['synthetic']['generator_checkpoint']}` "
        f"against the {result['real']['train_images']} real training images its generator saw; real validation "
        f"({result['real']['val_images']} images) gives the real-vs-real scale. Feature space: the penultimate layer "
        f"of `{result['feature_space']['classifier']}` ({result['feature_space']['dims']} dims).",
        "",
        "Synthetic subsets are drawn to the validation part's size and class mix "
        f"({result['settings']['repeats']} draws: mean ± std), so both columns compare like with like.",
        "",
        "| | synthetic vs real train | real val vs real train (scale) |",
        "|---|---|---|",
        *(
            f"| {label} | {m[f'quality/{key}']:.{digits}f} ± {m[f'quality/{key}_std']:.{digits}f} | "
            f"{m[f'quality/reference_{key}_train_vs_val']:.{digits}f} |"
            for label, key, digits in (
                ("FID", "fid", 2),
                ("KID", "kid", 4),
                ("k-NN precision", "precision", 3),
                ("k-NN recall", "recall", 3),
            )
        ),
        "",
        "**Memorisation** (one threshold for all classes): fraction of synthetic images closer to a training "
        "image than the "
        f"{memo['pixels']['percentile']:.0f}th percentile of real-val-to-train distances (independent images: "
        f"about {memo['pixels']['percentile'] / 100:.2f}): pixels "
        f"({PIXEL_SPACES[bool(result['settings'].get('pixel_normalise'))]}) "
        f"{memo['pixels']['fraction_below']:.3f}, "
        f"features {memo['features']['fraction_below']:.3f}. Closest pairs: `closest_pairs_pixels.png`, "
        "`closest_pairs_features.png`.",
        "",
    ]
    if any(k.startswith("tstr/") for k in m):
        lines += [
            "**TSTR** (train on synthetic, test on real): "
            + ", ".join(f"{k[5:]} {v:.3f}" for k, v in m.items() if k.startswith("tstr/")),
            "",
        ]
    lines += [
        "## Per class (synthetic vs real train)",
        "",
        "| class | n real | n synthetic | FID | KID | precision | recall | memorised (pixels) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in per_class.itertuples():
        memorised = (
            memo["pixels"]["per_class"].get(row[1], float("nan"))
            if row[1] != "overall"
            else memo["pixels"]["fraction_below"]
        )
        note = row.note if isinstance(row.note, str) else ""
        lines.append(
            f"| {row.display_name} | {row.n_real} | {row.n_fake} | {row.fid:.2f} | {row.kid_mean:.4f} | "
            f"{row.precision:.3f} | {row.recall:.3f} | {memorised:.3f} | {note} |"
        )
    lines += ["", "Notes:", *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="synth_quality")
def main(cfg: DictConfig) -> None:
    result = evaluate_quality(cfg)
    print({k: round(v, 4) for k, v in result["metrics"].items()})


if __name__ == "__main__":
    main()
