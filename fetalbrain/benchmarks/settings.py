"""The benchmark's settings turned into what its sections run: the (model, image size) pairs, the training config
of each, the torch backends, and plain values for the results."""

import torch
from hydra import compose
from omegaconf import DictConfig, open_dict


def train_config(bench: DictConfig, model: str, image_size: int) -> DictConfig:
    overrides = [
        f"model={model}",
        f"data.image_size={image_size}",
        f"data.batch_size={bench.batch_size}",
        "data.num_workers=0",
        f"model.channels_last={bench.channels_last}",
        f"model.compile={bench.compile}",
        "model.freeze_backbone_epochs=0",  # a frozen backbone would time a different step
        *bench.overrides,
    ]
    cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        if "pretrained" in cfg.model.net:  # weights do not change speed; never wait on a download
            cfg.model.net.pretrained = False
    return cfg


def model_sizes(bench: DictConfig) -> list[tuple[str, int]]:
    """(model, image size) pairs: every model at every ``image_sizes`` entry, or at its ``sizes_by_model``."""
    by_model = bench.sizes_by_model or {}
    for name in by_model:
        if name not in bench.models:
            raise ValueError(f"sizes_by_model.{name}: {name!r} is not one of models={list(bench.models)}")
    pairs = [(name, size) for size in bench.image_sizes for name in bench.models if name not in by_model]
    pairs += [(name, size) for name in bench.models if name in by_model for size in by_model[name]]
    if not pairs:
        raise ValueError("models / image_sizes: nothing to benchmark (both must name at least one)")
    return pairs


def configure_backends(bench: DictConfig) -> None:
    if bench.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(bench.cudnn_benchmark)
