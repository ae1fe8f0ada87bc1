"""Rewards with trl's signature: hand-computed values, batch-layout errors, and junk that must score 0."""

from __future__ import annotations

import json
import math
import random

import pytest
from trl.trainer.utils import get_callable_name

from qprobe import rewards
from qprobe.errors import QProbeError
from qprobe.rewards import (
    MIN_REWARD,
    REWARDS,
    accuracy,
    build_rewards,
    format_reward,
    localization,
    required_columns,
    thurstone,
    thurstone_soft,
)

EPS_TERM = math.sqrt(1e-8)  # the eps inside each square root of the fidelity


def answer(score: float, defects: list[tuple[list[float], str]] = ()) -> str:
    body = {"score": score, "defects": [{"bbox_2d": box, "type": kind} for box, kind in defects]}
    return f"<think>looks fine</think>\n<answer>{json.dumps(body)}</answer>"


def call(box: list[int]) -> str:
    return f'<think>check it</think>\n<tool_call>{{"name": "crop", "arguments": {{"bbox_2d": {box}}}}}</tool_call>'


def chat(*texts: str) -> list[dict]:
    """A conversational completion: assistant turns with tool turns between them."""
    messages: list[dict] = []
    for i, text in enumerate(texts):
        if i:
            messages.append({"role": "tool", "name": "crop", "content": [{"type": "text", "text": "Region ..."}]})
        messages.append({"role": "assistant", "content": text})
    return messages


JUNK = [
    "",
    "<answer>{",
    "".join(random.Random(0).choice("<>{}[]\"':,/abc 0123456789\n") for _ in range(10_000)),
    None,
    42,
    [{"role": "assistant", "content": None}],
    [{"role": "assistant"}],
    [{"role": "user", "content": answer(3.0)}],
    [None, "text"],
    "<think>x</think>\n<answer>{\"score\": NaN, \"defects\": []}</answer>",
    "<think>x</think>\n<answer>{\"score\": 9, \"defects\": []}</answer>",
]


# --- format -------------------------------------------------------------------------------------------


def test_format_accepts_single_answer_and_trl_parsed_messages() -> None:
    assert format_reward([None] * 3, [
        answer(3.5),
        chat(answer(2.25, [([1, 2, 30, 40], "blur")])),
        # what trl's response parser makes of an answer turn
        [{"role": "assistant", "reasoning_content": "looks fine", "content": '<answer>{"score": 4, "defects": []}</answer>'}],
    ]) == [1.0, 1.0, 1.0]


def test_format_over_multi_turn_completions_with_parsed_tool_calls() -> None:
    parsed_call = {"role": "assistant", "reasoning_content": "check the sky", "content": "",
                   "tool_calls": [{"type": "function", "function": {"name": "crop", "arguments": {"bbox_2d": [0, 0, 56, 56]}}}]}
    tool = {"role": "tool", "name": "crop", "content": [{"type": "image"}, {"type": "text", "text": "Region"}]}
    good = [parsed_call, tool, {"role": "assistant", "content": answer(3.0)}]
    bad_call = {**parsed_call, "tool_calls": [{"type": "function", "function": {"name": "zoom", "arguments": {"bbox_2d": [0, 0, 56, 56]}}}]}
    assert format_reward([None] * 6, [
        good,
        chat(call([0, 0, 56, 56]), call([10, 10, 80, 80]), answer(3.0)),
        [bad_call, tool, {"role": "assistant", "content": answer(3.0)}],  # unknown tool
        chat(call([0, 0, 56, 56])),  # the budget ran out before an answer
        chat(answer(3.0), answer(3.0)),  # an answer before the last turn
        chat(call([56, 0, 0, 56]), answer(3.0)),  # reversed corners
    ]) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_format_is_strict() -> None:
    assert format_reward([None] * 4, [
        '<answer>{"score": 3, "defects": []}</answer>',  # no think
        answer(3.0) + " and more",  # text after the answer
        '<think>x</think>\n<answer>{"score": 3}</answer>',  # defects missing
        answer(3.0, [([1, 2, 30, 40], "smudge")]),  # unknown defect type
    ]) == [0.0] * 4


# --- accuracy -----------------------------------------------------------------------------------------


