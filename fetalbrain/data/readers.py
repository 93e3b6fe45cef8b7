"""Read a dataset folder into one table: ``path, label, split, source, case``.

Two layouts are understood:

* ``roboflow``: the Roboflow "multi-class classification" export: ``<split>/_classes.csv`` with a
  ``filename`` column and one 0/1 column per class (headers may have a space after each comma);
* ``folder``: folder-per-class, either ``<split>/<class>/*.jpg`` or ``<class>/*.jpg`` (split
  ``all``; a grouped split then makes train/val/test).

Everything downstream reads this table, never the folders again.
"""

from pathlib import Path

import pandas as pd

from fetalbrain.data.groups import case_group, source_group
from fetalbrain.data.images import IMAGE_EXTENSIONS

SPLITS = ("train", "valid", "test")
CLASSES_CSV = "_classes.csv"
COLUMNS = ["path", "label", "split", "source", "case"]


class DatasetError(ValueError):
    """The dataset on disk is not what the reader expects; the message names file and row."""


def detect_format(root: Path) -> str:
    if any((root / split / CLASSES_CSV).is_file() for split in SPLITS):
        return "roboflow"
    if root.is_dir() and any(child.is_dir() for child in root.iterdir()):
        return "folder"
    raise DatasetError(
        f"{root}: cannot recognise the dataset layout. Expected a Roboflow multi-class export "
        f"({'/, '.join(SPLITS)}/ each with {CLASSES_CSV}) or folder-per-class images "
        "([split/]class/image.jpg)."
    )


def read_dataset(root: str | Path, format: str = "auto") -> tuple[pd.DataFrame, list[str]]:
    """Return the image table and the ordered class names for the dataset at ``root``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.root={root}: no such directory")
    readers = {"roboflow": read_roboflow_csv, "folder": read_image_folder}
    if format == "auto":
        format = detect_format(root)
    if format not in readers:
        raise DatasetError(f"data.format={format!r}: unknown, choose one of auto, {', '.join(readers)}")
    table, classes = readers[format](root)
    if table.empty:
        raise DatasetError(f"{root}: no images found")
    empty = [name for name in classes if not (table["label"] == name).any()]
    if empty:
        raise DatasetError(f"{root}: class(es) without any image: {', '.join(empty)}")
    table["source"] = table["path"].map(lambda p: source_group(Path(p).name))
    table["case"] = [case_group(s, label) for s, label in zip(table["source"], table["label"])]
    return table[COLUMNS].reset_index(drop=True), classes


def _read_classes_csv(csv_path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(csv_path, skipinitialspace=True, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DatasetError(f"{csv_path}: not a readable CSV ({error})") from error
    frame.columns = [c.strip() for c in frame.columns]
    if not len(frame.columns) or frame.columns[0] != "filename" or len(frame.columns) < 3:
        raise DatasetError(
            f"{csv_path}: expected a header 'filename, <class>, <class>, ...', got {list(frame.columns)[:4]}"
        )
    return frame


def read_roboflow_csv(root: Path) -> tuple[pd.DataFrame, list[str]]:
    rows, classes, classes_source = [], None, None
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        raise DatasetError(f"{root}: no split folder ({', '.join(SPLITS)}) found")
    for split in present:
        csv_path = root / split / CLASSES_CSV
        if not csv_path.is_file():
            raise DatasetError(f"{csv_path}: missing (every split folder of a Roboflow export has one)")
        frame = _read_classes_csv(csv_path)
        split_classes = list(frame.columns[1:])
        if classes is None:
            classes, classes_source = split_classes, csv_path
        elif split_classes != classes:
            only_here = sorted(set(split_classes) - set(classes))
            missing = sorted(set(classes) - set(split_classes))
            raise DatasetError(
                f"{csv_path}: class columns differ from {classes_source} "
                f"(only here: {only_here or 'none'}; missing here: {missing or 'none'}; "
                "or a different order)"
            )
        values = frame[split_classes].apply(lambda col: col.str.strip())
        for index, (filename, row) in enumerate(zip(frame["filename"], values.itertuples(index=False))):
            line = index + 2  # 1-based, after the header
            if any(v not in ("0", "1") for v in row):
                raise DatasetError(f"{csv_path}, line {line} ({filename}): labels must be 0 or 1, got {row}")
            positives = [name for name, v in zip(split_classes, row) if v == "1"]
            if len(positives) != 1:
                raise DatasetError(
                    f"{csv_path}, line {line} ({filename}): expected exactly one positive class, "
                    f"found {len(positives)}{': ' + ', '.join(positives) if positives else ''}"
                )
            image_path = root / split / str(filename).strip()
            if not image_path.is_file():
                raise DatasetError(f"{csv_path}, line {line}: listed file {image_path} does not exist")
            rows.append({"path": str(image_path), "label": positives[0], "split": split})
    return pd.DataFrame(rows, columns=["path", "label", "split"]), classes


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_image_folder(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """Classes are the first split's folders (train); a later split may lack some, never add one."""
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    layout = [(d.name, d) for d in split_dirs] if split_dirs else [("all", root)]
    rows, classes, classes_source = [], None, None
    for split, split_dir in layout:
        class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
        if not class_dirs:
            raise DatasetError(f"{split_dir}: no class folders found")
        split_classes = [d.name for d in class_dirs]
        if classes is None:
            classes, classes_source = split_classes, split_dir
        elif unknown := sorted(set(split_classes) - set(classes)):
            raise DatasetError(f"{split_dir}: class folder(s) {unknown} are not in {classes_source}")
        for class_dir in class_dirs:
            images = _images_in(class_dir)
            if not images:
                raise DatasetError(f"{class_dir}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)")
            rows += [{"path": str(p), "label": class_dir.name, "split": split} for p in images]
    return pd.DataFrame(rows, columns=["path", "label", "split"]), classes


