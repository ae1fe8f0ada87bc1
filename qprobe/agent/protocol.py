"""The Q-Probe protocol: prompts, chat template, message builders, and the parser of assistant turns.

One module that SFT data, RL rollouts, inference and evaluation all go through. A trajectory reads::

    <think>global impression ...</think>
    <tool_call>{"name": "crop", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}</tool_call>
       -> tool turn: the crop image + a line naming the region
    <think>local scrutiny, critical check against the global context ...</think>
    <answer>{"score": 3.42, "defects": [{"bbox_2d": [x1, y1, x2, y2], "type": "blur"}]}</answer>

Every box the model reads or writes is in absolute pixels of the *global view* (the photo resized by
Qwen2.5-VL's ``smart_resize`` to the global pixel budget), Qwen2.5-VL's own grounding convention; the
user prompt states the view's size. :mod:`qprobe.agent.crop` maps boxes to original pixels.

:func:`parse_assistant` never raises: malformed output is a :class:`ParseFailure` whose
:class:`FailureKind` is counted by evaluation and costs format reward in RL. It is lenient where
leniency is unambiguous (a missing ``<think>``, whitespace inside tags, a missing ``defects`` list);
:func:`format_failure` is the strict check behind the format reward. Both run in time linear in the
text (plain scans for the tags, no backtracking regex): a runaway generation of 100,000 characters
costs milliseconds, not minutes, inside a GRPO step.

The module is long on purpose: it is the one home of every protocol rule (the form of a box, the
split of a turn, the crop budget's refusal, the tool turn's framing), so no caller restates one
(docs/architecture.md, The protocol).
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from PIL import Image

from qprobe.defects import TYPES

Box = tuple[float, float, float, float]

CROP_TOOL_NAME = "crop"
SCORE_MIN, SCORE_MAX = 1.0, 5.0
# Below this linear downscale factor the global view shows the photo at about its native resolution.
NATIVE_SCALE = 1.25
# An answer listing more defects than this is a parse failure: a bench photo has a handful, and box
# matching (Hungarian, cubic in the count) must stay cheap whatever the model writes.
MAX_DEFECTS = 32

# The crop tool as a function schema, in the form `transformers.utils.get_json_schema` derives from
# `CropTool.crop` (tests hold the two equal), so trl's tool rendering and this prompt agree.
CROP_TOOL_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": CROP_TOOL_NAME,
        "description": "Look at a region of the photo at its native resolution.",
        "parameters": {
            "type": "object",
            "properties": {
                "bbox_2d": {
                    "type": "array",
                    "items": {"type": "integer"},
                    "description": "The region as [x1, y1, x2, y2] in absolute pixels of the global view.",
                }
            },
            "required": ["bbox_2d"],
        },
        "return": {"type": "array", "items": {"type": "object", "additionalProperties": {}}},
    },
}


def system_prompt() -> str:
    """The system prompt. It lists the registered defect types (:mod:`qprobe.defects`), the same the
    bench writes and :func:`format_failure` accepts, so it is built from the registry on each call."""
    types = ", ".join(TYPES)
    return f"""You are Q-Probe, an expert in image quality assessment of high-resolution photos.
You see a downscaled global view of the photo. Small local defects ({types}) are often \
invisible at that scale, so inspect suspicious regions at native resolution with the crop tool before \
you judge. Every box, in tool calls and in the answer, is [x1, y1, x2, y2] in absolute pixels of the \
global view, whose size the user gives as WIDTHxHEIGHT.

# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{json.dumps(CROP_TOOL_SCHEMA)}
</tools>

