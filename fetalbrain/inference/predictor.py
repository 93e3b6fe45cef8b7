"""Predict with a trained run: the checkpoint (or its ONNX export) plus what evaluation learned.

Every prediction uses the training run's own preprocessing (from the checkpoint), the temperature
fitted on validation (calibrated confidence), the abnormal-vs-normal threshold chosen on validation,
a Grad-CAM heatmap, and the run's out-of-distribution detector: an input unlike the training images is
flagged as "not a fetal brain ultrasound" with its score, apart from the low-confidence warning (the model
unsure between anomalies). The head finder (the run's head frame, or the shipped finder) outlines the fetal head
with its confidence and, where a DICOM gives the pixel spacing, its circumference in mm; an image in which it
trusts no head gets no answer either ("no fetal head found", with the reason). Bad files give a per-file error,
never an exception that stops a batch.
"""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch

from fetalbrain.data.classes import NORMAL_CLASS, display_name
from fetalbrain.data.head_frame import HeadDecision, HeadFrame
from fetalbrain.data.images import ImageReadError, pixel_spacing_mm, read_image
from fetalbrain.data.transforms import build_pipeline, run_preprocessing
from fetalbrain.data.tta import check_tta, with_tta
from fetalbrain.evaluation.calibration import softmax
from fetalbrain.evaluation.metrics import SHOWN
from fetalbrain.evaluation.ood import OODDetector, features_and_logits, run_detector
from fetalbrain.models.gradcam import grad_cam, overlay
from fetalbrain.runs.checkpoints import read_checkpoint, run_directory
from fetalbrain.runs.choices import run_choices
from fetalbrain.runs.integrity import verify_checkpoint

log = logging.getLogger(__name__)
ONNX_METADATA_KEY = "fetalbrain"
NOT_ULTRASOUND = "Not a fetal brain ultrasound"
NO_HEAD = "No fetal head found"


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
    # The out-of-distribution check: a score (higher = less like the training images) against the run's
    # threshold; out_of_distribution is True when the image is not a fetal brain ultrasound, and then its
    # class is no answer. Without a detector the score is None and ood_note says why.
    ood_score: float | None = None
    ood_threshold: float | None = None
    ood_note: str | None = None
    # The head finder's verdict on the image as given (None without a finder): the skull's ellipse in the image's
    # pixels, its confidence, and the head circumference (HC18's measure) in pixels, and in mm where a DICOM gives
    # the pixel spacing; a head it does not trust (not framed) withholds the answer like the OOD check.
    head: HeadDecision | None = None
    head_circumference_px: float | None = None
    head_circumference_mm: float | None = None
    head_outline: np.ndarray | None = None  # HxWx3 uint8: the image with the found ellipse drawn (with the heatmap)

    @property
    def screening_positive(self) -> bool | None:
        if self.abnormal_probability is None or self.screening_threshold is None:
            return None
        return self.abnormal_probability >= self.screening_threshold

    @property
    def out_of_distribution(self) -> bool | None:
        if self.ood_score is None or self.ood_threshold is None:
            return None
        return self.ood_score > self.ood_threshold

    @property
    def ood_message(self) -> str | None:
        """What to show instead of the class when the image is flagged; None otherwise."""
        if not self.out_of_distribution:
            return None
        return f"{NOT_ULTRASOUND} (OOD score {self.ood_score:.3g} above threshold {self.ood_threshold:.3g})"

    @property
    def no_head(self) -> bool:
        return self.head is not None and not self.head.framed

    @property
    def withheld(self) -> list[str]:
        """Why no anomaly class is given as the answer (empty: it is): not an ultrasound, no fetal head found."""
        reasons = [self.ood_message] if self.out_of_distribution else []
        if self.no_head:
            reason = self.head.reason
            said = reason.lower().startswith(NO_HEAD.lower())  # "no fetal head found (...)": say it once
            reasons.append(NO_HEAD + reason[len(NO_HEAD) :] if said else f"{NO_HEAD}: {reason}")
        return reasons


def deployment_metadata(checkpoint: Path, state: dict, screening_rule: str = "youden") -> dict:
    """What a deployed model needs besides weights: classes, preprocessing, the run's choices and test results.

    ``state`` is the checkpoint's contents (``read_checkpoint``); the run's metrics.json is found
    beside the checkpoint's folder."""
    hparams = state["hyper_parameters"]
    choices = run_choices(checkpoint, state)
    card = {
        "name": hparams.get("name") or hparams["net"].get("name", "model"),
        "class_names": hparams["class_names"],
        "preprocessing": choices.preprocessing,
        "run": str(run_directory(checkpoint).name),
        "checkpoint": checkpoint.name,
        "test_metrics": {k: choices.metrics[k] for k in SHOWN if k in choices.metrics},
        "screening_threshold": choices.thresholds.get(screening_rule),
        "temperature": choices.temperature,
        "tta": choices.tta,  # model.tta: an ONNX export runs its views through the plain net
    }
    return card


