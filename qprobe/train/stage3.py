"""Stage 3: GRPO with multi-turn crop-tool rollouts and a decoupled reward (``qprobe train stage3``).

The heart of Q-Probe: the stage-2 model already follows the protocol; here it learns, from its own
rollouts on the original high-resolution photos, *where to look* (its crops and defect boxes are
rewarded by localisation) apart from *how to score* (its score is rewarded by accuracy), see :func:`main`.

One module on purpose (over 400 lines): the config, the reward wiring, the rollout report and ``main``
are one algorithm, each part read against the others; split, none would stand alone.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from trl import GRPOConfig
from trl.trainer.utils import get_callable_name

from qprobe.agent import protocol
from qprobe.agent.crop import CropTool, Geometry
from qprobe.config import parse_config
from qprobe.errors import QProbeError
from qprobe.rewards import MIN_REWARD, RewardFn, build_rewards, final_answer, required_columns
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

# R's components, by registry name (qprobe.rewards). Each scores one rollout on its own: stage 1's ranking
# rewards, which compare the images of a batch, have no place here.
COMPONENTS = ("accuracy", "localization", "format")
REWARD_MODES = ("decoupled", "joint")


@dataclass
class Stage3Config(StageArgs, GRPOConfig):
    """trl's GRPOConfig, the shared stage knobs (:class:`~qprobe.train.common.StageArgs`), R and the crop tool."""

    model: str = field(default="models/stage2", metadata={
        "group": "model", "help": "model to start from: stage 2's output, which already calls the crop tool"})
    dataset: str = field(default="data/trajectories/rl", metadata={
        "group": "data",
        "help": "Probe-RL set (prompt, images, original, mos, has_defect, defects, width, height) from "
                "`qprobe trajectories`; `original` is the high-resolution photo the crop tool cuts"})
    out: str = field(default="models/stage3", metadata={"group": "data", "help": "folder of the final model"})
    metrics: str = field(default="metrics/stage3.json", metadata={
        "group": "data", "help": "JSON file of the final metrics"})
    output_dir: str = field(default="models/checkpoints/stage3", metadata={
        "group": "schedule", "help": "checkpoints, one subfolder per configuration (not a DVC output)"})
    rewards: dict[str, float] = field(
        default_factory=lambda: {"accuracy": 1.0, "localization": 0.5, "format": 0.5}, metadata={
            "group": "reward",
            "help": "R's components and their weights, the paper's alpha, beta, gamma: {accuracy: alpha, "
                    "localization: beta, format: gamma} (format required: failed tool calls cost it); leave one "
                    "out for an ablation. Decoupled mode only. Not trl's --beta, the KL coefficient"})
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "group": "reward", "help": "reward name -> its keyword options (e.g. {accuracy: {tau: 0.5}})"})
    reward_mode: str = field(default="decoupled", metadata={
        "group": "reward",
        "help": "decoupled: R = alpha R_acc + beta R_loc + gamma R_format, each component a reward function of "
                "its own for trl (logged apart, normalised apart under multi_objective_aggregation: "
                "normalize_then_sum); joint: one coupled reward R = R_acc (1 + R_loc) R_format, weights unused"})
    torch_threads: int | None = field(default=None, metadata={
        "group": "model",
        "help": "CPU threads of torch (torch.set_num_threads); null: torch's default, every core. Token-by-token "
                "generation of a small model runs many times faster on 1 thread than on 2 contended ones"})
    sample_rollouts: int = field(default=4, metadata={
        "group": "schedule",
        "help": "rollouts of each step logged whole (every turn's text, the crops, the rewards) as the MLflow "
                "artifact rollouts/step-N.jsonl; 0: none"})

    METADATA: ClassVar[dict[str, dict[str, str]]] = {**StageArgs.METADATA, **GRPO_METADATA}
    UNTRAINED_KEYS: ClassVar[frozenset[str]] = StageArgs.UNTRAINED_KEYS | {"sample_rollouts", "torch_threads"}

    def __post_init__(self) -> None:
        # Both are derived (below); a value equal to the derived one is a config rebuilt from its own fields.
        weights = list(self.rewards.values()) if self.reward_mode == "decoupled" else [1.0]
        if self.reward_weights not in (None, weights):
            raise ValueError("set the weights in `rewards: {name: weight}`, not reward_weights")
        # protocol.max_crops calls, and one more that gets the tool's refusal (as at inference).
        max_crops = self.protocol.max_crops
        if max_crops < 1:
            raise ValueError("max_crops must be at least 1: stage 3 trains the crop tool's use")
        turns = protocol.tool_turn_limit(max_crops)
        if self.max_tool_calling_iterations not in (None, turns):
            raise ValueError(f"set max_crops, not max_tool_calling_iterations: it follows from max_crops ({turns})")
        self.max_tool_calling_iterations = turns
        super().__post_init__()
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {', '.join(REWARD_MODES)}, not {self.reward_mode!r}")
        unknown = sorted(set(self.rewards) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"rewards: stage 3 takes {', '.join(COMPONENTS)}, not {unknown[0]!r}")
        needed = COMPONENTS if self.reward_mode == "joint" else ("format",)
        missing = [name for name in needed if name not in self.rewards]
        if missing:
            raise ValueError(f"rewards: reward_mode {self.reward_mode} needs {missing[0]!r}")
        if self.log_completions:
            raise ValueError("log_completions: trl's completion table crashes on the crop images in tool turns; "
                             "sample_rollouts logs whole rollouts instead")
        if self.use_vllm and self.vllm_mode != "server":
            raise ValueError("use_vllm: run vLLM as a server in its own environment (vllm_mode: server); it "
                             "cannot share this one (docs/training.md)")
        if self.sample_rollouts < 0:
            raise ValueError("sample_rollouts must be 0 or more")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("torch_threads must be at least 1 (or null: torch's default)")
        build_rewards(self.rewards, self.reward_options, self.reward_context())  # unknown options fail here
        self.reward_weights = weights

    def reward_context(self) -> dict[str, Any]:
        """What the stage knows that rewards may take as options."""
        return {"num_generations": self.num_generations, "global_max_pixels": self.view_max_pixels}