Work in turns. Each turn starts with your reasoning in <think></think>, then either one tool call or \
the answer:
<tool_call>{{"name": "crop", "arguments": {{"bbox_2d": [x1, y1, x2, y2]}}}}</tool_call>
<answer>{{"score": S, "defects": [{{"bbox_2d": [x1, y1, x2, y2], "type": T}}]}}</answer>
The crop comes back as an image. First give your global impression, then scrutinise each crop and check \
it critically against the global context. The score S is the overall quality from 1 (bad) to 5 \
(excellent) with two decimals; list every local defect you found with its box and its type T, one of: \
{types}; an empty list if the photo is clean."""


def downscale_factor(view_size: tuple[int, int], original_size: tuple[int, int]) -> float:
    """How many times smaller than the photo the global view is, per side (about 1: native resolution)."""
    (w, h), (ow, oh) = view_size, original_size
    return math.sqrt(ow * oh / (w * h))


def user_prompt(view_size: tuple[int, int], original_size: tuple[int, int], max_crops: int) -> str:
    """The text of the first user turn, beside the global view image.

    It opens differently for a photo the view shows at about its native resolution and for one it
    downscales, and states the factor: whether cropping can reveal anything hinges on it, and a few
    words say so more plainly than two sizes a model would have to compare.
    """
    (w, h), (ow, oh) = view_size, original_size
    scale = downscale_factor(view_size, original_size)
    if scale < NATIVE_SCALE:
        head = f"This is a photo at about its native resolution, {w}x{h} pixels (the photo itself is {ow}x{oh})."
    else:
        head = (f"This is the global view of a photo, {w}x{h} pixels, downscaled {scale:.1f}x from the photo "
                f"itself, {ow}x{oh}.")
    return f"{head} Rate its quality. You may crop up to {max_crops} regions."


def tool_turn_limit(max_crops: int) -> int:
    """The tool turns a rollout may take under a budget of ``max_crops`` crops: the crops, then one more
    call that the crop tool refuses with a line asking for the answer. A call after the refusal ends the
    rollout unanswered.

    The one statement of the rule: the inference loop (:func:`qprobe.agent.rollout.rollout`) stops there,
    and stage 3 hands it to trl's tool loop as ``max_tool_calling_iterations``.
    """
    return max_crops + 1


# How :func:`user_prompt` states the view's size, in both of its openings.
_VIEW_SIZE = re.compile(r", (\d{1,6})x(\d{1,6}) pixels")


def view_size_of(prompt: Any) -> tuple[int, int] | None:
    """The global view's ``(width, height)`` as the first user turn of ``prompt`` states it, else ``None``.

    ``prompt`` is what trl hands a reward: a message list (or the user text itself). The size the
    model was told is the frame its boxes must lie in, whatever the dataset's other columns hold.
    """
    if isinstance(prompt, list):
        user = next((m for m in prompt if isinstance(m, dict) and m.get("role") == "user"), None)
        prompt = _text_of(user.get("content")) if user is not None else ""
    match = _VIEW_SIZE.search(prompt) if isinstance(prompt, str) else None
    return (int(match[1]), int(match[2])) if match else None


def region_line(view_box: Box, original_box: tuple[int, int, int, int], original_size: tuple[int, int],
                crop_size: tuple[int, int]) -> str:
    """The text that follows a crop image in a tool turn: where the crop lies, in both frames."""
    return (
        f"Region {_box_text(view_box)} of the global view, pixels {_box_text(original_box)} of the "
        f"{original_size[0]}x{original_size[1]} photo at native resolution, shown at {crop_size[0]}x{crop_size[1]}."
    )


def _box_text(box: tuple[float, ...]) -> str:
    return "[" + ", ".join(_num_text(v) for v in box) + "]"


def _num_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


# ---------------------------------------------------------------------------------------------------
# Chat template and messages


@cache
def chat_template() -> str:
    """The package's chat template (``chat_template.jinja``), applied to every model."""
    return resources.files("qprobe.agent").joinpath("chat_template.jinja").read_text(encoding="utf-8")


# transformers' response template for `tokenizer.parse_response`, which trl's GRPOTrainer uses to
# split a completion into reasoning, content and tool calls. The same field layout as trl's Qwen3
# template, which fits this protocol's tags; set on every tokenizer by `qprobe.models.factory`.
RESPONSE_TEMPLATE: dict[str, Any] = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "reasoning_content": {"open": "<think>", "close_pattern": r"</think>\s*", "content": "text"},
        "tool_calls": {
            "open": "<tool_call>",
            "close_pattern": r"</tool_call>\s*",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}


@dataclass(frozen=True)
class ToolResponseFrame:
    """The text the chat template writes around each tool result inside the one user turn that a run of
    consecutive tool messages shares: before the first result, before each further one, after each."""

    first_open: str
    next_open: str
    close: str


