"""Model cards and checkpoint integrity, on fake run directories (no training: seconds)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fetalbrain.card import (
    CheckpointIntegrityError,
    find_card,
    sha256_file,
    verify_checkpoint,
    write_model_card,
)

ROOT = Path(__file__).resolve().parents[1]


def make_run(
    folder: Path, accuracy: float = 0.3, fold: int = 0, leaked_test: int = 171, checkpoints: bool = True
) -> Path:
    """A run directory as training writes it, small: metrics.json, config.yaml, two checkpoints."""
    folder.mkdir(parents=True)
    config = {
        "seed": 42,
        "model": {"name": "cnn", "_target_": "fetalbrain.models.classifier.Classifier"},
        "data": {
            "root": "/data/fetal",
            "image_size": 32,
            "batch_size": 8,
            "splitter": "grouped",
            "fold": fold,
            "num_folds": 5,
            "group_level": "case",
            "mix": "real",
        },
        "trainer": {"max_epochs": 15, "precision": "32-true"},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.001, "weight_decay": 0.01},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {
        "metrics": {
            "test/accuracy": accuracy,
            "test/balanced_accuracy": accuracy - 0.1,
            "test/f1_macro": 0.14,
            "test/ece": 0.28,
            "test/ece_temperature_scaled": 0.11,
            "calibration/temperature": 2.5,
            "screening/test_auroc": 0.99,
            "screening/youden/threshold": 0.42,
            "screening/youden/test_sensitivity": 0.9,
            "screening/youden/test_specificity": 0.8,
            "shortcut/border_only_test_auroc": 0.84,
            "test/auroc_macro": float("nan"),  # a metric that could not be computed
        },
        "run": {
            "task": "classification",
            "model": "cnn",
            "net": "fetalbrain.models.cnn.PlainCNN",
            "pretrained_source": "none",
            "parameters": 390000,
            "image_size": 32,
            "epochs_trained": 3,
            "max_epochs": 15,
            "train_seconds": 12.5,
            "best_checkpoint": str(folder / "checkpoints" / "epoch_003.ckpt"),
            "device": "cpu",
            "seed": 42,
        },
        "data": {
            "root": "/data/fetal",
            "split": {
                "splitter": "grouped",
                "part_sizes": {"train": 1000, "val": 200, "test": 176},
                "missing_classes": {"train": [], "val": ["m-magna"], "test": ["hydracenphaly", "vein-of-galen"]},
                "leaked": {
                    "val": {"images": 200, "shared_source": 3, "shared_case": 4, "shared_group": 5},
                    "test": {"images": 176, "shared_source": leaked_test, "shared_case": 175, "shared_group": 175},
                },
            },
            "skipped_images": [],
            "synthetic": None,
        },
        "classes": ["hydracenphaly", "normal", "vein-of-galen"],
        "notes": ["classes absent from the test part: Hydranencephaly, Vein of Galen malformation"],
    }
    # metrics.json is written by json.dumps, which writes NaN as is
    (folder / "metrics.json").write_text(json.dumps(summary))
    if checkpoints:
        (folder / "checkpoints").mkdir()
        torch.save({"x": torch.zeros(3)}, folder / "checkpoints" / "epoch_003.ckpt")
        torch.save({"x": torch.ones(3)}, folder / "checkpoints" / "last.ckpt")
    return folder


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def cli(*runs: Path) -> list[subprocess.CompletedProcess]:
    """``python -m fetalbrain.card RUN`` for each run, concurrently: each start imports torch."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    command = [sys.executable, "-m", "fetalbrain.card"]
    processes = [
        subprocess.Popen(
            [*command, str(run)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for run in runs
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def test_card_files_hold_hashes_leakage_and_intended_use(tmp_path):
    run = make_run(tmp_path / "run")
    card = write_model_card(run)
    on_disk = json.loads((run / "model_card.json").read_text())  # strict JSON: NaN became null
    assert on_disk == card
    assert card["checkpoints"] == {
        "epoch_003.ckpt": sha256_file(run / "checkpoints" / "epoch_003.ckpt"),
        "last.ckpt": sha256_file(run / "checkpoints" / "last.ckpt"),
    }
    assert card["best_checkpoint"] == "epoch_003.ckpt"
    assert card["data"]["leakage"]["test"]["shared_source"] == 171
    assert card["data"]["leakage"]["val"]["shared_case"] == 4
    assert card["data"]["missing_classes"]["test"] == ["hydracenphaly", "vein-of-galen"]
    assert card["metrics"]["run"]["test/accuracy"] == 0.3
    assert card["metrics"]["run"]["test/auroc_macro"] is None
    assert card["metrics"]["folds"] is None
    assert card["calibration"]["calibration/temperature"] == 2.5
    assert card["screening"]["thresholds"]["youden"]["threshold"] == 0.42
    assert card["shortcut"]["border_only_test_auroc"] == 0.84
    assert card["training"]["optimizer"] == {"name": "AdamW", "lr": 0.001, "weight_decay": 0.01}
    assert "not for diagnosis" in card["intended_use"]["not_for"]
    assert any("BCNatal FETAL_PLANES_DB" in item for item in card["limitations"])
    assert any("single" in item and "case" in item for item in card["limitations"])
    leak = "of its 176 images, 171 share a source image with the training part, 175 a case, 175 a duplicate group"
    assert any(leak in item for item in card["limitations"])
    assert card["notes"] == ["classes absent from the test part: Hydranencephaly, Vein of Galen malformation"]
    assert card["fetalbrain_version"] and card["created"]

    markdown = (run / "model_card.md").read_text()
    for text in (
        card["checkpoints"]["last.ckpt"],
        "Not a medical device",
        "not for diagnosis",
        "BCNatal FETAL_PLANES_DB",
        "Vein of Galen malformation",  # display names, not the dataset's spellings
        "| test | 176 | 171 | 175 | 175 |",
        "## Calibration",
        "## Screening",
        "## Shortcut baselines",
    ):
        assert text in markdown, text
    assert "vein-of-galen" not in markdown


def test_card_copes_with_missing_keys(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"metrics": {"gan/wasserstein": 1.5}, "run": {"task": "generation"}}))
    card = write_model_card(run)
    assert card["metrics"]["run"] == {"gan/wasserstein": 1.5}
    assert card["checkpoints"] == {} and card["calibration"] is None and card["screening"] is None
    assert "config.yaml is missing" in card["notes"][0]
    assert "No checkpoint" in (run / "model_card.md").read_text()


def test_fold_intervals(tmp_path):
    runs = [make_run(tmp_path / str(i), accuracy=a, fold=i) for i, a in enumerate((0.2, 0.3, 0.4))]
    card = write_model_card(runs[0], runs)  # the run itself among its folds counts once
    folds = card["metrics"]["folds"]
    assert folds["n_runs"] == 3 and [r["fold"] for r in folds["runs"]] == [0, 1, 2]
    assert folds["warnings"] == []
    accuracy = folds["metrics"]["test/accuracy"]
    # mean 0.3, std 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3) = 4.3027 * 0.057735 = 0.24841
    assert accuracy["n"] == 3
    assert accuracy["mean"] == pytest.approx(0.3)
    assert accuracy["std"] == pytest.approx(0.1)
    assert accuracy["ci95_low"] == pytest.approx(0.3 - 0.248414, abs=1e-5)
    assert accuracy["ci95_high"] == pytest.approx(0.3 + 0.248414, abs=1e-5)
    assert folds["metrics"]["test/auroc_macro"]["n"] == 0  # non-finite everywhere: no interval
    assert write_model_card(runs[0], runs[1:])["metrics"]["folds"]["metrics"]["test/accuracy"] == accuracy
    markdown = (runs[0] / "model_card.md").read_text()
    assert "0.3000 ± 0.1000" in markdown and "[0.0516, 0.5484]" in markdown
    assert math.isclose(card["metrics"]["run"]["test/accuracy"], 0.2)


def test_verify_checkpoint(tmp_path):
    run = make_run(tmp_path / "run")
    best = run / "checkpoints" / "epoch_003.ckpt"
    assert find_card(best) is None
    assert verify_checkpoint(best) == "no card"
    write_model_card(run)
    assert find_card(best) == run / "model_card.json"
    assert verify_checkpoint(best) == "verified"
    link = tmp_path / "deployed.ckpt"  # a link to a run's checkpoint is checked against that run's card
    link.symlink_to(best)
    assert find_card(link) == run / "model_card.json" and verify_checkpoint(link) == "verified"
    torch.save({"x": torch.zeros(3)}, run / "checkpoints" / "epoch_009.ckpt")
    assert verify_checkpoint(run / "checkpoints" / "epoch_009.ckpt") == "not listed"

    expected = sha256_file(best)
    flip_byte(best)
    with pytest.raises(CheckpointIntegrityError, match="epoch_003.ckpt") as error:
        verify_checkpoint(best)
    message = str(error.value)
    assert expected[:12] in message and sha256_file(best)[:12] in message and "verify=false" in message
    assert isinstance(error.value, ValueError)
    assert verify_checkpoint(best, verify=False) == "skipped"


def test_cli(tmp_path):
    clean_run = make_run(tmp_path / "clean")  # no card yet: the CLI writes it, prints it, checks it
    changed_run = make_run(tmp_path / "changed")
    write_model_card(changed_run)
    flip_byte(changed_run / "checkpoints" / "last.ckpt")
    (changed_run / "checkpoints" / "epoch_003.ckpt").unlink()
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    clean, changed, refused = cli(clean_run, changed_run, not_a_run)

    assert clean.returncode == 0, clean.stderr
    assert (clean_run / "model_card.json").is_file() and "# Model card" in clean.stdout
    assert "OK       epoch_003.ckpt" in clean.stdout and "OK       last.ckpt" in clean.stdout

    assert changed.returncode == 1, changed.stderr
    assert "CHANGED  last.ckpt" in changed.stdout and "MISSING  epoch_003.ckpt" in changed.stdout
    assert "changed or missing" in changed.stderr

    assert refused.returncode == 2
    assert str(not_a_run) in refused.stderr and "metrics.json" in refused.stderr
