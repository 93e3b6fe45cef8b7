"""Synthetic-image quality metrics on Gaussian features whose right answers are known."""

import time

import numpy as np
import pytest
from scipy import linalg

from fetalbrain.evaluation.synthetic import (
    closest_pairs_figure,
    fid_kid,
    knn_precision_recall,
    memorisation,
    per_class_quality,
)


def gaussian(rng: np.random.Generator, n: int, d: int = 16, shift: float = 0.0) -> np.ndarray:
    """Correlated, anisotropic features: the same mixing for every call so sets share one distribution."""
    mix = np.random.default_rng(123).normal(size=(d, d)) / 4
    return rng.normal(size=(n, d)) @ mix + shift


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula, independent of torchmetrics: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b))."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def unbiased_mmd(a: np.ndarray, b: np.ndarray, degree: int = 3) -> float:
    """KID's unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3, written out directly."""
    kernel = lambda x, y: (x @ y.T / x.shape[1] + 1) ** degree  # noqa: E731
    m = len(a)
    k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    off = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(off - 2 * k_ab.mean())


def test_fid_is_zero_against_itself_and_grows_with_noise():
    rng = np.random.default_rng(0)
    real = gaussian(rng, 600)
    noise = rng.normal(size=real.shape)
    scale = np.trace(np.cov(real, rowvar=False))
    results = [fid_kid(real, real + std * noise) for std in (0.0, 0.05, 0.1, 0.3, 1.0)]
    fids = [r["fid"] for r in results]
    assert abs(fids[0]) < 1e-3 * scale
    assert all(later > earlier for earlier, later in zip(fids, fids[1:])), fids
    # KID is unbiased, but subsets drawn from one set share samples, which pulls it slightly below 0.
    self_kid = results[0]
    assert abs(self_kid["kid_mean"]) < 3 * self_kid["kid_std"]
    assert abs(self_kid["kid_mean"]) < 0.5 * results[-1]["kid_mean"]
    assert self_kid["n_real"] == self_kid["n_fake"] == 600 and self_kid["notes"] == []


def test_fid_and_kid_match_direct_formulas():
    rng = np.random.default_rng(1)
    real, fake = gaussian(rng, 400), 1.3 * gaussian(rng, 300, shift=0.2)
    assert fid_kid(real, fake, kid_subsets=3)["fid"] == pytest.approx(frechet_distance(real, fake), rel=1e-4)
    # Fewer images than features (rank-deficient covariances, as a few hundred images in 1,280 features), one set
    # smaller than the other: the same value as the textbook route.
    small_real, small_fake = gaussian(rng, 12, d=40), gaussian(rng, 9, d=40, shift=0.5)
    assert fid_kid(small_real, small_fake, kid_subsets=2)["fid"] == pytest.approx(
        frechet_distance(small_real, small_fake), rel=1e-6
    )
    # Subsets as large as both sets are mere permutations of them, so KID becomes exact and deterministic.
    full = fid_kid(real[:300], fake, kid_subset_size=300, kid_subsets=2)
    assert full["kid_mean"] == pytest.approx(unbiased_mmd(real[:300], fake), rel=1e-8)
    assert full["kid_std"] < 1e-10


def test_fid_kid_rejects_bad_input_and_clamps_the_kid_subset():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="at least 2 rows"):
        fid_kid(gaussian(rng, 10), gaussian(rng, 1))
    with pytest.raises(ValueError, match="features"):
        fid_kid(gaussian(rng, 10, d=16), gaussian(rng, 10, d=8))
    result = fid_kid(gaussian(rng, 30), gaussian(rng, 20), kid_subset_size=50, kid_subsets=5)
    assert np.isfinite(result["kid_mean"])
    assert any("clamped from 50 to 20" in note for note in result["notes"])