@cache
def tool_response_frame() -> ToolResponseFrame:
    """How the chat template frames tool results, cut from the template's own rendering of marked ones.

    The chat template is the one definition of what a tool turn looks like to the model: trl renders
    ``role: tool`` messages through it in SFT and in stage 3's tool loop, and so does the local backend.
    A client that must send the tool turn as text (:func:`qprobe.agent.backends.to_openai_messages`)
    takes the framing from here rather than writing it a second time.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    marks = ("\x00result-1\x00", "\x00result-2\x00")
    (user, one, two), _ = render_jinja_template(
        [[{"role": "user", "content": marks[0]}],
         [{"role": "tool", "name": CROP_TOOL_NAME, "content": marks[0]}],
         [{"role": "tool", "name": CROP_TOOL_NAME, "content": mark} for mark in marks]],
        chat_template=chat_template())
    # The template's user turn around a plain text: what the tool results must sit inside.
    head, tail = user.split(marks[0])
    if not (one.startswith(head) and one.endswith(tail) and two.startswith(head) and two.endswith(tail)):
        raise RuntimeError("chat_template.jinja no longer renders tool results inside a user turn")
    one, two = one[len(head): len(one) - len(tail)], two[len(head): len(two) - len(tail)]
    first_open, close = one.split(marks[0])
    next_open = two[len(one):].split(marks[1])[0]
    if two != one + next_open + marks[1] + close:
        raise RuntimeError("chat_template.jinja no longer frames each tool result the same way")
    return ToolResponseFrame(first_open=first_open, next_open=next_open, close=close)


def system_message() -> dict[str, Any]:
    return {"role": "system", "content": [{"type": "text", "text": system_prompt()}]}


def global_turn(view: Image.Image, original_size: tuple[int, int], max_crops: int) -> list[dict[str, Any]]:
    """The opening of every conversation: the system prompt and the user turn with the global view."""
    return [
        system_message(),
        {"role": "user", "content": [
            {"type": "image", "image": view},
            {"type": "text", "text": user_prompt(view.size, original_size, max_crops)},
        ]},
    ]


def tool_turn(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """A tool message holding the crop tool's result blocks (the crop image and its region line)."""
    return {"role": "tool", "name": CROP_TOOL_NAME, "content": blocks}


def assistant_turn(text: str) -> dict[str, Any]:
    """An assistant message holding the model's raw text (tags included)."""
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def message_text(message: dict[str, Any]) -> str:
    """The raw text of an assistant message, also one split by trl's response parser.

    trl hands reward functions completions parsed into ``reasoning_content``, ``content`` and
    ``tool_calls``; this puts them back together the way the chat template renders them, so
    :func:`parse_assistant` and :func:`format_failure` see what the model wrote.
    """
    parts: list[str] = []
    if message.get("reasoning_content"):
        parts.append(f"<think>{message['reasoning_content']}</think>\n")
    text = _text_of(message.get("content"))
    parts.append(text)
    calls = message.get("tool_calls")
    for i, call in enumerate(calls if isinstance(calls, list) else []):
        fn = call.get("function", call) if isinstance(call, dict) else {}
        fn = fn if isinstance(fn, dict) else {}
        args = fn.get("arguments")
        try:
            args_text = args if isinstance(args, str) else json.dumps(args)
            name = json.dumps(fn.get("name"))
        except (TypeError, ValueError):  # not JSON-serialisable: the model cannot have written it
            args_text, name = "null", "null"
        if i or text:
            parts.append("\n")
        parts.append(f'<tool_call>{{"name": {name}, "arguments": {args_text}}}</tool_call>')
    return "".join(parts)


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text blocks of a block list; else empty."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b["text"] for b in content
                       if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str))
    return ""


# ---------------------------------------------------------------------------------------------------
# Rendering (what SFT data is written with) and parsing (what model output is read with)


@dataclass(frozen=True)
class Defect:
    bbox: Box
    type: str

    def to_json(self) -> dict[str, Any]:
        return {"bbox_2d": [_json_num(v) for v in self.bbox], "type": self.type}


@dataclass(frozen=True)
class ToolCall:
    """A crop request; ``bbox`` in global-view pixels as written (corners may be reversed)."""

    bbox: Box
    think: str = ""
    name: str = CROP_TOOL_NAME


@dataclass(frozen=True)
class Answer:
    score: float
    defects: tuple[Defect, ...] = ()
    think: str = ""


