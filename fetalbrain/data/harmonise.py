"""Harmonised preprocessing: take away the scanner's signature outside the anatomy.

An ultrasound frame says where it was acquired before it shows any anatomy: the sector (fan) shape and the
fill around it (black in one source, a flat grey in the Roboflow export's rotated copies), burnt-in text,
calipers and grey-scale bars, the intensity range the sonographer chose, the aspect ratio. A classifier
trained on two sources can learn those cues instead of the head. Each step here removes one kind, is a
``data.harmonise.*`` key, and runs wherever the run's preprocessing runs (training, evaluate, predict,
ONNX-backed prediction, the GUI): it is stored with the checkpoint.

The sector is found by texture, not brightness: speckle varies locally, a fill does not. On a thumbnail
(``SECTOR_WORK_SIZE``, so the cost does not grow with the input size), pixels with local standard deviation
above ``sector_min_std`` and a mean above ``sector_min_level`` form regions; the convex hull of the largest
is the sector.
"""

import albumentations as A
import cv2
import numpy as np

SECTOR_WORK_SIZE = 128  # the thumbnail's longest side for finding the sector
INTENSITY_METHODS = ("none", "percentile", "equalise")


def sector_mask(
    image: np.ndarray, min_std: float = 3.0, min_level: float = 6.0, min_area: float = 0.25, window: int = 5
) -> np.ndarray:
    """Boolean mask of the ultrasound sector. All True (the whole frame) when no textured region is found, or when
    the one found covers less than ``min_area`` of the frame: on a dark, low-gain frame the speckle is too faint to
    find the sector by, and a crop to the few bright patches would throw the head away."""
    return _sector_mask(image, min_std, min_level, min_area, window).astype(bool)


