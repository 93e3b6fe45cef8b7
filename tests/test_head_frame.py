"""The canonical head frame (data/harmonise=head): every image cropped to its head at one scale, the whole frame kept
with a reason where the finder trusts no head, decisions remembered per image and between runs, another finder
refused by name. Identical tensors in training, predict and ONNX: tests/test_harmonise.py."""

import albumentations as A
import cv2
import numpy as np
import pytest

from fetalbrain.data.ellipses import Ellipse, ellipse_from_mask, ellipse_mask
from fetalbrain.data.head_finding import CUT, FoundHead
from fetalbrain.data.head_frame import SHARED_DECISIONS, HeadFrame, decide, frame_on_head
from fetalbrain.data.head_outlines import ellipse_of, read_heads
from fetalbrain.data.images import read_grayscale
from fetalbrain.data.transforms import preprocessing
from tests.conftest import ROOT

HEADS = ROOT / "data" / "hc18-normal-heads"


@pytest.mark.parametrize("rotate", [False, True])
def test_the_frame_centres_the_head_at_one_scale(rotate):
    """A drawn ellipse, small and large, off-centre and tilted: in its frame it is centred, its long axis is
    1 / (1 + 2 margin) of the side, and with rotate it lies horizontal; beyond the image the frame is black."""
    for drawn in (Ellipse(40.0, 70.0, 20.0, 14.0, 30.0), Ellipse(150.0, 90.0, 70.0, 50.0, 120.0)):
        image = ellipse_mask(drawn, (180, 240)).astype(np.uint8) * 200 + 20
        framed = frame_on_head(image, drawn, 0.15, rotate)
        side = round(2 * drawn.semi_major * 1.3)
        assert framed.shape == (side, side)
        found = ellipse_from_mask(framed == 220)
        assert abs(found.cx - (side - 1) / 2) < 1.0 and abs(found.cy - (side - 1) / 2) < 1.0
        assert found.semi_major == pytest.approx(drawn.semi_major, abs=1.0)
        if rotate:
            assert min(found.angle, 180 - found.angle) < 2.0
        else:
            assert found.angle == pytest.approx(drawn.angle, abs=2.0)
    corner = frame_on_head(image, Ellipse(5.0, 5.0, 30.0, 20.0, 0.0), 0.15, False)
    assert (corner[:20, :20] == 0).all()  # past the image's top-left corner


def test_real_heads_are_framed_and_remembered(tmp_path):
    """The shipped finder frames HC18 heads of three sizes so that the drawn skull fills the same share of the frame
    (whatever its share of the picture); a second pass over the same pixels, or a new frame reading the cache file,
    asks the finder nothing."""
    table = read_heads(HEADS).sort_values("head_width_fraction")
    rows = list(table.iloc[[0, len(table) // 2, -1]].itertuples())
    SHARED_DECISIONS.clear()
    frame = HeadFrame(margin=0.15)
    shares = []
    for row in rows:
        image = read_grayscale(row.path)
        decision = frame.decide(image)
        assert decision.framed and decision.confidence > 0.5, decision.reason
        framed = frame(image=image)["image"]
        truth = ellipse_of(row)
        shares.append(2 * truth.semi_major / framed.shape[1])
        assert framed.shape[0] == framed.shape[1]
    assert shares[0] == pytest.approx(1 / 1.3, abs=0.08) and max(shares) - min(shares) < 0.1
    frame.write_cache(tmp_path)

    class NoFinder:
        def __call__(self, image):
            raise AssertionError("the finder ran again")

    frame._finder = NoFinder()
    assert frame.decide(read_grayscale(rows[0].path)).framed
    wider = HeadFrame(margin=0.3)
    wider._finder = NoFinder()
    assert wider.decide(read_grayscale(rows[0].path)).framed  # shared in the process, not per frame
    SHARED_DECISIONS.clear()  # a new process: only the cache file remembers
    again = HeadFrame(margin=0.15, finder_sha256=frame.finder_sha256)
    again._finder = NoFinder()
    again.read_cache(tmp_path)
    assert [again.decide(read_grayscale(row.path)) for row in rows] == [
        frame.decide(read_grayscale(r.path)) for r in rows
    ]


def test_no_trusted_head_keeps_the_whole_frame_with_its_reason():
    """A black frame, a 1x1 image, noise, two heads side by side: never a crash, never a crop that looks found; the
    image passes unchanged and the reason is recorded. A head cut by the frame edge is framed, and says so."""
    head = read_grayscale(HEADS / "images" / read_heads(HEADS).iloc[300]["file"])
    noise = np.random.default_rng(0).integers(0, 255, (120, 160)).astype(np.uint8)
    cases = {
        "flat image": np.zeros((100, 100), np.uint8),
        "too small": np.zeros((1, 1), np.uint8),
        "no skull region": noise,
        "two head-like regions": np.hstack([head, head]),
    }
    frame = HeadFrame()
    for reason, image in cases.items():
        decision = frame.decide(image)
        assert not decision.framed and reason in decision.reason
        assert np.array_equal(frame(image=image)["image"], image)
    height, width = head.shape
    cut = head[:, width // 2 - 20 :]  # the skull's left part gone
    decision = frame.decide(np.ascontiguousarray(cut))
    assert decision.framed and not decision.found and "cut by the frame edge" in decision.reason
    assert not HeadFrame(accept_cut=False).decide(np.ascontiguousarray(cut)).framed
    guessed = FoundHead(False, CUT, Ellipse(10.0, 10.0, 400.0, 300.0, 0.0), 0.9)  # a sliver extrapolated far out
    refused = decide(guessed, True, 0.5, (100, 120))
    assert not refused.framed and "far larger than the image" in refused.reason


def test_bad_head_frame_settings_and_another_finder_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="data.harmonise.head_margin=2"):
        preprocessing(32, harmonise={"head_frame": True, "head_margin": 2})
    with pytest.raises(ValueError, match="data.harmonise.head_rotate='yes'"):
        preprocessing(32, harmonise={"head_frame": True, "head_rotate": "yes"})
    with pytest.raises(FileNotFoundError, match="head finder .*absent.pt: no such file"):
        HeadFrame(finder=str(tmp_path / "absent.pt")).load_finder()
    steps = A.Compose(preprocessing(32, harmonise={"head_frame": True, "head_finder_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="data.harmonise.head_finder=shipped: .* trained with a finder of SHA256 000"):
        steps(image=cv2.resize(read_grayscale(next((HEADS / "images").iterdir())), (64, 64)))
