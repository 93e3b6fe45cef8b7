"""Out-of-distribution (OOD) detection: "this is not a fetal brain ultrasound", apart from "the class is unsure".

A low top-class probability says the model hesitates between anomalies; it says nothing about whether the
input is an ultrasound at all (a photograph can get a confident class). The detector scores how unlike the
training images an input is, in the trained classifier's own penultimate features (the input of its last
linear layer, which every net here has: timm models and ``SmallCNN`` alike), so it costs no second network:
the features come out of the forward pass that gives the class probabilities.

Methods (``evaluation.ood.method``), both standard and both fitted on the training part only:

* ``knn`` (default): deep nearest neighbours (Sun et al., ICML 2022). Features are L2-normalised and the score
  is the distance to the k-th nearest training feature. It assumes no distribution, which matters here: about a
  thousand training images, mostly augmented copies of a few dozen cases, in 1280 dimensions cannot support the
  class-conditional Gaussians Mahalanobis assumes, and several classes have a single case. On the default run
  (``make train``) k-NN separated the OOD test set from test images with AUROC 0.99 (k from 1 to 50 alike),
  Mahalanobis with 0.94 (0.70 on generated patterns), and the classifier's own confidence, or the energy score,
  with 0.49-0.53: chance. Fitting is storing the normalised training features (no optimisation: seconds on 2
  cores, for the forward passes); scoring is one matrix product (1,130 x 1,280 for the default run: 0.2 ms).
* ``mahalanobis``: class-conditional means with one shared covariance (Lee et al., NeurIPS 2018), here
  estimated with Ledoit-Wolf shrinkage because the features outnumber the training images; the score is the
  smallest squared Mahalanobis distance to a class mean.

The threshold is the ``keep_in_distribution`` quantile of the validation part's scores (validation holds other
cases than training, as the images a deployed model sees do), so that fraction of in-distribution images is
kept and the rest flagged. A higher score is more unlike training. The detector is saved as tensors and plain
values (``ood_detector.pt``, loads with ``torch.load(weights_only=True)``) with the feature size and the
SHA256 of the checkpoint whose features it was fitted on.
"""

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fetalbrain.data.transforms import inference_pipeline
from fetalbrain.data.tta import with_tta
from fetalbrain.project import sha256_file
from fetalbrain.runs.checkpoints import run_directory

log = logging.getLogger(__name__)

DETECTOR_FILE = "ood_detector.pt"  # in the run folder, beside checkpoints/
METHODS = ("knn", "mahalanobis")
FORMAT_VERSION = 1


class OODDetectorError(ValueError):
    """A detector file that cannot be used with this checkpoint; the message names the file."""


# ---- penultimate features -------------------------------------------------------------------------------------
@contextmanager
def penultimate_features(net: torch.nn.Module):
    """Collect the input of the net's classifier (its penultimate features) during forward passes.

    A hook on ``get_classifier()`` works for every net here (timm's ``forward_head(pre_logits=True)`` has no
    equivalent in ``SmallCNN``) and gives features and logits from one forward pass."""
    captured: list[torch.Tensor] = []
    handle = net.get_classifier().register_forward_hook(lambda m, i, o: captured.append(i[0].detach().flatten(1)))
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def features_and_logits(model, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of a batch, both float32 on the CPU. The model must be in eval mode
    (``load_classifier`` returns it so; ``image_features`` sets it): not set here, where it would cost per image."""
    with penultimate_features(model.net) as captured:
        logits = model(batch.to(model.device))
    return captured[-1].float().cpu(), logits.float().cpu()


def image_features(
    model, images: list[np.ndarray], batch_size: int = 64, tta: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and logits of decoded grey images, through the run's inference preprocessing; with
    ``model.tta`` the logits average the views as in the test report (``tta=False``: the plain pass only, for a
    caller that uses the features alone)."""
    model.eval()
    prep = model.hparams.preprocessing
    transform = inference_pipeline(prep)
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image=im)["image"] for im in images[start : start + batch_size]])
        if prep["channels"] == 3:
            batch = batch.expand(-1, 3, -1, -1)
        f, lg = features_and_logits(model, batch.contiguous())
        if tta:  # logits as the test report's (its thresholds were chosen on them); features of the plain pass
            with torch.no_grad():
                forward = lambda view: model(view.contiguous().to(model.device)).float().cpu()  # noqa: E731
                lg = with_tta(forward, batch, lg, model.hparams.get("tta", "none"))
        features.append(f)
        logits.append(lg)
    if not features:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(features).numpy(), torch.cat(logits).numpy()


