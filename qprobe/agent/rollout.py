"""The Q-Probe loop: global view -> generate -> crop -> generate ... -> answer, with a full trace.

One rollout scores one photo. The model first sees the global view (the photo resized to the global
pixel budget) under the protocol's prompts; every assistant turn is parsed
(:func:`~qprobe.agent.protocol.parse_assistant`): a crop request runs the crop tool on the original
photo and the crop comes back as an image in a tool turn, an answer ends the rollout, and anything
else ends it as a parse failure (reported, never raised). Two budgets bound it: ``max_crops`` crop
calls (a call past it gets a tool error asking for the answer; a second one ends the rollout:
:func:`~qprobe.agent.protocol.tool_turn_limit`, the rule stage 3 gives trl's tool loop too), and
``max_new_tokens`` generated tokens over all turns together.

The :class:`Trace` records every turn (text, parsed result, boxes in view and original pixels,
tokens, seconds) and the token :class:`~qprobe.agent.cost.Cost`; ``Trace.to_dict()`` is what
``qprobe score --json`` prints and what evaluation stores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from qprobe.agent.backends import Backend
from qprobe.agent.cost import Cost, full_resolution_tokens, visual_tokens
from qprobe.agent.crop import DEFAULT_CROP_MAX_PIXELS, DEFAULT_GLOBAL_MAX_PIXELS, CropTool, global_view
from qprobe.agent.protocol import (
    Answer,
    Box,
    Parsed,
    ParseFailure,
    ToolCall,
    assistant_turn,
    global_turn,
    parse_assistant,
    tool_turn,
    tool_turn_limit,
)
from qprobe.agent.protocol_config import ProtocolLimits


@dataclass(frozen=True)
class RolloutConfig:
    global_max_pixels: int = field(default=DEFAULT_GLOBAL_MAX_PIXELS,
                                   metadata={"help": "pixel budget of the global view (smart_resize)"})
    crop_max_pixels: int = field(default=DEFAULT_CROP_MAX_PIXELS,
                                 metadata={"help": "pixel budget of each crop (smart_resize)"})
    max_crops: int = field(default=3, metadata={"help": "crop calls allowed; one more gets a refusal"})
    max_new_tokens: int = field(default=1024, metadata={"help": "generated tokens allowed, all turns together"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature; 0 is greedy"})
    seed: int = field(default=0, metadata={"help": "seed of turn k is seed + k: a rollout replays exactly"})

    @classmethod
    def under(cls, limits: ProtocolLimits, **settings: Any) -> RolloutConfig:
        """The protocol's ``limits`` and a run's other ``settings`` (a lower ``max_crops`` among them)."""
        return cls(**{"global_max_pixels": limits.global_max_pixels, "crop_max_pixels": limits.crop_max_pixels,
                      "max_crops": limits.max_crops, **settings})


@dataclass
class Turn:
    """One turn of the conversation after the opening: an assistant turn or a tool (crop) turn."""

    role: str
    text: str
    parsed: Parsed | None = None  # assistant turns
    view_box: Box | None = None  # tool turns: the repaired box that was cropped, view pixels
    original_box: tuple[int, int, int, int] | None = None  # tool turns: the cropped pixels
    crop_size: tuple[int, int] | None = None  # tool turns: the crop image as the model saw it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    visual_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "text": self.text, "seconds": round(self.seconds, 3)}
        if self.role == "assistant":
            out.update(parsed=_parsed_dict(self.parsed), prompt_tokens=self.prompt_tokens,
                       completion_tokens=self.completion_tokens)
        else:
            out.update(bbox_view=_box_list(self.view_box), bbox_original=_box_list(self.original_box),
                       crop_size=list(self.crop_size) if self.crop_size else None, visual_tokens=self.visual_tokens)
        return out


@dataclass
class Trace:
    """One scored photo; ``outcome`` is ``answer``, ``parse_failure``, ``crop_budget`` or ``token_budget``."""

    source: str
    original_size: tuple[int, int]
    view_size: tuple[int, int]
    outcome: str
    turns: list[Turn]
    cost: Cost
    seconds: float
    answer: Answer | None = None
    failure: ParseFailure | None = None
    tool: CropTool | None = field(default=None, repr=False)  # holds the geometry and crop records
    messages: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def score(self) -> float | None:
        return self.answer.score if self.answer else None

    def defects_original(self) -> list[dict[str, Any]]:
        """The answer's defects with boxes mapped to original pixels (corners sorted, clamped to the
        photo, rounded to whole pixels)."""
        if not self.answer or self.tool is None or self.tool.geometry is None:
            return []
        geometry = self.tool.geometry
        return [{"type": d.type, "bbox_view": _box_list(d.bbox),
                 "bbox_original": [round(v) for v in geometry.to_original(geometry.clamp(d.bbox))]} for d in self.answer.defects]

    def crops_original(self) -> list[tuple[int, int, int, int]]:
        return [t.original_box for t in self.turns if t.original_box is not None]

    def reasoning(self) -> str:
        return "\n".join(t.parsed.think for t in self.turns
                         if isinstance(t.parsed, ToolCall | Answer) and t.parsed.think)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.source,
            "width": self.original_size[0],
            "height": self.original_size[1],
            "view": list(self.view_size),
            "score": self.score,
            "defects": self.defects_original(),
            "outcome": self.outcome,
            "failure": {"kind": str(self.failure.kind), "detail": self.failure.detail} if self.failure else None,
            "turns": [t.to_dict() for t in self.turns],
            "tokens": self.cost.to_dict(),
            "seconds": round(self.seconds, 3),
        }


def rollout(backend: Backend, image: Image.Image, config: RolloutConfig | None = None, source: str = "") -> Trace:
    """Score ``image`` (the original, RGB) with ``backend``; never raises on model output."""
    config = config or RolloutConfig()
    start = time.perf_counter()
    tool = CropTool(image, config.global_max_pixels, config.crop_max_pixels, max_calls=config.max_crops)
    view, geometry = global_view(image, config.global_max_pixels)
    messages = global_turn(view, image.size, config.max_crops)
    cost = Cost(global_visual_tokens=visual_tokens(view.size),
                full_resolution_visual_tokens=full_resolution_tokens(image.size))
    turns: list[Turn] = []
    answer: Answer | None = None
    failure: ParseFailure | None = None
    budget = config.max_new_tokens
    tool_turns = 0
    last_total = 0
    while True:
        if budget <= 0:
            outcome = "token_budget"
            break
        generation = backend.generate(messages, max_new_tokens=budget, temperature=config.temperature,
                                      seed=config.seed + len(turns))
        budget -= generation.completion_tokens
        cost.generated_tokens += generation.completion_tokens
        last_total = generation.prompt_tokens + generation.completion_tokens
        parsed = parse_assistant(generation.text)
        messages.append(assistant_turn(generation.text))
        turns.append(Turn(role="assistant", text=generation.text, parsed=parsed,
                          prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens,
                          seconds=generation.seconds))
        if isinstance(parsed, Answer):
            outcome, answer = "answer", parsed
            break
        if isinstance(parsed, ParseFailure):
            outcome = "token_budget" if generation.finish_reason == "length" else "parse_failure"
            failure = parsed
            break
        if tool_turns >= tool_turn_limit(config.max_crops):  # it was refused and asked again
            outcome = "crop_budget"
            break
        tick = time.perf_counter()
        calls_before = len(tool.calls)
        blocks = tool.crop(list(parsed.bbox))
        tool_turns += 1
        record = tool.calls[-1] if len(tool.calls) > calls_before else None
        crop_image = next((b["image"] for b in blocks if b["type"] == "image"), None)
        crop_tokens = visual_tokens(crop_image.size) if crop_image is not None else 0
        if crop_image is not None:
            cost.crop_visual_tokens.append(crop_tokens)
        messages.append(tool_turn(blocks))
        turns.append(Turn(
            role="tool", text="".join(b["text"] for b in blocks if b["type"] == "text"),
            view_box=record.view_box if record else None, original_box=record.original_box if record else None,
            crop_size=crop_image.size if crop_image is not None else None, visual_tokens=crop_tokens,
            seconds=time.perf_counter() - tick,
        ))
    cost.text_tokens = max(0, last_total - cost.agentic_visual_tokens)
    return Trace(source=source, original_size=image.size, view_size=geometry.view, outcome=outcome, turns=turns,
                 cost=cost, seconds=time.perf_counter() - start, answer=answer, failure=failure, tool=tool,
                 messages=messages)


def _box_list(box: tuple[float, ...] | None) -> list[float | int] | None:
    if box is None:
        return None
    return [int(v) if float(v).is_integer() else round(float(v), 2) for v in box]


def _parsed_dict(parsed: Parsed | None) -> dict[str, Any] | None:
    if isinstance(parsed, ToolCall):
        return {"type": "tool_call", "name": parsed.name, "bbox_view": _box_list(parsed.bbox)}
    if isinstance(parsed, Answer):
        return {"type": "answer", "score": parsed.score,
                "defects": [{"type": d.type, "bbox_view": _box_list(d.bbox)} for d in parsed.defects]}
    if isinstance(parsed, ParseFailure):
        return {"type": "failure", "kind": str(parsed.kind), "detail": parsed.detail}
    return None
