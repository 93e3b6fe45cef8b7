"""Make the compact copies of datasets that the repository ships.

Two layouts (``--layout``, detected by default):

* ``roboflow``: a Roboflow multi-class export. Same layout, file names, splits and ``_classes.csv``; images
  re-encoded as square grayscale JPEGs (256 px by default), as the Roboflow export itself is square.
* ``labelled``: a folder with ``labels.csv`` (file, subject, frame, label) and ``images/``, such as the external
  normal heads (``data/hc18-normal-heads``). Same file names and ``labels.csv`` (subjects kept); grayscale JPEGs
  whose longest side is ``--size``, aspect ratio kept (the image shape is itself a cue of the source).

Both copy the source's attribution and write a ``PROVENANCE.md`` that says what changed. Only for making copies:
nothing at run time needs this module.

    python -m fetalbrain.data.compact SRC DST --size 256 --quality 90
    python -m fetalbrain.data.compact path/to/hc18-heads-subset data/hc18-normal-heads --size 256
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
LAYOUTS = ("auto", "roboflow", "labelled")


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


def fit_longest_side(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) scaled so that the longer side is ``size``, aspect ratio kept; never enlarged."""
    scale = min(1.0, size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def compact_labelled_folder(src: Path, dst: Path, size: int = 256, quality: int = 90) -> int:
    """Re-encode every image ``src/labels.csv`` lists into ``dst/images/`` as grey JPEG, the longest side ``size``
    (aspect ratio kept); copy ``labels.csv`` byte for byte. Returns the number of images written."""
    from fetalbrain.data.readers import IMAGES_DIR, LABELS_CSV, read_labelled_folder

    table = read_labelled_folder(src)  # refuses a missing CSV, column or listed file before anything is written
    if not (src / "PROVENANCE.md").is_file():
        raise FileNotFoundError(
            f"{src / 'PROVENANCE.md'}: missing; a copy must carry the source's attribution and licence"
        )
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: destination exists and is not empty")
    (dst / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    shapes = set()
    for path, name in zip(table["path"], table["file"]):
        image = Image.fromarray(read_grayscale(path))
        shapes.add((image.size, fit_longest_side(*image.size, size)))
        image = image.resize(fit_longest_side(*image.size, size), Image.Resampling.LANCZOS)
        (dst / IMAGES_DIR / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(dst / IMAGES_DIR / name, format="JPEG", quality=quality, optimize=True)
    shutil.copyfile(src / LABELS_CSV, dst / LABELS_CSV)
    _write_labelled_provenance(src, dst, table, sorted(shapes), size, quality)
    return len(table)


def _span(values) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _write_labelled_provenance(src: Path, dst: Path, table, shapes: list, size: int, quality: int) -> None:
    """The copy's PROVENANCE.md: what was done here, then the source's own PROVENANCE.md (its attribution and
    licence, and the changes made before) verbatim."""
    from fetalbrain.data.readers import LABELS_CSV

    original = src / "PROVENANCE.md"
    before, after = zip(*shapes)
    sizes = (
        f"from {_span([w for w, _ in before])}x{_span([h for _, h in before])} px to "
        f"{_span([w for w, _ in after])}x{_span([h for _, h in after])} px"
    )
    digest = hashlib.sha256((dst / LABELS_CSV).read_bytes()).hexdigest()
    labels = ", ".join(f"{label} {count}" for label, count in table["label"].value_counts().items())
    (dst / "PROVENANCE.md").write_text(
        f"""# Compact copy of `{src.name}`

- Made on {date.today().isoformat()} with `python -m fetalbrain.data.compact SRC DST --size {size}
  --quality {quality}` from the folder `{src.name}`, whose own provenance (attribution, licence and the
  changes made before this copy) follows below unchanged. The licence and attribution apply to this copy.
- What changed here: every image decoded, converted to 8-bit grayscale, resized with Lanczos
  filtering so that its longest side is {size} px, aspect ratio kept ({sizes}),
  re-encoded as JPEG quality {quality}. File names and `{LABELS_CSV}` (file, subject, frame, label) are
  byte-for-byte the source's: frames of one subject stay together under one subject id.
- {len(table)} images of {table["subject"].nunique()} subjects; labels: {labels}.
- SHA256 of `{LABELS_CSV}`: `{digest}`.
- Never used for training by the project: it is the external check of every run's report
  (`evaluation.external`).

## Provenance of the source folder (verbatim)

{original.read_text().strip()}
"""
    )


def detect_layout(src: Path) -> str:
    from fetalbrain.data.readers import LABELS_CSV

    return "labelled" if (src / LABELS_CSV).is_file() else "roboflow"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="Roboflow multi-class export (train/ valid/ test/) or labelled folder")
    parser.add_argument("dst", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument(
        "--size", type=int, default=256, help="roboflow: side of the square output; labelled: longest side (pixels)"
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (1-95)")
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="auto", help="auto: labelled when SRC has labels.csv, else roboflow"
    )
    args = parser.parse_args(argv)
    layout = detect_layout(args.src) if args.layout == "auto" else args.layout
    make = compact_labelled_folder if layout == "labelled" else compact_dataset
    count = make(args.src, args.dst, args.size, args.quality)
    print(f"wrote {count} images to {args.dst}")


if __name__ == "__main__":
    main()
