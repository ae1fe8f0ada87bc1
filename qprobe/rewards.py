"""Reward functions for GRPO, with trl's signature, and the registry the stages pick them from.

Every reward is a plain function ``fn(prompts, completions, **kwargs) -> list[float]``, one value per
completion, as :class:`trl.GRPOTrainer` calls it. trl passes the dataset's other columns as keyword
arguments (one value per completion: a prompt's row repeated for each of its generations), so a reward
names the columns it needs as keyword-only parameters:

============== ===================================================================== ====================
name           reward                                                                dataset columns
============== ===================================================================== ====================
thurstone      Thurstone fidelity of the score against the other images' (stage 1)   ``id``, ``mos``
thurstone_soft the same against a soft, DeQA-style ground truth from ``mos_std``     ``id``, ``mos``, ``mos_std``
accuracy       ``exp(-|score - MOS| / tau)`` (stage 3's R_acc)                       ``mos``
localization   1[has_defect] x Hungarian-matched IoU in original pixels (R_loc)      ``has_defect``, ``defects``,
                                                                                     ``width``, ``height``
format         1 when every assistant turn passes the protocol's strict check,       none
               boxes inside the view the prompt states
============== ===================================================================== ====================

A completion is trl's: a string, or (conversational prompts) a list of messages, the assistant ones
possibly split by trl's response parser into ``reasoning_content`` / ``content`` / ``tool_calls``
(:func:`qprobe.agent.protocol.message_text` puts them back together), with tool turns in between when
the model used the crop tool. The score and the defect boxes come from the last assistant turn.

No reward raises on model output: an empty, truncated, absurd or unparseable completion (``None``
content included, numbers of 400 digits or 1e308, ten thousand boxes) scores :data:`MIN_REWARD`, 0,
the least any reward here gives; every value is a finite float (tests/test_parser_properties.py). They do raise on a
batch laid out against their contract (see :func:`thurstone`): that is a configuration error.

The stages build their reward list with :func:`build_rewards` from a ``{name: weight}`` mapping and
per-reward options in their params section (``tau`` for accuracy, say); options a stage knows itself
(``num_generations``, ``global_max_pixels``) it passes as ``context``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from qprobe import reward_math
from qprobe.agent import protocol
from qprobe.agent.crop import Geometry
from qprobe.errors import QProbeError

RewardFn = Callable[..., list[float]]

MIN_REWARD = 0.0  # what a malformed completion scores, from every reward
# Keyword-only parameters that trl fills from dataset columns, as opposed to options set in params.
COLUMNS = frozenset({"id", "mos", "mos_std", "has_defect", "defects", "width", "height"})


# ---------------------------------------------------------------------------------------------------
# Reading completions


def assistant_texts(completion: Any) -> list[str]:
    """The raw text of each assistant turn of ``completion`` (a string, a message list, or junk)."""
    if isinstance(completion, str):
        return [completion]
    if not isinstance(completion, list):
        return []
    return [protocol.message_text(m) for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]


def final_answer(completion: Any) -> protocol.Answer | None:
    """The answer of the completion's last assistant turn, or ``None`` if it has none that parses."""
    texts = assistant_texts(completion)
    parsed = protocol.parse_assistant(texts[-1]) if texts else None
    return parsed if isinstance(parsed, protocol.Answer) else None


def well_formed(completion: Any, view_size: tuple[int, int] | None = None) -> bool:
    """Every assistant turn passes the strict check; all but the last are crop calls, the last the answer.

    With ``view_size`` (the global view's, as the prompt states it) every box must also lie inside it.
    """
    texts = assistant_texts(completion)
    if not texts or not all(protocol.format_ok(t, view_size) for t in texts):
        return False
    parsed = [protocol.parse_assistant(t) for t in texts]
    return (all(isinstance(p, protocol.ToolCall) for p in parsed[:-1])
            and isinstance(parsed[-1], protocol.Answer))


# ---------------------------------------------------------------------------------------------------
# The rewards


