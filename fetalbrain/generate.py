"""Generate synthetic images: ``python -m fetalbrain.generate ckpt=… num=64 class=<name>|all|abnormal out=DIR``.

Writes ``<out>/<class>/<class>_s<seed>_<i>.png`` (8-bit grey, the generator's image size), then
``manifest.csv`` (file, class, seed, index), ``manifest.json`` (generator checkpoint, its SHA256,
the run and split it was trained on, the classes and how many of each) and ``generator_train_images.csv``
(every real image the generator saw, so that ``data.mix`` can refuse a generator that saw a run's test part).
The same checkpoint and seed give the same images; each class draws from its own seed, so ``class=X`` gives
the same images as the ``X`` rows of ``class=all``.

``class=abnormal`` is the binary conditioning of screening studies: ``num`` images in all, drawn from the
anomaly classes in their proportions in the generator's training part (largest remainders), so that
"abnormal" means what it meant in the data; each image keeps its own anomaly class in the manifest.
"""

import logging
import shutil
import time
from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image

from fetalbrain.data.classes import NORMAL_CLASS, display_name
from fetalbrain.data.synthetic import GENERATOR_TRAIN_IMAGES, MANIFEST_CSV, MANIFEST_JSON
from fetalbrain.models.gan import TRAIN_IMAGES_FILE, load_gan
from fetalbrain.progress import track
from fetalbrain.runs.checkpoints import latest_checkpoint, run_directory
from fetalbrain.runs.integrity import sha256_file, verify_checkpoint
from fetalbrain.runs.layout import read_summary, write_json

log = logging.getLogger(__name__)


ABNORMAL = "abnormal"


def resolve_classes(requested: str, class_names: list[str]) -> list[str]:
    """``all``, ``abnormal`` (every class but normal), a label or a clinical name; anything else is an error
    listing what is valid."""
    if requested == "all":
        return list(class_names)
    if str(requested).lower() == ABNORMAL and ABNORMAL not in class_names:
        return [c for c in class_names if c != NORMAL_CLASS]
    by_name = {display_name(c).lower(): c for c in class_names} | {c.lower(): c for c in class_names}
    if str(requested).lower() not in by_name:
        raise ValueError(
            f"class={requested!r} is not a class of this generator. Valid: all, {ABNORMAL}, "
            + ", ".join(f"{c} ({display_name(c)})" for c in class_names)
        )
    return [by_name[str(requested).lower()]]


def class_seed(seed: int, index: int) -> int:
    return seed * 1000 + index


def images_per_class(requested: str, chosen: list[str], num: int, train_labels: pd.Series) -> dict[str, int]:
    """``num`` of each chosen class, or for ``abnormal`` ``num`` in all, shared by the classes' counts in the
    generator's training part (largest remainders: the total is exactly ``num``)."""
    if str(requested).lower() != ABNORMAL or ABNORMAL in chosen:
        return dict.fromkeys(chosen, num)
    counts = train_labels.value_counts().reindex(chosen, fill_value=0)
    if counts.sum() == 0:
        raise ValueError(f"class={ABNORMAL}: the generator's training part holds no abnormal image")
    exact = counts / counts.sum() * num
    share = exact.astype(int)
    remainders = (exact - share).sort_values(ascending=False, kind="stable")
    share[remainders.index[: num - int(share.sum())]] += 1
    return {label: int(n) for label, n in share.items() if n > 0}


def prepare_output(out: Path, overwrite: bool) -> None:
    """Never silently mix two generations: an existing generated folder needs overwrite=true."""
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST_CSV).is_file():
            raise FileExistsError(f"out={out} exists and is not a generated folder: choose a new or empty folder")
        if not overwrite:
            raise FileExistsError(f"out={out} already holds generated images: pass overwrite=true to replace them")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def generate(
    checkpoint: Path,
    out: Path,
    num: int = 64,
    classes: str = "all",
    seed: int = 0,
    batch_size: int = 64,
    verify: bool = True,
    overwrite: bool = False,
) -> pd.DataFrame:
    if not checkpoint.is_file():
        raise FileNotFoundError(f"ckpt={checkpoint}: no such file")
    if num < 1:
        raise ValueError(f"num={num}: must be at least 1")
    integrity = verify_checkpoint(checkpoint, verify)
    gan = load_gan(checkpoint)
    chosen = resolve_classes(classes, gan.hparams.class_names)
    run_dir = run_directory(checkpoint)
    seen = run_dir / TRAIN_IMAGES_FILE
    if not seen.is_file():
        raise FileNotFoundError(
            f"{seen}: the generator run does not list the images it was trained on, so a mix could not be "
            "checked for leakage; generate from a run trained by python -m fetalbrain.train model=wgan_gp"
        )
    counts = images_per_class(classes, chosen, num, pd.read_csv(seen)["label"])
    prepare_output(out, overwrite)
    rows = []
    for label, count in track(list(counts.items()), f"Generating {sum(counts.values())} images"):
        index = gan.hparams.class_names.index(label)
        s = class_seed(seed, index)
        images = gan.generate(torch.full((count,), index, dtype=torch.long), seed=s, batch_size=batch_size)
        (out / label).mkdir(exist_ok=True)
        for i, image in enumerate(images):
            file = f"{label}/{label}_s{s}_{i:04d}.png"
            Image.fromarray(image).save(out / file)
            rows.append({"file": file, "class": label, "seed": s, "index": i})
    manifest = pd.DataFrame(rows)
    manifest.to_csv(out / MANIFEST_CSV, index=False)
    shutil.copyfile(seen, out / GENERATOR_TRAIN_IMAGES)
    summary = read_summary(run_dir) if (run_dir / "metrics.json").is_file() else {}
    write_json(
        out / MANIFEST_JSON,
        {
            "generator_checkpoint": str(checkpoint.resolve()),
            "generator_sha256": sha256_file(checkpoint),
            "integrity": integrity,
            "generator_run": str(run_dir),
            "split": summary.get("data", {}).get("split"),
            "image_size": gan.hparams.preprocessing["image_size"],
            "requested": classes,
            "classes": list(counts),
            "images_per_class": counts,
            "seed": seed,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    log.info("Generated %d images of %d class(es) -> %s", len(manifest), len(counts), out)
    return manifest


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    checkpoint = Path(cfg.ckpt) if cfg.ckpt else latest_checkpoint(Path(cfg.paths.log_dir), task="generation")
    manifest = generate(
        checkpoint, Path(cfg.out), cfg.num, str(cfg["class"]), cfg.seed, cfg.batch_size, cfg.verify, cfg.overwrite
    )
    print(f"{len(manifest)} images from {checkpoint} -> {cfg.out}")


if __name__ == "__main__":
    main()
