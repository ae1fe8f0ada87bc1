"""Wavelet texture map: where a photo has fine detail that a local defect can damage.

Vista-Bench puts its defects in texture-rich regions (foliage, fabric, hair, text), never in flat
sky or smooth bokeh, where blur or JPEG loss would change almost nothing and the label would lie.
The map is computed once per photo:

1. Luminance ``Y = 0.299 R + 0.587 G + 0.114 B``, box-downscaled so its longer side is at most
   ``analysis_size`` pixels. Regions are hundreds of pixels wide on a 2-4K photo, so the
   statistic survives the downscale, and the transform then costs a few milliseconds instead of
   a full-resolution decomposition.
2. ``pywt.wavedec2(Y, "haar", level=L, mode="periodization")``: detail subbands
   ``(H_j, V_j, D_j)`` for levels ``j = 1`` (finest) to ``L``.
3. Per level, the RMS detail amplitude ``r_j = sqrt((H_j^2 + V_j^2 + D_j^2) / 3) / 2^j`` (the
   orthonormal Haar gain of level ``j`` divided out, so every level is in grey levels), brought
   onto the level-1 grid (one cell = 2x2 analysis pixels) by repeating coarser coefficients.
4. ``r = mean_j r_j``, then the saturating map ``t = r / (r + tau)`` with ``tau = TAU`` grey
   levels: ``t`` is in ``[0, 1)``, about 0.1 in clear sky and 0.7-0.9 in foliage. The scale is
   absolute (not per image), so the map also says how textured a region is, which the MOS model
   uses (:mod:`qprobe.bench.mos`).

:meth:`TextureMap.box_means` scores every placement of a box on the grid at once through an
integral image; :mod:`qprobe.bench.regions` picks defect boxes from those scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pywt
from PIL import Image

TAU = 6.0  # grey levels of RMS detail at which t = 0.5
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class TextureMap:
    """Texture in ``[0, 1)`` on a grid of cells; ``cell_x``/``cell_y`` are image pixels per cell."""

    values: np.ndarray
    cell_x: float
    cell_y: float
    width: int
    height: int

    def _integral(self) -> np.ndarray:
        integral = np.zeros((self.values.shape[0] + 1, self.values.shape[1] + 1), dtype=np.float64)
        integral[1:, 1:] = self.values.astype(np.float64).cumsum(0).cumsum(1)
        return integral

    def box_means(self, rows: int, cols: int) -> np.ndarray:
        """Mean texture of every ``rows x cols``-cell window; entry ``[i, j]`` has its top-left at cell ``(i, j)``."""
        s = self._integral()
        return (s[rows:, cols:] - s[:-rows, cols:] - s[rows:, :-cols] + s[:-rows, :-cols]) / (rows * cols)

    def box_mean(self, box: tuple[int, int, int, int]) -> float:
        """Mean texture under ``box = (x1, y1, x2, y2)`` in image pixels."""
        x1, y1, x2, y2 = box
        c1 = min(int(x1 / self.cell_x), self.values.shape[1] - 1)
        r1 = min(int(y1 / self.cell_y), self.values.shape[0] - 1)
        c2 = max(int(np.ceil(x2 / self.cell_x)), c1 + 1)
        r2 = max(int(np.ceil(y2 / self.cell_y)), r1 + 1)
        return float(self.values[r1:r2, c1:c2].mean())


def luminance(image: np.ndarray, max_side: int) -> np.ndarray:
    """Float32 luminance of an RGB uint8 array, box-downscaled so its longer side is at most ``max_side``."""
    height, width = image.shape[:2]
    factor = max(height, width) / max_side
    if factor > 1:
        size = (max(1, round(width / factor)), max(1, round(height / factor)))
        # Downscale in uint8 with Pillow's C resampler before weighting: no full-size float copy.
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    return image.astype(np.float32) @ LUMA


def texture_map(image: np.ndarray, analysis_size: int = 512, levels: int = 3) -> TextureMap:
    """The texture map of an RGB uint8 array (``H x W x 3``); see the module docstring."""
    height, width = image.shape[:2]
    y = luminance(image, analysis_size)
    step = 2**levels
    pad_r, pad_c = -y.shape[0] % step, -y.shape[1] % step
    # Edge padding to a multiple of 2^levels keeps every level's grid exactly half the previous one.
    padded = np.pad(y, ((0, pad_r), (0, pad_c)), mode="edge")
    coeffs = pywt.wavedec2(padded, "haar", level=levels, mode="periodization")
    rows, cols = padded.shape[0] // 2, padded.shape[1] // 2
    total = np.zeros((rows, cols), dtype=np.float32)
    for j, (ch, cv, cd) in enumerate(reversed(coeffs[1:]), start=1):
        rms = np.sqrt((ch * ch + cv * cv + cd * cd) / 3.0)
        # Orthonormal 2-D Haar scales level-j coefficients by 2^j (four children summed, halved):
        # divide it out so every level is in grey levels of the analysis image.
        rms /= 2.0**j
        rep = 2 ** (j - 1)
        total += np.repeat(np.repeat(rms, rep, axis=0), rep, axis=1)[:rows, :cols]
    r = total / levels
    values = r / (r + TAU)
    # Cells made entirely of padding are dropped; the grid covers the image.
    keep_r = max(1, -(-(padded.shape[0] - pad_r) // 2))
    keep_c = max(1, -(-(padded.shape[1] - pad_c) // 2))
    values = np.ascontiguousarray(values[:keep_r, :keep_c], dtype=np.float32)
    return TextureMap(values=values, cell_x=width / values.shape[1], cell_y=height / values.shape[0],
                      width=width, height=height)