@dataclass
class BatchScores:
    """What a model says of a batch of images: class probabilities, the screening score when it is not
    1 - p(normal) of these probabilities (an ensemble's), and OOD scores (None: no detector)."""

    probs: np.ndarray
    abnormal: np.ndarray | None = None
    ood: np.ndarray | None = None


def describe_probabilities(
    result: Prediction,
    probs: np.ndarray,
    class_names: list[str],
    abnormal: float | None,
    screening_threshold: float | None,
) -> int:
    """Fill the class, its confidence, every class's probability and the screening score; returns the top class."""
    order = np.argsort(probs)[::-1]
    top = int(order[0])
    result.label, result.name, result.confidence = class_names[top], display_name(class_names[top]), float(probs[top])
    result.probabilities = {display_name(class_names[i]): float(probs[i]) for i in order}
    if abnormal is not None:
        result.abnormal_probability, result.screening_threshold = abnormal, screening_threshold
    return top


def add_warnings(result: Prediction, min_confidence: float, colour: float, max_colourfulness: float) -> None:
    if result.confidence < min_confidence:
        result.warnings.append(
            f"low confidence ({result.confidence:.2f} < {min_confidence}): "
            "the model is unsure; do not rely on this class"
        )
    if colour > max_colourfulness:
        result.warnings.append("colour image: ultrasound images are grey, so this input looks unlike the training data")


