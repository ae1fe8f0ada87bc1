"""Boxes on photos: one colour scheme and one line style for every picture the project draws.

The report's gallery, the trajectories' samples page, the bench's contact sheet and
``qprobe score --viz`` all draw with :func:`draw_marks`, so a box means the same everywhere:

* :data:`TRUTH` (green): a true defect, from the bench's manifest;
* :data:`PREDICTION` (red): a defect the model answered;
* :data:`CROP` (cyan): a region cropped, by the agent or by a trajectory's plan;
* a defect type's own colour (:func:`qprobe.defects.colour`) where every box is a true defect and
  its type is the point (the contact sheet).

Lines and labels grow with the drawn image, so a box reads the same on a thumbnail and on a
full-size photo.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from qprobe.defects import RGB

TRUTH: RGB = (40, 200, 80)
PREDICTION: RGB = (240, 40, 40)
CROP: RGB = (0, 200, 255)
LABEL_BACKGROUND: RGB = (0, 0, 0)
# What each colour marks, in every page's legend.
MEANINGS: dict[RGB, str] = {TRUTH: "true defect", PREDICTION: "predicted defect", CROP: "cropped region"}


@dataclass(frozen=True)
class Mark:
    """One box to draw, ``(x1, y1, x2, y2)`` in the pixels of the image it was measured on."""

    box: Sequence[float]
    colour: RGB
    label: str = ""  # written inside the box's top-left corner, on black


def css_colour(colour: RGB) -> str:
    """``colour`` as CSS writes it, for a page's legend of the boxes drawn on its images."""
    return "#{:02x}{:02x}{:02x}".format(*colour)


def legend(*colours: RGB) -> list[tuple[str, str]]:
    """A page's legend of the boxes it draws in ``colours``: ``(CSS colour, what it marks)`` each."""
    return [(css_colour(c), MEANINGS[c]) for c in colours]


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` pixels (its fixed bitmap font where Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def line_width(size: tuple[int, int]) -> int:
    """Box outline width for an image of ``size``: one pixel per 500 of its longer side, at least 2."""
    return max(2, max(size) // 500)


def fit(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """A copy of ``image`` downscaled so that its longer side is at most ``max_side``, and the factor
    applied (1: a plain copy; never upscales)."""
    scale = min(1.0, max_side / max(image.size))
    if scale == 1.0:
        return image.copy(), 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS), scale


def draw_marks(image: Image.Image, marks: Iterable[Mark], scale: float = 1.0) -> Image.Image:
    """Draw ``marks`` on ``image`` in place, their boxes multiplied by ``scale`` first; returns ``image``."""
    draw = ImageDraw.Draw(image)
    width = line_width(image.size)
    text_font = font(max(11, round(max(image.size) / 60)))
    for mark in marks:
        x1, y1, x2, y2 = (v * scale for v in mark.box)
        draw.rectangle((x1, y1, x2, y2), outline=mark.colour, width=width)
        if mark.label:
            left, top, right, bottom = draw.textbbox((x1 + width + 1, y1 + width), mark.label, font=text_font)
            draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=LABEL_BACKGROUND)
            draw.text((x1 + width + 1, y1 + width), mark.label, fill=mark.colour, font=text_font)
    return image