def test_accuracy_hand_computed() -> None:
    got = accuracy([None] * 3, [answer(3.5), answer(3.0), "nothing"], mos=[3.0, 3.0, 3.0])
    assert got == pytest.approx([math.exp(-0.5), 1.0, 0.0])
    assert accuracy([None], [chat(call([0, 0, 56, 56]), answer(4.0))], mos=[3.0], tau=0.5) == pytest.approx([math.exp(-2)])


# --- thurstone ----------------------------------------------------------------------------------------


def test_thurstone_hand_computed() -> None:
    # Image a (MOS 4) sampled 3 and 5: mu 4, unbiased var 2. Image b (MOS 2) sampled 2 and 2: mu 2, var 0.
    # a,3: p = Phi((3 - 2) / sqrt(2)) = 0.76025, g = 1 -> sqrt(p) + sqrt(eps) = 0.87202
    # a,5: p = Phi(3 / sqrt(2)) = 0.98305 -> 0.99159;  b,2: p = Phi(-2 / sqrt(2)) = 0.07865, g = 0 -> sqrt(1 - p) = 0.95997
    got = thurstone([None] * 4, [answer(3), answer(5), answer(2), answer(2)], id=["a", "a", "b", "b"],
                    mos=[4.0, 4.0, 2.0, 2.0], num_generations=2)
    assert got == pytest.approx([0.872023, 0.991590, 0.959970, 0.959970], abs=1e-5)


def test_thurstone_ties_and_single_sample_groups() -> None:
    # Equal MOS: g = 0.5. a's scores 4 and 4 against b's 2: p = 1, so r = sqrt(0.5) + sqrt(eps).
    tie = thurstone([None] * 4, [answer(4)] * 2 + [answer(2)] * 2, id=["a", "a", "b", "b"], mos=[3.0] * 4,
                    num_generations=2)
    assert tie == pytest.approx([math.sqrt(0.5) + EPS_TERM] * 2 + [math.sqrt(0.5) + EPS_TERM] * 2)
    # Equal scores and MOS: p = 0.5, g = 0.5 -> 2 sqrt(0.25) = 1.
    same = thurstone([None] * 2, [answer(3), answer(3)], id=["a", "b"], mos=[3.0, 3.0], num_generations=1)
    assert same == pytest.approx([1.0, 1.0])
    # K = 1: var 0 everywhere, the right order scores 1 (+ eps), the wrong one ~0.
    k1 = thurstone([None] * 2, [answer(4), answer(2)], id=["a", "b"], mos=[2.0, 4.0], num_generations=1)
    assert k1 == pytest.approx([2 * EPS_TERM, 2 * EPS_TERM], abs=1e-6)


def test_thurstone_soft_uses_mos_std() -> None:
    # g = Phi((4 - 2) / sqrt(1 + 1)) = 0.92135; a's samples beat b's surely (p = 1): r = sqrt(g) + sqrt(eps)
    got = thurstone_soft([None] * 4, [answer(4), answer(4), answer(2), answer(2)], id=["a", "a", "b", "b"],
                         mos=[4.0, 4.0, 2.0, 2.0], mos_std=[1.0] * 4, num_generations=2)
    assert got[:2] == pytest.approx([0.959970, 0.959970], abs=1e-5)
    hard = thurstone([None] * 4, [answer(4), answer(4), answer(2), answer(2)], id=["a", "a", "b", "b"],
                     mos=[4.0, 4.0, 2.0, 2.0], num_generations=2)
    assert hard[0] == pytest.approx(1 + EPS_TERM)


def test_thurstone_failures_score_zero_and_leave_the_statistics() -> None:
    # a's junk sample is out of its group's mean and variance: a = {4}, var 0, p = 1 against b.
    got = thurstone([None] * 4, ["<answer>{", answer(4), answer(2), answer(2)], id=["a", "a", "b", "b"],
                    mos=[4.0, 4.0, 2.0, 2.0], num_generations=2)
    assert got[0] == MIN_REWARD and got[1] == pytest.approx(1 + EPS_TERM)
    # One image in the batch: nobody to rank against.
    assert thurstone([None] * 2, [answer(4), answer(2)], id=["a", "a"], mos=[4.0, 4.0], num_generations=2) == [0.0, 0.0]


