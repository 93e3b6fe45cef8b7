"""A 2x2 Hydra multirun from the command line: 4 run directories and 4 separate W&B offline runs."""

import json

import pytest

from tests.conftest import TINY, run_cli


@pytest.mark.slow  # the fast suite runs in-process multiruns elsewhere (compare, DDP, resume, Optuna, launchers)
def test_two_by_two_multirun_writes_four_runs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_cli(
        "train",
        "-m",
        "model=cnn,separable",
        "optimizer.lr=0.001,0.0003",
        *[o for o in TINY if not o.startswith("logger=")],
        "logger=wandb",
        f"hydra.sweep.dir={sweep_dir}",
    )
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        summary = json.loads((job / "metrics.json").read_text())
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        seen.add((summary["run"]["model"], "0.0003" in overrides))
        assert "test/f1_macro" in summary["metrics"]
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1
    assert seen == {("cnn", False), ("cnn", True), ("separable", False), ("separable", True)}
    run_ids = {next((job / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[-1] for job in jobs}
    assert len(run_ids) == 4  # each job is its own W&B run
