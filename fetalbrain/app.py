"""The clinician-facing GUI: ``python -m fetalbrain.app [ckpt=PATH] [host=...] [port=...]``.

Upload one or several ultrasound images (PNG, JPEG, BMP, TIFF, 16-bit, RGBA, DICOM): see the
predicted anomaly by its clinical name, the calibrated confidence of every class, the
abnormal-vs-normal probability against the run's validation-chosen threshold, a Grad-CAM heatmap,
and warnings. An image the run's out-of-distribution detector flags is shown as "Not a fetal brain
ultrasound" with its score, and its class is not given as an answer (the classifier's output stays visible,
marked as ignored); the low-confidence warning is a separate message. The head finder's outline of the fetal head
is shown with its confidence (and the head circumference, in mm for a DICOM that gives its pixel spacing); an
image in which it trusts no head is answered "No fetal head found", with the reason, and no class. The run's
description says how many normal heads from another hospital (the report's external normal check) the run calls
normal. Research tool, not a medical device.
"""

import threading
from pathlib import Path

import gradio as gr
import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from fetalbrain.data.classes import display_name
from fetalbrain.data.harmonise import describe_harmonise
from fetalbrain.evaluation.external_normals import DEFAULT_WARN_BELOW, PREFIX, describe_external
from fetalbrain.inference.ensemble import Ensemble, load_model
from fetalbrain.inference.predictor import Prediction, Predictor, predictions_frame, withheld_name
from fetalbrain.runs.checkpoints import available_runs, model_paths, run_directory
from fetalbrain.runs.layout import CONFIG_FILE, SUMMARY_FILE, read_summary

DISCLAIMER = (
    "> **Research tool, not a medical device.** Not validated for diagnosis or clinical decisions. "
    "It was trained on a small public dataset (few cases per anomaly; `normal` images come from "
    "another source), and on unseen cases its accuracy is low: see the metrics below."
)
TABLE_COLUMNS = ["file", "name", "confidence", "abnormal_probability", "screening_positive", "warnings", "error"]
OOD_COLUMNS = ["out_of_distribution", "ood_score", "ood_threshold"]
HEAD_COLUMNS = ["head_found", "head_confidence", "head_reason", "head_circumference_px", "head_circumference_mm"]
CLASSIFIER_COLUMNS = ["confidence", "abnormal_probability", "screening_positive"]  # no answer for an OOD image
RECIPE_KEYS = ("model", "data", "optimizer", "scheduler", "trainer.max_epochs")  # what a fold ensemble's runs share


class Models:
    """Predictors by checkpoint, loaded once and shared by all requests."""

    def __init__(self, cfg: DictConfig, choices: dict[str, Path | list[Path]]):
        self.cfg, self.choices, self._loaded, self._lock = cfg, choices, {}, threading.Lock()

    def get(self, label: str) -> Predictor | Ensemble:
        if label not in self.choices:
            raise gr.Error(f"Unknown model {label!r}")
        with self._lock:
            if label not in self._loaded:
                self._loaded[label] = load_model(
                    self.choices[label],
                    min_confidence=self.cfg.min_confidence,
                    calibrated=self.cfg.calibrated,
                    screening_rule=self.cfg.screening_rule,
                    verify=self.cfg.verify,
                    heads=self.cfg.heads,
                )
            return self._loaded[label]


def fold_ensemble(run_dirs: list[Path]) -> bool:
    """Whether a sweep's runs are one recipe trained on other folds or seeds (a cross-validation), so that they make
    a model to hand over together; a search's trials (other settings) do not."""
    recipes = []
    for run_dir in run_dirs:
        if not (run_dir / CONFIG_FILE).is_file():
            return False
        config = OmegaConf.load(run_dir / CONFIG_FILE)
        recipe = {key: OmegaConf.select(config, key) for key in RECIPE_KEYS}
        recipe["data"] = {k: v for k, v in (recipe["data"] or {}).items() if k not in ("fold", "root")}
        recipes.append(OmegaConf.to_container(OmegaConf.create(recipe), resolve=False))
    return all(recipe == recipes[0] for recipe in recipes[1:])


def model_choices(cfg: DictConfig) -> dict[str, Path | list[Path]]:
    """Label -> checkpoint(s): ``ckpt`` as given (one model or one ensemble), or every finished run under
    ``paths.log_dir`` (newest first) and, for each sweep (a Hydra multirun folder) of two or more runs of one recipe
    on other folds or seeds, the ensemble of its runs (e.g. the fold models of a cross-validation)."""
    if cfg.ckpt is not None:  # ckpt=[] is refused by model_paths
        paths = model_paths(cfg.ckpt)
        if len(paths) == 1:
            return {f"{paths[0].parent.parent.name} ({paths[0].name})": paths[0]}
        return {f"ensemble of {len(paths)} · {', '.join(p.parent.parent.name for p in paths)}": paths}
    runs = available_runs(Path(cfg.paths.log_dir))
    if not runs:
        raise FileNotFoundError(f"no trained run under {cfg.paths.log_dir}: train one (make train) or pass ckpt=PATH")
    choices: dict[str, Path | list[Path]] = {}
    sweeps: dict[Path, list[dict]] = {}
    for r in runs:
        choices[f"{r['model']} · {r['run_dir'].parent.name}/{r['run_dir'].name}"] = r["checkpoint"]
        if (r["run_dir"].parent / "multirun.yaml").is_file():
            sweeps.setdefault(r["run_dir"].parent, []).append(r)
    for sweep, members in sweeps.items():
        if len(members) >= 2 and fold_ensemble([m["run_dir"] for m in members]):
            label = f"ensemble of {len(members)} ({members[0]['model']} folds/seeds) · {sweep.parent.name}/{sweep.name}"
            choices[label] = sorted(m["checkpoint"] for m in members)
    return choices


