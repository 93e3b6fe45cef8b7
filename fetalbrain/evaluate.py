"""Evaluate a checkpoint on any dataset: ``python -m fetalbrain.evaluate [ckpt=CKPT_OR_RUN] data.root=DIR``.

``ckpt`` may also name several runs (a list, or a folder of runs such as a cross-validation sweep): they are
evaluated as one ensemble (fetalbrain/inference/ensemble.py), the mean of their calibrated probabilities, screened at
the mean of their thresholds.

The same report as a training run's test, on data in any supported layout (Roboflow CSV export, folder
per class, loose unlabelled images), scored with the run's own validation-chosen screening thresholds and
temperature (read from its metrics.json, never fitted again here). Images go through ``Predictor``, the
prediction path of predict, export and the GUI: the checkpoint's integrity is checked and the training
run's preprocessing is applied. Data holding only some classes get what they allow (e.g. only ``normal``:
specificity, the fraction called each class, confidence distributions) and a list of what they do not;
class names the checkpoint does not know are refused before anything is predicted. When the run has an
out-of-distribution detector fitted on the checkpoint (``Predictor.ood_detector``), every image gets its OOD
score from the same forward pass as its class (``eval/ood/...``); otherwise the report says why not (the
predictor's ``ood_status``). Writes metrics.json,
per_class.csv, predictions.csv, figures and report.md to ``out`` (outputs/evaluate/<date>/<time>).
"""

import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from fetalbrain.data.classes import display_name
from fetalbrain.data.evaluation_data import EvaluationData, read_evaluation_data
from fetalbrain.data.images import ImageReadError, read_image
from fetalbrain.data.readers import DatasetError
from fetalbrain.evaluation.any_dataset.markdown import markdown_report
from fetalbrain.evaluation.any_dataset.report import write_evaluation_report
from fetalbrain.evaluation.any_dataset.scoring import OODScores
from fetalbrain.inference.ensemble import Ensemble
from fetalbrain.inference.predictor import BatchScores, Predictor
from fetalbrain.progress import track
from fetalbrain.runs.checkpoints import latest_checkpoint, model_paths
from fetalbrain.runs.choices import run_choices
from fetalbrain.runs.layout import SUMMARY_FILE, write_json

log = logging.getLogger(__name__)
BAD_IMAGE_CHOICES = ("error", "skip")


def _bad_image(entry: dict, on_bad_image: str, skipped: list[dict]) -> None:
    """data.on_bad_image, as in training: an error naming the file, or the file skipped and listed."""
    if on_bad_image == "error":
        raise DatasetError(f"{entry['error']}. Set data.on_bad_image=skip to leave such files out.")
    skipped.append({"path": entry["path"], "error": entry["error"]})