# ---------------------------------------------------------------------------------------------------
# Reading a rollout


@dataclass(frozen=True)
class RolloutFacts:
    """What one rollout did with the crop tool: read from its completion, its tokens and its environment."""

    tool_calls: int
    tool_failures: int  # tool turns that brought no crop: an uncuttable box, the budget spent, a malformed call
    crop_areas: tuple[float, ...]  # each crop's share of the photo's pixels
    truncated: bool  # stopped before it answered: out of tokens, or out of tool turns

    @classmethod
    def read(cls, completion: Sequence[Mapping[str, Any]], environment: CropTool | None,
             completion_ids: Sequence[int], stop_ids: frozenset[int]) -> RolloutFacts:
        tool_turns = [m for m in completion if m.get("role") == "tool"]
        areas: tuple[float, ...] = ()
        if environment is not None and environment.geometry is not None:
            width, height = environment.geometry.original
            areas = tuple((x2 - x1) * (y2 - y1) / (width * height)
                          for x1, y1, x2, y2 in (c.original_box for c in environment.calls if c.original_box))
        last = completion[-1] if completion else {}
        # trl drops a tool result that would overflow max_completion_length and stops after
        # max_tool_calling_iterations; either way the rollout ends on a call it never saw answered.
        out_of_turns = last.get("role") != "assistant" or bool(last.get("tool_calls"))
        out_of_tokens = not completion_ids or completion_ids[-1] not in stop_ids
        return cls(tool_calls=len(tool_turns), tool_failures=sum(not returned_crop(m) for m in tool_turns),
                   crop_areas=areas, truncated=out_of_turns or out_of_tokens)


@dataclass
class RolloutCounts:
    """Sums of :class:`RolloutFacts` over rollouts, and the rates the stage reports."""

    rollouts: int = 0
    tool_calls: int = 0
    tool_failures: int = 0
    truncated: int = 0
    crops: int = 0
    crop_area: float = 0.0

    def add(self, facts: Sequence[RolloutFacts]) -> RolloutCounts:
        for f in facts:
            self.rollouts += 1
            self.tool_calls += f.tool_calls
            self.tool_failures += f.tool_failures
            self.truncated += f.truncated
            self.crops += len(f.crop_areas)
            self.crop_area += sum(f.crop_areas)
        return self

    def rates(self) -> dict[str, float]:
        rates = {"tool_calls_per_rollout": self.tool_calls / self.rollouts,
                 "tool_failure_rate": self.tool_failures / self.tool_calls if self.tool_calls else 0.0,
                 "truncation_rate": self.truncated / self.rollouts}
        if self.crops:  # no crop, no area: better no value than a 0 that reads as "tiny crops"
            rates["crop_area"] = self.crop_area / self.crops
        return rates


