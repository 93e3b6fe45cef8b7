"""The statistics a study reports, computed once here rather than by each study.

Scores are computed from hard decisions and probabilities with the stage metrics' definitions
(``evaluation.metrics``): accuracy, balanced accuracy (classes present), macro F1 (classes present in the targets or
the decisions), macro one-vs-rest AUROC (classes present). Pooled out-of-fold: every image scored once per
replicate, by the model that did not train on its case, and each metric computed once over the pool (a mean of
per-fold scores over the classes present in each fold flatters). Intervals resample **cases** with all their
images (frames of one case are alike), the same draw for every replicate and, in a paired comparison, for both
conditions; percentiles of a bounded metric stay inside its range.

Paired comparisons over repeated cross-validation: the corrected resampled t-test (Nadeau & Bengio 2003),
t = mean(d) / sqrt((1/J + n_test/n_train) var(d)) with J = folds x replicates and df = J - 1, and a case-level
paired bootstrap of the pooled difference. Against a published accuracy: the exact binomial test.
"""

import warnings

import numpy as np
from scipy import stats

from fetalbrain.evaluation.intervals import percentile_interval

METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "auroc_macro")
LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "f1_macro": "macro F1",
    "auroc_macro": "macro AUROC",
}


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """One-vs-rest AUROC by ranks (Mann-Whitney), ties counted half."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.nan
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def scores(true: np.ndarray, probs: np.ndarray, metrics=METRICS) -> dict[str, float]:
    """The named metrics of one set of images (``true`` class indices, ``probs`` images x classes)."""
    true = np.asarray(true)
    if len(true) == 0:
        return {m: np.nan for m in metrics}
    num_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    support = np.bincount(true, minlength=num_classes)
    decided = np.bincount(predicted, minlength=num_classes)
    correct = np.bincount(true[predicted == true], minlength=num_classes)
    out = {}
    if "accuracy" in metrics:
        out["accuracy"] = float(correct.sum() / len(true))
    if "balanced_accuracy" in metrics:
        present = support > 0
        out["balanced_accuracy"] = float((correct[present] / support[present]).mean())
    if "f1_macro" in metrics:
        occurring = (support + decided) > 0
        out["f1_macro"] = float((2 * correct[occurring] / (support + decided)[occurring]).mean())
    if "auroc_macro" in metrics:
        present = np.flatnonzero((support > 0) & (support < len(true)))
        out["auroc_macro"] = (
            float(np.mean([_auroc(probs[:, c], true == c) for c in present])) if len(present) else np.nan
        )
    return out


def recall_per_class(true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Recall of each class (NaN where the class has no image)."""
    num_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    support = np.bincount(true, minlength=num_classes).astype(float)
    correct = np.bincount(true[predicted == true], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, correct / support, np.nan)


class CaseResampler:
    """The same case draws for every statistic of a study: ``draws[b]`` is the image index of resample ``b``
    (cases drawn with replacement, each with all its images)."""

    def __init__(self, cases, samples: int, seed: int):
        codes = np.unique(np.asarray(cases), return_inverse=True)[1]
        members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)] if len(codes) else []
        rng = np.random.default_rng(seed)
        self.num_cases = len(members)
        self.draws = [
            np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
            for _ in range(samples if members else 0)
        ]


def replicate_mean(true: np.ndarray, probs: np.ndarray, index=None, metrics=METRICS) -> dict[str, float]:
    """Each metric on every replicate's pooled predictions (``probs``: replicates x images x classes, aligned on
    one image order), averaged over replicates; on the images ``index`` picks, if given."""
    index = slice(None) if index is None else index
    per_replicate = [scores(true[index], p[index], metrics) for p in probs]
    return {m: float(np.nanmean([s[m] for s in per_replicate])) for m in metrics}


