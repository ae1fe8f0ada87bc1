r"""The MOS model: a deterministic mean opinion score (1-5) and its spread for a synthesised image.

No observers rate Vista-Bench's synthetic images, so their score comes from a documented model of
what drives perceived quality. Each defect ``i`` has a type ``k``, a severity ``s`` (1-5), an area
fraction ``a`` (box area over image area) and the mean local texture ``t`` in ``[0, 1)`` under its
box (:mod:`qprobe.bench.texture`). Its impairment is

.. math::

    d_i = w_k \cdot (s / 5)^{\gamma} \cdot (1 - e^{-a / a_0}) \cdot (\tfrac12 + \tfrac12 t)

* ``w_k`` in ``(0, 1]``: the type's visibility weight, in its entry of the defect-type registry
  (:data:`qprobe.defects.TYPES`).
* ``(s / 5)^gamma``, ``gamma = 1.3``: severity matters more than linearly; severity 1 is a
  near-threshold defect, 5 is gross.
* ``1 - exp(-a / a_0)``, ``a_0 = 0.02``: a defect covering 2% of the frame (a 280 px square on a
  2K photo) already has 63% of its full weight: in a high-resolution image a small local defect is
  enough to spoil it, the premise of Q-Probe; the effect saturates with area.
* ``1/2 + t/2``: every type here removes or corrupts structure, which shows where there is
  structure to lose; in a flat region the same defect is half as visible.

Impairments combine by probability summation, so the worst defect dominates and extra defects
still count: ``D = 1 - prod_i (1 - d_i)``, in ``[0, 1]``. Then

.. math::

    \mathrm{MOS} = 1 + (M - 1)(1 - D), \qquad
    \sigma = \sigma_0 + \sigma_1 \cdot 4 D (1 - D)

with ``M = 4.8`` (a pristine photo; raters rarely give a perfect 5), ``sigma_0 = 0.35`` and
``sigma_1 = 0.45``: raters agree on clearly good and clearly bad images and disagree most in the
middle of the scale. ``MOS`` is in ``[1, M]`` and ``sigma`` in ``[0.35, 0.8]``.

Monotonicity: each ``d_i`` grows with severity and with area (all factors are non-negative and
increasing in them), ``D`` grows with every ``d_i``, and ``MOS`` falls with ``D``: more severity or
more area never raises the MOS, and adding a defect never raises it either.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

GAMMA = 1.3
AREA_SCALE = 0.02
MOS_MAX = 4.8
STD_BASE = 0.35
STD_MID = 0.45


@dataclass(frozen=True)
class DefectEvidence:
    """What the model knows about one defect."""

    visibility: float  # the type's weight in (0, 1]
    severity: int  # 1-5
    area_fraction: float  # box area / image area, in [0, 1]
    texture: float  # mean texture under the box, in [0, 1]


def impairment(defect: DefectEvidence) -> float:
    """``d_i`` of the module docstring, in ``[0, 1]``."""
    severity = min(max(defect.severity, 1), 5) / 5
    area = min(max(defect.area_fraction, 0.0), 1.0)
    texture = min(max(defect.texture, 0.0), 1.0)
    return defect.visibility * severity**GAMMA * (1 - math.exp(-area / AREA_SCALE)) * (0.5 + 0.5 * texture)


def mos(defects: Iterable[DefectEvidence]) -> tuple[float, float]:
    """``(MOS, std)`` of an image with ``defects`` (none: a pristine image, ``MOS = M``)."""
    intact = 1.0
    for defect in defects:
        intact *= 1.0 - impairment(defect)
    total = 1.0 - intact
    score = 1.0 + (MOS_MAX - 1.0) * intact
    std = STD_BASE + STD_MID * 4.0 * total * intact
    return score, std
