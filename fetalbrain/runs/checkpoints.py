"""Finding a run's checkpoints: a file, a run folder, a list, a sweep folder, the newest run: resolved here alone."""

from pathlib import Path

from omegaconf import ListConfig

from fetalbrain.runs.layout import CHECKPOINT_DIR, DEFAULT_LOG_DIR, SUMMARY_FILE, find_runs, read_summary, task_of


def read_checkpoint(checkpoint: str | Path) -> dict:
    """A checkpoint's contents, read with weights_only: a checkpoint never runs pickled code."""
    import torch

    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def run_directory(checkpoint: str | Path) -> Path:
    """Checkpoints live in ``<run>/checkpoints/``."""
    return Path(checkpoint).resolve().parent.parent


def run_folders(checkpoint: str | Path) -> list[tuple[Path, Path]]:
    """(run folder, checkpoint) for a checkpoint inside ``<run>/checkpoints/``: as given, then where a symbolic link
    points (each once); empty when neither sits in a run's checkpoints folder."""
    paths = dict.fromkeys((Path(checkpoint).absolute(), Path(checkpoint).resolve()))
    return [(path.parent.parent, path) for path in paths if path.parent.name == CHECKPOINT_DIR]


def best_checkpoint(run_dir: Path, summary: dict) -> Path | None:
    """The run's best checkpoint on disk: in its own ``checkpoints/`` (a run moved or copied elsewhere), else the
    path its summary records; None if neither is there."""
    recorded = summary.get("run", {}).get("best_checkpoint") or ""
    if not recorded:
        return None
    for candidate in (Path(run_dir) / CHECKPOINT_DIR / Path(recorded).name, Path(recorded)):
        if candidate.is_file():
            return candidate
    return None


def available_runs(log_dir: str | Path = DEFAULT_LOG_DIR, task: str = "classification") -> list[dict]:
    """Finished runs of a task with their best checkpoint on disk, newest first."""
    runs = []
    for run_dir in find_runs([log_dir], task):
        summary = read_summary(run_dir)
        checkpoint = best_checkpoint(run_dir, summary)
        if checkpoint is not None:
            modified = (run_dir / SUMMARY_FILE).stat().st_mtime
            runs.append(
                {"run_dir": run_dir, "checkpoint": checkpoint, "model": summary["run"]["model"], "modified": modified}
            )
    return sorted(runs, key=lambda r: r["modified"], reverse=True)


def latest_checkpoint(log_dir: str | Path = DEFAULT_LOG_DIR, task: str = "classification") -> Path:
    runs = available_runs(log_dir, task)
    if not runs:
        raise FileNotFoundError(
            f"no trained run with a checkpoint under {log_dir} (a {task} run is needed): train one or pass ckpt=PATH"
        )
    return runs[0]["checkpoint"]


def model_paths(spec, onnx: bool = True) -> list[Path]:
    """The checkpoints ``spec`` names (see the module docstring), in a stable order, each once. ``onnx=False``
    refuses exports (evaluate needs the runs' metrics.json)."""
    specs = list(spec) if isinstance(spec, list | tuple | ListConfig) else [spec]
    if not specs:
        raise ValueError("ckpt=[]: name at least one checkpoint, run folder or folder of runs")
    paths: list[Path] = []
    for item in specs:
        path = Path(str(item))
        if path.suffix == ".onnx" and onnx:
            if not path.is_file():
                raise FileNotFoundError(f"ckpt={item}: no such file")
            found = [path]
        elif path.is_dir() and not (path / SUMMARY_FILE).is_file():  # a sweep: its classification runs
            runs = find_runs([path], task="classification")
            if not runs:
                raise FileNotFoundError(f"ckpt={item}: a folder with no finished classification run under it")
            found = [resolve_checkpoint(run) for run in runs]
        else:
            found = [resolve_checkpoint(path)]
        paths += [p for p in found if p.resolve() not in {q.resolve() for q in paths}]
    return paths


def resolve_checkpoint(ckpt: str | Path) -> Path:
    """A checkpoint as given, or a run folder's best checkpoint: the one in its own ``checkpoints/`` (a run moved or
    copied elsewhere), else the path its metrics.json records."""
    path = Path(ckpt)
    if path.suffix == ".onnx":
        raise ValueError(
            f"ckpt={ckpt}: an ONNX export carries one screening threshold, not its run's metrics.json; evaluate "
            "needs the run's checkpoint (.ckpt) or its run folder"
        )
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"ckpt={ckpt}: no such checkpoint or run folder")
    if not (path / SUMMARY_FILE).is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: a folder but not a finished run (no {SUMMARY_FILE}); pass a .ckpt")
    summary = read_summary(path)
    if task_of(summary) != "classification":
        raise ValueError(f"ckpt={ckpt}: a {task_of(summary)} run, not a classification run")
    found = best_checkpoint(path, summary)
    if found is not None:
        return found
    recorded = summary.get("run", {}).get("best_checkpoint") or ""
    raise FileNotFoundError(f"ckpt={ckpt}: its best checkpoint {recorded or '(none recorded)'} is not on disk")