class Predictor:
    """Load once, predict many. ``model_path``: a Lightning checkpoint (.ckpt) or an ONNX export.

    A checkpoint whose run has a model card must match the SHA256 recorded there (``verify=False``
    skips the check). The run's out-of-distribution detector (``ood_detector.pt``) is loaded with its
    checkpoint (``ood=False`` leaves it out); ``ood_status`` says whether there is one and why not.
    ``tta``: test-time augmentation (``none``/``flip``), by default the run's ``model.tta``; with an ONNX export
    (the plain net) each view is a pass through it, averaged as probabilities like the checkpoint does."""

    def __init__(
        self,
        model_path: str | Path,
        min_confidence: float = 0.5,
        calibrated: bool = True,
        max_colourfulness: float = 8.0,
        screening_rule: str = "youden",
        heatmaps: bool = True,
        verify: bool = True,
        ood: bool = True,
        tta: str | None = None,
        heads: bool = True,
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
        self.tta = check_tta(tta if tta is not None else self.card.get("tta", "none"))
        if self.tta != self.card.get("tta", "none"):
            log.warning(
                "tta=%s but the run tested with model.tta=%s: its temperature and screening thresholds were fitted "
                "on the other kind of probabilities",
                self.tta,
                self.card.get("tta", "none"),
            )
        self.temperature = (self.card.get("temperature") or 1.0) if calibrated else 1.0
        # The run's preprocessing in two halves: everything but the final resize gives the view the heatmap is
        # drawn on (cropped, masked, letterboxed as the network saw it, at full resolution); then resize and
        # normalise. Together the same steps as training's pipeline (tested), so the tensors are identical.
        prep = self.card["preprocessing"]
        steps = run_preprocessing(prep)
        self.view, self.to_tensor = A.Compose(steps[:-1]), build_pipeline(steps[-1:], [], prep["mean"], prep["std"])
        self.class_names = self.card["class_names"]
        self.ood_detector, self.ood_status = self._load_ood_detector(ood)
        self.head_frame, self.head_status = self._head_finder(steps, heads)

    @staticmethod
    def _head_finder(steps: list, enabled: bool) -> tuple[HeadFrame | None, str]:
        """The run's own head frame (its finder, its decisions), else the shipped finder; or None and why not. The
        run's frame is checked now: a finder other than the one the run was trained with is refused before any image.
        ``heads=false`` turns off the outline and the withholding, not the run's own framing (its preprocessing)."""
        framing = next((step for step in steps if isinstance(step, HeadFrame)), None)
        if framing is not None:
            framing.check_finder()
        if not enabled:
            return None, "off (heads=false)" + (": the images are still framed on their head" if framing else "")
        if framing is not None:
            return framing, "the run's head frame: the network saw each image framed on its head"
        frame = HeadFrame()
        try:
            frame.load_finder()
        except (FileNotFoundError, ValueError) as error:
            return None, f"none: {error}"
        return frame, "the shipped head finder (this run saw whole frames)"

    def add_head(self, result: Prediction, gray: np.ndarray, path: str | Path, colour: float = 0.0) -> None:
        """The head finder's decision on a decoded image, and for a found head (not one cut by the frame edge) its
        circumference in pixels and, in a DICOM that gives its pixel spacing, in mm. A colour picture (above the
        colourfulness the warnings allow) is no ultrasound frame: no head is looked for in its grey version."""
        if self.head_frame is None:
            return
        if colour > self.max_colourfulness:
            reason = f"a colour image (colourfulness {colour:.1f} > {self.max_colourfulness:g}): no ultrasound frame"
            result.head = HeadDecision(False, False, reason)
            return
        result.head = self.head_frame.decide(gray)
        if result.head.found:
            result.head_circumference_px = result.head.ellipse.circumference
            spacing = pixel_spacing_mm(path)
            if spacing:
                result.head_circumference_mm = result.head.ellipse.scaled(*spacing).circumference

    def _load_ood_detector(self, enabled: bool) -> tuple[OODDetector | None, str]:
        """The run's detector, or None and why: predictions then carry no OOD score, and a note.

        A detector fitted on another net's features (another feature size) is refused with an error; one fitted
        on another checkpoint of the same run (e.g. last.ckpt, not the best) is not used."""
        if not enabled:
            return None, "off (ood=false)"
        if self.model is None:
            return None, "none: the ONNX export gives no features to score; use the run's .ckpt for the OOD check"
        probe = self.tensor(np.zeros((8, 8), np.uint8))  # any image: the net's feature size
        return run_detector(self.path, feature_dim=self.features(probe)[0].shape[1])

    def tensor(self, gray: np.ndarray, view: np.ndarray | None = None) -> torch.Tensor:
        """The network's input for a decoded image (``view``: its ``self.view``, when already computed)."""
        tensor = self.to_tensor(image=self.view(image=gray)["image"] if view is None else view)["image"]
        if self.card["preprocessing"]["channels"] == 3:
            tensor = tensor.expand(3, -1, -1)
        return tensor.unsqueeze(0).contiguous()

    def _net_logits(self, batch: torch.Tensor) -> np.ndarray:
        """One plain forward pass (no test-time augmentation)."""
        if self.session is not None:
            return self.session.run(None, {self.session.get_inputs()[0].name: batch.numpy()})[0]
        with torch.no_grad():
            return self.model(batch).float().numpy()

    def _with_tta(self, batch: torch.Tensor, logits: np.ndarray) -> np.ndarray:
        """``logits`` of ``batch`` averaged as probabilities with those of ``self.tta``'s views (as in test)."""
        combined = with_tta(
            lambda view: torch.as_tensor(self._net_logits(view)), batch, torch.as_tensor(logits), self.tta
        )
        return np.asarray(combined)

    def logits(self, batch: torch.Tensor) -> np.ndarray:
        return self._with_tta(batch, self._net_logits(batch))

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        return softmax(self.logits(batch), self.temperature)

    def features(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(penultimate features, logits) from one forward pass of the PyTorch checkpoint; with ``self.tta`` the
        logits average that pass with the views' (the OOD detector scores the plain pass's features)."""
        features, logits = features_and_logits(self.model, batch)
        return features.numpy(), self._with_tta(batch, logits.numpy())

    def image_outputs(self, gray: np.ndarray) -> tuple[np.ndarray, torch.Tensor, np.ndarray, float | None]:
        """One decoded image through the run's preprocessing and net: the view (the image as the network saw it,
        before the final resize), the batch of one, its logits (with the run's TTA) and its OOD score (None
        without a detector), all from one forward pass."""
        view = self.view(image=gray)["image"]
        batch = self.tensor(gray, view)
        logits, ood = self._logits_and_ood(batch)
        return view, batch, logits, None if ood is None else float(ood[0])

    def batch_outputs(self, grays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (with the run's TTA) and OOD scores (None without a detector) of decoded images, from one
        forward pass of the batch."""
        return self._logits_and_ood(torch.cat([self.tensor(gray) for gray in grays]))

    def _logits_and_ood(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and, with a detector, OOD scores of preprocessed images from the same forward pass."""
        if self.ood_detector is None:
            return self.logits(batch), None
        features, logits = self.features(batch)
        return logits, self.ood_detector.score(features)

    def batch_scores(self, grays: list[np.ndarray]) -> BatchScores:
        """Probabilities at ``self.temperature`` and OOD scores of decoded images; ``abnormal`` stays None: the
        screening score is 1 - p(normal) of the uncalibrated probabilities."""
        logits, ood = self.batch_outputs(grays)
        return BatchScores(softmax(logits, self.temperature), ood=ood)

    def heatmap(self, batch: torch.Tensor, target: int) -> np.ndarray:
        """Grad-CAM of ``target`` for one preprocessed image (HxW in [0, 1], the network's resolution; ``overlay``
        stretches it over the view)."""
        cam, _ = grad_cam(self.model.net, batch.contiguous(memory_format=torch.channels_last), target)
        return cam

    def predict_file(self, path: str | Path, heatmap: bool | None = None) -> Prediction:
        started = time.perf_counter()
        result = Prediction(file=str(path))
        try:
            gray, colour = read_image(path)
        except ImageReadError as error:
            result.error = str(error)
            return result
        view, batch, logits, result.ood_score = self.image_outputs(gray)
        self.add_head(result, gray, path, colour)
        if result.ood_score is not None:
            result.ood_threshold = self.ood_detector.threshold
        else:
            result.ood_note = f"no OOD check: {self.ood_status}"
        abnormal = None
        if NORMAL_CLASS in self.class_names:
            # On the scale its threshold was chosen on: validation probabilities before temperature scaling.
            abnormal = 1.0 - float(softmax(logits, 1.0)[0][self.class_names.index(NORMAL_CLASS)])
        top = describe_probabilities(
            result,
            softmax(logits, self.temperature)[0],
            self.class_names,
            abnormal,
            self.card.get("screening_threshold"),
        )
        add_warnings(result, self.min_confidence, colour, self.max_colourfulness)
        if heatmap if heatmap is not None else self.heatmaps:
            result.head_outline = head_outline(gray, result.head)
            if self.model is None:
                result.warnings.append("no heatmap: it needs the PyTorch checkpoint, not the ONNX export")
            else:
                result.heatmap = overlay(view, self.heatmap(batch, top))
        result.seconds = time.perf_counter() - started
        return result

    def predict_files(self, paths, heatmap: bool | None = None) -> list[Prediction]:
        return [self.predict_file(p, heatmap) for p in paths]


def head_outline(gray: np.ndarray, head: HeadDecision | None) -> np.ndarray | None:
    """The image as given with the finder's ellipse drawn on it (green: found; amber: framed but cut by the frame
    edge; red: not trusted) and its confidence or reason written above; None without a finder's decision."""
    import cv2

    if head is None:
        return None
    canvas = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    colour = (40, 200, 60) if head.found else (240, 170, 0) if head.framed else (230, 40, 40)
    thickness = max(1, round(max(gray.shape) / 200))
    if head.ellipse is not None:
        e = head.ellipse
        cv2.ellipse(canvas, (round(e.cx), round(e.cy)), (round(e.semi_major), round(e.semi_minor)), e.angle, 0, 360,
                    colour, thickness, cv2.LINE_AA)  # fmt: skip
    text = f"head {head.confidence:.2f}" if head.found else (head.reason or "")[:48]
    scale = max(gray.shape) / 700
    cv2.putText(canvas, text, (4, max(12, round(22 * scale))), cv2.FONT_HERSHEY_SIMPLEX, max(scale, 0.35), colour,
                thickness, cv2.LINE_AA)  # fmt: skip
    return canvas