class FailureKind(enum.StrEnum):
    EMPTY = "empty"
    NO_TAG = "no_tag"
    UNCLOSED_TAG = "unclosed_tag"
    BAD_JSON = "bad_json"
    WRONG_KEYS = "wrong_keys"
    UNKNOWN_TOOL = "unknown_tool"
    BAD_BOX = "bad_box"
    SCORE_NOT_NUMBER = "score_not_number"
    SCORE_OUT_OF_RANGE = "score_out_of_range"
    BAD_DEFECT = "bad_defect"
    TWO_ANSWERS = "two_answers"
    TWO_TOOL_CALLS = "two_tool_calls"
    TOOL_CALL_AND_ANSWER = "tool_call_and_answer"
    TEXT_AFTER_ANSWER = "text_after_answer"
    TEXT_AFTER_TOOL_CALL = "text_after_tool_call"
    # Only the strict format check reports these.
    NO_THINK = "no_think"
    TEXT_OUTSIDE_TAGS = "text_outside_tags"
    UNKNOWN_DEFECT_TYPE = "unknown_defect_type"
    MISSING_DEFECTS = "missing_defects"


@dataclass(frozen=True)
class ParseFailure:
    kind: FailureKind
    detail: str
    text: str = field(default="", repr=False)


Parsed = ToolCall | Answer | ParseFailure


def _json_num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def render_tool_call(bbox: tuple[float, ...]) -> str:
    args = {"bbox_2d": [_json_num(v) for v in bbox]}
    return f'<tool_call>{{"name": "{CROP_TOOL_NAME}", "arguments": {json.dumps(args)}}}</tool_call>'


def render_answer(score: float, defects: list[Defect] | tuple[Defect, ...] = ()) -> str:
    body = {"score": round(float(score), 2), "defects": [d.to_json() for d in defects]}
    return f"<answer>{json.dumps(body)}</answer>"


def render_turn(think: str, action: str) -> str:
    """One assistant turn: reasoning, then a rendered tool call or answer."""
    return f"<think>{think}</think>\n{action}"


def split_turn(text: str) -> tuple[str, str]:
    """The ``(think, action)`` a turn was rendered from: the inverse of :func:`render_turn`, exact to the
    character (the trajectory builder and the teacher rewrite a turn's reasoning and keep its action).

    Raises ``ValueError`` for text :func:`render_turn` did not write; model output goes through
    :func:`parse_assistant` instead.
    """
    head, sep, action = text.partition("</think>\n")
    if not sep or not head.startswith("<think>"):
        raise ValueError(f"not a rendered turn: {text[:60]!r}")
    return head[len("<think>"):], action


_ACTION_OPEN = re.compile(r"<(tool_call|answer)>")
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _strip_end(text: str) -> str:
    """``text`` without trailing whitespace and end-of-turn tokens, found by one backward scan."""
    end = len(text)
    while True:
        while end and text[end - 1].isspace():
            end -= 1
        token = next((t for t in _END_TOKENS if text.startswith(t, end - len(t), end)), None)
        if token is None:
            return text[:end]
        end -= len(token)


def parse_assistant(text: Any) -> Parsed:
    """Read one assistant turn: a :class:`ToolCall`, an :class:`Answer`, or a :class:`ParseFailure`.

    Never raises, whatever ``text`` is.
    """
    if not isinstance(text, str):
        return ParseFailure(FailureKind.EMPTY, f"expected text, got {type(text).__name__}")
    body = _strip_end(text)
    if not body.strip():
        return ParseFailure(FailureKind.EMPTY, "empty output", text)
    opens: dict[str, list[re.Match[str]]] = {"tool_call": [], "answer": []}
    for match in _ACTION_OPEN.finditer(body):
        opens[match.group(1)].append(match)
    n_calls, n_answers = len(opens["tool_call"]), len(opens["answer"])
    if n_answers > 1:
        return ParseFailure(FailureKind.TWO_ANSWERS, f"{n_answers} <answer> blocks", text)
    if n_calls > 1:
        return ParseFailure(FailureKind.TWO_TOOL_CALLS, f"{n_calls} <tool_call> blocks; one crop per turn", text)
    if n_calls and n_answers:
        return ParseFailure(FailureKind.TOOL_CALL_AND_ANSWER, "both a tool call and an answer", text)
    if not (n_calls or n_answers):
        return ParseFailure(FailureKind.NO_TAG, "neither <tool_call> nor <answer>", text)
    tag = "tool_call" if n_calls else "answer"
    start = opens[tag][0]
    close = body.find(f"</{tag}>", start.end())
    if close < 0:
        return ParseFailure(FailureKind.UNCLOSED_TAG, f"<{tag}> is never closed", text)
    after = body[close + len(f"</{tag}>"):]
    if after.strip():
        kind = FailureKind.TEXT_AFTER_TOOL_CALL if n_calls else FailureKind.TEXT_AFTER_ANSWER
        return ParseFailure(kind, f"text after </{tag}>: {after.strip()[:40]!r}", text)
    think = _think_text(body[: start.start()])
    try:
        payload = json.loads(body[start.end(): close])
    except (ValueError, RecursionError) as exc:
        return ParseFailure(FailureKind.BAD_JSON, f"<{tag}> holds no valid JSON ({str(exc)[:60]})", text)
    if n_calls:
        return _tool_call(payload, think, text)
    return _answer(payload, think, text)


