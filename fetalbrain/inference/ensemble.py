"""Several trained runs as one model: e.g. the five fold models of a cross-validation, the natural model to hand over.

``load_model(spec)`` reads what ``predict``, ``evaluate`` and the GUI accept as ``ckpt``: a checkpoint, a run
folder (its best checkpoint), a folder of runs (a sweep: every classification run's best checkpoint), or a list
of those. One checkpoint gives a ``Predictor``; several give an ``Ensemble`` with the same interface.

How an ensemble decides, so that its numbers read like a single run's:

* class probabilities: the mean of the members' **calibrated** probabilities (each member's own preprocessing,
  test-time augmentation and temperature fitted on its own validation part); nothing is fitted again (fold
  models share no held-out data to fit on). Where the members agree the ensemble is as calibrated as they are;
  where they disagree it is less confident than each, so an ensemble of diverse, accurate members tends to be
  underconfident (measured in experiments/reproduction/).
* screening: each member's threshold was chosen on its uncalibrated abnormal probability ``1 - p(normal)``; the
  ensemble compares the mean of those probabilities with the mean of those thresholds.
* out of distribution: each member's score over its own threshold, averaged; flagged when the mean is above 1.
* Grad-CAM: each member's heatmap of the ensemble's class, averaged, drawn on the first member's view, when the
  members' preprocessing differs in resolution and pixel values at most (their views show the same region);
  otherwise the first member's heatmap, with a warning.
* screening thresholds are averaged, so a rule's guarantee on a member's validation part (sensitivity_0.95's
  sensitivity) does not carry over to the ensemble exactly.
"""

import time
from pathlib import Path

import cv2
import numpy as np

from fetalbrain.data.classes import NORMAL_CLASS
from fetalbrain.data.images import ImageReadError, read_image
from fetalbrain.evaluation.calibration import softmax
from fetalbrain.evaluation.metrics import SHOWN
from fetalbrain.inference.predictor import (
    BatchScores,
    Prediction,
    Predictor,
    add_warnings,
    describe_probabilities,
    head_outline,
)
from fetalbrain.models.gradcam import overlay
from fetalbrain.runs.checkpoints import model_paths
from fetalbrain.runs.choices import RunChoices, run_choices

# Preprocessing keys that change the pixels' resolution or values, not which region of the image the net sees:
# members that differ only in these have heatmaps that line up (harmonise's crop and letterbox move the region).
NOT_GEOMETRY = ("image_size", "mean", "std", "channels", "denoise", "denoise_kernel", "clahe")


def load_model(spec, **options) -> "Predictor | Ensemble":
    """A ``Predictor`` for one checkpoint, an ``Ensemble`` for several; ``options`` go to every ``Predictor``."""
    paths = model_paths(spec)
    return Predictor(paths[0], **options) if len(paths) == 1 else Ensemble(paths, **options)