def group_signal(rewards: Sequence[float], num_generations: int) -> bool:
    """Whether some group of ``num_generations`` consecutive rollouts (one prompt's) has rewards that differ:
    only then does GRPO's group-normalised advantage, and so its gradient, differ from 0."""
    groups = [rewards[i:i + num_generations] for i in range(0, len(rewards), num_generations)]
    return any(max(g) - min(g) > 1e-6 for g in groups)


def quarter_means(values: Sequence[float]) -> tuple[float, float]:
    """The mean of the first and of the last quarter of ``values`` (at least one value each)."""
    n = max(1, len(values) // 4)
    return sum(values[:n]) / n, sum(values[-n:]) / n


def returned_crop(message: Mapping[str, Any]) -> bool:
    """Whether a tool turn holds a crop. Failures hold text only: the crop tool's ``error: ...`` line, or
    trl's ``{'error': ...}`` for a call it could not make (an unknown tool, wrong argument names)."""
    content = message.get("content")
    return isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "image" for b in content)


# ---------------------------------------------------------------------------------------------------
# The reward


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], *, strict: RewardFn,
                  report: RolloutReport | None = None, **kwargs: Any) -> list[float]:
    """R_format of a multi-turn rollout: ``strict`` (the registry's protocol check of every assistant turn),
    and 0 if any tool call brought no crop back, so a bad box costs what a malformed turn costs.

    The facts this reads are also what the stage reports about its rollouts: with a ``report``, it records
    this batch (R_format is in every stage-3 reward, decoupled or joint, so every batch is recorded once).
    """
    checked = strict(prompts, completions, **kwargs)
    rewards = [value if all(returned_crop(m) for m in completion if m.get("role") == "tool") else MIN_REWARD
               for value, completion in zip(checked, completions, strict=True)]
    if report is not None:
        report.record(prompts, completions, rewards, **kwargs)
    return rewards


def joint_reward(prompts: Sequence[Any], completions: Sequence[Any], *, components: Mapping[str, RewardFn],
                 log_metric: Any = None, **kwargs: Any) -> list[float]:
    """The coupled ablation: R = R_acc (1 + R_loc) R_format, one reward for trl.

    Localisation pays only as a bonus on an accurate score, and nothing pays without the format: the model
    cannot tell which part of its behaviour earned the reward. The components are still logged, under the
    names decoupled mode logs them with (``rewards/accuracy/mean``, ...), so the two modes compare.
    """
    values = {name: fn(prompts, completions, log_metric=log_metric, **kwargs) for name, fn in components.items()}
    if log_metric is not None:
        for name, fn in components.items():
            log_metric(f"rewards/{get_callable_name(fn)}/mean", sum(values[name]) / len(completions))
    return [coupled(*row) for row in zip(values["accuracy"], values["localization"], values["format"], strict=True)]


def coupled(accuracy: float, localization: float, format_ok: float) -> float:
    """The joint mode's R of one rollout."""
    return accuracy * (1.0 + localization) * format_ok


def reward_functions(cfg: Stage3Config, report: RolloutReport | None = None) -> list[RewardFn]:
    """trl's reward functions for ``cfg`` (``cfg.reward_weights`` are their weights)."""
    funcs, _ = build_rewards(cfg.rewards, cfg.reward_options, cfg.reward_context())
    components = dict(zip(cfg.rewards, funcs, strict=True))
    components["format"] = functools.partial(format_reward, strict=components["format"], report=report)
    if cfg.reward_mode == "joint":
        return [functools.partial(joint_reward, components=components)]
    return list(components.values())


# ---------------------------------------------------------------------------------------------------
# What the rollouts did


@dataclass
class StepRewards:
    """One training step's rollouts: their R_format and crop calls, and whether some group's R differed."""

    format_sum: float = 0.0
    tool_calls: int = 0
    rollouts: int = 0
    signal: bool = False

    def add(self, format_rewards: Sequence[float], tool_calls: int, signal: bool) -> None:
        self.format_sum += sum(format_rewards)
        self.tool_calls += tool_calls
        self.rollouts += len(format_rewards)
        self.signal |= signal

    @property
    def format_mean(self) -> float:
        return self.format_sum / self.rollouts

    @property
    def tool_calls_mean(self) -> float:
        return self.tool_calls / self.rollouts


