"""report.md of an evaluation on any dataset: what was evaluated with what, the numbers with intervals, what could
not be computed.
"""

from pathlib import Path

import numpy as np

from fetalbrain.data.classes import display_name
from fetalbrain.evaluation.any_dataset.scoring import OOD_FLAG_RATE, OOD_SCORE, OOD_THRESHOLD, PREFIX, _fraction_key
from fetalbrain.evaluation.metrics import STAGE_METRICS

METRIC_LABELS = {
    **{f"{PREFIX}{name}": label for name, (label, _, _) in STAGE_METRICS.items()},
    f"{PREFIX}ece": "ECE",
    f"{PREFIX}nll": "NLL",
    f"{PREFIX}ece_temperature_scaled": "ECE at the run's temperature",
    f"{PREFIX}nll_temperature_scaled": "NLL at the run's temperature",
    f"{PREFIX}screening_auroc": "screening AUROC (abnormal vs normal)",
    f"{PREFIX}screening": "screening",
    f"{PREFIX}screening/<rule>": "screening at the run's thresholds",
    OOD_FLAG_RATE: "flagged not a fetal brain ultrasound (OOD)",
    OOD_THRESHOLD: "OOD threshold (the run's)",
}


def metric_label(key: str) -> str:
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    parts = key.removeprefix(PREFIX).split("/")
    if parts[0] == "screening" and len(parts) == 3:
        return {"flagged": "flagged abnormal", "sensitivity": "sensitivity", "specificity": "specificity"}.get(
            parts[2], parts[2]
        ) + f" at the {parts[1]} threshold"
    return key


def _fmt(value) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _ood_section(summary: dict) -> list[str]:
    """Is it a fetal brain ultrasound? The run's OOD detector on these images, and what its flag rate means here."""
    metrics, ood = summary["metrics"], summary["applied"].get("ood") or {}
    lines = ["", "## Is it a fetal brain ultrasound? (the run's OOD detector)", ""]
    if OOD_FLAG_RATE not in metrics:
        why = ood.get("status", "none was applied")
        return lines + [f"No OOD scores, so no image is checked. The run's OOD detector for this checkpoint: {why}."]
    low, high = metrics.get(f"{OOD_FLAG_RATE}_ci_low"), metrics.get(f"{OOD_FLAG_RATE}_ci_high")
    interval = f" (interval {_fmt(low)} – {_fmt(high)})" if low is not None else ""
    reference = []
    if ood.get("keep_in_distribution") is not None:
        reference.append(f"{1 - ood['keep_in_distribution']:.0%} of the run's validation images by construction")
    if ood.get("run_test_flag_rate") is not None:
        reference.append(f"{ood['run_test_flag_rate']:.1%} of its test images")
    lines += [
        f"Detector: {ood['status']}. The score is how unlike the run's training images an image is, in the "
        "network's penultimate features; above the threshold (chosen on the run's validation part, not on these "
        "images) an image is flagged as not a fetal brain ultrasound.",
        "",
        f"**{metrics[OOD_FLAG_RATE]:.1%} of these {summary['data']['images']} images are flagged**{interval}"
        + (f"; the threshold flags {' and '.join(reference)}." if reference else "."),
        "Flagged images are marked in `predictions.csv` (`ood_score`, `ood_flagged`): their predicted classes are "
        "no answer.",
    ]
    if summary["data"]["labelled"]:
        lines += [
            "",
            "These images are labelled, so they are meant to be fetal brain ultrasound: here the flag rate says "
            "whether the detector knows fetal brain ultrasound or only its training source. A high rate on a real "
            "hospital's scans says the detector (and the model) is source-bound: it learnt the acquisition of its "
            "training images, not fetal brain anatomy.",
        ]
    return lines


