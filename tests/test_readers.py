"""Readers on the embedded dataset, the folder layout, and every malformed-input case."""

import shutil

import pytest

from fetalbrain.data.readers import DatasetError, read_dataset
from tests.conftest import DATA, write_split_csv


def test_embedded_dataset_is_the_full_export():
    table, classes = read_dataset(DATA)
    assert table.groupby("split").size().to_dict() == {"train": 1418, "valid": 174, "test": 176}
    assert len(classes) == 16 and classes[0] == "anold-chiari-malformation" and classes[12] == "normal"
    assert table["source"].nunique() == 212
    assert table["path"].map(lambda p: p.endswith(".jpg")).all()
    row = table[table["path"].str.contains("Patient00709_Plane3_1_of_3_aug_1")].iloc[0]
    assert (row.label, row.source, row.case) == ("normal", "Patient00709_Plane3_1_of_3", "Patient00709")


@pytest.mark.parametrize(
    ("filename", "label", "source", "case"),
    [
        (
            "Copy-of-arachnoid-cyst-37b_aug_0_png_jpg.rf.3e46b256d159cc7a64cf2e1c720b5b17.jpg",
            "arachnoid-cyst",
            "Copy-of-arachnoid-cyst-37b",
            "arachnoid-cyst:37",
        ),
        (
            "Copy-of-arachnoid-cyst-37a-_png_jpg.rf.0a.jpg",
            "arachnoid-cyst",
            "Copy-of-arachnoid-cyst-37a-",
            "arachnoid-cyst:37",
        ),
        (
            "Copy-of-encephalocele-3-23b_aug_1_png_jpg.rf.ab.jpg",
            "encephalocele",
            "Copy-of-encephalocele-3-23b",
            "encephalocele:23",
        ),
        (
            "Copy-of-vein-of-galen-40b2_png_jpg.rf.cd.jpg",
            "vein-of-galen",
            "Copy-of-vein-of-galen-40b2",
            "vein-of-galen:40",
        ),
        (
            "Copy-of-moderate-ventriculomegaly-34_jpg.rf.ef.jpg",
            "moderate-ventriculomegaly",
            "Copy-of-moderate-ventriculomegaly-34",
            "moderate-ventriculomegaly:34",
        ),
        (
            "Copy-of-mild-ventriculomegaly_png_jpg.rf.01.jpg",
            "mild-ventriculomegaly",
            "Copy-of-mild-ventriculomegaly",
            "mild-ventriculomegaly:mild-ventriculomegaly",
        ),
        ("scan_001.png", "normal", "scan_001", "normal:1"),
    ],
)
def test_source_and_case_groups(tmp_path, filename, label, source, case):
    from fetalbrain.data.groups import case_group, source_group

    assert source_group(filename) == source
    assert case_group(source, label) == case


def test_folder_per_class_layout_reads_like_the_csv_export(tmp_path, small_export):
    csv_table, classes = read_dataset(small_export)
    folder = tmp_path / "folders"
    for row in csv_table.itertuples():
        (folder / row.split / row.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(row.path, folder / row.split / row.label)
    table, folder_classes = read_dataset(folder)  # auto-detected
    assert folder_classes == sorted(classes)
    assert sorted(zip(table["label"], table["split"], table["source"])) == sorted(
        zip(csv_table["label"], csv_table["split"], csv_table["source"])
    )
    flat = tmp_path / "flat"
    shutil.copytree(folder / "train", flat)
    table, _ = read_dataset(flat, format="folder")
    assert set(table["split"]) == {"all"} and len(table) == (csv_table["split"] == "train").sum()


def _edit_csv(export, split, edit):
    frame = read_split_csv_at(export, split)
    edit(frame)
    write_split_csv(frame, export / split / "_classes.csv")


def read_split_csv_at(export, split):
    import pandas as pd

    frame = pd.read_csv(export / split / "_classes.csv", skipinitialspace=True)
    frame.columns = [c.strip() for c in frame.columns]
    return frame


def test_missing_classes_csv_is_named(small_export):
    (small_export / "valid" / "_classes.csv").unlink()
    with pytest.raises(DatasetError, match=r"valid/_classes\.csv: missing"):
        read_dataset(small_export, format="roboflow")


def test_row_with_two_positive_labels_names_file_and_line(small_export):
    def two_labels(frame):
        frame.iloc[2, 1:] = 0
        frame.iloc[2, 1] = frame.iloc[2, 2] = 1

    _edit_csv(small_export, "train", two_labels)
    with pytest.raises(DatasetError, match=r"train/_classes\.csv, line 4 .*exactly one positive class, found 2"):
        read_dataset(small_export)


def test_row_with_no_label(small_export):
    _edit_csv(small_export, "test", lambda frame: frame.iloc.__setitem__((0, slice(1, None)), 0))
    with pytest.raises(DatasetError, match=r"test/_classes\.csv, line 2 .*found 0"):
        read_dataset(small_export)


def test_listed_file_that_is_missing(small_export):
    name = read_split_csv_at(small_export, "valid")["filename"].iloc[0]
    (small_export / "valid" / name).unlink()
    with pytest.raises(DatasetError, match=rf"line 2: listed file .*{name[:30]}.* does not exist"):
        read_dataset(small_export)


def test_class_columns_that_differ_between_splits(small_export):
    _edit_csv(small_export, "test", lambda frame: frame.rename(columns={"normal": "healthy"}, inplace=True))
    with pytest.raises(DatasetError, match=r"test/_classes\.csv: class columns differ .*only here: \['healthy'\]"):
        read_dataset(small_export)


def test_class_without_any_image(small_export):
    def drop_vein_of_galen(frame):
        rows = frame["vein-of-galen"] == 1
        frame.drop(index=frame.index[rows], inplace=True)

    for split in ("train", "valid", "test"):
        _edit_csv(small_export, split, drop_vein_of_galen)
    with pytest.raises(DatasetError, match="class.*without any image: vein-of-galen"):
        read_dataset(small_export)


def test_unrecognised_layout_and_bad_options(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="cannot recognise the dataset layout"):
        read_dataset(tmp_path)
    with pytest.raises(DatasetError, match="no such directory"):
        read_dataset(tmp_path / "absent")
    with pytest.raises(DatasetError, match="data.format='coco': unknown"):
        read_dataset(DATA, format="coco")


def test_folder_layout_errors(tmp_path):
    (tmp_path / "train" / "normal").mkdir(parents=True)
    (tmp_path / "train" / "cyst").mkdir()
    shutil.copy(next(DATA.glob("train/*.jpg")), tmp_path / "train" / "normal")
    with pytest.raises(DatasetError, match=r"cyst: empty class folder"):
        read_dataset(tmp_path)
    shutil.copy(next(DATA.glob("train/*.jpg")), tmp_path / "train" / "cyst")
    (tmp_path / "test" / "tumour").mkdir(parents=True)
    shutil.copy(next(DATA.glob("train/*.jpg")), tmp_path / "test" / "tumour")
    with pytest.raises(DatasetError, match=r"test: class folder\(s\) \['tumour'\] are not in"):
        read_dataset(tmp_path)
