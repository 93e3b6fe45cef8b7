"""Test-time augmentation (``model.tta``): the views of a batch, and their probabilities averaged as logits.

Its own module so that ``Predictor`` with an ONNX export uses it without importing Lightning."""

import math
from collections.abc import Callable, Sequence

import torch

TTA_MODES = ("none", "flip")


def check_tta(tta: str) -> str:
    if tta not in TTA_MODES:
        raise ValueError(f"model.tta={tta!r}: choose one of {', '.join(TTA_MODES)}")
    return tta


def tta_views(images: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views ``model.tta`` adds to a batch (N, C, H, W): ``flip``, its horizontal mirror (a fetal head faces
    either way; the transducer is always at the top, so never a vertical flip); ``none``, nothing."""
    return [images.flip(-1)] if check_tta(tta) == "flip" else []


def mean_probability_logits(view_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Logits whose softmax is the mean of the views' softmaxes (the log of the averaged probabilities), so that
    everything downstream (softmax, temperature scaling fitted on log-probabilities, thresholds) is unchanged.
    One view: its logits as they are."""
    if len(view_logits) == 1:
        return view_logits[0]
    log_probs = torch.stack([logits.float().log_softmax(dim=1) for logits in view_logits])
    return log_probs.logsumexp(dim=0) - math.log(len(view_logits))


def with_tta(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, logits: torch.Tensor, tta: str):
    """``logits`` (the plain pass over ``images``, already computed) averaged as probabilities with ``forward``'s
    logits of the views ``tta`` adds; without views, ``logits`` as they are. The one place TTA is combined: the
    test report, ``Predictor`` (PyTorch or ONNX) and the OOD and external checks all call it."""
    views = tta_views(images, tta)
    return mean_probability_logits([logits, *(forward(view) for view in views)]) if views else logits
