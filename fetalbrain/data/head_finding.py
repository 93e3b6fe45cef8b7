"""The trained head finder at work: a grey image in, the fetal skull's ellipse out, with a confidence, or the reason
no head can be trusted. What the head frame (``data/harmonise=head``), ``predict`` and the GUI run; the finder's
training and report are ``fetalbrain.models.head_finder``.

The net is segmentation-models-pytorch's U-Net on timm's EfficientNet-Lite0. Every image is resized to a square of
the finder's input size (it was trained with stretched and zoomed heads, so a square export and a 4:3 frame both
work) and the probability map is resized back, so the ellipse is in the image's own pixels.
"""

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from fetalbrain.data.ellipses import Ellipse, ellipse_from_mask, ellipse_mask
from fetalbrain.project import PROJECT_ROOT, sha256_file

MIN_SIDE = 16  # pixels: below this an image holds no head the finder could see
CUT = "the head is cut by the frame edge"  # the reason the head frame may still frame on (data.harmonise)
MIN_STD = 1.0  # grey levels: a flatter image holds no echoes (the net would still draw a blob on a black frame)
SHIPPED_FINDER = PROJECT_ROOT / "data" / "head-finder" / "head_finder.pt"  # with head_finder.sha256 and .md (its card)


def head_net(encoder: str, decoder_channels) -> torch.nn.Module:
    """smp's U-Net, one grey input channel, one output (the skull interior's logit), weights not yet loaded."""
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder, encoder_weights=None, in_channels=1, classes=1, decoder_channels=tuple(decoder_channels))


@dataclass
class FoundHead:
    """What the finder says about one image. ``found`` False comes with ``reason``; ``ellipse`` is in the image's
    pixels; ``confidence`` in [0, 1]: the region's mean probability times how well the ellipse covers it."""

    found: bool
    reason: str = ""
    ellipse: Ellipse | None = None
    confidence: float = 0.0
    probability: np.ndarray | None = field(default=None, repr=False)  # the map, at the image's size


def judge_probability(probability: np.ndarray, options) -> FoundHead:
    """The head in a probability map (the image's size): the largest region above ``options.threshold``, its
    ellipse and confidence, or the reason there is none: nothing found, too small, two heads, cut by the frame
    edge, or a region no ellipse fits."""
    import cv2

    height, width = probability.shape
    binary = (probability >= options.threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return FoundHead(False, "no fetal head found (no skull region)", probability=probability)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(areas)[::-1]
    largest = int(order[0]) + 1
    area = int(areas[order[0]]) / (height * width)
    if area < options.min_area:
        return FoundHead(
            False,
            f"no fetal head found (largest region {area:.1%} of the image < {options.min_area:.0%})",
            probability=probability,
        )
    if len(order) > 1 and areas[order[1]] >= options.second_region * areas[order[0]]:
        return FoundHead(False, "two head-like regions: which one is the head is unclear", probability=probability)
    region = labels == largest
    ellipse = ellipse_from_mask(region)
    if ellipse is None:
        return FoundHead(False, "no ellipse fits the head region", probability=probability)
    fitted = ellipse_mask(ellipse, (height, width)).astype(bool)
    agreement = float((fitted & region).sum() / max((fitted | region).sum(), 1))
    confidence = float(probability[region].mean()) * agreement
    if touches_edge(region, ellipse, options.edge_margin):
        return FoundHead(False, CUT, ellipse, confidence, probability)
    if confidence < options.min_confidence:
        return FoundHead(
            False,
            f"head found with low confidence ({confidence:.2f} < {options.min_confidence:g})",
            ellipse,
            confidence,
            probability,
        )
    return FoundHead(True, "", ellipse, confidence, probability)


def touches_edge(region: np.ndarray, ellipse: Ellipse, margin: int) -> bool:
    """A skull region within ``margin`` pixels of the border, or an ellipse reaching past it: part of the head is
    outside the frame, so its outline and measure are guesses."""
    height, width = region.shape
    if margin > 0 and (
        region[:, :margin].any()
        or region[:, width - margin :].any()
        or region[:margin].any()
        or region[height - margin :].any()
    ):
        return True
    theta = np.radians(ellipse.angle)
    half_x = np.hypot(ellipse.semi_major * np.cos(theta), ellipse.semi_minor * np.sin(theta))
    half_y = np.hypot(ellipse.semi_major * np.sin(theta), ellipse.semi_minor * np.cos(theta))
    return bool(
        ellipse.cx - half_x < -0.5
        or ellipse.cx + half_x > width - 0.5
        or ellipse.cy - half_y < -0.5
        or ellipse.cy + half_y > height - 0.5
    )


class HeadFinder:
    """A trained finder (``head_finder.pt``: weights and settings) applied to grey images of any size."""

    def __init__(self, net: torch.nn.Module, input_size: int, options):
        self.net, self.input_size, self.options = net.eval(), input_size, options

    @torch.no_grad()
    def probability(self, image: np.ndarray) -> np.ndarray:
        import cv2

        from fetalbrain.data.head_outlines import to_input, to_square

        height, width = image.shape
        logits = self.net(to_input(to_square(image, self.input_size))[None].to(next(self.net.parameters()).device))
        small = torch.sigmoid(logits)[0, 0].float().cpu().numpy()
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)

    def __call__(self, image: np.ndarray) -> FoundHead:
        image = np.asarray(image)
        if image.dtype != np.uint8:
            return FoundHead(False, f"expects an 8-bit image (0-255), got {image.dtype}: read it with read_grayscale")
        if image.ndim == 3:  # colour: the mean of the colour channels (an alpha channel is no colour)
            image = image[..., :3].mean(axis=2).astype(np.uint8)
        if image.ndim != 2 or min(image.shape) < MIN_SIDE:
            shape = "x".join(map(str, image.shape[::-1])) or "empty"
            return FoundHead(False, f"image too small to hold a head ({shape} px; at least {MIN_SIDE} px a side)")
        if image.std() < MIN_STD:
            return FoundHead(False, f"no fetal head found (a flat image: grey-level spread {image.std():.2f})")
        return judge_probability(self.probability(image), self.options)


