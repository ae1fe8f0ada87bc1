"""Parameters of ``qprobe evaluate`` (the ``evaluate:`` section of ``params.yaml``) and its methods.

The model is scored as ``qprobe``; the baselines beside it are named in :data:`BASELINES`. Every
module of the evaluation reads these names from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qprobe.agent.backends import EndpointArgs
from qprobe.agent.protocol_config import PROTOCOL_FIELD, ProtocolLimits
from qprobe.agent.rollout import RolloutConfig
from qprobe.executors import ExecutorArgs
from qprobe.io import DEFAULT_MAX_PIXELS

MODEL = "qprobe"
BASELINES = ("no_tool", "piqe", "piqe_patch", "ssim")
AGENTS = ("qprobe", "no_tool")
BOX_METHODS = ("qprobe", "no_tool", "piqe_patch")  # methods that report defect boxes
TRAINING_STAGES = ("stage1", "stage2", "stage3")


@dataclass
class EvaluateConfig(EndpointArgs, ExecutorArgs):
    """Parameters of ``qprobe evaluate`` (the ``evaluate:`` section of ``params.yaml``)."""

    model: str = field(default="models/stage3", metadata={
        "help": "Qwen2.5-VL checkpoint folder, or the http(s):// base URL of an OpenAI-compatible server"})
    data: list[str] = field(default_factory=lambda: ["data/bench"], metadata={
        "help": "manifests to evaluate on (files, or folders holding manifest.parquet), several after one --data; "
                "any manifest with a mos column"})
    split: str = field(default="test", metadata={"help": "manifest split to evaluate ('all': every row)"})
    limit: int | None = field(default=None, metadata={
        "help": "at most this many images per set (a seeded sample); null: all"})
    out: str = field(default="outputs/evaluate", metadata={"help": "output folder (report, predictions, plots)"})
    metrics: str = field(default="metrics/evaluate.json", metadata={
        "help": "DVC metrics file: the nested summary (every metric: metrics_full.json in --out)"})
    protocol: ProtocolLimits = field(default_factory=ProtocolLimits, metadata=PROTOCOL_FIELD)
    max_new_tokens: int = field(default=1024, metadata={
        "help": "tokens the model may generate per image, all turns"})
    temperature: float = field(default=0.0, metadata={
        "help": "sampling temperature of the scored runs; 0 is greedy"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, set limits and the bootstrap"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the intervals (0: none)"})
    confidence: float = field(default=0.95, metadata={"help": "coverage of the bootstrap intervals"})
    iou_threshold: float = field(default=0.5, metadata={"help": "IoU at which a predicted box finds a true one"})
    baselines: list[str] = field(default_factory=lambda: list(BASELINES), metadata={
        "help": f"baselines to run beside the model: any of {', '.join(BASELINES)}"})
    piqe_tile: int = field(default=512, metadata={"help": "tile side of the PIQE patch probe, native pixels"})
    piqe_worst: int = field(default=3, metadata={"help": "worst tiles the PIQE patch probe pools"})
    crop_bias_images: int = field(default=2, metadata={
        "help": "pristine images of the sets for the cropping-bias probe (0: off)"})
    crop_bias_crops: int = field(default=4, metadata={"help": "tool crops per image in that probe (1-5)"})
    bokeh_dir: str | None = field(default=None, metadata={
        "help": "folder of the bokeh photos (assets/photos ships eight); null or missing: the probe is skipped"})
    bokeh_list: str | None = field(default=None, metadata={
        "help": "file naming the bokeh photos, one per line (default: the shipped qprobe/eval/bokeh.txt)"})
    bokeh_limit: int | None = field(default=None, metadata={
        "help": "at most this many bokeh photos (0: off); null: all"})
    repeat_images: int = field(default=2, metadata={"help": "images for the repeatability probe (0: off)"})
    repeat_runs: int = field(default=3, metadata={"help": "sampled runs per image in that probe"})
    repeat_temperature: float = field(default=0.7, metadata={"help": "sampling temperature of those runs"})
    gallery: int = field(default=4, metadata={"help": "worst and best cases shown in the report, each"})
    curves: list[str] = field(default_factory=lambda: [f"metrics/{s}_curves.csv" for s in TRAINING_STAGES],
                              metadata={"help": "the training stages' curve files the report draws (a missing one "
                                                "is skipped)"})
    max_image_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": "refuse images with more pixels than this (decompression bombs)"})

    def __post_init__(self) -> None:
        EndpointArgs.__post_init__(self)
        ExecutorArgs.__post_init__(self)
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown baseline {unknown[0]!r} (known: {', '.join(BASELINES)})")
        if not self.data:
            raise ValueError("data must name at least one manifest")
        for name in ("max_new_tokens", "max_image_pixels", "piqe_tile",
                     "piqe_worst", "gallery"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("bootstrap", "crop_bias_images", "repeat_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.bokeh_limit is not None and self.bokeh_limit < 0:
            raise ValueError(f"bokeh_limit must be >= 0 or null, got {self.bokeh_limit}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1 or null, got {self.limit}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not 0 < self.iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if not 1 <= self.crop_bias_crops <= 5:
            raise ValueError(f"crop_bias_crops must be 1 to 5, got {self.crop_bias_crops}")
        if self.repeat_images and self.repeat_runs < 2:
            raise ValueError(f"repeat_runs must be at least 2, got {self.repeat_runs}")
        if self.temperature < 0 or self.repeat_temperature < 0:
            raise ValueError("temperatures must be >= 0")

    @property
    def methods(self) -> list[str]:
        return [MODEL, *[b for b in BASELINES if b in self.baselines]]

    def rollout(self, max_crops: int | None = None, temperature: float | None = None) -> RolloutConfig:
        return RolloutConfig.under(
            self.protocol, max_crops=self.protocol.max_crops if max_crops is None else max_crops,
            max_new_tokens=self.max_new_tokens, temperature=self.temperature if temperature is None else temperature,
            seed=self.seed)
