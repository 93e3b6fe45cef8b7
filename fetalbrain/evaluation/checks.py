"""The checks of a classification run's test report, as one registered list.

Every check declares how its options are checked (``check_options``: cheap, so ``training.fit`` refuses a bad
setting before anything is built, and again once the data's classes are known) and how it runs on a finished run
(``run``: metrics, notes and figures, as a ``Report``). ``test_report`` runs them in the order of ``CHECKS``: a later
check may read an earlier one's metrics (the external check applies the screening thresholds and the OOD detector
chosen just before it). A new check is its own module plus one entry here.

A check is switched by its section of ``evaluation`` (``evaluation.<key>.enabled``), by a flag
(``evaluation.shortcut_check``), or always runs. The config of a run from before a sectioned check existed (a resumed
run keeps its config) has no section: that check is not run and the report says so in a note.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fetalbrain.data.classes import NORMAL_CLASS
from fetalbrain.evaluation import (
    baselines,
    calibration,
    external_normals,
    hierarchy,
    intervals,
    ood,
    per_class,
    plots,
    screening,
    shortcut,
)
from fetalbrain.progress import step
from fetalbrain.runs.choices import screening_thresholds
from fetalbrain.runs.layout import Report

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """Class probabilities of one part, with the true targets and (for test) the image paths."""

    probs: object  # np.ndarray (images x classes)
    targets: object  # np.ndarray
    paths: list[str] | None = None


@dataclass
class FinishedRun:
    """What a check may read of a run whose best weights were just tested."""

    model: object  # the LightningModule, holding the tested weights
    datamodule: object
    run_dir: Path
    evaluation: object  # the run's ``evaluation`` config
    val: Predictions  # validation predictions of the tested weights: what thresholds and temperature are chosen on
    test: Predictions
    checkpoint: str  # the tested checkpoint
    metrics: dict = field(default_factory=dict)  # the report's metrics so far
    _pixels: dict = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return self.datamodule.class_names

    @property
    def normal(self) -> int | None:
        return self.class_names.index(NORMAL_CLASS) if NORMAL_CLASS in self.class_names else None

    def pixels(self, part: str):
        """The preprocessed images and targets of a part, made once for every check that reads pixels."""
        if part not in self._pixels:
            self._pixels[part] = self.datamodule.preprocessed_images(part)
        return self._pixels[part]


@dataclass(frozen=True)
class Check:
    """One part of the test report. ``key``: its section of ``evaluation`` (``section=True``), its on/off flag
    (``flag=True``), or None when it always runs. ``run(run, options)``, with options its section (else the whole
    ``evaluation``). ``check_options(options, evaluation, class_names)``: refuse bad settings by key; class_names
    is None before the data are read."""

    name: str
    run: Callable[[FinishedRun, object], Report]
    key: str | None = None
    section: bool = False
    check_options: Callable[[object, object, list[str] | None], None] | None = None
    missing: str = ""  # the note when a run's config has no section for the check

    def options(self, evaluation):
        """The check's options when it is on; None when it is off or its section is missing."""
        if self.key is None:
            return evaluation
        value = evaluation.get(self.key)
        if self.section:
            return value if value is not None and value.get("enabled") else None
        return evaluation if value else None


# ---- the checks -------------------------------------------------------------------------------------------------
def _calibration(run: FinishedRun, evaluation) -> Report:
    """ECE and NLL of the test part, before and after the temperature fitted on validation; reliability.png."""
    test, val, bins = run.test, run.val, evaluation.calibration_bins
    metrics = {
        "test/ece": calibration.expected_calibration_error(test.probs, test.targets, bins),
        "test/nll": calibration.negative_log_likelihood(test.probs, test.targets),
    }
    bins_after, ece_after = None, float("nan")
    if evaluation.temperature_scaling and len(val.targets):
        temperature = calibration.fit_temperature(val.probs, val.targets)
        scaled = calibration.apply_temperature(test.probs, temperature)
        ece_after = calibration.expected_calibration_error(scaled, test.targets, bins)
        bins_after = calibration.reliability_bins(scaled, test.targets, bins)
        metrics.update(
            {
                "calibration/temperature": temperature,
                "test/ece_temperature_scaled": ece_after,
                "test/nll_temperature_scaled": calibration.negative_log_likelihood(scaled, test.targets),
            }
        )
    plots.reliability_figure(
        calibration.reliability_bins(test.probs, test.targets, bins),
        bins_after,
        (metrics["test/ece"], ece_after),
        run.run_dir / "reliability.png",
    )
    return Report(metrics, [])


def _screening(run: FinishedRun, evaluation) -> Report:
    """Abnormal vs normal at operating points chosen on validation; screening_roc.png."""
    if run.normal is None:
        return Report({}, [f"no '{NORMAL_CLASS}' class: no screening or shortcut check"])
    metrics, notes = screening.screening_metrics(
        (run.val.probs, run.val.targets),
        (run.test.probs, run.test.targets),
        run.normal,
        evaluation.screening_min_sensitivity,
    )
    is_abnormal, score = screening.abnormal_scores(run.test.probs, run.test.targets, run.normal)
    if screening.both_classes(is_abnormal):
        plots.screening_figure(is_abnormal, score, screening_thresholds(metrics), run.run_dir / "screening_roc.png")
    return Report(metrics, notes)


