"""The numbers behind the rewards, free of any completion format (see :mod:`qprobe.rewards`).

Thurstone fidelity reward (VisualQuality-R1, used by Q-Probe's stage 1). A batch holds B images,
each with a *group* of K sampled scores ``s_i1..s_iK``. With ``mu_i`` the group mean and ``var_i``
its unbiased variance (0 when K = 1), sample j of image i is compared with every other image z:

    p_ijz = Phi((s_ij - mu_z) / sqrt(var_i + var_z + eps))       # P(image i looks better than z)
    g_iz  = 1, 0 or 0.5 as MOS_i >, < or = MOS_z                  # hard ground truth
          or Phi((MOS_i - MOS_z) / sqrt(std_i^2 + std_z^2 + eps)) # soft, DeQA-Score style
    r_ijz = sqrt(p_ijz * g_iz + eps) + sqrt((1 - p_ijz) * (1 - g_iz) + eps)
    r_ij  = mean over z != i of r_ijz

r is the fidelity between the predicted and true preference (1 = perfect agreement, ~0 = opposite).
A sample without a score (parse failure) gets 0 and is left out of its group's mean and variance;
an image none of whose samples scored is left out as a comparison partner. A batch with a single
scored image has nothing to rank against: every sample gets 0.

Localisation (Q-Probe's R_loc): predicted boxes are matched one-to-one to true boxes by the
Hungarian algorithm on IoU; the reward is the sum of matched IoUs divided by max(#predicted, #true),
so missing a defect and inventing one both cost, and a single box against a single box is plain IoU.
Only the first :data:`MAX_BOXES` boxes of each side are matched (the protocol already refuses answers
with more defects than that); the rest still count in the denominator, as unmatched boxes do, so a
flood of boxes cannot buy reward, and the cost stays bounded whatever the model writes. Boxes whose
arithmetic overflows (corners near +-1e308) have IoU 0 with everything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm

EPS = 1e-8
# The most boxes per side that matched_iou matches; the protocol's MAX_DEFECTS is within it.
MAX_BOXES = 64
Box = Sequence[float]


def groups_of(ids: Sequence[object]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of equal consecutive ids: trl repeats a prompt K times in a row."""
    spans: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            spans.append((start, i))
            start = i
    return spans


def thurstone(scores: Sequence[float | None], mos: Sequence[float], group_ids: Sequence[object],
              mos_std: Sequence[float | None] | None = None, soft: bool = False,
              eps: float = EPS) -> list[float]:
    """Per-sample Thurstone fidelity rewards for a flat batch laid out as whole consecutive groups.

    ``group_ids`` names the image of each sample; samples of one image must be consecutive and every
    group must have the same size (GRPO's K), else ``ValueError``: a group split across devices would
    silently bias mu and var.
    """
    n = len(scores)
    if not (len(mos) == len(group_ids) == n):
        raise ValueError(f"thurstone: {n} scores, {len(mos)} MOS values and {len(group_ids)} ids must match")
    spans = groups_of(group_ids)
    sizes = {stop - start for start, stop in spans}
    if len(sizes) > 1:
        raise ValueError(f"thurstone: groups of unequal size {sorted(sizes)}; the batch must hold whole groups "
                         "(per-device batch a multiple of num_generations)")
    if len({group_ids[start] for start, _ in spans}) != len(spans):
        raise ValueError("thurstone: the samples of one image must be consecutive")

    stats = []  # (mu, var, mos, std) per group with at least one score, else None
    for start, stop in spans:
        vals = np.array([s for s in scores[start:stop] if s is not None and math.isfinite(s)], dtype=float)
        std = mos_std[start] if mos_std is not None else None
        if vals.size == 0:
            stats.append(None)
            continue
        var = float(vals.var(ddof=1)) if vals.size > 1 else 0.0
        stats.append((float(vals.mean()), var, float(mos[start]), float(std or 0.0)))

    rewards = [0.0] * n
    for gi, (start, stop) in enumerate(spans):
        if stats[gi] is None:
            continue
        _, var_i, mos_i, std_i = stats[gi]
        partners = [stats[z] for z in range(len(spans)) if z != gi and stats[z] is not None]
        if not partners:
            continue
        mu_z = np.array([p[0] for p in partners])
        var_z = np.array([p[1] for p in partners])
        mos_z = np.array([p[2] for p in partners])
        if soft:
            std_z = np.array([p[3] for p in partners])
            g = norm.cdf((mos_i - mos_z) / np.sqrt(std_i**2 + std_z**2 + eps))
        else:
            g = np.where(mos_i > mos_z, 1.0, np.where(mos_i < mos_z, 0.0, 0.5))
        for j in range(start, stop):
            s = scores[j]
            if s is None or not math.isfinite(s):
                continue
            p = norm.cdf((s - mu_z) / np.sqrt(var_i + var_z + eps))
            r = np.sqrt(p * g + eps) + np.sqrt((1 - p) * (1 - g) + eps)
            rewards[j] = float(r.mean())
    return rewards


def accuracy(score: float | None, mos: float, tau: float) -> float:
    """exp(-|s - MOS| / tau); 0 without a score."""
    if score is None or not math.isfinite(score):
        return 0.0
    return math.exp(-abs(score - mos) / tau)


def iou_matrix(pred: Sequence[Box], true: Sequence[Box]) -> np.ndarray:
    """IoU of every ``[x1, y1, x2, y2]`` box of ``pred`` (rows) with every one of ``true`` (columns).

    Empty boxes give 0, and so does any pair whose arithmetic overflows to inf or nan, rather than a
    nan that would break the matching.
    """
    p = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    t = np.asarray(true, dtype=np.float64).reshape(-1, 4)
    with np.errstate(all="ignore"):
        ix = np.maximum(0.0, np.minimum(p[:, None, 2], t[None, :, 2]) - np.maximum(p[:, None, 0], t[None, :, 0]))
        iy = np.maximum(0.0, np.minimum(p[:, None, 3], t[None, :, 3]) - np.maximum(p[:, None, 1], t[None, :, 1]))
        inter = ix * iy
        area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
        area_t = (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])
        union = area_p[:, None] + area_t[None, :] - inter
        values = np.where(union > 0, inter / union, 0.0)
    return np.where(np.isfinite(values), values, 0.0)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (0 for empty boxes)."""
    return float(iou_matrix([a], [b])[0, 0])


def matched_iou(pred: Sequence[Box], true: Sequence[Box]) -> float:
    """Sum of Hungarian-matched IoUs over max(#pred, #true); 1.0 when both are empty.

    Only the first :data:`MAX_BOXES` of each side are matched; the others count as unmatched.
    """
    if not len(pred) and not len(true):
        return 1.0
    if not len(pred) or not len(true):
        return 0.0
    matrix = iou_matrix(pred[:MAX_BOXES], true[:MAX_BOXES])
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    return float(matrix[rows, cols].sum() / max(len(pred), len(true)))
