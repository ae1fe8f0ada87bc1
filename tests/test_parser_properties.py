"""Model output never crashes a run: the parser and every reward over arbitrary text and near-misses.

Near-misses start from a valid answer or crop call and break one thing the way a model (or a
runaway generation) does: numbers of 400 digits, 1e308 or NaN, unicode digits, nested or unclosed
tags, thousands of boxes, boxes outside the global view.
"""

from __future__ import annotations

import json
import math

from hypothesis import example, given, settings
from hypothesis import strategies as st

from qprobe.agent import protocol
from qprobe.agent.protocol import Answer, FailureKind, ParseFailure, ToolCall
from qprobe.defects import names
from qprobe.rewards import REWARDS

VIEW = (56, 42)  # the global view of a 640x480 photo at 3136 pixels
PROMPT = [protocol.system_message(),
          {"role": "user", "content": [{"type": "text", "text": protocol.user_prompt(VIEW, (640, 480), 3)}]}]
GLOBAL_MAX_PIXELS = 3136

HUGE_NUMBERS = ["9" * 400, "-" + "9" * 400, "1e308", "-1e308", "1e309", "NaN", "Infinity", "-Infinity", "0.0",
                "\u0663", '"\u0663.5"', "1" + "0" * 4400]
coordinate = st.one_of(st.integers(-100, 100).map(str), st.sampled_from(HUGE_NUMBERS))
score = st.one_of(st.floats(0, 6, allow_nan=False).map(lambda v: f"{v:.2f}"), st.sampled_from(HUGE_NUMBERS))


@st.composite
def near_miss(draw: st.DrawFn) -> str:
    """A valid-looking turn with corrupted numbers, many boxes, and tags added, nested or left open."""
    def box() -> str:
        return "[" + ", ".join(draw(coordinate) for _ in range(4)) + "]"

    if draw(st.booleans()):
        count = draw(st.sampled_from([0, 1, 3, protocol.MAX_DEFECTS, protocol.MAX_DEFECTS + 1, 10_000]))
        one = f'{{"bbox_2d": {box()}, "type": "{draw(st.sampled_from([*names(), "fog", ""]))}"}}'
        action = f'<answer>{{"score": {draw(score)}, "defects": [{", ".join([one] * count)}]}}</answer>'
    else:
        action = f'<tool_call>{{"name": "crop", "arguments": {{"bbox_2d": {box()}}}}}</tool_call>'
    text = f"<think>{draw(st.text(max_size=40))}</think>\n{action}"
    tags = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "<|im_end|>", "["]
    for _ in range(draw(st.integers(0, 3))):  # insert a tag, or a run of it (deep nesting), anywhere
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(tags)) * draw(st.sampled_from([1, 2, 500])) + text[at:]
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]  # a truncated generation
    return text


turns = st.one_of(st.text(), near_miss())


def _assert_typed(parsed: object) -> None:
    assert isinstance(parsed, ToolCall | Answer | ParseFailure)
    if isinstance(parsed, ParseFailure):
        assert isinstance(parsed.kind, FailureKind) and parsed.detail and "\n" not in parsed.detail
    if isinstance(parsed, Answer):
        assert protocol.SCORE_MIN <= parsed.score <= protocol.SCORE_MAX
        assert len(parsed.defects) <= protocol.MAX_DEFECTS
        assert all(math.isfinite(v) for d in parsed.defects for v in d.bbox)
    if isinstance(parsed, ToolCall):
        assert all(math.isfinite(v) for v in parsed.bbox)


@settings(max_examples=150, deadline=None)
@given(turns)
@example('<think>x</think><answer>{"score": ' + "9" * 400 + ', "defects": []}</answer>')
@example("<think>" + "a " * 50_000 + "</think> <answer>{}</answer>")
def test_parser_and_format_check_never_raise(text: str) -> None:
    _assert_typed(protocol.parse_assistant(text))
    for view in (None, VIEW):
        failure = protocol.format_failure(text, view)
        assert failure is None or isinstance(failure.kind, FailureKind)
        assert isinstance(protocol.format_ok(text, view), bool)


