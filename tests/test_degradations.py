"""Each degradation changes pixels only inside its box, and more severity means a lower PSNR."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from skimage import data

from qprobe.bench.degradations import DEGRADATIONS, SEVERITIES, feather_mask, inject
from qprobe.defects import TYPES

BOX = (70, 60, 230, 190)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 256x320 crop of the astronaut photo: hair, face, fabric and flag give texture and edges."""
    return np.ascontiguousarray(data.astronaut()[20:276, 100:420])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_registry_has_the_six_paper_types_each_with_a_degradation_and_a_visibility_weight():
    assert {"blur", "noise", "jpeg", "ringing", "pixelation", "banding"} <= set(TYPES)
    assert set(DEGRADATIONS) == set(TYPES)  # a registered type without pixels, or pixels without a type
    for name, entry in TYPES.items():
        assert entry.name == name and callable(DEGRADATIONS[name])
        assert 0.0 < entry.visibility <= 1.0


@pytest.mark.parametrize("kind", sorted(DEGRADATIONS))
def test_pixels_change_only_inside_the_box(photo, kind):
    for severity in (1, 5):
        out = photo.copy()
        inject(out, kind, severity, BOX, np.random.default_rng(0))
        x1, y1, x2, y2 = BOX
        outside = np.ones(photo.shape[:2], dtype=bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(out[outside], photo[outside]), f"{kind} {severity} changed pixels outside its box"
        changed = np.any(out != photo, axis=-1)
        assert changed[y1:y2, x1:x2].mean() > 0.2, f"{kind} {severity} barely changed its box"


@pytest.mark.parametrize("kind", sorted(DEGRADATIONS))
def test_more_severity_lowers_psnr(photo, kind):
    psnrs = []
    for severity in SEVERITIES:
        out = photo.copy()
        inject(out, kind, severity, BOX, np.random.default_rng(0))
        x1, y1, x2, y2 = BOX
        psnrs.append(_psnr(out[y1:y2, x1:x2], photo[y1:y2, x1:x2]))
    assert all(a > b for a, b in itertools.pairwise(psnrs)), f"{kind}: PSNR by severity {psnrs}"


@pytest.mark.parametrize("kind", sorted(DEGRADATIONS))
def test_boxes_at_the_image_border_work(photo, kind):
    height, width = photo.shape[:2]
    for box in [(0, 0, 90, 70), (width - 90, height - 70, width, height)]:
        out = photo.copy()
        inject(out, kind, 3, box, np.random.default_rng(1))
        assert out.shape == photo.shape and out.dtype == np.uint8


def test_injection_is_deterministic_given_the_generator(photo):
    a, b = photo.copy(), photo.copy()
    inject(a, "noise", 4, BOX, np.random.default_rng(3))
    inject(b, "noise", 4, BOX, np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_jpeg_blocks_sit_on_the_image_grid(photo):
    # Two boxes that differ only in where their neighbourhood starts must quantise the same 8x8 blocks
    # the same way wherever the boxes overlap fully (away from the feathered edge).
    a, b = photo.copy(), photo.copy()
    inject(a, "jpeg", 5, (64, 64, 224, 224), np.random.default_rng(0), feather=0.0)
    inject(b, "jpeg", 5, (67, 61, 227, 221), np.random.default_rng(0), feather=0.0)
    assert np.abs(a[96:192, 96:192].astype(int) - b[96:192, 96:192].astype(int)).max() <= 1


def test_feather_mask_fades_to_the_edge_and_is_positive_everywhere():
    mask = feather_mask(40, 60, 0.5)
    assert mask.shape == (40, 60)
    assert mask[20, 30] == pytest.approx(1.0)
    assert 0.0 < mask.min() < 0.05
    assert np.allclose(mask, mask[::-1, ::-1])
    assert np.all(feather_mask(10, 10, 0.0) == 1.0)


def test_bad_arguments_are_refused(photo):
    with pytest.raises(KeyError, match="unknown degradation"):
        inject(photo.copy(), "sparkle", 3, BOX, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity"):
        inject(photo.copy(), "blur", 6, BOX, np.random.default_rng(0))
