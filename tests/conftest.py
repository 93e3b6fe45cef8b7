"""Shared fixtures: the embedded dataset, small exports cut from it, and Hydra config composition."""

import os
import tempfile

os.environ.update(
    HF_HUB_OFFLINE="1",
    WANDB_MODE="offline",
    NO_ALBUMENTATIONS_UPDATE="1",
    GRADIO_ANALYTICS_ENABLED="False",
    WANDB_SILENT="true",
    # Each test process its own gradio file cache: a server closing in one worker must not delete the files
    # another worker's server is sending (they share /tmp/gradio otherwise).
    GRADIO_TEMP_DIR=tempfile.mkdtemp(prefix="fetalbrain-tests-gradio-"),
)

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "fetal-brain-ultrasound"
CONF = ROOT / "conf"

# The machine's cores shared among the test workers (make test runs one per core): no oversubscription.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 2) // WORKERS)))

# A few batches of 32 px images, one epoch, on the CPU: the whole path, in seconds.
TINY = [
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "+trainer.enable_progress_bar=false",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "logger=none",
    "callbacks=minimal",
    "evaluation.ood.enabled=false",  # the OOD detector's fit and test set: on in trained_checkpoint, tests/test_ood.py
    "evaluation.external.enabled=false",  # 895 external normals: on in trained_checkpoint, tests/test_external_check.py
    "evaluation.shortcut_check=false",  # a quarter of a tiny run: on in test_train's model families, test_evaluation
]


# The longest test files (`pytest --durations=0`, summed per file), longest first. `make test` hands whole files to
# its two workers in collection order (--dist loadfile --no-loadscope-reorder): starting with the long ones lets
# both workers finish together instead of one running a long file alone at the end.
LONGEST_FILES_FIRST = [  # measured 2026-12-02 (make test, idle 2-core machine): 81 s ... 7 s
    "test_train.py",
    "test_synthetic_data.py",
    "test_study.py",
    "test_benchmark.py",
    "test_optuna.py",
    "test_resume.py",
    "test_inference.py",
    "test_ddp.py",
    "test_ensemble.py",
    "test_launchers.py",
    "test_configs.py",
    "test_levers.py",
    "test_app.py",
    "test_harmonise.py",
    "test_help.py",
    "test_evaluate.py",
    "test_splits.py",
    "test_head_finder.py",
]


def pytest_collection_modifyitems(items):
    """Longest files first (see LONGEST_FILES_FIRST); the order within a file and of the rest is kept."""
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def run_main(module: str, *arguments: str) -> str:
    """``python -m fetalbrain.<module> ...`` in this process, from the repository: the same Hydra command-line
    parsing, config search path and task function as the command, without a new interpreter's start (torch and
    Lightning: seconds). Fails on a non-zero exit with what the command printed; returns its stdout. Hydra's
    global state, the working directory, sys.argv, the root logger's handlers and torch's thread count are
    restored afterwards."""
    import contextlib
    import io
    import logging
    import runpy
    import warnings

    saved_argv, saved_cwd, threads = sys.argv, os.getcwd(), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    GlobalHydra.instance().clear()
    try:
        os.chdir(ROOT)
        sys.argv = [f"fetalbrain/{module}.py", *arguments]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:  # as `python -m`: the module runs as __main__, so Hydra finds conf/ beside its file
                with warnings.catch_warnings():  # runpy notes the module was imported before: it is, by the tests
                    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package")
                    runpy.run_module(f"fetalbrain.{module}", run_name="__main__", alter_sys=True)
            except SystemExit as exit_:
                assert exit_.code in (0, None), f"exit {exit_.code}: {(out.getvalue() + err.getvalue())[-3000:]}"
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # a multirun's config must not outlive it
        torch.set_num_threads(threads)
        for handler in root.handlers:  # Hydra's job logging: a file handler and one pointed at the capture
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:], root.level = saved_handlers, saved_level
    return out.getvalue()


def run_cli(module: str, *arguments: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``python -m fetalbrain.<module> ...`` from the repository as a user would; fail on errors."""
    result = subprocess.run(
        [sys.executable, "-m", f"fetalbrain.{module}", *arguments],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_split_csv(split: str) -> pd.DataFrame:
    frame = pd.read_csv(DATA / split / "_classes.csv", skipinitialspace=True)
    frame.columns = [c.strip() for c in frame.columns]
    return frame


def write_split_csv(frame: pd.DataFrame, path: Path) -> None:
    """The Roboflow format: a space after each comma, header included."""
    lines = [", ".join(frame.columns)] + [", ".join(str(v) for v in row) for row in frame.itertuples(index=False)]
    path.write_text("\n".join(lines) + "\n")


def make_export(dst: Path, per_class: int = 2) -> Path:
    """A small Roboflow export: up to ``per_class`` images of each class in each split."""
    for split in ("train", "valid", "test"):
        frame = read_split_csv(split)
        label = frame.iloc[:, 1:].to_numpy().argmax(axis=1)
        keep = frame.groupby(label, group_keys=False).head(per_class)
        (dst / split).mkdir(parents=True)
        for name in keep["filename"]:
            shutil.copyfile(DATA / split / name, dst / split / name)
        write_split_csv(keep, dst / split / "_classes.csv")
    return dst


@pytest.fixture
def small_export(tmp_path) -> Path:
    return make_export(tmp_path / "export")


@contextmanager
def train_config(output_dir: Path, overrides: list[str] = ()):
    """Compose conf/train.yaml as `python -m fetalbrain.train` would, writing into ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.num = 0
        HydraConfig().set_config(cfg)
        try:
            yield cfg
        finally:
            GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A tiny EfficientNet-Lite0 run on the embedded data: checkpoint plus its run directory. Trained once per
    session: with parallel workers (``make test``) the first worker trains it, the others wait and reuse it."""
    from filelock import FileLock

    from fetalbrain.training.fit import train

    parallel = os.environ.get("PYTEST_XDIST_WORKER") is not None
    shared = tmp_path_factory.getbasetemp().parent if parallel else tmp_path_factory.getbasetemp()
    # alone in its folder: tests that look for the newest run there find this one
    run_dir, recorded = shared / "trained" / "run", shared / "trained" / "checkpoint.txt"
    with FileLock(str(shared / "trained.lock")):
        if not recorded.is_file():
            overrides = [
                *TINY,
                "model=efficientnet_lite0",
                "data.image_size=64",
                "evaluation.ood.enabled=true",
                "evaluation.external.enabled=true",
            ]
            run_dir.mkdir(parents=True, exist_ok=True)  # a worker before may have failed in it
            with train_config(run_dir, overrides) as cfg:
                summary, _ = train(cfg)
            recorded.write_text(summary["run"]["best_checkpoint"])
    return Path(recorded.read_text())


def enormous_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A valid PNG header announcing a huge image, without the gigabytes: decoders must refuse it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def bad_files(folder: Path) -> dict[str, Path]:
    """One file of every kind the apps must refuse with a clear message."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.jpg"
    text.write_text("this is not an image")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(next(DATA.glob("test/*.jpg")).read_bytes()[:400])
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    return {
        "not an image": text,
        "truncated": truncated,
        "empty": empty,
        "enormous": enormous_png(folder / "enormous.png"),
    }
