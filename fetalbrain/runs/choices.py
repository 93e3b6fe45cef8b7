"""What a run chose on its own validation part (screening thresholds, temperature, calibration bins), read back here
alone.
"""

from dataclasses import dataclass, field
from pathlib import Path

from fetalbrain.runs.checkpoints import run_directory
from fetalbrain.runs.layout import CONFIG_FILE, SUMMARY_FILE, read_summary

DEFAULT_CALIBRATION_BINS = 15  # training's evaluation.calibration_bins default, for a checkpoint without its run


# ---- the checkpoint and its run's choices ----------------------------------------------------------------
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


def run_choices(checkpoint: Path) -> RunChoices:
    """The thresholds (``screening/<rule>/threshold``), temperature (``calibration/temperature``) and
    calibration bins of the run the checkpoint belongs to; notes say what is missing or may not fit."""
    from omegaconf import OmegaConf

    choices = RunChoices(checkpoint=checkpoint)
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
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] == "screening" and len(parts) == 3 and parts[2] == "threshold":
            choices.thresholds[parts[1]] = float(value)
    if metrics.get("calibration/temperature") is not None:
        choices.temperature = float(metrics["calibration/temperature"])
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
