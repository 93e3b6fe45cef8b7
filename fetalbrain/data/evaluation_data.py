"""Any dataset to evaluate a checkpoint on: a Roboflow export, a folder per class or unlabelled images, its labels
checked against the checkpoint's classes.
"""

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fetalbrain.data.classes import display_name
from fetalbrain.data.readers import DatasetError, detect_format, read_image_folder, read_roboflow_csv

FORMATS = ("auto", "roboflow", "folder", "unlabeled")


class UnknownClassError(DatasetError):
    """The evaluated data name classes the checkpoint was not trained on."""


# ---- the evaluated data ----------------------------------------------------------------------------------
@dataclass
class EvaluationData:
    """The images to evaluate, their labels (None: unlabelled), and what was found but cannot be evaluated."""

    root: Path
    format: str
    paths: list[str]
    labels: list[str] | None
    parts: list[str] = field(default_factory=list)  # the split parts used ("all" without split folders)
    bad: list[dict] = field(default_factory=list)  # image-like entries that cannot be read: data.on_bad_image
    ignored: list[dict] = field(default_factory=list)  # files that are not images at all: listed, never read


def _scan(folder: Path, recursive: bool) -> tuple[list[Path], list[dict], list[dict]]:
    """predict's listing of a folder: readable files, unreadable image-like entries, other files."""
    from fetalbrain.data.inputs import NOT_AN_IMAGE, input_files

    files, bad, ignored = [], [], []
    for path, problem in input_files(folder, recursive):
        if problem is None:
            files.append(path)
        elif problem.startswith(NOT_AN_IMAGE):
            ignored.append({"path": str(path), "error": problem})
        else:
            bad.append({"path": str(path), "error": f"{path}: {problem}"})
    return files, bad, ignored


def _detect(root: Path) -> str:
    if root.is_file() or not any(child.is_dir() for child in root.iterdir()):
        return "unlabeled"
    return detect_format(root)


def _folder_table(root: Path) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """The folder-per-class reader, plus what it passes over in a class folder without a word: broken links
    and unreadable entries (bad images), DICOM files (evaluated too), other files (listed as ignored)."""
    table, _ = read_image_folder(root)
    bad, ignored, extra = [], [], []
    known = set(table["path"])
    for (split, label), rows in table.groupby(["split", "label"], sort=False):
        files, class_bad, class_ignored = _scan(Path(rows["path"].iloc[0]).parent, recursive=False)
        extra += [{"path": str(p), "label": label, "split": split} for p in files if str(p) not in known]
        bad += [{**entry, "split": split} for entry in class_bad]
        ignored += [{**entry, "split": split} for entry in class_ignored]
    table = pd.concat([table, pd.DataFrame(extra, columns=table.columns)], ignore_index=True)
    return table.sort_values("path", kind="stable").reset_index(drop=True), bad, ignored


def check_classes(labels: list[str], class_names: list[str], root: Path) -> list[str]:
    """The labels in the checkpoint's spelling (its label or the clinical name, in any case); unknown names are
    refused, listing the known ones."""
    spellings = {c.lower(): c for c in class_names} | {display_name(c).lower(): c for c in class_names}
    known_as = {label: spellings.get(str(label).strip().lower()) for label in set(labels)}
    unknown = sorted(label for label, known in known_as.items() if known is None)
    if unknown:
        known = ", ".join(f"{c} ({display_name(c)})" for c in class_names)
        raise UnknownClassError(
            f"data.root={root}: class name(s) the checkpoint does not know: {', '.join(unknown)}. It knows "
            f"{len(class_names)}: {known}. Either spelling is accepted, in any case; rename the folders or CSV "
            "columns, or use data.format=unlabeled to evaluate the images without their labels."
        )
    return [known_as[label] for label in labels]


def read_evaluation_data(
    root: str | Path, format: str, parts: list[str] | None, class_names: list[str]
) -> EvaluationData:
    """The images of ``root`` in any supported layout, their labels checked against the checkpoint's classes
    before anything is predicted."""
    root = Path(root).expanduser()
    if format not in FORMATS:
        raise DatasetError(f"data.format={format!r}: unknown, choose one of {', '.join(FORMATS)}")
    if not root.exists():
        raise DatasetError(f"data.root={root}: no such file or folder")
    if format == "auto":
        format = _detect(root)
    if format == "unlabeled":
        if parts:
            raise DatasetError(f"data.split={list(parts)}: parts exist in roboflow and folder layouts, not unlabeled")
        files, bad, ignored = _scan(root, recursive=True) if root.is_dir() else ([root], [], [])
        if not files and not bad:
            raise DatasetError(f"data.root={root}: no image or DICOM files found")
        return EvaluationData(root, format, [str(p) for p in files], None, ["all"], bad, ignored)
    if not root.is_dir():
        raise DatasetError(f"data.root={root}: a {format} dataset is a folder")
    if format == "roboflow":
        (table, _), bad, ignored = read_roboflow_csv(root), [], []
    else:
        table, bad, ignored = _folder_table(root)
    available = list(dict.fromkeys(table["split"]))
    if parts:
        missing = [p for p in parts if p not in available]
        if missing:
            raise DatasetError(f"data.split={list(parts)}: {root} has no part {missing}; it has {available}")
        table = table[table["split"].isin(parts)]
        bad = [entry for entry in bad if entry["split"] in parts]
        ignored = [entry for entry in ignored if entry["split"] in parts]
    if table.empty:
        raise DatasetError(f"data.root={root}: no images found")
    labels = check_classes(list(table["label"]), class_names, root)
    return EvaluationData(root, format, list(table["path"]), labels, list(parts or available), bad, ignored)
