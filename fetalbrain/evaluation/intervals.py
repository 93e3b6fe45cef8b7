"""Intervals, one home for each kind: over runs (``mean_interval``, a t-interval: ``compare`` and the model card
agree) and over the images of one set (percentile bootstraps, resampling images or, where frames of one examination
are alike, whole subjects or cases). A percentile interval of a bounded metric stays inside the metric's range."""

from collections.abc import Callable

import numpy as np


def mean_interval(values) -> dict:
    """``n``, ``mean``, ``std`` (ddof 1) and the 95 % t-interval of the values; NaN where too few to say.

    The caller drops missing values first (``compare`` drops NaN, the card every non-finite value).
    """
    from scipy import stats  # a second to import: here, so that importing this module stays cheap

    values = np.asarray(values, dtype=float)
    n = len(values)
    mean = float(values.mean()) if n else np.nan
    std = float(values.std(ddof=1)) if n > 1 else np.nan
    half = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n > 1 else np.nan
    return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half}


def percentile_interval(draws, confidence: float) -> tuple[float, float] | None:
    """The central ``confidence`` interval of a statistic's bootstrap draws, from its finite draws (a resample where
    it is undefined, e.g. one class drawn, is left out); None when no draw is finite."""
    draws = np.asarray(draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return None
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_intervals(
    score: Callable[[np.ndarray], dict[str, float]],
    keys,
    n: int,
    samples: int,
    seed: int,
    confidence: float,
    groups=None,
) -> dict[str, float]:
    """``<key>_ci_low`` / ``<key>_ci_high`` for each of ``keys``: a percentile bootstrap over the ``n`` images,
    resampled with replacement, or with ``groups`` (a case or subject per image) over whole groups, each drawn with
    all its images; ``score(index)`` computes every number on the images ``index`` draws, the same way as on the
    whole set. Nothing when ``samples`` is 0."""
    if samples <= 0:
        return {}
    rng = np.random.default_rng(seed)
    members = None
    if groups is not None:
        codes = np.unique(np.asarray(groups), return_inverse=True)[1]
        members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    draws: dict[str, list[float]] = {key: [] for key in keys}
    for _ in range(samples):
        if members is None:
            index = rng.integers(0, n, n)
        else:
            index = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        values = score(index)
        for key in draws:
            draws[key].append(values.get(key, np.nan))
    intervals = {}
    for key, values in draws.items():
        interval = percentile_interval(values, confidence)
        if interval is not None:
            intervals[f"{key}_ci_low"], intervals[f"{key}_ci_high"] = interval
    return intervals


def subject_bootstrap(
    indicators: dict[str, np.ndarray], subjects, samples: int, seed: int, confidence: float
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of fractions (the mean of each 0/1 array) resampling SUBJECTS (or cases) with
    replacement, each with all its frames: frames of one examination are alike, so resampling images would
    understate the spread.

    Each resample's fraction is its drawn subjects' positives over their images. Returns name -> (low, high);
    nothing when ``samples`` is 0."""
    if samples <= 0 or not indicators:
        return {}
    codes = np.unique(np.asarray(subjects), return_inverse=True)[1]
    counts = np.bincount(codes)  # images per subject
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(counts), (samples, len(counts)))  # one row of subjects per resample
    offsets = np.arange(samples)[:, None] * len(counts)  # times each subject is drawn, per resample:
    weights = np.bincount((drawn + offsets).ravel(), minlength=samples * len(counts)).reshape(samples, len(counts))
    images = weights @ counts
    intervals = {}
    for name, values in indicators.items():
        positives = np.bincount(codes, weights=np.asarray(values, dtype=float), minlength=len(counts))
        intervals[name] = percentile_interval((weights @ positives) / images, confidence)
    return intervals


def check_bootstrap(options, key: str) -> None:
    """Refuse bad bootstrap settings by key before anything runs."""
    if options is None:
        raise ValueError(f"{key}: missing (samples, seed, confidence)")
    if not isinstance(options.get("samples"), int) or options.samples < 0:
        raise ValueError(f"{key}.samples={options.get('samples')!r}: a whole number, 0 or more")
    if not isinstance(options.get("seed"), int):
        raise ValueError(f"{key}.seed={options.get('seed')!r}: a whole number")
    confidence = options.get("confidence")
    if not isinstance(confidence, float) or not 0 < confidence < 1:
        raise ValueError(f"{key}.confidence={confidence!r}: a fraction strictly between 0 and 1")
