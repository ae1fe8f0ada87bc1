"""The wavelet texture map and the region placement that relies on it, on real photo content."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from qprobe.bench.regions import overlap, place_regions
from qprobe.bench.texture import texture_map
from qprobe.io import load_image


@pytest.fixture(scope="module")
def sky_and_grass() -> np.ndarray:
    """480x640: the left half a smooth sky gradient, the right half real grass texture."""
    grass = data.grass()[:480, :320]
    sky = np.linspace(150, 210, 480)[:, None].repeat(320, axis=1)
    grey = np.concatenate([sky, grass.astype(np.float64)], axis=1).round().astype(np.uint8)
    blue = np.stack([grey * 0.7, grey * 0.85, grey], axis=-1)
    return blue.round().astype(np.uint8)


def test_textured_patch_ranks_above_flat_patch(sky_and_grass):
    tmap = texture_map(sky_and_grass, analysis_size=256, levels=3)
    flat = tmap.box_mean((40, 40, 280, 440))
    textured = tmap.box_mean((360, 40, 600, 440))
    assert textured > 0.5 > 0.15 > flat
    assert tmap.values.min() >= 0.0 and tmap.values.max() < 1.0


def test_grid_covers_the_image(sky_and_grass):
    tmap = texture_map(sky_and_grass, analysis_size=256, levels=3)
    rows, cols = tmap.values.shape
    assert (tmap.width, tmap.height) == (640, 480)
    assert rows * tmap.cell_y == pytest.approx(480) and cols * tmap.cell_x == pytest.approx(640)


def test_box_means_match_brute_force(sky_and_grass):
    tmap = texture_map(sky_and_grass, analysis_size=128, levels=2)
    means = tmap.box_means(5, 7)
    v = tmap.values
    assert means.shape == (v.shape[0] - 4, v.shape[1] - 6)
    for r, c in [(0, 0), (3, 11), (means.shape[0] - 1, means.shape[1] - 1)]:
        assert means[r, c] == pytest.approx(v[r: r + 5, c: c + 7].mean(dtype=np.float64), rel=1e-9)


def test_map_is_stable_across_resolutions():
    photo = data.astronaut()
    small = np.asarray(Image.fromarray(photo).resize((256, 256), Image.Resampling.BOX))
    a, b = texture_map(photo, analysis_size=256), texture_map(small, analysis_size=256)
    assert np.array_equal(a.values.shape, b.values.shape)
    # The full-size photo is box-downscaled to the same analysis image first.
    assert np.abs(a.values - b.values).max() < 0.05


def test_regions_land_on_texture_and_do_not_overlap(sky_and_grass):
    tmap = texture_map(sky_and_grass, analysis_size=256, levels=3)
    for seed in range(20):
        boxes = place_regions(tmap, 3, np.random.default_rng(seed), size_range=(0.1, 0.2), max_overlap=0.1)
        assert len(boxes) == 3
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480
            assert min(x2 - x1, y2 - y1) >= 0.1 * 480 / 1.5 - 1 and max(x2 - x1, y2 - y1) <= 0.2 * 480 * 1.5 + 1
            assert (x1 + x2) / 2 > 320, f"seed {seed}: box {boxes[i]} is in the flat half"
            for other in boxes[:i]:
                assert overlap(boxes[i], other) <= 0.1 + 1e-9


def test_regions_are_deterministic_and_vary_with_the_seed(sky_and_grass):
    tmap = texture_map(sky_and_grass, analysis_size=256)
    first = place_regions(tmap, 2, np.random.default_rng(7))
    assert first == place_regions(tmap, 2, np.random.default_rng(7))
    assert any(place_regions(tmap, 2, np.random.default_rng(s)) != first for s in range(8, 12))


def test_crowded_image_gets_fewer_boxes_rather_than_overlapping_ones():
    tmap = texture_map(data.astronaut()[:200, :200], analysis_size=128)
    boxes = place_regions(tmap, 10, np.random.default_rng(0), size_range=(0.6, 0.6), max_overlap=0.0)
    assert 1 <= len(boxes) < 10
    assert all(overlap(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[:i])


def test_real_photo_boxes_avoid_the_flattest_areas(photos_dir):
    photo = np.asarray(load_image(photos_dir / "mate-LadyBird.jpg"))
    tmap = texture_map(photo)
    boxes = [b for s in range(10) for b in place_regions(tmap, 2, np.random.default_rng(s))]
    scores = [tmap.box_mean(b) for b in boxes]
    assert min(scores) > np.quantile(tmap.values, 0.5)
