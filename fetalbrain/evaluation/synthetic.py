"""Quality of synthetic images, measured offline in whatever feature space the caller picks.

Inception weights cannot be downloaded here, and Inception features say little about ultrasound anyway, so
every function takes precomputed feature vectors (a trained classifier's penultimate layer, or raw pixels).
KID is torchmetrics' own maths, fed those vectors through an identity "feature extractor"; FID is the same
formula computed through the smaller of the sample and feature dimensions (``frechet_distance``);
precision/recall follow Kynkäänniemi et al. (2019); memorisation compares each fake's nearest training
neighbour with the real-to-real nearest-neighbour scale, so "close" is judged against how close two
independent real images usually are.
"""

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchmetrics.image.kid import KernelInceptionDistance  # noqa: E402

from fetalbrain.data.classes import display_name  # noqa: E402

# Rows of the distance matrix held at once: about 32 MB of float64, whatever the set sizes.
_CHUNK_ELEMENTS = 1 << 22


class PrecomputedFeatures(nn.Module):
    """Identity "feature extractor" so torchmetrics' KID runs on vectors we already have: it calls the module on
    whatever ``update`` receives."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected features of shape (N, {self.num_features}), got {tuple(x.shape)}")
        return x


def _features(x, name: str, min_rows: int = 2) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_samples, n_features), got shape {array.shape}")
    if array.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _pair(a, b, names: tuple[str, str], min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    a, b = _features(a, names[0], min_rows), _features(b, names[1], min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} has {a.shape[1]} features but {names[1]} has {b.shape[1]}")
    return a, b


def _root_factor(x: torch.Tensor) -> torch.Tensor:
    """A factor L with L Lᵀ = cov(x): the centred samples / sqrt(n - 1) (d x n) when there are fewer samples than
    features, else V·diag(√λ) from the d x d covariance's eigendecomposition (any such factor gives the same
    nuclear norm below)."""
    centred = (x - x.mean(dim=0)).T / math.sqrt(len(x) - 1)
    if centred.shape[1] <= centred.shape[0]:
        return centred
    values, vectors = torch.linalg.eigh(centred @ centred.T)
    return vectors * values.clamp_min(0).sqrt()


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂), in float64, exactly and without a d x d matrix square root.

    With Σᵢ = LᵢLᵢᵀ, the eigenvalues of Σ₁Σ₂ are those of (L₁ᵀL₂)(L₁ᵀL₂)ᵀ, so tr √(Σ₁Σ₂) is the sum of the singular
    values of L₁ᵀL₂ (its nuclear norm). Lᵢ has min(nᵢ, d) columns: a few hundred images in 1,280 features cost
    an SVD of a few hundred squared instead of the 1,280 x 1,280 non-symmetric eigenproblem of the textbook route
    (torchmetrics'), and the result has no imaginary part to discard."""
    real, fake = real.double(), fake.double()
    factor_real, factor_fake = _root_factor(real), _root_factor(fake)
    trace_root = torch.linalg.matrix_norm(factor_real.T @ factor_fake, ord="nuc")
    traces = factor_real.pow(2).sum() + factor_fake.pow(2).sum()
    return float((real.mean(0) - fake.mean(0)).pow(2).sum() + traces - 2 * trace_root)


def fid_kid(
    real: np.ndarray, fake: np.ndarray, kid_subset_size: int = 50, kid_subsets: int = 100, seed: int = 0
) -> dict:
    """FID and KID between two sets of feature vectors, in float64.

    FID fits one Gaussian per set, so it is biased upwards when n is not much larger than the feature
    dimension; KID (unbiased MMD over random subsets) is the one to trust for small sets. The KID subset
    size is clamped to the smaller set, and the clamp is reported in ``notes``. KID of a set against itself
    (or against an overlapping one) is slightly negative: a sample drawn into both subsets counts as a cross pair.
    """
    real, fake = _pair(real, fake, ("real", "fake"))
    notes: list[str] = []
    subset_size = int(kid_subset_size)
    if subset_size > min(len(real), len(fake)):
        subset_size = min(len(real), len(fake))
        notes.append(
            f"KID subset size clamped from {kid_subset_size} to {subset_size} (n_real={len(real)}, n_fake={len(fake)})"
        )
    if subset_size < 2:
        raise ValueError(f"kid_subset_size must be at least 2, got {kid_subset_size}")
    real_t, fake_t = torch.from_numpy(real), torch.from_numpy(fake)

    fid_value = frechet_distance(real_t, fake_t)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        kid = KernelInceptionDistance(
            feature=PrecomputedFeatures(real.shape[1]), subsets=int(kid_subsets), subset_size=subset_size
        )
    kid.set_dtype(torch.float64)
    kid.update(real_t, real=True)
    kid.update(fake_t, real=False)
    # KID draws its subsets from torch's global generator: seed a private fork so results repeat and the
    # caller's random stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": fid_value,
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "n_real": len(real),
        "n_fake": len(fake),
        "notes": notes,
    }


def _chunk_rows(n_columns: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, n_columns))


