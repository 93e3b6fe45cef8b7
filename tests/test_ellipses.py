"""The skull ellipse: fitted to a drawn outline (HC18's annotations) and to a filled mask (a finder's output), it
recovers the parameters it was drawn with; resizing moves it as the resizer moves the pixels."""

import math

import cv2
import numpy as np
import pytest

from fetalbrain.data.ellipses import Ellipse, ellipse_from_mask, ellipse_from_outline, ellipse_mask, fit_ellipse


def angle_error(a: float, b: float) -> float:
    """Degrees between two axis directions (an axis at 0 is the one at 180)."""
    return abs((a - b + 90.0) % 180.0 - 90.0)


def assert_close(found: Ellipse, drawn: Ellipse, pixels: float, degrees: float = 1.0) -> None:
    assert found is not None
    assert abs(found.cx - drawn.cx) <= pixels and abs(found.cy - drawn.cy) <= pixels
    assert abs(found.semi_major - drawn.semi_major) <= pixels and abs(found.semi_minor - drawn.semi_minor) <= pixels
    assert angle_error(found.angle, drawn.angle) <= degrees


@pytest.mark.parametrize("angle", [0, 30, 75, 120, 170])
def test_an_outline_drawn_as_hc18_draws_it_gives_back_its_ellipse(angle):
    outline = np.zeros((270, 400), np.uint8)
    cv2.ellipse(outline, (210, 140), (120, 80), angle, 0, 360, 255, 2)  # a 2 px outline, as the annotations
    assert_close(ellipse_from_outline(outline), Ellipse(210, 140, 120, 80, angle), pixels=0.2, degrees=0.2)


@pytest.mark.parametrize("angle", [0, 45, 100, 179])
def test_a_filled_mask_gives_back_its_ellipse_to_a_tenth_of_a_pixel(angle):
    drawn = Ellipse(200.3, 150.7, 110.2, 70.5, angle)
    found = ellipse_from_mask(ellipse_mask(drawn, (300, 400)))
    assert_close(found, drawn, pixels=0.1, degrees=0.2)
    assert found.circumference == pytest.approx(drawn.circumference, rel=1e-3)


def test_the_largest_region_of_a_mask_is_the_head():
    mask = ellipse_mask(Ellipse(120, 100, 60, 40, 20), (200, 300))
    mask[5:12, 250:290] = 1  # a small bright mark elsewhere
    assert_close(ellipse_from_mask(mask), Ellipse(120, 100, 60, 40, 20), pixels=0.2, degrees=0.3)


@pytest.mark.parametrize("angle", [0, 30, 120])
def test_resizing_moves_the_ellipse_as_it_moves_the_pixels(angle):
    outline = np.zeros((300, 400), np.uint8)
    cv2.ellipse(outline, (210, 140), (120, 80), angle, 0, 360, 255, 2)
    drawn = Ellipse(210, 140, 120, 80, angle)
    for sx, sy in ((0.5, 0.5), (0.5, 0.25), (0.64, 0.6)):
        resized = cv2.resize(outline, (round(400 * sx), round(300 * sy)), interpolation=cv2.INTER_AREA)
        assert_close(ellipse_from_outline(resized, level=0.3), drawn.scaled(sx, sy), pixels=0.3, degrees=0.5)


def test_circumference_is_the_circles_and_ramanujans():
    assert Ellipse(0, 0, 10, 10, 0).circumference == pytest.approx(2 * math.pi * 10)
    # a = 2, b = 1: the complete elliptic integral gives 9.688448220547...
    assert Ellipse(0, 0, 2, 1, 0).circumference == pytest.approx(9.688448220547, rel=1e-9)


def test_nothing_to_fit_is_none_not_a_crash():
    assert fit_ellipse(np.array([[0, 0], [1, 1], [2, 2]])) is None  # too few points
    assert fit_ellipse(np.array([[i, 2 * i] for i in range(20)])) is None  # a line
    assert ellipse_from_outline(np.zeros((10, 10))) is None
    assert ellipse_from_mask(np.zeros((10, 10))) is None
    assert ellipse_from_outline(np.zeros((0, 0))) is None
