"""Batch prediction: ``python -m fetalbrain.predict inputs=FILE_OR_DIR [ckpt=PATH] [out=preds.csv]``.

``ckpt``: a checkpoint or ONNX export, a run folder, or several (a list, or a folder of runs such as a
cross-validation sweep): several are one ensemble averaging calibrated probabilities (fetalbrain/inference/ensemble.py).

One CSV row per file: predicted class, confidence, the abnormal probability and the run's
screening threshold, warnings (low confidence, unlike the training data), the fetal head the finder found (its
confidence, or why none; the head circumference in pixels, and in mm for a DICOM that gives its pixel spacing), all
class probabilities. An image flagged as not an ultrasound, or with no fetal head found, gets no class as answer.
Every file under the inputs gets a row: one that cannot be predicted (broken symbolic
link, no read permission, not an image, truncated) has its error there, and the rest are still predicted.
"""

from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig
from PIL import Image

from fetalbrain.data.inputs import input_files
from fetalbrain.inference.ensemble import load_model
from fetalbrain.inference.predictor import NO_HEAD, NOT_ULTRASOUND, Prediction, predictions_frame
from fetalbrain.progress import track
from fetalbrain.runs.checkpoints import latest_checkpoint


def predict(cfg: DictConfig) -> pd.DataFrame:
    predictor = load_model(
        cfg.ckpt if cfg.ckpt is not None else latest_checkpoint(Path(cfg.paths.log_dir)),  # ckpt=[]: refused
        min_confidence=cfg.min_confidence,
        calibrated=cfg.calibrated,
        screening_rule=cfg.screening_rule,
        heatmaps=bool(cfg.heatmaps),
        verify=cfg.verify,
        heads=cfg.heads,
    )
    entries = input_files(Path(cfg.inputs))
    if not entries:
        raise FileNotFoundError(f"inputs={cfg.inputs}: an empty folder")
    predictions = [
        predictor.predict_file(path) if problem is None else Prediction(file=str(path), error=f"{path}: {problem}")
        for path, problem in track(entries, "Predicting")
    ]
    if cfg.heatmaps:
        folder = Path(cfg.heatmaps)
        folder.mkdir(parents=True, exist_ok=True)
        for p in predictions:
            if p.heatmap is not None:
                Image.fromarray(p.heatmap).save(folder / f"{Path(p.file).stem}_gradcam.png")
            if p.head_outline is not None:
                Image.fromarray(p.head_outline).save(folder / f"{Path(p.file).stem}_head.png")
    frame = predictions_frame(predictions)
    frame.to_csv(cfg.out, index=False)
    failed = frame[frame["error"].notna()]
    print(
        f"{len(frame) - len(failed)} of {len(frame)} files predicted with {predictor.card['checkpoint']} -> {cfg.out}"
    )
    print(f"  out-of-distribution check: {predictor.ood_status}")
    print(f"  head finder: {predictor.head_status}")
    flagged = int((frame["out_of_distribution"] == True).sum())  # noqa: E712 (None: not checked)
    if flagged:
        print(f"  {flagged} file(s) flagged as {NOT_ULTRASOUND.lower()}: no anomaly class given for them")
    headless = int((frame["head_framed"] == False).sum())  # noqa: E712 (None: no finder)
    if headless:
        print(f"  {headless} file(s) with {NO_HEAD.lower()}: no anomaly class given for them (head_reason says why)")
    for row in failed.itertuples():
        print(f"  failed: {row.error}")
    return frame


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