class MemberScoreRatio:
    """The members' OOD detectors as one: the score is the mean of each member's score over its threshold."""

    threshold = 1.0

    keep_in_distribution = None  # each member's threshold keeps its own share of its validation part

    def flag(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def describe(self) -> str:
        return "the mean of the members' OOD scores, each over its own threshold (flagged above 1)"


def _mean_or_none(values: list) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


class Ensemble:
    """The members' calibrated probabilities averaged (see the module docstring). Same interface as ``Predictor``
    for predict, evaluate and the GUI: ``predict_file(s)``, ``batch_scores``, ``card``, ``class_names``,
    ``ood_status``, ``integrity``. Members must be checkpoints (a heatmap and the OOD check need the net) with the
    same classes in the same order."""

    def __init__(
        self,
        paths: list[Path],
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
        if len(paths) < 2:
            raise ValueError("an ensemble needs at least two checkpoints")
        onnx = [str(p) for p in paths if Path(p).suffix == ".onnx"]
        if onnx:
            raise ValueError(f"ckpt: an ensemble is built from checkpoints (.ckpt), not ONNX exports: {onnx[0]}")
        # members always calibrated: an ensemble averages calibrated probabilities (calibrated=False: see below)
        self.members = [
            Predictor(
                p,
                min_confidence=min_confidence,
                calibrated=True,
                max_colourfulness=max_colourfulness,
                screening_rule=screening_rule,
                heatmaps=heatmaps,
                verify=verify,
                ood=ood,
                tta=tta,
                heads=heads and i == 0,  # one finder answers for the ensemble: the first member's
            )
            for i, p in enumerate(paths)
        ]
        self.calibrated = calibrated
        self.min_confidence, self.max_colourfulness, self.heatmaps = min_confidence, max_colourfulness, heatmaps
        self.paths = [m.path for m in self.members]
        self.class_names = list(self.members[0].class_names)
        for member in self.members[1:]:
            if list(member.class_names) != self.class_names:
                raise ValueError(
                    f"ckpt: {member.path} has classes {list(member.class_names)}, {self.paths[0]} has "
                    f"{self.class_names}: an ensemble's members must share their classes, in one order"
                )
        self.card = self._card()
        geometry = [{k: v for k, v in m.card["preprocessing"].items() if k not in NOT_GEOMETRY} for m in self.members]
        self.same_geometry = all(g == geometry[0] for g in geometry[1:])
        self.integrity = "; ".join(f"{m.path.parent.parent.name}: {m.integrity}" for m in self.members)
        self.head_frame, self.head_status = self.members[0].head_frame, self.members[0].head_status  # the first's
        self.ood_detector, self.ood_status = None, ""
        missing = [m for m in self.members if m.ood_detector is None]
        if missing:
            name = missing[0].path.parent.parent.name
            self.ood_status = f"none: member {name} has no OOD detector ({missing[0].ood_status})"
        else:
            self.ood_detector = MemberScoreRatio()
            self.ood_status = f"{self.ood_detector.describe()}, {len(self.members)} members"

    def _card(self) -> dict:
        cards = [m.card for m in self.members]
        shown = {k for card in cards for k in card.get("test_metrics") or {}}
        test_metrics = {  # the members' own test numbers, averaged (each on its own test fold)
            k: float(np.mean([c["test_metrics"][k] for c in cards]))
            for k in SHOWN
            if k in shown and all(k in (c.get("test_metrics") or {}) for c in cards)
        }
        names = sorted({c["name"] for c in cards})
        return {
            "name": f"ensemble of {len(cards)} ({', '.join(names)})",
            "class_names": self.class_names,
            "preprocessing": cards[0]["preprocessing"],  # the first member's: each member applies its own
            "run": ", ".join(c["run"] for c in cards),
            "checkpoint": ", ".join(c["checkpoint"] for c in cards),
            "members": [str(m.path) for m in self.members],
            "test_metrics": test_metrics,
            "screening_threshold": _mean_or_none([c.get("screening_threshold") for c in cards]),
            "temperature": None,  # each member's own: the ensemble averages calibrated probabilities
            "tta": ", ".join(sorted({c.get("tta", "none") for c in cards})),  # each member applies its own
        }

    def run_choices(self) -> RunChoices:
        """What evaluate applies: the mean of the members' thresholds for each rule all of them have; no
        temperature (the ensemble's probabilities are already its members' calibrated ones)."""
        members = [run_choices(m.path) for m in self.members]
        rules = set.intersection(*(set(c.thresholds) for c in members))
        choices = RunChoices(
            checkpoint=self.paths[0],
            thresholds={r: float(np.mean([c.thresholds[r] for c in members])) for r in sorted(rules)},
            calibration_bins=members[0].calibration_bins,
            source=f"the mean of {len(members)} members' metrics.json",
            ensemble=(
                f"{len(members)} runs ({', '.join(m.path.parent.parent.name for m in self.members)}): the mean of "
                "their calibrated probabilities"
            ),
            no_temperature=(
                "an ensemble averages its members' temperature-scaled probabilities: its ECE and NLL are already "
                "the calibrated ones, and no temperature is applied on top"
            ),
        )
        choices.notes = [note for c in members for note in c.notes] + [
            f"an ensemble of {len(members)} checkpoints ({', '.join(str(p) for p in self.paths)}): probabilities "
            "are the mean of the members' calibrated probabilities; the screening thresholds are the mean of the "
            "members' (applied to the mean of their uncalibrated abnormal probabilities); the OOD score is the mean "
            "of each member's score over its threshold (flagged above 1)"
        ]
        return choices

    def _combine(self, logits: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean calibrated probabilities (members' temperatures; with calibrated=False their plain softmax) and
        the mean uncalibrated abnormal probability (None without a normal class)."""
        probs = np.mean(
            [softmax(z, m.temperature if self.calibrated else 1.0) for m, z in zip(self.members, logits)], 0
        )
        if NORMAL_CLASS not in self.class_names:
            return probs, None
        normal = self.class_names.index(NORMAL_CLASS)
        return probs, np.mean([1.0 - softmax(z, 1.0)[:, normal] for z in logits], axis=0)

    def _ood_score(self, member_scores: list) -> np.ndarray | None:
        """The mean of each member's OOD score over its own threshold; None without detectors."""
        if self.ood_detector is None:
            return None
        return np.mean([np.asarray(s) / m.ood_detector.threshold for s, m in zip(member_scores, self.members)], axis=0)

    def batch_scores(self, grays: list[np.ndarray]) -> BatchScores:
        outputs = [m.batch_outputs(grays) for m in self.members]
        probs, abnormal = self._combine([logits for logits, _ in outputs])
        return BatchScores(probs, abnormal, self._ood_score([score for _, score in outputs]))

    def predict_file(self, path: str | Path, heatmap: bool | None = None) -> Prediction:
        started = time.perf_counter()
        result = Prediction(file=str(path))
        try:
            gray, colour = read_image(path)
        except ImageReadError as error:
            result.error = str(error)
            return result
        outputs = [m.image_outputs(gray) for m in self.members]
        self.members[0].add_head(result, gray, path, colour)
        probs, abnormal = self._combine([logits for _, _, logits, _ in outputs])
        if self.ood_detector is not None:
            result.ood_score = float(self._ood_score([score for *_, score in outputs]))
            result.ood_threshold = self.ood_detector.threshold
        else:
            result.ood_note = f"no OOD check: {self.ood_status}"
        top = describe_probabilities(
            result,
            probs[0],
            self.class_names,
            None if abnormal is None else float(abnormal[0]),
            self.card["screening_threshold"],
        )
        add_warnings(result, self.min_confidence, colour, self.max_colourfulness)
        if heatmap if heatmap is not None else self.heatmaps:
            result.head_outline = head_outline(gray, result.head)
            first_view, first_batch = outputs[0][0], outputs[0][1]
            if self.same_geometry:  # every view shows the same region: the members' maps line up
                size = (first_view.shape[1], first_view.shape[0])
                cams = [cv2.resize(m.heatmap(batch, top), size) for m, (_, batch, _, _) in zip(self.members, outputs)]
                result.heatmap = overlay(first_view, np.mean(cams, axis=0))
            else:
                result.heatmap = overlay(first_view, self.members[0].heatmap(first_batch, top))
                result.warnings.append(
                    "heatmap of the first member only: the members crop or pad the image differently, so their "
                    "heatmaps do not line up"
                )
        result.seconds = time.perf_counter() - started
        return result

    def predict_files(self, paths, heatmap: bool | None = None) -> list[Prediction]:
        return [self.predict_file(p, heatmap) for p in paths]
