"""What Q-Probe is compared with, and the one interface every method is scored through.

A *scorer* turns a photo into a :class:`Prediction`: a score on the MOS scale (1-5, higher is
better; ``None`` when the method gave none), the defect boxes it found in original pixels, and what
it cost. Evaluation and the probes (:mod:`qprobe.eval.probes`) take any scorer, so the model, its
tool-less self and the classical baseline are measured by exactly the same code.

**The agent** (:class:`AgentScorer`): a rollout of :mod:`qprobe.agent.rollout` with a backend (a
local checkpoint or an OpenAI-compatible endpoint). With ``max_crops=0`` it is the paper's most
direct ablation, *the same model with the tool disabled*: one look at the downscaled global view.

**PIQE** (Venkatanath N, Praneeth D, Maruthi Chandrasekhar Bh, S. S. Channappayya, S. S. Medasani,
"Blind image quality evaluation using perception based features", NCC 2015), implemented from the
published algorithm (and MATLAB's documented behaviour, ``piqe``) in vectorised numpy:

1. luminance (ITU-R BT.601 weights, as ``rgb2gray``) in 0-255, padded at the bottom and right by
   mirroring to a multiple of 16;
2. MSCN coefficients: ``(I - mu) / (sigma + 1)`` with ``mu`` and ``sigma`` the local mean and
   deviation under a 7x7 Gaussian window (sigma 7/6, edges replicated);
3. 16x16 non-overlapping blocks; a block is *spatially active* when the variance ``v`` of its MSCN
   coefficients exceeds 0.1 (uniform blocks, a clear sky or a bokeh background, are ignored);
4. an active block shows a *noticeable distortion* when any run of 6 consecutive pixels along one of
   its four edges has a standard deviation under 0.1 (a flat segment at a block edge: blockiness,
   or any sudden artifact), and *noise* when its deviation ``sqrt(v)`` exceeds ``2 beta``, with
   ``beta = |sqrt(v) - r| / max(sqrt(v), r)`` and ``r`` the ratio of the standard deviations of its
   two centre columns and of the other fourteen;
5. each active block adds ``1 - v`` if distorted and ``v`` if noisy, and the score is
   ``100 (sum + 1) / (N_active + 1)``: 0 is excellent, 100 bad (a uniform image scores 100).

The **global** PIQE score is this over the whole photo at native resolution. The **patch-wise
probe** (:func:`piqe_tiles`) is the classical counterpart of Q-Probe's crops: the same block
statistics pooled per tile of the native-resolution photo; the photo's score is the mean of its
``worst`` tiles, and those of them at or past the "poor" band (PIQE >= 50) are reported as defect
boxes. Tiles with few active blocks are not ranked: PIQE scores a featureless tile 100, and an
out-of-focus background must not pass for the worst part of a photo. PIQE names two kinds of damage;
noise is reported as ``noise`` and noticeable distortion (blockiness) as ``jpeg``, the bench type it
stands for. PIQE's 0-100 maps to the MOS scale linearly as ``5 - PIQE / 25``, which puts its "poor"
band (50-80) below 3.

Worth knowing when reading its numbers: mild noise can *improve* PIQE on a photo with large smooth
areas (it makes inactive blocks active and dilutes the distorted ones), and sharp subjects against a
bokeh background often land in the "poor" band (their edges are flat on one side).

**SSIM** (Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality assessment: from error
visibility to structural similarity", IEEE TIP 2004) is the *full-reference* yardstick: it compares
the photo with its pristine original, so it sees every injected defect and none of the content. It
tells how well the split can rank a method that sees the defects (the bench's images of one photo
share their original: the manifest row of the same ``source`` with no defect), where PIQE, blind,
also ranks the photos' content. The published definition: luminance as above, local means, variances
and covariance under an 11x11 Gaussian window (sigma 1.5), ``C1 = (0.01 * 255)^2`` and
``C2 = (0.03 * 255)^2``, averaged over the photo at native resolution. The average sits near 1 (a
local defect is a small part of a 2K photo), mapped to the MOS scale as ``1 + 4 SSIM``: its rank
and the logistic-mapped PLCC mean something, its raw RMSE does not. An image with no pristine
original in its manifest (a public IQA set) gets no score (outcome ``no_reference``), and the
probes, which score photos without one, do not run it.

**NIQE and BRISQUE** are not offered: scikit-image does not ship them, and both depend on fitted
parameters (NIQE's multivariate Gaussian of pristine-image features, BRISQUE's trained SVR) that
are not available offline here; refitting them on this repository's photos would make a different,
unpublished metric.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from scipy.ndimage import gaussian_filter

from qprobe.agent.backends import Backend
from qprobe.agent.rollout import RolloutConfig, Trace, rollout
from qprobe.errors import QProbeError, describe
from qprobe.io import DEFAULT_MAX_PIXELS, load_image

log = logging.getLogger(__name__)

BLOCK = 16
ACTIVITY_THRESHOLD = 0.1
SEGMENT_THRESHOLD = 0.1
SEGMENT = 6
MSCN_SIGMA = 7 / 6
PIQE_POOR = 50.0  # PIQE's quality bands: excellent 0-20, good 21-35, fair 36-50, poor 51-80, bad 81-100
PIQE_TYPES = {"noise": "noise", "distortion": "jpeg"}
_RGB2GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])


@dataclass
class Prediction:
    """One method's judgement of one photo.

    ``score`` is on the MOS scale (1-5) or ``None``; ``defects`` are ``{"type", "bbox"}`` with the
    box in original pixels; ``raw`` is the method's native score (PIQE's 0-100); ``outcome`` and
    ``failure`` say why an agent gave no score; ``crops`` are the regions it inspected (original
    pixels); ``cost`` holds turns, crops, token counts and seconds; ``trace`` is an agent's whole
    rollout (:meth:`qprobe.agent.rollout.Trace.to_dict`); ``error`` is why a method failed on this
    photo (``outcome`` ``error``: its endpoint timed out or answered out of shape, say).
    """

    score: float | None
    defects: list[dict[str, Any]] = field(default_factory=list)
    raw: float | None = None
    outcome: str = "answer"
    failure: str | None = None
    crops: list[list[int]] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)
    trace: dict[str, Any] | None = None
    error: str | None = None


class Scorer(Protocol):
    """A method under evaluation: a name, and a photo -> :class:`Prediction` call.

    ``seed`` picks the sample of a stochastic method (the agent at temperature > 0); deterministic
    methods ignore it. ``reference`` is the file of the photo's pristine original, where its set has
    one: a ``full_reference`` method needs it, the others ignore it.
    """

    name: str
    full_reference: bool

    def __call__(self, image: Image.Image, seed: int = 0, reference: Path | None = None) -> Prediction: ...


# ---------------------------------------------------------------------------------------------------
# The agent


def trace_cost(trace: Trace) -> dict[str, float]:
    """Turns, crops, visual and text tokens, seconds and the ratio to one full-resolution pass."""
    cost = trace.cost
    return {
        "turns": float(sum(t.role == "assistant" for t in trace.turns)),
        "crops": float(len(cost.crop_visual_tokens)),
        "global_visual_tokens": float(cost.global_visual_tokens),
        "crop_visual_tokens": float(sum(cost.crop_visual_tokens)),
        "visual_tokens": float(cost.agentic_visual_tokens),
        "text_tokens": float(cost.text_tokens),
        "generated_tokens": float(cost.generated_tokens),
        "full_resolution_visual_tokens": float(cost.full_resolution_visual_tokens),
        "visual_ratio": float(cost.visual_ratio),
        "seconds": float(trace.seconds),
    }


class AgentScorer:
    """Q-Probe's rollout as a scorer; ``config.max_crops == 0`` is the tool-disabled baseline."""

    full_reference = False

    def __init__(self, backend: Backend, config: RolloutConfig, name: str = "qprobe") -> None:
        self.backend = backend
        self.config = config
        self.name = name

    def __call__(self, image: Image.Image, seed: int = 0, reference: Path | None = None) -> Prediction:
        """The rollout's prediction; a failure on this photo (the endpoint's, or a bug's) is a
        prediction without a score and with its ``error``, so one photo never ends an evaluation."""
        try:
            trace = rollout(self.backend, image, replace(self.config, seed=seed))
        except Exception as exc:
            # A bug keeps its traceback in the log; the endpoint's failure is its one line.
            log.warning("%s: no prediction: %s", self.name, describe(exc),
                        exc_info=None if isinstance(exc, QProbeError) else exc)
            return Prediction(score=None, outcome="error", error=describe(exc))
        defects = [{"type": d["type"], "bbox": d["bbox_original"]} for d in trace.defects_original()]
        return Prediction(
            score=trace.score, defects=defects, raw=trace.score, outcome=trace.outcome,
            failure=str(trace.failure.kind) if trace.failure else None,
            crops=[list(box) for box in trace.crops_original()], cost=trace_cost(trace), trace=trace.to_dict(),
        )