# ---- the detector ---------------------------------------------------------------------------------------------
def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def _ledoit_wolf_precision(centred: np.ndarray) -> np.ndarray:
    from sklearn.covariance import LedoitWolf

    return LedoitWolf(assume_centered=True, store_precision=True).fit(centred).precision_


@dataclass
class OODDetector:
    """A fitted detector: ``score`` features (higher = more unlike training), ``flag`` scores above threshold."""

    method: str
    tensors: dict[str, torch.Tensor]
    feature_dim: int
    k: int = 1
    threshold: float | None = None
    keep_in_distribution: float | None = None
    checkpoint: str | None = None  # file name and SHA256 of the checkpoint whose features it was fitted on
    checkpoint_sha256: str | None = None
    facts: dict = field(default_factory=dict)  # fit sizes, for the report and the GUI

    @classmethod
    def fit(cls, method: str, features: np.ndarray, targets: np.ndarray, k: int = 1) -> "OODDetector":
        if method not in METHODS:
            raise ValueError(f"evaluation.ood.method={method!r}: choose one of {', '.join(METHODS)}")
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"the OOD detector needs training features of shape (N, D), got {tuple(x.shape)}")
        facts = {"train_images": len(x)}
        if method == "knn":
            if not 1 <= k <= len(x):
                raise ValueError(f"evaluation.ood.k={k}: must be between 1 and the {len(x)} training images")
            tensors = {"train": _normalise(x).contiguous()}
        else:
            targets = np.asarray(targets)
            classes = np.unique(targets)
            means = np.stack([features[targets == c].mean(axis=0) for c in classes]).astype(np.float64)
            centred = np.asarray(features, np.float64) - means[np.searchsorted(classes, targets)]
            precision = _ledoit_wolf_precision(centred)
            tensors = {
                "means": torch.as_tensor(means, dtype=torch.float32),
                "precision": torch.as_tensor(precision, dtype=torch.float32),
                "classes": torch.as_tensor(classes, dtype=torch.int64),
            }
            facts["classes"] = len(classes)
        return cls(method, tensors, int(x.shape[1]), k=int(k), facts=facts)

    @torch.no_grad()
    def score(self, features) -> np.ndarray:
        """One score per row of ``features`` (N x feature_dim), float64."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if x.shape[1] != self.feature_dim:
            raise OODDetectorError(
                f"OOD detector fitted on {self.feature_dim}-dimensional features, got {x.shape[1]}-dimensional ones"
            )
        if self.method == "knn":
            similarity = _normalise(x) @ self.tensors["train"].T  # cosine similarity to every training image
            kth = similarity.topk(self.k, dim=1).values[:, -1]
            scores = torch.sqrt(torch.clamp(2 - 2 * kth, min=0))  # Euclidean distance of unit vectors
        else:
            means, precision = self.tensors["means"], self.tensors["precision"]
            px = x @ precision
            distances = (px * x).sum(1, keepdim=True) - 2 * px @ means.T + ((means @ precision) * means).sum(1)
            scores = distances.min(dim=1).values
        return scores.double().numpy()

    def calibrate(self, val_features: np.ndarray, keep_in_distribution: float) -> np.ndarray:
        """Set the threshold at the ``keep_in_distribution`` quantile of validation scores; return those scores."""
        if not 0 < keep_in_distribution < 1:
            raise ValueError(
                f"evaluation.ood.keep_in_distribution={keep_in_distribution}: a fraction strictly between 0 and 1"
            )
        scores = self.score(val_features)
        if len(scores) == 0:
            raise ValueError("no validation images to choose the OOD threshold on")
        self.threshold = float(np.quantile(scores, keep_in_distribution, method="higher"))
        self.keep_in_distribution = float(keep_in_distribution)
        self.facts["val_images"] = len(scores)
        return scores

    def flag(self, scores) -> np.ndarray:
        """True where a score is above the threshold: not like the training images."""
        if self.threshold is None:
            raise ValueError("the OOD detector has no threshold: calibrate it on validation first")
        return np.asarray(scores) > self.threshold

    def describe(self) -> str:
        method = f"{self.k}-NN distance" if self.method == "knn" else "Mahalanobis distance"
        keep = (
            f", threshold {self.threshold:.4g} keeps {self.keep_in_distribution:.0%} of validation"
            if (self.threshold is not None and self.keep_in_distribution is not None)
            else ""
        )
        return f"{method} to {self.facts.get('train_images', '?')} training images' features{keep}"

    # ---- file ---------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        payload = {
            "format": FORMAT_VERSION,
            "method": self.method,
            "feature_dim": self.feature_dim,
            "k": self.k,
            "threshold": self.threshold,
            "keep_in_distribution": self.keep_in_distribution,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "facts": dict(self.facts),
            "tensors": {name: t.contiguous() for name, t in self.tensors.items()},
        }
        torch.save(payload, path)
        return path

    @classmethod
    def load(cls, path: str | Path, feature_dim: int | None = None) -> "OODDetector":
        """Read a detector file (weights_only: it never runs pickled code). ``feature_dim``, when given, must
        match the detector's: a detector fitted on another net's features is refused."""
        path = Path(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - truncated, not a torch file, pickled code: all unreadable
            raise OODDetectorError(f"{path}: not a readable OOD detector ({type(error).__name__}: {error})") from error
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
            raise OODDetectorError(f"{path}: not an OOD detector file of format {FORMAT_VERSION}")
        if payload.get("method") not in METHODS:
            raise OODDetectorError(f"{path}: unknown OOD method {payload.get('method')!r}")
        detector = cls(
            method=payload["method"],
            tensors=dict(payload["tensors"]),
            feature_dim=int(payload["feature_dim"]),
            k=int(payload["k"]),
            threshold=payload["threshold"],
            keep_in_distribution=payload["keep_in_distribution"],
            checkpoint=payload["checkpoint"],
            checkpoint_sha256=payload["checkpoint_sha256"],
            facts=dict(payload.get("facts") or {}),
        )
        if feature_dim is not None and feature_dim != detector.feature_dim:
            raise OODDetectorError(
                f"{path}: fitted on {detector.feature_dim}-dimensional features, but this checkpoint's net gives "
                f"{feature_dim}: the detector belongs to another model. Delete it (predictions then carry no OOD "
                "score) or train the run again"
            )
        return detector


def run_detector(checkpoint: str | Path, feature_dim: int) -> tuple[OODDetector | None, str]:
    """The detector of a checkpoint's run, or None and why not: the run has none, it has no threshold, or it was
    fitted on another checkpoint of the run (e.g. last.ckpt, not the best). A detector that cannot be read or was
    fitted on another net's features (``feature_dim``) raises :class:`OODDetectorError` naming the file."""
    checkpoint = Path(checkpoint)
    path = run_directory(checkpoint) / DETECTOR_FILE
    if not path.is_file():
        return None, (
            f"none: this run has no {DETECTOR_FILE} (trained before OOD detection, or with "
            "evaluation.ood.enabled=false), so no image is checked for being a fetal brain ultrasound"
        )
    detector = OODDetector.load(path, feature_dim=feature_dim)
    if detector.threshold is None:
        return None, f"none: {path} has no threshold"
    if detector.checkpoint_sha256 != sha256_file(checkpoint):
        return None, (
            f"none: {path.name} was fitted on the features of {detector.checkpoint}, not of {checkpoint.name}; "
            "use that checkpoint for the OOD check"
        )
    return detector, f"{detector.describe()} ({path.name})"


