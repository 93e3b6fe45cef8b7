"""The audit finds the dataset's leakage; compare refuses a folder without runs (sweeps: tests/test_study.py)."""

import pandas as pd
import pytest

from fetalbrain.audit import audit
from fetalbrain.audit import main as audit_main
from fetalbrain.compare import compare
from tests.conftest import DATA


def test_audit_finds_the_leakage_and_the_duplicates(tmp_path, capsys):
    audit_main([str(DATA), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "LEAKAGE test: 171 of 176 images share a source image with train" in printed
    leakage = pd.read_csv(tmp_path / "leakage.csv").set_index("split")
    assert leakage.loc["test", "shared_source"] >= 160 and leakage.loc["valid", "shared_case"] == 174
    for name in (
        "report.md",
        "audit.png",
        "class_counts.csv",
        "exact_duplicates.csv",
        "near_duplicates.csv",
        "label_conflicts.csv",
        "groups.csv",
        "thresholds.csv",
    ):
        assert (tmp_path / name).is_file(), name
    conflicts = pd.read_csv(tmp_path / "label_conflicts.csv")
    assert {"cerebellah-hypoplasia", "moderate-ventriculomegaly"} <= set(conflicts["label_a"]) | set(
        conflicts["label_b"]
    )
    report = (tmp_path / "report.md").read_text()
    assert "cerebellah-hypoplasia:20 + moderate-ventriculomegaly:20" in report
    assert "Arnold-Chiari malformation" in report  # readable class names


def test_audit_lists_unreadable_images_and_goes_on(tmp_path, small_export):
    victim = sorted((small_export / "test").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    summary = audit(small_export, tmp_path / "out")
    assert len(summary["unreadable"]) == 1 and victim.name in summary["unreadable"][0]
    assert summary["images"] == len(list(small_export.glob("*/*.jpg"))) - 1


def test_compare_without_runs_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directories"):
        compare([tmp_path], tmp_path / "out")
