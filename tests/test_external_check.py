"""The external normal check: normal heads from another hospital in every run's report, compare and the GUI."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from fetalbrain.app import describe
from fetalbrain.compare import compare
from fetalbrain.data.compact import main as compact_main
from fetalbrain.data.readers import LABELS_CSV, DatasetError, read_labelled_folder
from fetalbrain.evaluation.external_normals import CSV_FILE, FIGURE_FILE, describe_external, external_report
from fetalbrain.evaluation.intervals import subject_bootstrap
from fetalbrain.evaluation.metrics import COMPARED
from fetalbrain.inference.predictor import Predictor
from tests.conftest import CONF, ROOT

SHIPPED = ROOT / "data" / "hc18-normal-heads"
RULES = ("youden", "sensitivity_0.95")  # the report's screening rules (evaluation.screening_min_sensitivity 0.95)


@pytest.fixture(scope="module")
def run(trained_checkpoint):
    """The session's tiny training run (external check on): its folder, metrics and notes."""
    run_dir = trained_checkpoint.parent.parent
    summary = json.loads((run_dir / "metrics.json").read_text())
    return {"dir": run_dir, "metrics": summary["metrics"], "notes": summary["notes"]}


def external_options(**changes):
    """``evaluation.external`` as conf/train.yaml sets it, with ``changes``."""
    options = OmegaConf.load(CONF / "train.yaml").evaluation.external
    options.root = str(SHIPPED)
    return OmegaConf.merge(options, changes)


def test_external_check_is_in_metrics_json_with_its_files(run):
    """The issue's test: the check's numbers in metrics.json, counted from the shipped labels.csv, and each one
    recomputed from the per-image table the run wrote."""
    metrics, run_dir = run["metrics"], run["dir"]
    labels = pd.read_csv(SHIPPED / LABELS_CSV)
    assert metrics["external/images"] == len(labels) == 895
    assert metrics["external/subjects"] == labels["subject"].nunique()
    table = pd.read_csv(run_dir / CSV_FILE)
    assert len(table) == len(labels) and set(table["subject"]) == set(labels["subject"])
    for rule in RULES:  # at each rule's validation-chosen threshold, on the uncalibrated abnormal score
        threshold = metrics[f"screening/{rule}/threshold"]
        specificity = metrics[f"external/normal_specificity_{rule}"]
        assert specificity == pytest.approx(float(np.mean(table["abnormal_score"] < threshold)))
        assert (table[f"called_abnormal_{rule}"] == (table["abnormal_score"] >= threshold)).all()
        assert 0 <= metrics[f"external/test_normal_specificity_{rule}"] <= 1
    assert metrics["external/normal_specificity"] == metrics["external/normal_specificity_youden"]
    predicted_normal = float(np.mean(table["predicted"] == "normal"))
    assert metrics["external/fraction_predicted_normal"] == pytest.approx(predicted_normal)
    assert metrics["external/ood_flag_rate"] == pytest.approx(float(table["ood_flagged"].mean()))
    for key in ("external/normal_specificity", "external/fraction_predicted_normal", "external/ood_flag_rate"):
        assert 0 <= metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"] <= 1, key
    assert metrics["external/test_normal_images"] >= 0
    assert (run_dir / FIGURE_FILE).stat().st_size > 10_000
    warned = any("may follow the acquisition source" in note for note in run["notes"])
    assert warned == (metrics["external/normal_specificity"] < 0.5)