def _sector_mask(image: np.ndarray, min_std: float, min_level: float, min_area: float, window: int = 5) -> np.ndarray:
    """``sector_mask`` as a 0/1 uint8 array: what OpenCV's masked operations take."""
    height, width = image.shape[:2]
    scale = SECTOR_WORK_SIZE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    mean = cv2.blur(small, (window, window))
    std = np.sqrt(np.maximum(cv2.blur(small * small, (window, window)) - mean * mean, 0))
    textured = ((std > min_std) & (mean > min_level)).astype(np.uint8)
    # Thin things go: text, bars, and the edge band of a flat fill (the std window straddles it).
    textured = cv2.morphologyEx(textured, cv2.MORPH_OPEN, np.ones((7, 7), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(textured, connectivity=8)
    if count <= 1:
        return np.ones((height, width), np.uint8)
    largest = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    # Its convex hull: a sector is convex, and dark smooth anatomy (fluid, the brain's interior) that reaches the
    # sector's edge has no speckle to be found by, but lies inside the hull.
    contours, _ = cv2.findContours(largest, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(largest)
    cv2.fillConvexPoly(filled, cv2.convexHull(np.vstack(contours)), 1)
    filled = cv2.erode(filled, np.ones((window, window), np.uint8))  # the std window reached half its size beyond
    if filled.mean() < min_area:
        return np.ones((height, width), np.uint8)
    return cv2.resize(filled, (width, height), interpolation=cv2.INTER_NEAREST)


class RemoveOverlays(A.ImageOnlyTransform):
    """Paint over small near-white marks (calipers, burnt-in text, measurement dots).

    A mark is a connected region of pixels at or above ``level`` no larger than ``max_area`` (a fraction of
    the image); larger bright regions (bone echoes) stay."""

    def __init__(self, level: int = 245, max_area: float = 0.002, p: float = 1.0):
        super().__init__(p=p)
        if not 0 < level <= 255:
            raise ValueError(f"data.harmonise.overlay_level={level}: must be in 1..255")
        if not 0 < max_area < 1:
            raise ValueError(f"data.harmonise.overlay_max_area={max_area}: must be a fraction in (0, 1)")
        self.level, self.max_area = level, max_area

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        bright = (img >= self.level).astype(np.uint8)
        if not bright.any():
            return img
        count, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
        is_mark = stats[:, cv2.CC_STAT_AREA] <= self.max_area * img.size
        is_mark[0] = False  # the background
        marks = is_mark[labels]
        if not marks.any():
            return img
        marks = cv2.dilate(marks.astype(np.uint8), np.ones((3, 3), np.uint8))  # their JPEG halo too
        # Filled with the mean of the unmarked pixels around them (a normalised box filter over the marks' bounding
        # box: ~20x cheaper than cv2.inpaint, and thin marks need no more).
        x, y, w, h = cv2.boundingRect(marks)
        x0, y0, x1, y1 = max(x - 8, 0), max(y - 8, 0), min(x + w + 8, img.shape[1]), min(y + h + 8, img.shape[0])
        box, keep = img[y0:y1, x0:x1].astype(np.float32), 1.0 - marks[y0:y1, x0:x1].astype(np.float32)
        around = cv2.blur(box * keep, (9, 9)) / np.maximum(cv2.blur(keep, (9, 9)), 1e-3)
        out = img.copy()
        out[y0:y1, x0:x1] = np.where(keep > 0, box, np.clip(around, 0, 255)).astype(img.dtype)
        return out

    def get_transform_init_args_names(self):
        return ("level", "max_area")


class Sector(A.ImageOnlyTransform):
    """Blank everything outside the sector (``mask``) and/or crop to the sector's bounding box (``crop``)."""

    def __init__(
        self,
        mask: bool = True,
        crop: bool = False,
        min_std: float = 3.0,
        min_level: float = 6.0,
        min_area: float = 0.25,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.mask, self.crop, self.min_std, self.min_level, self.min_area = mask, crop, min_std, min_level, min_area

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        inside = _sector_mask(img, self.min_std, self.min_level, self.min_area)
        if self.crop:
            x, y, w, h = cv2.boundingRect(inside)
            img, inside = img[y : y + h, x : x + w], inside[y : y + h, x : x + w]
        if self.mask:
            img = cv2.bitwise_and(img, img, mask=inside)
        return np.ascontiguousarray(img)

    def get_transform_init_args_names(self):
        return ("mask", "crop", "min_std", "min_level", "min_area")


class Vignette(A.ImageOnlyTransform):
    """Blank everything outside a centred ellipse spanning ``fraction`` of the image's width and height: one
    field-of-view shape for every source, so the sector's outline (fan, rectangle, octagon) and what lies in the
    corners say nothing. After ``crop_to_sector`` the ellipse sits on the sector's content."""

    def __init__(self, fraction: float = 0.8, p: float = 1.0):
        super().__init__(p=p)
        if not 0 < fraction <= 1.5:
            raise ValueError(f"data.harmonise.vignette={fraction}: a fraction of the image in (0, 1.5], or null (off)")
        self.fraction = fraction

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        height, width = img.shape[:2]
        inside = np.zeros((height, width), np.uint8)
        axes = (max(1, round(width * self.fraction / 2)), max(1, round(height * self.fraction / 2)))
        cv2.ellipse(inside, (width // 2, height // 2), axes, 0, 0, 360, 1, thickness=cv2.FILLED)
        return cv2.bitwise_and(img, img, mask=inside)

    def get_transform_init_args_names(self):
        return ("fraction",)


class IntensityNorm(A.ImageOnlyTransform):
    """Per-image grey levels, from the non-black pixels (the sector once masked): ``percentile`` maps the 1st to
    99th percentile onto 0-255, ``equalise`` flattens the histogram. Black stays black."""

    def __init__(self, method: str = "percentile", p: float = 1.0):
        super().__init__(p=p)
        if method not in INTENSITY_METHODS[1:]:
            raise ValueError(f"data.harmonise.intensity={method!r}: choose one of {', '.join(INTENSITY_METHODS)}")
        self.method = method

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        histogram = cv2.calcHist([img], [0], None, [256], [0, 256]).ravel()
        histogram[0] = 0  # black: outside the sector
        cdf = np.cumsum(histogram)
        if cdf[-1] < 16:
            return img
        if self.method == "percentile":
            low, high = np.searchsorted(cdf, (0.01 * cdf[-1], 0.99 * cdf[-1]))
            if high <= low:
                return img
            table = np.clip((np.arange(256) - low) * 255.0 / (high - low), 0, 255)
        else:
            first = cdf[np.flatnonzero(histogram)[0]]
            table = 255.0 * (cdf - first) / max(cdf[-1] - first, 1.0)
        table = table.round().astype(np.uint8)
        table[0] = 0
        return cv2.LUT(img, table)

    def get_transform_init_args_names(self):
        return ("method",)


class PadToSquare(A.ImageOnlyTransform):
    """Letterbox: pad the shorter side with black, centred, so the resize keeps the aspect ratio."""

    def __init__(self, p: float = 1.0):
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        height, width = img.shape[:2]
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        return cv2.copyMakeBorder(img, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT, 0)

    def get_transform_init_args_names(self):
        return ()


def harmonise_steps(options: dict | None) -> tuple[list, list, list]:
    """The steps ``data.harmonise`` asks for, as (framing: the head frame, first, on the image as it came, as the
    finder was trained; content steps: overlays → sector → vignette → intensity; geometry steps: the letterbox pad).
    Denoising goes after the framing, contrast enhancement between content and geometry, the resize last. Unknown
    keys are an error."""
    options = dict(options or {})
    unknown = set(options) - set(HARMONISE_DEFAULTS)
    if unknown:
        raise ValueError(
            f"data.harmonise: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(HARMONISE_DEFAULTS)}"
        )
    o = {**HARMONISE_DEFAULTS, **options}
    for key in ("head_frame", "remove_overlays", "mask_outside_sector", "crop_to_sector", "letterbox"):
        if not isinstance(o[key], bool):
            raise ValueError(f"data.harmonise.{key}={o[key]!r}: true or false")
    for key in ("sector_min_std", "sector_min_level"):
        if isinstance(o[key], bool) or not isinstance(o[key], (int, float)) or o[key] < 0:
            raise ValueError(f"data.harmonise.{key}={o[key]!r}: a number, 0 or more")
    area = o["sector_min_area"]
    if isinstance(area, bool) or not isinstance(area, (int, float)) or not 0 <= area < 1:
        raise ValueError(f"data.harmonise.sector_min_area={area!r}: a fraction of the frame in [0, 1)")
    if isinstance(o["vignette"], bool) or not (o["vignette"] is None or isinstance(o["vignette"], (int, float))):
        raise ValueError(
            f"data.harmonise.vignette={o['vignette']!r}: a fraction of the image in (0, 1.5], or null (off)"
        )
    if o["intensity"] not in INTENSITY_METHODS:
        raise ValueError(f"data.harmonise.intensity={o['intensity']!r}: choose one of {', '.join(INTENSITY_METHODS)}")
    framing = []
    if o["head_frame"]:
        from fetalbrain.data.head_frame import HeadFrame

        framing.append(
            HeadFrame(
                o["head_finder"], o["head_margin"], o["head_rotate"], o["head_accept_cut"], o["head_finder_sha256"]
            )
        )
    content = []
    if o["remove_overlays"]:
        content.append(RemoveOverlays(o["overlay_level"], o["overlay_max_area"]))
    if o["mask_outside_sector"] or o["crop_to_sector"]:
        content.append(
            Sector(
                o["mask_outside_sector"],
                o["crop_to_sector"],
                o["sector_min_std"],
                o["sector_min_level"],
                o["sector_min_area"],
            )
        )
    if o["vignette"]:
        content.append(Vignette(o["vignette"]))
    if o["intensity"] != "none":
        content.append(IntensityNorm(o["intensity"]))
    return framing, content, [PadToSquare()] if o["letterbox"] else []


def describe_harmonise(options: dict | None) -> str:
    """One line for people (the GUI, reports): which steps a run's preprocessing takes."""
    o = {**HARMONISE_DEFAULTS, **(options or {})}
    steps = [
        f"framed on the fetal head (margin {o['head_margin']:g}{', long axis horizontal' if o['head_rotate'] else ''})"
        if o["head_frame"]
        else "",
        "overlays painted over" if o["remove_overlays"] else "",
        "outside the sector blanked" if o["mask_outside_sector"] else "",
        "cropped to the sector" if o["crop_to_sector"] else "",
        f"elliptical window {o['vignette']:g}" if o["vignette"] else "",
        f"grey levels per image ({o['intensity']})" if o["intensity"] != "none" else "",
        "letterboxed" if o["letterbox"] else "",
    ]
    steps = [step for step in steps if step]
    return "harmonised: " + ", ".join(steps) if steps else "not harmonised (data/harmonise=none)"


def _defaults() -> dict:
    """``data/harmonise=none`` (every step off): what a checkpoint without ``harmonise`` in its preprocessing did,
    and every key's default. Read from the config itself, so the two cannot drift apart."""
    from omegaconf import OmegaConf

    from fetalbrain.project import PROJECT_ROOT

    return OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "data" / "harmonise" / "none.yaml"))


HARMONISE_DEFAULTS = _defaults()
