"""The behavioural probes on small real cases, with scorers passed in: fakes with a known bias, PIQE
as a deterministic scorer, and the tiny random model (whose parse failures the probes must survive)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data

from qprobe.agent.crop import Geometry
from qprobe.agent.rollout import RolloutConfig
from qprobe.eval.baselines import AgentScorer, PiqeScorer, Prediction
from qprobe.eval.probes import bokeh, bokeh_list, crop_bias, crop_boxes, repeatability, tool_crops

BUDGET = 112 * 112


class ZoomBiased:
    """Marks an image down in proportion to how much smaller it is than 1000 px: the cropping bias."""

    name = "zoom_biased"

    def __call__(self, image: Image.Image, seed: int = 0) -> Prediction:
        return Prediction(score=4.0 - max(0.0, 1 - max(image.size) / 1000))


class Flags:
    """Reports a blur defect on everything, with a good score."""

    name = "flags"

    def __call__(self, image: Image.Image, seed: int = 0) -> Prediction:
        return Prediction(score=4.5, defects=[{"type": "blur", "bbox": [0, 0, 10, 10]}])


class Noisy:
    """A stochastic scorer: the seed picks the sample."""

    name = "noisy"

    def __call__(self, image: Image.Image, seed: int = 0) -> Prediction:
        return Prediction(score=3.0 + np.random.default_rng(seed).normal(0, 0.3))


def _tiny_scorer(path: Path, temperature: float = 0.0) -> AgentScorer:
    from qprobe.agent.backends import TransformersBackend

    config = RolloutConfig(global_max_pixels=BUDGET, crop_max_pixels=BUDGET, max_crops=1, max_new_tokens=6,
                           temperature=temperature)
    return AgentScorer(TransformersBackend(str(path)), config)


def test_crop_boxes_are_the_centre_and_the_quadrants() -> None:
    geometry = Geometry(original=(2000, 1000), view=(400, 200))
    boxes = crop_boxes(geometry, 5)
    assert boxes[0] == (100, 50, 300, 150)
    assert boxes[1:] == [(0, 0, 200, 100), (200, 0, 400, 100), (0, 100, 200, 200), (200, 100, 400, 200)]
    assert crop_boxes(geometry, 2) == boxes[:2]


def test_tool_crops_are_native_pixels() -> None:
    photo = Image.fromarray(data.astronaut())
    # A crop budget larger than the region: the crop keeps the photo's own scale (Qwen2.5-VL only snaps
    # its sides to whole 28 px patches: 256 -> 252), it is not a downscaled view.
    crops = tool_crops(photo, 5, global_max_pixels=BUDGET, crop_max_pixels=512 * 512)
    assert [region for _, region in crops][:2] == [(128, 128, 384, 384), (0, 0, 256, 256)]
    for crop, region in crops:
        assert crop.size == (252, 252) and region[2] - region[0] == 256
        native = np.asarray(photo.crop(region).resize(crop.size, Image.Resampling.BICUBIC), dtype=float)
        assert np.abs(np.asarray(crop, dtype=float) - native).mean() < 1.0
    # Under a small budget the region is cut at native resolution and then resized to the budget.
    small = tool_crops(photo, 1, global_max_pixels=BUDGET, crop_max_pixels=56 * 56)
    assert small[0][0].size == (56, 56) and small[0][1] == (128, 128, 384, 384)


def test_crop_bias_measures_a_known_bias_and_none_where_there_is_none() -> None:
    photo = Image.fromarray(data.astronaut()).resize((1000, 1000))
    biased = crop_bias(ZoomBiased(), [("astronaut", photo)], crops=4, global_max_pixels=BUDGET,
                       crop_max_pixels=BUDGET)
    # Each crop is 500 px cut and shown at the crop budget (112 px): 1 - 112 / 1000 below the photo.
    assert biased.summary["mean_shift"] == pytest.approx(-(1 - 112 / 1000))
    assert biased.summary["pairs"] == 4 and biased.summary["answered_pairs"] == 4
    fair = crop_bias(Flags(), [("astronaut", photo)], crops=2, global_max_pixels=BUDGET, crop_max_pixels=BUDGET)
    assert fair.summary["mean_shift"] == 0 and fair.summary["mean_abs_shift"] == 0
    assert [c["region"] for c in fair.rows[0]["crops"]] == [[250, 250, 750, 750], [0, 0, 500, 500]]


def test_crop_bias_of_piqe_on_a_pristine_photo(photos_dir: Path) -> None:
    photo = Image.open(photos_dir / "lxqt-this-is-not-windows.jpg").convert("RGB")
    result = crop_bias(PiqeScorer("global"), [("hills", photo)], crops=2, global_max_pixels=1280 * 28 * 28,
                       crop_max_pixels=1280 * 28 * 28)
    assert result.summary["answered_pairs"] == 2
    assert np.isfinite(result.summary["mean_shift"]) and np.isfinite(result.summary["shift_sem"])
    # The crop path keeps native scale: a 1024x768 region of the 2048x1536 photo fits the budget unscaled.
    region, size = result.rows[0]["crops"][0]["region"], result.rows[0]["crops"][0]["size"]
    assert region == [512, 384, 1536, 1152] and abs(size[0] - 1024) < 28 and abs(size[1] - 768) < 28


def test_crop_bias_survives_the_random_tiny_model(tiny_model_dir: Path) -> None:
    photo = Image.fromarray(data.chelsea())
    result = crop_bias(_tiny_scorer(tiny_model_dir), [("cat", photo)], crops=1, global_max_pixels=BUDGET,
                       crop_max_pixels=BUDGET)
    assert result.summary["answered_pairs"] == 0 and np.isnan(result.summary["mean_shift"])


def test_the_bokeh_list_names_photos_of_the_shared_folder(photos_dir: Path) -> None:
    names = bokeh_list()
    assert len(names) == len(set(names)) == 13
    assert all((photos_dir / n).is_file() for n in names)
    assert "lxqt-drop.png" in names and "plasma-Grey.jpg" not in names


def test_bokeh_list_from_a_file(tmp_path: Path) -> None:
    listing = tmp_path / "mine.txt"
    listing.write_text("# my photos\na.jpg   # shallow\n\nb.png\n")
    assert bokeh_list(listing) == ["a.jpg", "b.png"]


def test_bokeh_probe_with_piqe_on_natural_bokeh(photos_dir: Path) -> None:
    # A drop on a grass blade against a smooth green blur: PIQE ignores the uniform background (no
    # active blocks) and does not flag the photo; the same photo blurred all over is flagged.
    photo = Image.open(photos_dir / "lxqt-drop.png").convert("RGB")
    blurred = photo.filter(ImageFilter.GaussianBlur(4))
    result = bokeh(PiqeScorer("global"), [("drop", photo), ("drop blurred", blurred)])
    natural, artificial = result.rows
    assert not natural["flagged"] and natural["score"] > 3
    assert artificial["flagged"] and artificial["low_score"]
    assert result.summary["flag_rate"] == 0.5
    flagged = bokeh(Flags(), [("drop", photo)])
    assert flagged.rows[0]["blur_defect"] and flagged.summary["blur_defect_rate"] == 1.0


def test_bokeh_probe_survives_the_random_tiny_model(photos_dir: Path, tiny_model_dir: Path) -> None:
    photo = Image.open(photos_dir / "mate-LadyBird.jpg").convert("RGB")
    result = bokeh(_tiny_scorer(tiny_model_dir), [("ladybird", photo)])
    assert result.summary["photos"] == 1 and result.summary["answered"] == 0
    assert np.isnan(result.summary["flag_rate"])


def test_repeatability() -> None:
    photo = Image.fromarray(data.coffee())
    assert repeatability(PiqeScorer("patch", tile=128), [("coffee", photo)], runs=3).summary["mean_std"] == 0
    noisy = repeatability(Noisy(), [("coffee", photo), ("again", photo)], runs=4, seed=5)
    expected = np.std([3.0 + np.random.default_rng(s).normal(0, 0.3) for s in range(5, 9)], ddof=1)
    assert noisy.rows[0]["std"] == pytest.approx(expected)
    assert noisy.summary["answer_rate"] == 1 and noisy.summary["max_std"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="2 runs"):
        repeatability(Noisy(), [("coffee", photo)], runs=1)


def test_repeatability_survives_the_random_tiny_model(tiny_model_dir: Path) -> None:
    scorer = _tiny_scorer(tiny_model_dir, temperature=1.0)
    result = repeatability(scorer, [("cat", Image.fromarray(data.chelsea()))], runs=2)
    assert result.summary["answer_rate"] == 0 and np.isnan(result.summary["mean_std"])
