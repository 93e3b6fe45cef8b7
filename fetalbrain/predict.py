"""Batch prediction: ``python -m fetalbrain.predict inputs=FILE_OR_DIR [ckpt=PATH] [out=preds.csv]``.

One CSV row per file: predicted class, confidence, the abnormal probability and the run's
screening threshold, warnings (low confidence, unlike the training data), all class
probabilities; unreadable files get a row with their error and the rest are still predicted.
"""

from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig
from PIL import Image

from fetalbrain.data.images import DICOM_EXTENSIONS, IMAGE_EXTENSIONS
from fetalbrain.inference import Prediction, Predictor
from fetalbrain.runs import latest_checkpoint


def input_files(inputs: Path) -> list[Path]:
    """A file as given, or every image/DICOM file under a folder."""
    if inputs.is_file():
        return [inputs]
    if not inputs.is_dir():
        raise FileNotFoundError(f"inputs={inputs}: no such file or folder")
    suffixes = IMAGE_EXTENSIONS + DICOM_EXTENSIONS
    return sorted(p for p in inputs.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def predictions_frame(predictions: list[Prediction]) -> pd.DataFrame:
    rows = []
    for p in predictions:
        row = {
            "file": p.file,
            "predicted": p.label,
            "name": p.name,
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
    checkpoint = Path(cfg.ckpt) if cfg.ckpt else latest_checkpoint(Path(cfg.paths.log_dir))
    predictor = Predictor(
        checkpoint,
        cfg.min_confidence,
        cfg.calibrated,
        screening_rule=cfg.screening_rule,
        heatmaps=bool(cfg.heatmaps),
        verify=cfg.verify,
    )
    files = input_files(Path(cfg.inputs))
    if not files:
        raise FileNotFoundError(f"inputs={cfg.inputs}: no image or DICOM files found")
    predictions = predictor.predict_files(files)
    if cfg.heatmaps:
        folder = Path(cfg.heatmaps)
        folder.mkdir(parents=True, exist_ok=True)
        for p in predictions:
            if p.heatmap is not None:
                Image.fromarray(p.heatmap).save(folder / f"{Path(p.file).stem}_gradcam.png")
    frame = predictions_frame(predictions)
    frame.to_csv(cfg.out, index=False)
    failed = frame[frame["error"].notna()]
    print(f"{len(frame) - len(failed)} of {len(frame)} files predicted with {checkpoint.name} -> {cfg.out}")
    for row in failed.itertuples():
        print(f"  failed: {row.error}")
    return frame


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
