"""One drawing module: boxes land where they are measured, in their colour, with lines that scale."""

from __future__ import annotations

import numpy as np
from PIL import Image

from qprobe.draw import CROP, PREDICTION, TRUTH, Mark, draw_marks, fit, line_width


def test_a_mark_is_drawn_at_its_scaled_box_in_its_colour_and_nothing_inside_changes() -> None:
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    draw_marks(image, [Mark((20, 10, 80, 40), CROP), Mark((100, 10, 180, 40), PREDICTION, "blur")], scale=0.5)
    pixels = np.asarray(image)
    assert tuple(pixels[5, 10]) == CROP and tuple(pixels[20, 25]) == CROP  # corner and left edge of (10, 5, 40, 20)
    assert tuple(pixels[12, 25]) == (128, 128, 128)  # inside, away from the outline
    assert tuple(pixels[20, 90]) == PREDICTION  # bottom edge of (50, 5, 90, 20); its label sits at the top
    assert (pixels[5:12, 52:70] == 0).all(axis=-1).any()  # the label's black backing


def test_the_three_roles_have_three_colours_and_lines_grow_with_the_image() -> None:
    assert len({TRUTH, PREDICTION, CROP}) == 3
    assert line_width((320, 240)) == 2 and line_width((4000, 3000)) == 8
    big = draw_marks(Image.new("RGB", (4000, 3000)), [Mark((100, 100, 1000, 1000), TRUTH)])
    assert [tuple(p) for p in np.asarray(big)[100:109, 500]] == [TRUTH] * 8 + [(0, 0, 0)]  # 8 px, then inside


def test_fit_downscales_to_the_side_and_never_upscales() -> None:
    small, scale = fit(Image.new("RGB", (300, 200)), 400)
    assert small.size == (300, 200) and scale == 1.0
    fitted, scale = fit(Image.new("RGB", (1600, 800)), 400)
    assert fitted.size == (400, 200) and scale == 0.25
