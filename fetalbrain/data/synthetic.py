"""Mix generated images into the training part: ``data.synthetic=DIR data.mix=...``.

A synthetic folder is what ``python -m fetalbrain.generate`` writes: PNGs, ``manifest.csv`` (file,
class, seed, index), ``manifest.json`` (generator checkpoint, its SHA256, the split it was trained
on) and ``generator_train_images.csv`` (every real image the generator saw). Synthetic images only
ever join the **training** part; validation and test stay real. A generator that saw an image or
case of this run's validation or test part would leak it into training: such a mix is refused.

Mixes: ``real`` (ignore the folder), ``synthetic`` (train on synthetic images only: TSTR),
``hybrid`` (real training images plus synthetic ones making up ``synthetic_ratio`` of the part,
class by class), ``oversample`` (real plus synthetic images filling each class up to the largest
real class).
"""

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from fetalbrain.data.readers import DatasetError

log = logging.getLogger(__name__)

MIXES = ("real", "synthetic", "hybrid", "oversample")
MANIFEST_CSV = "manifest.csv"
MANIFEST_JSON = "manifest.json"
GENERATOR_TRAIN_IMAGES = "generator_train_images.csv"


class SyntheticLeakError(DatasetError):
    """The generator was trained on images of this run's validation or test part."""


def read_synthetic_folder(folder: str | Path) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """The manifest table (with absolute paths), the manifest's facts, and the generator's training images."""
    folder = Path(folder).expanduser()
    missing = [name for name in (MANIFEST_CSV, MANIFEST_JSON, GENERATOR_TRAIN_IMAGES) if not (folder / name).is_file()]
    if missing:
        raise DatasetError(
            f"data.synthetic={folder}: not a generated folder (missing {', '.join(missing)}); "
            "make one with python -m fetalbrain.generate"
        )
    manifest = pd.read_csv(folder / MANIFEST_CSV)
    info = json.loads((folder / MANIFEST_JSON).read_text())
    seen = pd.read_csv(folder / GENERATOR_TRAIN_IMAGES)
    manifest["path"] = [str(folder / f) for f in manifest["file"]]
    absent = [p for p in manifest["path"] if not Path(p).is_file()]
    if absent:
        raise DatasetError(f"data.synthetic={folder}: {len(absent)} file(s) of {MANIFEST_CSV} are missing: {absent[0]}")
    return manifest, info, seen


def check_no_leak(table: pd.DataFrame, seen: pd.DataFrame, folder: Path) -> None:
    """Refuse a generator that saw an image (by file name) or a case of this run's val/test part."""
    seen_files = {Path(p).name for p in seen["path"]}
    seen_cases = set(seen["case"])
    problems = []
    for part in ("val", "test"):
        rows = table[table["part"] == part]
        files = [Path(p).name for p in rows["path"] if Path(p).name in seen_files]
        cases = sorted(set(rows["case"]) & seen_cases)
        if files or cases:
            example = files[0] if files else cases[0]
            problems.append(f"{len(files)} {part} image(s) and {len(cases)} {part} case(s) (e.g. {example})")
    if problems:
        raise SyntheticLeakError(
            f"data.synthetic={folder}: its generator was trained on {'; '.join(problems)} of this run. "
            "Synthetic images would leak them into training. Generate from a generator trained on this "
            "split and fold (same data.fold, num_folds, group_level and seed)."
        )


def choose_synthetic(
    manifest: pd.DataFrame, real_counts: dict[str, int], mix: str, ratio: float, seed: int
) -> pd.DataFrame:
    """The manifest rows a mix adds to the training part (all of them for ``synthetic``)."""
    if mix == "synthetic":
        return manifest
    rng = np.random.default_rng(seed)
    largest = max(real_counts.values())
    chosen = []
    for label, rows in manifest.groupby("class", sort=True):
        real = real_counts.get(label, 0)
        wanted = round(real * ratio / (1 - ratio)) if mix == "hybrid" else max(largest - real, 0)
        if wanted > len(rows):
            log.warning("data.mix=%s: %s wants %d synthetic images, the folder has %d", mix, label, wanted, len(rows))
        chosen.append(rows.iloc[rng.permutation(len(rows))[: min(wanted, len(rows))]])
    return pd.concat(chosen) if chosen else manifest.iloc[:0]