# ---------------------------------------------------------------------------------------------------
# PIQE


@dataclass(frozen=True)
class PiqeBlocks:
    """PIQE's block-level results: one entry per 16x16 block of the (padded) photo."""

    variance: np.ndarray  # MSCN variance
    active: np.ndarray  # bool
    distortion: np.ndarray  # bool: noticeable distortion (active blocks only)
    noise: np.ndarray  # bool: noise (active blocks only)
    size: tuple[int, int]  # the photo's (width, height) before padding

    @property
    def contribution(self) -> np.ndarray:
        """Each block's share of the distortion sum (0 for inactive blocks)."""
        return self.distortion * (1.0 - self.variance) + self.noise * self.variance

    def score(self, rows: slice = slice(None), cols: slice = slice(None)) -> float:
        """PIQE (0-100) of the blocks in ``rows`` x ``cols`` (all of them by default)."""
        active = self.active[rows, cols]
        total = float(self.contribution[rows, cols][active].sum())
        return 100.0 * (total + 1.0) / (float(active.sum()) + 1.0)


def luminance(image: Image.Image | np.ndarray) -> np.ndarray:
    """0-255 luminance as ``rgb2gray`` computes it (rounded, as for 8-bit input)."""
    if isinstance(image, Image.Image) and image.mode != "RGB":
        image = image.convert("RGB")
    # Straight from an RGB image: converting it to RGB would copy every pixel first.
    pixels = np.asarray(image, dtype=np.float64)
    return np.round(pixels @ _RGB2GRAY) if pixels.ndim == 3 else pixels


