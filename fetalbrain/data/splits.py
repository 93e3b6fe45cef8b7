"""Assign every image of the table to a part: ``train``, ``val`` or ``test``.

* ``official``: the export's own split (valid → val). It leaks on this dataset: the leakage is
  counted and logged every time it is used.
* ``grouped``: stratified group K-fold over *all* images (scikit-learn's ``StratifiedGroupKFold``);
  fold ``k`` is the test part, and validation is carved out of the rest by group as well. The
  ``group`` column (source image or case, merged with exact and near duplicates, see
  ``fetalbrain.data.duplicates``) is never in two parts. Deterministic for a seed.
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")


@dataclass
class SplitReport:
    """What a split did, kept with the run so that nothing about the data is silent."""

    splitter: str
    part_sizes: dict[str, int]
    missing_classes: dict[str, list[str]] = field(default_factory=dict)
    leaked: dict[str, dict[str, int]] = field(default_factory=dict)


def leakage(table: pd.DataFrame, part_column: str = "part") -> dict[str, dict[str, int]]:
    """For val and test: how many images share a source, case or duplicate group with training."""
    train = table[table[part_column] == "train"]
    levels = [c for c in ("source", "case", "group") if c in table]
    counts = {}
    for part in ("val", "test"):
        rows = table[table[part_column] == part]
        counts[part] = {"images": int(len(rows))}
        counts[part].update({f"shared_{c}": int(rows[c].isin(set(train[c])).sum()) for c in levels})
    return counts


def official_split(table: pd.DataFrame) -> pd.Series:
    missing = sorted({"train", "valid", "test"} - set(table["split"]))
    if missing:
        raise ValueError(
            f"data.splitter=official needs train/valid/test folders, missing: {', '.join(missing)}; "
            "use data.splitter=grouped"
        )
    return table["split"].map({"train": "train", "valid": "val", "test": "test"})


def _group_fold(labels, groups, num_folds: int, fold: int, seed: int) -> np.ndarray:
    """Boolean mask of the rows in ``fold`` of a stratified group K-fold."""
    n_groups = len(set(groups))
    if num_folds > n_groups:
        raise ValueError(f"data.num_folds={num_folds} is more than the {n_groups} groups available")
    splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    for index, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        if index == fold:
            mask = np.zeros(len(labels), dtype=bool)
            mask[held_out] = True
            return mask
    raise AssertionError("unreachable")


def grouped_split(table: pd.DataFrame, num_folds: int, fold: int, val_num_folds: int, seed: int) -> pd.Series:
    if "group" not in table:
        raise ValueError("a grouped split needs the table's 'group' column (see fetalbrain.data.duplicates)")
    if not 0 <= fold < num_folds:
        raise ValueError(f"data.fold={fold} must be in [0, data.num_folds={num_folds})")
    if val_num_folds < 2:
        raise ValueError(f"data.val_num_folds={val_num_folds} must be at least 2")
    labels, groups = table["label"].to_numpy(), table["group"].to_numpy()
    test = _group_fold(labels, groups, num_folds, fold, seed)
    rest = np.flatnonzero(~test)
    val_in_rest = _group_fold(labels[rest], groups[rest], val_num_folds, 0, seed)
    part = np.full(len(table), "train", dtype=object)
    part[test] = "test"
    part[rest[val_in_rest]] = "val"
    return pd.Series(part, index=table.index)


def assign_parts(table: pd.DataFrame, splitter: str, **grouped_options) -> tuple[pd.DataFrame, SplitReport]:
    """Return the table with a ``part`` column, and the report of the split."""
    if splitter == "official":
        part = official_split(table)
    elif splitter == "grouped":
        part = grouped_split(table, **grouped_options)
    else:
        raise ValueError(f"data.splitter={splitter!r}: choose official or grouped")
    table = table.assign(part=part.to_numpy())
    classes = sorted(table["label"].unique())
    report = SplitReport(
        splitter=splitter,
        part_sizes={p: int((table["part"] == p).sum()) for p in PARTS},
        missing_classes={
            p: [c for c in classes if not ((table["part"] == p) & (table["label"] == c)).any()] for p in PARTS
        },
        leaked=leakage(table),
    )
    for p, names in report.missing_classes.items():
        if names:
            log.warning("Classes with no image in the %s part (too few cases to split): %s", p, ", ".join(names))
    if splitter == "official":
        for p, c in report.leaked.items():
            log.warning(
                "LEAKAGE: the official split shares sources with train for %d of %d %s images "
                "(%d share a case). Its scores overstate accuracy; use data.splitter=grouped.",
                c["shared_source"],
                c["images"],
                p,
                c["shared_case"],
            )
    return table, report