def mix_synthetic(
    table: pd.DataFrame,
    class_names: list[str],
    folder: str | Path | None,
    mix: str,
    ratio: float,
    seed: int,
    image_size: int | None = None,
) -> tuple[pd.DataFrame, dict | None]:
    """Add the chosen synthetic images to the training part; return the table and what was mixed."""
    if mix not in MIXES:
        raise ValueError(f"data.mix={mix!r}: choose one of {', '.join(MIXES)}")
    if mix == "real":
        if folder:
            log.warning(
                "data.synthetic=%s is ignored with data.mix=real (choose synthetic, hybrid or oversample)", folder
            )
        return table, None
    if not folder:
        raise ValueError(f"data.mix={mix} needs data.synthetic=DIR (a folder written by python -m fetalbrain.generate)")
    if mix == "hybrid" and not 0 < ratio < 1:
        raise ValueError(f"data.synthetic_ratio={ratio}: must be in (0, 1) for data.mix=hybrid")
    folder = Path(folder).expanduser()
    manifest, info, seen = read_synthetic_folder(folder)
    unknown = sorted(set(manifest["class"]) - set(class_names))
    if unknown:
        raise DatasetError(
            f"data.synthetic={folder}: class(es) {', '.join(unknown)} are not in the dataset "
            f"(known: {', '.join(class_names)})"
        )
    check_no_leak(table, seen, folder)
    if image_size and info.get("image_size") and info["image_size"] < image_size:
        log.warning(
            "data.synthetic=%s holds %d px images, upsampled to data.image_size=%d: real and synthetic images "
            "differ in sharpness, a cue the classifier can learn",
            folder,
            info["image_size"],
            image_size,
        )
    real_train = table["part"] == "train"
    real_counts = table.loc[real_train, "label"].value_counts().to_dict()
    chosen = choose_synthetic(manifest, real_counts, mix, ratio, seed)
    if mix == "synthetic":
        table = table.assign(part=np.where(real_train, "unused", table["part"]))
    names = [Path(p).name for p in chosen["path"]]
    rows = pd.DataFrame(
        {
            "path": chosen["path"].to_numpy(),
            "label": chosen["class"].to_numpy(),
            "split": "synthetic",
            "source": [f"synthetic/{n}" for n in names],
            "case": [f"synthetic/{n}" for n in names],
            "group": [f"synthetic/{n}" for n in names],
            "part": "train",
        }
    )
    table = pd.concat([table.assign(synthetic=False), rows.assign(synthetic=True)], ignore_index=True)
    summary = {
        "folder": str(folder),
        "mix": mix,
        "ratio": ratio if mix == "hybrid" else None,
        "added": {label: int(n) for label, n in chosen["class"].value_counts().sort_index().items()},
        # the share each class's training images actually got: a folder with fewer images than a mix wants caps it
        "synthetic_share_per_class": {
            label: round(int(n) / (int(n) + (0 if mix == "synthetic" else real_counts.get(label, 0))), 4)
            for label, n in chosen["class"].value_counts().sort_index().items()
        },
        "synthetic_share": round(len(rows) / (len(rows) + (0 if mix == "synthetic" else int(real_train.sum()))), 4),
        "image_size": info.get("image_size"),
        "real_train_images": int(real_train.sum()) if mix != "synthetic" else 0,
        "generator_checkpoint": info.get("generator_checkpoint"),
        "generator_sha256": info.get("generator_sha256"),
        "generator_split": info.get("split"),
    }
    log.info("Synthetic data (%s): %d images added to the training part", mix, len(rows))
    return table, summary