def fit_detector(
    method: str,
    train: tuple[np.ndarray, np.ndarray],
    val_features: np.ndarray,
    keep_in_distribution: float,
    k: int = 1,
) -> tuple[OODDetector, np.ndarray]:
    """Fit on the training part's features, threshold on validation's; return the detector and val scores."""
    detector = OODDetector.fit(method, *train, k=k)
    return detector, detector.calibrate(val_features, keep_in_distribution)


# ---- the training report's part ---------------------------------------------------------------------------------
def _auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(in_scores) == 0 or len(out_scores) == 0:
        return float("nan")
    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(labels, np.r_[in_scores, out_scores]))


def _max_softmax_scores(logits: np.ndarray) -> np.ndarray:
    """The baseline: 1 - the top class probability (what the GUI's low-confidence warning thresholds)."""
    return 1.0 - torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).max(dim=1).values.numpy()


def score_time_ms(detector: OODDetector, features: np.ndarray, repeats: int = 200) -> float:
    """Median time to score one image's features (the forward pass that gives them is the classifier's)."""
    rows = [features[i % len(features)][None] for i in range(repeats)]
    detector.score(rows[0])  # warm-up
    times = []
    for row in rows:
        started = time.perf_counter()
        detector.score(row)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def scores_figure(far: dict[str, np.ndarray], near: dict[str, np.ndarray], threshold: float, path: Path, title: str):
    """Histograms of OOD scores, threshold marked: the test part against each OOD kind (left) and against each
    corruption of test images (right). Outlines on two panels: cheap enough for every training run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = far["test"]
    everything = np.concatenate([v for group in (far, near) for v in group.values() if len(v)])
    bins = np.linspace(everything.min(), everything.max(), 40)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    panels = (("not fetal brain ultrasound", far), ("corrupted test images (near-OOD)", near))
    for ax, (name, groups) in zip(axes, panels):
        ax.hist(test, bins=bins, density=True, color="0.6", alpha=0.6, label=f"test images ({len(test)})")
        for index, (kind, scores) in enumerate((k, v) for k, v in groups.items() if k != "test" and len(v)):
            ax.hist(
                scores,
                bins=bins,
                density=True,
                histtype="step",
                lw=1.4,
                color=f"C{index}",
                label=f"{kind} ({len(scores)}, AUROC {_auroc(test, scores):.2f})",
            )
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3g} (chosen on val)")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("OOD score (higher: less like the training images)", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.86, wspace=0.15)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def check_options(options) -> None:
    """Refuse bad ``evaluation.ood`` settings by key (cheap: callable before training starts)."""
    if options.method not in METHODS:
        raise ValueError(f"evaluation.ood.method={options.method!r}: choose one of {', '.join(METHODS)}")
    if not isinstance(options.k, int) or options.k < 1:
        raise ValueError(f"evaluation.ood.k={options.k!r}: a whole number of neighbours, at least 1")
    keep = options.keep_in_distribution
    if not isinstance(keep, float) or not 0 < keep < 1:
        raise ValueError(f"evaluation.ood.keep_in_distribution={keep!r}: a fraction strictly between 0 and 1")
    if not isinstance(options.images_per_kind, int) or options.images_per_kind < 1:
        raise ValueError(f"evaluation.ood.images_per_kind={options.images_per_kind!r}: a whole number, at least 1")
    if not isinstance(options.seed, int):
        raise ValueError(f"evaluation.ood.seed={options.seed!r}: a whole number")


def ood_report(model, datamodule, run_dir: Path, options, checkpoint: str | None) -> tuple[dict, list[str], dict]:
    """Fit the detector on the training part (the model holds the tested weights), threshold it on validation,
    score the test part, the OOD set and the corrupted test images; save it and its figure into ``run_dir``.

    Metrics: ``ood/auroc`` (OOD set vs test images), ``ood/auroc_<kind>``, ``ood/flag_rate_<kind>``,
    ``ood/test_flag_rate``, ``ood/val_flag_rate``, ``ood/ood_flag_rate``, ``ood/corrupted_flag_rate``,
    ``ood/corrupted_auroc`` and per corruption, ``ood/threshold``, ``ood/score_ms`` and the baseline
    ``ood/baseline_msp_auroc`` (1 - top class probability as the score). Returns (metrics, notes, figures).

    A bad ``evaluation.ood`` setting found only now (after training) gives a note naming the key and no
    detector, rather than losing the run's report; ``check_options`` finds it before training."""
    try:
        check_options(options)
    except ValueError as error:
        log.error("No OOD detector: %s", error)
        return {}, [f"no OOD detector: {error}"], {}
    from fetalbrain.evaluation.ood_images import corrupted_images, ood_images
    from fetalbrain.runs.integrity import sha256_file

    started = time.perf_counter()
    parts = {part: datamodule.part_images(part) for part in ("train", "val", "test")}
    if len(parts["val"][1]) == 0 or len(parts["test"][1]) == 0:
        return {}, ["no validation or test images: no OOD detector (its threshold is chosen on validation)"], {}
    features = {part: image_features(model, images, tta=part == "test") for part, (images, _) in parts.items()}
    try:
        detector, val_scores = fit_detector(
            options.method,
            (features["train"][0], parts["train"][1]),
            features["val"][0],
            options.keep_in_distribution,
            k=options.k,
        )
    except ValueError as error:  # e.g. evaluation.ood.k above the number of training images
        log.error("No OOD detector: %s", error)
        return {}, [f"no OOD detector: {error}"], {}
    if checkpoint:
        detector.checkpoint, detector.checkpoint_sha256 = Path(checkpoint).name, sha256_file(checkpoint)
    detector.save(run_dir / DETECTOR_FILE)

    test_images = parts["test"][0]
    size = int(max(test_images[0].shape))  # the dataset's resolution: OOD images get the same resize
    ood = ood_images(options.images_per_kind, size, options.seed)
    corrupted = corrupted_images(test_images, options.images_per_kind, options.seed)
    ood_features, ood_logits = image_features(model, ood.images)
    corrupted_features, _ = image_features(model, corrupted.images, tta=False)
    test_scores, ood_scores = detector.score(features["test"][0]), detector.score(ood_features)
    corrupted_scores = detector.score(corrupted_features) if len(corrupted) else np.zeros(0)
    ood_kinds, corrupted_kinds = np.asarray(ood.kinds), np.asarray(corrupted.kinds)

    metrics = {
        "ood/auroc": _auroc(test_scores, ood_scores),
        "ood/threshold": detector.threshold,
        "ood/val_flag_rate": float(detector.flag(val_scores).mean()),
        "ood/test_flag_rate": float(detector.flag(test_scores).mean()),
        "ood/ood_flag_rate": float(detector.flag(ood_scores).mean()),
        "ood/baseline_msp_auroc": _auroc(_max_softmax_scores(features["test"][1]), _max_softmax_scores(ood_logits)),
        "ood/score_ms": score_time_ms(detector, features["test"][0]),
    }
    far, near = {"test": test_scores}, {}
    for kind in dict.fromkeys(ood.kinds):
        scores = ood_scores[ood_kinds == kind]
        metrics[f"ood/auroc_{kind}"] = _auroc(test_scores, scores)
        metrics[f"ood/flag_rate_{kind}"] = float(detector.flag(scores).mean())
        far[kind] = scores
    if len(corrupted):
        metrics["ood/corrupted_auroc"] = _auroc(test_scores, corrupted_scores)
        metrics["ood/corrupted_flag_rate"] = float(detector.flag(corrupted_scores).mean())
        for kind in dict.fromkeys(corrupted.kinds):
            scores = corrupted_scores[corrupted_kinds == kind]
            metrics[f"ood/corrupted_auroc_{kind}"] = _auroc(test_scores, scores)
            metrics[f"ood/corrupted_flag_rate_{kind}"] = float(detector.flag(scores).mean())
            near[kind] = scores

    import pandas as pd

    test_paths = list(datamodule.part_table("test")["path"])
    pd.DataFrame(
        {
            "set": ["test"] * len(test_scores) + ["ood"] * len(ood) + ["corrupted"] * len(corrupted),
            "kind": ["test"] * len(test_scores) + ood.kinds + corrupted.kinds,
            "image": test_paths[: len(test_scores)] + ood.names + corrupted.names,
            "score": np.r_[test_scores, ood_scores, corrupted_scores],
            "flagged": detector.flag(np.r_[test_scores, ood_scores, corrupted_scores]),
        }
    ).to_csv(run_dir / "ood_scores.csv", index=False)
    figure = scores_figure(
        far,
        near,
        detector.threshold,
        run_dir / "ood_scores.png",
        f"OOD scores ({detector.describe()})",
    )
    notes = []
    if metrics["ood/test_flag_rate"] > 2 * (1 - detector.keep_in_distribution):
        notes.append(
            f"the OOD detector flags {metrics['ood/test_flag_rate']:.0%} of test images (validation: "
            f"{metrics['ood/val_flag_rate']:.0%}): test images are less like training than validation's are"
        )
    log.info(
        "OOD: AUROC %.3f (OOD set vs test), test flag rate %.3f, corrupted flag rate %s (fitted and tested in %.1f s)",
        metrics["ood/auroc"],
        metrics["ood/test_flag_rate"],
        f"{metrics.get('ood/corrupted_flag_rate', float('nan')):.3f}",
        time.perf_counter() - started,
    )
    return metrics, notes, {"ood/scores": figure}