def thurstone(prompts: Sequence[Any], completions: Sequence[Any], *, id: Sequence[Any],
              mos: Sequence[float], mos_std: Sequence[float | None] | None = None,
              num_generations: int | None = None, soft: bool = False, **kwargs: Any) -> list[float]:
    """Thurstone fidelity of each sampled score against the other images of the batch (VisualQuality-R1).

    See :mod:`qprobe.reward_math` for the formula. The batch must hold *whole groups*: the
    ``num_generations`` completions of one image side by side, as trl lays them out, and no image split
    across devices. trl calls rewards on each device's part of the generation batch, so
    ``per_device_train_batch_size * steps_per_generation`` must be a multiple of ``num_generations``
    (stage 1's config checks it too), and a batch of one image has nobody to rank against (all 0): give
    each device at least two images. Groups are consecutive runs of ``num_generations`` completions whose
    ``id`` must agree; without ``num_generations``, runs of equal ``id``.
    """
    n = len(completions)
    if num_generations is None:
        groups: Sequence[Any] = id
    else:
        if num_generations < 1 or n % num_generations:
            raise ValueError(
                f"thurstone: a batch of {n} completions is not whole groups of num_generations={num_generations}; "
                "make per_device_train_batch_size * steps_per_generation a multiple of num_generations")
        for start in range(0, n, num_generations):
            if len(set(id[start:start + num_generations])) != 1:
                raise ValueError(
                    f"thurstone: completions {start}..{start + num_generations - 1} mix images "
                    f"{sorted(set(map(str, id[start:start + num_generations])))}; each device needs whole groups "
                    "(per_device_train_batch_size * steps_per_generation a multiple of num_generations)")
        groups = [i // num_generations for i in range(n)]
    scores = [a.score if (a := final_answer(c)) else None for c in completions]
    if soft and mos_std is None:
        raise ValueError("thurstone_soft needs the dataset column 'mos_std'")
    return reward_math.thurstone(scores, mos, groups, mos_std=mos_std, soft=soft)


def thurstone_soft(prompts: Sequence[Any], completions: Sequence[Any], *, id: Sequence[Any],
                   mos: Sequence[float], mos_std: Sequence[float | None],
                   num_generations: int | None = None, **kwargs: Any) -> list[float]:
    """:func:`thurstone` against the soft ground truth Phi((MOS_i - MOS_z) / sqrt(std_i^2 + std_z^2)) (DeQA)."""
    return thurstone(prompts, completions, id=id, mos=mos, mos_std=mos_std, num_generations=num_generations,
                     soft=True)


def accuracy(prompts: Sequence[Any], completions: Sequence[Any], *, mos: Sequence[float], tau: float = 1.0,
             **kwargs: Any) -> list[float]:
    """``exp(-|score - MOS| / tau)`` of the final answer's score; 0 without one."""
    return [reward_math.accuracy(a.score if (a := final_answer(c)) else None, m, tau)
            for c, m in zip(completions, mos, strict=True)]


def localization(prompts: Sequence[Any], completions: Sequence[Any], *, has_defect: Sequence[bool],
                 defects: Sequence[Sequence[Mapping[str, Any]]], width: Sequence[int], height: Sequence[int],
                 global_max_pixels: int, **kwargs: Any) -> list[float]:
    """1[has_defect] x Hungarian-matched IoU of the answer's boxes and the true ones, in original pixels.

    The answer's boxes are in global-view pixels; the view is the photo (``width`` x ``height``) resized
    to ``global_max_pixels``, so :class:`~qprobe.agent.crop.Geometry` maps them back exactly, after
    clamping them to the view (a box outside it matches nothing). A clean photo gives 0 whatever the
    answer (the indicator), as does an answer that does not parse.
    """
    rewards = []
    for completion, flagged, truth, w, h in zip(completions, has_defect, defects, width, height, strict=True):
        answer = final_answer(completion)
        if not flagged or answer is None:
            rewards.append(MIN_REWARD)
            continue
        geometry = Geometry.for_size((w, h), global_max_pixels)
        predicted = [geometry.to_original(geometry.clamp(d.bbox)) for d in answer.defects]
        rewards.append(reward_math.matched_iou(predicted, [d["bbox"] for d in truth]))
    return rewards


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1 for a well-formed trajectory (:func:`well_formed`) whose boxes lie in the view its prompt
    states (:func:`~qprobe.agent.protocol.view_size_of`; any view when the prompt states none), else 0."""
    return [1.0 if well_formed(c, protocol.view_size_of(p)) else MIN_REWARD
            for p, c in zip(prompts, completions, strict=True)]


REWARDS: dict[str, RewardFn] = {
    "thurstone": thurstone,
    "thurstone_soft": thurstone_soft,
    "accuracy": accuracy,
    "localization": localization,
    "format": format_reward,
}


def build_rewards(weights: Mapping[str, float], options: Mapping[str, Mapping[str, Any]] | None = None,
                  context: Mapping[str, Any] | None = None) -> tuple[list[RewardFn], list[float]]:
    """The reward functions named in ``weights`` (in order) with their options bound, and their weights.

    ``options[name]`` are keyword options of that reward (an unknown one is an error); ``context`` holds
    what the stage knows (``num_generations``, ``global_max_pixels``), bound to every reward that takes
    it unless ``options`` sets it. Options are bound with :func:`functools.partial`, which trl unwraps to
    log each reward under its function's name (``rewards/format_reward/mean``), as open-r1 does.
    """
    options = dict(options or {})
    unknown = sorted(set(weights) - set(REWARDS)) or sorted(set(options) - set(weights))
    if unknown:
        raise QProbeError(f"rewards: unknown or unused reward {unknown[0]!r} (registry: {', '.join(REWARDS)})")
    funcs, values = [], []
    for name, weight in weights.items():
        if not isinstance(weight, int | float) or isinstance(weight, bool) or not math.isfinite(weight):
            raise QProbeError(f"rewards.{name}: weight must be a finite number, got {weight!r}")
        fn = REWARDS[name]
        params = inspect.signature(fn).parameters
        tunable = {p for p, spec in params.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY and p not in
                   COLUMNS}
        bad = sorted(set(options.get(name, {})) - tunable)
        if bad:
            raise QProbeError(f"reward_options.{name}: unknown option {bad[0]!r} (options: {', '.join(sorted(tunable))})")
        bound = {k: v for k, v in (context or {}).items() if k in tunable}
        bound.update(options.get(name, {}))
        missing = sorted(p for p in tunable if params[p].default is inspect.Parameter.empty and p not in bound)
        if missing:
            raise QProbeError(f"reward {name!r} needs the option {missing[0]!r} (set reward_options.{name}.{missing[0]})")
        funcs.append(functools.partial(fn, **bound) if bound else fn)
        values.append(float(weight))
    return funcs, values


def required_columns(names: Iterable[str]) -> list[str]:
    """The dataset columns the named rewards cannot do without."""
    needed = set()
    for name in names:
        for param, spec in inspect.signature(REWARDS[name]).parameters.items():
            if param in COLUMNS and spec.default is inspect.Parameter.empty:
                needed.add(param)
    return sorted(needed)
