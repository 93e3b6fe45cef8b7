"""compare from W&B: runs read through the W&B API (a fake here, shaped like what fetalbrain logs) make the
same records and group labels as run folders; offline it says so and reads run folders."""

import json

import pandas as pd
import pytest
from omegaconf import OmegaConf, open_dict

from fetalbrain.compare import compare, label_groups, load_run, read_runs
from fetalbrain.evaluation.metrics import COMPARED
from tests.conftest import train_config

SETTINGS = {"0.001": "0.0", "0.0003": "0.1"}  # optimizer.lr -> model.label_smoothing, swept together
SWEEP = [(model, lr, fold) for model in ("cnn", "separable") for lr in SETTINGS for fold in (0, 1)]


def _score(model: str, lr: str, fold: int) -> float:
    return 0.3 + 0.1 * (model == "separable") + 0.05 * (lr == "0.001") + 0.02 * fold


def _label(model: str, lr: str) -> str:
    return f"{model} · grouped · model.label_smoothing={SETTINGS[lr]} · optimizer.lr={lr}"


class FakeRun:
    """What ``wandb.Api().runs()`` yields: the run's config (see ``_logged_config``) and its summary (the
    last value of every logged key, the report's metrics among them)."""

    def __init__(self, run_id: str, config: dict, summary: dict, group: str):
        self.id, self.config, self.summary_metrics, self.group = run_id, config, summary, group
        self.path = ["me", "fetalbrain", run_id]


def _logged_config(folder, overrides: list[str], fold: int = 0) -> dict:
    """The run's W&B config: the resolved config as ``training.fit.build`` logs it (without Hydra's own node, as a
    job sees it), the task, and what Lightning adds at fit start, the data module's and model's
    hyper-parameters at the top level (their normalisation measured on the fold's training part)."""
    with train_config(folder, overrides) as cfg:
        with open_dict(cfg):
            del cfg["hydra"]
        config = OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in config["data"].items() if k not in ("_target_", "_recursive_", "transforms")}
    model = {k: v for k, v in config["model"].items() if not k.startswith("_") and k not in ("optimizer", "scheduler")}
    preprocessing = {"image_size": data["image_size"], "channels": 1, "mean": 0.18 + 0.01 * fold, "std": 0.21}
    return config | {"task": "classification"} | data | model | {"preprocessing": preprocessing}


def _fake_runs(tmp_path) -> list[FakeRun]:
    runs = []
    for index, (model, lr, fold) in enumerate(SWEEP):
        overrides = [
            f"model={model}",
            f"optimizer.lr={lr}",
            f"model.label_smoothing={SETTINGS[lr]}",
            f"data.fold={fold}",
        ]
        config = _logged_config(tmp_path / str(index), overrides, fold)
        value = _score(model, lr, fold)
        summary = {metric: value for metric in COMPARED} | {
            "val/f1_macro_best": value,
            "epoch": 14,
            "trainer/global_step": 420,
            "_step": 30,
            "_runtime": 95.2,
            "confusion_matrix": {"_type": "images/separated", "count": 1},
        }
        runs.append(FakeRun(f"run{index}", config, summary, "sweep-1"))
    generator = _logged_config(tmp_path / "gan", ["model=wgan_gp"])
    runs.append(FakeRun("gan", generator, {"train/critic_loss": -1.0, "_step": 3}, "sweep-1"))
    runs.append(FakeRun("other", runs[0].config, runs[0].summary_metrics, "another-group"))
    return runs


@pytest.fixture(scope="module")
def logged_runs(tmp_path_factory) -> list[FakeRun]:
    return _fake_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture
def fake_wandb(logged_runs, monkeypatch):
    """``wandb.Api`` answering for the project me/fetalbrain; the calls it got."""
    import wandb

    runs, calls = logged_runs, []

    class FakeApi:
        def runs(self, path, filters=None, **kwargs):
            calls.append((path, filters))
            if path != "me/fetalbrain":
                raise ValueError(f"Could not find project {path}")
            return [r for r in runs if not filters or r.group == filters.get("group")]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    return calls


