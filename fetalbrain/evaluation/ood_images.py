"""An offline test set for the out-of-distribution detector: images that are clearly not fetal brain ultrasound.

Nothing is downloaded. Every image is built here or read from a file that ships with an installed package,
and the same seed gives the same images (a fixed package version gives the same photographs):

* ``photo``: natural photographs bundled with scikit-learn, matplotlib and gradio, as random crops and flips;
* ``pattern``: generated noise, gradients, checkerboards, gratings, shapes and flat images;
* ``document``: rendered text pages, tables and handwritten digits (scikit-learn's digits), some inverted;
* ``mask``: binary masks (filled ellipses like head segmentations, ellipse outlines like HC18 annotations,
  blobs, polygons);
* ``scientific``: other imaging: matplotlib's MRI slice and elevation maps.

``corrupted_images`` makes the "near-OOD" set apart: real test images under heavy noise, blur, occlusion or
inversion. They are still fetal brains, so they are reported separately from the OOD AUROC: whether a
detector should reject them is a choice (a clinician cannot read them either), not a failure.

Images are 8-bit grey squares at the size the caller asks for (the dataset's own resolution in the report),
so that they pass through exactly the resize and normalisation a real image passes through.
"""

import functools
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fetalbrain.data.images import to_grayscale_uint8

log = logging.getLogger(__name__)

OOD_KINDS = ("photo", "pattern", "document", "mask", "scientific")
CORRUPTIONS = ("noise", "blur", "occlusion", "inversion")
# Heavy on purpose: each makes the anatomy hard or impossible for a reader to see.
NOISE_STD = 80.0  # additive Gaussian noise, in grey levels (of 255)
BLUR_SIGMA = 0.04  # Gaussian blur, as a fraction of the image side (about 10 px at 256 px)
OCCLUDED_FRACTION = 0.5  # area covered by one random rectangle of noise or a flat grey

# Files shipped inside installed packages: (package, path inside it). A missing one is skipped with a warning.
PHOTOS = (
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("gradio", "media_assets/images/cheetah.jpg"),
    ("gradio", "media_assets/images/cheetah1.jpg"),
    ("gradio", "media_assets/images/lion.jpg"),
    ("gradio", "media_assets/images/tower.jpg"),
    ("gradio", "media_assets/images/groot.jpeg"),
    ("gradio", "media_assets/images/bus.png"),
)
WORDS = (
    "the patient report page date summary results method table figure invoice total amount account number "
    "meeting agenda minutes project budget section chapter reference notes review approved signature address "
    "phone email order quantity price item description please contact office hours monday friday annual"
).split()


@dataclass
class ImageSet:
    """Grey uint8 images, each with its kind (an OOD kind or a corruption) and a name saying how it was made."""

    images: list[np.ndarray] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def add(self, image: np.ndarray, kind: str, name: str) -> None:
        self.images.append(np.ascontiguousarray(image, dtype=np.uint8))
        self.kinds.append(kind)
        self.names.append(name)

    def __len__(self) -> int:
        return len(self.images)