def _think_text(prefix: str) -> str:
    """The ``<think>`` blocks of ``prefix``, each from an opening tag to the next closing one, joined."""
    blocks, pos = [], 0
    while (start := prefix.find("<think>", pos)) >= 0:
        close = prefix.find("</think>", start + len("<think>"))
        if close < 0:  # no later block can close either
            break
        blocks.append(prefix[start + len("<think>"): close].strip())
        pos = close + len("</think>")
    return "\n".join(blocks)


def _tool_call(payload: Any, think: str, text: str) -> Parsed:
    if not isinstance(payload, dict) or set(payload) != {"name", "arguments"}:
        return ParseFailure(FailureKind.WRONG_KEYS, 'a tool call is {"name": ..., "arguments": ...}', text)
    if payload["name"] != CROP_TOOL_NAME:
        return ParseFailure(FailureKind.UNKNOWN_TOOL, f"unknown tool {str(payload['name'])[:40]!r}", text)
    args = payload["arguments"]
    if not isinstance(args, dict) or set(args) != {"bbox_2d"}:
        return ParseFailure(FailureKind.WRONG_KEYS, 'crop takes {"bbox_2d": [x1, y1, x2, y2]}', text)
    box = read_box(args["bbox_2d"])
    if isinstance(box, str):
        return ParseFailure(FailureKind.BAD_BOX, "bbox_2d must be four finite numbers", text)
    return ToolCall(bbox=box, think=think)


def _answer(payload: Any, think: str, text: str) -> Parsed:
    if not isinstance(payload, dict) or "score" not in payload or set(payload) - {"score", "defects"}:
        return ParseFailure(FailureKind.WRONG_KEYS, 'an answer is {"score": ..., "defects": [...]}', text)
    score = payload["score"]
    if isinstance(score, bool) or not isinstance(score, int | float) or score != score:  # NaN
        return ParseFailure(FailureKind.SCORE_NOT_NUMBER, f"score {_clip(score)!r} is not a number", text)
    if not SCORE_MIN <= score <= SCORE_MAX:  # exact for integers of any size, and for +-inf
        return ParseFailure(FailureKind.SCORE_OUT_OF_RANGE, f"score {_clip(score)} is outside 1-5", text)
    raw_defects = payload.get("defects", [])
    if not isinstance(raw_defects, list):
        return ParseFailure(FailureKind.BAD_DEFECT, "defects must be a list", text)
    if len(raw_defects) > MAX_DEFECTS:
        return ParseFailure(FailureKind.BAD_DEFECT, f"{len(raw_defects)} defects; at most {MAX_DEFECTS}", text)
    defects = []
    for item in raw_defects:
        if not isinstance(item, dict) or set(item) != {"bbox_2d", "type"}:
            return ParseFailure(FailureKind.BAD_DEFECT, 'a defect is {"bbox_2d": [...], "type": ...}', text)
        if not isinstance(item["type"], str) or not item["type"].strip():
            return ParseFailure(FailureKind.BAD_DEFECT, "a defect type must be a non-empty string", text)
        box = read_box(item["bbox_2d"])
        if isinstance(box, str):
            return ParseFailure(FailureKind.BAD_BOX, "a defect bbox_2d must be four finite numbers", text)
        defects.append(Defect(bbox=box, type=item["type"].strip().lower()))
    return Answer(score=float(score), defects=tuple(defects), think=think)


def _clip(value: Any) -> str:
    """At most 20 characters of ``value``: a detail line stays one short line, and a number with
    thousands of digits is never converted to text whole (Python refuses past 4300 digits)."""
    if isinstance(value, int) and abs(value) >= 10**20:
        return "a huge integer"
    return str(value)[:20]


