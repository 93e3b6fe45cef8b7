"""Mean, std and 95 % t-interval over runs: one formula, so ``compare`` and the model card agree."""

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
