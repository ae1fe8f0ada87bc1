r"""The numbers of an IQA evaluation: correlation with MOS, their uncertainty, and localisation.

**Correlation.** SRCC (Spearman) and KRCC (Kendall tau-b) measure whether a method *orders* images
as observers do; PLCC (Pearson) and RMSE measure how *linearly* its scores follow the MOS. A method's
scale need not be the MOS scale (PIQE runs 0-100, lower is better), so, as IQA papers do after
VQEG, PLCC and RMSE are also reported after a monotonic 4-parameter logistic mapping of the
predictions onto the MOS, fitted by least squares:

.. math::

    f(x) = \frac{\beta_1 - \beta_2}{1 + e^{-(x - \beta_3) / |\beta_4|}} + \beta_2

``beta_1`` and ``beta_2`` are the upper and lower asymptotes (swapped for a method whose scores fall
as quality rises), ``beta_3`` the midpoint and ``|beta_4|`` the spread. The fit is non-convex, so it
starts from several data-driven points (asymptotes at the MOS extremes in the direction of the
raw correlation, midpoint at the median and mean prediction, spreads of 1/4, 1 and 4 prediction
standard deviations) and keeps the lowest squared error; fewer than five distinct points, or a fit
that never converges, gives ``nan`` rather than a misleading number.

**Uncertainty.** Every headline number comes with a percentile bootstrap interval: the images are
resampled with replacement from a seeded generator, so two methods evaluated on the same images with
the same seed see the same resamples (a paired bootstrap: their intervals are comparable).

**Missing scores.** A method that gave no score for an image (a parse failure) has ``nan`` there.
Correlations use the images that have a score; the share of those (``answer_rate``) is reported
beside them, so a model cannot look good by answering only the easy images.

**Localisation** compares predicted defect boxes with the true ones in original pixels. Boxes are
matched one-to-one by the Hungarian algorithm on IoU (:func:`qprobe.reward_math.matched_iou`, the
same matching as the RL reward): ``mean_iou`` is that reward averaged over the images with defects,
``recall`` the share of true boxes matched at IoU >= the threshold (0.5 by default), ``precision``
the share of predicted boxes so matched, and ``false_alarm_rate`` the share of pristine images on
which the method reported any defect. An image without an answer predicted no boxes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.optimize import OptimizeWarning, curve_fit, linear_sum_assignment

from qprobe.reward_math import iou_matrix, matched_iou

Box = Sequence[float]
NAN = float("nan")
# The headline statistics, in report order; each gets a bootstrap interval.
HEADLINE = ("srcc", "krcc", "plcc", "plcc_logistic", "rmse", "rmse_logistic")


def _pairs(pred: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two as float arrays, without the positions where either is missing (nan or None)."""
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(true, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"predictions and MOS must be 1-D and of equal length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _correlation(fn: Callable[..., object], x: np.ndarray, y: np.ndarray) -> float:
    # A constant input has no defined correlation: nan, without scipy's warning for every resample.
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return NAN
    return float(fn(x, y)[0])  # type: ignore[index]


def srcc(pred: Sequence[float], true: Sequence[float]) -> float:
    """Spearman rank correlation over the images with a score."""
    return _correlation(stats.spearmanr, *_pairs(pred, true))


def krcc(pred: Sequence[float], true: Sequence[float]) -> float:
    """Kendall's tau-b over the images with a score."""
    return _correlation(stats.kendalltau, *_pairs(pred, true))


def plcc(pred: Sequence[float], true: Sequence[float]) -> float:
    """Pearson linear correlation over the images with a score (no mapping)."""
    return _correlation(stats.pearsonr, *_pairs(pred, true))


def rmse(pred: Sequence[float], true: Sequence[float]) -> float:
    """Root mean squared error over the images with a score (same scale assumed)."""
    x, y = _pairs(pred, true)
    return float(np.sqrt(np.mean((x - y) ** 2))) if x.size else NAN


def logistic4(x: np.ndarray | float, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The VQEG 4-parameter logistic ``(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2``."""
    z = -(np.asarray(x, dtype=np.float64) - b3) / max(abs(b4), 1e-12)
    # exp overflows past ~709; the curve is flat there anyway.
    return (b1 - b2) / (1.0 + np.exp(np.clip(z, -700.0, 700.0))) + b2


@dataclass(frozen=True)
class LogisticFit:
    """A fitted :func:`logistic4`; call it to map predictions onto the MOS scale."""

    b1: float
    b2: float
    b3: float
    b4: float
    sse: float

    @property
    def params(self) -> tuple[float, float, float, float]:
        return (self.b1, self.b2, self.b3, self.b4)

    def __call__(self, x: Sequence[float] | np.ndarray | float) -> np.ndarray:
        return logistic4(np.asarray(x, dtype=np.float64), *self.params)


def _starts(x: np.ndarray, y: np.ndarray) -> list[tuple[float, float, float, float]]:
    rising = not _correlation(stats.pearsonr, x, y) < 0  # nan (constant) counts as rising
    top, bottom = (float(y.max()), float(y.min())) if rising else (float(y.min()), float(y.max()))
    spread = float(x.std()) or 1.0
    return [(top, bottom, mid, spread * k)
            for mid in (float(np.median(x)), float(x.mean())) for k in (1.0, 0.25, 4.0)]


def _curve_fit(x: np.ndarray, y: np.ndarray, p0: Sequence[float]) -> LogisticFit | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            params, _ = curve_fit(logistic4, x, y, p0=list(p0), maxfev=5000)
        except (RuntimeError, ValueError, TypeError):
            return None
    if not np.all(np.isfinite(params)):
        return None
    sse = float(np.sum((logistic4(x, *params) - y) ** 2))
    return LogisticFit(*(float(p) for p in params), sse=sse)


def fit_logistic(pred: Sequence[float], true: Sequence[float],
                 start: Sequence[float] | None = None) -> LogisticFit | None:
    """Least-squares :func:`logistic4` from predictions to MOS, or ``None`` where it cannot be fitted.

    ``start`` (e.g. the full-data fit, when fitting a bootstrap resample) is tried alone; otherwise the
    data-driven starts of the module docstring are all tried and the best fit is kept.
    """
    x, y = _pairs(pred, true)
    if np.unique(x).size < 5 or np.ptp(y) == 0:
        return None
    fits = [_curve_fit(x, y, p0) for p0 in ([start] if start is not None else _starts(x, y))]
    fits = [f for f in fits if f is not None]
    return min(fits, key=lambda f: f.sse) if fits else None


def correlations(pred: Sequence[float], true: Sequence[float], start: Sequence[float] | None = None,
                 fit_mapping: bool = True) -> tuple[dict[str, float], LogisticFit | None]:
    """The :data:`HEADLINE` statistics of one method, and the logistic fit behind the mapped ones.

    ``fit_mapping=False`` skips the fit (the mapped statistics are nan); ``start`` is passed to
    :func:`fit_logistic`.
    """
    x, y = _pairs(pred, true)
    fit = fit_logistic(x, y, start=start) if fit_mapping else None
    mapped = fit(x) if fit is not None else None
    values = {
        "n": float(x.size),
        "srcc": _correlation(stats.spearmanr, x, y),
        "krcc": _correlation(stats.kendalltau, x, y),
        "plcc": _correlation(stats.pearsonr, x, y),
        "plcc_logistic": _correlation(stats.pearsonr, mapped, y) if mapped is not None else NAN,
        "rmse": float(np.sqrt(np.mean((x - y) ** 2))) if x.size else NAN,
        "rmse_logistic": float(np.sqrt(np.mean((mapped - y) ** 2))) if mapped is not None else NAN,
    }
    return values, fit


def bootstrap(pred: Sequence[float], true: Sequence[float], samples: int, seed: int,
              level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the :data:`HEADLINE` statistics.

    The resampled *image indices* depend only on ``(seed, samples, len(pred))``, so methods scored
    on the same images share resamples. Resamples where a statistic is undefined (too few answered
    images, a fit that fails) are left out of that statistic's interval; with none left it is nan.
    """
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(true, dtype=np.float64)
    if samples <= 0 or x.size == 0:
        return {k: (NAN, NAN) for k in HEADLINE}
    _, full_fit = correlations(x, y)
    start = full_fit.params if full_fit is not None else None
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in HEADLINE}
    for index in rng.integers(0, x.size, size=(samples, x.size)):
        # Warm-started from the full-data fit: one curve_fit per resample instead of six.
        values, _ = correlations(x[index], y[index], start=start, fit_mapping=start is not None)
        for key in HEADLINE:
            draws[key].append(values[key])
    tail = (1.0 - level) / 2.0 * 100.0
    out = {}
    for key, values in draws.items():
        finite = np.asarray([v for v in values if math.isfinite(v)])
        out[key] = ((float(np.percentile(finite, tail)), float(np.percentile(finite, 100.0 - tail)))
                    if finite.size else (NAN, NAN))
    return out


def score_metrics(pred: Sequence[float], true: Sequence[float], samples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, float]:
    """Headline statistics with their intervals as one flat mapping (``srcc``, ``srcc_low``, ``srcc_high``, ...).

    Also ``n`` (images), ``answered`` and ``answer_rate`` (images with a score).
    """
    x = np.asarray(pred, dtype=np.float64)
    values, _ = correlations(x, true)
    out: dict[str, float] = {"n": float(x.size), "answered": values["n"],
                             "answer_rate": values["n"] / x.size if x.size else NAN}
    intervals = bootstrap(x, true, samples, seed, level)
    for key in HEADLINE:
        out[key] = values[key]
        out[f"{key}_low"], out[f"{key}_high"] = intervals[key]
    return out


def group_metrics(pred: Sequence[float], true: Sequence[float],
                  groups: Mapping[str, Sequence[bool] | np.ndarray]) -> dict[str, dict[str, float]]:
    """Per group (a boolean mask over the images): n, answered, SRCC, PLCC and MAE.

    Groups are small (one degradation type, one severity), so their correlations are noisy; the
    MAE is there because it stays meaningful on a handful of images, or a single one.
    """
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(true, dtype=np.float64)
    out = {}
    for name, mask in groups.items():
        m = np.asarray(mask, dtype=bool)
        gx, gy = _pairs(x[m], y[m])
        out[name] = {"n": float(m.sum()), "answered": float(gx.size),
                     "srcc": _correlation(stats.spearmanr, gx, gy), "plcc": _correlation(stats.pearsonr, gx, gy),
                     "mae": float(np.mean(np.abs(gx - gy))) if gx.size else NAN}
    return out


def _matches(pred: Sequence[Box], true: Sequence[Box]) -> list[float]:
    """IoUs of the Hungarian one-to-one matching of ``pred`` to ``true`` (one value per matched pair)."""
    if not pred or not true:
        return []
    matrix = iou_matrix(pred, true)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    return [float(v) for v in matrix[rows, cols]]


def localisation(pred_boxes: Sequence[Sequence[Box]], true_boxes: Sequence[Sequence[Box]],
                 threshold: float = 0.5) -> dict[str, float]:
    """Localisation of predicted against true defect boxes, one list of boxes per image.

    ``mean_iou`` (Hungarian-matched, over images with true boxes), ``recall`` and ``precision`` at
    IoU >= ``threshold`` (over all boxes), ``false_alarm_rate`` (share of images without true boxes
    that got a predicted box), and the counts behind them.
    """
    if len(pred_boxes) != len(true_boxes):
        raise ValueError(f"{len(pred_boxes)} predicted box lists for {len(true_boxes)} images")
    ious, hits, n_true, n_pred, alarms, pristine = [], 0, 0, 0, 0, 0
    for pred, true in zip(pred_boxes, true_boxes, strict=True):
        pred, true = list(pred), list(true)
        n_pred += len(pred)
        if not true:
            pristine += 1
            alarms += bool(pred)
            continue
        n_true += len(true)
        ious.append(matched_iou(pred, true))
        hits += sum(v >= threshold for v in _matches(pred, true))
    return {
        "mean_iou": float(np.mean(ious)) if ious else NAN,
        "recall": hits / n_true if n_true else NAN,
        "precision": hits / n_pred if n_pred else NAN,
        "false_alarm_rate": alarms / pristine if pristine else NAN,
        "true_boxes": float(n_true),
        "predicted_boxes": float(n_pred),
        "pristine_images": float(pristine),
    }


def recall_by_type(pred_boxes: Sequence[Sequence[Box]], true_boxes: Sequence[Sequence[Box]],
                   true_types: Sequence[Sequence[str]], threshold: float = 0.5) -> dict[str, float]:
    """Recall at IoU >= ``threshold`` of the true boxes of each defect type (matching ignores types)."""
    hits: dict[str, int] = {}
    totals: dict[str, int] = {}
    for pred, true, types in zip(pred_boxes, true_boxes, true_types, strict=True):
        pred, true = list(pred), list(true)
        matched = set()
        if pred and true:
            matrix = iou_matrix(pred, true)
            rows, cols = linear_sum_assignment(matrix, maximize=True)
            matched = {int(c) for r, c in zip(rows, cols, strict=True) if matrix[r, c] >= threshold}
        for j, kind in enumerate(types):
            totals[kind] = totals.get(kind, 0) + 1
            hits[kind] = hits.get(kind, 0) + (j in matched)
    return {kind: hits[kind] / totals[kind] for kind in sorted(totals)}
