"""The canonical head frame (``data/harmonise=head``): every image cropped to its fetal head, so the network judges
the head in its own frame and not its size in the picture, the field of view or the sector.

A classifier trained on the export reads how large the head is in the frame: normal early-pregnancy heads (small in
the frame) are called ventriculomegaly. The fetal-biometry answer is to find the skull first. The head finder
(``fetalbrain.data.head_finding``) gives the skull's ellipse; the frame is a square centred on it whose side is the
ellipse's long axis times ``1 + 2 * margin`` (optionally rotated so the long axis lies horizontal), padded with
black where it reaches past the image. The network's resize comes after, so every head fills the same share of
the input.

A head cut by the frame edge is still a head to frame (``accept_cut``; its ellipse continues past the edge); where
the finder trusts no head (nothing found, two heads, low confidence, too small an image) the whole frame is kept,
and the reason is recorded per image (``HeadDecision``): a run lists them in ``head_frame.csv`` with the rate per
class. Decisions are remembered per image content (and, with a cache file, between runs), so training's epochs do
not run the finder again.
"""

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from fetalbrain.data.ellipses import Ellipse
from fetalbrain.data.head_finding import CUT

log = logging.getLogger(__name__)
# The rules that turn a finder's answer into a decision (here and in fetalbrain.data.head_finding) have a version:
# a change to them must not meet decisions remembered under the old ones (the cache file's name carries it).
DECISION_VERSION = 1
MAX_SIDE_RATIO = 3.0  # a frame more than this many times the image's longest side: an ellipse guessed past the edge
# Decisions by (finder SHA256, accept_cut), shared by every head frame of a process: a run's data set-up, its
# report's OOD fit and external check and its predictor see the same images through separate pipelines.
SHARED_DECISIONS: dict[tuple[str, bool, int], dict] = {}


@dataclass(frozen=True)
class HeadDecision:
    """What the head frame did with one image: ``framed`` on the head, or the whole frame kept and why."""

    framed: bool
    found: bool  # the finder's own verdict (a head cut by the edge is framed but not found: no measure)
    reason: str = ""
    confidence: float = 0.0
    ellipse: Ellipse | None = None

    def as_row(self) -> dict:
        ellipse = self.ellipse.as_dict("head_") if self.ellipse else dict.fromkeys(HEAD_COLUMNS, float("nan"))
        return {"framed": self.framed, "found": self.found, "reason": self.reason, "confidence": self.confidence,
                **ellipse}  # fmt: skip

    @classmethod
    def from_row(cls, row: dict) -> "HeadDecision":
        values = [row.get(column) for column in HEAD_COLUMNS]
        ellipse = Ellipse(*map(float, values)) if all(v is not None and v == v for v in values) else None
        if not isinstance(row["framed"], bool) or not isinstance(row["found"], bool) or (row["framed"] and not ellipse):
            raise ValueError(f"not a head-frame decision: {row}")
        return cls(row["framed"], row["found"], str(row["reason"]), float(row["confidence"]), ellipse)


HEAD_COLUMNS = [f"head_{name}" for name in ("cx", "cy", "semi_major", "semi_minor", "angle")]


def decide(head, accept_cut: bool, min_confidence: float, shape: tuple[int, int]) -> HeadDecision:
    """A ``FoundHead`` as a framing decision: frame on a found head, and on one cut by the frame edge (with
    ``accept_cut``, when the finder is as confident of it as of a found one, and its ellipse is not far larger than
    the image); else keep the whole frame."""
    if head.found:
        return HeadDecision(True, True, "", head.confidence, head.ellipse)
    if accept_cut and head.ellipse is not None and head.reason == CUT and head.confidence >= min_confidence:
        if 2 * head.ellipse.semi_major > MAX_SIDE_RATIO * max(shape):
            return HeadDecision(False, False, f"{CUT}, its ellipse far larger than the image", head.confidence,
                                head.ellipse)  # fmt: skip
        return HeadDecision(True, False, f"framed on a head that {CUT.removeprefix('the head ')}", head.confidence,
                            head.ellipse)  # fmt: skip
    return HeadDecision(False, False, head.reason, head.confidence, head.ellipse)  # the whole frame kept


