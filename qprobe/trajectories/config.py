"""Parameters of ``qprobe trajectories``: the ``trajectories:`` section of ``params.yaml``.

A module of its own so that the stage (:mod:`qprobe.trajectories.build`) and its gates
(:mod:`qprobe.trajectories.validation`) both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qprobe.agent.protocol_config import PROTOCOL_FIELD, ProtocolLimits
from qprobe.executors import ExecutorArgs
from qprobe.trajectories.planner import PlannerConfig


@dataclass
class TrajectoriesConfig(ExecutorArgs):
    """Parameters of ``qprobe trajectories`` (see :mod:`qprobe.trajectories.build` for the three sets)."""

    bench: str = field(default="data/bench", metadata={"help": "bench folder (holding manifest.parquet)"})
    out: str = field(default="data/trajectories", metadata={"help": "output folder: stage1/, sft/, rl/"})
    metrics: str = field(default="metrics/trajectories.json", metadata={"help": "DVC metrics file"})
    seed: int = field(default=0, metadata={"help": "seed for sampling, planning and phrasing"})
    train_splits: list[str] = field(default_factory=lambda: ["train"], metadata={
        "help": "bench splits that may reach training sets (never the test split)"})
    sft_size: int = field(default=48, metadata={"help": "SFT samples in all (low + high resolution)"})
    low_high_ratio: float = field(default=2.0, metadata={"help": "low-resolution : high-resolution SFT samples"})
    ratio_tolerance: float = field(default=0.15, metadata={"help": "allowed relative deviation of that ratio"})
    rl_size: int = field(default=48, metadata={"help": "Probe-RL prompts (0: every training image once)"})
    stage1_source: str = field(default="bench", metadata={
        "help": "'bench' (low-resolution views of the bench's training split) or a manifest path (public IQA set)"})
    stage1_size: int = field(default=0, metadata={"help": "stage-1 samples (0: every training image once)"})
    protocol: ProtocolLimits = field(default_factory=ProtocolLimits, metadata=PROTOCOL_FIELD)
    planner: PlannerConfig = field(default_factory=PlannerConfig, metadata={
        "help": "crop planner (a mapping); it plans protocol.max_crops crops at most"})
    reasoning: str = field(default="full", metadata={
        "help": "full: each phase in full sentences (the paper's Probe-CoT); brief: one short clause a phase, "
                "the critical check kept (the embedded default: a tiny model writes whole rollouts)"})
    samples_html: int = field(default=8, metadata={"help": "trajectories drawn in samples.html"})
    teacher: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible VLM endpoint that rewrites the reasoning of high-resolution samples"})
    teacher_tolerance: float = field(default=0.5, metadata={
        "help": "keep a rewrite only if the teacher's own score is this close to the MOS"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low_high_ratio < 0 or self.sft_size < 1:
            raise ValueError("need low_high_ratio >= 0 and sft_size >= 1")
        if self.reasoning not in ("full", "brief"):
            raise ValueError(f"reasoning must be 'full' or 'brief', got {self.reasoning!r}")
        if self.protocol.max_crops < 1:
            raise ValueError("protocol.max_crops must be at least 1: a high-resolution trajectory crops")
        if "test" in self.train_splits:
            raise ValueError("train_splits must not contain 'test': no test photo may reach training")

    @property
    def brief(self) -> bool:
        """Whether the reasoning is the brief style (one short clause a phase)."""
        return self.reasoning == "brief"
