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
    assert metrics["external/images"] == len(labels) == 626
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
    assert len(table) == 626 and table["subject"].nunique() == 506
    with Image.open(table["path"][0]) as image:
        assert image.mode == "L" and max(image.size) == 256 and image.size[0] != image.size[1]
    provenance = (SHIPPED / "PROVENANCE.md").read_text()
    for attribution in ("CC BY 4.0", "10.5281/zenodo.1327317", "van den Heuvel", "Radboud University Medical"):
        assert attribution in provenance
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) < 6.5e6
