"""Stage 1: GRPO on low-resolution global views with the Thurstone ranking reward (``qprobe train stage1``).

The model learns to *perceive* quality from the global view alone before it learns to probe: for each
image of a batch it samples ``num_generations`` answers (K; 6 at paper scale), each ending in a score,
and is rewarded for scores that rank the images the way their MOS does (see :func:`main`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from trl import GRPOConfig

from qprobe.config import parse_config
from qprobe.rewards import build_rewards, required_columns
from qprobe.train.common import (
    GRPO_METADATA,
    StageArgs,
    check_pixel_budgets,
    load_dataset_dir,
    lora_config,
    run_stage,
    suppress_vision_tokens,
)
from qprobe.train.trainers import GRPOStageTrainer

# Rewards that compare images with each other: each device must see two images or more per batch.
RANKING_REWARDS = frozenset({"thurstone", "thurstone_soft"})


@dataclass
class Stage1Config(StageArgs, GRPOConfig):
    """trl's GRPOConfig, the shared stage knobs (:class:`~qprobe.train.common.StageArgs`) and the rewards."""

    model: str = field(default="models/base", metadata={
        "group": "model",
        "help": "Qwen2.5-VL to start from: the `model` stage's output, another folder, or a Hugging Face id"})
    dataset: str = field(default="data/trajectories/stage1", metadata={
        "group": "data", "help": "stage-1 set (prompt, images, id, mos, mos_std) from `qprobe trajectories`"})
    out: str = field(default="models/stage1", metadata={"group": "data", "help": "folder of the final model"})
    metrics: str = field(default="metrics/stage1.json", metadata={
        "group": "data", "help": "JSON file of the final metrics"})
    output_dir: str = field(default="models/checkpoints/stage1", metadata={
        "group": "schedule", "help": "checkpoints, one subfolder per configuration (not a DVC output)"})
    per_device_train_batch_size: int = field(default=16, metadata={
        "group": "schedule",
        "help": "completions per device and step: whole groups of num_generations, two images or more"})
    rewards: dict[str, float] = field(default_factory=lambda: {"thurstone": 1.0, "format": 1.0}, metadata={
        "group": "reward",
        "help": "reward name -> weight, from the registry in qprobe.rewards; the weighted sum is the reward"})
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "group": "reward", "help": "reward name -> its keyword options (e.g. {accuracy: {tau: 0.5}})"})

    METADATA: ClassVar[dict[str, dict[str, str]]] = {**StageArgs.METADATA, **GRPO_METADATA}

    def __post_init__(self) -> None:
        # A config rebuilt from another's fields carries the weights derived below.
        if self.reward_weights is not None and list(self.reward_weights) != list(self.rewards.values()):
            raise ValueError("set the weights in `rewards: {name: weight}`, not reward_weights")
        super().__post_init__()
        self.reward_weights = list(self.rewards.values())
        build_rewards(self.rewards, self.reward_options, self.reward_context())  # unknown names fail here
        per_device = self.per_device_train_batch_size * self.steps_per_generation
        if per_device % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size * steps_per_generation = {per_device} must be a multiple of "
                f"num_generations = {self.num_generations}: each device must score whole groups")
        if RANKING_REWARDS & set(self.rewards) and per_device // self.num_generations < 2:
            raise ValueError(
                f"the Thurstone reward ranks the images of a device's batch against each other, but each device "
                f"sees {per_device // self.num_generations} image(s) per batch: raise per_device_train_batch_size "
                f"to at least {2 * self.num_generations} (or steps_per_generation)")

    @property
    def view_max_pixels(self) -> int:
        """Stage 1 learns from low-resolution photos, each its own global view: the low-resolution budget."""
        return self.protocol.low_res_max_pixels

    def reward_context(self) -> dict[str, Any]:
        """What the stage knows that rewards may take as options."""
        return {"num_generations": self.num_generations, "global_max_pixels": self.view_max_pixels}


def main(argv: Sequence[str] | None = None) -> int:
    """Stage 1: GRPO with the Thurstone ranking reward on low-resolution global views.

    Algorithm (GRPO, as in VisualQuality-R1, which Q-Probe's stage 1 follows). Each step takes B images
    (the stage-1 set: one global view at the low-resolution budget, with its MOS) and samples K
    completions per image from the policy at ``temperature``. Every completion is scored by the
    weighted sum of the rewards in ``rewards``:

    * ``thurstone``: the answer's score s_ij is compared with every other image z of the device's batch
      through P(i better than z) = Phi((s_ij - mu_z) / sqrt(var_i + var_z)), mu and var being a group's
      sample mean and variance; the reward is the fidelity of that probability to the MOS order
      (``thurstone_soft``: to the soft order of DeQA-Score, from ``mos_std``);
    * ``format``: 1 if the completion follows the protocol strictly (``<think>`` then ``<answer>``).

    A completion's advantage is its reward minus its group's mean, over the group's std. The loss is
    trl's clipped policy gradient on those advantages plus ``beta`` (trl's KL coefficient) x KL to the
    starting model. Each device must hold whole groups, at least two images of them (checked when the
    config is read).

    Starts from ``model`` (``models/base``, the tiny model, in the embedded default; a Qwen2.5-VL-7B
    folder or Hugging Face id at paper scale) and writes the trained model to ``out``. Run it::

        qprobe train stage1                                  # params.yaml `stage1:`
        qprobe train stage1 --max-steps 4 --learning-rate 1.0e-5
        accelerate launch --config_file infra/accelerate/zero3.yaml -m qprobe.cli train stage1
    """
    cfg = parse_config(Stage1Config, "stage1", argv, prog="qprobe train stage1", description=main.__doc__)
    reward_funcs, _ = build_rewards(cfg.rewards, cfg.reward_options, cfg.reward_context())
    dataset = load_dataset_dir(cfg.dataset, ["prompt", "images", *required_columns(cfg.rewards)], cfg.protocol)
    check_pixel_budgets(dataset, cfg.view_max_pixels)

    def make_trainer(model_path: Path, processor: Any) -> GRPOStageTrainer:
        suppress_vision_tokens(cfg, processor.tokenizer)
        return GRPOStageTrainer(model=str(model_path), args=cfg, reward_funcs=reward_funcs, train_dataset=dataset,
                           processing_class=processor, peft_config=lora_config(cfg))

    metrics = run_stage("stage1", cfg, make_trainer)
    if cfg.is_main:
        print(f"stage1: {int(metrics['global_step'])} steps in {metrics['seconds']:.0f} s, reward "
              f"{metrics.get('reward', float('nan')):.3f} -> {cfg.out}")
    return 0