def withheld_name(p: Prediction) -> str | None:
    """What stands in the answer's place for an image that gets none: not an ultrasound, or no fetal head."""
    if p.out_of_distribution:
        return NOT_ULTRASOUND
    return NO_HEAD if p.no_head else None


def predictions_frame(predictions: list[Prediction]) -> pd.DataFrame:
    rows = []
    for p in predictions:
        withheld = withheld_name(p)
        head = p.head
        row = {
            "file": p.file,
            # An image that is not a fetal brain ultrasound, or shows no fetal head, gets no anomaly class as answer.
            "predicted": None if withheld else p.label,
            "name": withheld or p.name,
            "withheld": "; ".join(p.withheld),
            "out_of_distribution": p.out_of_distribution,
            "ood_score": p.ood_score,
            "ood_threshold": p.ood_threshold,
            "head_found": None if head is None else head.found,
            "head_framed": None if head is None else head.framed,
            "head_confidence": None if head is None else round(head.confidence, 4),
            "head_reason": None if head is None else head.reason,
            "head_circumference_px": p.head_circumference_px,
            "head_circumference_mm": p.head_circumference_mm,
            "confidence": p.confidence,
            "abnormal_probability": p.abnormal_probability,
            "screening_threshold": p.screening_threshold,
            "screening_positive": p.screening_positive,
            "warnings": "; ".join(p.warnings),
            "error": p.error,
            "seconds": round(p.seconds, 4),
        }
        row.update({f"p_{name}": value for name, value in p.probabilities.items()})
        rows.append(row)
    return pd.DataFrame(rows)
