"""Coarser views of the same test decisions: normal or abnormal, then which anomaly; grades together or apart.

Users ask "is it abnormal?" before "which of 16?", and some distinctions weigh less than others: the three
ventriculomegaly grades are one finding at three severities. Each view relabels the model's own decision (the
argmax of its probabilities) or restricts it to the classes in question, so the numbers describe the model a
user gets, not another classifier:

* ``hierarchy/abnormal_test_{accuracy,sensitivity,specificity}``: top class not normal against true class not
  normal (the screening metrics do the same at thresholds chosen on validation);
* ``hierarchy/anomaly_test_{accuracy,f1_macro}``: among the truly abnormal images, the top class among the
  anomaly classes alone: the second stage, given a right first one;
* per group G of ``evaluation.hierarchy.groups`` (classes, by their labels in the data):
  ``hierarchy/G_merged_test_{accuracy,f1_macro}``, the 16-way decision with G's classes counted as one class
  (``test/...`` is the same decision with them apart); ``hierarchy/G_test_recall``, the share of G's images
  called any class of G; ``hierarchy/G_grade_test_{accuracy,f1_macro}``, among G's images, the top class among
  G's classes alone.

F1 and accuracy follow the stage metrics' definitions (``metrics.label_scores``). ``hierarchy.csv`` in the run
folder has one row per view (with the 16-way view itself), with its images and classes.
"""

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fetalbrain.data.classes import NORMAL_CLASS, display_name
from fetalbrain.evaluation.metrics import label_scores

CSV_FILE = "hierarchy.csv"
PREFIX = "hierarchy/"
_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_groups(groups, class_names: list[str] | None) -> dict[str, list[str]]:
    """``evaluation.hierarchy.groups`` as plain lists, every name checked against the run's classes (``None``:
    the shape only, before the data are read); a bad group is refused naming its key. A group none of whose
    classes the data have (another dataset) is left out; one with some unknown names is a typo, refused."""
    if groups is not None and not isinstance(groups, Mapping):
        raise ValueError(f"evaluation.hierarchy.groups={groups!r}: a mapping of group name to a list of classes")
    checked = {}
    for name, members in (groups or {}).items():
        key = f"evaluation.hierarchy.groups.{name}"
        if not _GROUP_NAME.match(str(name)):
            raise ValueError(f"{key}: a group name must be letters, digits, '-' or '_' (it names metrics)")
        if (
            isinstance(members, str)
            or not isinstance(members, Sequence)
            or not all(isinstance(m, str) for m in members)
        ):
            raise ValueError(f"{key}={members!r}: a list of class labels")
        members = list(members)
        if len(set(members)) < 2:
            raise ValueError(f"{key}={members}: a group needs at least two different classes")
        unknown = [m for m in members if class_names is not None and m not in class_names]
        if unknown and len(unknown) == len(members):  # another dataset's classes: no such finding here
            continue
        if unknown:
            raise ValueError(
                f"{key}: {', '.join(map(repr, unknown))} not among this run's classes ({', '.join(class_names)}); "
                f"use the labels as the data spells them, or evaluation.hierarchy.groups={{}} for a dataset "
                "without these classes"
            )
        checked[str(name)] = members
    return checked


def _row(view: str, question: str, classes: int, predicted, targets, num_classes: int) -> dict:
    return {"view": view, "question": question, "images": len(targets), "classes": classes} | label_scores(
        predicted, targets, num_classes
    )


def restricted_decision(probs: np.ndarray, columns: list[int]) -> np.ndarray:
    """The top class among ``columns`` only, as a position in ``columns``."""
    return probs[:, columns].argmax(axis=1)


def hierarchy_report(
    probs: np.ndarray, targets: np.ndarray, class_names: list[str], groups, out_dir: Path | None = None
) -> tuple[dict[str, float], list[str]]:
    """The views above for test probabilities and targets; writes ``hierarchy.csv`` into ``out_dir``."""
    checked = check_groups(groups, class_names)
    n = len(class_names)
    predicted = probs.argmax(axis=1)
    metrics, notes = (
        {},
        [f"no {name} view: the data have none of its classes" for name in groups or {} if name not in checked],
    )
    groups = checked
    rows = [_row("all classes", f"which of {n} classes", n, predicted, targets, n)]
    if NORMAL_CLASS in class_names:
        normal = class_names.index(NORMAL_CLASS)
        called, truly = predicted != normal, targets != normal
        rows.append(_row("abnormal", "normal or abnormal", 2, called.astype(int), truly.astype(int), 2))
        metrics[f"{PREFIX}abnormal_test_accuracy"] = rows[-1]["accuracy"]
        if truly.any():
            metrics[f"{PREFIX}abnormal_test_sensitivity"] = float(called[truly].mean())
        if (~truly).any():
            metrics[f"{PREFIX}abnormal_test_specificity"] = float((~called[~truly]).mean())
        anomalies = [i for i in range(n) if i != normal]
        if truly.any():
            position = {c: k for k, c in enumerate(anomalies)}
            decided = restricted_decision(probs[truly], anomalies)
            true = np.array([position[t] for t in targets[truly]])
            rows.append(_row("anomaly", "which anomaly, if abnormal", len(anomalies), decided, true, len(anomalies)))
            metrics |= {f"{PREFIX}anomaly_test_{k}": rows[-1][k] for k in ("accuracy", "f1_macro")}
        else:
            notes.append("no abnormal test image: no anomaly view")
    else:
        notes.append(f"no '{NORMAL_CLASS}' class: no normal-vs-abnormal view")
    for name, members in groups.items():
        columns = [class_names.index(m) for m in members]
        merge = np.arange(n)
        merge[columns] = columns[0]  # every class of the group counts as its first
        rows.append(
            _row(f"{name} merged", f"{name} as one class", n - len(columns) + 1, merge[predicted], merge[targets], n)
        )
        metrics |= {f"{PREFIX}{name}_merged_test_{k}": rows[-1][k] for k in ("accuracy", "f1_macro")}
        inside = np.isin(targets, columns)
        if not inside.any():
            notes.append(f"no test image of {name} ({', '.join(map(display_name, members))}): no grade view")
            continue
        metrics[f"{PREFIX}{name}_test_recall"] = float(np.isin(predicted[inside], columns).mean())
        position = {c: k for k, c in enumerate(columns)}
        true = np.array([position[t] for t in targets[inside]])
        decided = restricted_decision(probs[inside], columns)
        rows.append(_row(f"{name} grade", f"which {name} class, if {name}", len(columns), decided, true, len(columns)))
        metrics |= {f"{PREFIX}{name}_grade_test_{k}": rows[-1][k] for k in ("accuracy", "f1_macro")}
    if out_dir is not None:
        pd.DataFrame(rows).to_csv(Path(out_dir) / CSV_FILE, index=False)
    return metrics, notes