@settings(max_examples=100, deadline=None)
@given(st.tuples(*[st.integers(-10, 70)] * 4))
def test_a_box_outside_the_stated_view_fails_the_format_check(box: tuple[int, ...]) -> None:
    text = protocol.render_turn("look", protocol.render_answer(3.0, [protocol.Defect(box, "blur")]))
    x1, y1, x2, y2 = box
    inside = 0 <= x1 < x2 <= VIEW[0] and 0 <= y1 < y2 <= VIEW[1]
    assert protocol.format_ok(text) == (0 <= x1 < x2 and 0 <= y1 < y2)  # no view stated: any size
    failure = protocol.format_failure(text, VIEW)
    assert (failure is None) == inside
    if not inside:
        assert failure.kind is FailureKind.BAD_BOX
    assert REWARDS["format"]([PROMPT], [text]) == [1.0 if inside else 0.0]


def test_the_view_size_is_read_from_the_prompt() -> None:
    assert protocol.view_size_of(PROMPT) == VIEW
    assert protocol.view_size_of(protocol.user_prompt((224, 168), (230, 170), 3)) == (224, 168)  # native wording
    assert protocol.view_size_of([{"role": "user", "content": "rate it"}]) is None
    assert protocol.view_size_of(None) is None


completion = st.one_of(
    turns,
    st.lists(st.one_of(
        st.builds(lambda t: {"role": "assistant", "content": t}, turns),
        st.builds(lambda t: {"role": "assistant", "content": [{"type": "text", "text": t}]}, turns),
        st.just({"role": "assistant", "content": [{"type": "text", "text": 7}], "tool_calls": "x"}),
        st.just({"role": "assistant", "reasoning_content": "r", "tool_calls": [{"function": [1]}, 3]}),
        st.just({"role": "assistant", "tool_calls": [{"function": {"name": "crop", "arguments": {1, 2}}}]}),
        st.just({"role": "tool", "content": None}),
        st.none(),
    ), max_size=4),
    st.none(), st.integers(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(completion, min_size=2, max_size=6).filter(lambda c: len(c) % 2 == 0))
@example([
    '<think>x</think><answer>{"score": 3, "defects": [{"bbox_2d": [-1e308, -1e308, 1e308, 1e308], '
    '"type": "blur"}]}</answer>',
    '<think>x</think><answer>{"score": ' + "9" * 400 + ', "defects": []}</answer>',
])
def test_every_reward_returns_finite_floats_one_per_completion(completions: list) -> None:
    n = len(completions)
    columns = {
        "id": [f"img{i // 2}" for i in range(n)],  # whole groups of two, as trl lays them out
        "mos": [1.0 + (i * 0.7) % 4 for i in range(n)], "mos_std": [0.5] * n,
        "has_defect": [i % 3 != 0 for i in range(n)],
        "defects": [[{"bbox": [10, 20, 200, 220]}, {"bbox": [300, 100, 400, 300]}]] * n,
        "width": [640] * n, "height": [480] * n,
    }
    options = {"num_generations": 2, "global_max_pixels": GLOBAL_MAX_PIXELS}
    for name, fn in REWARDS.items():
        values = fn([PROMPT] * n, completions, **columns, **options)
        assert len(values) == n, name
        assert all(isinstance(v, float) and math.isfinite(v) for v in values), (name, values)


def test_ten_thousand_boxes_are_a_format_failure_and_score_nothing() -> None:
    defect = {"bbox_2d": [1, 2, 30, 40], "type": "blur"}
    text = f'<think>x</think><answer>{json.dumps({"score": 3, "defects": [defect] * 10_000})}</answer>'
    parsed = protocol.parse_assistant(text)
    assert isinstance(parsed, ParseFailure) and parsed.kind is FailureKind.BAD_DEFECT
    assert REWARDS["localization"]([PROMPT], [text], has_defect=[True], defects=[[{"bbox": [0, 0, 10, 10]}]],
                                   width=[640], height=[480], global_max_pixels=GLOBAL_MAX_PIXELS) == [0.0]
