"""Local degradations: plain functions in a registry, each with a severity from 1 to 5.

A degradation takes the float32 RGB neighbourhood of a defect box (values 0-255), a severity, a
random generator and the neighbourhood's top-left corner in the image (so that block artefacts
sit on the image's own 8x8 grid, as a real codec's would), and returns the degraded neighbourhood.
:func:`inject` cuts that neighbourhood out of the image, degrades it, and blends the result back
through a feathered mask that is zero outside the box: every pixel outside the box stays bitwise
identical to the source photo, and the box written to the manifest is exactly where pixels changed.

Where a defect is a loss or corruption of fine detail, it is injected into the detail (texture)
subbands of a ``pywt.wavedec2`` decomposition of the neighbourhood (``sym4``, 4 levels) and the
neighbourhood is reconstructed with ``waverec2``:

==============  ======================================================================  ==========
type            what it does                                                            domain
==============  ======================================================================  ==========
``blur``        attenuates detail coefficients, finest levels first                    wavelet
``noise``       adds Gaussian noise to the two finest detail levels                     wavelet
``ringing``     amplifies the fine and middle detail levels: over-sharpening halos      wavelet
``jpeg``        8x8 block DCT of YCbCr, quantised with the JPEG tables at low quality   block DCT
``pixelation``  averages f x f blocks on the image grid (f grows with severity)         pixels
``banding``     posterises each channel to few levels: contours in gradients            pixels
==============  ======================================================================  ==========

Strength grows strictly with severity for every type, so more severity means a lower PSNR
against the source. A type itself (its MOS weight, phrasing, colour) is an entry of
:data:`qprobe.defects.TYPES`; this module holds its pixels: adding a type is that entry plus one
function here registered under its name (a test holds the two in step).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pywt
from scipy.fft import dctn, idctn

from qprobe import defects

DegradationFn = Callable[[np.ndarray, int, np.random.Generator, tuple[int, int]], np.ndarray]

WAVELET = "sym4"
LEVELS = 4
# Photo context the neighbourhood transform sees around a box, so that the degraded pixels near the
# box edge are made from the photo rather than from the transform's mirrored border extension.
MARGIN = 2**LEVELS
SEVERITIES = (1, 2, 3, 4, 5)


# The degradation function of each registered type (:data:`qprobe.defects.TYPES`), by name.
DEGRADATIONS: dict[str, DegradationFn] = {}


def register(name: str) -> Callable[[DegradationFn], DegradationFn]:
    """Add the decorated function to :data:`DEGRADATIONS` as the degradation of registered type ``name``."""
    if name not in defects.TYPES:
        raise KeyError(f"degradation {name!r} has no entry in qprobe.defects.TYPES")

    def wrap(fn: DegradationFn) -> DegradationFn:
        DEGRADATIONS[name] = fn
        return fn

    return wrap


def _map_details(patch: np.ndarray, change: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``change(level, coefficients)`` to every detail subband (level 1 = finest) and reconstruct."""
    levels = min(LEVELS, pywt.dwt_max_level(min(patch.shape[:2]), WAVELET))
    coeffs = pywt.wavedec2(patch, WAVELET, level=levels, axes=(0, 1))
    out: list = [coeffs[0]]
    for index, details in enumerate(coeffs[1:]):
        level = levels - index
        out.append(tuple(change(level, band) for band in details))
    rec = pywt.waverec2(out, WAVELET, axes=(0, 1))
    return rec[: patch.shape[0], : patch.shape[1]]


# Per severity, the factor that multiplies detail levels 1-4 (finest first).
_BLUR_GAIN = (
    (0.40, 0.85, 1.00, 1.00),
    (0.10, 0.50, 0.90, 1.00),
    (0.00, 0.20, 0.60, 0.95),
    (0.00, 0.05, 0.30, 0.70),
    (0.00, 0.00, 0.10, 0.40),
)


@register("blur")
def blur(patch: np.ndarray, severity: int, rng: np.random.Generator, origin: tuple[int, int]) -> np.ndarray:
    """Defocus-like blur: detail coefficients attenuated, finest levels most."""
    gains = _BLUR_GAIN[severity - 1]
    return _map_details(patch, lambda level, band: band * gains[level - 1])


_NOISE_SIGMA = (4.0, 7.0, 11.0, 16.0, 23.0)  # grey levels, level-1 coefficients; level 2 gets half


@register("noise")
def noise(patch: np.ndarray, severity: int, rng: np.random.Generator, origin: tuple[int, int]) -> np.ndarray:
    """Sensor-like noise: Gaussian noise added to the two finest detail levels."""
    sigma = _NOISE_SIGMA[severity - 1]
    # One unit-variance draw scaled by sigma: the same pattern at every severity, only stronger,
    # so the error grows strictly with severity.
    return _map_details(
        patch,
        lambda level, band: band + rng.standard_normal(band.shape, dtype=np.float32) * (sigma / level)
        if level <= 2 else band,
    )


_RING_GAIN = (1.8, 2.6, 3.6, 4.8, 6.5)  # level 1; level 2 gets the square root, level 3 its fourth root


@register("ringing")
def ringing(patch: np.ndarray, severity: int, rng: np.random.Generator, origin: tuple[int, int]) -> np.ndarray:
    """Over-sharpening: fine and middle detail levels amplified, halos and ringing at edges."""
    gain = _RING_GAIN[severity - 1]
    return _map_details(patch, lambda level, band: band * gain ** (1.0 / 2 ** (level - 1)) if level <= 3 else band)


