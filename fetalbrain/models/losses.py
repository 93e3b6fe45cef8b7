"""Losses for 16 imbalanced classes with 1 to 20 cases each: cross-entropy, focal, logit-adjusted; class weights
(inverse frequency or the effective number of samples); label smoothing; hard or soft (mixup/cutmix) targets.

One formula covers every choice: with targets ``y`` (one-hot or mixed) smoothed to ``q = (1 - eps) y + eps / K``,
class weights ``w`` and log-probabilities ``log p`` (of ``logits + tau log prior`` for the logit-adjusted loss),
each image costs ``-sum_c w_c q_c (1 - p_c)^gamma log p_c`` (gamma = 0 but for focal), and the batch is
normalised by ``sum_i sum_c w_c y_ic``: for hard targets exactly PyTorch's weighted, smoothed cross-entropy.
"""

import torch
import torch.nn.functional as F

LOSSES = ("cross_entropy", "focal", "logit_adjusted")
CLASS_WEIGHTINGS = ("none", "balanced", "effective_number")


def check_loss_options(
    loss: str,
    class_weighting: str,
    label_smoothing: float,
    focal_gamma: float,
    class_balance_beta: float,
    logit_adjustment_tau: float = 1.0,
) -> None:
    """Refuse a bad loss setting by its key, before any training."""
    if loss not in LOSSES:
        raise ValueError(f"model.loss={loss!r}: choose one of {', '.join(LOSSES)}")
    if class_weighting not in CLASS_WEIGHTINGS:
        raise ValueError(f"model.class_weighting={class_weighting!r}: choose one of {', '.join(CLASS_WEIGHTINGS)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"model.label_smoothing={label_smoothing}: must be between 0.0 and 1.0")
    if focal_gamma < 0:
        raise ValueError(f"model.focal_gamma={focal_gamma}: must be >= 0 (0 is cross-entropy)")
    if not 0.0 <= class_balance_beta < 1.0:
        raise ValueError(f"model.class_balance_beta={class_balance_beta}: must be in [0, 1)")
    if logit_adjustment_tau < 0:
        raise ValueError(f"model.logit_adjustment_tau={logit_adjustment_tau}: must be >= 0 (0 is cross-entropy)")


def class_weights(counts: torch.Tensor, weighting: str, beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights from the training part's class counts; a class absent from training gets 0.

    ``balanced``: inverse frequency, ``N / (P n_c)`` over the P classes present (scikit-learn's "balanced": the
    average image weighs 1). ``effective_number`` (Cui et al. 2019, "Class-Balanced Loss Based on Effective Number
    of Samples"): ``(1 - beta) / (1 - beta^n_c)``, scaled to sum to P. Near-copies of one image add little
    information; beta -> 0 gives equal weights, beta -> 1 inverse frequency."""
    counts = counts.double()
    present = counts > 0
    weights = torch.zeros_like(counts) if weighting != "none" else torch.ones_like(counts)
    if weighting == "balanced":
        weights[present] = counts.sum() / (present.sum() * counts[present])
    elif weighting == "effective_number":
        weights[present] = (1.0 - beta) / (1.0 - beta ** counts[present])
        weights *= present.sum() / weights.sum()
    return weights.float()


def log_prior(counts: torch.Tensor) -> torch.Tensor:
    """Log class frequencies in the training part, for logit adjustment. A class absent from training is counted
    as one image (as rare as a class can be and still be seen): its log-prior stays finite, so that label
    smoothing's share of it does not make the loss infinite."""
    counts = counts.double().clamp_min(1.0)
    return (counts / counts.sum()).log().float()


def classification_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: str = "cross_entropy",
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    focal_gamma: float = 2.0,
    prior: torch.Tensor | None = None,
    tau: float = 1.0,
) -> torch.Tensor:
    """The mean loss of a batch. ``targets``: class indices (N,) or class probabilities (N, K) from mixup/cutmix.

    ``focal`` (Lin et al. 2017) down-weights images the model already gets right by ``(1 - p)^gamma``.
    ``logit_adjusted`` (Menon et al. 2021) trains on ``logits + tau * log prior`` (``prior``: ``log_prior``) and
    predicts with the plain logits: the rare classes' scores are no longer pushed down by their rarity."""
    if loss == "logit_adjusted":
        if prior is None:
            raise ValueError("model.loss=logit_adjusted needs the training part's class counts (none were given)")
        logits = logits + tau * prior.to(logits)
    if loss != "focal" and targets.ndim == 1:  # PyTorch's own kernel: bit for bit what training always did
        return F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing)
    num_classes = logits.shape[1]
    hard = targets if targets.ndim == 2 else F.one_hot(targets, num_classes)
    if hard.shape != logits.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} for logits of shape {tuple(logits.shape)}")
    hard = hard.float()
    log_p = logits.float().log_softmax(dim=1)
    cost = -(hard * (1.0 - label_smoothing) + label_smoothing / num_classes) * log_p
    if loss == "focal" and focal_gamma > 0:
        cost = cost * (1.0 - log_p.exp()).pow(focal_gamma)
    w = weight.float() if weight is not None else torch.ones(num_classes, device=logits.device)
    return (cost * w).sum() / (hard * w).sum()