def test_knn_precision_recall_separates_fidelity_from_diversity():
    rng = np.random.default_rng(3)
    real = gaussian(rng, 500)
    same = knn_precision_recall(real, gaussian(rng, 500))
    assert same["precision"] > 0.7 and same["recall"] > 0.7

    # Mode collapse: every fake is one of five real samples, give or take a hair.
    collapsed = real[rng.integers(0, 5, size=500)] + 1e-3 * rng.normal(size=(500, real.shape[1]))
    mode_collapse = knn_precision_recall(real, collapsed)
    assert mode_collapse["precision"] > 0.9 and mode_collapse["recall"] < 0.1

    shifted = knn_precision_recall(real, gaussian(rng, 500, shift=2.0))
    assert shifted["precision"] < 0.1


def test_memorisation_flags_copies_but_not_independent_samples():
    rng = np.random.default_rng(4)
    train = gaussian(rng, 400)
    copied_rows = rng.choice(len(train), size=100, replace=False)
    copies = train[copied_rows] + 1e-4 * rng.normal(size=(100, train.shape[1]))
    copied = memorisation(train, copies)
    assert copied["fraction_below"] > 0.95
    np.testing.assert_array_equal(copied["nearest_train_index"], copied_rows)
    assert copied["nearest_distance"].shape == (100,) and copied["real_nn_distances"].shape == (400,)

    independent = memorisation(train, gaussian(rng, 300))
    assert independent["fraction_below"] < 0.2
    held_out = memorisation(train, gaussian(rng, 300), reference=gaussian(rng, 200))
    assert held_out["fraction_below"] < 0.2 and held_out["real_nn_distances"].shape == (200,)
    assert held_out["threshold"] == pytest.approx(np.percentile(held_out["real_nn_distances"], 5.0))


def test_per_class_quality_marks_tiny_classes(tmp_path):
    rng = np.random.default_rng(5)
    names = ["normal", "arachnoid-cyst", "vein-of-galen"]
    real = np.concatenate([gaussian(rng, 60), gaussian(rng, 40, shift=1.0), gaussian(rng, 5, shift=-1.0)])
    real_labels = np.repeat([0, 1, 2], [60, 40, 5])
    fake = np.concatenate([gaussian(rng, 50), gaussian(rng, 30, shift=1.0), gaussian(rng, 3, shift=-1.0)])
    fake_labels = np.repeat(names, [50, 30, 3])  # names work as well as indices
    table = per_class_quality(real, real_labels, fake, fake_labels, names, min_images=20, kid_subsets=10)

    assert list(table["class"]) == [*names, "overall"]
    assert {"n_real", "n_fake", "fid", "kid_mean", "precision", "recall", "note"} <= set(table.columns)
    tiny = table.set_index("class").loc["vein-of-galen"]
    assert np.isnan(tiny["fid"]) and np.isnan(tiny["precision"])
    assert tiny["note"] == "too few images for a stable FID (n_real=5, n_fake=3)"
    overall = table.set_index("class").loc["overall"]
    assert overall["n_real"] == 105 and overall["n_fake"] == 83 and np.isfinite(overall["fid"])
    assert table.set_index("class").loc["normal", "display_name"] == "Normal"


def test_closest_pairs_figure_writes_a_png(tmp_path):
    rng = np.random.default_rng(6)
    train_images = rng.integers(0, 256, size=(12, 32, 32), dtype=np.uint8)
    fake_images = np.concatenate([train_images[:3], rng.integers(0, 256, size=(7, 32, 32), dtype=np.uint8)])
    flat = lambda images: images.reshape(len(images), -1).astype(float)  # noqa: E731
    result = memorisation(flat(train_images), flat(fake_images))
    path = closest_pairs_figure(fake_images, train_images, result, tmp_path / "pairs.png", n=5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(np.argsort(result["nearest_distance"])[:3]) == [0, 1, 2]


def test_fid_and_kid_over_a_thousand_vectors_are_fast():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(1000, 256)), rng.normal(size=(1000, 256))
    start = time.perf_counter()
    result = fid_kid(real, fake)
    assert time.perf_counter() - start < 10
    assert np.isfinite(result["fid"]) and np.isfinite(result["kid_mean"])