def markdown_report(summary: dict) -> str:
    """report.md: what was evaluated with what, the numbers with intervals, what could not be computed."""
    metrics, model, data, applied, boot = (summary[k] for k in ("metrics", "model", "data", "applied", "bootstrap"))
    level = f"{boot['confidence']:.0%}"
    lines = [
        f"# Evaluation of {model['name']} on {data['root']}",
        "",
        "Research software, not a medical device and not for diagnosis.",
        "",
        f"- checkpoint: `{model['checkpoint']}` (integrity: {model['integrity']})",
        f"- ensemble: {applied['ensemble']}"
        if applied.get("ensemble")
        else (f"- run: `{model['run_dir']}`" if model.get("run_dir") else "- run: not found"),
        f"- data: {data['format']} layout, parts {', '.join(data['parts'])}, {data['images']} images evaluated"
        + (f", {len(data['skipped_images'])} unreadable skipped" if data["skipped_images"] else "")
        + (f", {len(data['ignored_files'])} non-image files ignored" if data["ignored_files"] else ""),
    ]
    if data.get("class_counts"):
        lines.append("- labels: " + ", ".join(f"{display_name(c)} {n}" for c, n in data["class_counts"].items()))
    else:
        lines.append("- labels: none (unlabelled images: distributions only)")
    lines += ["", "## Applied from the run, not fitted on these images", ""]
    if applied["thresholds"]:
        lines.append(
            "Screening thresholds on the abnormal probability (1 - p(normal), uncalibrated as when chosen), "
            + ("the mean of the members', each " if applied.get("ensemble") else "")
            + f"chosen on the run's validation part, from `{applied['source']}`: "
            + ", ".join(f"{rule} {t:.6g}" for rule, t in applied["thresholds"].items())
            + "."
        )
    else:
        lines.append("No screening thresholds: the run recorded none, or its metrics.json was not found.")
    lines.append(
        f"Temperature {applied['temperature']:.4g} (`calibration/temperature`, fitted on the run's validation part)."
        if applied["temperature"] is not None
        else f"No temperature: {applied.get('no_temperature') or 'the run recorded none'}."
    )
    lines.append(f"Calibration bins: {applied['calibration_bins']}.")
    ood = applied.get("ood") or {}
    if ood.get("threshold") is not None and applied.get("ensemble"):
        lines.append("OOD: each member's score over its own threshold (chosen on its validation part), averaged.")
    elif ood.get("threshold") is not None:
        lines.append(f"OOD threshold {ood['threshold']:.4g} (`ood/threshold`, chosen on the run's validation part).")
    scored = [k for k in summary["scored"] if not k.startswith(f"{PREFIX}predicted/")]
    if scored:
        lines += [
            "",
            f"## Metrics ({level} bootstrap intervals, {boot['samples']} resamples of the images)",
            "",
            "| metric | key | value | interval |",
            "|---|---|---|---|",
        ]
        for key in scored:
            low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            interval = f"{_fmt(low)} – {_fmt(high)}" if low is not None else "—"
            lines.append(f"| {metric_label(key)} | `{key}` | {_fmt(metrics[key])} | {interval} |")
    lines += ["", "## Predicted classes", "", "| class | fraction | interval |", "|---|---|---|"]
    for label in summary["classes"]:
        key = _fraction_key(label)
        if metrics.get(key):
            interval = f"{_fmt(metrics.get(f'{key}_ci_low'))} – {_fmt(metrics.get(f'{key}_ci_high'))}"
            lines.append(f"| {display_name(label)} | {_fmt(metrics[key])} | {interval} |")
    lines += _ood_section(summary)
    lines += ["", "## Distributions (see distributions.png)", "", "| score | quantiles | mean |", "|---|---|---|"]
    for name in ("confidence", "confidence_temperature_scaled", "abnormal_probability", OOD_SCORE):
        quantiles = {float(k.rsplit("/q", 1)[1]): v for k, v in metrics.items() if k.startswith(f"{PREFIX}{name}/q")}
        if quantiles:
            text = ", ".join(f"q{q:g} {v:.3f}" for q, v in sorted(quantiles.items()))
            lines.append(f"| {name.replace('_', ' ')} | {text} | {_fmt(metrics[f'{PREFIX}{name}/mean'])} |")
    if summary["not_computable"]:
        lines += ["", "## Not computable on these data", ""]
        lines += [f"- {metric_label(k)} (`{k}`): {why}" for k, why in summary["not_computable"].items()]
    if summary["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in summary["notes"]]
    figures = [f for f in summary["files"] if f.endswith(".png")]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem.replace('_', ' ')}]({f})" for f in figures]
    lines += ["", "## Files", "", ", ".join(f"`{f}`" for f in summary["files"]), ""]
    return "\n".join(lines)