class RolloutReport:
    """The rollouts of each batch, reported: statistics as trl step metrics, and a few whole rollouts.

    Step metrics (through trl's ``log_metric``, averaged over processes and logging steps):
    ``rollouts/tool_calls`` (per rollout), ``rollouts/tool_failure_rate`` (calls that brought no crop / calls),
    ``rollouts/crop_area`` (a crop's share of the photo's pixels, mean over crops) and
    ``rollouts/truncation_rate`` (rollouts stopped before their answer). trl logs the rest itself: each reward
    function's mean, ``completions/mean_length`` (model tokens only), ``completions/clipped_ratio``.
    :meth:`summary` gives the same figures over the whole run: the stage's final metrics.

    Learning signal, per step: ``rollouts/signal`` is 1 when some group's total rewards R differ (GRPO has a
    gradient; trl's ``frac_reward_zero_std`` cannot say it under ``normalize_then_sum``, whose std is the
    batch's). The summary adds ``signal_steps`` (the fraction of steps with a signal) and the mean R_format
    of the first and the last quarter of the steps (``format_first_quarter``, ``format_last_quarter``):
    whether the rollouts became well-formed over the run; and their crop calls per rollout
    (``tool_calls_first_quarter``, ``tool_calls_last_quarter``): whether they did so by still looking
    closer, or by answering at once (no R_* term pays for a crop as such).

    Samples: the first ``per_step`` rollouts of the main process's first batch of a step go to the MLflow
    artifact ``rollouts/step-N.jsonl``: every turn's text (a crop as its size), the crop records, the components
    and R. trl's own completion table cannot hold the crop images (``log_completions`` stays off).
    """

    def __init__(self, cfg: Stage3Config, stop_ids: Sequence[int]) -> None:
        funcs, _ = build_rewards(cfg.rewards, cfg.reward_options, cfg.reward_context())
        # R_format comes with the batch (the report is called from it); the others are scored again, which
        # costs next to nothing beside generation.
        self.scorers = {name: fn for name, fn in zip(cfg.rewards, funcs, strict=True) if name != "format"}
        self.weights = dict(cfg.rewards)
        self.joint = cfg.reward_mode == "joint"
        self.num_generations = cfg.num_generations
        self.per_step = cfg.sample_rollouts if cfg.is_main else 0
        self.stop_ids = frozenset(stop_ids)
        self._sampled_step = -1
        self.totals = RolloutCounts()  # every rollout this process made
        self.steps: dict[int, StepRewards] = {}  # this process's rollouts' rewards, by training step

    def record(self, prompts: Sequence[Any], completions: Sequence[Any], format_rewards: Sequence[float], *,
               completion_ids: Sequence[Sequence[int]], environments: Sequence[CropTool] | None = None,
               log_metric: Any = None, trainer_state: Any = None, **columns: Any) -> None:
        envs: Sequence[CropTool | None] = environments or [None] * len(completions)
        facts = [RolloutFacts.read(c, e, ids, self.stop_ids)
                 for c, e, ids in zip(completions, envs, completion_ids, strict=True)]
        self.totals.add(facts)
        if log_metric is not None:
            for name, value in RolloutCounts().add(facts).rates().items():
                log_metric(f"rollouts/{name}", value)
        values = {name: fn(prompts, completions, **columns) for name, fn in self.scorers.items()}
        values["format"] = list(format_rewards)
        totals = [self.total(dict(zip(values, row, strict=True))) for row in zip(*values.values(), strict=True)]
        step = trainer_state.global_step + 1 if trainer_state is not None else 0
        signal = group_signal(totals, self.num_generations)
        self.steps.setdefault(step, StepRewards()).add(values["format"], sum(f.tool_calls for f in facts), signal)
        if log_metric is not None:
            log_metric("rollouts/signal", float(signal))
        if self.per_step and step != self._sampled_step:
            self._sampled_step = step
            self._log_samples(step, prompts, completions, values, totals, facts, envs, columns)

    def summary(self) -> dict[str, float]:
        """The step metrics over every rollout of this process's run (since it started or resumed), the share
        of steps with a learning signal, and the mean R_format and crop calls of the first and last quarter of
        the steps."""
        if not self.totals.rollouts:
            return {}
        steps = [self.steps[step] for step in sorted(self.steps)]
        first, last = quarter_means([s.format_mean for s in steps])
        calls_first, calls_last = quarter_means([s.tool_calls_mean for s in steps])
        return {"rollouts": float(self.totals.rollouts), **self.totals.rates(),
                "signal_steps": sum(s.signal for s in steps) / len(steps),
                "format_first_quarter": first, "format_last_quarter": last,
                "tool_calls_first_quarter": calls_first, "tool_calls_last_quarter": calls_last}

    def total(self, components: Mapping[str, float]) -> float:
        """R of one rollout from its components, as trl sums it (decoupled) or :func:`joint_reward` has it."""
        if self.joint:
            return coupled(components["accuracy"], components["localization"], components["format"])
        return sum(weight * components[name] for name, weight in self.weights.items())

    def _log_samples(self, step: int, prompts: Sequence[Any], completions: Sequence[Any],
                     values: Mapping[str, Sequence[float]], totals: Sequence[float], facts: Sequence[RolloutFacts],
                     envs: Sequence[CropTool | None], columns: Mapping[str, Any]) -> None:
        import mlflow

        if mlflow.active_run() is None:
            return
        n = min(self.per_step, len(completions))
        lines = []
        for i in range(n):
            components = {name: column[i] for name, column in values.items()}
            answer = final_answer(completions[i])
            lines.append(json.dumps({
                "step": step, "id": _at(columns.get("id"), i), "mos": _at(columns.get("mos"), i),
                "truth": _at(columns.get("defects"), i),
                "score": answer.score if answer else None,
                "turns": [_turn(m) for m in completions[i]],
                "crops": [asdict(c) for c in envs[i].calls] if envs[i] is not None else [],
                "rewards": components, "reward": totals[i],
                **asdict(facts[i]),
            }, default=str))
        mlflow.log_text("\n".join(lines) + "\n", f"rollouts/step-{step:06d}.jsonl")


