"""The protocol: the parser never raises, rendered turns round-trip, failures are typed, format is strict."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qprobe.agent import protocol
from qprobe.agent.protocol import Answer, Defect, FailureKind, ParseFailure, ToolCall
from qprobe.defects import names

FRAGMENTS = [
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>", "<|im_end|>", "<|endoftext|>",
    "{", "}", "[", "]", ",", ":", '"', "\n", " ", "score", '"score"', '"defects"', '"bbox_2d"', '"type"',
    '"name"', '"arguments"', '"crop"', '"blur"', "1", "3.5", "-2", "1e309", "NaN", "Infinity", "null", "true",
    "[[[[[[[[[[[[", "]]]]]]", "\\u0000", "\ud7ff", "é",
]
adversarial = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32))
view_coords = st.integers(0, 4000)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), adversarial))
def test_parser_never_raises_and_always_types_its_result(text: str) -> None:
    parsed = protocol.parse_assistant(text)
    assert isinstance(parsed, ToolCall | Answer | ParseFailure)
    if isinstance(parsed, ParseFailure):
        assert isinstance(parsed.kind, FailureKind) and parsed.detail
    assert isinstance(protocol.format_ok(text), bool)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text())))
def test_parser_takes_non_text_without_raising(value: object) -> None:
    parsed = protocol.parse_assistant(value)
    assert isinstance(parsed, ParseFailure) and parsed.kind is FailureKind.EMPTY


@settings(max_examples=150, deadline=None)
@given(st.tuples(numbers, numbers, numbers, numbers), st.text(alphabet=st.characters(blacklist_characters="<>"),
                                                              min_size=1, max_size=80))
def test_tool_call_round_trip(box: tuple[float, ...], think: str) -> None:
    parsed = protocol.parse_assistant(protocol.render_turn(think, protocol.render_tool_call(box)))
    assert isinstance(parsed, ToolCall)
    assert parsed.bbox == tuple(float(v) for v in box)
    assert parsed.think == think.strip()


defects = st.lists(st.builds(lambda b, t: Defect(bbox=b, type=t), st.tuples(view_coords, view_coords, view_coords,
                                                                            view_coords),
                             st.sampled_from(names())), max_size=4)


@settings(max_examples=150, deadline=None)
@given(st.floats(1.0, 5.0), defects)
def test_answer_round_trip(score: float, items: list[Defect]) -> None:
    text = protocol.render_turn("fine", protocol.render_answer(score, items))
    parsed = protocol.parse_assistant(text + "<|im_end|>")
    assert isinstance(parsed, Answer)
    assert parsed.score == round(score, 2)
    assert [(tuple(float(v) for v in d.bbox), d.type) for d in items] == [(d.bbox, d.type) for d in parsed.defects]


@settings(max_examples=100, deadline=None)
@given(st.tuples(view_coords, view_coords, view_coords, view_coords).filter(lambda b: b[0] < b[2] and b[1] < b[3]),
       st.floats(1.0, 5.0))
def test_rendered_turns_pass_the_strict_format_check(box: tuple[int, ...], score: float) -> None:
    assert protocol.format_ok(protocol.render_turn("look closer", protocol.render_tool_call(box)))
    answer = protocol.render_answer(score, [Defect(bbox=box, type="noise")])
    assert protocol.format_ok(protocol.render_turn("done", answer) + "<|im_end|>")


CALL = '{"name": "crop", "arguments": {"bbox_2d": [1, 2, 30, 40]}}'


@pytest.mark.parametrize(("text", "kind"), [
    ("", FailureKind.EMPTY),
    ("  <|im_end|>", FailureKind.EMPTY),
    ("<think>the photo is fine</think> 4 out of 5", FailureKind.NO_TAG),
    (f"<tool_call>{CALL}", FailureKind.UNCLOSED_TAG),
    ("<answer>{score: 3}</answer>", FailureKind.BAD_JSON),
    ("<answer>" + "[" * 5000 + "</answer>", FailureKind.BAD_JSON),
    ('<tool_call>{"name": "crop", "bbox_2d": [1, 2, 3, 4]}</tool_call>', FailureKind.WRONG_KEYS),
    ('<tool_call>{"name": "crop", "arguments": {"box": [1, 2, 3, 4]}}</tool_call>', FailureKind.WRONG_KEYS),
    ('<tool_call>{"name": "zoom", "arguments": {"bbox_2d": [1, 2, 3, 4]}}</tool_call>', FailureKind.UNKNOWN_TOOL),
    ('<tool_call>{"name": "crop", "arguments": {"bbox_2d": [1, 2, 3]}}</tool_call>', FailureKind.BAD_BOX),
    ('<tool_call>{"name": "crop", "arguments": {"bbox_2d": [1, 2, 3, "4"]}}</tool_call>', FailureKind.BAD_BOX),
    ('<tool_call>{"name": "crop", "arguments": {"bbox_2d": [1, 2, 3, NaN]}}</tool_call>', FailureKind.BAD_BOX),
    ('<tool_call>{"name": "crop", "arguments": {"bbox_2d": [1, 2, 3, true]}}</tool_call>', FailureKind.BAD_BOX),
    ('<answer>{"score": "3.5", "defects": []}</answer>', FailureKind.SCORE_NOT_NUMBER),
    ('<answer>{"score": NaN, "defects": []}</answer>', FailureKind.SCORE_NOT_NUMBER),
    ('<answer>{"score": 5.01, "defects": []}</answer>', FailureKind.SCORE_OUT_OF_RANGE),
    ('<answer>{"score": Infinity}</answer>', FailureKind.SCORE_OUT_OF_RANGE),
    ('<answer>{"score": 3, "defects": [{"bbox_2d": [1, 2, 3, 4]}]}</answer>', FailureKind.BAD_DEFECT),
    ('<answer>{"score": 3, "defects": {"type": "blur"}}</answer>', FailureKind.BAD_DEFECT),
    ('<answer>{"score": 3, "defects": [{"bbox_2d": [1, 2], "type": "blur"}]}</answer>', FailureKind.BAD_BOX),
    ('<answer>{"score": 3, "verdict": "ok"}</answer>', FailureKind.WRONG_KEYS),
    ('<answer>{"score": 3}</answer><answer>{"score": 4}</answer>', FailureKind.TWO_ANSWERS),
    (f"<tool_call>{CALL}</tool_call>\n<tool_call>{CALL}</tool_call>", FailureKind.TWO_TOOL_CALLS),
    (f'<tool_call>{CALL}</tool_call><answer>{{"score": 3}}</answer>', FailureKind.TOOL_CALL_AND_ANSWER),
    ('<answer>{"score": 3}</answer> and that is my verdict', FailureKind.TEXT_AFTER_ANSWER),
    (f"<tool_call>{CALL}</tool_call> now show me", FailureKind.TEXT_AFTER_TOOL_CALL),
])
def test_failure_kinds(text: str, kind: FailureKind) -> None:
    parsed = protocol.parse_assistant(text)
    assert isinstance(parsed, ParseFailure), parsed
    assert parsed.kind is kind, parsed.detail


def test_parser_is_lenient_where_the_intent_is_clear() -> None:
    call = protocol.parse_assistant(f"<tool_call>\n{CALL}\n</tool_call>\n<|im_end|>")  # no think, Qwen's newlines
    assert isinstance(call, ToolCall) and call.bbox == (1.0, 2.0, 30.0, 40.0) and call.think == ""
    answer = protocol.parse_assistant('<think>a</think><think>b</think><answer>{"score": 2}</answer>')
    assert isinstance(answer, Answer) and answer.defects == () and answer.think == "a\nb"
    reversed_box = protocol.parse_assistant('<answer>{"score": 1, "defects": [{"bbox_2d": [9, 9, 1, 1], '
                                            '"type": " Blur "}]}</answer>')
    assert isinstance(reversed_box, Answer) and reversed_box.defects[0] == Defect((9.0, 9.0, 1.0, 1.0), "blur")


@pytest.mark.parametrize(("text", "kind"), [
    (f"<tool_call>{CALL}</tool_call>", FailureKind.NO_THINK),
    (f"I think so <think>x</think><tool_call>{CALL}</tool_call>", FailureKind.NO_THINK),
    (f"<think>x</think> so <tool_call>{CALL}</tool_call>", FailureKind.TEXT_OUTSIDE_TAGS),
    (f"<think> </think><tool_call>{CALL}</tool_call>", FailureKind.TEXT_OUTSIDE_TAGS),
    (f"<think>a</think><think>b</think><tool_call>{CALL}</tool_call>", FailureKind.TEXT_OUTSIDE_TAGS),
    ('<think>x</think><tool_call>{"name": "crop", "arguments": {"bbox_2d": [30, 2, 1, 40]}}</tool_call>',
     FailureKind.BAD_BOX),
    ('<think>x</think><answer>{"score": 3}</answer>', FailureKind.MISSING_DEFECTS),
    ('<think>x</think><answer>{"score": 3, "defects": [{"bbox_2d": [1, 2, 3, 4], "type": "fog"}]}</answer>',
     FailureKind.UNKNOWN_DEFECT_TYPE),
])
def test_strict_format_check(text: str, kind: FailureKind) -> None:
    assert isinstance(protocol.parse_assistant(text), ToolCall | Answer)  # the lenient parser takes them
    failure = protocol.format_failure(text)
    assert failure is not None and failure.kind is kind, failure


def test_prompts_state_the_tool_the_frame_and_the_format() -> None:
    system = protocol.system_prompt()
    assert "bbox_2d" in system and "<tool_call>" in system and "<answer>" in system and "<think>" in system
    assert json.dumps(protocol.CROP_TOOL_SCHEMA) in system
    assert all(t in system for t in names())
    assert "absolute pixels of the global view" in system
    user = protocol.user_prompt((812, 616), (3248, 2464), 3)
    assert "812x616" in user and "3248x2464" in user and "3 regions" in user
    # Whether cropping can reveal anything is said in words, not left to a comparison of sizes.
    assert user.startswith("This is the global view of a photo") and "downscaled 4.0x" in user
    native = protocol.user_prompt((224, 168), (230, 170), 3)
    assert native.startswith("This is a photo at about its native resolution, 224x168 pixels") and "downscaled" not in native
    line = protocol.region_line((10, 20.5, 100, 200), (40, 82, 400, 800), (3248, 2464), (308, 560))
    assert line == ("Region [10, 20.5, 100, 200] of the global view, pixels [40, 82, 400, 800] of the 3248x2464 "
                    "photo at native resolution, shown at 308x560.")


def test_message_builders() -> None:
    from PIL import Image

    view = Image.new("RGB", (56, 28))
    system, user = protocol.global_turn(view, (560, 280), 2)
    assert system["role"] == "system" and user["content"][0] == {"type": "image", "image": view}
    assert "56x28" in user["content"][1]["text"]
    tool = protocol.tool_turn([{"type": "text", "text": "error: x"}])
    assert tool == {"role": "tool", "name": "crop", "content": [{"type": "text", "text": "error: x"}]}
    assert protocol.assistant_turn("hi") == {"role": "assistant", "content": [{"type": "text", "text": "hi"}]}


@pytest.mark.parametrize("message", [
    {"role": "assistant", "reasoning_content": "look", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "crop", "arguments": {"bbox_2d": [1, 2, 30, 40]}}}]},
    {"role": "assistant", "reasoning_content": "fine", "content": '<answer>{"score": 3.5, "defects": []}</answer>'},
    {"role": "assistant", "content": [{"type": "text", "text": f"<think>x</think>\n<tool_call>{CALL}</tool_call>"}]},
])
def test_message_text_rebuilds_what_trl_parsed(message: dict) -> None:
    text = protocol.message_text(message)
    assert protocol.format_ok(text)
    assert text.startswith("<think>") and "</think>\n<" in text


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80).filter(lambda t: "</think>\n" not in t), st.text(max_size=80))
def test_split_turn_inverts_render_turn(think: str, action: str) -> None:
    assert protocol.split_turn(protocol.render_turn(think, action)) == (think, action)


@pytest.mark.parametrize("text", ["no tags", "<think>unclosed", "x<think>a</think>\nb", "<think>a</think> b"])
def test_split_turn_refuses_text_render_turn_did_not_write(text: str) -> None:
    with pytest.raises(ValueError, match="not a rendered turn"):
        protocol.split_turn(text)


@pytest.mark.parametrize("value", [[1, 2, 3], "[1, 2, 3, 4]", [1, 2, 3, "4"], [1, 2, 3, True], [1, 2, 3, float("nan")],
                                   [1, 2, 3, 10**400], None, [1, 2, 3, 4]])
def test_parser_and_crop_tool_read_a_box_alike(value: object) -> None:
    from qprobe.agent.crop import Geometry

    read = protocol.read_box(value)
    text = f'<think>x</think>\n<tool_call>{json.dumps({"name": "crop", "arguments": {"bbox_2d": value}})}</tool_call>'
    parsed = protocol.parse_assistant(text)
    repaired = Geometry.for_size((560, 560), 560 * 560).repair(value)
    if isinstance(read, str):
        assert isinstance(parsed, ParseFailure) and parsed.kind is FailureKind.BAD_BOX and repaired == read
    else:
        assert isinstance(parsed, ToolCall) and parsed.bbox == read == (1.0, 2.0, 3.0, 4.0)
        assert repaired == (0.0, 0.0, 28.0, 28.0)  # four numbers: the tool repairs the tiny box instead


def test_tool_turn_limit_is_the_crops_and_one_refusal() -> None:
    assert [protocol.tool_turn_limit(n) for n in (1, 3)] == [2, 4]


def test_tool_response_frame_is_what_the_chat_template_renders() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    frame = protocol.tool_response_frame()
    tool = {"role": "tool", "name": "crop", "content": "R"}
    (rendered,), _ = render_jinja_template([[tool, tool]], chat_template=protocol.chat_template())
    user = f"{frame.first_open}R{frame.close}{frame.next_open}R{frame.close}"
    (as_user,), _ = render_jinja_template([[{"role": "user", "content": user}]], chat_template=protocol.chat_template())
    assert rendered == as_user and "<tool_response>" in frame.first_open