def _nearest(
    query: torch.Tensor, base: torch.Tensor, k: int = 1, exclude_self: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest distances (and indices) from each query row to ``base``, a chunk of rows at a time.

    With ``exclude_self`` the query is the base itself and each row's own entry is skipped (by index, so
    duplicate rows still count as neighbours at distance 0).
    """
    values, indices = [], []
    step = _chunk_rows(len(base))
    for start in range(0, len(query), step):
        distances = torch.cdist(query[start : start + step], base)
        if exclude_self:
            rows = torch.arange(distances.shape[0])
            distances[rows, rows + start] = math.inf
        chunk_values, chunk_indices = distances.topk(k, dim=1, largest=False)
        values.append(chunk_values)
        indices.append(chunk_indices)
    return torch.cat(values), torch.cat(indices)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    inside = []
    step = _chunk_rows(len(centres))
    for start in range(0, len(points), step):
        inside.append((torch.cdist(points[start : start + step], centres) <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict:
    """Improved precision (fakes inside the real manifold) and recall (reals covered by the fake manifold).

    Each set's manifold is the union of balls reaching every sample's k-th nearest neighbour in its own
    set (Kynkäänniemi et al., 2019). Unlike FID this separates "unrealistic" from "not diverse".
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    real, fake = _pair(real, fake, ("real", "fake"), min_rows=k + 1)
    real_t, fake_t = torch.from_numpy(real), torch.from_numpy(fake)
    real_radii = _nearest(real_t, real_t, k=k, exclude_self=True)[0][:, -1]
    fake_radii = _nearest(fake_t, fake_t, k=k, exclude_self=True)[0][:, -1]
    precision = _inside_any_ball(fake_t, real_t, real_radii).double().mean().item()
    recall = _inside_any_ball(real_t, fake_t, fake_radii).double().mean().item()
    return {"precision": precision, "recall": recall, "k": k}


def memorisation(
    train: np.ndarray, fake: np.ndarray, reference: np.ndarray | None = None, percentile: float = 5.0
) -> dict:
    """How many fakes sit closer to a training image than real images usually do.

    The scale is the distance from each ``reference`` sample (held-out reals, preferred) to its nearest
    training sample, or leave-one-out nearest-neighbour distances within ``train``. Independent samples give
    ``fraction_below`` close to ``percentile`` / 100; a generator that copies its training set, far more.
    """
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    train, fake = _pair(train, fake, ("train", "fake"), min_rows=1 if reference is not None else 2)
    train_t = torch.from_numpy(train)
    distance, index = _nearest(torch.from_numpy(fake), train_t)
    notes: list[str] = []
    if reference is None:
        real_nn = _nearest(train_t, train_t, exclude_self=True)[0][:, 0]
        scale = "leave-one-out nearest-neighbour distances within train"
    else:
        reference = _pair(train, reference, ("train", "reference"), min_rows=1)[1]
        real_nn = _nearest(torch.from_numpy(reference), train_t)[0][:, 0]
        scale = "distances from each reference sample to its nearest training sample"
    real_nn = real_nn.numpy()
    threshold = float(np.percentile(real_nn, percentile))
    if threshold == 0.0:
        notes.append(
            f"threshold is 0: at least {percentile}% of the real-to-real distances are 0 (duplicate rows), so no "
            "fake can fall below it; deduplicate the training features"
        )
    nearest_distance = distance[:, 0].numpy()
    return {
        "nearest_train_index": index[:, 0].numpy(),
        "nearest_distance": nearest_distance,
        "threshold": threshold,
        "percentile": float(percentile),
        "fraction_below": float(np.mean(nearest_distance < threshold)),
        "real_nn_distances": real_nn,
        "scale": scale,
        "notes": notes,
    }