def frame_on_head(image: np.ndarray, ellipse: Ellipse, margin: float, rotate: bool) -> np.ndarray:
    """The square around ``ellipse``: side = its long axis x (1 + 2 margin), centred on it, black beyond the image.
    Without ``rotate`` it is a crop at whole pixels (pixels copied, nothing resampled)."""
    side = max(2, round(2 * ellipse.semi_major * (1 + 2 * margin)))
    if rotate:
        # OpenCV's positive angle turns the picture counter-clockwise on screen: the long axis (clockwise from x by
        # ``angle``) comes to lie along x.
        matrix = cv2.getRotationMatrix2D((ellipse.cx, ellipse.cy), ellipse.angle, 1.0)
        matrix[:, 2] += ((side - 1) / 2 - ellipse.cx, (side - 1) / 2 - ellipse.cy)
        flags = cv2.INTER_LINEAR
    else:
        left, top = round(ellipse.cx - (side - 1) / 2), round(ellipse.cy - (side - 1) / 2)
        matrix, flags = np.float64([[1, 0, -left], [0, 1, -top]]), cv2.INTER_NEAREST
    return cv2.warpAffine(image, matrix, (side, side), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def image_key(image: np.ndarray) -> str:
    """What an image's decision is remembered by: its pixels and shape."""
    return hashlib.blake2b(image.tobytes() + str(image.shape).encode(), digest_size=16).hexdigest()


class HeadFrame(A.ImageOnlyTransform):
    """Crop each grey image to its head's frame (see the module's docstring); the whole frame where the finder
    trusts no head. ``finder``: ``shipped`` or a finder checkpoint's path; ``finder_sha256``: the finder a run was
    trained with (a different one is refused by name)."""

    def __init__(
        self,
        finder: str = "shipped",
        margin: float = 0.15,
        rotate: bool = False,
        accept_cut: bool = True,
        finder_sha256: str | None = None,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 1:
            raise ValueError(f"data.harmonise.head_margin={margin!r}: a fraction of the head's long axis in [0, 1]")
        for key, value in (("head_rotate", rotate), ("head_accept_cut", accept_cut)):
            if not isinstance(value, bool):
                raise ValueError(f"data.harmonise.{key}={value!r}: true or false")
        if not isinstance(finder, str) or not finder:
            raise ValueError(f"data.harmonise.head_finder={finder!r}: 'shipped' or the path of a finder checkpoint")
        self.finder, self.margin, self.rotate, self.accept_cut = finder, float(margin), rotate, accept_cut
        self.finder_sha256 = finder_sha256
        self._finder, self._path = None, None
        self.decisions: dict[str, HeadDecision] = {}

    def check_finder(self) -> Path:
        """The finder's file, once checked against ``finder_sha256`` (before any decision, remembered or not); from
        then on this frame shares the decisions of every frame with the same finder in the process."""
        if self._path is None:
            from fetalbrain.data.head_finding import resolve_finder
            from fetalbrain.project import sha256_file

            path = resolve_finder(self.finder)
            digest = sha256_file(path)
            if self.finder_sha256 and digest != self.finder_sha256:
                raise ValueError(
                    f"data.harmonise.head_finder={self.finder}: {path} has SHA256 {digest[:12]}…, but this run was "
                    f"trained with a finder of SHA256 {self.finder_sha256[:12]}…: another finder frames heads "
                    "differently, so the run's preprocessing cannot be reproduced with it"
                )
            self.finder_sha256, self._path = digest, path
            shared = SHARED_DECISIONS.setdefault((digest, self.accept_cut, DECISION_VERSION), {})
            shared.update(self.decisions)
            self.decisions = shared
        return self._path

    def load_finder(self):
        """The finder, loaded once (and checked)."""
        if self._finder is None:
            from fetalbrain.data.head_finding import load_head_finder

            self._finder = load_head_finder(self.check_finder())
        return self._finder

    def decide(self, image: np.ndarray) -> HeadDecision:
        self.check_finder()
        key = image_key(image)
        if key not in self.decisions:
            finder = self.load_finder()
            self.decisions[key] = decide(finder(image), self.accept_cut, finder.options.min_confidence, image.shape[:2])
        return self.decisions[key]

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        decision = self.decide(img)
        if not decision.framed:
            return img
        return frame_on_head(img, decision.ellipse, self.margin, self.rotate)

    # ---- decisions kept between runs (a JSON file per finder) ----------------------------------------------------
    def cache_file(self, folder: str | Path) -> Path:
        self.check_finder()
        return Path(folder) / f"{self.finder_sha256[:16]}_{int(self.accept_cut)}_v{DECISION_VERSION}.json"

    def read_cache(self, folder: str | Path) -> None:
        path = self.cache_file(folder)
        try:
            stored = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as error:  # a damaged cache costs a recomputation, nothing else
            log.warning("Head-frame cache %s unreadable (%s): the finder runs again", path, error)
            stored = {}
        damaged = 0
        for key, row in stored.items():
            try:
                self.decisions.setdefault(key, HeadDecision.from_row(row))
            except (KeyError, TypeError, ValueError):
                damaged += 1
        if damaged:
            log.warning("Head-frame cache %s: %d damaged entries left out (found again)", path, damaged)

    def write_cache(self, folder: str | Path) -> None:
        """Merge this frame's decisions into the cache file, written whole or not at all (a temporary file renamed
        into place: two runs writing at once leave one of them, never a torn file)."""
        path = self.cache_file(folder)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                stored = json.loads(path.read_text()) if path.is_file() else {}
            except (OSError, ValueError):
                stored = {}
            stored.update({key: decision.as_row() for key, decision in self.decisions.items()})
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(handle, "w") as f:
                json.dump(stored, f)
            os.replace(temporary, path)
        except OSError as error:  # a read-only folder costs the next run a recomputation, not this run
            log.warning("Head-frame cache %s not written (%s): the next run finds the heads again", path, error)

    def __getstate__(self):  # loader workers and DDP processes get the decisions; the net loads again if needed
        state = self.__dict__.copy()
        state["_finder"], state["decisions"] = None, dict(self.decisions)
        return state

    def get_transform_init_args_names(self):
        return ("finder", "margin", "rotate", "accept_cut", "finder_sha256")