def external_check(predictor: Predictor | Ensemble, screening_rule: str) -> str:
    """The run's external normal check at the GUI's screening rule, from the checkpoint's run folder (metrics.json,
    config.yaml); an ONNX export carries only the card's shown metrics (the check at the run's own rule), an
    ensemble the mean of its members' shown metrics."""
    metrics = predictor.card.get("test_metrics") or {}
    if isinstance(predictor, Ensemble):
        return describe_external(metrics, screening_rule) + " (the mean of the members' checks)"
    if predictor.model is None:  # ONNX: its card is all there is
        return describe_external(metrics, screening_rule)
    run_dir, options = run_directory(predictor.path), {}
    if (run_dir / SUMMARY_FILE).is_file():
        metrics = read_summary(run_dir).get("metrics") or metrics
    if (run_dir / CONFIG_FILE).is_file():
        options = OmegaConf.select(OmegaConf.load(run_dir / CONFIG_FILE), "evaluation.external") or {}
    return describe_external(
        metrics, screening_rule, options.get("name"), options.get("warn_below", DEFAULT_WARN_BELOW)
    )


def describe(predictor: Predictor | Ensemble, screening_rule: str = "youden") -> str:
    card = predictor.card
    metrics = {k: v for k, v in (card.get("test_metrics") or {}).items() if not k.startswith(PREFIX)}
    if isinstance(predictor, Ensemble):
        lines = [
            f"**Model** `{card['name']}`: the mean of the members' calibrated probabilities · runs `{card['run']}` · "
            f"input {card['preprocessing']['image_size']} px (first member) · checkpoint integrity: "
            f"{predictor.integrity}"
        ]
        what = "Test metrics: the mean of the members' (each on its own test part)"
    else:
        lines = [
            f"**Model** `{card['name']}` · run `{card['run']}` · checkpoint `{card['checkpoint']}` · "
            f"input {card['preprocessing']['image_size']} px · checkpoint integrity: {predictor.integrity}"
        ]
        what = "Test metrics of this run"
    lines.append(
        f"**Preprocessing** (as in training; the heatmap is drawn on the image as the model saw it): "
        f"{describe_harmonise(card['preprocessing'].get('harmonise'))}"
    )
    if metrics:
        lines.append(f"**{what}:** " + ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in metrics.items()))
    if card.get("screening_threshold") is not None:
        lines.append(
            f"**Screening threshold** (abnormal probability, chosen on validation): {card['screening_threshold']:.3f}"
        )
    lines.append(f"**Out-of-distribution check** (not a fetal brain ultrasound?): {predictor.ood_status}")
    lines.append(f"**Head finder** (is there a fetal head, and where?): {predictor.head_status}")
    lines.append(
        "**External normal check** (never trained on: is *normal* anatomy or source?): "
        + external_check(predictor, screening_rule)
    )
    lines.append("**Classes:** " + ", ".join(display_name(c) for c in card["class_names"]))
    return "\n\n".join(lines)


def describe_head(p: Prediction) -> str:
    """The finder's verdict in words: a found head with its confidence and circumference, or why there is none."""
    head = p.head
    if head is None:
        return ""
    if not head.found:
        return f"fetal head: {head.reason} (confidence {head.confidence:.2f})"
    size = f"HC {p.head_circumference_px:.0f} px"
    if p.head_circumference_mm is not None:
        size += f" = {p.head_circumference_mm:.0f} mm (DICOM pixel spacing)"
    return f"fetal head found (confidence {head.confidence:.2f}; {size})"


