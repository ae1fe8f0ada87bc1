"""Reward arithmetic against values computed by hand."""

from __future__ import annotations

import math

import pytest

from qprobe.reward_math import accuracy, groups_of, iou, matched_iou, thurstone


def test_groups_are_consecutive_runs() -> None:
    assert groups_of(["a", "a", "b", "b", "c", "c"]) == [(0, 2), (2, 4), (4, 6)]
    assert groups_of([]) == []


def test_thurstone_perfect_order_scores_one() -> None:
    r = thurstone([4, 4, 2, 2], mos=[4, 4, 2, 2], group_ids=["a", "a", "b", "b"])
    # p = Phi(+inf) = 1 with g = 1 (and the mirror for b): sqrt(1 + eps) + sqrt(eps) = 1 + 1e-4.
    assert r == pytest.approx([1.0001] * 4, abs=1e-6)


def test_thurstone_reversed_order_scores_near_zero() -> None:
    r = thurstone([2, 2, 4, 4], mos=[4, 4, 2, 2], group_ids=["a", "a", "b", "b"])
    assert r == pytest.approx([2e-4] * 4, abs=1e-6)  # sqrt(eps) + sqrt(eps)


def test_thurstone_with_variance_by_hand() -> None:
    # a: scores 3, 5 (mu 4, var 2); b: 2, 2 (mu 2, var 0); MOS a > b.
    r = thurstone([3, 5, 2, 2], mos=[4, 4, 2, 2], group_ids=["a", "a", "b", "b"])
    # sample a1: p = Phi((3 - 2) / sqrt(2)) = Phi(0.70711) = 0.760250; r = sqrt(p) + sqrt(eps)
    assert r[0] == pytest.approx(math.sqrt(0.760250) + 1e-4, abs=1e-5)
    # sample a2: p = Phi(3 / sqrt(2)) = Phi(2.12132) = 0.983052
    assert r[1] == pytest.approx(math.sqrt(0.983052) + 1e-4, abs=1e-5)
    # sample b1 against a: p = Phi((2 - 4) / sqrt(2)) = 0.078650; g = 0 -> sqrt(eps) + sqrt(1 - p)
    assert r[2] == pytest.approx(1e-4 + math.sqrt(1 - 0.078650), abs=1e-5)


def test_thurstone_tie_gives_half_truth() -> None:
    r = thurstone([3, 3], mos=[3, 3], group_ids=["a", "b"])  # K = 1 groups, zero variance
    # s - mu_z = 0 -> p = 0.5; g = 0.5 -> sqrt(.25) + sqrt(.25) = 1
    assert r == pytest.approx([1.0, 1.0], abs=1e-6)


def test_thurstone_soft_truth() -> None:
    r = thurstone([3, 3], mos=[3.5, 3.0], group_ids=["a", "b"], mos_std=[0.5, 0.5], soft=True)
    g = 0.760250  # Phi(0.5 / sqrt(0.5))
    p = 0.5
    assert r[0] == pytest.approx(math.sqrt(p * g) + math.sqrt((1 - p) * (1 - g)), abs=1e-5)


def test_thurstone_parse_failures_and_lonely_batch() -> None:
    r = thurstone([None, 4, 2, 2], mos=[4, 4, 2, 2], group_ids=["a", "a", "b", "b"])
    assert r[0] == 0.0 and r[1] == pytest.approx(1.0001, abs=1e-6)
    assert thurstone([None, None, 2, 2], mos=[4, 4, 2, 2], group_ids=["a", "a", "b", "b"]) == [0.0] * 4
    assert thurstone([3, 4], mos=[3, 3], group_ids=["a", "a"]) == [0.0, 0.0]
    assert thurstone([float("nan"), 4], mos=[3, 3], group_ids=["a", "b"])[0] == 0.0


def test_thurstone_refuses_split_groups() -> None:
    with pytest.raises(ValueError, match="unequal size"):
        thurstone([1, 2, 3], mos=[1, 1, 2], group_ids=["a", "a", "b"])
    with pytest.raises(ValueError, match="consecutive"):
        thurstone([1, 2, 3, 4], mos=[1, 2, 1, 2], group_ids=["a", "b", "a", "b"])


def test_accuracy_by_hand() -> None:
    assert accuracy(3.0, 3.0, tau=0.5) == 1.0
    assert accuracy(4.0, 3.0, tau=0.5) == pytest.approx(math.exp(-2))
    assert accuracy(None, 3.0, tau=0.5) == 0.0


def test_iou_and_matching() -> None:
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    true = [[0, 0, 10, 10], [100, 100, 110, 110]]
    assert matched_iou([[100, 100, 110, 110], [0, 0, 10, 10]], true) == pytest.approx(1.0)
    assert matched_iou([[0, 0, 10, 10]], true) == pytest.approx(0.5)  # one missed
    assert matched_iou([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110]], true) == pytest.approx(2 / 3)
    assert matched_iou([], true) == 0.0 and matched_iou([], []) == 1.0