def piqe_blocks(image: Image.Image | np.ndarray) -> PiqeBlocks:
    """PIQE's per-block activity, distortion and noise flags (steps 1-4 of the module docstring)."""
    gray = luminance(image)
    height, width = gray.shape
    gray = np.pad(gray, ((0, -height % BLOCK), (0, -width % BLOCK)), mode="symmetric")
    # truncate puts the kernel radius at 3 pixels: MATLAB's 7x7 window.
    mu = gaussian_filter(gray, MSCN_SIGMA, mode="nearest", truncate=3 / MSCN_SIGMA)
    sigma = np.sqrt(np.abs(gaussian_filter(gray * gray, MSCN_SIGMA, mode="nearest", truncate=3 / MSCN_SIGMA)
                           - mu * mu))
    mscn = (gray - mu) / (sigma + 1.0)
    rows, cols = mscn.shape[0] // BLOCK, mscn.shape[1] // BLOCK
    blocks = mscn.reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3)
    variance = blocks.var(axis=(2, 3), ddof=1)
    active = variance > ACTIVITY_THRESHOLD

    edges = np.stack([blocks[..., 0, :], blocks[..., :, -1], blocks[..., -1, :], blocks[..., :, 0]], axis=2)
    segments = sliding_window_view(edges, SEGMENT, axis=-1).std(axis=-1, ddof=1)
    distortion = active & (segments < SEGMENT_THRESHOLD).any(axis=(2, 3))

    mid = BLOCK // 2
    centre = blocks[..., :, mid - 1: mid + 1].reshape(rows, cols, -1)
    surround = np.concatenate([blocks[..., :, : mid - 1], blocks[..., :, mid + 1:]], axis=-1)
    surround = surround.reshape(rows, cols, -1)
    # Flat blocks divide 0 by 0 here; they are inactive, and the nan they give compares False.
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.nan_to_num(centre.std(axis=-1, ddof=1) / surround.std(axis=-1, ddof=1), nan=0.0, posinf=0.0)
        deviation = np.sqrt(variance)
        beta = np.abs(deviation - ratio) / np.maximum(deviation, ratio)
        noise = active & (deviation > 2.0 * beta)
    return PiqeBlocks(variance=variance, active=active, distortion=distortion, noise=noise, size=(width, height))