def summarise(p: Prediction) -> str:
    name = Path(p.file).name
    if p.error:
        return f"- **{name}**: could not be read: {p.error.split(': ', 1)[-1]}"
    if p.withheld:  # no anomaly class as if it were an answer: the classifier's output is secondary
        text = (
            f"- **{name}**: **{'; '.join(p.withheld)}**. No anomaly class is given for it. "
            f"_(Ignored classifier output: {p.name}, {p.confidence:.2f}; {p.seconds * 1000:.0f} ms)_"
        )
        return text + "".join(f"\n  - ⚠️ {warning}" for warning in p.warnings)
    text = f"- **{name}**: **{p.name}** (confidence {p.confidence:.2f})"
    if p.head is not None:
        text += f"; {describe_head(p)}"
    if p.ood_score is not None:
        text += f"; fetal brain ultrasound (OOD score {p.ood_score:.3g} ≤ threshold {p.ood_threshold:.3g})"
    if p.abnormal_probability is not None:
        text += f"; abnormal probability {p.abnormal_probability:.2f}"
        if p.screening_threshold is not None:
            verdict = "above" if p.screening_positive else "below"
            text += f", {verdict} the screening threshold {p.screening_threshold:.2f}"
    text += f" ({p.seconds * 1000:.0f} ms)"
    for warning in p.warnings:
        text += f"\n  - ⚠️ {warning}"
    return text


def caption(p: Prediction) -> str:
    withheld = withheld_name(p)
    if withheld:
        return f"{Path(p.file).name}: {withheld.lower()}"
    return f"{Path(p.file).name}: {p.name} ({p.confidence:.2f})"


def scores(p: Prediction) -> dict[str, float] | str:
    """The class-confidence bars, or for an image with no answer only why (no class to read as an answer)."""
    return "; ".join(p.withheld) if p.withheld else p.probabilities


def results_table(predictions: list[Prediction]):
    """The predictions' table; an image with no answer (not an ultrasound, no fetal head) shows why in ``name`` and
    no classifier output beside it."""
    table = predictions_frame(predictions)[TABLE_COLUMNS + OOD_COLUMNS + HEAD_COLUMNS].copy()
    table["file"] = table["file"].map(lambda x: Path(x).name)
    flagged = np.array([bool(p.withheld) for p in predictions], dtype=bool)
    table[CLASSIFIER_COLUMNS] = table[CLASSIFIER_COLUMNS].astype(object)
    table.loc[flagged, CLASSIFIER_COLUMNS] = None
    return table


def respond(predictor: Predictor | Ensemble, paths: list[str]) -> tuple:
    """The page's outputs for uploaded files: summary, first image's scores and heatmap, gallery, table."""
    predictions = predictor.predict_files(paths)
    good = [p for p in predictions if not p.error]
    summary = "\n".join(summarise(p) for p in predictions)
    if good and predictor.ood_detector is None:
        summary = f"ℹ️ No out-of-distribution check: {predictor.ood_status}\n\n{summary}"
    gallery = [(p.heatmap, caption(p)) for p in good if p.heatmap is not None]
    if not good:
        return summary, None, None, None, gallery, results_table(predictions)
    first = good[0]
    return summary, scores(first), first.head_outline, first.heatmap, gallery, results_table(predictions)


def build_app(cfg: DictConfig) -> gr.Blocks:
    choices = model_choices(cfg)
    models = Models(cfg, choices)
    first = next(iter(choices))

    def run(files, model_label):
        if not files:
            return "Upload one or more images first.", None, None, None, [], None
        paths = [f if isinstance(f, str) else f.name for f in (files if isinstance(files, list) else [files])]
        if len(paths) > cfg.max_files:
            raise gr.Error(f"At most {cfg.max_files} images at once (got {len(paths)}).")
        return respond(models.get(model_label), paths)

    with gr.Blocks(title="fetalbrain: fetal brain ultrasound classifier") as app:
        gr.Markdown("# Fetal brain ultrasound: anomaly classifier")
        gr.Markdown(DISCLAIMER)
        model = gr.Dropdown(list(choices), value=first, label="Model (trained run)")
        card = gr.Markdown(describe(models.get(first), cfg.screening_rule))
        files = gr.File(file_count="multiple", label="Ultrasound images: PNG, JPEG, BMP, TIFF or DICOM")
        button = gr.Button("Predict", variant="primary")
        summary = gr.Markdown(elem_id="summary")
        with gr.Row():
            label = gr.Label(num_top_classes=16, label="Confidence for each class (first image)", elem_id="scores")
            head = gr.Image(label="The fetal head the finder found, with its confidence (first image)", type="numpy")
            heatmap = gr.Image(label="Grad-CAM: where the model looked (first image)", type="numpy")
        gallery = gr.Gallery(label="Grad-CAM of every image", columns=4, height=320, object_fit="contain")
        table = gr.Dataframe(label="All predictions", wrap=True)
        model.change(lambda m: describe(models.get(m), cfg.screening_rule), model, card)
        outputs = [summary, label, head, heatmap, gallery, table]
        button.click(run, [files, model], outputs, api_name="predict", concurrency_limit=cfg.concurrency_limit)
        files.upload(run, [files, model], outputs, api_name=False, concurrency_limit=cfg.concurrency_limit)
    return app


@hydra.main(version_base="1.3", config_path="../conf", config_name="app")
def main(cfg: DictConfig) -> None:
    app = build_app(cfg)
    app.queue(default_concurrency_limit=cfg.concurrency_limit).launch(
        server_name=cfg.host,
        server_port=cfg.port,
        share=cfg.share,
        max_file_size=cfg.max_file_size,
    )


if __name__ == "__main__":
    main()