def _at(column: Sequence[Any] | None, i: int) -> Any:
    return column[i] if column is not None else None


def _turn(message: Mapping[str, Any]) -> dict[str, Any]:
    """One turn of a rollout as JSON: an assistant turn's text as the model wrote it; a tool turn's text
    with its crop as ``[width, height]``."""
    if message.get("role") != "tool":
        return {"role": message.get("role"), "text": protocol.message_text(dict(message))}
    content = message.get("content")
    blocks = content if isinstance(content, list) else [{"type": "text", "text": str(content)}]
    return {"role": "tool",
            "text": "".join(b.get("text") or "" for b in blocks if b.get("type") == "text"),
            "crop": next((list(b["image"].size) for b in blocks if b.get("type") == "image"), None)}


# ---------------------------------------------------------------------------------------------------
# The stage


def check_prompts(dataset: Any, cfg: Stage3Config) -> None:
    """Each prompt states the view size and the crop budget that this stage's crop tool enforces.

    The tool maps boxes with the global budget and refuses calls past ``max_crops``: a set built with other
    budgets would have the model point with one geometry and crop with another.
    """
    limits = cfg.protocol
    for i, row in enumerate(dataset.select_columns(["prompt", "width", "height"])):
        size = (row["width"], row["height"])
        expected = protocol.user_prompt(Geometry.for_size(size, limits.global_max_pixels).view, size, limits.max_crops)
        stated = [b.get("text") for m in row["prompt"] if m["role"] == "user" for b in m["content"]
                  if b.get("type") == "text"]
        if expected not in stated:
            raise QProbeError(f"{cfg.dataset} row {i}: the prompt says {stated!r}, but the crop tool of this stage "
                              f"(global_max_pixels {limits.global_max_pixels}, max_crops {limits.max_crops}) gives "
                              f"{expected!r}; build the trajectories with the same budgets")


def crop_environment(cfg: Stage3Config) -> Callable[[], CropTool]:
    """trl's ``environment_factory``: one crop tool per rollout, with the stage's budgets."""
    return functools.partial(CropTool, global_max_pixels=cfg.protocol.global_max_pixels,
                             crop_max_pixels=cfg.protocol.crop_max_pixels, max_calls=cfg.protocol.max_crops)


