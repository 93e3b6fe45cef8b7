"""Model cards and checkpoint integrity, on fake run directories (no training: seconds)."""

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, metadata_load

from fetalbrain.card import main
from fetalbrain.compare import summarise
from fetalbrain.evaluation.model_card import HC18, ROBOFLOW, front_matter_problems, write_model_card
from fetalbrain.runs.integrity import CheckpointIntegrityError, find_card, sha256_file, verify_checkpoint

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
            "root": "/data/fetal-brain-ultrasound",
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
            "root": "/data/fetal-brain-ultrasound",
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
            "limitations": ["`normal` images come from another acquisition (BCNatal FETAL_PLANES_DB)"],
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
    """``python -m fetalbrain.card RUN`` for each run, concurrently."""
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
    assert "classifying" in card["intended_use"]["use"]
    # the data config's dataset facts, as sentences; the run's own numbers for the rest
    assert "`normal` images come from another acquisition (BCNatal FETAL_PLANES_DB)." in card["limitations"]
    assert any("not a medical device" in item for item in card["limitations"])
    assert any("Not evaluated" in item and "Vein of Galen malformation" in item for item in card["limitations"])
    assert any("border_only" in item and "0.84" in item for item in card["limitations"])  # a shortcut baseline
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


def test_card_copes_with_missing_keys_and_a_generator_is_not_a_classifier(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"metrics": {"gan/wasserstein": 1.5}, "run": {"task": "generation"}}))
    card = write_model_card(run)
    assert card["metrics"]["run"] == {"gan/wasserstein": 1.5}
    assert card["checkpoints"] == {} and card["calibration"] is None and card["screening"] is None
    assert "config.yaml is missing" in card["notes"][0]
    markdown = (run / "model_card.md").read_text()
    assert "No checkpoint" in markdown
    assert "generating synthetic" in card["intended_use"]["use"]
    assert "classif" not in json.dumps(card["intended_use"]) + json.dumps(card["limitations"])
    assert "classif" not in markdown.lower()
    # no dataset facts invented for a run whose data config states none
    assert not any(word in " ".join(card["limitations"]) for word in ("BCNatal", "212", "81 cases", "single case"))
    metadata = metadata_load(run / "model_card.md")  # no pipeline tag fits a class-conditional generator
    assert "gan" in metadata["tags"] and "pipeline_tag" not in metadata and "model-index" not in metadata
    assert metadata["license"] == "unknown" and front_matter_problems(run) == []


