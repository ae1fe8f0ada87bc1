"""The crop tool: the model's box in global-view pixels -> a native-resolution crop, as an image.

Geometry (docs/architecture.md, The protocol: Coordinates). The *global view* is the photo resized by Qwen2.5-VL's
``smart_resize`` to the global pixel budget (sides multiples of 28 = one merged 2x2 patch of 14 px).
A box ``[x1, y1, x2, y2]`` in view pixels maps to original pixels by the per-axis scale
``W / w``, ``H / h``; :meth:`Geometry.to_original` and :meth:`Geometry.to_view` are that affine map
and its inverse, computed in exact rational arithmetic and rounded once to float. The pixels actually
cropped are the smallest integer rectangle that contains the mapped box (outward rounding), so a crop
never loses a sliver of what the model asked for.

Before mapping, a requested box is repaired where the intent is clear: reversed corners are swapped,
the box is clamped to the view, and a box thinner than one merged patch (28 view pixels) is grown
about its centre to that size, since the model cannot point at anything smaller. What cannot be
repaired (not four numbers, outside the view, zero width or height, the call budget spent) comes back
as an ``error: ...`` text for the model, never as an exception: a bad box is the model's mistake, it
costs format reward in RL and is counted, and the rollout goes on.

The crop is cut from the original at native resolution and resized to the crop pixel budget with
``smart_resize`` (a crop smaller than the budget keeps its resolution, to the nearest 28 px).

:class:`CropTool` is the one implementation behind inference (:mod:`qprobe.agent.rollout`) and RL:
it fits trl's ``environment_factory`` contract (``reset(**row)``; its only other public method,
``crop``, is the tool, with the docstring and type hints trl turns into the tool schema; it returns
content blocks ``[{"type": "image", ...}, {"type": "text", ...}]`` that trl passes into the tool turn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from PIL import Image

from qprobe.agent.protocol import Box, ordered_box, read_box, region_line
from qprobe.agent.protocol_config import PAPER_MAX_PIXELS
from qprobe.errors import QProbeError
from qprobe.io import load_image

PATCH = 28  # one merged patch: 14 px ViT patches merged 2x2
MIN_PIXELS = 56 * 56  # Qwen2.5-VL's processor minimum
# Qwen2.5-VL's processor maximum (16384 merged patches): the most one image may cost.
MODEL_MAX_PIXELS = 16384 * PATCH * PATCH  # 12,845,056
# The protocol's default budgets (qprobe.agent.protocol_config): the paper's Qwen2.5-VL-7B, 1280 merged patches.
DEFAULT_GLOBAL_MAX_PIXELS = DEFAULT_CROP_MAX_PIXELS = PAPER_MAX_PIXELS
RESAMPLE = Image.Resampling.BICUBIC  # what Qwen2.5-VL's image processor resizes with


def budget_size(size: tuple[int, int], max_pixels: int, min_pixels: int = MIN_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of an image of ``size`` after ``smart_resize`` to ``max_pixels``.

    Raises :class:`QProbeError` for an aspect ratio over 200:1, which Qwen2.5-VL cannot take.
    """
    width, height = size
    try:
        # Imported here: transformers pulls torch, which `qprobe score --help` has no need of.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, factor=PATCH, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:
        raise QProbeError(f"{width}x{height}: {exc}") from exc
    return w, h


@dataclass(frozen=True)
class Geometry:
    """The global view of one photo: its size and the exact maps between view and original pixels."""

    original: tuple[int, int]
    view: tuple[int, int]

    @classmethod
    def for_size(cls, size: tuple[int, int], global_max_pixels: int) -> Geometry:
        return cls(original=(int(size[0]), int(size[1])), view=budget_size(size, global_max_pixels))

    def _scale(self) -> tuple[Fraction, Fraction]:
        return Fraction(self.original[0], self.view[0]), Fraction(self.original[1], self.view[1])

    def to_original(self, box: Box) -> Box:
        """View pixels -> original pixels (exact, then rounded once to float)."""
        sx, sy = self._scale()
        x1, y1, x2, y2 = (Fraction(v) for v in box)
        return (float(x1 * sx), float(y1 * sy), float(x2 * sx), float(y2 * sy))

    def to_view(self, box: Box) -> Box:
        """Original pixels -> view pixels: the inverse of :meth:`to_original`."""
        sx, sy = self._scale()
        x1, y1, x2, y2 = (Fraction(v) for v in box)
        return (float(x1 / sx), float(y1 / sy), float(x2 / sx), float(y2 / sy))

    def pixel_region(self, view_box: Box) -> tuple[int, int, int, int]:
        """The integer rectangle of original pixels that contains ``view_box`` (outward rounding)."""
        sx, sy = self._scale()
        x1, y1, x2, y2 = (Fraction(v) for v in view_box)
        width, height = self.original
        return (
            max(0, math.floor(x1 * sx)),
            max(0, math.floor(y1 * sy)),
            min(width, math.ceil(x2 * sx)),
            min(height, math.ceil(y2 * sy)),
        )

    def clamp(self, box: Box) -> Box:
        """``box`` (finite, view pixels) with its corners sorted and clamped to the view.

        A box wholly outside the view becomes an empty one on its edge. Scoring maps answer boxes
        to original pixels through this, so an absurd box (1e308) costs IoU, never an overflow.
        """
        w, h = self.view
        x1, y1, x2, y2 = ordered_box(box)
        return (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))

    def repair(self, box: Any) -> Box | str:
        """The box the tool will crop, in view pixels, or the reason it cannot (a text for the model).

        Reversed corners are swapped, the box is clamped to the view, and a side shorter than one
        merged patch is grown about its centre (kept inside the view) to :data:`PATCH` pixels.
        """
        values = read_box(box)
        if isinstance(values, str):
            return values
        w, h = self.view
        x1, y1, x2, y2 = ordered_box(values)
        if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            return f"the box {[_n(v) for v in box]} lies outside the {w}x{h} global view"
        x1, y1, x2, y2 = self.clamp((x1, y1, x2, y2))
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            return f"the box {[_n(v) for v in box]} has zero width or height"
        x1, x2 = _grow(x1, x2, w)
        y1, y2 = _grow(y1, y2, h)
        return (x1, y1, x2, y2)