def predict_outputs(
    predictor: "Predictor | Ensemble", paths: list[str], batch_size: int, on_bad_image: str
) -> tuple[BatchScores, list[int], list[dict]]:
    """The model's scores of every readable image (its own preprocessing; probabilities, an ensemble's
    screening score, OOD scores from the same forward pass), the indices read, the files skipped."""
    parts, kept, skipped, batch, batch_index = [], [], [], [], []

    def flush() -> None:
        if batch:
            parts.append(predictor.batch_scores(batch))
            kept.extend(batch_index)
            batch.clear()
            batch_index.clear()

    for index, path in enumerate(track(paths, "Evaluating: reading and scoring images")):
        try:
            gray, _ = read_image(path)
        except ImageReadError as error:
            _bad_image({"path": path, "error": str(error)}, on_bad_image, skipped)
            continue
        batch.append(gray)
        batch_index.append(index)
        if len(batch) == batch_size:
            flush()
    flush()
    if not kept:
        raise DatasetError(f"none of the {len(paths)} images could be read: {skipped[0]['error']}")

    def joined(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else np.concatenate(values)

    return BatchScores(joined("probs"), joined("abnormal"), joined("ood")), kept, skipped


def _parts(split) -> list[str] | None:
    if split is None:
        return None
    return [str(s) for s in split] if isinstance(split, ListConfig | list | tuple) else [str(split)]


def _check_config(cfg: DictConfig) -> None:
    if cfg.data.on_bad_image not in BAD_IMAGE_CHOICES:
        raise ValueError(f"data.on_bad_image={cfg.data.on_bad_image!r}: choose error or skip")
    if int(cfg.batch_size) < 1:
        raise ValueError(f"batch_size={cfg.batch_size}: must be at least 1")
    if int(cfg.bootstrap.samples) < 0:
        raise ValueError(f"bootstrap.samples={cfg.bootstrap.samples}: must be 0 (no intervals) or more")
    if not 0 < float(cfg.bootstrap.confidence) < 1:
        raise ValueError(f"bootstrap.confidence={cfg.bootstrap.confidence}: must lie between 0 and 1")
    if any(not 0 <= float(q) <= 1 for q in cfg.confidence_quantiles):
        raise ValueError(f"confidence_quantiles={list(cfg.confidence_quantiles)}: each must lie in [0, 1]")
    if cfg.calibration_bins is not None and int(cfg.calibration_bins) < 1:
        raise ValueError(f"calibration_bins={cfg.calibration_bins}: must be at least 1, or null for the run's")
    if int(cfg.histogram_bins) < 1:
        raise ValueError(f"histogram_bins={cfg.histogram_bins}: must be at least 1")


def evaluate(cfg: DictConfig, out_dir: Path | None = None) -> dict:
    """Evaluate, write the report into ``out_dir`` (default ``cfg.out``) and return the metrics.json summary."""
    started = time.perf_counter()
    _check_config(cfg)
    given = cfg.ckpt is not None  # ckpt=[] is refused by model_paths, not read as "the newest run"
    checkpoints = model_paths(cfg.ckpt, onnx=False) if given else [latest_checkpoint(Path(cfg.paths.log_dir))]
    if len(checkpoints) == 1:  # the run's own probabilities: it chose its thresholds on them (temperature: below)
        checkpoint = checkpoints[0]
        predictor = Predictor(checkpoint, calibrated=False, heatmaps=False, verify=cfg.verify, heads=False)
        choices = run_choices(checkpoint)
    else:  # the mean of the members' calibrated probabilities (fetalbrain/inference/ensemble.py)
        predictor = Ensemble(checkpoints, heatmaps=False, verify=cfg.verify, heads=False)
        checkpoint, choices = checkpoints[0], predictor.run_choices()
    class_names = list(predictor.class_names)
    data: EvaluationData = read_evaluation_data(cfg.data.root, cfg.data.format, _parts(cfg.data.split), class_names)
    skipped: list[dict] = []
    for entry in data.bad:  # broken links and unreadable entries found while listing: before any prediction
        _bad_image(entry, cfg.data.on_bad_image, skipped)
    log.info("Evaluating %s on %d images of %s (%s)", predictor.card["name"], len(data.paths), data.root, data.format)
    scores, kept, read_skipped = predict_outputs(predictor, data.paths, int(cfg.batch_size), cfg.data.on_bad_image)
    skipped += read_skipped
    ood = OODScores.of(predictor.ood_detector, scores.ood, predictor.ood_status)
    probs = scores.probs
    paths = [data.paths[i] for i in kept]
    targets = None
    if data.labels is not None:
        targets = np.asarray([class_names.index(data.labels[i]) for i in kept])

    out_dir = Path(out_dir or cfg.out)
    bins = int(cfg.calibration_bins) if cfg.calibration_bins is not None else choices.calibration_bins
    report = write_evaluation_report(
        out_dir,
        probs,
        targets,
        paths,
        class_names,
        choices,
        title=f"{predictor.card['name']} on {data.root.name}",
        calibration_bins=bins,
        bootstrap=OmegaConf.to_container(cfg.bootstrap),
        quantiles=[float(q) for q in cfg.confidence_quantiles],
        histogram_bins=int(cfg.histogram_bins),
        ood=ood,
        abnormal=scores.abnormal,
    )
    notes = list(report.notes)
    if skipped:
        notes.append(f"{len(skipped)} unreadable file(s) skipped (data.on_bad_image=skip): see data.skipped_images")
    counts = {}
    if targets is not None:
        counts = {class_names[i]: int(n) for i, n in enumerate(np.bincount(targets, minlength=len(class_names))) if n}
    summary = {
        "metrics": report.metrics,
        "scored": report.scored,
        "not_computable": report.not_computable,
        "run": {  # this folder is an evaluation, not a training run: runs.find_runs(task=...) tells them apart
            "task": "evaluation",
            "seconds": round(time.perf_counter() - started, 1),
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
        },
        "model": {
            "name": predictor.card["name"],
            "checkpoint": str(checkpoint) if len(checkpoints) == 1 else [str(c) for c in checkpoints],
            "run_dir": str(choices.run_dir) if choices.run_dir else None,
            "integrity": predictor.integrity,
            "preprocessing": predictor.card["preprocessing"],
        },
        "applied": {  # from the run, fitted on its validation part: not fitted on the evaluated images
            "thresholds": choices.thresholds,
            "temperature": choices.temperature,
            "calibration_bins": bins,
            "source": choices.source,
            "ood": {**ood.applied(), "run_test_flag_rate": choices.ood_test_flag_rate},
            "ensemble": choices.ensemble,
            "no_temperature": choices.no_temperature if choices.temperature is None else None,
        },
        "data": {
            "root": str(data.root),
            "format": data.format,
            "parts": data.parts,
            "images": len(paths),
            "labelled": targets is not None,
            "class_counts": counts,
            "skipped_images": skipped,
            "ignored_files": data.ignored,
        },
        "bootstrap": {
            **OmegaConf.to_container(cfg.bootstrap),
            "method": "percentile bootstrap, images resampled with replacement",
        },
        "classes": class_names,
        "notes": notes,
        "files": [*report.files, SUMMARY_FILE, "report.md"],
    }
    write_json(out_dir / SUMMARY_FILE, summary)
    (out_dir / "report.md").write_text(markdown_report(summary))
    for note in notes:
        log.warning("Evaluation: %s", note)
    return summary


def _print_summary(summary: dict, out_dir: Path) -> None:
    metrics, data = summary["metrics"], summary["data"]
    labels = ", ".join(f"{display_name(c)} {n}" for c, n in data["class_counts"].items()) or "unlabelled"
    print(f"{data['images']} images ({labels}) evaluated with {summary['model']['checkpoint']}")
    for key in summary["scored"]:
        if "/predicted/" in key:
            continue
        low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        interval = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
        print(f"  {key} {metrics[key]:.3f}{interval}")
    for key, why in summary["not_computable"].items():
        print(f"  not computable: {key}: {why}")
    print(f"report: {out_dir / 'report.md'}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)  # hydra.run.dir is ${out}, resolved once, at start
    _print_summary(evaluate(cfg, out_dir), out_dir)


if __name__ == "__main__":
    main()
