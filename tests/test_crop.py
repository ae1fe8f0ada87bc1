"""The crop tool: exact view <-> original mapping, box repair, native-resolution crops, trl's contract."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qprobe.agent import protocol
from qprobe.agent.crop import PATCH, CropTool, Geometry, budget_size, global_view
from qprobe.agent.protocol import CROP_TOOL_SCHEMA
from qprobe.errors import QProbeError

PAPER = 1280 * 28 * 28  # 1,003,520


@pytest.mark.parametrize(("size", "view"), [
    ((4000, 3000), (1148, 840)),
    ((3000, 4000), (840, 1148)),
    ((4000, 500), (2828, 336)),  # 8:1
    ((500, 4000), (336, 2828)),
    ((6000, 30), (5992, 28)),  # 200:1, the most Qwen2.5-VL takes
    ((640, 480), (644, 476)),  # under the budget: sides rounded to 28, not upscaled
])
def test_global_view_is_smart_resize(size: tuple[int, int], view: tuple[int, int]) -> None:
    geometry = Geometry.for_size(size, PAPER)
    assert geometry.view == view
    assert view[0] % PATCH == 0 and view[1] % PATCH == 0 and view[0] * view[1] <= max(PAPER, 644 * 476)


def test_aspect_ratio_over_200_is_a_clear_error() -> None:
    with pytest.raises(QProbeError, match="6000x29"):
        budget_size((6000, 29), PAPER)


@pytest.mark.parametrize(("size", "view_box", "original_box"), [
    # 4000x3000 -> 1148x840: scale 1000/287 across, 25/7 down
    ((4000, 3000), (287, 210, 574, 420), (1000, 750, 2000, 1500)),
    ((4000, 3000), (0, 0, 1148, 840), (0, 0, 4000, 3000)),
    # 4000x500 -> 2828x336: scale 1000/707 across, 125/84 down
    ((4000, 500), (707, 84, 1414, 168), (1000, 125, 2000, 250)),
    ((4000, 500), (0, 0, 2828, 336), (0, 0, 4000, 500)),
    ((500, 4000), (84, 707, 168, 1414), (125, 1000, 250, 2000)),
])
def test_mapping_on_known_boxes_both_ways(size, view_box, original_box) -> None:
    geometry = Geometry.for_size(size, PAPER)
    assert geometry.to_original(view_box) == tuple(float(v) for v in original_box)
    assert geometry.to_view(original_box) == tuple(float(v) for v in view_box)
    assert geometry.pixel_region(view_box) == original_box


def test_mapping_off_the_grid_is_exact_and_the_crop_rounds_outward() -> None:
    geometry = Geometry.for_size((4000, 3000), PAPER)
    box = geometry.to_original((100, 100, 200, 200))
    assert box == (100 * 4000 / 1148, 100 * 3000 / 840, 200 * 4000 / 1148, 200 * 3000 / 840)
    assert box == pytest.approx((348.4321, 357.1429, 696.8641, 714.2857), abs=1e-4)
    assert geometry.pixel_region((100, 100, 200, 200)) == (348, 357, 697, 715)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([(4000, 3000), (4000, 500), (500, 4000), (2000, 1333), (6000, 30)]),
       st.tuples(*[st.floats(0, 1)] * 4))
def test_round_trip_and_containment(size: tuple[int, int], fractions: tuple[float, ...]) -> None:
    geometry = Geometry.for_size(size, PAPER)
    w, h = geometry.view
    box = (fractions[0] * w, fractions[1] * h, fractions[2] * w, fractions[3] * h)
    assert geometry.to_view(geometry.to_original(box)) == pytest.approx(box, rel=1e-12, abs=1e-9)
    mapped = geometry.to_original(box)
    region = geometry.pixel_region(box)
    assert region[0] <= mapped[0] + 1e-9 and region[1] <= mapped[1] + 1e-9
    assert region[2] >= min(mapped[2], size[0]) - 1e-9 and region[3] >= min(mapped[3], size[1]) - 1e-9


@pytest.mark.parametrize(("box", "repaired"), [
    ([287, 210, 574, 420], (287, 210, 574, 420)),
    ([574, 420, 287, 210], (287, 210, 574, 420)),  # reversed corners
    ([-50, -50, 287, 210], (0, 0, 287, 210)),  # clamped
    ([1000, 800, 2000, 2000], (1000, 800, 1148, 840)),
    ([500, 500, 510, 600], (491, 500, 519, 600)),  # narrower than one merged patch: grown about its centre
    ([10, 10, 12, 12], (0, 0, 28, 28)),  # grown, then kept inside
    ([1140, 400, 1148, 410], (1120, 391, 1148, 419)),
    ([300.5, 200.25, 400.75, 300], (300.5, 200.25, 400.75, 300)),
])
def test_repair(box: list[float], repaired: tuple[float, ...]) -> None:
    assert Geometry.for_size((4000, 3000), PAPER).repair(box) == tuple(float(v) for v in repaired)


@pytest.mark.parametrize(("box", "reason"), [
    ([100, 100, 100, 300], "zero width"),
    ([0, 840, 100, 840], "outside"),
    ([2000, 100, 2100, 200], "outside"),
    ([-10, 5, 0, 20], "outside"),
    ([1, 2, 3], "four numbers"),
    ("[1, 2, 3, 4]", "four numbers"),
    ([1, 2, 3, "4"], "four numbers"),
    ([1, 2, 3, True], "four numbers"),
    ([1, 2, 3, math.nan], "finite"),
    ([1, 2, 3, 10**400], "finite"),
])
def test_degenerate_boxes_are_reasons_not_exceptions(box: object, reason: str) -> None:
    result = Geometry.for_size((4000, 3000), PAPER).repair(box)
    assert isinstance(result, str) and reason in result


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_crop_is_native_resolution_and_names_its_region() -> None:
    # 1120x784 at a 280x196 budget: the view is exactly 4x smaller, so the box maps to whole pixels.
    photo = _photo(1120, 784)
    tool = CropTool(photo, global_max_pixels=280 * 196, crop_max_pixels=PAPER, max_calls=2)
    assert tool.geometry is not None and tool.geometry.view == (280, 196)
    image_block, text_block = tool.crop([28, 28, 84, 84])
    assert image_block["type"] == "image" and text_block["type"] == "text"
    assert image_block["image"].size == (224, 224)
    assert np.array_equal(np.asarray(image_block["image"]), np.asarray(photo)[112:336, 112:336])
    assert text_block["text"] == ("Region [28, 28, 84, 84] of the global view, pixels [112, 112, 336, 336] of "
                                  "the 1120x784 photo at native resolution, shown at 224x224.")
    record = tool.calls[0]
    assert record.view_box == (28, 28, 84, 84) and record.original_box == (112, 112, 336, 336)


def test_crop_is_resized_to_the_crop_budget() -> None:
    photo = _photo(4000, 3000)
    tool = CropTool(photo, global_max_pixels=PAPER, crop_max_pixels=200_000)
    (image_block, _) = tool.crop([0, 0, 574, 420])  # 2000x1500 original pixels
    assert image_block["image"].size == budget_size((2000, 1500), 200_000) == (504, 364)


def test_bad_calls_and_the_budget_come_back_as_error_text() -> None:
    tool = CropTool(_photo(640, 480), global_max_pixels=112 * 112, crop_max_pixels=112 * 112, max_calls=2)
    refused = tool.crop([50, 50, 50, 80])
    assert refused == [{"type": "text", "text": refused[0]["text"]}] and refused[0]["text"].startswith("error:")
    assert len(tool.crop([0, 0, 56, 56])) == 2
    spent = tool.crop([0, 0, 56, 56])
    assert spent[0]["text"] == "error: the crop budget of 2 is used up; give your answer now"
    assert [c.error is None for c in tool.calls] == [False, True]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-10**30, 10**30), st.floats(), st.text(max_size=3), st.none()), max_size=6))
def test_crop_never_raises(box: list[object]) -> None:
    tool = CropTool(_photo(96, 64), global_max_pixels=56 * 56, crop_max_pixels=56 * 56, max_calls=1000)
    blocks = tool.crop(box)  # type: ignore[arg-type]
    assert blocks[-1]["type"] == "text"
    assert (blocks[0]["type"] == "image") == (len(blocks) == 2)


def test_global_view_image_matches_its_geometry() -> None:
    view, geometry = global_view(_photo(4000, 500), PAPER)
    assert view.size == geometry.view == (2828, 336)


def test_fits_trl_environment_factory(tmp_path) -> None:
    from transformers.utils import get_json_schema

    # trl exposes every public function of the environment class but reset/get_reward as a tool.
    public = {name for name, _ in inspect.getmembers(CropTool, predicate=inspect.isfunction)
              if not name.startswith("_")}
    assert public == {"reset", "crop"}
    tool = CropTool(global_max_pixels=112 * 112, crop_max_pixels=112 * 112)  # what a factory builds
    assert get_json_schema(tool.crop) == CROP_TOOL_SCHEMA
    _photo(640, 480).save(tmp_path / "photo.png")
    row = {"prompt": [], "images": [], "mos": 3.2, "original": str(tmp_path / "photo.png")}
    assert tool.reset(**row) is None
    assert tool.geometry == Geometry((640, 480), (112, 84))
    blocks = tool.crop([0, 0, 56, 56])
    assert blocks[0]["image"].size == (112, 112)  # 320x320 original pixels at the 112x112 budget
    tool.reset(**row)
    assert tool.calls == []
    assert "crop" in protocol.system_prompt()


def test_reset_without_an_original_is_a_clear_error() -> None:
    with pytest.raises(QProbeError, match="original"):
        CropTool().reset(prompt=[])
    with pytest.raises(QProbeError, match="before reset"):
        CropTool().crop([0, 0, 10, 10])


def test_real_photo_at_the_papers_budgets(photos_dir) -> None:
    from qprobe.io import load_image

    photo = load_image(photos_dir / "lxqt-flowers.png")  # 3000x1993
    tool = CropTool(photo, global_max_pixels=PAPER, crop_max_pixels=PAPER)
    assert tool.geometry is not None and tool.geometry.view == (1204, 812)
    image_block, text_block = tool.crop([602, 406, 658, 462])  # 56x56 view pixels, about 140 original
    region = tool.calls[0].original_box
    assert region == (1500, 996, 1640, 1134)
    assert image_block["image"].size == budget_size((140, 138), PAPER) == (140, 140)
    assert "of the 3000x1993 photo" in text_block["text"]