def closest_pairs_figure(
    fake_images: Sequence[np.ndarray],
    train_images: Sequence[np.ndarray],
    result: dict,
    path: Path,
    n: int = 8,
    titles: Sequence[str] | None = None,
) -> Path:
    """The n fakes closest to a training image next to that image: the visual check behind ``fraction_below``.

    ``result`` is the output of :func:`memorisation`; ``titles`` (one per fake, e.g. its class) label the fakes.
    Pairs below the memorisation threshold get a red title.
    """
    distance = np.asarray(result["nearest_distance"])
    nearest = np.asarray(result["nearest_train_index"])
    order = np.argsort(distance, kind="stable")[: max(1, n)]
    pairs_per_row = min(len(order), 4)
    rows = math.ceil(len(order) / pairs_per_row)
    fig, axes = plt.subplots(
        rows, 2 * pairs_per_row, figsize=(2.2 * 2 * pairs_per_row, 2.9 * rows + 0.6), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    threshold = result.get("threshold")
    for slot, fake_index in enumerate(order):
        train_index = int(nearest[fake_index])
        below = threshold is not None and distance[fake_index] < threshold
        colour = "tab:red" if below else "black"
        ax_fake, ax_train = axes[slot // pairs_per_row, 2 * (slot % pairs_per_row) :][:2]
        label = str(titles[fake_index]) if titles is not None else f"fake {fake_index}"
        ax_fake.imshow(fake_images[fake_index], cmap="gray", vmin=0, vmax=255)
        ax_fake.set_title(f"{label}\nd = {distance[fake_index]:.3g}", fontsize=8, color=colour)
        ax_train.imshow(train_images[train_index], cmap="gray", vmin=0, vmax=255)
        ax_train.set_title(f"nearest train {train_index}", fontsize=8, color=colour)
    title = "Fakes closest to a training image (fake | nearest train)"
    if threshold is not None:
        title += (
            f"\nthreshold {threshold:.3g} = {result.get('percentile', 5.0):g}th percentile of real-to-real "
            f"distances; {result.get('fraction_below', float('nan')):.1%} of fakes below (red)"
        )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


PIXEL_SPACES = {True: "each image to zero mean and unit variance", False: "raw grey levels: brightness decides"}


def pixel_vectors(images: Sequence[np.ndarray], size: int, normalise: bool = True) -> np.ndarray:
    """Images as pixel vectors at ``size`` x ``size``; with ``normalise`` each image to zero mean and unit variance.

    Raw grey levels let brightness decide the nearest neighbour: a dark fake is "closest" to the darkest training
    image whatever it shows, and a near-black training image becomes everyone's neighbour. Normalised, the
    distance follows structure (it is a monotone function of the images' correlation)."""
    vectors = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA).ravel() / 255.0 for im in images])
    if not normalise:
        return vectors
    centred = vectors - vectors.mean(axis=1, keepdims=True)
    return centred / np.maximum(centred.std(axis=1, keepdims=True), 1e-6)


def _label_indices(labels, class_names: Sequence[str], name: str) -> np.ndarray:
    """Labels may be indices into ``class_names`` or the names themselves."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu":
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(f"{name} has indices outside 0..{len(class_names) - 1}")
        return labels.astype(int)
    lookup = {c: i for i, c in enumerate(class_names)}
    unknown = sorted({str(label) for label in labels} - set(lookup))
    if unknown:
        raise ValueError(f"{name} has labels not in class_names: {unknown}")
    return np.array([lookup[str(label)] for label in labels], dtype=int)


def per_class_quality(
    real_feats: np.ndarray,
    real_labels: np.ndarray,
    fake_feats: np.ndarray,
    fake_labels: np.ndarray,
    class_names: Sequence[str],
    min_images: int = 20,
    k: int = 3,
    kid_subset_size: int = 50,
    kid_subsets: int = 100,
    seed: int = 0,
) -> pd.DataFrame:
    """FID, KID, precision and recall per class plus an ``overall`` row.

    A generator can look fine overall while failing the rare anomalies, so each class is scored on its own;
    classes with fewer than ``min_images`` in either set get NaN rather than a number too noisy to read.
    """
    real_feats, fake_feats = _pair(real_feats, fake_feats, ("real_feats", "fake_feats"), min_rows=0)
    real_idx = _label_indices(real_labels, class_names, "real_labels")
    fake_idx = _label_indices(fake_labels, class_names, "fake_labels")
    if len(real_idx) != len(real_feats) or len(fake_idx) != len(fake_feats):
        raise ValueError("each feature set needs exactly one label per row")
    floor = max(int(min_images), k + 1, 2)

    def score(label: str, shown: str, real: np.ndarray, fake: np.ndarray) -> dict:
        row = {"class": label, "display_name": shown, "n_real": len(real), "n_fake": len(fake)}
        row |= dict.fromkeys(["fid", "kid_mean", "kid_std", "precision", "recall"], float("nan"))
        if min(len(real), len(fake)) < floor:
            row["note"] = f"too few images for a stable FID (n_real={len(real)}, n_fake={len(fake)})"
            return row
        quality = fid_kid(real, fake, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, seed=seed)
        pr = knn_precision_recall(real, fake, k=k)
        row |= {key: quality[key] for key in ("fid", "kid_mean", "kid_std")}
        row |= {"precision": pr["precision"], "recall": pr["recall"], "note": "; ".join(quality["notes"])}
        return row

    rows = [
        score(name, display_name(name), real_feats[real_idx == i], fake_feats[fake_idx == i])
        for i, name in enumerate(class_names)
    ]
    rows.append(score("overall", "Overall", real_feats, fake_feats))
    return pd.DataFrame(rows)


def matched_subsample(fake_labels, target_labels, rng: np.random.Generator) -> np.ndarray:
    """Indices of fakes with the same size and per-class counts as ``target_labels`` (capped per class by
    the fakes available): compared sets must share their class mix, or the scores measure the mix."""
    fake_labels, target_labels = np.asarray(fake_labels), np.asarray(target_labels)
    chosen = []
    for label, count in zip(*np.unique(target_labels, return_counts=True)):
        pool = np.flatnonzero(fake_labels == label)
        chosen.append(rng.choice(pool, size=min(count, len(pool)), replace=False))
    return np.concatenate(chosen) if chosen else np.array([], dtype=int)