def originals_folder(dataset: Any) -> str:
    """The folder holding every original photo the crop tool opens (their common parent)."""
    return os.path.commonpath([str(Path(p).parent) for p in dataset.unique("original")])


def main(argv: Sequence[str] | None = None) -> int:
    """Stage 3: GRPO with multi-turn crop-tool rollouts and a decoupled reward.

    Rollouts. For each Probe-RL prompt (the system prompt, the global view and its size, the crop budget)
    the policy samples K = ``num_generations`` rollouts. A rollout is multi-turn: whenever a turn ends in a
    ``crop`` call, trl runs the stage's crop tool (:class:`~qprobe.agent.crop.CropTool`, the one inference
    uses, one instance per rollout through ``environment_factory``, reset on the row's ``original``) on the
    high-resolution photo, appends the crop as an image in a tool turn, and the policy continues with the
    crop in view, until it answers, runs out of ``max_completion_length`` tokens (tool turns count), or of
    turns (``max_crops`` calls, and one more that the tool refuses). trl's own tool loop carries all of it
    (a tool may return image blocks), so no custom ``rollout_func`` is needed, and vLLM works unchanged.

    Reward, decoupled: R = alpha R_acc + beta R_loc + gamma R_format (``rewards: {accuracy: alpha,
    localization: beta, format: gamma}``), three reward functions trl weighs and logs apart:

    * R_acc = exp(-|score - MOS| / tau): how to score;
    * R_loc = 1[has_defect] x Hungarian-matched IoU of the answer's defect boxes with the true ones, in
      original pixels: where to look, rewarded on its own, so a rollout that finds the defect but misjudges
      the score still learns the finding (and the converse);
    * R_format = 1 if every assistant turn follows the protocol and every crop call brought a crop back
      (a box outside the view or a call past the budget costs it), else 0.

    ``reward_mode: joint`` replaces the sum by one coupled reward R_acc (1 + R_loc) R_format: the ablation.

    Advantages are group-normalised within the K rollouts of a prompt, and the loss is trl's clipped policy
    gradient plus ``beta`` (trl's KL coefficient, not R's beta) x KL to the starting model, over the
    model's own tokens only: trl's ``tool_mask`` zeroes the tool turns (the crops and the lines around
    them), which the model reads but never wrote.

    Starts from stage 2's output and writes the trained model to ``out``; the rollouts' tool use (calls,
    failures, crop area, truncation) is logged every step, with a sample of whole rollouts. Run it::

        qprobe train stage3                                  # params.yaml `stage3:`
        qprobe train stage3 --reward-mode joint --max-steps 4
        accelerate launch --config_file infra/accelerate/zero3.yaml -m qprobe.cli train stage3 \\
            --use-vllm --vllm-mode server                    # beside a `vllm serve` (docs/training.md)
    """
    cfg = parse_config(Stage3Config, "stage3", argv, prog="qprobe train stage3", description=main.__doc__)
    if cfg.torch_threads is not None:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    dataset = load_dataset_dir(cfg.dataset, ["prompt", "images", "original", "width", "height",
                                             *required_columns(cfg.rewards)], cfg.protocol)
    check_pixel_budgets(dataset, cfg.view_max_pixels)
    check_prompts(dataset, cfg)

    reports: list[RolloutReport] = []  # the trainer's, once built

    def make_trainer(model_path: Path, processor: Any) -> GRPOStageTrainer:
        tokenizer = processor.tokenizer
        suppress_vision_tokens(cfg, tokenizer)
        reports.append(RolloutReport(cfg, stop_ids=[tokenizer.eos_token_id, tokenizer.pad_token_id]))
        return GRPOStageTrainer(model=str(model_path), args=cfg, reward_funcs=reward_functions(cfg, reports[-1]),
                           train_dataset=dataset, processing_class=processor, peft_config=lora_config(cfg),
                           environment_factory=crop_environment(cfg))

    metrics = run_stage("stage3", cfg, make_trainer, extra_inputs={"originals": originals_folder(dataset)},
                        evaluate=lambda _: reports[-1].summary())
    if cfg.is_main:
        print(f"stage3: {int(metrics['global_step'])} steps in {metrics['seconds']:.0f} s, reward "
              f"{metrics.get('reward', math.nan):.3f}, {metrics.get('tool_calls_per_rollout', 0.0):.2f} crop "
              f"calls per rollout -> {cfg.out}")
    return 0
