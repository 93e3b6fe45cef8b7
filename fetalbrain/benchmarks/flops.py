"""FLOPs of a training step and model FLOP utilisation (MFU): counted FLOPs x steps per second ÷ the device's
peak, which comes from ``peak_tflops`` or the ``peak_tflops_table`` entry for the GPU's name."""

import copy
import logging
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

log = logging.getLogger(__name__)


def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """A convolution's backward pass: each gradient computed costs what the forward pass did.

    Replaces torch's formula (torch 2.14), which counts the weight gradient of a grouped convolution
    ``groups`` times over (a depthwise convolution's by its channel count: EfficientNet's training step
    came out at 42× its forward pass); see pytorch/pytorch#183405."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _count_flops(net, input_shape: tuple[int, ...], backward: bool, device: str) -> int:
    images = torch.randn(input_shape, device=device)
    targets = torch.zeros(input_shape[0], dtype=torch.long, device=device)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        if backward:
            F.cross_entropy(net(images), targets).backward()
        else:
            with torch.no_grad():
                net(images)
    return counter.get_total_flops()


def count_flops(net, input_shape: tuple[int, ...], backward: bool = True) -> int:
    """FLOPs of one step of ``net`` on a batch of ``input_shape``: the forward pass and, with ``backward``,
    the backward pass of a cross-entropy loss (every parameter's gradient, none for the input, as in training).

    ``FlopCounterMode`` counts matrix products and convolutions (the tensor-core work; a multiply-add is 2
    FLOPs) from the shapes the step really runs, so a backward pass is counted, not guessed as 2× the
    forward: the first layer computes no input gradient. It runs on the meta device (no memory, no compute,
    any batch and image size); a net with an operation the meta device lacks is counted on the CPU."""
    net = copy.deepcopy(net).cpu().train(backward)
    try:
        return _count_flops(copy.deepcopy(net).to("meta"), tuple(input_shape), backward, "meta")
    except (NotImplementedError, RuntimeError) as error:
        log.warning("Counting FLOPs on the CPU: the meta device cannot run this net (%s)", error)
        return _count_flops(net, tuple(input_shape), backward, "cpu")


def achieved_tflops(flops_per_step: float, images_per_s: float, batch_size: int) -> float:
    """FLOP/s actually done, in TFLOP/s: a step's FLOPs × steps per second (= images per second ÷ batch)."""
    return flops_per_step * images_per_s / batch_size / 1e12


def model_flop_utilisation(achieved: float, peak_tflops: float | None) -> float | None:
    """Achieved ÷ peak FLOP/s; unknown (None) without the device's peak."""
    return achieved / peak_tflops if peak_tflops else None


def table_peak_tflops(device_name: str, table: Mapping[str, float]) -> tuple[str, float] | None:
    """The ``peak_tflops_table`` entry for a GPU name: the longest key that occurs in it as whole words,
    ignoring case (``A100`` and ``A10G`` do not match ``A10``; ``H100 PCIe`` wins over ``H100``)."""
    name = device_name.lower()
    matches = [
        (str(key), float(value))
        for key, value in table.items()
        if re.search(rf"(?<![a-z0-9]){re.escape(str(key).lower())}(?![a-z0-9])", name)
    ]
    return max(matches, key=lambda match: len(match[0])) if matches else None


def device_peak(bench: DictConfig, device: torch.device, bf16: bool) -> dict:
    """The peak FLOP/s that MFU divides by (``peak_tflops``) and where it came from."""
    setting = bench.peak_tflops
    if setting is None:
        return {"tflops": None, "source": "peak_tflops=null"}
    if setting == "auto":
        if device.type != "cuda":
            return {"tflops": None, "source": "unknown on a CPU: set peak_tflops (TFLOP/s) to compute MFU"}
        name = torch.cuda.get_device_name(device)
        if not bf16:
            reason = f"peak_tflops_table holds bf16 peaks and this run is fp32 on {name}: set peak_tflops"
            log.warning("MFU not computed: %s", reason)
            return {"tflops": None, "source": reason}
        match = table_peak_tflops(name, bench.peak_tflops_table)
        if match is None:
            reason = f"{name!r} is not in peak_tflops_table: set peak_tflops (its dense bf16 TFLOP/s)"
            log.warning("MFU not computed: %s", reason)
            return {"tflops": None, "source": reason}
        return {"tflops": match[1], "source": f"peak_tflops_table[{match[0]!r}] ({name}, dense bf16)"}
    try:
        value = float(setting) if not isinstance(setting, bool) else float("nan")
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0:
        raise ValueError(f"peak_tflops={setting!r}: choose auto, null or the device's peak in TFLOP/s (> 0)")
    return {"tflops": value, "source": "peak_tflops"}
