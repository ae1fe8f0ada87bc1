"""Parameters of ``qprobe bench`` (the ``bench:`` section of ``params.yaml``) and their fingerprint.

The fingerprint names the settings that change the images or records; a record made under another
fingerprint (or another :data:`SYNTHESIS_VERSION`) is redone instead of resumed
(:mod:`qprobe.bench.synthesize`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Literal

from qprobe.data.manifest import SPLITS
from qprobe.defects import TYPES, check_types
from qprobe.executors import ExecutorArgs
from qprobe.io import DEFAULT_MAX_PIXELS

# Bumped whenever the synthesis algorithm changes the pixels it writes: records made by another
# version are redone instead of resumed.
SYNTHESIS_VERSION = 1
# The fields that change the images or records; anything else (paths, workers, limits) does not.
_FINGERPRINT_FIELDS = ("seed", "defects_per_image", "region_size", "max_overlap", "top_fraction", "types",
                       "feather", "format", "texture_size", "texture_levels")


@dataclass
class BenchConfig(ExecutorArgs):
    """Parameters of ``qprobe bench`` (the ``bench:`` section of ``params.yaml``)."""

    source: str = field(default="skimage", metadata={
        "help": "photos to degrade: a folder, s3://bucket/prefix, 'skimage' (bundled photos) or hf:NAME[:split]"})
    out: str = field(default="data/bench", metadata={"help": "output folder (manifest, images, contact sheet)"})
    metrics: str = field(default="metrics/bench.json", metadata={"help": "metrics file written at the end"})
    num_images: int | None = field(default=49, metadata={
        "help": "images to write, round-robin over the photos (a skipped photo's share is not made up); "
                "null: one per photo"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice (defects, splits, pristine share)"})
    min_size: int = field(default=256, metadata={"help": "skip photos whose longer side is below this (pixels)"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": "skip photos with more pixels than this (decompression bombs, giant scans)"})
    pristine_fraction: float = field(default=0.15, metadata={"help": "share of images left without defects"})
    defects_per_image: list[int] = field(default_factory=lambda: [1, 3], metadata={
        "help": "[min, max] defect boxes per degraded image"})
    region_size: list[float] = field(default_factory=lambda: [0.08, 0.2], metadata={
        "help": "[min, max] box side as a fraction of the photo's shorter side"})
    max_overlap: float = field(default=0.1, metadata={
        "help": "largest share of the smaller box two defect boxes may share"})
    top_fraction: float = field(default=0.2, metadata={
        "help": "boxes are drawn from this top share of placements ranked by texture"})
    types: list[str] = field(default_factory=lambda: list(TYPES), metadata={
        "help": f"defect types to use, from the registry qprobe/defects.py (known: {', '.join(TYPES)})"})
    feather: float = field(default=0.3, metadata={
        "help": "share of a box's half-size over which the defect fades in (0: hard edge)"})
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15}, metadata={
        "help": "fractions of source photos per split"})
    format: Literal["png", "webp"] = field(default="png", metadata={"help": "lossless image format: png or webp"})
    texture_size: int = field(default=512, metadata={
        "help": "longer side of the downscaled luminance the texture map is computed on"})
    texture_levels: int = field(default=3, metadata={"help": "wavelet levels of the texture map"})
    image_column: str = field(default="", metadata={"help": "hf sources: the image column (default: the first)"})
    source_version: str | None = field(default=None, metadata={
        "help": "DVC md5 of a DVC-tracked source folder; the retrain flow sets it so that new photos re-run "
                "this stage (and the run records which data version it used)"})
    contact_sheet_size: int = field(default=48, metadata={"help": "thumbnails on the contact sheet (0: none)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_images is not None and self.num_images < 1:
            raise ValueError(f"num_images must be at least 1 or null, got {self.num_images}")
        if self.min_size < 0 or self.max_pixels < 1:
            raise ValueError("min_size must be >= 0 and max_pixels >= 1")
        if not 0.0 <= self.pristine_fraction <= 1.0:
            raise ValueError(f"pristine_fraction must be in [0, 1], got {self.pristine_fraction}")
        lo, hi = _pair(self.defects_per_image, "defects_per_image")
        if not 1 <= lo <= hi:
            raise ValueError(f"defects_per_image must be [min, max] with 1 <= min <= max, got {self.defects_per_image}")
        lo, hi = _pair(self.region_size, "region_size")
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"region_size must be [min, max] with 0 < min <= max <= 1, got {self.region_size}")
        if not 0.0 <= self.max_overlap <= 1.0 or not 0.0 < self.top_fraction <= 1.0:
            raise ValueError("max_overlap must be in [0, 1] and top_fraction in (0, 1]")
        check_types(self.types, "types")
        if not 0.0 <= self.feather <= 1.0:
            raise ValueError(f"feather must be in [0, 1], got {self.feather}")
        if set(self.splits) - set(SPLITS) or any(v < 0 for v in self.splits.values()) \
                or not math.isclose(sum(self.splits.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"splits must map {'/'.join(SPLITS)} to fractions >= 0 summing to 1, got {self.splits}")
        if self.texture_size < 32 or not 1 <= self.texture_levels <= 6:
            raise ValueError("texture_size must be >= 32 and texture_levels in 1..6")
        if self.contact_sheet_size < 0:
            raise ValueError(f"contact_sheet_size must be >= 0, got {self.contact_sheet_size}")

    def fingerprint(self) -> str:
        """A hash of the settings that change the images or records, and of :data:`SYNTHESIS_VERSION`."""
        fields = {name: getattr(self, name) for name in _FINGERPRINT_FIELDS}
        text = json.dumps({"version": SYNTHESIS_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pair(values: list, name: str) -> tuple:
    if len(values) != 2:
        raise ValueError(f"{name} must be a list of two values [min, max], got {values}")
    return values[0], values[1]
