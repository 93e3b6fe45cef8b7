"""The test report every classification run writes into its directory, and the metrics it adds.

The best checkpoint is tested; its tables and figures are written here, then every check of
``evaluation.checks.CHECKS`` that is on runs on the finished run (calibration, screening, shortcut, per-class
recall, nearest neighbour, hierarchy, OOD, external normals).

Files: per_class.csv, predictions.csv (test) and val_predictions.csv (validation, best weights: what a study
chooses on), each with the image's source, case and split group, confusion_matrix.png (counts),
confusion_matrix_normalised.png, roc.png, screening_roc.png, reliability.png,
per_class_recall.png, and with ``evaluation.ood.enabled`` the
out-of-distribution detector ood_detector.pt with ood_scores.png and ood_scores.csv, and with
``evaluation.external.enabled`` the external normal check's external_normals.csv and external_normals.png, with
``evaluation.nearest_neighbour.enabled`` the 1-NN baseline's nearest_neighbour.csv, with
``evaluation.hierarchy.enabled`` hierarchy.csv. Metrics (stable names): ``test/ece``, ``test/nll``,
``calibration/temperature``, ``test/ece_temperature_scaled``, ``test/nll_temperature_scaled``, ``screening/...``,
``shortcut/...``, ``ood/...``, ``external/...``, ``baseline/...`` and ``hierarchy/...`` (see their modules).
"""

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from fetalbrain.data.classes import display_name
from fetalbrain.evaluation import plots
from fetalbrain.evaluation.checks import FinishedRun, Predictions, run_checks
from fetalbrain.progress import step
from fetalbrain.runs.layout import Report, final_checkpoint

log = logging.getLogger(__name__)
FIGURES = ("confusion_matrix", "roc", "screening_roc", "reliability")  # logged to W&B once, at test end


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


GROUP_COLUMNS = ("source", "case", "group")  # what a case-level bootstrap or a pooled study resamples


def predictions_table(test: Predictions, class_names: list[str], rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per image: path, true and predicted class, confidence, the class probabilities and, given the
    part's rows of the data table, the image's source, case and split group."""
    frame = pd.DataFrame(
        {
            "path": test.paths,
            "true": [class_names[t] for t in test.targets],
            "predicted": [class_names[p] for p in test.probs.argmax(axis=1)],
            "confidence": test.probs.max(axis=1),
        }
    )
    if rows is not None:
        groups = rows.reset_index(drop=True).iloc[: len(frame)]
        for column in GROUP_COLUMNS:
            if column in groups:
                frame[column] = groups[column].to_numpy()
    return pd.concat([frame, pd.DataFrame(test.probs, columns=[f"p_{c}" for c in class_names])], axis=1)


def write_test_files(
    out_dir: Path, test: Predictions, class_names: list[str], title: str, rows: pd.DataFrame | None = None
) -> list[str]:
    """The per-image and per-class tables, confusion matrices and ROC of the test part; notes on absent classes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_class_table(test.probs, test.targets, class_names).to_csv(out_dir / "per_class.csv", index=False)
    predictions_table(test, class_names, rows).to_csv(out_dir / "predictions.csv", index=False)
    matrix = confusion_matrix(test.targets, test.probs.argmax(axis=1), labels=list(range(len(class_names))))
    plots.confusion_matrix_figure(matrix, class_names, out_dir / "confusion_matrix.png", title)
    plots.confusion_matrix_figure(
        matrix, class_names, out_dir / "confusion_matrix_normalised.png", f"{title} (row-normalised)", True
    )
    plots.roc_figure(test.probs, test.targets, class_names, out_dir / "roc.png")
    absent = [display_name(c) for i, c in enumerate(class_names) if not (test.targets == i).any()]
    return [f"classes absent from the test part: {', '.join(absent)}"] if absent else []


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
    with step("Report: validation predictions (the thresholds and temperature are chosen on them)", log):
        val = Predictions(*(t.numpy() for t in model.predict_proba(datamodule.val_dataloader())))
    val_rows = datamodule.part_table("val")  # the validation loader is not shuffled either
    val.paths = list(val_rows["path"])[: len(val.targets)]
    predictions_table(val, datamodule.class_names, val_rows).to_csv(run_dir / "val_predictions.csv", index=False)
    title = f"{model.hparams.name} test, split {datamodule.hparams.splitter}"
    notes = write_test_files(run_dir, test, datamodule.class_names, title, datamodule.part_table("test"))
    # The model holds the tested weights: the OOD detector is fitted on the features they give.
    checkpoint = best or final_checkpoint(trainer.checkpoint_callback)
    report = run_checks(FinishedRun(model, datamodule, run_dir, options, val, test, checkpoint))
    figures = {f"test/{name}": run_dir / f"{name}.png" for name in FIGURES if (run_dir / f"{name}.png").is_file()}
    return Report(report.metrics, notes + report.notes, {**figures, **report.figures})
