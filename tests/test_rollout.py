"""The rollout loop: a real tool-path rollout of the tiny model, turn by turn, and the budgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_eval import Replay
from PIL import Image

from qprobe.agent.backends import TransformersBackend
from qprobe.agent.protocol import (
    Answer,
    FailureKind,
    ParseFailure,
    ToolCall,
    render_answer,
    render_tool_call,
    render_turn,
)
from qprobe.agent.rollout import RolloutConfig, rollout


def test_taught_tiny_model_goes_through_the_tool_path(taught_model) -> None:
    from qprobe.io import load_image

    backend = TransformersBackend(str(taught_model.path))
    seen: list[dict] = []
    generate = backend.model.generate

    def spy(**inputs):
        seen.append(inputs)
        return generate(**inputs)

    backend.model.generate = spy
    image = load_image(taught_model.image_path)
    config = RolloutConfig(global_max_pixels=taught_model.global_max_pixels,
                           crop_max_pixels=taught_model.crop_max_pixels, max_crops=taught_model.max_crops,
                           max_new_tokens=200)
    trace = rollout(backend, image, config, source="photo.png")

    assert [t.role for t in trace.turns] == ["assistant", "tool", "assistant"]
    call, crop, final = trace.turns
    # Turn 1: the model asks for a crop, in view pixels.
    assert isinstance(call.parsed, ToolCall) and call.parsed.bbox == tuple(map(float, taught_model.call_box))
    # Turn 2: the crop tool cut it at native resolution: 640x480 photo, 112x84 view, so x scales by 640/112.
    assert crop.view_box == (28.0, 14.0, 84.0, 70.0)
    assert crop.original_box == (160, 80, 480, 400) and crop.crop_size == (112, 112)
    assert "pixels [160, 80, 480, 400]" in crop.text
    tool_message = trace.messages[3]
    assert tool_message["role"] == "tool" and tool_message["content"][0]["image"].size == (112, 112)
    # ... and the crop reached the model as an image: the second generation saw two images.
    assert len(seen) == 2
    assert seen[0]["image_grid_thw"].tolist() == [[1, 6, 8]]  # 84x112 view: 6x8 patches of 14 px
    assert seen[1]["image_grid_thw"].tolist() == [[1, 6, 8], [1, 8, 8]]
    assert seen[1]["pixel_values"].shape[0] == 6 * 8 + 8 * 8
    image_pad = backend.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((seen[1]["input_ids"] == image_pad).sum()) == (6 * 8 + 8 * 8) // 4
    # Turn 3: the answer, its defect box mapped back to original pixels.
    assert isinstance(final.parsed, Answer) and trace.outcome == "answer"
    assert trace.score == taught_model.score
    assert trace.defects_original() == [{"type": "blur", "bbox_view": [30, 20, 60, 50],
                                         "bbox_original": [171, 114, 343, 286]}]
    assert trace.cost.global_visual_tokens == 12 and trace.cost.crop_visual_tokens == [16]
    assert trace.cost.full_resolution_visual_tokens == (644 // 28) * (476 // 28)
    assert trace.cost.generated_tokens == call.completion_tokens + final.completion_tokens
    assert final.prompt_tokens > call.prompt_tokens + call.completion_tokens
    as_dict = trace.to_dict()
    assert as_dict["turns"][1]["bbox_original"] == [160, 80, 480, 400] and as_dict["score"] == 3.75


def test_random_tiny_model_ends_cleanly(tiny_model_dir: Path) -> None:
    backend = TransformersBackend(str(tiny_model_dir))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    trace = rollout(backend, image, RolloutConfig(global_max_pixels=56 * 56, max_new_tokens=16))
    assert trace.score is None and trace.outcome in ("parse_failure", "token_budget")
    assert isinstance(trace.failure, ParseFailure)
    assert trace.to_dict()["failure"]["kind"] in {k.value for k in FailureKind}


PHOTO = Image.new("RGB", (640, 480), "gray")
SMALL = RolloutConfig(global_max_pixels=112 * 112, crop_max_pixels=112 * 112, max_crops=2, max_new_tokens=100)
CROP = render_turn("look", render_tool_call([0, 0, 56, 56]))
ANSWER = render_turn("ok", render_answer(4.25))


def test_crop_budget_gets_one_refusal_then_ends() -> None:
    backend = Replay([CROP] * 4)
    trace = rollout(backend, PHOTO, SMALL)
    assert trace.outcome == "crop_budget" and trace.score is None
    tools = [t for t in trace.turns if t.role == "tool"]
    assert [t.original_box is not None for t in tools] == [True, True, False]
    assert "crop budget of 2 is used up" in tools[-1].text
    assert trace.cost.crop_visual_tokens == [16, 16]


def test_a_bad_box_is_a_tool_error_and_the_rollout_goes_on() -> None:
    backend = Replay([render_turn("x", render_tool_call([50, 50, 50, 90])), ANSWER])
    trace = rollout(backend, PHOTO, SMALL)
    assert trace.outcome == "answer" and trace.score == 4.25
    assert trace.turns[1].text.startswith("error:") and trace.turns[1].crop_size is None
    assert trace.messages[3]["content"] == [{"type": "text", "text": trace.turns[1].text}]


def test_an_answer_box_with_reversed_corners_maps_to_an_ordered_original_box() -> None:
    from qprobe.agent.protocol import Defect, format_failure

    text = render_turn("seen", render_answer(3.0, [Defect(bbox=(60, 50, 30, 20), type="blur")]))
    trace = rollout(Replay([text]), PHOTO, SMALL)  # 640x480 photo, 112x84 view: x and y scale by 40/7
    assert trace.outcome == "answer" and format_failure(text).kind is FailureKind.BAD_BOX
    assert trace.defects_original() == [{"type": "blur", "bbox_view": [60, 50, 30, 20],
                                         "bbox_original": [171, 114, 343, 286]}]


def test_token_budget_spans_all_turns() -> None:
    backend = Replay([CROP, CROP, CROP], finish="stop")
    trace = rollout(backend, PHOTO, RolloutConfig(global_max_pixels=112 * 112, max_crops=5, max_new_tokens=25))
    assert [budget for _, budget in backend.calls] == [25, 15, 5]
    assert trace.outcome == "token_budget" and trace.cost.generated_tokens == 25


def test_truncated_output_is_a_token_budget_outcome_with_its_failure() -> None:
    trace = rollout(Replay(['<think>hm</think><answer>{"score": 3'], finish="length"), PHOTO, SMALL)
    assert trace.outcome == "token_budget" and trace.failure is not None
    assert trace.failure.kind is FailureKind.UNCLOSED_TAG


@pytest.mark.parametrize("text", ["the photo is nice", '<answer>{"score": 9}</answer>'])
def test_out_of_protocol_answers_end_as_parse_failures(text: str) -> None:
    trace = rollout(Replay([text]), PHOTO, SMALL)
    assert trace.outcome == "parse_failure" and trace.score is None and len(trace.turns) == 1
