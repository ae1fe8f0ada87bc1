"""Defect boxes: small, local, in texture-rich areas, and barely overlapping one another.

For each box of a photo, in turn:

1. Size: a side ``s`` drawn uniformly from ``size_range`` (fractions of the photo's shorter side)
   and an aspect ratio from ``[1/1.5, 1.5]``; width ``s * sqrt(a)``, height ``s / sqrt(a)``.
2. Score every placement of that box on the texture map's grid by its mean texture
   (:meth:`~qprobe.bench.texture.TextureMap.box_means`, an integral image: all placements at once).
3. Rule out placements that cover more than ``max_overlap`` of a box already placed (or of
   themselves, whichever is smaller), so two defects never share much area.
4. Keep the ``top_fraction`` best-scoring placements left and draw one uniformly. Drawing from the
   top set, not taking the maximum, spreads defects over the photo's textured areas rather than
   stacking every variant of a photo on its single busiest spot.

A box that finds no allowed placement is dropped, so a photo can get fewer boxes than asked for.
Boxes are in image pixels, ``(x1, y1, x2, y2)`` with ``x2``/``y2`` exclusive.
"""

from __future__ import annotations

import math

import numpy as np

from qprobe.bench.texture import TextureMap

Box = tuple[int, int, int, int]
MAX_ASPECT = 1.5


def overlap(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area (0 when disjoint, 1 when one holds the other)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def place_regions(
    texture: TextureMap,
    count: int,
    rng: np.random.Generator,
    size_range: tuple[float, float] = (0.08, 0.2),
    max_overlap: float = 0.1,
    top_fraction: float = 0.2,
) -> list[Box]:
    """Up to ``count`` boxes on the photo ``texture`` describes; see the module docstring."""
    rows, cols = texture.values.shape
    short = min(texture.width, texture.height)
    boxes: list[Box] = []
    for _ in range(count):
        side = rng.uniform(*size_range) * short
        aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
        width = min(texture.width, max(8, round(side * math.sqrt(aspect))))
        height = min(texture.height, max(8, round(side / math.sqrt(aspect))))
        box_cols = min(cols, max(1, round(width / texture.cell_x)))
        box_rows = min(rows, max(1, round(height / texture.cell_y)))
        scores = texture.box_means(box_rows, box_cols)
        # Top-left pixel of each placement, clipped so the box stays inside the image.
        xs = np.minimum(np.round(np.arange(scores.shape[1]) * texture.cell_x).astype(int), texture.width - width)
        ys = np.minimum(np.round(np.arange(scores.shape[0]) * texture.cell_y).astype(int), texture.height - height)
        allowed = np.ones(scores.shape, dtype=bool)
        for placed in boxes:
            iw = np.clip(np.minimum(xs + width, placed[2]) - np.maximum(xs, placed[0]), 0, None)
            ih = np.clip(np.minimum(ys + height, placed[3]) - np.maximum(ys, placed[1]), 0, None)
            smaller = min(width * height, (placed[2] - placed[0]) * (placed[3] - placed[1]))
            allowed &= (ih[:, None] * iw[None, :]) / smaller <= max_overlap
        candidates = np.flatnonzero(allowed)
        if candidates.size == 0:
            continue
        keep = max(1, math.ceil(candidates.size * top_fraction))
        order = np.argsort(-scores.ravel()[candidates], kind="stable")
        pick = candidates[order[rng.integers(keep)]]
        r, c = divmod(int(pick), scores.shape[1])
        x1, y1 = int(xs[c]), int(ys[r])
        boxes.append((x1, y1, x1 + width, y1 + height))
    return boxes
