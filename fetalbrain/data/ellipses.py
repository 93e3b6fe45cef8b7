"""The fetal skull as an ellipse: fitted to a drawn outline or a segmentation mask, drawn back as a mask, measured.

Fetal biometry models the skull in the trans-thalamic plane as an ellipse (the HC18 challenge's annotations are
ellipse outlines drawn by sonographers; its measure is the ellipse's circumference). One geometry serves the
shipped annotations (``fetalbrain.data.compact --outlines``), the head finder's masks and the head frame.

Conventions: pixel coordinates of the image (x to the right, y down), centre in pixels, semi-axes in pixels
(``semi_major >= semi_minor``), ``angle`` in degrees in [0, 180): the direction of the major axis, measured from
the x axis towards the y axis (clockwise on screen), as OpenCV draws it.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

MIN_POINTS = 5  # an ellipse has five parameters


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    semi_major: float
    semi_minor: float
    angle: float  # degrees in [0, 180), the major axis's direction

    def scaled(self, sx: float, sy: float | None = None) -> "Ellipse":
        """The ellipse in an image resized by ``sx`` horizontally and ``sy`` vertically (default: ``sx``), with the
        resizers' pixel-centre convention (x' = (x + 0.5) sx - 0.5). A non-uniform scale gives another ellipse,
        recomputed exactly from its matrix form."""
        sy = sx if sy is None else sy
        cx, cy = (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5
        if math.isclose(sx, sy):
            return Ellipse(cx, cy, self.semi_major * sx, self.semi_minor * sx, self.angle)
        theta = math.radians(self.angle)
        rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        axes = np.diag([self.semi_major, self.semi_minor])
        transform = np.diag([sx, sy]) @ rotation @ axes  # unit circle -> the scaled ellipse
        u, singular, _ = np.linalg.svd(transform)
        major_direction = u[:, 0]
        angle = math.degrees(math.atan2(major_direction[1], major_direction[0])) % 180.0
        return Ellipse(cx, cy, float(singular[0]), float(singular[1]), angle)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}

    @property
    def circumference(self) -> float:
        """Ramanujan's second approximation (relative error below 1e-9 for a skull's eccentricity): HC18's measure."""
        a, b = self.semi_major, self.semi_minor
        h = ((a - b) / (a + b)) ** 2 if a + b > 0 else 0.0
        return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def fit_ellipse(points: np.ndarray) -> Ellipse | None:
    """The least-squares ellipse through ``points`` ((N, 2) x, y; OpenCV's direct fit); None with fewer than 5
    points or when they fit no ellipse (all on a line)."""
    import cv2

    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if len(points) < MIN_POINTS or np.linalg.matrix_rank(points - points.mean(axis=0)) < 2:
        return None
    (cx, cy), (width, height), angle = cv2.fitEllipse(points)
    if not all(map(math.isfinite, (cx, cy, width, height, angle))) or min(width, height) <= 0:
        return None
    if width < height:  # OpenCV's angle turns the first axis (width); make it the major one's
        width, height, angle = height, width, angle + 90.0
    return Ellipse(float(cx), float(cy), width / 2.0, height / 2.0, float(angle % 180.0))


def ellipse_from_outline(outline: np.ndarray, level: float = 0.5) -> Ellipse | None:
    """The ellipse through the pixels of a drawn outline (an HC18 annotation: a thin ellipse drawn on black)."""
    values = np.asarray(outline, dtype=np.float32)
    if values.ndim == 3:
        values = values.max(axis=2)
    if values.size == 0 or values.max() <= 0:
        return None
    ys, xs = np.nonzero(values >= level * values.max())
    return fit_ellipse(np.stack([xs, ys], axis=1))


def ellipse_from_mask(mask: np.ndarray) -> Ellipse | None:
    """The ellipse fitted to the boundary of the largest connected region of a binary mask (a segmentation)."""
    import cv2

    binary = (np.asarray(mask) > 0).astype(np.uint8)
    if binary.ndim != 2 or not binary.any():
        return None
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    largest = max(contours, key=cv2.contourArea)
    # Pixel centres of the boundary lie half a pixel inside the region's edge: fit the edge itself by pushing each
    # boundary point half a pixel away from the region's centre.
    points = largest.reshape(-1, 2).astype(np.float64)
    centre = points.mean(axis=0)
    offset = points - centre
    norm = np.linalg.norm(offset, axis=1, keepdims=True)
    points = points + 0.5 * offset / np.maximum(norm, 1e-9)
    return fit_ellipse(points)


def ellipse_mask(ellipse: Ellipse, shape: tuple[int, int]) -> np.ndarray:
    """The filled ellipse as a uint8 mask (1 inside) of ``shape`` (height, width), exact to the pixel centre."""
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    theta = math.radians(ellipse.angle)
    dx, dy = xs - ellipse.cx, ys - ellipse.cy
    along = dx * math.cos(theta) + dy * math.sin(theta)
    across = -dx * math.sin(theta) + dy * math.cos(theta)
    inside = (along / max(ellipse.semi_major, 1e-9)) ** 2 + (across / max(ellipse.semi_minor, 1e-9)) ** 2 <= 1.0
    return inside.astype(np.uint8)
