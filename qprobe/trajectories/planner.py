"""The context-aware crop planner of Probe-CoT: where a trajectory zooms, in original pixels.

Q-Probe's point is that a crop must show the defect *and* the pristine context around it: judged
alone, a tight crop of a blurred patch cannot tell defocus blur from natural bokeh, and a model
trained only on crops that contain defects learns that zooming implies a defect. So:

* every defect is covered by a crop whose area is a sampled multiple (``area_ratio``) of the defect's
  area, with at least ``margin`` of the defect's size of pristine surround on every side that the
  image allows, the defect placed off-centre by a random shift, the crop clamped to the image, and
  its aspect ratio bounded by ``max_aspect``;
* defects close enough that one such crop covers them all share that crop (fewer tool calls);
* pristine images (and, with probability ``clean_crop_prob``, degraded ones) also get crops on
  texture-rich or salient regions, whose reasoning concludes the region is clean.

``strategy="degradation_only"`` is the paper's ablation (Table 4, SRCC 0.510 against 0.728): tight
crops on the defects only, no margin, no clean crops.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Box = tuple[int, int, int, int]
Strategy = Literal["context_aware", "degradation_only"]


@dataclass
class PlannerConfig:
    strategy: Strategy = field(default="context_aware", metadata={
        "help": "context_aware (defect + pristine surround) or degradation_only (tight crops; paper ablation)"})
    area_ratio_min: float = field(default=3.0, metadata={"help": "crop area / defect area, lower bound"})
    area_ratio_max: float = field(default=8.0, metadata={"help": "crop area / defect area, upper bound"})
    margin: float = field(default=0.25, metadata={
        "help": "pristine margin on each side, as a fraction of the defect's width/height (where the image allows)"})
    max_aspect: float = field(default=2.5, metadata={"help": "largest crop aspect ratio (long side / short side)"})
    clean_crop_prob: float = field(default=0.3, metadata={
        "help": "probability that a degraded image also gets one crop of a clean region"})
    clean_crop_fraction: float = field(default=0.12, metadata={
        "help": "area of a crop on a clean region, as a fraction of the image area"})
    min_crop: int = field(default=56, metadata={"help": "smallest crop side in original pixels"})

    def __post_init__(self) -> None:
        if not 1.0 <= self.area_ratio_min <= self.area_ratio_max:
            raise ValueError("need 1 <= area_ratio_min <= area_ratio_max")
        if self.max_aspect < 1.0 or self.margin < 0:
            raise ValueError("need max_aspect >= 1, margin >= 0")


def contains(outer: Sequence[float], inner: Sequence[float]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def union_box(boxes: Sequence[Sequence[float]]) -> Box:
    return (int(min(b[0] for b in boxes)), int(min(b[1] for b in boxes)),
            int(max(b[2] for b in boxes)), int(max(b[3] for b in boxes)))


def _fit_side(lo: float, hi: float, size: float, pad: float, limit: int,
              rng: random.Random) -> tuple[int, int]:
    """Place an interval of length ``size`` over [lo, hi] within [0, limit], at least ``pad`` of
    surround on each side where the border allows, and the defect off-centre at random."""
    size = min(max(size, hi - lo + 2 * pad), limit)
    earliest, latest = hi + pad - size, lo - pad  # starts that keep ``pad`` on both sides
    if earliest > latest:  # the image border leaves no room for both margins
        earliest = latest = lo - (size - (hi - lo)) / 2
    start = rng.uniform(earliest, latest)
    start = min(max(start, 0.0), limit - size)
    start = min(start, lo)  # containment wins over the random shift
    end = max(start + size, hi)
    return math.floor(start), math.ceil(min(end, limit))


def context_crop(target: Sequence[float], width: int, height: int, cfg: PlannerConfig,
                 rng: random.Random) -> Box:
    """A crop covering ``target`` plus pristine surround (see the module docstring)."""
    x1, y1, x2, y2 = target
    tw, th = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    ratio = rng.uniform(cfg.area_ratio_min, cfg.area_ratio_max)
    # Grow both sides by sqrt(ratio), but never less than the margin, then bound the aspect ratio.
    scale = math.sqrt(ratio)
    cw = max(tw * scale, tw * (1 + 2 * cfg.margin), cfg.min_crop)
    ch = max(th * scale, th * (1 + 2 * cfg.margin), cfg.min_crop)
    if cw / ch > cfg.max_aspect:
        ch = cw / cfg.max_aspect
    elif ch / cw > cfg.max_aspect:
        cw = ch / cfg.max_aspect
    cx1, cx2 = _fit_side(x1, x2, cw, cfg.margin * tw, width, rng)
    cy1, cy2 = _fit_side(y1, y2, ch, cfg.margin * th, height, rng)
    return cx1, cy1, cx2, cy2


def tight_crop(target: Sequence[float], width: int, height: int, cfg: PlannerConfig) -> Box:
    """The ablation's crop: the defect box itself, grown only to the minimum crop size."""
    x1, y1, x2, y2 = target
    pad_x = max(0.0, (cfg.min_crop - (x2 - x1)) / 2)
    pad_y = max(0.0, (cfg.min_crop - (y2 - y1)) / 2)
    return (int(max(0, math.floor(x1 - pad_x))), int(max(0, math.floor(y1 - pad_y))),
            int(min(width, math.ceil(x2 + pad_x))), int(min(height, math.ceil(y2 + pad_y))))


