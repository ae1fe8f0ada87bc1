"""The MOS model: bounded, deterministic, and monotone in severity, area and number of defects."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qprobe.bench.mos import MOS_MAX, DefectEvidence, impairment, mos
from qprobe.defects import TYPES

visibility = st.sampled_from(sorted({t.visibility for t in TYPES.values()}))
severity = st.integers(1, 5)
area = st.floats(0.0, 1.0)
texture = st.floats(0.0, 1.0)
defect = st.builds(DefectEvidence, visibility, severity, area, texture)


def test_pristine_image_scores_the_top_of_the_model():
    score, std = mos([])
    assert score == MOS_MAX and std > 0


@given(st.lists(defect, max_size=6))
def test_mos_and_std_stay_in_range(defects):
    score, std = mos(defects)
    assert 1.0 <= score <= MOS_MAX <= 5.0
    assert 0.0 <= std <= 1.0
    assert all(0.0 <= impairment(d) <= 1.0 for d in defects)


@given(st.lists(defect, max_size=4), visibility, severity, severity, area, texture)
def test_more_severity_never_raises_mos(others, vis, s1, s2, a, t):
    low, high = sorted((s1, s2))
    mild = mos([*others, DefectEvidence(vis, low, a, t)])[0]
    harsh = mos([*others, DefectEvidence(vis, high, a, t)])[0]
    assert harsh <= mild


@given(st.lists(defect, max_size=4), visibility, severity, area, area, texture)
def test_more_area_never_raises_mos(others, vis, s, a1, a2, t):
    small, large = sorted((a1, a2))
    assert mos([*others, DefectEvidence(vis, s, large, t)])[0] <= mos([*others, DefectEvidence(vis, s, small, t)])[0]


@given(st.lists(defect, max_size=4), defect)
def test_an_extra_defect_never_raises_mos(defects, extra):
    assert mos([*defects, extra])[0] <= mos(defects)[0]


def test_severity_spans_the_scale():
    # A large, textured pixelation: severity 1 is mild, severity 5 is near the bottom.
    mild = mos([DefectEvidence(1.0, 1, 0.1, 0.8)])[0]
    gross = mos([DefectEvidence(1.0, 5, 0.1, 0.8)])[0]
    assert mild > 4.0 and gross < 1.8


def test_model_is_deterministic():
    defects = [DefectEvidence(0.8, 3, 0.02, 0.5), DefectEvidence(0.9, 2, 0.01, 0.7)]
    assert mos(defects) == mos(list(defects))
    assert mos(defects)[0] == pytest.approx(mos(defects[::-1])[0], abs=1e-12)
