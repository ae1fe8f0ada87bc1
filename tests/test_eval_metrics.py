"""Evaluation metrics against scipy, against logistic curves with known parameters, and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from qprobe.eval.metrics import (
    bootstrap,
    correlations,
    fit_logistic,
    group_metrics,
    krcc,
    localisation,
    logistic4,
    plcc,
    recall_by_type,
    rmse,
    score_metrics,
    srcc,
)


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.uniform(1, 5, 40)
    x = y + rng.normal(0, 0.8, 40)
    x[:5] = x[5]  # ties: Kendall's tau-b and Spearman's average ranks must handle them like scipy
    assert srcc(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert krcc(x, y) == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)
    assert plcc(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert rmse(x, y) == pytest.approx(math.sqrt(np.mean((x - y) ** 2)), abs=1e-12)


def test_missing_scores_are_left_out_not_imputed() -> None:
    rng = np.random.default_rng(0)
    y = rng.uniform(1, 5, 30)
    x = y + rng.normal(0, 0.5, 30)
    gaps = x.copy()
    gaps[[1, 7, 20]] = np.nan
    keep = ~np.isnan(gaps)
    assert srcc(gaps, y) == pytest.approx(stats.spearmanr(x[keep], y[keep])[0])
    with_none = [None if math.isnan(v) else v for v in gaps]
    assert plcc(with_none, y) == pytest.approx(stats.pearsonr(x[keep], y[keep])[0])
    metrics = score_metrics(gaps, y, samples=50)
    assert (metrics["n"], metrics["answered"], metrics["answer_rate"]) == (30, 27, pytest.approx(0.9))


def test_undefined_statistics_are_nan_without_raising() -> None:
    assert math.isnan(srcc([3, 3, 3, 3], [1, 2, 3, 4]))  # constant prediction
    assert math.isnan(plcc([1.0], [2.0]))
    metrics = score_metrics([None, None, None], [1.0, 2.0, 3.0], samples=20)
    assert metrics["answer_rate"] == 0
    assert all(math.isnan(metrics[k]) for k in ("srcc", "plcc_logistic", "rmse", "srcc_low", "plcc_high"))


def test_logistic_by_hand() -> None:
    # At the midpoint the curve is halfway; one spread above it, (b1 - b2) / (1 + e^-1) + b2.
    assert logistic4(50.0, 4.5, 1.5, 50.0, 10.0) == pytest.approx(3.0)
    assert logistic4(60.0, 4.5, 1.5, 50.0, 10.0) == pytest.approx(3.0 / (1 + math.exp(-1)) + 1.5)
    assert logistic4(60.0, 4.5, 1.5, 50.0, -10.0) == logistic4(60.0, 4.5, 1.5, 50.0, 10.0)  # |b4|


@pytest.mark.parametrize("params", [(4.6, 1.2, 45.0, 9.0), (1.3, 4.7, 30.0, 6.0), (4.9, 1.1, 3.0, 0.4)])
def test_logistic_fit_recovers_known_curves(params: tuple[float, float, float, float]) -> None:
    # (1.3, 4.7, ...) falls as x rises: a PIQE-like method whose low raw scores mean good quality.
    rng = np.random.default_rng(1)
    lo, hi = params[2] - 5 * params[3], params[2] + 5 * params[3]
    x = rng.uniform(lo, hi, 80)
    y = logistic4(x, *params)
    fit = fit_logistic(x, y)
    assert fit is not None
    assert fit.b1 == pytest.approx(params[0], abs=1e-4)
    assert fit.b2 == pytest.approx(params[1], abs=1e-4)
    assert fit.b3 == pytest.approx(params[2], abs=1e-3)
    assert abs(fit.b4) == pytest.approx(params[3], abs=1e-3)
    values, _ = correlations(x, y)
    assert values["plcc_logistic"] == pytest.approx(1.0, abs=1e-9)
    assert values["rmse_logistic"] == pytest.approx(0.0, abs=1e-5)
    assert abs(values["plcc"]) < 0.99  # the raw relation is clearly non-linear
    assert abs(values["srcc"]) == pytest.approx(1.0)


def test_logistic_mapping_beats_raw_pearson_on_noisy_nonlinear_data() -> None:
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 100, 200)
    y = logistic4(x, 1.2, 4.8, 50.0, 8.0) + rng.normal(0, 0.15, 200)
    values, fit = correlations(x, y)
    assert fit is not None and fit.b1 < fit.b2  # decreasing
    assert values["plcc_logistic"] > abs(values["plcc"]) and values["plcc_logistic"] > 0.97
    assert values["rmse_logistic"] == pytest.approx(0.15, abs=0.03)  # the noise we added


def test_logistic_fit_refuses_too_few_points() -> None:
    assert fit_logistic([1, 2, 3, 4], [1, 2, 3, 4]) is None
    assert fit_logistic([1, 1, 1, 1, 1, 2], [1, 2, 3, 4, 5, 6]) is None


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(3)
    y = rng.uniform(1, 5, 60)
    x = y + rng.normal(0, 0.6, 60)
    first = bootstrap(x, y, samples=100, seed=7)
    assert first == bootstrap(x, y, samples=100, seed=7)
    assert first["srcc"] != bootstrap(x[:59], y[:59], samples=100, seed=7)["srcc"]
    values, _ = correlations(x, y)
    for key in ("srcc", "krcc", "plcc", "plcc_logistic", "rmse"):
        low, high = first[key]
        assert low <= values[key] <= high, key
    wide = bootstrap(x, y, samples=100, seed=7, level=0.99)
    assert wide["srcc"][0] <= first["srcc"][0] and wide["srcc"][1] >= first["srcc"][1]


def test_bootstrap_is_paired_across_methods() -> None:
    # Same seed and image count -> same resamples: a method compared with itself has equal bounds,
    # and the bounds of a shifted copy move with it (RMSE of x + 1 against y, vs x against y - 1).
    rng = np.random.default_rng(4)
    y = rng.uniform(1, 5, 40)
    x = y + rng.normal(0, 0.5, 40)
    a = bootstrap(x + 1, y, samples=100, seed=0)
    b = bootstrap(x, y - 1, samples=100, seed=0)
    assert a["rmse"] == pytest.approx(b["rmse"])
    assert a["srcc"] == pytest.approx(b["srcc"])


def test_group_metrics_by_hand() -> None:
    pred = [1.0, 2.0, 3.0, float("nan"), 5.0]
    mos = [1.5, 2.5, 2.0, 4.0, 4.0]
    masks = {"a": [True, True, True, True, False], "b": [False, False, False, True, True]}
    groups = group_metrics(pred, mos, masks)
    assert groups["a"]["n"] == 4 and groups["a"]["answered"] == 3
    assert groups["a"]["mae"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert groups["a"]["srcc"] == pytest.approx(0.5)  # ranks (1,2,3) against (1,3,2)
    assert groups["b"]["answered"] == 1 and groups["b"]["mae"] == 1.0 and math.isnan(groups["b"]["srcc"])


def test_localisation_by_hand() -> None:
    pred = [
        [[0, 0, 10, 10]],  # one of two true boxes found exactly
        [[0, 0, 10, 20]],  # IoU 0.5 with [0, 0, 10, 10]: a hit at the threshold
        [[50, 50, 60, 60]],  # a pristine image with a box: a false alarm
        [],  # a pristine image, nothing reported
        [],  # a defect missed (or an unanswered image)
    ]
    true = [[[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 10, 10]], [], [], [[5, 5, 15, 15]]]
    loc = localisation(pred, true, threshold=0.5)
    assert loc["mean_iou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)  # matched_iou: sum / max(#pred, #true)
    assert loc["recall"] == pytest.approx(2 / 4)
    assert loc["precision"] == pytest.approx(2 / 3)
    assert loc["false_alarm_rate"] == pytest.approx(1 / 2)
    assert (loc["true_boxes"], loc["predicted_boxes"], loc["pristine_images"]) == (4, 3, 2)
    strict = localisation(pred, true, threshold=0.6)
    assert strict["recall"] == pytest.approx(1 / 4)


def test_recall_by_type_matches_one_to_one() -> None:
    # Two predictions on the same true box: only one can match (Hungarian), the other true box is missed.
    pred = [[[0, 0, 10, 10], [0, 0, 10, 10]]]
    true = [[[0, 0, 10, 10], [40, 40, 50, 50]]]
    assert recall_by_type(pred, true, [["blur", "noise"]]) == {"blur": 1.0, "noise": 0.0}
