"""Calibration: expected calibration error, reliability bins, and temperature scaling.

Temperature scaling divides the logits by one scalar T fitted on validation (Guo et al., 2017): it
changes confidence, never the predicted class. We have probabilities; their logarithms are the
logits up to a per-row constant, which softmax ignores.
"""

import numpy as np
import torch


def reliability_bins(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
    return {"edges": edges, "count": count, "accuracy": accuracy, "confidence": mean_confidence}


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> float:
    bins = reliability_bins(probs, targets, n_bins)
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(gaps * bins["count"][filled]) / len(targets))


def negative_log_likelihood(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None))))


def fit_temperature(probs: np.ndarray, targets: np.ndarray, max_iter: int = 200) -> float:
    """The T > 0 that minimises validation NLL of softmax(log p / T)."""
    logits = torch.log(torch.as_tensor(probs, dtype=torch.float64).clamp_min(1e-12))
    target = torch.as_tensor(targets, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().item())


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, numerically stable."""
    scaled = logits / temperature
    scaled = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return scaled / scaled.sum(axis=1, keepdims=True)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(np.log(np.clip(probs, 1e-12, None)), temperature)
