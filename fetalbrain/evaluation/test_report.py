"""The test report every classification run writes into its directory, and the metrics it adds.

Files: per_class.csv, confusion_matrix.png (counts), confusion_matrix_normalised.png, roc.png,
screening_roc.png, reliability.png,
predictions.csv, and with ``evaluation.ood.enabled`` the out-of-distribution detector ood_detector.pt
with ood_scores.png and ood_scores.csv, and with ``evaluation.external.enabled`` the external normal check's
external_normals.csv and external_normals.png, with ``evaluation.nearest_neighbour.enabled`` the 1-NN
baseline's nearest_neighbour.csv, with ``evaluation.hierarchy.enabled`` hierarchy.csv. Metrics (stable names):
``test/ece``, ``test/nll``, ``calibration/temperature``, ``test/ece_temperature_scaled``,
``test/nll_temperature_scaled``, ``screening/...``, ``shortcut/...``, ``ood/...``, ``external/...``,
``baseline/...`` and ``hierarchy/...`` (see their modules).
"""

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from fetalbrain.data.classes import NORMAL_CLASS, display_name
from fetalbrain.evaluation import baselines, calibration, plots
from fetalbrain.evaluation.external_normals import external_report
from fetalbrain.evaluation.hierarchy import hierarchy_report
from fetalbrain.evaluation.ood import DETECTOR_FILE, ood_report
from fetalbrain.evaluation.screening import abnormal_scores, both_classes, screening_metrics
from fetalbrain.evaluation.shortcut import shortcut_metrics
from fetalbrain.runs.layout import Report, final_checkpoint

log = logging.getLogger(__name__)
FIGURES = ("confusion_matrix", "roc", "screening_roc", "reliability")  # logged to W&B once, at test end


@dataclass
class Predictions:
    """Class probabilities of one part, with the true targets and (for test) the image paths."""

    probs: np.ndarray
    targets: np.ndarray
    paths: list[str] | None = None


def per_class_table(probs: np.ndarray, targets: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predicted, labels=list(range(len(class_names))), zero_division=0
    )
    auroc = [
        roc_auc_score(targets == i, probs[:, i]) if 0 < (targets == i).sum() < len(targets) else np.nan
        for i in range(len(class_names))
    ]
    return pd.DataFrame(
        {
            "class": class_names,
            "name": [display_name(c) for c in class_names],
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "auroc": auroc,
            "support": support,
            "predicted": np.bincount(predicted, minlength=len(class_names)),
        }
    )


def predictions_table(test: Predictions, class_names: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "path": test.paths,
            "true": [class_names[t] for t in test.targets],
            "predicted": [class_names[p] for p in test.probs.argmax(axis=1)],
            "confidence": test.probs.max(axis=1),
        }
    )
    return pd.concat([frame, pd.DataFrame(test.probs, columns=[f"p_{c}" for c in class_names])], axis=1)


def calibration_report(val: Predictions, test: Predictions, n_bins: int, temperature_scaling: bool, out_dir: Path):
    metrics = {
        "test/ece": calibration.expected_calibration_error(test.probs, test.targets, n_bins),
        "test/nll": calibration.negative_log_likelihood(test.probs, test.targets),
    }
    bins_after, ece_after = None, float("nan")
    if temperature_scaling and len(val.targets):
        temperature = calibration.fit_temperature(val.probs, val.targets)
        scaled = calibration.apply_temperature(test.probs, temperature)
        ece_after = calibration.expected_calibration_error(scaled, test.targets, n_bins)
        bins_after = calibration.reliability_bins(scaled, test.targets, n_bins)
        metrics.update(
            {
                "calibration/temperature": temperature,
                "test/ece_temperature_scaled": ece_after,
                "test/nll_temperature_scaled": calibration.negative_log_likelihood(scaled, test.targets),
            }
        )
    plots.reliability_figure(
        calibration.reliability_bins(test.probs, test.targets, n_bins),
        bins_after,
        (metrics["test/ece"], ece_after),
        out_dir / "reliability.png",
    )
    return metrics


