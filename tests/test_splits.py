"""Splits: the official one leaks (and says so); grouped folds never share a group, a source image,
a case or a duplicate between train, val and test."""

import logging

import numpy as np
import pytest

from fetalbrain.data.datamodule import FetalBrainDataModule
from fetalbrain.data.duplicates import (
    DEFAULT_THRESHOLD,
    content_hash,
    duplicate_groups,
    hamming_matrix,
    perceptual_hash,
)
from fetalbrain.data.images import read_grayscale
from fetalbrain.data.readers import read_dataset
from fetalbrain.data.splits import assign_parts
from tests.conftest import DATA


@pytest.fixture(scope="module")
def embedded():
    table, _ = read_dataset(DATA)
    images = [read_grayscale(p) for p in table["path"]]
    distances = hamming_matrix(np.array([perceptual_hash(i) for i in images], dtype=np.uint64))
    exact = np.array([content_hash(i) for i in images])
    return table, images, distances, exact


def grouped(embedded, level="case", fold=0, seed=42, num_folds=5):
    table, images, _, _ = embedded
    table = table.assign(group=duplicate_groups(table, images, level, DEFAULT_THRESHOLD))
    return assign_parts(table, "grouped", num_folds=num_folds, fold=fold, val_num_folds=5, seed=seed)


def test_official_split_reports_its_leakage(embedded, caplog):
    with caplog.at_level(logging.WARNING):
        parts, report = assign_parts(embedded[0], "official")
    assert report.part_sizes == {"train": 1418, "val": 174, "test": 176}
    assert report.leaked["test"]["shared_source"] == 171  # of 176 test images
    assert report.leaked["val"]["shared_source"] >= 160
    assert "LEAKAGE" in caplog.text and "171 of 176 test" in caplog.text


def test_duplicates_merge_re_uploads_across_names_and_labels(embedded):
    table, images, _, _ = embedded
    groups = duplicate_groups(table, images, "case", DEFAULT_THRESHOLD)
    assert table["case"].nunique() == 81 and groups.nunique() == 78
    merged = table.assign(group=groups).groupby("group")["case"].nunique()
    # The same images are labelled cerebellar hypoplasia and moderate ventriculomegaly (case 20).
    assert set(table.loc[groups == groups[table["case"] == "moderate-ventriculomegaly:20"].iloc[0], "case"]) == {
        "cerebellah-hypoplasia:20",
        "moderate-ventriculomegaly:20",
    }
    assert (merged > 1).sum() == 3


@pytest.mark.parametrize("level", ["source", "case"])
def test_grouped_folds_keep_every_group_and_duplicate_on_one_side(embedded, level):
    table, _, distances, exact = embedded
    tested = np.zeros(len(table), dtype=int)
    for fold in range(5):
        parts, report = grouped(embedded, level, fold)
        part = parts["part"].to_numpy()
        for column in ("group", "source", level):
            sets = {p: set(parts.loc[part == p, column]) for p in ("train", "val", "test")}
            for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
                assert not sets[a] & sets[b], f"fold {fold}: {column} shared by {a} and {b}"
        near = distances <= DEFAULT_THRESHOLD
        across = part[:, None] != part[None, :]
        assert not (near & across).any(), f"fold {fold}: near-duplicates split apart"
        assert not ((exact[:, None] == exact[None, :]) & across).any(), f"fold {fold}: exact duplicates split apart"
        assert report.leaked["test"]["shared_source"] == 0 and report.leaked["val"]["shared_group"] == 0
        assert min(report.part_sizes.values()) > 0
        tested += part == "test"
    assert (tested == 1).all()  # every image is tested in exactly one fold


def test_grouped_split_is_deterministic_and_seeded(embedded):
    first, again, other = (grouped(embedded, fold=1, seed=s)[0]["part"] for s in (3, 3, 4))
    assert first.equals(again) and not first.equals(other)


def test_single_case_classes_are_reported_by_name(embedded, caplog):
    with caplog.at_level(logging.WARNING):
        _, report = grouped(embedded)
    absent = set(report.missing_classes["test"]) | set(report.missing_classes["train"])
    assert {"vein-of-galen", "intracranial-tumor"} & absent  # one case each: cannot be in every part
    assert "Classes with no image in the test part" in caplog.text


def test_bad_split_options_name_the_key(embedded):
    with pytest.raises(ValueError, match="data.splitter='random'"):
        assign_parts(embedded[0], "random")
    with pytest.raises(ValueError, match=r"data.fold=5 must be in \[0, data.num_folds=5\)"):
        grouped(embedded, fold=5)
    with pytest.raises(ValueError, match="data.num_folds=500 is more than the 78 groups"):
        grouped(embedded, num_folds=500)
    with pytest.raises(ValueError, match="data.group_level='patient'"):
        FetalBrainDataModule(str(DATA), group_level="patient")