def test_the_external_check_reports_every_gestational_age_bin(run):
    """Per bin of head width (the gestational-age proxy): every bin of conf/train.yaml in metrics.json, the bins
    file and the model card, each rate recomputed from the per-image table with an interval over its subjects."""
    from fetalbrain.evaluation.external_normals import BINS_FILE, bin_labels

    metrics, run_dir = run["metrics"], run["dir"]
    by = OmegaConf.load(CONF / "train.yaml").evaluation.external.by
    labels = bin_labels(list(by.edges))
    assert labels == ["0-0.35", "0.35-0.45", "0.45-0.55", "0.55-0.65", "0.65-1"]
    table = pd.read_csv(run_dir / CSV_FILE, dtype={"bin": str})
    binned = pd.read_csv(run_dir / BINS_FILE, dtype={"bin": str})
    assert list(dict.fromkeys(binned["bin"])) == labels
    assert set(binned["metric"]) == {"normal_specificity", "fraction_predicted_normal", "ood_flag_rate"}
    assert table["bin"].notna().all() and sorted(set(table["bin"])) == sorted(labels)
    for label in labels:
        rows = table[table["bin"] == label]
        low, high = (float(v) for v in label.split("-"))
        assert rows["head_width_fraction"].between(low, high).all()
        prefix = f"external/{by.key}_{label}/"
        assert metrics[f"{prefix}images"] == len(rows) and metrics[f"{prefix}subjects"] == rows["subject"].nunique()
        specificity = float(np.mean(rows["abnormal_score"] < metrics["screening/youden/threshold"]))
        assert metrics[f"{prefix}normal_specificity"] == pytest.approx(specificity)
        assert metrics[f"{prefix}ood_flag_rate"] == pytest.approx(float(rows["ood_flagged"].mean()))
        for name in ("normal_specificity", "fraction_predicted_normal", "ood_flag_rate"):
            assert (
                0
                <= metrics[f"{prefix}{name}_ci_low"]
                <= metrics[f"{prefix}{name}"]
                <= metrics[f"{prefix}{name}_ci_high"]
                <= 1
            )
    assert sum(metrics[f"external/{by.key}_{label}/images"] for label in labels) == metrics["external/images"]
    card = (run_dir / "model_card.md").read_text()
    assert "By bin of the heads' size in the frame" in card
    for label in labels:
        assert f"| {label} | {metrics[f'external/{by.key}_{label}/images']:,.0f} |" in card


def test_bins_need_a_numeric_column_and_rising_edges(tmp_path):
    from fetalbrain.evaluation.external_normals import assign_bins, check_options

    table = pd.DataFrame({"file": ["a.jpg", "b.jpg", "c.jpg"], "head_width_fraction": ["0.3", "", "0.95"]})
    by = external_options().by
    bins, reason = assign_bins(table, by)
    assert reason is None and bins.astype(object).fillna("none").tolist() == ["0-0.35", "none", "0.65-1"]
    bins, reason = assign_bins(table.assign(head_width_fraction=["0.3", "wide", "0.2"]), by)
    assert bins is None and "head_width_fraction of b.jpg is not a number" in reason
    assert "no head_width_fraction column" in assign_bins(table.drop(columns="head_width_fraction"), by)[1]
    with pytest.raises(ValueError, match=r"evaluation.external.by.edges=\[0.5, 0.2\]: must increase"):
        check_options(external_options(by={"edges": [0.5, 0.2]}))
    with pytest.raises(ValueError, match="evaluation.external.by.column"):
        check_options(external_options(by={"column": ""}))
    check_options(external_options(by=None))