# The global and the patch-wise scorer (in the scoring loop and in every probe) are handed the same
# photo, and its blocks cost ten times more than hashing its pixels. Keyed by content, an image edited
# in place is a new image; enough entries that threads scoring photos side by side keep theirs.
_SHARED_BLOCKS = 32
_BLOCKS: OrderedDict[tuple[str, tuple[int, int], bytes], tuple[PiqeBlocks, float]] = OrderedDict()
_BLOCKS_LOCK = threading.Lock()


def shared_piqe_blocks(image: Image.Image) -> tuple[PiqeBlocks, float]:
    """:func:`piqe_blocks` of ``image`` and the seconds they took, computed once for the same pixels
    among the last few photos."""
    key = (image.mode, image.size, hashlib.blake2b(image.tobytes(), digest_size=16).digest())
    with _BLOCKS_LOCK:
        if key in _BLOCKS:
            _BLOCKS.move_to_end(key)
            return _BLOCKS[key]
    start = time.perf_counter()
    entry = (piqe_blocks(image), time.perf_counter() - start)
    with _BLOCKS_LOCK:
        _BLOCKS[key] = entry
        while len(_BLOCKS) > _SHARED_BLOCKS:
            _BLOCKS.popitem(last=False)
    return entry


def piqe(image: Image.Image | np.ndarray) -> float:
    """PIQE of the whole photo at native resolution: 0 (excellent) to 100 (bad)."""
    return piqe_blocks(image).score()


def piqe_to_mos(value: float) -> float:
    """PIQE 0-100 (lower is better) -> the MOS scale 1-5 (higher is better), linearly, clipped."""
    return float(min(5.0, max(1.0, 5.0 - value / 25.0)))


@dataclass(frozen=True)
class Tile:
    box: tuple[int, int, int, int]  # original pixels, clipped to the photo
    piqe: float
    active_share: float
    kind: str  # "noise" or "distortion": the criterion that flagged more of its active blocks


def piqe_tiles(blocks: PiqeBlocks, tile: int = 512, min_active: float = 0.1) -> list[Tile]:
    """The photo's tiles of ``tile`` native pixels (rounded to whole blocks) with enough active blocks.

    A tile is ranked only if at least ``min_active`` of its blocks are spatially active; sorted worst
    (highest PIQE) first.
    """
    step = max(1, round(tile / BLOCK))
    width, height = blocks.size
    tiles = []
    for r in range(0, blocks.active.shape[0], step):
        for c in range(0, blocks.active.shape[1], step):
            rows, cols = slice(r, r + step), slice(c, c + step)
            active = blocks.active[rows, cols]
            share = float(active.mean())
            if share < min_active:
                continue
            kind = "noise" if blocks.noise[rows, cols].sum() > blocks.distortion[rows, cols].sum() else "distortion"
            box = (c * BLOCK, r * BLOCK, min(width, (c + active.shape[1]) * BLOCK),
                   min(height, (r + active.shape[0]) * BLOCK))
            tiles.append(Tile(box=box, piqe=blocks.score(rows, cols), active_share=share, kind=kind))
    return sorted(tiles, key=lambda t: -t.piqe)


class PiqeScorer:
    """PIQE as a scorer: ``mode="global"`` over the whole photo, ``"patch"`` over its worst tiles."""

    full_reference = False

    def __init__(self, mode: str = "global", tile: int = 512, worst: int = 3, min_active: float = 0.1,
                 poor: float = PIQE_POOR) -> None:
        if mode not in ("global", "patch"):
            raise ValueError(f"PIQE mode must be 'global' or 'patch', got {mode!r}")
        if tile < BLOCK or worst < 1:
            raise ValueError(f"PIQE tiles need tile >= {BLOCK} pixels and worst >= 1, got {tile} and {worst}")
        self.mode = mode
        self.tile = tile
        self.worst = worst
        self.min_active = min_active
        self.poor = poor
        self.name = "piqe" if mode == "global" else "piqe_patch"

    def __call__(self, image: Image.Image, seed: int = 0, reference: Path | None = None) -> Prediction:
        # Blocks shared with the other PIQE scorer still count in this one's cost: what it would take alone.
        blocks, seconds = shared_piqe_blocks(image)
        start = time.perf_counter()
        defects: list[dict[str, Any]] = []
        value = blocks.score()
        if self.mode == "patch":
            worst = piqe_tiles(blocks, self.tile, self.min_active)[: self.worst]
            # No tile with enough structure to judge: the photo is judged as a whole.
            if worst:
                value = float(np.mean([t.piqe for t in worst]))
                defects = [{"type": PIQE_TYPES[t.kind], "bbox": list(t.box)} for t in worst if t.piqe >= self.poor]
        return Prediction(score=piqe_to_mos(value), defects=defects, raw=value,
                          cost={"seconds": seconds + time.perf_counter() - start})