def test_front_matter_is_hub_metadata_that_matches_metrics_json(tmp_path):
    run = make_run(tmp_path / "run")
    summary = json.loads((run / "metrics.json").read_text())
    external = {"external/normal_specificity": 0.2, "external/test_normal_specificity": 0.9}
    summary["metrics"] |= {**external, "external/normal_specificity_ci_low": 0.1}
    (run / "metrics.json").write_text(json.dumps(summary))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["evaluation"] = {"external": {"root": "/data/hc18-normal-heads", "name": "HC18, Radboud UMC"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    write_model_card(run)

    card = ModelCard.load(run / "model_card.md")  # a path: read here, never fetched
    assert card.text.lstrip().startswith("# Model card: cnn (run)")
    data = card.data
    assert (data.license, data.pipeline_tag, data.library_name) == ("cc-by-4.0", "image-classification", "pytorch")
    tags = {"medical-imaging", "ultrasound", "image-classification", "fetal-brain", "cnn", "plaincnn", "lightning"}
    assert tags <= set(data.tags)
    assert data.datasets == [ROBOFLOW["id"], HC18["id"]]
    results = {r.metric_name: r for r in data.eval_results}
    metrics = summary["metrics"]
    expected = {k: v for k, v in metrics.items() if k.startswith("test/") and math.isfinite(v)}
    assert {k: r.metric_value for k, r in results.items()} == {**expected, "screening/test_auroc": 0.99, **external}
    f1 = results["test/f1_macro"]
    assert (f1.metric_type, f1.dataset_type, f1.dataset_split) == ("f1", ROBOFLOW["id"], "test")
    assert f1.dataset_args == {"splitter": "grouped", "fold": 0, "num_folds": 5, "group_level": "case"}
    hc18 = results["external/normal_specificity"]
    assert (hc18.dataset_type, hc18.dataset_split) == (HC18["id"], None)
    assert results["external/test_normal_specificity"].dataset_type == ROBOFLOW["id"]  # this run's own test normals
    assert front_matter_problems(run) == []
    assert "## Licence" in card.text and "MIT-licensed" in card.text

    summary["data"]["root"] = "/scans/our-hospital"  # a folder the project does not know: no identifier invented
    (run / "metrics.json").write_text(json.dumps(summary))
    write_model_card(run)
    data = ModelCard.load(run / "model_card.md").data
    assert data.license == "unknown" and data.datasets == [HC18["id"]]
    assert {r.dataset_name for r in data.eval_results} == {"our-hospital (local folder)", HC18["name"]}


def test_card_names_what_is_wrong_with_the_front_matter(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    write_model_card(run)
    path = run / "model_card.md"
    written = path.read_text()
    body = written.split("\n---\n", 1)[1]
    cases = {
        "a card from before": (body, ["has no front matter", "--write"]),
        "broken YAML": ("---\nlicense: [cc-by-4.0\n---\n" + body, ["does not parse"]),
        "a broken model-index": ("---\nlicense: mit\nmodel-index: [{}]\n---\n" + body, ["does not parse"]),
        "a changed value": (
            written.replace("value: 0.14\n", "value: 0.15\n"),
            ["test/f1_macro is 0.15, metrics.json says 0.14"],
        ),
        "missing fields": (
            written.replace("license: cc-by-4.0\n", "").replace("pipeline_tag: image-classification\n", ""),
            ["license is missing", "pipeline_tag None: a classification run's is 'image-classification'"],
        ),
    }
    for what, (text, messages) in cases.items():
        path.write_text(text)
        assert main([str(run)]) == 1, what
        error = capsys.readouterr().err
        assert all(message in error for message in messages), (what, error)
    path.unlink()
    assert main([str(run)]) == 1 and "model_card.md is missing" in capsys.readouterr().err

    summary = json.loads((run / "metrics.json").read_text())
    summary["metrics"]["test/nll"] = 0.5  # e.g. a metric added after the card was written
    (run / "metrics.json").write_text(json.dumps(summary))
    assert main([str(run), "--write"]) == 0  # the card rewritten: nothing wrong
    path.write_text(written)
    assert main([str(run)]) == 1 and "model-index has no result test/nll" in capsys.readouterr().err


def test_card_shows_the_pictures_in_the_run_folder(tmp_path):
    run = make_run(tmp_path / "run")
    for name in ("training_curves.png", "reliability.png"):
        (run / name).write_bytes(b"\x89PNG")
    assert write_model_card(run)["figures"] == ["training_curves.png", "reliability.png"]
    markdown = (run / "model_card.md").read_text()
    assert "](training_curves.png)" in markdown and "](reliability.png)" in markdown  # relative: renders anywhere
    for absent in ("per_class_recall.png", "confusion_matrix_normalised.png", "external_normals.png"):
        assert absent not in markdown, absent


def test_integrity_imports_nothing_heavy():
    code = "import sys, fetalbrain.runs.integrity; print([m for m in ('torch', 'scipy', 'pandas') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


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


def test_fold_intervals_equal_compares(tmp_path):
    values = (0.61, 0.55, 0.72, 0.58)
    runs = [make_run(tmp_path / str(i), accuracy=a, fold=i) for i, a in enumerate(values)]
    card = write_model_card(runs[0], runs)["metrics"]["folds"]["metrics"]["test/balanced_accuracy"]
    table = pd.DataFrame({"group": "g", "test/balanced_accuracy": [a - 0.1 for a in values]})
    row = summarise(table).set_index("metric").loc["test/balanced_accuracy"]
    assert card["n"] == row["n"] == 4
    for key in ("mean", "std", "ci95_low", "ci95_high"):
        assert card[key] == pytest.approx(row[key], rel=1e-12), key


def test_verify_checkpoint(tmp_path, caplog, capsys):
    run = make_run(tmp_path / "run")
    best = run / "checkpoints" / "epoch_003.ckpt"
    assert find_card(best) is None
    with caplog.at_level(logging.WARNING, logger="fetalbrain.runs.integrity"):
        assert verify_checkpoint(best) == "no card"
    assert "could not be verified" in caplog.text and "epoch_003.ckpt" in caplog.text
    write_model_card(run)
    assert find_card(best) == (run / "model_card.json", best)
    assert verify_checkpoint(best) == "verified"
    link = tmp_path / "deployed.ckpt"  # a link to a run's checkpoint is checked against that run's card
    link.symlink_to(best)
    assert find_card(link)[0] == run / "model_card.json" and verify_checkpoint(link) == "verified"

    copy = run / "checkpoints" / "epoch_009.ckpt"  # e.g. a modified copy under a new name: refused
    torch.save({"x": torch.full((3,), 9.0)}, copy)
    with pytest.raises(CheckpointIntegrityError, match="epoch_009.ckpt.*not listed.*model_card.json.*verify=false"):
        verify_checkpoint(copy)
    assert verify_checkpoint(copy, verify=False) == "skipped"
    assert main([str(run)]) == 1 and "UNLISTED epoch_009.ckpt" in capsys.readouterr().out

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
    assert "changed, missing or not listed" in changed.stderr

    assert refused.returncode == 2
    assert str(not_a_run) in refused.stderr and "metrics.json" in refused.stderr


def test_rewriting_a_card_keeps_the_recorded_hashes(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    recorded = write_model_card(run)["checkpoints"]
    torch.save({"x": torch.zeros(3)}, run / "checkpoints" / "epoch_005.ckpt")
    assert "epoch_005.ckpt" in write_model_card(run)["checkpoints"]  # a new checkpoint is added
    last = run / "checkpoints" / "last.ckpt"
    flip_byte(last)

    assert main([str(run), "--write"]) == 1  # refused: the card keeps the hash it recorded
    error = capsys.readouterr().err
    assert "last.ckpt" in error and "--rehash" in error and "may not describe" in error
    assert json.loads((run / "model_card.json").read_text())["checkpoints"]["last.ckpt"] == recorded["last.ckpt"]
    with pytest.raises(CheckpointIntegrityError, match="last.ckpt"):
        write_model_card(run, [run])  # --folds rewrites the card too
    assert main([str(run)]) == 1  # the check says so, and does not recommend a plain --write
    error = capsys.readouterr().err
    assert "changed" in error and "--write --rehash" in error and "--write if" not in error

    assert main([str(run), "--write", "--rehash"]) == 0  # the new weights accepted knowingly
    assert json.loads((run / "model_card.json").read_text())["checkpoints"]["last.ckpt"] == sha256_file(last)
    assert verify_checkpoint(last) == "verified"
    assert main([str(run), "--rehash"]) == 2  # --rehash alone would not rewrite anything


def test_card_shows_the_ood_detector_and_the_external_check(trained_checkpoint, tmp_path):
    """The trained run's own card (both checks on) shows their numbers; a low external specificity, below the run's
    evaluation.external.warn_below, becomes a limitation."""
    run_dir = trained_checkpoint.parent.parent
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["ood"] == {k: metrics[k] for k in ("ood/auroc", "ood/test_flag_rate", "ood/threshold")}
    for key in ("external/normal_specificity", "external/fraction_predicted_normal"):
        for suffix in ("", "_ci_low", "_ci_high"):
            assert card["external"][key + suffix] == metrics[key + suffix], key + suffix
    assert card["external"]["external/test_normal_specificity"] == metrics["external/test_normal_specificity"]
    markdown = (run_dir / "model_card.md").read_text()
    assert "## Out-of-distribution detector" in markdown and "## External normal check" in markdown
    assert f"| `external/normal_specificity` | {metrics['external/normal_specificity']:.4f} |" in markdown
    warned = metrics["external/normal_specificity"] < 0.5  # the config's default warn_below
    assert front_matter_problems(run_dir) == []  # a real run's front matter: every test and external result
    assert any("may follow the acquisition source" in item for item in card["limitations"]) == warned

    run = make_run(tmp_path / "run")
    summary = json.loads((run / "metrics.json").read_text())
    summary["metrics"] |= {"external/normal_specificity": 0.2, "external/test_normal_specificity": 0.9}
    (run / "metrics.json").write_text(json.dumps(summary))
    limitation = next(item for item in write_model_card(run)["limitations"] if "acquisition source" in item)
    assert limitation.startswith("Normal heads from another hospital are mostly called abnormal: the normal-vs-")
    assert "20% of them called normal; 90% of this run's test normals" in limitation
    config = yaml.safe_load((run / "config.yaml").read_text())
    for warn_below, warned in ((0.3, True), (0.1, False)):
        config["evaluation"] = {"external": {"warn_below": warn_below, "name": "HC18", "rule": "youden"}}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        limitations = " ".join(write_model_card(run)["limitations"])
        assert ("20% of HC18 called normal at the youden threshold" in limitations) == warned, warn_below
