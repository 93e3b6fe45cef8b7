"""The head finder: trains a few steps on real HC18 heads through `fetalbrain.train model=head_finder` and reports
on held-out subjects per head-width bin; the split keeps subjects apart; a probability map becomes a head, or
"not found" with its reason; bad images get a reason, never a crash."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from fetalbrain.data.ellipses import Ellipse, ellipse_mask
from fetalbrain.data.head_finding import HeadFinder, judge_probability, load_head_finder
from fetalbrain.data.head_outlines import read_heads, split_by_subject
from fetalbrain.models.head_finder import BINS_FILE, TEST_FILE, build_head_net
from fetalbrain.training.fit import train
from tests.conftest import ROOT, TINY, train_config

HEADS = ROOT / "data" / "hc18-normal-heads"
EDGES = [0, 0.35, 0.45, 0.55, 0.65, 1.0]
OPTIONS = SimpleNamespace(threshold=0.5, min_area=0.02, second_region=0.3, edge_margin=1, min_confidence=0.5)


@pytest.fixture(scope="module")
def finder_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("head_finder")
    overrides = [
        *[o for o in TINY if not o.startswith(("evaluation.", "data."))],
        "model=head_finder",
        "data.image_size=32",
        "data.batch_size=8",
        "data.test_fraction=0.05",  # the report scores each held-out image at its own size: a few dozen
    ]
    with train_config(run_dir, overrides) as cfg:
        summary, objects = train(cfg)
    return run_dir, summary, objects


def test_the_finder_trains_on_real_heads_and_reports_every_bin(finder_run):
    run_dir, summary, objects = finder_run
    assert summary["run"]["task"] == "head_finding" and summary["run"]["epochs_trained"] == 1
    parts, subjects = summary["data"]["split"]["part_sizes"], summary["data"]["split"]["subjects"]
    assert sum(parts.values()) == 895 and sum(subjects.values()) == 727
    metrics = summary["metrics"]
    assert 0 <= metrics["val/dice"] <= 1 and metrics["val/dice_best"] >= metrics["val/dice"] - 1e-6
    per_image = pd.read_csv(run_dir / TEST_FILE)
    assert len(per_image) == parts["test"] == metrics["test/images"]
    assert per_image["dice"].between(0, 1).all() and per_image["reason"].fillna("").ne("").eq(~per_image["found"]).all()
    by_bin = pd.read_csv(run_dir / BINS_FILE, dtype={"bin": str})
    assert by_bin["bin"].tolist() == ["0-0.35", "0.35-0.45", "0.45-0.55", "0.55-0.65", "0.65-1", "all"]
    for row in by_bin.itertuples():
        prefix = "test/" if row.bin == "all" else f"test/head_width_{row.bin}/"
        assert metrics[f"{prefix}images"] == row.images and metrics[f"{prefix}dice_mean"] == pytest.approx(
            row.dice_mean
        )
    assert by_bin.set_index("bin").loc["all", "images"] == by_bin["images"].iloc[:-1].sum()
    assert (run_dir / "head_finder_examples.png").stat().st_size > 5_000
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["task"] == "head_finding" and len(card["head_finder_by_bin"]) == 6
    card_text = (run_dir / "model_card.md").read_text()
    assert "## Head finding on held-out subjects" in card_text and "| 0.35-0.45 |" in card_text


def test_a_finder_loaded_from_its_checkpoint_sees_what_the_run_saw(finder_run):
    run_dir, summary, objects = finder_run
    loaded = load_head_finder(summary["run"]["best_checkpoint"])
    image = np.asarray(objects["datamodule"].datasets["test"].images[0])
    module = objects["model"]
    assert np.allclose(loaded.probability(image), module.finder().probability(image), atol=1e-5)
    with pytest.raises(ValueError, match="not a head finder"):
        load_head_finder({"hyper_parameters": {"class_names": ["a"]}, "state_dict": {}})


def test_a_slim_export_keeps_what_the_finder_sees_and_is_checked(finder_run, tmp_path):
    from fetalbrain.export import export

    run_dir, summary, objects = finder_run
    best = Path(summary["run"]["best_checkpoint"])
    slim = export(best, "slim", tmp_path / "head_finder.pt")
    assert slim.stat().st_size < best.stat().st_size / 2  # float16 weights, no optimizer state
    image = np.asarray(objects["datamodule"].datasets["test"].images[1])
    assert np.allclose(load_head_finder(slim).probability(image), load_head_finder(best).probability(image), atol=2e-2)
    assert (tmp_path / "head_finder.sha256").read_text().split()[1] == "head_finder.pt"
    with pytest.raises(ValueError, match="not a head finder's checkpoint"):
        from fetalbrain.models.head_finder import slim_checkpoint

        slim_checkpoint(write_classifier_like(tmp_path / "other.ckpt"), tmp_path / "x.pt")


def write_classifier_like(path: Path) -> Path:
    torch.save({"hyper_parameters": {"class_names": ["a"]}, "state_dict": {}}, path)
    return path


def test_the_encoder_starts_from_the_packaged_imagenet_weights():
    from timm.models import adapt_input_conv

    from fetalbrain.models.backbones import _match_keys, read_state_dict, resolve_weights_path

    path = resolve_weights_path("packaged:efficientnet-lite0")
    imagenet = _match_keys("tf_efficientnet_lite0", read_state_dict(path), path)
    net = build_head_net("tu-tf_efficientnet_lite0", "packaged:efficientnet-lite0", [16, 16, 8, 8, 8])
    own = net.encoder.model.state_dict()
    assert torch.equal(own["conv_stem.weight"], adapt_input_conv(1, imagenet["conv_stem.weight"]))
    assert torch.equal(own["blocks.6.0.conv_pwl.weight"], imagenet["blocks.6.0.conv_pwl.weight"])
    with pytest.raises(ValueError, match="tu-<timm name>"):
        build_head_net("resnet18", "packaged:efficientnet-lite0", [16, 16, 8, 8, 8])


def test_subjects_stay_in_one_part_and_every_part_spans_the_bins():
    table = read_heads(HEADS)
    parts = split_by_subject(table, 0.15, 0.2, seed=0, edges=EDGES)
    assert (table.assign(part=parts).groupby("subject")["part"].nunique() == 1).all()
    bins = pd.cut(table["head_width_fraction"], EDGES, include_lowest=True)
    assert (pd.crosstab(bins, parts) > 0).all().all()
    assert parts.value_counts(normalize=True)["test"] == pytest.approx(0.2, abs=0.04)
    assert not parts.equals(split_by_subject(table, 0.15, 0.2, seed=1, edges=EDGES))
    with pytest.raises(ValueError, match="val \\+ test < 1"):
        split_by_subject(table, 0.6, 0.5, seed=0, edges=EDGES)


def test_a_probability_map_is_a_head_or_a_reason():
    shape = (180, 256)
    head = Ellipse(128, 90, 70, 50, 20)
    clean = ellipse_mask(head, shape) * 0.9
    found = judge_probability(clean, OPTIONS)
    assert found.found and found.reason == "" and found.confidence == pytest.approx(0.9, abs=0.03)
    assert abs(found.ellipse.cx - 128) < 0.5 and abs(found.ellipse.semi_major - 70) < 0.7

    no_margin = SimpleNamespace(**{**vars(OPTIONS), "edge_margin": 0})
    assert judge_probability(clean, no_margin).found  # a margin of 0 only refuses ellipses reaching past the edge
    assert judge_probability(np.zeros(shape), OPTIONS).reason == "no fetal head found (no skull region)"
    small = ellipse_mask(Ellipse(128, 90, 8, 6, 0), shape) * 0.9
    assert "largest region 0.3% of the image" in judge_probability(small, OPTIONS).reason
    two = (ellipse_mask(Ellipse(60, 90, 40, 30, 0), shape) + ellipse_mask(Ellipse(190, 90, 40, 30, 0), shape)) * 0.9
    assert judge_probability(two, OPTIONS).reason.startswith("two head-like regions")
    cut = ellipse_mask(Ellipse(20, 90, 70, 50, 0), shape) * 0.9  # half outside the left edge
    result = judge_probability(cut, OPTIONS)
    assert not result.found and result.reason == "the head is cut by the frame edge" and result.ellipse is not None
    ragged = clean.copy()
    ragged[::2, ::3] = 0  # a sieve barely above the threshold: the region's mean probability is low
    ragged[ragged > 0] = 0.55
    assert judge_probability(ragged, OPTIONS).reason == "head found with low confidence (0.46 < 0.5)"


def test_bad_images_get_a_reason_not_a_crash():
    finder = HeadFinder(build_head_net("tu-tf_efficientnet_lite0", None, [16, 16, 8, 8, 8]), 32, OPTIONS)
    assert finder(np.zeros((1, 1), np.uint8)).reason == "image too small to hold a head (1x1 px; at least 16 px a side)"
    assert "image too small" in finder(np.zeros((0, 0), np.uint8)).reason
    assert finder(np.zeros((64, 64), np.float32)).reason.startswith("expects an 8-bit image (0-255), got float32")
    photo = (np.random.default_rng(0).random((120, 160, 4)) * 255).astype(np.uint8)  # a colour "photo", with alpha
    result = finder(photo)
    assert isinstance(result.found, bool) and (result.found or result.reason)
    assert result.probability is None or result.probability.shape == (120, 160)


def test_the_shipped_finder_finds_held_out_heads():
    """The finder that ships (its SHA256 checked) on held-out subjects of its own split (split seed 0): found, and
    its ellipse close to the drawn one. Its full report: experiments/head_finder/."""
    from fetalbrain.data.head_outlines import ellipse_of
    from fetalbrain.data.images import read_grayscale
    from fetalbrain.evaluation.head_fit import dice

    finder = load_head_finder()
    table = read_heads(HEADS)
    held_out = table[split_by_subject(table, 0.15, 0.2, seed=0, edges=EDGES) == "test"]
    for row in held_out.sort_values("head_width_fraction").iloc[[0, 40, 90, 140, -1]].itertuples():
        image = read_grayscale(row.path)
        found = finder(image)
        truth = ellipse_of(row)
        assert found.found and found.confidence > 0.8, (row.file, found.reason)
        assert dice(found.probability >= 0.5, ellipse_mask(truth, image.shape)) > 0.85, row.file
        assert abs(found.ellipse.circumference - truth.circumference) / truth.circumference < 0.08, row.file
