"""Make the compact copy of a Roboflow multi-class export that the repository ships.

Same layout, file names, splits and ``_classes.csv``; images re-encoded as square grayscale JPEGs
(256 px by default) so the whole dataset fits in the repository and trains offline.

    python -m fetalbrain.data.compact SRC DST --size 256 --quality 90
"""

import argparse
import hashlib
import shutil
from datetime import date
from pathlib import Path

from PIL import Image

from fetalbrain.data.images import read_grayscale
from fetalbrain.data.readers import CLASSES_CSV, SPLITS, read_dataset

ATTRIBUTION_FILES = ("README.dataset.txt", "README.roboflow.txt", "PROVENANCE.md", "LICENSE")


def compact_dataset(src: Path, dst: Path, size: int = 256, quality: int = 90) -> int:
    """Re-encode every image of ``src`` into ``dst``; returns the number of images written."""
    table, _ = read_dataset(src, format="roboflow")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: destination exists and is not empty")
    for split in SPLITS:
        if (src / split / CLASSES_CSV).is_file():
            (dst / split).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / split / CLASSES_CSV, dst / split / CLASSES_CSV)
    for path, split in zip(table["path"], table["split"]):
        image = Image.fromarray(read_grayscale(path)).resize((size, size), Image.Resampling.LANCZOS)
        image.save(dst / split / Path(path).name, format="JPEG", quality=quality, optimize=True)
    for name in ATTRIBUTION_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / f"original-{name}" if name == "PROVENANCE.md" else dst / name)
    _write_provenance(src, dst, table, size, quality)
    return len(table)


def _write_provenance(src: Path, dst: Path, table, size: int, quality: int) -> None:
    digest = hashlib.sha256()
    for csv in sorted(dst.glob(f"*/{CLASSES_CSV}")):
        digest.update(csv.read_bytes())
    counts = table.groupby("split").size().to_dict()
    (dst / "PROVENANCE.md").write_text(
        f"""# Compact copy of "Fetal Brain Abnormalities Ultrasound", version 1

- Source: Roboflow Universe project `hritwik-trivedi-gkgrv/fetal-brain-abnormalities-ultrasound`,
  version 1, multi-class classification export (1768 JPEGs, 640x640). Licence: **CC BY 4.0**;
  attribution and the export's own notes are in `README.dataset.txt` and `README.roboflow.txt`,
  the original copy's provenance in `original-PROVENANCE.md`.
- Made on {date.today().isoformat()} with `python -m fetalbrain.data.compact SRC DST --size {size}
  --quality {quality}` from the unchanged export (folder name `{src.name}`).
- What changed: every image decoded, converted to 8-bit grayscale (the originals are grey images
  stored as RGB), resized to {size}x{size} with Lanczos filtering, re-encoded as JPEG quality
  {quality}. File names, split membership and `_classes.csv` files are byte-for-byte the original.
- Images per split: {counts}.
- SHA256 of the concatenated `_classes.csv` files (train, valid, test order): `{digest.hexdigest()}`.
- Known issues of the data (not fixed here, see the project README): the official split leaks
  (pre-augmented `_aug_N` copies of one source image sit in train and test), several classes have
  a single case, and `normal` images come from another dataset (`PatientNNNNN_PlaneN` names).
"""
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="Roboflow multi-class export (train/ valid/ test/)")
    parser.add_argument("dst", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--size", type=int, default=256, help="output side length in pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (1-95)")
    args = parser.parse_args(argv)
    count = compact_dataset(args.src, args.dst, args.size, args.quality)
    print(f"wrote {count} images to {args.dst}")


if __name__ == "__main__":
    main()
