"""Batch prediction: ``python -m fetalbrain.predict inputs=FILE_OR_DIR [ckpt=PATH] [out=preds.csv]``.

``ckpt``: a checkpoint or ONNX export, a run folder, or several (a list, or a folder of runs such as a
cross-validation sweep): several are one ensemble averaging calibrated probabilities (fetalbrain/ensemble.py).

One CSV row per file: predicted class, confidence, the abnormal probability and the run's
screening threshold, warnings (low confidence, unlike the training data), all class
probabilities. Every file under the inputs gets a row: one that cannot be predicted (broken symbolic
link, no read permission, not an image, truncated) has its error there, and the rest are still predicted.
"""

import os
import stat
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig
from PIL import Image

from fetalbrain.data.images import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, is_dicom
from fetalbrain.ensemble import load_model
from fetalbrain.inference import NOT_ULTRASOUND, Prediction
from fetalbrain.runs import latest_checkpoint

NOT_AN_IMAGE = "not an image or DICOM file"  # evaluate lists such files as ignored, not as bad images


def _problem(path: Path) -> str | None:
    """Why ``path`` cannot be predicted, or None: a plain check of the entry, never a read of a pipe or device."""
    try:
        mode = path.stat().st_mode  # follows a symbolic link
    except FileNotFoundError:
        if path.is_symlink():
            return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
        return "file not found"
    except OSError as error:  # a loop of symbolic links, a parent folder without permission
        return f"cannot be read ({error.strerror or error})"
    if not stat.S_ISREG(mode):
        return "not a regular file (a pipe, socket or device)"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    if path.suffix.lower() in IMAGE_EXTENSIONS + DICOM_EXTENSIONS:
        return None  # decoding problems (truncated, not really an image) are the reader's to report
    try:
        if is_dicom(path):  # ultrasound machines often write DICOM files without a suffix
            return None
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    return f"{NOT_AN_IMAGE} (suffix {path.suffix or 'none'})"


def input_files(inputs: Path, recursive: bool = True) -> list[tuple[Path, str | None]]:
    """Every entry of a file or folder (searched recursively, following links to folders once), sorted, each
    with None when it is to be predicted or the reason it cannot be: a broken symbolic link, a file without
    read permission, a pipe, a file that is neither an image nor DICOM, a folder that cannot be listed.
    Nothing is left out silently: ``predict`` gives every entry a row. ``recursive=False``: the folder's own
    files only (what the folder-per-class reader reads; ``evaluate`` checks class folders with it)."""
    if not os.path.lexists(inputs):
        raise FileNotFoundError(f"inputs={inputs}: no such file or folder")
    if not inputs.is_dir():
        return [(inputs, _problem(inputs))]
    entries: list[tuple[Path, str | None]] = []
    visited: set[Path] = set()

    def walk(folder: Path) -> None:
        visited.add(folder.resolve())
        try:
            children = sorted(folder.iterdir())
        except OSError as error:
            entries.append((folder, f"folder cannot be read ({error.strerror or error})"))
            return
        for child in children:
            if not child.is_dir():
                entries.append((child, _problem(child)))
            elif recursive and child.resolve() in visited:
                entries.append((child, f"folder already read (a symbolic link to {child.resolve()})"))
            elif recursive:
                walk(child)

    walk(inputs)
    return sorted(entries)


def predictions_frame(predictions: list[Prediction]) -> pd.DataFrame:
    rows = []
    for p in predictions:
        ood = p.out_of_distribution
        row = {
            "file": p.file,
            # An image that is not a fetal brain ultrasound gets no anomaly class as an answer.
            "predicted": None if ood else p.label,
            "name": NOT_ULTRASOUND if ood else p.name,
            "out_of_distribution": ood,
            "ood_score": p.ood_score,
            "ood_threshold": p.ood_threshold,
            "confidence": p.confidence,
            "abnormal_probability": p.abnormal_probability,
            "screening_threshold": p.screening_threshold,
            "screening_positive": p.screening_positive,
            "warnings": "; ".join(p.warnings),
            "error": p.error,
            "seconds": round(p.seconds, 4),
        }
        row.update({f"p_{name}": value for name, value in p.probabilities.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def predict(cfg: DictConfig) -> pd.DataFrame:
    predictor = load_model(
        cfg.ckpt if cfg.ckpt is not None else latest_checkpoint(Path(cfg.paths.log_dir)),  # ckpt=[]: refused
        min_confidence=cfg.min_confidence,
        calibrated=cfg.calibrated,
        screening_rule=cfg.screening_rule,
        heatmaps=bool(cfg.heatmaps),
        verify=cfg.verify,
    )
    entries = input_files(Path(cfg.inputs))
    if not entries:
        raise FileNotFoundError(f"inputs={cfg.inputs}: an empty folder")
    predictions = [
        predictor.predict_file(path) if problem is None else Prediction(file=str(path), error=f"{path}: {problem}")
        for path, problem in entries
    ]
    if cfg.heatmaps:
        folder = Path(cfg.heatmaps)
        folder.mkdir(parents=True, exist_ok=True)
        for p in predictions:
            if p.heatmap is not None:
                Image.fromarray(p.heatmap).save(folder / f"{Path(p.file).stem}_gradcam.png")
    frame = predictions_frame(predictions)
    frame.to_csv(cfg.out, index=False)
    failed = frame[frame["error"].notna()]
    print(
        f"{len(frame) - len(failed)} of {len(frame)} files predicted with {predictor.card['checkpoint']} -> {cfg.out}"
    )
    print(f"  out-of-distribution check: {predictor.ood_status}")
    flagged = int((frame["out_of_distribution"] == True).sum())  # noqa: E712 (None: not checked)
    if flagged:
        print(f"  {flagged} file(s) flagged as {NOT_ULTRASOUND.lower()}: no anomaly class given for them")
    for row in failed.itertuples():
        print(f"  failed: {row.error}")
    return frame


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