def package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing it (gradio takes seconds to import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    array = np.nan_to_num(array.astype(np.float64))
    low, high = array.min(), array.max()
    return ((array - low) / (high - low) * 255 if high > low else np.zeros_like(array)).round().astype(np.uint8)


def _square(image: np.ndarray, size: int) -> np.ndarray:
    interpolation = cv2.INTER_AREA if min(image.shape[:2]) >= size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def _random_crop(image: np.ndarray, size: int, rng: np.random.Generator, full: bool) -> np.ndarray:
    """The whole image (``full``), or a square crop of 40-100 % of its short side, flipped half the time."""
    h, w = image.shape[:2]
    side = min(h, w) if full else int(min(h, w) * rng.uniform(0.4, 1.0))
    top = (h - side) // 2 if full else int(rng.integers(0, h - side + 1))
    left = (w - side) // 2 if full else int(rng.integers(0, w - side + 1))
    crop = image[top : top + side, left : left + side]
    if not full and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return _square(crop, size)


def _cycle(sources: list[tuple[str, np.ndarray]], count: int, size: int, rng, kind: str, out: ImageSet) -> None:
    """``count`` images from ``sources``: each source whole first, then random crops, round robin."""
    for index in range(count):
        name, image = sources[index % len(sources)]
        full = index < len(sources)
        out.add(_random_crop(image, size, rng, full), kind, f"{name}{'' if full else f' crop {index}'}")


# ---- the kinds ------------------------------------------------------------------------------------------------
def photos(count: int, size: int, rng: np.random.Generator, out: ImageSet) -> None:
    sources = []
    for package, relative in PHOTOS:
        path = package_file(package, relative)
        if path is None:
            log.warning("OOD photo %s/%s not found (another package version?): left out", package, relative)
            continue
        with Image.open(path) as image:
            sources.append((f"{package}:{Path(relative).name}", to_grayscale_uint8(image)[0]))
    if not sources:
        raise FileNotFoundError("no bundled photograph found (scikit-learn's sample images are a dependency)")
    _cycle(sources, count, size, rng, "photo", out)


def _pattern(index: int, size: int, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size] / size
    which = index % 8
    if which == 0:
        return "uniform noise", rng.integers(0, 256, (size, size))
    if which == 1:
        return "gaussian noise", np.clip(rng.normal(rng.uniform(60, 190), rng.uniform(20, 60), (size, size)), 0, 255)
    if which == 2:
        angle = rng.uniform(0, np.pi)
        return "linear gradient", _to_uint8(np.cos(angle) * x + np.sin(angle) * y)
    if which == 3:
        cy, cx = rng.uniform(0.2, 0.8, 2)
        return "radial gradient", _to_uint8(-np.hypot(y - cy, x - cx))
    if which == 4:
        cells = int(rng.integers(2, 17))
        return f"checkerboard {cells}x{cells}", ((np.floor(x * cells) + np.floor(y * cells)) % 2) * 255
    if which == 5:
        angle, frequency = rng.uniform(0, np.pi), rng.uniform(3, 30)
        return "sine grating", _to_uint8(np.sin(2 * np.pi * frequency * (np.cos(angle) * x + np.sin(angle) * y)))
    if which == 6:
        canvas = np.full((size, size), int(rng.integers(0, 256)), np.uint8)
        for _ in range(int(rng.integers(3, 9))):
            centre = tuple(int(v) for v in rng.integers(0, size, 2))
            colour = int(rng.integers(0, 256))
            if rng.random() < 0.5:
                cv2.circle(canvas, centre, int(rng.integers(size // 20, size // 4)), colour, -1)
            else:
                corner = tuple(int(v) for v in rng.integers(0, size, 2))
                cv2.rectangle(canvas, centre, corner, colour, -1)
        return "shapes", canvas
    return "flat", np.full((size, size), int(rng.integers(0, 256)))


def patterns(count: int, size: int, rng: np.random.Generator, out: ImageSet) -> None:
    for index in range(count):
        name, image = _pattern(index, size, rng)
        out.add(np.asarray(image).astype(np.uint8), "pattern", name)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def _text_page(size: int, rng: np.random.Generator) -> np.ndarray:
    page = Image.new("L", (size, size), int(rng.integers(215, 256)))
    draw = ImageDraw.Draw(page)
    ink = int(rng.integers(0, 70))
    line_height = int(rng.integers(max(6, size // 40), max(8, size // 12)))
    font = _font(line_height)
    margin = int(size * rng.uniform(0.04, 0.12))
    y = margin
    draw.text((margin, y), " ".join(rng.choice(WORDS, 3)).upper(), fill=ink, font=_font(int(line_height * 1.5)))
    y += int(line_height * 2.5)
    while y < size - margin - line_height:
        words, line = [], ""
        while True:
            candidate = " ".join([*words, str(rng.choice(WORDS))])
            if draw.textlength(candidate, font=font) > size - 2 * margin:
                break
            words, line = candidate.split(), candidate
        draw.text((margin, y), line, fill=ink, font=font)
        y += int(line_height * rng.uniform(1.3, 1.8))
    return np.asarray(page)


def _table(size: int, rng: np.random.Generator) -> np.ndarray:
    page = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(page)
    rows, columns = int(rng.integers(4, 12)), int(rng.integers(2, 6))
    font = _font(max(6, size // (3 * rows)))
    for r in range(rows + 1):
        draw.line([(0, r * size // rows), (size, r * size // rows)], fill=0, width=1)
    for c in range(columns + 1):
        draw.line([(c * size // columns, 0), (c * size // columns, size)], fill=0, width=1)
    for r in range(rows):
        for c in range(columns):
            text = str(rng.choice(WORDS)) if r == 0 or c == 0 else f"{rng.uniform(0, 1000):.2f}"
            draw.text((c * size // columns + 3, r * size // rows + 3), text, fill=0, font=font)
    return np.asarray(page)


@functools.cache
def _digit_images() -> np.ndarray:
    path = package_file("sklearn", "datasets/data/digits.csv.gz")
    if path is None:
        raise FileNotFoundError("scikit-learn's digits.csv.gz not found (a dependency of this project)")
    return np.loadtxt(path, delimiter=",")[:, :64].reshape(-1, 8, 8)


def _digits(size: int, rng: np.random.Generator) -> np.ndarray:
    # scikit-learn's handwritten digits, read from its data file (importing sklearn.datasets takes seconds):
    # 8x8, 0-16, one digit a row (the last column is the label); black on white once inverted.
    digits = _digit_images()
    per_side = int(rng.integers(3, 8))
    picks = digits[rng.integers(0, len(digits), per_side * per_side)]
    sheet = np.block([[picks[r * per_side + c] for c in range(per_side)] for r in range(per_side)])
    return _square(255 - _to_uint8(sheet), size)


def documents(count: int, size: int, rng: np.random.Generator, out: ImageSet) -> None:
    makers = (("text page", _text_page), ("table", _table), ("handwritten digits", _digits))
    for index in range(count):
        name, make = makers[index % len(makers)]
        image = make(size, rng)
        if rng.random() < 0.25:  # light text on dark, as in a screenshot of a terminal
            image, name = 255 - image, f"{name}, inverted"
        out.add(image, "document", name)


def masks(count: int, size: int, rng: np.random.Generator, out: ImageSet) -> None:
    for index in range(count):
        canvas = np.zeros((size, size), np.uint8)
        which = index % 4
        if which in (0, 1):  # a head: filled (a segmentation) or its outline (an HC18 annotation)
            centre = tuple(int(v) for v in rng.integers(size // 3, 2 * size // 3, 2))
            axes = tuple(int(v) for v in rng.integers(size // 6, size // 2.5, 2))
            cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1 if which == 0 else 2)
            name = "filled ellipse" if which == 0 else "ellipse outline"
        elif which == 2:
            smooth = cv2.GaussianBlur(rng.normal(size=(size, size)), (0, 0), size / rng.uniform(8, 24))
            canvas[smooth > np.quantile(smooth, rng.uniform(0.5, 0.85))] = 255
            name = "blobs"
        else:
            points = rng.integers(0, size, (int(rng.integers(3, 8)), 2)).astype(np.int32)
            cv2.fillPoly(canvas, [cv2.convexHull(points)], 255)
            name = "polygon"
        out.add(canvas, "mask", name)


def scientific(count: int, size: int, rng: np.random.Generator, out: ImageSet) -> None:
    folder = package_file("matplotlib", "mpl-data/sample_data")
    sources = []
    mri = package_file("matplotlib", "mpl-data/sample_data/s1045.ima.gz")
    if mri is not None:  # a 256x256 16-bit MRI slice (matplotlib's mri_demo)
        import gzip

        with gzip.open(mri) as handle:
            sources.append(("MRI slice", _to_uint8(np.frombuffer(handle.read(), np.uint16).reshape(256, 256))))
    for name, key in (("jacksboro_fault_dem.npz", "elevation"), ("topobathy.npz", "topo")):
        path = package_file("matplotlib", f"mpl-data/sample_data/{name}")
        if path is not None:
            with np.load(path) as data:
                sources.append((f"elevation map {name}", _to_uint8(data[key])))
    if not sources:
        raise FileNotFoundError(f"no matplotlib sample data found under {folder}")
    _cycle(sources, count, size, rng, "scientific", out)


MAKERS = {"photo": photos, "pattern": patterns, "document": documents, "mask": masks, "scientific": scientific}


def ood_images(per_kind: int, size: int, seed: int = 0, kinds: tuple[str, ...] = OOD_KINDS) -> ImageSet:
    """``per_kind`` images of each kind, ``size`` x ``size`` grey, the same for the same seed."""
    if per_kind < 1:
        raise ValueError(f"evaluation.ood.images_per_kind={per_kind}: must be at least 1")
    unknown = sorted(set(kinds) - set(MAKERS))
    if unknown:
        raise ValueError(f"unknown OOD image kinds {unknown}: choose from {list(MAKERS)}")
    out = ImageSet()
    for kind in kinds:  # each kind draws from its own stream: a subset of kinds gives the same images
        MAKERS[kind](per_kind, size, _rng(seed, OOD_KINDS.index(kind)), out)
    return out


def corrupt(image: np.ndarray, corruption: str, rng: np.random.Generator) -> np.ndarray:
    """One heavy corruption of a real image, at its own resolution (before the model's resize)."""
    if corruption == "noise":
        return np.clip(image + rng.normal(0, NOISE_STD, image.shape), 0, 255).astype(np.uint8)
    if corruption == "blur":
        return cv2.GaussianBlur(image, (0, 0), BLUR_SIGMA * max(image.shape))
    if corruption == "occlusion":
        h, w = image.shape
        aspect = rng.uniform(0.5, 2.0)
        rh = min(h, int(np.sqrt(OCCLUDED_FRACTION * h * w * aspect)))
        rw = min(w, int(OCCLUDED_FRACTION * h * w / rh))
        top, left = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
        out = image.copy()
        out[top : top + rh, left : left + rw] = (
            rng.integers(0, 256, (rh, rw)) if rng.random() < 0.5 else int(rng.integers(0, 256))
        )
        return out
    if corruption == "inversion":
        return 255 - image
    raise ValueError(f"unknown corruption {corruption!r}: choose from {list(CORRUPTIONS)}")


def corrupted_images(images: list[np.ndarray], per_kind: int, seed: int = 0) -> ImageSet:
    """``per_kind`` real images (drawn with the seed) under each corruption in ``CORRUPTIONS``."""
    out = ImageSet()
    if not images:
        return out
    for index, corruption in enumerate(CORRUPTIONS):
        rng = _rng(seed, len(OOD_KINDS) + index)
        picks = rng.choice(len(images), size=min(per_kind, len(images)), replace=False)
        for pick in picks:
            out.add(corrupt(images[int(pick)], corruption, rng), corruption, f"{corruption} of image {int(pick)}")
    return out