def pooled_with_intervals(true, probs, resampler: CaseResampler, confidence: float, metrics=METRICS) -> dict:
    """``{metric: (value, low, high)}``: the replicate-mean pooled score and its case-bootstrap interval."""
    value = replicate_mean(true, probs, None, metrics)
    draws = [replicate_mean(true, probs, index, metrics) for index in resampler.draws]
    out = {}
    for m in metrics:
        interval = percentile_interval([d[m] for d in draws], confidence) or (np.nan, np.nan)
        out[m] = (value[m], *interval)
    return out


def recall_with_intervals(true, probs, resampler: CaseResampler, confidence: float) -> np.ndarray:
    """Per-class recall (replicate mean) with case-bootstrap intervals: classes x (value, low, high)."""
    with warnings.catch_warnings():  # a class no drawn case has: NaN, left out of its interval
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        value = np.nanmean([recall_per_class(true, p) for p in probs], axis=0)
        draws = np.array(
            [np.nanmean([recall_per_class(true[i], p[i]) for p in probs], axis=0) for i in resampler.draws]
        ).reshape(len(resampler.draws), len(value))
    intervals = [percentile_interval(draws[:, c], confidence) or (np.nan, np.nan) for c in range(len(value))]
    return np.column_stack([value, np.array(intervals).reshape(len(value), 2)])


def paired_bootstrap(true, probs_a, probs_b, resampler: CaseResampler, metric: str, confidence: float) -> dict:
    """The pooled difference a - b (replicate means) with its case-level paired bootstrap interval and a two-sided
    bootstrap p-value (twice the smaller tail of the differences around 0)."""

    def difference(index):
        return (
            replicate_mean(true, probs_a, index, (metric,))[metric]
            - replicate_mean(true, probs_b, index, (metric,))[metric]
        )

    value = difference(None)
    draws = np.array([difference(index) for index in resampler.draws])
    draws = draws[np.isfinite(draws)]
    interval = percentile_interval(draws, confidence) or (np.nan, np.nan)
    p = float(min(1.0, 2 * min((draws <= 0).mean(), (draws >= 0).mean()))) if len(draws) else np.nan
    return {"difference": value, "ci_low": interval[0], "ci_high": interval[1], "p_bootstrap": p}


def corrected_resampled_t(differences, test_train_ratio: float, confidence: float = 0.95) -> dict:
    """Nadeau & Bengio's corrected resampled t-test of per-fold differences over repeated cross-validation, and the
    interval of the mean difference it implies (``t_ci_low``/``t_ci_high``).

    ``differences``: one per (replicate, fold); ``test_train_ratio``: n_test / n_train of a fold. The correction
    widens the variance for the overlap of the training sets; NaN with fewer than two differences or none varying."""
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    j = len(d)
    if j < 2 or np.var(d, ddof=1) == 0:
        return {"t": np.nan, "df": j - 1, "p_t": np.nan, "t_ci_low": np.nan, "t_ci_high": np.nan}
    se = np.sqrt((1 / j + test_train_ratio) * np.var(d, ddof=1))
    t, half = d.mean() / se, stats.t.ppf(0.5 + confidence / 2, j - 1) * se
    return {
        "t": float(t),
        "df": j - 1,
        "p_t": float(2 * stats.t.sf(abs(t), j - 1)),
        "t_ci_low": float(d.mean() - half),
        "t_ci_high": float(d.mean() + half),
    }


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN kept), for the number of comparisons a study makes."""
    p = np.asarray(p_values, dtype=float)
    finite = np.flatnonzero(np.isfinite(p))
    adjusted = np.full_like(p, np.nan)
    order = finite[np.argsort(p[finite])]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def binomial_against(correct: int, n: int, published: float, confidence: float) -> dict:
    """Exact binomial test of ``correct`` of ``n`` against a published accuracy, with the Clopper-Pearson interval."""
    result = stats.binomtest(int(correct), int(n), float(published))
    interval = result.proportion_ci(confidence_level=confidence, method="exact")
    return {"accuracy": correct / n, "ci_low": interval.low, "ci_high": interval.high, "p_binomial": result.pvalue}
