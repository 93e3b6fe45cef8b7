"""Declared studies: a tiny study runs through ``python -m fetalbrain.study`` and summarises itself (pooled metrics
with case-bootstrap intervals inside [0, 1], a paired comparison, the README block), and ``compare`` reads the same
runs; test ranking is refused; every study README's generated blocks match its results; the statistics agree with
their textbook definitions."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fetalbrain.compare import compare
from fetalbrain.studies import statistics as st
from fetalbrain.studies.readme import blocks_in, stale_blocks, write_readme
from fetalbrain.studies.spec import EXPERIMENTS_DIR, StudyError, load_study
from fetalbrain.study import main as study_main
from tests.conftest import ROOT, TINY, train_config

TINY_STUDY = [o for o in TINY if "limit_" not in o and "max_epochs" not in o and not o.startswith("logger=")] + [
    "logger=wandb",  # offline: each job of an in-process multirun must be its own W&B run
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=1",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "data.image_size=16",
    "evaluation.nearest_neighbour.enabled=false",
    "evaluation.hierarchy.enabled=false",
    "evaluation.per_class_recall.enabled=false",
]


def write_study(folder: Path, **changes) -> Path:
    study = {
        "description": "plain against separable CNN, tiny",
        "conditions": {"cnn": ["model=cnn"], "separable": ["model=separable"]},
        "overrides": TINY_STUDY,
        "seeds": [0],
        "folds": 2,
        "split_seeds": [0],
        "primary": "f1_macro",
        "secondary": ["accuracy", "balanced_accuracy"],
        "baseline": "cnn",
        "select": {"part": "val", "metric": "f1_macro", "ensembles": [2], "per_fold": True},
        "bootstrap": {"samples": 200, "seed": 0, "confidence": 0.95},
        "runs": str(folder / "runs"),
        "run_metrics": ["test/accuracy"],
        **changes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.yaml").write_text(yaml.safe_dump(study))
    return folder / "study.yaml"


def test_tiny_study_runs_and_summarises(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "tiny"
    study_file = write_study(folder)
    (folder / "README.md").write_text(
        "# Tiny\n\n<!-- generated:headline -->\nold numbers\n<!-- /generated:headline -->\n\n"
        "<!-- generated:comparisons -->\n<!-- /generated:comparisons -->\n"
    )
    monkeypatch.chdir(ROOT)  # the runner in this process, as `python -m fetalbrain.study` from the repository
    assert study_main([str(study_file)]) == 0  # its multiruns are processes of their own
    runs = sorted(p.parent for p in (folder / "runs").rglob("metrics.json"))
    assert [r.parent.name for r in runs] == ["cnn", "cnn", "separable", "separable"]  # 2 conditions x 2 folds
    assert all((r / "val_predictions.csv").is_file() for r in runs)
    assert all(len(list((r / "wandb").glob("offline-run-*"))) == 1 for r in runs)
    assert len({next((r / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[-1] for r in runs}) == 4

    results = folder / "results"
    pooled = pd.read_csv(results / "pooled.csv")
    assert set(pooled["condition"]) == {"cnn", "separable", "nested selection"}
    assert pooled.loc[pooled["endpoint"] == "primary", "metric"].unique().tolist() == ["f1_macro"]
    assert (
        (pooled["ci_low"] >= 0)
        & (pooled["ci_high"] <= 1)
        & (pooled["ci_low"] <= pooled["value"])
        & (pooled["value"] <= pooled["ci_high"])
    ).all()
    # pooled: both folds' test images, each once (one test batch of 8 per fold)
    assert (pooled["images"] == 16).all() and (pooled["runs"] == 2).all()
    tested = pd.concat([pd.read_csv(r / "predictions.csv") for r in runs if r.parent.name == "cnn"])
    classes = [c[2:] for c in tested.columns if c.startswith("p_")]
    true = tested["true"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    accuracy = pooled.query("condition == 'cnn' and metric == 'accuracy'")["value"].item()
    assert accuracy == pytest.approx((tested["predicted"] == tested["true"]).mean(), abs=1e-4)
    assert st.scores(true, tested[[f"p_{c}" for c in classes]].to_numpy())["accuracy"] == pytest.approx(
        accuracy, abs=1e-4
    )

    # nested selection: each outer fold takes the condition best on its own validation part, and reports its test
    nested, scores = pd.read_csv(results / "nested.csv"), pd.read_csv(results / "runs.csv")
    for row in nested.itertuples():
        fold = scores[scores["fold"] == row.fold].set_index("condition")["val/f1_macro"]
        assert fold[row.chosen] == fold.max()

    comparison = pd.read_csv(results / "comparisons.csv")
    assert comparison[["condition", "baseline", "metric", "comparisons"]].values.tolist() == [
        ["separable", "cnn", "f1_macro", 2],
        ["nested selection", "cnn", "f1_macro", 2],
    ]
    assert np.isfinite(comparison["difference"]).all() and "p_holm" in comparison
    status = pd.read_csv(results / "status.csv")
    assert status.values.tolist() == [["cnn", 2, 2], ["separable", 2, 2]]
    calibration = pd.read_csv(results / "calibration.csv").set_index("condition")
    assert calibration.loc["cnn", "accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert calibration[["mean_confidence", "ece"]].apply(lambda c: c.between(0, 1)).all().all()
    ensembles = pd.read_csv(results / "ensembles.csv")
    assert ensembles["members"].tolist() == ["cnn + separable"] and ensembles["chosen on validation"].all()
    assert len(pd.read_csv(results / "ensemble_predictions.csv")) == 16

    from_reports = pd.read_csv(results / "run_metrics.csv").set_index("condition")
    reported = [json.loads((r / "metrics.json").read_text())["metrics"]["test/accuracy"] for r in runs]
    assert from_reports.loc["cnn", "mean"] == pytest.approx(np.mean(reported[:2]), abs=1e-4)
    paired = pd.read_csv(results / "run_comparisons.csv")  # the report's metric, paired by fold against cnn
    assert paired[["metric", "condition", "baseline", "pairs"]].values.tolist() == [
        ["test/accuracy", "separable", "cnn", 2]
    ]
    assert paired["difference"].item() == pytest.approx(np.mean(reported[2:]) - np.mean(reported[:2]), abs=1e-4)

    readme = (folder / "README.md").read_text()
    assert "old numbers" not in readme and "**macro F1** (primary)" in readme and "| separable | cnn |" in readme
    assert stale_blocks(folder / "README.md", results) == []
    (folder / "README.md").write_text(readme.replace("| separable | cnn |", "| separable | CNN |"))
    assert stale_blocks(folder / "README.md", results) == ["comparisons"]  # a hand edit is caught

    # the same runs through compare: one group per model, fold t-intervals, pooled predictions, W&B table
    out = tmp_path / "comparison"
    table = compare([folder / "runs"], out, wandb_mode="offline")
    summary = pd.read_csv(out / "comparison.csv")
    assert set(summary["group"]) == {"cnn · grouped", "separable · grouped"}
    f1 = summary[summary["metric"] == "test/f1_macro"].set_index("group")
    assert (f1["n"] == 2).all() and (f1["ci95_low"] <= f1["mean"]).all() and (f1["mean"] <= f1["ci95_high"]).all()
    assert sorted(pd.read_csv(out / "runs.csv")["fold"]) == [0, 0, 1, 1]
    compared = pd.read_csv(out / "pooled_out_of_fold.csv").set_index("group")
    assert (compared["pooled_images"] == 16).all() and (compared["distinct_images"] == 16).all()
    assert compared.loc["cnn · grouped", "pooled_accuracy"] == pytest.approx(accuracy, abs=1e-4)  # one definition
    for name in ("comparison.md", "comparison.png", "per_class_recall.csv", "confusion_cnn_grouped.png"):
        assert (out / name).is_file(), name
    assert "cnn · grouped | 2 |" in table
    assert list((out / "wandb").glob("offline-run-*"))

    # started again: every job is finished, nothing is launched; summarising alone rewrites the same numbers
    capsys.readouterr()
    assert study_main([str(study_file), "--dry-run"]) == 0
    assert "fetalbrain.train" not in capsys.readouterr().out
    before = (results / "pooled.csv").read_text()
    assert study_main([str(study_file), "--summarise"]) == 0
    assert (results / "pooled.csv").read_text() == before


def test_ranking_on_test_is_refused(tmp_path):
    with pytest.raises(StudyError, match="ranking on test scores is refused"):
        load_study(write_study(tmp_path / "s", select={"part": "test", "metric": "f1_macro"}))
    for bad, message in [
        ({"primary": None}, "primary is required"),
        ({"primary": "kappa"}, "endpoint 'kappa' unknown"),
        ({"baseline": "xception"}, "baseline='xception' is not a condition"),
        ({"folds": 5, "split_seeds": None}, "needs split_seeds"),
        ({"colour": "red"}, "unknown key"),
        ({"select": {"on": "val"}}, "select must be a mapping of"),  # YAML reads a bare `on` as true
    ]:
        with pytest.raises(StudyError, match=message):
            load_study(write_study(tmp_path / "s", **bad))
    with pytest.raises(StudyError, match="no study file"):
        load_study("no_such_study")


@pytest.mark.parametrize("readme", sorted(EXPERIMENTS_DIR.glob("*/README.md")), ids=lambda p: p.parent.name)
def test_study_readme_blocks_match_results(readme):
    results = readme.parent / "results"
    if not results.is_dir():
        pytest.skip("no results")
    assert blocks_in(readme), f"{readme}: numbers from results/ belong in generated blocks"
    assert stale_blocks(readme, results) == [], f"{readme}: run python -m fetalbrain.study NAME --summarise"


def test_statistics_by_definition():
    rng = np.random.default_rng(0)
    true = np.repeat(np.arange(4), 5)
    probs = rng.dirichlet(np.ones(4), size=20)
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    predicted = probs.argmax(axis=1)
    got = st.scores(true, probs)
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(true, predicted))
    assert got["f1_macro"] == pytest.approx(
        f1_score(true, predicted, average="macro", labels=np.unique(np.r_[true, predicted]))
    )
    assert got["auroc_macro"] == pytest.approx(roc_auc_score(true, probs, multi_class="ovr"))
    # corrected resampled t: the textbook numbers (k=5 folds x r=2 repeats, n_test/n_train = 1/4)
    d = np.array([0.02, 0.05, -0.01, 0.04, 0.03, 0.01, 0.06, 0.0, 0.02, 0.03])
    t = d.mean() / np.sqrt((1 / 10 + 0.25) * d.var(ddof=1))
    corrected = st.corrected_resampled_t(d, 0.25)
    assert corrected["t"] == pytest.approx(t)
    half = corrected["t_ci_high"] - d.mean()  # the interval the same standard error gives, t(9) at 97.5 %
    assert half == pytest.approx(2.262157 * np.sqrt((1 / 10 + 0.25) * d.var(ddof=1)), rel=1e-5)
    assert corrected["t_ci_low"] == pytest.approx(d.mean() - half)
    assert st.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert st.binomial_against(147, 176, 0.829, 0.95)["p_binomial"] > 0.05  # 0.835 cannot be told from 0.829
    # case bootstrap: resamples whole cases, stays inside [0, 1]
    cases = np.repeat(np.arange(10), 2)
    resampler = st.CaseResampler(cases, 100, 0)
    for drawn in resampler.draws:  # each drawn case comes with both its images, as often as it was drawn
        counts = np.bincount(drawn, minlength=20)
        assert (counts[0::2] == counts[1::2]).all() and len(drawn) == 20
    value = st.pooled_with_intervals(true, probs[None], resampler, 0.95, ("accuracy",))["accuracy"]
    assert 0 <= value[1] <= value[0] <= value[2] <= 1


def test_write_readme_fills_table_blocks(tmp_path):
    (tmp_path / "results").mkdir()
    pd.DataFrame({"model": ["cnn"], "accuracy": [0.83456]}).to_csv(tmp_path / "results" / "a.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- generated:table:a.csv -->\n<!-- /generated:table:a.csv -->\n")
    write_readme(readme, tmp_path / "results")
    assert "| cnn | 0.835 |" in readme.read_text() and stale_blocks(readme, tmp_path / "results") == []


@pytest.mark.parametrize("study_file", sorted(EXPERIMENTS_DIR.glob("*/study.yaml")), ids=lambda p: p.parent.name)
def test_declared_studies_compose(study_file, tmp_path):
    """Every declared study loads, and each condition's first job composes as fetalbrain.train would run it."""
    study = load_study(study_file)
    assert study.baseline in study.conditions and study.primary in study.endpoints
    for condition in study.conditions:
        first_job = [
            o.split("=")[0] + "=" + o.split("=", 1)[1].split(",")[0] if o.count(",") and "[" not in o else o
            for o in study.grid(condition)
        ]
        with train_config(tmp_path, first_job) as cfg:
            assert cfg.seed == study.seeds[0]
