"""The context-aware crop planner's geometry: containment, margins, clamping, both strategies."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qprobe.trajectories.planner import PlannerConfig, contains, plan_crops

MAX_CROPS = 3  # the protocol's crop budget


@st.composite
def image_and_defects(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    width = draw(st.integers(200, 4000))
    height = draw(st.integers(200, 4000))
    boxes = []
    for _ in range(draw(st.integers(0, 3))):
        w = draw(st.integers(8, max(8, width // 5)))
        h = draw(st.integers(8, max(8, height // 5)))
        x = draw(st.integers(0, width - w))
        y = draw(st.integers(0, height - h))
        boxes.append((x, y, x + w, y + h))
    return width, height, boxes


@settings(max_examples=300, deadline=None)
@given(image_and_defects(), st.integers(0, 2**31))
def test_context_crops_contain_defects_with_margin_inside_image(case, seed) -> None:
    width, height, defects = case
    cfg = PlannerConfig()
    crops = plan_crops(defects, width, height, cfg, random.Random(seed), MAX_CROPS)
    assert 1 <= len(crops) <= MAX_CROPS  # the budget the prompt states: every planned crop is made
    for box, _ in crops:
        assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
    covering = [b for b, has in crops if has]
    for d in defects:
        owners = [b for b in covering if contains(b, d)]
        if len(covering) < MAX_CROPS or owners:  # only the crop budget may leave a defect out
            assert owners, (d, crops)
        dw, dh = d[2] - d[0], d[3] - d[1]

        def surrounded(b: tuple[int, int, int, int], dw: int = dw, dh: int = dh, d=d) -> bool:
            # Pristine surround on every side, unless the image border is in the way.
            return ((b[0] == 0 or d[0] - b[0] >= int(cfg.margin * dw) - 1)
                    and (b[1] == 0 or d[1] - b[1] >= int(cfg.margin * dh) - 1)
                    and (b[2] == width or b[2] - d[2] >= int(cfg.margin * dw) - 1)
                    and (b[3] == height or b[3] - d[3] >= int(cfg.margin * dh) - 1))

        assert not owners or any(surrounded(b) for b in owners), (d, crops)


def test_crop_area_is_a_multiple_of_the_defect_and_not_centred() -> None:
    cfg = PlannerConfig(clean_crop_prob=0.0)
    defect = (1000, 1000, 1100, 1100)
    offsets = []
    for seed in range(40):
        [(box, has)] = plan_crops([defect], 3000, 3000, cfg, random.Random(seed), MAX_CROPS)
        area = (box[2] - box[0]) * (box[3] - box[1])
        assert has and cfg.area_ratio_min * 0.95 <= area / 100**2 <= cfg.area_ratio_max * 1.05
        assert max(box[2] - box[0], box[3] - box[1]) / min(box[2] - box[0], box[3] - box[1]) <= cfg.max_aspect
        offsets.append((box[0] + box[2]) / 2 - 1050)
    assert len({round(o) for o in offsets}) > 10  # placed off-centre, differently per seed


def test_clamped_at_the_border() -> None:
    [(box, _)] = plan_crops([(0, 0, 50, 50)], 400, 300, PlannerConfig(clean_crop_prob=0.0), random.Random(0), MAX_CROPS)
    assert box[0] == 0 and box[1] == 0 and contains(box, (0, 0, 50, 50))


def test_close_defects_share_one_crop_far_ones_do_not() -> None:
    cfg = PlannerConfig(clean_crop_prob=0.0)
    near = plan_crops([(1000, 1000, 1060, 1060), (1100, 1000, 1160, 1060)], 3000, 3000, cfg, random.Random(1), MAX_CROPS)
    assert len(near) == 1 and all(contains(near[0][0], d) for d in [(1000, 1000, 1060, 1060), (1100, 1000, 1160, 1060)])
    far = plan_crops([(0, 0, 60, 60), (2900, 2900, 2960, 2960)], 3000, 3000, cfg, random.Random(1), MAX_CROPS)
    assert len(far) == 2


def test_pristine_images_get_clean_crops_on_salient_regions() -> None:
    crops = plan_crops([], 2000, 1500, PlannerConfig(), random.Random(0), MAX_CROPS, salient=[(100, 100, 300, 300)])
    assert len(crops) == 1 and crops[0][1] is False
    box = crops[0][0]
    assert box[0] <= 200 <= box[2] and box[1] <= 200 <= box[3]


def test_clean_crop_of_a_degraded_image_avoids_the_defect() -> None:
    cfg = PlannerConfig(clean_crop_prob=1.0)
    defect = (900, 900, 1000, 1000)
    crops = plan_crops([defect], 3000, 3000, cfg, random.Random(3), MAX_CROPS, salient=[(950, 950, 960, 960)])
    clean = [b for b, has in crops if not has]
    assert len(clean) == 1
    b = clean[0]
    assert not (min(b[2], defect[2]) > max(b[0], defect[0]) and min(b[3], defect[3]) > max(b[1], defect[1]))


def test_degradation_only_is_tight_and_has_no_clean_crops() -> None:
    cfg = PlannerConfig(strategy="degradation_only", clean_crop_prob=1.0)
    crops = plan_crops([(500, 500, 600, 580)], 2000, 2000, cfg, random.Random(0), MAX_CROPS)
    assert crops == [((500, 500, 600, 580), True)]
    assert plan_crops([], 2000, 2000, cfg, random.Random(0), MAX_CROPS) == []


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        PlannerConfig(area_ratio_min=5, area_ratio_max=2)
