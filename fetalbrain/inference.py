"""Predict with a trained run: the checkpoint (or its ONNX export) plus what evaluation learned.

Every prediction uses the training run's own preprocessing (from the checkpoint), the temperature
fitted on validation (calibrated confidence), the abnormal-vs-normal threshold chosen on validation,
a Grad-CAM heatmap, and flags an input that looks unlike the training data instead of answering it
confidently. Bad files give a per-file error, never an exception that stops a batch.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fetalbrain.data.classes import NORMAL_CLASS, display_name
from fetalbrain.data.images import ImageReadError, read_image
from fetalbrain.data.transforms import build_pipeline, preprocessing
from fetalbrain.evaluation.calibration import softmax
from fetalbrain.evaluation.metrics import SHOWN
from fetalbrain.integrity import verify_checkpoint
from fetalbrain.models.gradcam import grad_cam, overlay
from fetalbrain.runs import SUMMARY_FILE, read_checkpoint, read_summary, run_directory

ONNX_METADATA_KEY = "fetalbrain"


@dataclass
class Prediction:
    file: str
    label: str | None = None
    name: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)  # readable name -> probability, sorted
    abnormal_probability: float | None = None
    screening_threshold: float | None = None
    warnings: list[str] = field(default_factory=list)  # why the answer should not be trusted
    heatmap: np.ndarray | None = None  # HxWx3 uint8 overlay
    error: str | None = None
    seconds: float = 0.0

    @property
    def screening_positive(self) -> bool | None:
        if self.abnormal_probability is None or self.screening_threshold is None:
            return None
        return self.abnormal_probability >= self.screening_threshold


def deployment_metadata(checkpoint: Path, state: dict, screening_rule: str = "youden") -> dict:
    """What a deployed model needs besides weights: classes, preprocessing, evaluation results.

    ``state`` is the checkpoint's contents (``read_checkpoint``); the run's metrics.json is found
    beside the checkpoint's folder."""
    hparams = state["hyper_parameters"]
    card = {
        "name": hparams.get("name") or hparams["net"].get("name", "model"),
        "class_names": hparams["class_names"],
        "preprocessing": hparams["preprocessing"],
        "run": str(run_directory(checkpoint).name),
        "checkpoint": checkpoint.name,
        "test_metrics": {},
        "screening_threshold": None,
        "temperature": None,
    }
    if (run_directory(checkpoint) / SUMMARY_FILE).is_file():
        metrics = read_summary(run_directory(checkpoint))["metrics"]
        card["test_metrics"] = {k: metrics[k] for k in SHOWN if k in metrics}
        card["screening_threshold"] = metrics.get(f"screening/{screening_rule}/threshold")
        card["temperature"] = metrics.get("calibration/temperature")
    return card


class Predictor:
    """Load once, predict many. ``model_path``: a Lightning checkpoint (.ckpt) or an ONNX export.

    A checkpoint whose run has a model card must match the SHA256 recorded there (``verify=False``
    skips the check)."""

    def __init__(
        self,
        model_path: str | Path,
        min_confidence: float = 0.5,
        calibrated: bool = True,
        max_colourfulness: float = 8.0,
        screening_rule: str = "youden",
        heatmaps: bool = True,
        verify: bool = True,
    ):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ckpt={model_path}: no such file")
        self.min_confidence, self.max_colourfulness = min_confidence, max_colourfulness
        self.integrity = "not checked (ONNX export)"
        if self.path.suffix == ".onnx":
            import onnx
            import onnxruntime

            metadata = {p.key: p.value for p in onnx.load(str(self.path), load_external_data=False).metadata_props}
            if ONNX_METADATA_KEY not in metadata:
                raise ValueError(f"{self.path}: not exported by fetalbrain (no model card in its metadata)")
            self.card = json.loads(metadata[ONNX_METADATA_KEY])
            self.session, self.model = (
                onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"]),
                None,
            )
        else:
            from fetalbrain.models.classifier import load_classifier

            self.integrity = verify_checkpoint(self.path, verify)  # a changed checkpoint is refused here
            state = read_checkpoint(self.path)
            self.card = deployment_metadata(self.path, state, screening_rule)
            self.session, self.model = None, load_classifier(state)
        self.heatmaps = heatmaps  # an ONNX model cannot make one: each prediction says so
        self.temperature = (self.card.get("temperature") or 1.0) if calibrated else 1.0
        prep = self.card["preprocessing"]
        self.transform = build_pipeline(
            preprocessing(prep["image_size"], prep["denoise"], prep["denoise_kernel"], prep["clahe"]),
            [],
            prep["mean"],
            prep["std"],
        )
        self.class_names = self.card["class_names"]

    def tensor(self, gray: np.ndarray) -> torch.Tensor:
        tensor = self.transform(image=gray)["image"]
        if self.card["preprocessing"]["channels"] == 3:
            tensor = tensor.expand(3, -1, -1)
        return tensor.unsqueeze(0).contiguous()

    def logits(self, batch: torch.Tensor) -> np.ndarray:
        if self.session is not None:
            return self.session.run(None, {self.session.get_inputs()[0].name: batch.numpy()})[0]
        with torch.no_grad():
            return self.model(batch).float().numpy()

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        return softmax(self.logits(batch), self.temperature)

    def predict_file(self, path: str | Path, heatmap: bool | None = None) -> Prediction:
        started = time.perf_counter()
        result = Prediction(file=str(path))
        try:
            gray, colour = read_image(path)
        except ImageReadError as error:
            result.error = str(error)
            return result
        batch = self.tensor(gray)
        probs = self.probabilities(batch)[0]
        order = np.argsort(probs)[::-1]
        top = int(order[0])
        result.label, result.name, result.confidence = (
            self.class_names[top],
            display_name(self.class_names[top]),
            float(probs[top]),
        )
        result.probabilities = {display_name(self.class_names[i]): float(probs[i]) for i in order}
        if NORMAL_CLASS in self.class_names:
            result.abnormal_probability = 1.0 - float(probs[self.class_names.index(NORMAL_CLASS)])
            result.screening_threshold = self.card.get("screening_threshold")
        if result.confidence < self.min_confidence:
            result.warnings.append(
                f"low confidence ({result.confidence:.2f} < {self.min_confidence}): "
                "the model is unsure; do not rely on this class"
            )
        if colour > self.max_colourfulness:
            result.warnings.append(
                "colour image: ultrasound images are grey, so this input looks unlike the training data"
            )
        if heatmap if heatmap is not None else self.heatmaps:
            if self.model is None:
                result.warnings.append("no heatmap: it needs the PyTorch checkpoint, not the ONNX export")
            else:
                cam, _ = grad_cam(self.model.net, batch.contiguous(memory_format=torch.channels_last), top)
                result.heatmap = overlay(gray, cam)
        result.seconds = time.perf_counter() - started
        return result

    def predict_files(self, paths, heatmap: bool | None = None) -> list[Prediction]:
        return [self.predict_file(p, heatmap) for p in paths]