def test_thurstone_refuses_split_groups() -> None:
    with pytest.raises(ValueError, match="whole groups"):
        thurstone([None] * 3, [answer(3)] * 3, id=["a", "a", "b"], mos=[3.0] * 3, num_generations=2)
    with pytest.raises(ValueError, match="mix images"):
        thurstone([None] * 4, [answer(3)] * 4, id=["a", "b", "b", "c"], mos=[3.0] * 4, num_generations=2)
    # Without num_generations the groups are runs of equal ids, which must be equal in size.
    with pytest.raises(ValueError, match="unequal size"):
        thurstone([None] * 3, [answer(3)] * 3, id=["a", "a", "b"], mos=[3.0] * 3)


# --- localization -------------------------------------------------------------------------------------


def test_localization_in_original_pixels() -> None:
    # 448x448 photo, 224x224 global view (budget 224*224): view boxes are half the original ones.
    kw = dict(width=[448] * 5, height=[448] * 5, global_max_pixels=224 * 224)
    truth = [{"type": "blur", "severity": 3, "bbox": [20, 20, 120, 120]}]
    got = localization([None] * 5, [
        answer(3, [([10, 10, 60, 60], "blur")]),  # exactly the defect
        answer(3, [([35, 10, 85, 60], "blur")]),  # shifted by half: IoU 5000 / 15000
        answer(3, [([60, 60, 10, 10], "blur")]),  # reversed corners: same box
        answer(3),  # missed it
        "no answer",
    ], has_defect=[True] * 5, defects=[truth] * 5, **kw)
    assert got == pytest.approx([1.0, 1 / 3, 1.0, 0.0, 0.0])


def test_localization_counts_misses_and_needs_a_defect() -> None:
    kw = dict(width=[448] * 2, height=[448] * 2, global_max_pixels=224 * 224)
    two = [{"type": "blur", "severity": 3, "bbox": [20, 20, 120, 120]},
           {"type": "noise", "severity": 2, "bbox": [300, 300, 400, 400]}]
    got = localization([None] * 2, [answer(3, [([10, 10, 60, 60], "blur")])] * 2,
                       has_defect=[True, False], defects=[two, []], **kw)
    assert got == pytest.approx([0.5, 0.0])  # one of two found: 1 / max(1, 2); a clean photo pays nothing


# --- junk and the registry ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_reward_scores_junk_zero(name: str) -> None:
    n = len(JUNK)
    columns = dict(id=[f"img{i}" for i in range(n)], mos=[3.0] * n, mos_std=[0.5] * n, has_defect=[True] * n,
                   defects=[[{"type": "blur", "severity": 3, "bbox": [0, 0, 50, 50]}]] * n, width=[448] * n,
                   height=[448] * n)
    funcs, _ = build_rewards({name: 1.0}, context={"num_generations": 1, "global_max_pixels": 50176})
    assert funcs[0]([None] * n, JUNK, **columns, trainer_state=None, completion_ids=[[]] * n) == [MIN_REWARD] * n


def test_build_rewards_binds_options_and_context() -> None:
    funcs, weights = build_rewards({"thurstone": 1.0, "format": 0.5, "accuracy": 2},
                                   {"accuracy": {"tau": 0.5}}, context={"num_generations": 2, "global_max_pixels": 1})
    assert weights == [1.0, 0.5, 2.0]
    assert [get_callable_name(f) for f in funcs] == ["thurstone", "format_reward", "accuracy"]
    assert funcs[0].keywords == {"num_generations": 2} and funcs[2].keywords == {"tau": 0.5}
    assert funcs[1] is format_reward


@pytest.mark.parametrize(("weights", "options", "message"), [
    ({"thurstone": 1.0, "fidelity": 1.0}, {}, "unknown or unused reward 'fidelity'"),
    ({"accuracy": 1.0}, {"accuracy": {"temperature": 2}}, "unknown option 'temperature'"),
    ({"accuracy": 1.0}, {"format": {}}, "unknown or unused reward 'format'"),
    ({"localization": 1.0}, {}, "needs the option 'global_max_pixels'"),
    ({"format": "high"}, {}, "weight must be a finite number"),
])
def test_build_rewards_errors(weights: dict, options: dict, message: str) -> None:
    with pytest.raises(QProbeError, match=message):
        build_rewards(weights, options)


def test_required_columns() -> None:
    assert required_columns(["thurstone", "format"]) == ["id", "mos"]
    assert required_columns(["thurstone_soft"]) == ["id", "mos", "mos_std"]
    assert required_columns(["localization", "accuracy"]) == ["defects", "has_defect", "height", "mos", "width"]
    assert set(required_columns(REWARDS)) <= rewards.COLUMNS