def ordered_box(box: Box) -> Box:
    """Corners sorted, as the crop tool reads a box: the lenient parser keeps reversed corners (which
    the strict check, and so the format reward, already counts against the model)."""
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    return (x1, y1, x2, y2)


def read_box(value: Any) -> Box | str:
    """``value`` (a ``bbox_2d`` as the model wrote it) as four finite floats, or what is wrong with it.

    The one check of a box's form, behind the parser and the crop tool
    (:meth:`qprobe.agent.crop.Geometry.repair`); the reason is a line the tool sends back to the model.
    Whether the box is ordered or inside the view is left to the caller: the parser keeps what was
    written, the strict check (:func:`format_failure`) refuses it, the tool repairs it.
    """
    if not isinstance(value, list | tuple) or len(value) != 4:
        return "bbox_2d must be a list of four numbers [x1, y1, x2, y2]"
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in value):
        return "bbox_2d must hold four numbers"
    try:
        box = tuple(float(v) for v in value)
    except OverflowError:  # an integer too large for a float
        return "bbox_2d must hold four finite numbers"
    if not all(math.isfinite(v) for v in box):
        return "bbox_2d must hold four finite numbers"
    return box  # type: ignore[return-value]


def _strict_layout(body: str) -> bool:
    """``body`` (stripped) is one non-empty ``<think>`` block, then one tool call or answer block, and
    nothing else but whitespace; no block holds another opening tag of its own kind. Each tag is found
    with one forward search, so the check is linear in the text."""
    if not body.startswith("<think>"):
        return False
    close = body.find("</think>")
    think = body[len("<think>"): close]
    if close < 0 or "<think>" in think or not think.strip():
        return False
    action = body[close + len("</think>"):].lstrip()
    for tag in ("tool_call", "answer"):
        opening, closing = f"<{tag}>", f"</{tag}>"
        if action.startswith(opening):
            end = action.find(closing)
            return (end >= 0 and opening not in action[len(opening): end]
                    and not action[end + len(closing):].strip())
    return False


def format_failure(text: Any, view_size: tuple[int, int] | None = None) -> ParseFailure | None:
    """The strict format check behind the format reward: ``None`` when ``text`` is a well-formed turn.

    Well-formed: exactly one non-empty ``<think>`` block first, then exactly one tool call or answer
    that parses, nothing else but whitespace (a trailing ``<|im_end|>`` is allowed); boxes with
    ``x1 < x2`` and ``y1 < y2`` in non-negative pixels, inside the global view when ``view_size``
    (``(width, height)``, as the prompt states it: :func:`view_size_of`) is given; an answer lists its
    ``defects`` (maybe empty) with types from the registry, :data:`qprobe.defects.TYPES`.
    """
    parsed = parse_assistant(text)
    if isinstance(parsed, ParseFailure):
        return parsed
    body = _strip_end(text).strip()
    if not body.startswith("<think>"):
        return ParseFailure(FailureKind.NO_THINK, "the turn must open with <think>...</think>", text)
    if not _strict_layout(body):
        return ParseFailure(FailureKind.TEXT_OUTSIDE_TAGS,
                            "expected <think>...</think> then one tool call or answer, nothing else", text)
    width, height = view_size if view_size is not None else (math.inf, math.inf)
    boxes = [parsed.bbox] if isinstance(parsed, ToolCall) else [d.bbox for d in parsed.defects]
    for x1, y1, x2, y2 in boxes:
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            need = ("boxes need 0 <= x1 < x2 and 0 <= y1 < y2" if view_size is None else
                    f"boxes need 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height}, inside the global view")
            return ParseFailure(FailureKind.BAD_BOX, need, text)
    if isinstance(parsed, Answer):
        payload = json.loads(body[body.index("<answer>") + len("<answer>"): body.index("</answer>")])
        if "defects" not in payload:
            return ParseFailure(FailureKind.MISSING_DEFECTS, 'the answer must list "defects" (maybe [])', text)
        unknown = [d.type for d in parsed.defects if d.type not in TYPES]
        if unknown:
            return ParseFailure(FailureKind.UNKNOWN_DEFECT_TYPE, f"unknown defect type {unknown[0][:30]!r}", text)
    return None


def format_ok(text: Any, view_size: tuple[int, int] | None = None) -> bool:
    return format_failure(text, view_size) is None