def write_test_report(
    out_dir: Path,
    val: Predictions,
    test: Predictions,
    class_names: list[str],
    title: str,
    calibration_bins: int = 15,
    temperature_scaling: bool = True,
    min_sensitivity: float = 0.95,
    shortcut_data: tuple | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Write every file of the report; return the extra metrics and notes on what was not computable."""
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    per_class_table(test.probs, test.targets, class_names).to_csv(out_dir / "per_class.csv", index=False)
    predictions_table(test, class_names).to_csv(out_dir / "predictions.csv", index=False)
    matrix = confusion_matrix(test.targets, test.probs.argmax(axis=1), labels=list(range(len(class_names))))
    plots.confusion_matrix_figure(matrix, class_names, out_dir / "confusion_matrix.png", title)
    plots.confusion_matrix_figure(
        matrix, class_names, out_dir / "confusion_matrix_normalised.png", f"{title} (row-normalised)", True
    )
    plots.roc_figure(test.probs, test.targets, class_names, out_dir / "roc.png")
    absent = [display_name(c) for i, c in enumerate(class_names) if not (test.targets == i).any()]
    if absent:
        notes.append(f"classes absent from the test part: {', '.join(absent)}")
    metrics = calibration_report(val, test, calibration_bins, temperature_scaling, out_dir)
    if NORMAL_CLASS in class_names:
        normal = class_names.index(NORMAL_CLASS)
        screening, screening_notes = screening_metrics(
            (val.probs, val.targets), (test.probs, test.targets), normal, min_sensitivity
        )
        metrics.update(screening)
        notes += screening_notes
        is_abnormal, score = abnormal_scores(test.probs, test.targets, normal)
        if both_classes(is_abnormal):
            points = {k.split("/")[1]: v for k, v in screening.items() if k.endswith("/threshold")}
            plots.screening_figure(is_abnormal, score, points, out_dir / "screening_roc.png")
        if shortcut_data is not None:
            shortcut, shortcut_notes = shortcut_metrics(*shortcut_data, normal)
            metrics.update(shortcut)
            notes += shortcut_notes
    else:
        notes.append(f"no '{NORMAL_CLASS}' class: no screening or shortcut check")
    return metrics, notes


def classification_report(model, trainer, datamodule, run_dir: Path, options) -> Report:
    """Test the best checkpoint (the last weights if there is none) and write the test report.

    The test metrics land in ``trainer.callback_metrics``; the report returns the ones it adds. Under DDP
    every rank tests its share, the classifier gathers the whole test set, and rank 0 alone writes."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best:
        log.warning("No best checkpoint (no checkpoint callback or no validation): testing the last weights")
    with warnings.catch_warnings():  # DDP pads the ranks' shares; the classifier counts each image once
        warnings.filterwarnings("ignore", message="Using `DistributedSampler` with the dataloaders")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
    if not trainer.is_global_zero:  # every rank tested (DDP); the gathered predictions are reported once
        return Report({}, [], {})
    # The test loader is not shuffled: predictions follow the table (a limit_test_batches run
    # predicts only its first rows). Validation predictions (best weights) choose thresholds.
    test = Predictions(model.test_results["probs"].numpy(), model.test_results["targets"].numpy())
    test.paths = list(datamodule.part_table("test")["path"])[: len(test.targets)]
    val = Predictions(*(t.numpy() for t in model.predict_proba(datamodule.val_dataloader())))
    nearest, hierarchy = options.get("nearest_neighbour"), options.get("hierarchy")
    pixels = {}  # the preprocessed train and test images, made once for the shortcut check and the 1-NN baseline
    if options.shortcut_check or (nearest is not None and nearest.enabled):
        pixels = {part: datamodule.preprocessed_images(part) for part in ("train", "test")}
    report_metrics, notes = write_test_report(
        run_dir,
        val,
        test,
        datamodule.class_names,
        title=f"{model.hparams.name} test, split {datamodule.hparams.splitter}",
        calibration_bins=options.calibration_bins,
        temperature_scaling=options.temperature_scaling,
        min_sensitivity=options.screening_min_sensitivity,
        shortcut_data=(pixels["train"], pixels["test"]) if options.shortcut_check else None,
    )
    if nearest is None:  # the config of a run from before the baseline existed
        notes.append("no evaluation.nearest_neighbour in this run's config: no 1-NN baseline")
    elif nearest.enabled:  # the same test images as the model's report (a limited test covers the first rows)
        images, targets = pixels["test"]
        nn_metrics, nn_notes = baselines.nearest_neighbour_report(
            pixels["train"],
            (images[: len(test.targets)], targets[: len(test.targets)]),
            datamodule.class_names,
            nearest,
            (datamodule.part_table("train"), datamodule.part_table("test")),
            run_dir,
        )
        report_metrics.update(nn_metrics)
        notes += nn_notes
    if hierarchy is None:  # the config of a run from before the hierarchical view existed
        notes.append("no evaluation.hierarchy in this run's config: no hierarchical view")
    elif hierarchy.enabled:
        view_metrics, view_notes = hierarchy_report(
            test.probs, test.targets, datamodule.class_names, hierarchy.get("groups"), run_dir
        )
        report_metrics.update(view_metrics)
        notes += view_notes
    figures = {f"test/{name}": run_dir / f"{name}.png" for name in FIGURES if (run_dir / f"{name}.png").is_file()}
    ood = options.get("ood")
    if ood is None:  # the config of a run from before the detector existed (a resumed run keeps its config)
        notes.append("no evaluation.ood in this run's config: no out-of-distribution detector")
    elif ood.enabled:  # the model holds the tested weights: the detector is fitted on the features they give
        checkpoint = best or final_checkpoint(trainer.checkpoint_callback)
        ood_metrics, ood_notes, ood_figures = ood_report(model, datamodule, run_dir, ood, checkpoint)
        report_metrics.update(ood_metrics)
        notes += ood_notes
        figures.update(ood_figures)
    external = options.get("external")
    if external is None:  # the config of a run from before the external check existed
        notes.append("no evaluation.external in this run's config: no external normal check")
    elif external.enabled:  # the tested weights, the thresholds just chosen and the detector just saved
        detector = run_dir / DETECTOR_FILE if (ood is not None and ood.enabled) else None
        external_metrics, external_notes, external_figures = external_report(
            model, run_dir, external, datamodule.class_names, (test.probs, test.targets), report_metrics, detector
        )
        report_metrics.update(external_metrics)
        notes += external_notes
        figures.update(external_figures)
    return Report(report_metrics, notes, figures)