# ---------------------------------------------------------------------------------------------------
# SSIM, full reference

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # a radius of 5 pixels: the paper's 11x11 window
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2


def _blur(values: np.ndarray) -> np.ndarray:
    return gaussian_filter(values, SSIM_SIGMA, truncate=SSIM_TRUNCATE)


@dataclass(frozen=True)
class LocalStats:
    """A photo's luminance with its local means and variances under SSIM's window (float32)."""

    gray: np.ndarray
    mean: np.ndarray
    variance: np.ndarray

    @classmethod
    def of(cls, image: Image.Image | np.ndarray) -> LocalStats:
        # float32 halves the filters' time; the local statistics of 0-255 values lose nothing SSIM sees.
        gray = luminance(image).astype(np.float32)
        mean = _blur(gray)
        return cls(gray=gray, mean=mean, variance=_blur(gray * gray) - mean * mean)


Photo = Image.Image | np.ndarray | LocalStats


def ssim_map(image: Photo, reference: Photo) -> np.ndarray:
    """SSIM at each pixel of ``image`` against ``reference`` (the same size): 1 where they agree."""
    x = image if isinstance(image, LocalStats) else LocalStats.of(image)
    y = reference if isinstance(reference, LocalStats) else LocalStats.of(reference)
    if x.gray.shape != y.gray.shape:
        (h1, w1), (h2, w2) = x.gray.shape, y.gray.shape
        raise ValueError(f"SSIM needs images of one size, got {w1}x{h1} and {w2}x{h2}")
    covariance = _blur(x.gray * y.gray) - x.mean * y.mean
    numerator = (2 * x.mean * y.mean + SSIM_C1) * (2 * covariance + SSIM_C2)
    return numerator / ((x.mean * x.mean + y.mean * y.mean + SSIM_C1) * (x.variance + y.variance + SSIM_C2))


def ssim(image: Photo, reference: Photo) -> float:
    """Mean SSIM of ``image`` against ``reference`` at native resolution: 1 is identical."""
    return float(np.mean(ssim_map(image, reference), dtype=np.float64))


@functools.lru_cache(maxsize=2)
def _reference_stats(path: Path, mtime_ns: int, size: int, max_pixels: int) -> tuple[LocalStats, float]:
    # Keyed by the file's mtime and size too: a reference rewritten since is read again. A photo's
    # variants are scored one after another, so its original is read and filtered once for them all.
    start = time.perf_counter()
    stats = LocalStats.of(load_image(path, max_pixels=max_pixels))
    return stats, time.perf_counter() - start


class SsimScorer:
    """SSIM against the photo's pristine original (the module docstring), mapped to the MOS scale."""

    name = "ssim"
    full_reference = True

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.max_pixels = max_pixels

    def __call__(self, image: Image.Image, seed: int = 0, reference: Path | None = None) -> Prediction:
        if reference is None:
            return Prediction(score=None, outcome="no_reference")
        try:
            status = reference.stat()
            original, seconds = _reference_stats(reference, status.st_mtime_ns, status.st_size,
                                                 self.max_pixels)
        except (OSError, QProbeError) as exc:
            return Prediction(score=None, outcome="error", error=f"{reference}: {describe(exc)}")
        start = time.perf_counter()
        try:
            value = ssim(image, original)
        except ValueError as exc:  # an original of another size
            return Prediction(score=None, outcome="error", error=f"{reference} (the original): {exc}")
        # What it would take alone: the original's statistics count in every image that used them.
        return Prediction(score=1.0 + 4.0 * max(value, 0.0), raw=value,
                          cost={"seconds": seconds + time.perf_counter() - start})