LABELS_CSV = "labels.csv"


IMAGES_DIR = "images"


# ---- the folder ------------------------------------------------------------------------------------------------
def read_labelled_folder(root: str | Path, label: str | None = None) -> pd.DataFrame:
    """The images listed in ``<root>/labels.csv`` (under ``<root>/images/``): columns path, file, subject, frame,
    label, then any further columns of the CSV as text (e.g. the head ellipses of ``fetalbrain.data.compact
    --outlines``). With ``label``, only the rows of that label (every row when the CSV has no label column).

    Errors name the file and the row: a missing CSV or column, an empty subject, a listed file not on disk."""
    root = Path(root).expanduser()
    csv = root / LABELS_CSV
    if not csv.is_file():
        raise DatasetError(f"{csv}: missing (a labelled folder lists its images in {LABELS_CSV})")
    try:
        table = pd.read_csv(csv, dtype=str, skipinitialspace=True, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DatasetError(f"{csv}: not a readable CSV ({error})") from error
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"{csv}: needs the columns {', '.join(REQUIRED_COLUMNS)}; missing {', '.join(missing)}")
    if "frame" not in table.columns:
        table["frame"] = ""
    if "label" not in table.columns:
        table["label"] = label or ""
    for index, row in enumerate(table.itertuples(index=False)):
        line = index + 2  # 1-based, after the header
        if not row.file.strip() or not row.subject.strip():
            raise DatasetError(f"{csv}, line {line}: empty file or subject")
        if not (root / IMAGES_DIR / row.file).is_file():
            raise DatasetError(f"{csv}, line {line}: listed file {root / IMAGES_DIR / row.file} does not exist")
    if label is not None:
        table = table[table["label"].str.strip().str.lower() == label.strip().lower()]
        if table.empty:
            raise DatasetError(f"{csv}: no image labelled {label!r} (evaluation.external.label)")
    table = table.assign(path=[str(root / IMAGES_DIR / f) for f in table["file"]])
    extra = [c for c in table.columns if c not in ("path", "file", "subject", "frame", "label")]
    return table[["path", "file", "subject", "frame", "label", *extra]].reset_index(drop=True)


REQUIRED_COLUMNS = ("file", "subject")  # frame and label are optional