def _cluster(defects: Sequence[Sequence[float]], width: int, height: int, cfg: PlannerConfig) -> list[Box]:
    """Greedily merge defects whose joint box is still a reasonable crop (at most 1/4 of the image)."""
    clusters: list[list[Sequence[float]]] = []
    for box in sorted(defects, key=lambda b: (b[1], b[0])):
        for members in clusters:
            joint = union_box([*members, box])
            joint_area = (joint[2] - joint[0]) * (joint[3] - joint[1]) * (1 + 2 * cfg.margin) ** 2
            if joint_area <= 0.25 * width * height:
                members.append(box)
                break
        else:
            clusters.append([box])
    return [union_box(members) for members in clusters]


def plan_crops(defects: Sequence[Sequence[float]], width: int, height: int, cfg: PlannerConfig,
               rng: random.Random, max_crops: int, salient: Sequence[Sequence[float]] = ()) -> list[tuple[Box, bool]]:
    """Crops for one image as ``(box, covers_a_defect)`` pairs, in original pixels: ``max_crops`` at most
    (the protocol's crop budget, which the trajectory's prompt states), so every planned crop is made.

    ``salient`` holds candidate clean regions (texture-rich areas from the bench's texture map), used
    for pristine images and for the occasional clean crop of a degraded one.
    """
    if max_crops < 1:
        raise ValueError(f"max_crops must be at least 1 to plan crops, got {max_crops}")
    if cfg.strategy == "degradation_only":
        return [(tight_crop(b, width, height, cfg), True) for b in defects[:max_crops]]
    crops = [(context_crop(t, width, height, cfg, rng), True) for t in _cluster(defects, width, height, cfg)]
    crops = crops[:max_crops]
    want_clean = not defects or (len(crops) < max_crops and rng.random() < cfg.clean_crop_prob)
    if want_clean:
        crops.append((clean_crop(defects, width, height, cfg, rng, salient), False))
    return crops


def clean_crop(defects: Sequence[Sequence[float]], width: int, height: int, cfg: PlannerConfig,
               rng: random.Random, salient: Sequence[Sequence[float]] = ()) -> Box:
    """A crop of about ``clean_crop_fraction`` of the image on a salient region that touches no defect."""
    side = math.sqrt(cfg.clean_crop_fraction * width * height)
    candidates = list(salient) or [(width * 0.5 - 1, height * 0.5 - 1, width * 0.5 + 1, height * 0.5 + 1)]
    rng.shuffle(candidates)
    fallback: Box | None = None
    for region in candidates:
        cx, cy = (region[0] + region[2]) / 2, (region[1] + region[3]) / 2
        box = _centred(cx, cy, side, side, width, height, cfg)
        if not any(_overlaps(box, d) for d in defects):
            return box
        fallback = fallback or box
    # Every salient region touches a defect: take the image corner farthest from all defects.
    corners = [(side / 2, side / 2), (width - side / 2, side / 2), (side / 2, height - side / 2),
               (width - side / 2, height - side / 2)]
    best = max(corners, key=lambda c: min((_dist(c, d) for d in defects), default=0.0))
    box = _centred(best[0], best[1], side, side, width, height, cfg)
    return box if not any(_overlaps(box, d) for d in defects) else (fallback or box)


def _centred(cx: float, cy: float, w: float, h: float, width: int, height: int, cfg: PlannerConfig) -> Box:
    w, h = min(max(w, cfg.min_crop), width), min(max(h, cfg.min_crop), height)
    x1 = min(max(cx - w / 2, 0.0), width - w)
    y1 = min(max(cy - h / 2, 0.0), height - h)
    return int(x1), int(y1), int(min(width, math.ceil(x1 + w))), int(min(height, math.ceil(y1 + h)))


def _overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _dist(point: tuple[float, float], box: Sequence[float]) -> float:
    return math.hypot(point[0] - (box[0] + box[2]) / 2, point[1] - (box[1] + box[3]) / 2)
