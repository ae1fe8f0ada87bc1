"""Stage 2: SFT on hybrid-resolution tool-use trajectories, Probe-CoT (``qprobe train stage2``).

The model learns the agentic protocol itself: when to look closer, where to crop, how to read a crop
against the global context, and how to answer with a score and defect boxes (see :func:`main`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from trl import SFTConfig

from qprobe.config import parse_config
from qprobe.errors import QProbeError
from qprobe.train.common import (
    StageArgs,
    check_pixel_budgets,
    load_dataset_dir,
    lora_config,
    run_stage,
)
from qprobe.train.trainers import SFTStageTrainer


@dataclass
class Stage2Config(StageArgs, SFTConfig):
    """trl's SFTConfig, the shared stage knobs (:class:`~qprobe.train.common.StageArgs`) and the held-out check."""

    model: str = field(default="models/stage1", metadata={
        "group": "model", "help": "model to start from: stage 1's output"})
    dataset: str = field(default="data/trajectories/sft", metadata={
        "group": "data", "help": "Probe-CoT set (messages, images) from `qprobe trajectories`"})
    out: str = field(default="models/stage2", metadata={"group": "data", "help": "folder of the final model"})
    metrics: str = field(default="metrics/stage2.json", metadata={
        "group": "data", "help": "JSON file of the final metrics"})
    output_dir: str = field(default="models/checkpoints/stage2", metadata={
        "group": "schedule", "help": "checkpoints, one subfolder per configuration (not a DVC output)"})
    assistant_only_loss: bool = field(default=True, metadata={
        "group": "data",
        "help": "loss on the assistant turns only (the chat template's generation blocks); must stay true"})
    kind_repeats: dict[str, int] = field(default_factory=lambda: {"low": 1, "high": 1}, metadata={
        "group": "data",
        "help": "times each sample of a kind (low: one-turn low-resolution, high: multi-turn with crops) is "
                "seen per epoch; 0 leaves the kind out. 1 and 1 keep the data's mix (2:1, the paper's)"})
    heldout_bench: str = field(default="data/bench", metadata={
        "group": "data",
        "help": "bench whose heldout_split, scenes no training set holds, checks the trained model"})
    heldout_split: str = field(default="val", metadata={
        "group": "data", "help": "the bench split held out from training"})
    heldout_samples: int = field(default=12, metadata={"group": "data", "help": "held-out photos to roll out"})
    heldout_max_new_tokens: int = field(default=640, metadata={
        "group": "data", "help": "token budget of one held-out rollout, all turns together"})

    METADATA: ClassVar[dict[str, dict[str, str]]] = {**StageArgs.METADATA, "max_length": {"group": "data"}}
    UNTRAINED_KEYS: ClassVar[frozenset[str]] = StageArgs.UNTRAINED_KEYS | {
        "heldout_bench", "heldout_split", "heldout_samples", "heldout_max_new_tokens"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.assistant_only_loss:
            raise ValueError("stage 2 learns the assistant turns only: assistant_only_loss must stay true")
        if self.heldout_samples < 1:
            raise ValueError("heldout_samples must be at least 1")
        if not self.heldout_bench:
            raise ValueError("heldout_bench must name a bench: its held-out split checks the trained model")
        if set(self.kind_repeats) != {"low", "high"} or min(self.kind_repeats.values()) < 0 \
                or not any(self.kind_repeats.values()):
            raise ValueError(f"kind_repeats must give low and high a count >= 0, not both 0: {self.kind_repeats}")


def repeat_kinds(dataset: Any, repeats: Mapping[str, int]) -> Any:
    """``dataset`` with the rows of each ``kind`` repeated ``repeats[kind]`` times (0: left out)."""
    if all(n == 1 for n in repeats.values()):
        return dataset
    from datasets import concatenate_datasets

    parts = [dataset.filter(lambda k, kind=kind: k == kind, input_columns="kind") for kind, n in repeats.items()
             for _ in range(n)]
    if sum(len(p) for p in parts) == 0:
        raise QProbeError(f"kind_repeats {dict(repeats)} leaves no training sample")
    return concatenate_datasets(parts)


def new_scenes(bench: str, split: str, n: int) -> list[tuple[str, Any]]:
    """Up to ``n`` photos (id, image) of the bench's ``split``: scenes no training set holds."""
    from qprobe.data.manifest import image_path, read_manifest
    from qprobe.io import load_image

    manifest = read_manifest(bench)
    rows = manifest[manifest["split"] == split].head(n)
    if rows.empty:
        raise QProbeError(f"{bench}: no photos in split {split!r} to check the model on")
    return [(row.id, load_image(image_path(manifest.attrs["path"], row.image))) for row in rows.itertuples()]


def rollout_metrics(backend: Any, photos: list[tuple[str, Any]], cfg: Stage2Config) -> dict[str, float]:
    """Greedy rollouts of ``photos`` through the real crop tool, prompted exactly as inference prompts them.

    ``format_adherence``: the share whose first turn, the model's answer to the prompt, passes the
    protocol's strict check. ``tool_call_rate``: the share whose first turn calls the crop tool with a
    box the tool accepts. ``rollout_adherence``: the share whose whole rollout is well-formed, every turn
    strict, crop calls first and an answer last (what the format reward pays for in stage 3).
    ``answer_first_rate``: the share whose first turn answers (an ``<answer>``, no tool call), well-formed
    or not: the decision to judge from the global view alone.
    """
    from qprobe.agent.protocol import format_ok
    from qprobe.agent.rollout import RolloutConfig, rollout
    from qprobe.rewards import well_formed

    config = RolloutConfig.under(cfg.protocol, max_new_tokens=cfg.heldout_max_new_tokens, seed=cfg.seed)
    first_ok = called = answered = whole_ok = 0
    for photo_id, image in photos:
        trace = rollout(backend, image, config, source=photo_id)
        first = trace.turns[0].text if trace.turns else ""
        first_ok += format_ok(first)
        answered += "<answer>" in first and "<tool_call>" not in first
        # A crop record exists only if the first turn was a crop call: later turns follow only a crop.
        calls = trace.tool.calls if trace.tool is not None else []
        called += bool(calls) and calls[0].error is None
        whole_ok += well_formed(trace.messages)
    n = len(photos)
    return {"format_adherence": first_ok / n, "tool_call_rate": called / n, "rollout_adherence": whole_ok / n,
            "answer_first_rate": answered / n, "heldout_samples": float(n)}


def heldout_metrics(model_dir: Path, cfg: Stage2Config) -> dict[str, float]:
    """:func:`rollout_metrics` on the bench's held-out split, scenes no training set holds: the photos
    at full resolution, where the model should crop, and (suffix ``_low_res``) downscaled to the
    low-resolution budget, which the prompt says is native resolution and the model should answer at once."""
    from qprobe.agent.backends import TransformersBackend
    from qprobe.agent.crop import global_view

    backend = TransformersBackend(str(model_dir))
    photos = new_scenes(cfg.heldout_bench, cfg.heldout_split, cfg.heldout_samples)
    small = [(photo_id, global_view(image, cfg.protocol.low_res_max_pixels)[0]) for photo_id, image in photos]
    low_res = rollout_metrics(backend, small, cfg)
    return {**rollout_metrics(backend, photos, cfg),
            **{f"{k}_low_res": low_res[k] for k in ("format_adherence", "answer_first_rate")}}


def main(argv: Sequence[str] | None = None) -> int:
    """Stage 2: supervised fine-tuning on hybrid-resolution tool-use trajectories (Probe-CoT).

    Algorithm. Plain next-token cross-entropy on Probe-CoT conversations, counted on the assistant turns
    only (the package chat template marks them with ``{% generation %}``; trl's
    ``assistant_only_loss``), so the model learns what it writes and never what it is shown. The set
    mixes low- and high-resolution samples 2:1: a low-resolution photo is answered from its global view
    in one turn; a high-resolution one is a multi-turn trajectory (global impression, a crop call, the
    crop at native resolution in a tool turn, local scrutiny checked against the global context, ...,
    the answer with score and defect boxes), so the model learns *when* cropping pays off as well as
    how. Global views and crops keep the separate pixel budgets the trajectories stage gave them: the
    processor takes them as they are.

    Afterwards, greedy rollouts of the saved model, prompted exactly like inference, on the bench's
    ``val`` split (scenes no training set holds) measure ``format_adherence`` and ``tool_call_rate`` of
    its first turn and ``rollout_adherence`` of whole rollouts; the same photos downscaled to the
    low-resolution budget measure ``answer_first_rate_low_res``, answers given without a crop, and
    ``format_adherence_low_res`` (:func:`heldout_metrics`).

    Starts from stage 1's output and writes the trained model to ``out``. Run it::

        qprobe train stage2                                  # params.yaml `stage2:`
        qprobe train stage2 --max-steps 50 --learning-rate 2.0e-3
        accelerate launch --config_file infra/accelerate/zero3.yaml -m qprobe.cli train stage2
    """
    cfg = parse_config(Stage2Config, "stage2", argv, prog="qprobe train stage2", description=main.__doc__)
    dataset = load_dataset_dir(cfg.dataset, ["id", "messages", "kind"], cfg.protocol)
    check_pixel_budgets(dataset, cfg.view_max_pixels, cfg.protocol.crop_max_pixels)
    dataset = repeat_kinds(dataset, cfg.kind_repeats)

    def make_trainer(model_path: Path, processor: Any) -> SFTStageTrainer:
        # Every image sits in its turn's block (crops in tool turns): trl's own collator takes them from there.
        return SFTStageTrainer(model=str(model_path), args=cfg, train_dataset=dataset, processing_class=processor,
                          peft_config=lora_config(cfg))

    metrics = run_stage("stage2", cfg, make_trainer, evaluate=lambda out: heldout_metrics(out, cfg),
                        eval_inputs={"heldout_bench": cfg.heldout_bench})
    if cfg.is_main:
        print(f"stage2: {int(metrics['global_step'])} steps in {metrics['seconds']:.0f} s; held-out scenes: "
              f"format adherence {metrics['format_adherence']:.0%}, tool-call rate {metrics['tool_call_rate']:.0%}, "
              f"whole rollouts {metrics['rollout_adherence']:.0%}; downscaled, answered at once "
              f"{metrics['answer_first_rate_low_res']:.0%} -> {cfg.out}")
    return 0