_JPEG_QUALITY = (45, 25, 14, 8, 4)
_LUMA_TABLE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], dtype=np.float32).reshape(8, 8)
_CHROMA_TABLE = np.full((8, 8), 99, dtype=np.float32)
_CHROMA_TABLE[:4, :4] = np.array([17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 99, 47, 66, 99, 99]).reshape(4, 4)
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                       dtype=np.float32)


def _quant_table(base: np.ndarray, quality: int) -> np.ndarray:
    # The IJG quality scaling that libjpeg applies to the standard tables.
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((base * scale + 50) / 100), 1, 255)


@register("jpeg")
def jpeg(patch: np.ndarray, severity: int, rng: np.random.Generator, origin: tuple[int, int]) -> np.ndarray:
    """JPEG compression: 8x8 block DCT of YCbCr quantised with the standard tables at low quality."""
    quality = _JPEG_QUALITY[severity - 1]
    top, left = origin[0] % 8, origin[1] % 8
    height, width = patch.shape[:2]
    bottom, right = -(top + height) % 8, -(left + width) % 8
    # Pad so that blocks fall on the image's own 8x8 grid, as they would in a real JPEG file.
    padded = np.pad(patch, ((top, bottom), (left, right), (0, 0)), mode="edge")
    ycc = padded @ _RGB_TO_YCC.T
    ycc[..., 0] -= 128.0
    rows, cols = ycc.shape[0] // 8, ycc.shape[1] // 8
    blocks = ycc.reshape(rows, 8, cols, 8, 3)
    coeffs = dctn(blocks, axes=(1, 3), norm="ortho")
    for c, base in enumerate((_LUMA_TABLE, _CHROMA_TABLE, _CHROMA_TABLE)):
        q = _quant_table(base, quality)[None, :, None, :]
        coeffs[..., c] = np.round(coeffs[..., c] / q) * q
    ycc = idctn(coeffs, axes=(1, 3), norm="ortho").reshape(ycc.shape)
    ycc[..., 0] += 128.0
    rgb = ycc @ np.linalg.inv(_RGB_TO_YCC).T
    return rgb[top: top + height, left: left + width]


_PIXEL_BLOCK = (3, 5, 8, 12, 18)


@register("pixelation")
def pixelation(patch: np.ndarray, severity: int, rng: np.random.Generator, origin: tuple[int, int]) -> np.ndarray:
    """Pixelation from bad resampling: f x f blocks on the image grid replaced by their mean."""
    f = _PIXEL_BLOCK[severity - 1]
    top, left = origin[0] % f, origin[1] % f
    height, width = patch.shape[:2]
    bottom, right = -(top + height) % f, -(left + width) % f
    padded = np.pad(patch, ((top, bottom), (left, right), (0, 0)), mode="edge")
    rows, cols = padded.shape[0] // f, padded.shape[1] // f
    means = padded.reshape(rows, f, cols, f, 3).mean(axis=(1, 3), keepdims=True)
    blocks = np.broadcast_to(means, (rows, f, cols, f, 3)).reshape(padded.shape)
    return blocks[top: top + height, left: left + width]


_BAND_LEVELS = (24, 14, 9, 6, 4)


@register("banding")
def banding(patch: np.ndarray, severity: int, rng: np.random.Generator, origin: tuple[int, int]) -> np.ndarray:
    """Colour banding: each channel posterised to a few levels, gradients turn into flat bands."""
    step = 255.0 / (_BAND_LEVELS[severity - 1] - 1)
    return np.round(patch / step) * step


def feather_mask(height: int, width: int, feather: float) -> np.ndarray:
    """``height x width`` blend weights: 1 in the middle, a smoothstep to 0 across the outer ``feather``.

    ``feather`` is the fraction of the box's half-size used for the ramp; ``0`` gives a hard edge.
    Every weight is positive, so the mask's support is the whole box.
    """

    def ramp(n: int) -> np.ndarray:
        dist = np.minimum(np.arange(n), np.arange(n)[::-1]) + 0.5  # distance to the nearer edge
        width_px = feather * n / 2
        if width_px <= 0.5:
            return np.ones(n, dtype=np.float32)
        t = np.clip(dist / width_px, 0.0, 1.0)
        return (t * t * (3 - 2 * t)).astype(np.float32)

    return ramp(height)[:, None] * ramp(width)[None, :]


def inject(
    image: np.ndarray,
    kind: str,
    severity: int,
    box: tuple[int, int, int, int],
    rng: np.random.Generator,
    feather: float = 0.3,
) -> None:
    """Degrade ``box = (x1, y1, x2, y2)`` of the uint8 RGB ``image`` in place; pixels outside stay as they were."""
    if kind not in DEGRADATIONS:
        raise KeyError(f"unknown degradation {kind!r} (known: {', '.join(DEGRADATIONS)})")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1-5, got {severity}")
    x1, y1, x2, y2 = box
    height, width = image.shape[:2]
    nx1, ny1 = max(0, x1 - MARGIN), max(0, y1 - MARGIN)
    nx2, ny2 = min(width, x2 + MARGIN), min(height, y2 + MARGIN)
    patch = image[ny1:ny2, nx1:nx2].astype(np.float32)
    degraded = DEGRADATIONS[kind](patch, severity, rng, (ny1, nx1))
    inner = degraded[y1 - ny1: y2 - ny1, x1 - nx1: x2 - nx1]
    source = patch[y1 - ny1: y2 - ny1, x1 - nx1: x2 - nx1]
    mask = feather_mask(y2 - y1, x2 - x1, feather)[..., None]
    blended = source + mask * (inner - source)
    image[y1:y2, x1:x2] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
