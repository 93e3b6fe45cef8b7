"""What a run chose, read back here alone: on its validation part the screening thresholds
(``screening/<rule>/threshold``) and the temperature (``calibration/temperature``) in its metrics.json, the
calibration bins in its config.yaml, and in the checkpoint its preprocessing and test-time augmentation.

``evaluate``, ``predict``, the GUI, ensembles, exports and the report's external check apply these as they are:
nothing is fitted again on the images they score.
"""

from dataclasses import dataclass, field
from pathlib import Path

from fetalbrain.runs.checkpoints import run_directory
from fetalbrain.runs.layout import CONFIG_FILE, SUMMARY_FILE, read_summary

DEFAULT_CALIBRATION_BINS = 15  # training's evaluation.calibration_bins default, for a checkpoint without its run
TEMPERATURE = "calibration/temperature"


def screening_thresholds(metrics: dict) -> dict[str, float]:
    """The screening thresholds (``screening/<rule>/threshold``, chosen on validation) by rule, from a run's
    metrics (its metrics.json, or the report's metrics while it is written)."""
    thresholds = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] == "screening" and len(parts) == 3 and parts[2] == "threshold":
            thresholds[parts[1]] = float(value)
    return thresholds


@dataclass
class RunChoices:
    """What the checkpoint's run fitted on its validation part, and where that was read."""

    checkpoint: Path
    run_dir: Path | None = None
    thresholds: dict[str, float] = field(default_factory=dict)  # screening rule -> abnormal-probability threshold
    temperature: float | None = None
    calibration_bins: int = DEFAULT_CALIBRATION_BINS
    source: str | None = None  # the metrics.json the values come from
    ood_test_flag_rate: float | None = None  # the run's own test part flagged by its OOD detector
    notes: list[str] = field(default_factory=list)
    no_temperature: str = "needs the run's temperature, which was not found"  # why, when temperature is None
    ensemble: str | None = None  # for several checkpoints: how their outputs and choices are combined
    preprocessing: dict | None = None  # the checkpoint's (``model.preprocessing``), when its contents were given
    tta: str = "none"  # the checkpoint's ``model.tta``
    metrics: dict = field(default_factory=dict)  # the run's metrics.json metrics, as read


def run_choices(checkpoint: Path, state: dict | None = None) -> RunChoices:
    """The thresholds, temperature and calibration bins of the run the checkpoint belongs to; notes say what is
    missing or may not fit. ``state``: the checkpoint's contents, when read already (``read_checkpoint``), for
    its preprocessing and test-time augmentation."""
    from omegaconf import OmegaConf

    choices = RunChoices(checkpoint=checkpoint)
    if state is not None:
        hparams = state["hyper_parameters"]
        choices.preprocessing, choices.tta = hparams["preprocessing"], hparams.get("tta", "none")
    run_dir = run_directory(checkpoint)
    if not (run_dir / SUMMARY_FILE).is_file():
        choices.notes.append(
            f"no {SUMMARY_FILE} in {run_dir} (the checkpoint is not inside its run folder): the run's screening "
            "thresholds and temperature are unknown, so nothing is scored at them"
        )
        return choices
    summary = read_summary(run_dir)
    metrics = summary.get("metrics") or {}
    choices.run_dir, choices.source = run_dir, str(run_dir / SUMMARY_FILE)
    choices.metrics, choices.thresholds = metrics, screening_thresholds(metrics)
    if metrics.get(TEMPERATURE) is not None:
        choices.temperature = float(metrics[TEMPERATURE])
    if metrics.get("ood/test_flag_rate") is not None:
        choices.ood_test_flag_rate = float(metrics["ood/test_flag_rate"])
    if (run_dir / CONFIG_FILE).is_file():
        bins = OmegaConf.select(OmegaConf.load(run_dir / CONFIG_FILE), "evaluation.calibration_bins")
        choices.calibration_bins = int(bins) if bins is not None else DEFAULT_CALIBRATION_BINS
    best = Path(summary.get("run", {}).get("best_checkpoint") or "").name
    if best and best != checkpoint.name:
        choices.notes.append(
            f"the run fitted its thresholds and temperature with {best}'s validation predictions; {checkpoint.name} "
            "is another checkpoint of that run, so they may not suit it"
        )
    return choices
