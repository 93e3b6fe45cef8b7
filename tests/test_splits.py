"""Splits: the official one leaks (and says so); grouped folds never share a group between parts."""

import logging

import pytest

from fetalbrain.data.readers import read_dataset
from fetalbrain.data.splits import assign_parts
from tests.conftest import DATA


@pytest.fixture(scope="module")
def table():
    return read_dataset(DATA)[0]


def test_official_split_reports_its_leakage(table, caplog):
    with caplog.at_level(logging.WARNING):
        parts, report = assign_parts(table, "official")
    assert report.part_sizes == {"train": 1418, "val": 174, "test": 176}
    assert report.leaked["test"]["shared_source"] == 171  # of 176 test images
    assert report.leaked["val"]["shared_source"] >= 160
    assert "LEAKAGE" in caplog.text and "171 of 176 test" in caplog.text


@pytest.mark.parametrize("level", ["source", "case"])
def test_grouped_folds_are_group_disjoint_and_cover_everything(table, level):
    test_parts = []
    for fold in range(5):
        parts, report = assign_parts(
            table, "grouped", group_level=level, num_folds=5, fold=fold, val_num_folds=5, seed=7
        )
        groups = {p: set(parts.loc[parts["part"] == p, level]) for p in ("train", "val", "test")}
        sources = {p: set(parts.loc[parts["part"] == p, "source"]) for p in ("train", "val", "test")}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            assert not groups[a] & groups[b], f"fold {fold}: {level} groups shared by {a} and {b}"
            assert not sources[a] & sources[b], f"fold {fold}: source images shared by {a} and {b}"
        assert report.leaked["test"]["shared_source"] == 0 and report.leaked["val"]["shared_source"] == 0
        assert min(report.part_sizes.values()) > 0
        test_parts.append(set(parts.index[parts["part"] == "test"]))
    assert set().union(*test_parts) == set(table.index)  # every image is tested exactly once
    assert sum(len(t) for t in test_parts) == len(table)


def test_grouped_split_is_deterministic_and_seeded(table):
    options = dict(group_level="case", num_folds=5, fold=1, val_num_folds=5)
    first = assign_parts(table, "grouped", seed=3, **options)[0]["part"]
    again = assign_parts(table, "grouped", seed=3, **options)[0]["part"]
    other = assign_parts(table, "grouped", seed=4, **options)[0]["part"]
    assert first.equals(again) and not first.equals(other)


def test_single_case_classes_are_reported_by_name(table, caplog):
    with caplog.at_level(logging.WARNING):
        _, report = assign_parts(table, "grouped", group_level="case", num_folds=5, fold=0, val_num_folds=5, seed=42)
    absent = set(report.missing_classes["test"]) | set(report.missing_classes["train"])
    assert {"vein-of-galen", "intracranial-tumor"} & absent  # one case each: cannot be in every part
    assert "Classes with no image in the test part" in caplog.text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(splitter="random"), "data.splitter='random'"),
        (dict(splitter="grouped", group_level="patient"), "data.group_level='patient'"),
        (dict(splitter="grouped", fold=5), r"data.fold=5 must be in \[0, data.num_folds=5\)"),
        (dict(splitter="grouped", num_folds=500), "data.num_folds=500 is more than the 81 groups"),
    ],
)
def test_bad_split_options_name_the_key(table, options, message):
    grouped = dict(group_level="case", num_folds=5, fold=0, val_num_folds=5, seed=0)
    splitter = options.pop("splitter")
    grouped.update(options)
    with pytest.raises(ValueError, match=message):
        assign_parts(table, splitter, **grouped)