def test_external_scores_are_the_predictors(run, trained_checkpoint):
    """Not from the report's own table: each image's abnormal score is what predict gives the file (the run's
    preprocessing, TTA, uncalibrated probabilities), so a wrong pipeline or scale in the check would show here."""
    from fetalbrain.data.images import read_grayscale

    table = pd.read_csv(run["dir"] / CSV_FILE)
    predictor = Predictor(trained_checkpoint, calibrated=False, heatmaps=False)
    normal = predictor.class_names.index("normal")
    for _, row in table.iloc[[0, len(table) // 2, -1]].iterrows():
        probs = predictor.probabilities(predictor.tensor(read_grayscale(SHIPPED / "images" / row["file"])))
        assert row["abnormal_score"] == pytest.approx(1 - probs[0, normal], abs=1e-5)
        assert row["predicted"] == predictor.class_names[int(probs[0].argmax())]


def test_compare_and_the_gui_show_the_external_check(run, trained_checkpoint, tmp_path):
    table = compare([run["dir"]], tmp_path / "comparison")
    summary = pd.read_csv(tmp_path / "comparison" / "comparison.csv").set_index("metric")
    for key in ("external/normal_specificity", "external/fraction_predicted_normal"):
        assert summary.loc[key, "n"] == 1 and summary.loc[key, "mean"] == pytest.approx(run["metrics"][key])
        assert COMPARED[key] in table
    text = describe(Predictor(trained_checkpoint, heatmaps=False))
    line = next(line for line in text.split("\n\n") if line.startswith("**External normal check**"))
    assert "HC18, Radboud UMC" in line
    assert f"called normal: {run['metrics']['external/normal_specificity_youden']:.0%}" in line
    assert "normal_specificity" not in text  # not among the test metrics: a line of its own
    assert describe_external({}).startswith("none: this run has no external normal check")


def test_absent_folder_or_no_normal_class_or_a_bad_setting_give_a_note_not_an_error(tmp_path):
    classes, test = ["abnormal", "normal"], (np.full((2, 2), 0.5), np.array([0, 1]))
    cases = {
        "does not exist": (external_options(root=str(tmp_path / "absent")), classes),
        "no 'normal' class": (external_options(), ["abnormal", "other"]),
        "evaluation.external.bootstrap.confidence": (external_options(bootstrap={"confidence": 2.0}), classes),
        "evaluation.external.rule": (external_options(rule=""), classes),
    }
    for expected, (options, class_names) in cases.items():
        metrics, notes, figures = external_report(None, tmp_path, options, class_names, test, {})
        assert metrics == {} and figures == {} and len(notes) == 1 and expected in notes[0], notes
    assert not list(tmp_path.glob("external_*"))


def test_an_unreadable_external_image_is_left_out_and_named(run, trained_checkpoint, tmp_path):
    import shutil

    from fetalbrain.models.classifier import load_classifier
    from fetalbrain.runs.checkpoints import read_checkpoint

    folder = tmp_path / "heads"
    (folder / "images").mkdir(parents=True)
    table = pd.read_csv(SHIPPED / LABELS_CSV).head(4)
    for name in table["file"][:3]:
        shutil.copyfile(SHIPPED / "images" / name, folder / "images" / name)
    (folder / "images" / table["file"].iloc[3]).write_bytes(b"\xff\xd8 not a whole JPEG")
    table.to_csv(folder / LABELS_CSV, index=False)
    model = load_classifier(read_checkpoint(trained_checkpoint))
    thresholds = {k: v for k, v in run["metrics"].items() if k.startswith("screening/")}
    test = (np.full((2, len(model.hparams.class_names)), 1 / len(model.hparams.class_names)), np.array([0, 1]))
    out = tmp_path / "run"
    out.mkdir()
    metrics, notes, _ = external_report(
        model, out, external_options(root=str(folder)), list(model.hparams.class_names), test, thresholds
    )
    assert metrics["external/images"] == 3 and len(pd.read_csv(out / CSV_FILE)) == 3
    assert "1 unreadable image(s) left out" in notes[0] and table["file"].iloc[3] in notes[0]


def test_bootstrap_resamples_subjects_not_images():
    """Ten subjects of twenty identical frames each, half all normal: the information is ten subjects, not 200
    images. Resampling subjects gives the wide interval ten give; treating frames as independent, a narrow one."""
    subjects = np.repeat(np.arange(10), 20)
    called_normal = subjects < 5
    grouped = subject_bootstrap({"x": called_normal}, subjects, 2000, seed=0, confidence=0.95)["x"]
    naive = subject_bootstrap({"x": called_normal}, np.arange(200), 2000, seed=0, confidence=0.95)["x"]
    assert grouped[0] <= 0.2 and grouped[1] >= 0.8  # about 0.5 ± 1.96 * sqrt(0.25 / 10)
    assert naive[1] - naive[0] < 0.2 < grouped[1] - grouped[0]
    # one subject of nine normal-called frames, one of a single abnormal-called frame: a quarter of the resamples
    # draw the second subject twice (fraction 0); ten independent images would almost never all be that frame
    frames, subject = np.r_[np.ones(9, bool), False], np.r_[np.zeros(9), 1]
    assert subject_bootstrap({"x": frames}, subject, 500, 0, 0.9)["x"][0] == 0.0
    assert subject_bootstrap({"x": frames}, np.arange(10), 500, 0, 0.9)["x"][0] >= 0.6
    assert subject_bootstrap({"x": called_normal}, subjects, 0, 0, 0.95) == {}
    again = subject_bootstrap({"x": called_normal}, subjects, 2000, seed=0, confidence=0.95)["x"]
    assert again == grouped


def make_labelled_folder(root: Path, shapes=((400, 270), (400, 270), (390, 269))) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for index, (width, height) in enumerate(shapes):
        name = f"{300 + index // 2}_{index % 2 + 1}HC.jpg"
        pixels = (np.indices((height, width)).sum(axis=0) % 256).astype(np.uint8)
        Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(root / "images" / name)  # stored as RGB
        rows.append({"file": name, "subject": 300 + index // 2, "frame": index % 2 + 1, "label": "normal"})
    pd.DataFrame(rows).to_csv(root / LABELS_CSV, index=False)
    (root / "PROVENANCE.md").write_text("# A subset\n\nLicence: CC BY 4.0. Keep this attribution with any copy.\n")
    return root


def test_compact_copy_of_a_labelled_folder_keeps_aspect_subjects_and_attribution(tmp_path):
    src = make_labelled_folder(tmp_path / "src")
    compact_main([str(src), str(tmp_path / "dst"), "--size", "64", "--quality", "85"])
    dst = tmp_path / "dst"
    assert (dst / LABELS_CSV).read_bytes() == (src / LABELS_CSV).read_bytes()
    copied = read_labelled_folder(dst, "normal")
    assert list(copied["subject"]) == ["300", "300", "301"]
    with Image.open(copied["path"][0]) as image:
        assert image.mode == "L" and image.size == (64, 43)  # 400x270 -> longest side 64, aspect kept
    provenance = (dst / "PROVENANCE.md").read_text()
    assert "Licence: CC BY 4.0. Keep this attribution with any copy." in provenance  # the original, verbatim
    assert "longest side is 64 px" in provenance and "3 images of 2 subjects" in provenance
    with pytest.raises(FileExistsError):
        compact_main([str(src), str(dst)])


def test_labelled_folder_errors_name_the_file(tmp_path):
    root = make_labelled_folder(tmp_path / "set")
    with pytest.raises(DatasetError, match="no image labelled 'abnormal'"):
        read_labelled_folder(root, "abnormal")
    (root / "images" / "301_1HC.jpg").unlink()
    with pytest.raises(DatasetError, match=r"labels.csv, line 4: listed file .*301_1HC.jpg does not exist"):
        read_labelled_folder(root)
    (root / LABELS_CSV).write_text("image,label\na.jpg,normal\n")
    with pytest.raises(DatasetError, match="missing file, subject"):
        read_labelled_folder(root)
    with pytest.raises(DatasetError, match=f"{tmp_path / 'none' / LABELS_CSV}: missing"):
        read_labelled_folder(tmp_path / "none")


def test_the_shipped_copy():
    table = read_labelled_folder(SHIPPED, "normal")
    assert len(table) == 895 and table["subject"].nunique() == 727
    subjects = table["subject"].astype(int)
    assert set(range(0, 79)) <= set(subjects)  # every early-pregnancy subject (000-078)
    assert subjects.min() == 0 and subjects.max() == 805 and not subjects.between(79, 157).any()
    head = table["head_width_fraction"].astype(float)  # from the drawn outlines: every image has its head
    assert head.between(0.15, 0.9).all() and head[subjects < 79].median() < 0.4 < head[subjects >= 300].median()
    with Image.open(table["path"][0]) as image:
        assert image.mode == "L" and max(image.size) == 256 and image.size[0] != image.size[1]
    provenance = (SHIPPED / "PROVENANCE.md").read_text()
    for attribution in ("CC BY 4.0", "10.5281/zenodo.1327317", "van den Heuvel", "Radboud University Medical"):
        assert attribution in provenance
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) < 9.5e6


def test_compact_merges_folders_and_fits_each_heads_outline(tmp_path):
    """Two labelled folders into one copy; with --outlines, each image's ellipse fitted to its drawn outline (as
    HC18's annotations), in the copy's pixels; an image without an outline is refused before anything is written."""
    import cv2

    from fetalbrain.data.ellipses import Ellipse

    first = make_labelled_folder(tmp_path / "first")
    second = make_labelled_folder(tmp_path / "second", shapes=((400, 270),))
    (second / "images" / "300_1HC.jpg").rename(second / "images" / "900_HC.jpg")
    (second / LABELS_CSV).write_text("file,subject,frame,label\n900_HC.jpg,900,1,normal\n")
    outlines = tmp_path / "outlines"
    (outlines / "annotations").mkdir(parents=True)
    (outlines / "PROVENANCE.md").write_text("# Outlines\n\nDrawn by sonographers. CC BY 4.0.\n")
    rows, drawn = [], {}
    for index, name in enumerate(["300_1HC.jpg", "300_2HC.jpg", "301_1HC.jpg", "900_HC.jpg"]):
        outline = np.zeros((540, 800), np.uint8)  # the annotations are twice the images' size
        drawn[name] = Ellipse(360 + 20 * index, 250 + 10 * index, 200 - 15 * index, 120, 30 + 40 * index)
        e = drawn[name]
        cv2.ellipse(outline, (round(e.cx), round(e.cy)), (round(e.semi_major), 120), e.angle, 0, 360, 255, 2)
        cv2.imwrite(str(outlines / "annotations" / name.replace(".jpg", "_Annotation.png")), outline)
        rows.append({"annotation": name.replace(".jpg", "_Annotation.png"), "image": name})
    pd.DataFrame(rows).to_csv(outlines / "annotations.csv", index=False)

    dst = tmp_path / "dst"
    compact_main([str(first), str(second), str(dst), "--size", "200", "--outlines", str(outlines)])
    copied = read_labelled_folder(dst, "normal")
    assert list(copied["file"]) == ["300_1HC.jpg", "300_2HC.jpg", "301_1HC.jpg", "900_HC.jpg"]
    for row in copied.itertuples():  # each row its own outline, moved into its own image's pixels
        with Image.open(row.path) as image:
            width, height = image.size  # 200x135, and 200x138 for the 390x269 image
        expected = drawn[row.file].scaled(width / 800, height / 540)
        assert float(row.head_cx) == pytest.approx(expected.cx, abs=0.2), row.file
        assert float(row.head_cy) == pytest.approx(expected.cy, abs=0.2), row.file
        assert float(row.head_semi_major) == pytest.approx(expected.semi_major, abs=0.3), row.file
        assert float(row.head_semi_minor) == pytest.approx(expected.semi_minor, abs=0.3), row.file
        assert abs((float(row.head_angle) - expected.angle + 90) % 180 - 90) < 1.0, row.file
    assert 0.4 < float(copied["head_width_fraction"][0]) < 0.5  # 2 * sqrt(50² cos² 30° + 30² sin² 30°) / 200
    with pytest.raises(ValueError, match="already holds head ellipses"):  # they would stay in the old pixels
        compact_main([str(dst), str(tmp_path / "smaller"), "--size", "100"])
    provenance = (dst / "PROVENANCE.md").read_text()
    assert "Drawn by sonographers" in provenance and provenance.count("Licence: CC BY 4.0.") == 2
    assert "4 images of 3 subjects" in provenance

    (outlines / "annotations" / "900_HC_Annotation.png").unlink()
    with pytest.raises(FileNotFoundError, match="900_HC.jpg: no outline"):
        compact_main([str(first), str(second), str(tmp_path / "again"), "--outlines", str(outlines)])
    assert not (tmp_path / "again").exists()
    with pytest.raises(ValueError, match="300_1HC.jpg: listed by more than one source folder"):
        compact_main([str(first), str(first), str(tmp_path / "twice")])
