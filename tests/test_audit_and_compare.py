"""The audit finds the dataset's leakage; a 2-model x 3-fold multirun compares into tables and plots."""

import pandas as pd
import pytest

from fetalbrain.audit import audit
from fetalbrain.audit import main as audit_main
from fetalbrain.compare import compare
from tests.conftest import DATA, TINY, run_cli


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


def test_two_models_two_folds_then_compare(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        "train",
        "-m",
        "model=cnn,separable",
        "data.fold=0,1",
        "data.num_folds=3",
        *[o for o in TINY if not o.startswith("logger=")],
        "logger=wandb",  # offline: each job of an in-process multirun must be its own W&B run
        f"hydra.sweep.dir={sweep}",
    )
    jobs = [job for job in sweep.iterdir() if job.name.isdigit()]
    assert all(len(list((job / "wandb").glob("offline-run-*"))) == 1 for job in jobs)
    assert len({next((job / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[-1] for job in jobs}) == 4
    out = tmp_path / "comparison"
    table = compare([sweep], out, wandb_mode="offline")
    summary = pd.read_csv(out / "comparison.csv")
    assert set(summary["group"]) == {"cnn · grouped", "separable · grouped"}
    f1 = summary[summary["metric"] == "test/f1_macro"].set_index("group")
    assert (f1["n"] == 2).all() and (f1["ci95_low"] <= f1["mean"]).all() and (f1["mean"] <= f1["ci95_high"]).all()
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["fold"]) == [0, 0, 1, 1]
    pooled = pd.read_csv(out / "pooled_out_of_fold.csv").set_index("group")
    assert (pooled["pooled_images"] == 2 * 16).all()  # 2 folds x 2 test batches of 8
    for name in ("comparison.md", "comparison.png", "per_class_recall.csv", "confusion_cnn_grouped.png"):
        assert (out / name).is_file(), name
    assert "cnn · grouped | 2 |" in table
    assert list((out / "wandb").glob("offline-run-*"))


def test_compare_without_runs_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directories"):
        compare([tmp_path], tmp_path / "out")
