"""Make the compact copies of datasets that the repository ships.

Two layouts (``--layout``, detected by default):

* ``roboflow``: a Roboflow multi-class export. Same layout, file names, splits and ``_classes.csv``; images
  re-encoded as square grayscale JPEGs (256 px by default), as the Roboflow export itself is square.
* ``labelled``: a folder with ``labels.csv`` (file, subject, frame, label) and ``images/``, such as the external
  normal heads (``data/hc18-normal-heads``). Same file names and ``labels.csv`` (subjects kept); grayscale JPEGs
  whose longest side is ``--size``, aspect ratio kept (the image shape is itself a cue of the source). Several
  folders merge into one copy; ``--outlines`` adds each image's head ellipse, fitted to its drawn outline.

Both copy the source's attribution and write a ``PROVENANCE.md`` that says what changed. Only for making copies:
nothing at run time needs this module.

    python -m fetalbrain.data.compact SRC DST --size 256 --quality 90
    python -m fetalbrain.data.compact path/to/hc18-heads-extra path/to/hc18-heads-subset data/hc18-normal-heads \
        --size 256 --outlines path/to/hc18-heads-extra
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


OUTLINES_CSV = "annotations.csv"  # an outlines folder: annotations.csv (annotation, image) + annotations/
OUTLINES_DIR = "annotations"
HEAD_COLUMNS = ("head_width_fraction", "head_cx", "head_cy", "head_semi_major", "head_semi_minor", "head_angle")


def compact_labelled_folder(
    src: Path | list[Path], dst: Path, size: int = 256, quality: int = 90, outlines: Path | None = None
) -> int:
    """Re-encode every image listed by ``src/labels.csv`` (one folder, or several merged) into ``dst/images/`` as
    grey JPEG, the longest side ``size`` (aspect ratio kept); ``dst/labels.csv`` keeps the sources' rows (one
    folder: byte for byte). With ``outlines`` (a folder with ``annotations.csv``: annotation, image; and the
    drawn outlines under ``annotations/``, as HC18's), each image's head ellipse is fitted to its outline and
    written beside its row, in pixels of the copy (``HEAD_COLUMNS``; ``fetalbrain.data.ellipses``). Returns the
    number of images written."""
    import pandas as pd

    from fetalbrain.data.readers import IMAGES_DIR, LABELS_CSV, read_labelled_folder

    sources = [Path(s) for s in ([src] if isinstance(src, (str, Path)) else src)]
    tables = []
    for folder in sources:  # refuses a missing CSV, column or listed file before anything is written
        tables.append(read_labelled_folder(folder))
        if not (folder / "PROVENANCE.md").is_file():
            raise FileNotFoundError(
                f"{folder / 'PROVENANCE.md'}: missing; a copy must carry the source's attribution and licence"
            )
    table = pd.concat(tables, ignore_index=True)
    fitted = [c for c in HEAD_COLUMNS if c in table.columns]
    if fitted:  # they are in the source's pixels: copying them beside resized images would misplace every head
        raise ValueError(
            f"{', '.join(map(str, sources))}: labels.csv already holds head ellipses ({', '.join(fitted)}) in its "
            "images' pixels; compact the original folders with --outlines instead"
        )
    repeated = table["file"][table["file"].duplicated()].tolist()
    if repeated:
        raise ValueError(f"{repeated[0]}: listed by more than one source folder; file names must be unique")
    outline_of = _outline_files(outlines, table["file"]) if outlines is not None else None
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: destination exists and is not empty")
    (dst / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    shapes, heads = set(), []
    for path, name in zip(table["path"], table["file"]):
        image = Image.fromarray(read_grayscale(path))
        shapes.add((image.size, fit_longest_side(*image.size, size)))
        resized = image.resize(fit_longest_side(*image.size, size), Image.Resampling.LANCZOS)
        (dst / IMAGES_DIR / name).parent.mkdir(parents=True, exist_ok=True)
        resized.save(dst / IMAGES_DIR / name, format="JPEG", quality=quality, optimize=True)
        if outline_of is not None:
            heads.append(_head_ellipse(outline_of[name], resized.size))
    if len(sources) == 1 and outline_of is None:
        shutil.copyfile(sources[0] / LABELS_CSV, dst / LABELS_CSV)
    else:
        rows = pd.concat(
            [pd.read_csv(f / LABELS_CSV, dtype=str, keep_default_na=False) for f in sources], ignore_index=True
        )
        if heads:
            rows = pd.concat([rows, pd.DataFrame(heads, columns=list(HEAD_COLUMNS)).round(3)], axis=1)
        rows.to_csv(dst / LABELS_CSV, index=False)
    _write_labelled_provenance(sources, dst, table, sorted(shapes), size, quality, outlines)
    return len(table)


def _outline_files(outlines: Path, files) -> dict[str, Path]:
    """Each listed image's outline file, from ``outlines/annotations.csv``; every image must have one."""
    import pandas as pd

    csv = Path(outlines) / OUTLINES_CSV
    if not csv.is_file():
        raise FileNotFoundError(f"{csv}: missing (an outlines folder lists annotation,image in {OUTLINES_CSV})")
    listed = pd.read_csv(csv, dtype=str)
    if not {"annotation", "image"} <= set(listed.columns):
        raise ValueError(f"{csv}: needs the columns annotation and image")
    outline_of = {image: Path(outlines) / OUTLINES_DIR / a for a, image in zip(listed["annotation"], listed["image"])}
    for name in files:
        if name not in outline_of or not outline_of[name].is_file():
            raise FileNotFoundError(f"{name}: no outline in {csv} (or its file is missing under {OUTLINES_DIR}/)")
    return outline_of


def _head_ellipse(outline_file: Path, size: tuple[int, int]) -> tuple[float, ...]:
    """The ellipse fitted to a drawn outline, moved into the copy's pixels (``size``: its width, height), and the
    head's horizontal extent as a fraction of the image width (a rough proxy of gestational age)."""
    import math

    from fetalbrain.data.ellipses import ellipse_from_outline

    outline = read_grayscale(outline_file)
    ellipse = ellipse_from_outline(outline)
    if ellipse is None:
        raise ValueError(f"{outline_file}: no ellipse could be fitted to this outline")
    width, height = size
    ellipse = ellipse.scaled(width / outline.shape[1], height / outline.shape[0])
    theta = math.radians(ellipse.angle)
    extent = 2 * math.hypot(ellipse.semi_major * math.cos(theta), ellipse.semi_minor * math.sin(theta))
    return (extent / width, ellipse.cx, ellipse.cy, ellipse.semi_major, ellipse.semi_minor, ellipse.angle)


def _span(values) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _write_labelled_provenance(
    sources: list[Path], dst: Path, table, shapes: list, size: int, quality: int, outlines: Path | None
) -> None:
    """The copy's PROVENANCE.md: what was done here, then each source's own PROVENANCE.md (its attribution and
    licence, and the changes made before) verbatim."""
    from fetalbrain.data.readers import LABELS_CSV

    before, after = zip(*shapes)
    sizes = (
        f"from {_span([w for w, _ in before])}x{_span([h for _, h in before])} px to "
        f"{_span([w for w, _ in after])}x{_span([h for _, h in after])} px"
    )
    digest = hashlib.sha256((dst / LABELS_CSV).read_bytes()).hexdigest()
    labels = ", ".join(f"{label} {count}" for label, count in table["label"].value_counts().items())
    names = " and ".join(f"`{s.name}`" for s in sources)
    command = " ".join(["python -m fetalbrain.data.compact", *(["SRC"] * len(sources)), "DST", f"--size {size}"])
    command += f" --quality {quality}" + (" --outlines OUTLINES" if outlines is not None else "")
    if len(sources) == 1 and outlines is None:
        rows = (
            f"File names and `{LABELS_CSV}` (file, subject, frame, label) are\n  byte-for-byte the source's: frames "
            "of one subject stay together under one subject id."
        )
    else:
        rows = (
            f"File names are the sources'; `{LABELS_CSV}` holds their rows (file, subject, frame, label)\n  in the "
            "order given: frames of one subject stay together under one subject id."
        )
    if outlines is not None:
        rows += (
            f"\n- Head ellipses from the outlines of `{Path(outlines).name}` (drawn by the source's sonographers): "
            "each\n  outline's least-squares ellipse (`fetalbrain.data.ellipses`), moved into this copy's pixels: "
            "`head_cx`,\n  `head_cy`, `head_semi_major`, `head_semi_minor` (pixels), `head_angle` (degrees, the "
            "major axis from\n  the x axis towards y), and `head_width_fraction` (the ellipse's horizontal extent / "
            "the image width,\n  a rough proxy of gestational age)."
        )
    provenance = "\n\n".join(
        f"## Provenance of `{s.name}` (verbatim)\n\n{(s / 'PROVENANCE.md').read_text().strip()}"
        for s in ([*sources, Path(outlines)] if outlines is not None and Path(outlines) not in sources else sources)
    )
    (dst / "PROVENANCE.md").write_text(
        f"""# Compact copy of {names}

- Made on {date.today().isoformat()} with `{command}`
  from the folder(s) {names}, whose own provenance (attribution, licence and the changes made before this
  copy) follows below unchanged. The licence and attribution apply to this copy.
- What changed here: every image decoded, converted to 8-bit grayscale, resized with Lanczos
  filtering so that its longest side is {size} px, aspect ratio kept ({sizes}),
  re-encoded as JPEG quality {quality}. {rows}
- {len(table)} images of {table["subject"].nunique()} subjects; labels: {labels}.
- SHA256 of `{LABELS_CSV}`: `{digest}`.
- Never used to train a classifier: it is the external check of every classification run's report
  (`evaluation.external`). The head finder (`model=head_finder`) learns from its head outlines.

{provenance}
"""
    )


def detect_layout(src: Path) -> str:
    from fetalbrain.data.readers import LABELS_CSV

    return "labelled" if (src / LABELS_CSV).is_file() else "roboflow"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "src", type=Path, nargs="+", help="Roboflow multi-class export (train/ valid/ test/) or labelled folder(s)"
    )
    parser.add_argument("dst", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument(
        "--size", type=int, default=256, help="roboflow: side of the square output; labelled: longest side (pixels)"
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (1-95)")
    parser.add_argument(
        "--outlines",
        type=Path,
        help="labelled: a folder of drawn head outlines (annotations.csv: annotation,image; annotations/): "
        "each image's fitted head ellipse goes into labels.csv",
    )
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="auto", help="auto: labelled when SRC has labels.csv, else roboflow"
    )
    args = parser.parse_args(argv)
    layout = detect_layout(args.src[0]) if args.layout == "auto" else args.layout
    if layout == "labelled":
        count = compact_labelled_folder(args.src, args.dst, args.size, args.quality, args.outlines)
    elif len(args.src) > 1 or args.outlines is not None:
        parser.error("a Roboflow export is copied alone: one SRC, no --outlines")
    else:
        count = compact_dataset(args.src[0], args.dst, args.size, args.quality)
    print(f"wrote {count} images to {args.dst}")


if __name__ == "__main__":
    main()