def finder_options(find: dict) -> SimpleNamespace:
    """``model.find`` (conf/model/head_finder.yaml) as attributes."""
    return SimpleNamespace(**dict(find))


def resolve_finder(finder: str | Path | None) -> Path:
    """``shipped`` (or None): the finder that ships with the project, its SHA256 checked against
    ``head_finder.sha256``; else the path of a finder checkpoint (a run's or a slim one)."""
    if finder in (None, "shipped"):
        if not SHIPPED_FINDER.is_file():
            raise FileNotFoundError(f"{SHIPPED_FINDER}: no head finder ships with this copy of the project")
        expected = SHIPPED_FINDER.with_suffix(".sha256").read_text().split()[0]
        if sha256_file(SHIPPED_FINDER) != expected:
            raise ValueError(f"{SHIPPED_FINDER}: its SHA256 differs from head_finder.sha256 (a damaged copy)")
        return SHIPPED_FINDER
    path = Path(finder)
    if not path.is_file():
        raise FileNotFoundError(f"head finder {finder}: no such file (a finder checkpoint, or 'shipped')")
    return path


def load_head_finder(checkpoint=None) -> HeadFinder:
    """A trained finder from its checkpoint (a run's, a slim one, its contents as a dict, or by default the
    shipped one): the net, input size and settings."""
    if not isinstance(checkpoint, dict):
        checkpoint = resolve_finder(checkpoint)
    state = (
        checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location="cpu", weights_only=True)
    )
    hparams = dict(state.get("hyper_parameters") or {})
    if "find" not in hparams or "net" not in hparams:
        raise ValueError(f"{checkpoint if not isinstance(checkpoint, dict) else 'checkpoint'}: not a head finder's")
    net = head_net(hparams["net"]["encoder"], hparams["net"]["decoder_channels"])
    weights = {k.removeprefix("net."): v for k, v in state["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict({k: v.float() for k, v in weights.items()})
    return HeadFinder(net, hparams["preprocessing"]["image_size"], finder_options(hparams["find"]))