def _shortcut(run: FinishedRun, evaluation) -> Report:
    """Trivial image-statistics baselines for normal vs abnormal: does "normal" follow the source?"""
    if run.normal is None:  # the screening check says so
        return Report({}, [])
    return Report(*shortcut.shortcut_metrics(run.pixels("train"), run.pixels("test"), run.normal))


def _per_class_recall(run: FinishedRun, options) -> Report:
    """Recall per class with case-bootstrap intervals: per_class_recall.png, and the intervals in per_class.csv."""
    shown = len(run.test.targets)
    cases = run.datamodule.part_table("test")["case"].to_numpy()[:shown]
    predicted = run.test.probs.argmax(axis=1)
    table = per_class.recall_table(run.test.targets, predicted, run.class_names, options.bootstrap, cases)
    per_class_csv = run.run_dir / "per_class.csv"
    written = pd.read_csv(per_class_csv)
    for column in ("recall_ci_low", "recall_ci_high", "cases"):
        written[column] = table[column]
    written.to_csv(per_class_csv, index=False)
    title = f"Recall per class, test part ({options.bootstrap.confidence:.0%} intervals resampling cases)"
    figure = plots.per_class_recall_figure(table, run.run_dir / per_class.FIGURE, title, options.bootstrap.confidence)
    return Report({}, [], {"test/per_class_recall": figure})


def _check_per_class_recall(options, evaluation, class_names) -> None:
    intervals.check_bootstrap(options.get("bootstrap"), "evaluation.per_class_recall.bootstrap")


def _nearest_neighbour(run: FinishedRun, options) -> Report:
    """1-NN on pixels beside the model, on the same test images (a limited test covers the first rows)."""
    images, targets = run.pixels("test")
    shown = len(run.test.targets)
    tables = (run.datamodule.part_table("train"), run.datamodule.part_table("test"))
    return Report(
        *baselines.nearest_neighbour_report(
            run.pixels("train"), (images[:shown], targets[:shown]), run.class_names, options, tables, run.run_dir
        )
    )


def _hierarchy(run: FinishedRun, options) -> Report:
    """Normal vs abnormal, then which anomaly, with grades merged and apart."""
    groups = options.get("groups")
    return Report(*hierarchy.hierarchy_report(run.test.probs, run.test.targets, run.class_names, groups, run.run_dir))


def _ood(run: FinishedRun, options) -> Report:
    """Fit the OOD detector on the tested weights' features; score the test part, OOD images and corruptions."""
    return Report(*ood.ood_report(run.model, run.datamodule, run.run_dir, options, run.checkpoint))


def _external(run: FinishedRun, options) -> Report:
    """The external normal heads at the thresholds just chosen, with the detector just saved (if any)."""
    detector = run.run_dir / ood.DETECTOR_FILE if OOD.options(run.evaluation) is not None else None
    test = (run.test.probs, run.test.targets)
    return Report(
        *external_normals.external_report(run.model, run.run_dir, options, run.class_names, test, run.metrics, detector)
    )


def _check_nearest_neighbour(options, evaluation, class_names) -> None:
    baselines.check_options(options)


def _check_hierarchy(options, evaluation, class_names) -> None:
    hierarchy.check_groups(options.get("groups"), class_names)


def _check_ood(options, evaluation, class_names) -> None:
    ood.check_options(options)


def _check_external(options, evaluation, class_names) -> None:
    external_normals.check_options(options, screening.screening_rules(evaluation.screening_min_sensitivity))


def _section(name: str, run, check_options, what: str) -> Check:
    """A check switched by ``evaluation.<name>.enabled``; ``what``: what it gives, for the note when it is missing."""
    missing = f"no evaluation.{name} in this run's config: no {what}"
    return Check(name, run, key=name, section=True, check_options=check_options, missing=missing)


OOD = _section("ood", _ood, _check_ood, "out-of-distribution detector")
CHECKS = (
    Check("calibration", _calibration),
    Check("screening", _screening),
    Check("shortcut", _shortcut, key="shortcut_check"),
    _section("per_class_recall", _per_class_recall, _check_per_class_recall, "per-class recall chart"),
    _section("nearest_neighbour", _nearest_neighbour, _check_nearest_neighbour, "1-NN baseline"),
    _section("hierarchy", _hierarchy, _check_hierarchy, "hierarchical view"),
    OOD,
    _section("external", _external, _check_external, "external normal check"),
)


def check_options(evaluation, class_names: list[str] | None = None) -> None:
    """Refuse bad settings of every check that will run, naming the key; a check that is off or whose section the
    config lacks is not read, so it is not checked. ``class_names``: the data's, once read."""
    for check in CHECKS:
        options = check.options(evaluation)
        if options is not None and check.check_options is not None:
            check.check_options(options, evaluation, class_names)


def run_checks(run: FinishedRun) -> Report:
    """Run every check that is on, in order; merge their metrics, notes and figures."""
    report = Report(run.metrics, [], {})
    for check in CHECKS:
        options = check.options(run.evaluation)
        if options is None:
            if check.section and run.evaluation.get(check.key) is None:
                report.notes.append(check.missing)
            continue
        with step(f"Report: {check.name}", log):
            result = check.run(run, options)
        report.metrics.update(result.metrics)
        report.notes += result.notes
        report.figures.update(result.figures)
    return report