def test_compare_reads_wandb_runs_when_online(tmp_path, monkeypatch, fake_wandb):
    monkeypatch.setenv("WANDB_MODE", "online")
    out = tmp_path / "comparison"
    table = compare([], out, wandb_source="me/fetalbrain", group="sweep-1")
    assert fake_wandb == [("me/fetalbrain", {"group": "sweep-1"})]
    summary = pd.read_csv(out / "comparison.csv")
    f1 = summary[summary["metric"] == "test/f1_macro"].set_index("group")
    expected = {
        _label(model, lr): (_score(model, lr, 0) + _score(model, lr, 1)) / 2
        for model in ("cnn", "separable")
        for lr in SETTINGS
    }
    assert set(f1.index) == set(expected)  # the generator run (no test report) and the other group left out
    for group, mean in expected.items():
        assert f1.loc[group, "n"] == 2 and f1.loc[group, "mean"] == pytest.approx(mean)  # folds 0 and 1 averaged
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["run"]) == [f"run{i}" for i in range(len(SWEEP))] and sorted(runs["fold"]) == [0] * 4 + [1] * 4
    assert f"{_label('separable', '0.001')} | 2 |" in table and "pooled OOF" not in table
    report = (out / "comparison.md").read_text()
    assert "Source: W&B me/fetalbrain, group sweep-1" in report and "compare the run folders" in report
    assert not (out / "per_class_recall.csv").exists()  # needs predictions: only from run folders


def test_wandb_runs_group_like_run_folders(tmp_path, monkeypatch, fake_wandb):
    """The labels W&B records get are the ones the same runs' folders (their overrides) get."""
    from fetalbrain.compare import wandb_runs

    monkeypatch.setenv("WANDB_MODE", "online")
    records = wandb_runs("me/fetalbrain", "sweep-1")
    from_wandb = pd.DataFrame(records)
    folders = pd.DataFrame(
        [
            {
                "model": m,
                "split": "grouped",
                "overrides": [f"optimizer.lr={lr}", f"model.label_smoothing={SETTINGS[lr]}", "trainer.max_epochs=15"],
            }
            for m, lr, _ in SWEEP  # what .hydra/overrides.yaml holds, less data.fold and model= (not settings)
        ]
    )
    assert list(label_groups(from_wandb)) == list(label_groups(folders))
    assert set(records[0]) >= {"run", "model", "split", "fold", "overrides", *COMPARED}
    assert "epoch" in records[0] and "_step" not in records[0] and "confusion_matrix" not in records[0]


def _run_folder(folder, group: str | None):
    """A finished run's folder, as far as reading its record and W&B group goes."""
    (folder / ".hydra").mkdir(parents=True)
    summary = {"run": {"model": "cnn"}, "data": {"split": {"splitter": "grouped"}}, "metrics": {"test/f1_macro": 0.2}}
    (folder / "metrics.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(f"logger:\n  wandb:\n    group: {group or 'null'}\n")
    (folder / ".hydra" / "overrides.yaml").write_text("- model=cnn\n")
    return folder


def test_compare_says_when_wandb_is_offline_and_reads_run_folders(tmp_path, monkeypatch, capsys, fake_wandb):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(FileNotFoundError, match="no run directories"):
        compare([tmp_path / "empty"], tmp_path / "out", wandb_source="me/fetalbrain")
    assert "W&B is offline (WANDB_MODE=offline): reading run folders" in capsys.readouterr().err
    assert fake_wandb == []  # never asked
    sweep = tmp_path / "sweep"
    configured, recorded = _run_folder(sweep / "0", "sweep-1"), _run_folder(sweep / "1", None)
    (recorded / "wandb_run.json").write_text(json.dumps({"id": "abc", "group": "sweep-1"}))
    _run_folder(sweep / "2", "another-group")
    records, source = read_runs([sweep], wandb_source="me/fetalbrain", group="sweep-1")
    assert source == "run folders" and sorted(r["run"] for r in records) == [str(configured), str(recorded)]
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(RuntimeError, match="--wandb-source me/nowhere: cannot read its runs.*Could not find project"):
        compare([], tmp_path / "out", wandb_source="me/nowhere")
    with pytest.raises(FileNotFoundError, match="--group nobody: no W&B run with a test report"):
        compare([], tmp_path / "out", wandb_source="me/fetalbrain", group="nobody")


def test_load_run_keeps_model_keys_as_settings(tmp_path):
    """`model=X` is in the label already; `model.<key>=...` (e.g. a timm net) is a setting of its own."""
    (tmp_path / ".hydra").mkdir()
    summary = {"run": {"model": "timm"}, "data": {"split": {"splitter": "grouped"}}, "metrics": {}}
    (tmp_path / "metrics.json").write_text(json.dumps(summary))
    overrides = ["model=timm", "model.net.name=convnext_nano", "seed=3", "data.split_seed=3", "data.fold=1"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text("\n".join(f"- {o}" for o in overrides))
    assert load_run(tmp_path)["overrides"] == ["model.net.name=convnext_nano"]
