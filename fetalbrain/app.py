"""The clinician-facing GUI: ``python -m fetalbrain.app [ckpt=PATH] [host=...] [port=...]``.

Upload one or several ultrasound images (PNG, JPEG, BMP, TIFF, 16-bit, RGBA, DICOM): see the
predicted anomaly by its clinical name, the calibrated confidence of every class, the
abnormal-vs-normal probability against the run's validation-chosen threshold, a Grad-CAM heatmap,
and a warning when the input looks unlike the training data. Research tool, not a medical device.
"""

import threading
from pathlib import Path

import gradio as gr
import hydra
from omegaconf import DictConfig

from fetalbrain.data.classes import display_name
from fetalbrain.inference import Prediction, Predictor
from fetalbrain.predict import predictions_frame
from fetalbrain.runs import available_runs

DISCLAIMER = (
    "> **Research tool, not a medical device.** Not validated for diagnosis or clinical decisions. "
    "It was trained on a small public dataset (few cases per anomaly; `normal` images come from "
    "another source), and on unseen cases its accuracy is low: see the metrics below."
)
TABLE_COLUMNS = ["file", "name", "confidence", "abnormal_probability", "screening_positive", "warnings", "error"]


class Models:
    """Predictors by checkpoint, loaded once and shared by all requests."""

    def __init__(self, cfg: DictConfig, choices: dict[str, Path]):
        self.cfg, self.choices, self._loaded, self._lock = cfg, choices, {}, threading.Lock()

    def get(self, label: str) -> Predictor:
        if label not in self.choices:
            raise gr.Error(f"Unknown model {label!r}")
        with self._lock:
            if label not in self._loaded:
                self._loaded[label] = Predictor(
                    self.choices[label],
                    self.cfg.min_confidence,
                    self.cfg.calibrated,
                    screening_rule=self.cfg.screening_rule,
                    verify=self.cfg.verify,
                )
            return self._loaded[label]


def model_choices(cfg: DictConfig) -> dict[str, Path]:
    if cfg.ckpt:
        checkpoint = Path(cfg.ckpt)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"ckpt={cfg.ckpt}: no such file")
        return {f"{checkpoint.parent.parent.name} ({checkpoint.name})": checkpoint}
    runs = available_runs(Path(cfg.paths.log_dir))
    if not runs:
        raise FileNotFoundError(f"no trained run under {cfg.paths.log_dir}: train one (make train) or pass ckpt=PATH")
    return {f"{r['model']} · {r['run_dir'].parent.name}/{r['run_dir'].name}": r["checkpoint"] for r in runs}


def describe(predictor: Predictor) -> str:
    card = predictor.card
    metrics = card.get("test_metrics") or {}
    lines = [
        f"**Model** `{card['name']}` · run `{card['run']}` · checkpoint `{card['checkpoint']}` · "
        f"input {card['preprocessing']['image_size']} px · checkpoint integrity: {predictor.integrity}"
    ]
    if metrics:
        lines.append(
            "**Test metrics of this run:** " + ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in metrics.items())
        )
    if card.get("screening_threshold") is not None:
        lines.append(
            f"**Screening threshold** (abnormal probability, chosen on validation): {card['screening_threshold']:.3f}"
        )
    lines.append("**Classes:** " + ", ".join(display_name(c) for c in card["class_names"]))
    return "\n\n".join(lines)


def summarise(p: Prediction) -> str:
    name = Path(p.file).name
    if p.error:
        return f"- **{name}**: could not be read: {p.error.split(': ', 1)[-1]}"
    text = f"- **{name}**: **{p.name}** (confidence {p.confidence:.2f})"
    if p.abnormal_probability is not None:
        text += f"; abnormal probability {p.abnormal_probability:.2f}"
        if p.screening_threshold is not None:
            verdict = "above" if p.screening_positive else "below"
            text += f", {verdict} the screening threshold {p.screening_threshold:.2f}"
    text += f" ({p.seconds * 1000:.0f} ms)"
    for warning in p.warnings:
        text += f"\n  - ⚠️ {warning}"
    return text


def build_app(cfg: DictConfig) -> gr.Blocks:
    choices = model_choices(cfg)
    models = Models(cfg, choices)
    first = next(iter(choices))

    def run(files, model_label):
        if not files:
            return "Upload one or more images first.", None, None, [], None
        paths = [f if isinstance(f, str) else f.name for f in (files if isinstance(files, list) else [files])]
        if len(paths) > cfg.max_files:
            raise gr.Error(f"At most {cfg.max_files} images at once (got {len(paths)}).")
        predictions = models.get(model_label).predict_files(paths)
        good = [p for p in predictions if not p.error]
        summary = "\n".join(summarise(p) for p in predictions)
        gallery = [
            (p.heatmap, f"{Path(p.file).name}: {p.name} ({p.confidence:.2f})") for p in good if p.heatmap is not None
        ]
        table = predictions_frame(predictions)[TABLE_COLUMNS].assign(
            file=lambda f: f["file"].map(lambda x: Path(x).name)
        )
        if not good:
            return summary, None, None, gallery, table
        return summary, good[0].probabilities, good[0].heatmap, gallery, table

    with gr.Blocks(title="fetalbrain: fetal brain ultrasound classifier") as app:
        gr.Markdown("# Fetal brain ultrasound: anomaly classifier")
        gr.Markdown(DISCLAIMER)
        model = gr.Dropdown(list(choices), value=first, label="Model (trained run)")
        card = gr.Markdown(describe(models.get(first)))
        files = gr.File(file_count="multiple", label="Ultrasound images: PNG, JPEG, BMP, TIFF or DICOM")
        button = gr.Button("Predict", variant="primary")
        summary = gr.Markdown(elem_id="summary")
        with gr.Row():
            label = gr.Label(num_top_classes=16, label="Confidence for each class (first image)", elem_id="scores")
            heatmap = gr.Image(label="Grad-CAM: where the model looked (first image)", type="numpy")
        gallery = gr.Gallery(label="Grad-CAM of every image", columns=4, height=320, object_fit="contain")
        table = gr.Dataframe(label="All predictions", wrap=True)
        model.change(lambda m: describe(models.get(m)), model, card)
        outputs = [summary, label, heatmap, gallery, table]
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