def _grow(lo: float, hi: float, limit: int) -> tuple[float, float]:
    if hi - lo >= PATCH:
        return lo, hi
    centre = (lo + hi) / 2
    lo = min(max(0.0, centre - PATCH / 2), float(limit - PATCH))
    return lo, lo + PATCH


def _n(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def global_view(image: Image.Image, global_max_pixels: int) -> tuple[Image.Image, Geometry]:
    """The photo resized to the global budget, and its geometry."""
    geometry = Geometry.for_size(image.size, global_max_pixels)
    view = image if image.size == geometry.view else image.resize(geometry.view, RESAMPLE)
    return view, geometry


@dataclass(frozen=True)
class CropRecord:
    """One call of the tool: what was asked, and what was cropped or why not."""

    requested: Any
    view_box: Box | None = None
    original_box: tuple[int, int, int, int] | None = None
    crop_size: tuple[int, int] | None = None
    error: str | None = None


class CropTool:
    """The crop tool over one original photo; also a trl ``environment_factory`` environment.

    Inference builds it with the photo; RL builds it empty (``functools.partial(CropTool, ...)`` as
    the factory) and trl calls ``reset(**row)`` before each rollout, with the row's ``original`` (a
    path or an image) naming the high-resolution photo. Every call counts against ``max_calls``,
    a failed one included.
    """

    def __init__(
        self,
        original: Image.Image | str | Path | None = None,
        global_max_pixels: int = DEFAULT_GLOBAL_MAX_PIXELS,
        crop_max_pixels: int = DEFAULT_CROP_MAX_PIXELS,
        max_calls: int = 3,
    ) -> None:
        self.global_max_pixels = global_max_pixels
        self.crop_max_pixels = crop_max_pixels
        self.max_calls = max_calls
        self.original: Image.Image | None = None
        self.geometry: Geometry | None = None
        self.calls: list[CropRecord] = []
        if original is not None:
            self.reset(original=original)

    def reset(self, original: Image.Image | str | Path | None = None, **row: Any) -> None:
        """Start over on ``original`` (trl passes the dataset row; only ``original`` is read)."""
        if original is None:
            raise QProbeError("CropTool.reset needs the row's 'original' (a path or an image)")
        image = original if isinstance(original, Image.Image) else load_image(original)
        self.original = image.convert("RGB") if image.mode != "RGB" else image
        self.geometry = Geometry.for_size(self.original.size, self.global_max_pixels)
        self.calls = []

    def crop(self, bbox_2d: list[int]) -> list[dict[str, Any]]:
        """Look at a region of the photo at its native resolution.

        Args:
            bbox_2d: The region as [x1, y1, x2, y2] in absolute pixels of the global view.
        """
        if self.original is None or self.geometry is None:
            raise QProbeError("CropTool.crop called before reset: no photo to crop")
        if len(self.calls) >= self.max_calls:
            return _error(f"the crop budget of {self.max_calls} is used up; give your answer now")
        view_box = self.geometry.repair(bbox_2d)
        if isinstance(view_box, str):
            self.calls.append(CropRecord(requested=bbox_2d, error=view_box))
            return _error(view_box)
        region = self.geometry.pixel_region(view_box)
        patch = self.original.crop(region)
        size = budget_size(patch.size, self.crop_max_pixels)
        if patch.size != size:
            patch = patch.resize(size, RESAMPLE)
        self.calls.append(CropRecord(requested=bbox_2d, view_box=view_box, original_box=region, crop_size=size))
        text = region_line(view_box, region, self.geometry.original, size)
        return [{"type": "image", "image": patch}, {"type": "text", "text": text}]


def _error(reason: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": f"error: {reason}"}]
