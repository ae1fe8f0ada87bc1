"""The tiny Qwen2.5-VL: a real architecture, a protocol tokenizer, trl-ready templates, one loading path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from qprobe.agent import protocol
from qprobe.defects import names
from qprobe.errors import QProbeError
from qprobe.models.factory import check_checkpoint, load_model, load_processor


def test_tiny_model_is_a_small_real_qwen2_5_vl(tiny_model_dir: Path) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, processor = load_model(tiny_model_dir)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration) and not model.training
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert (text.hidden_size, text.num_hidden_layers, model.config.vision_config.depth) == (128, 2, 2)
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert str(model.dtype) == "torch.float32" and model.device.type == "cpu"


def test_width_and_depth_are_configurable(tmp_path: Path) -> None:
    from qprobe.models.tiny import TinyModelConfig, build_tiny

    summary = build_tiny(tmp_path / "wide", seed=0, hidden_size=256, num_layers=3)
    text = load_model(tmp_path / "wide")[0].config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (256, 3, 8, 4)
    assert summary["parameters"] > 1_000_000
    with pytest.raises(ValueError, match="hidden_size 96 must be a multiple of 64"):
        TinyModelConfig(hidden_size=96)


def test_same_seed_same_bytes(tiny_model_dir: Path, tmp_path: Path) -> None:
    from qprobe.models.tiny import build_tiny

    build_tiny(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_the_answer_warmup_teaches_the_format_not_a_judgement(tiny_model_dir: Path) -> None:
    from qprobe.models.tiny import answer_warmup, warmup_conversation

    rng = random.Random(0)
    samples = [warmup_conversation(rng, 50176) for _ in range(200)]
    for prompt, answer in samples:
        view = prompt[1]["content"][0]["image"]
        assert view.width * view.height <= 50176 and protocol.format_ok(answer, view.size)
        assert "at about its native resolution" in prompt[1]["content"][1]["text"]  # stage 1's views
    scores = [protocol.parse_assistant(answer).score for _, answer in samples]
    assert min(scores) < 1.5 and max(scores) > 4.5  # random: nothing of any photo's quality
    model, processor = load_model(tiny_model_dir)
    losses = answer_warmup(model, processor, steps=30, seed=0)
    assert len(losses) == 30 and losses[-1] < losses[0] / 2 and not model.training


def test_tokenizer_makes_the_protocol_cheap(tiny_model_dir: Path) -> None:
    tokenizer = load_processor(tiny_model_dir).tokenizer
    for tag in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>", "<|im_start|>",
                "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|endoftext|>"):
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    for word in ("crop", "score", "defects", "arguments", *names()):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) <= 2, word
    turn = protocol.render_turn("The crop is clean.", protocol.render_tool_call([10, 20, 300, 400]))
    ids = tokenizer(turn + "<|im_end|>")["input_ids"]
    assert len(ids) < 50
    # The tags survive decoding without special tokens, as <tool_call> does in Qwen2.5.
    assert tokenizer.decode(ids, skip_special_tokens=True) == turn


def _conversation(image: Image.Image) -> list[dict]:
    call = protocol.render_turn("look", protocol.render_tool_call([1, 2, 30, 40]))
    answer = protocol.render_turn("fine", protocol.render_answer(3.5))
    return [*protocol.global_turn(image, (560, 840), 2), protocol.assistant_turn(call),
            protocol.tool_turn([{"type": "image", "image": image}, {"type": "text", "text": "Region"}]),
            protocol.assistant_turn(answer)]


def test_chat_template_renders_tool_turns_with_images(tiny_model_dir: Path) -> None:
    processor = load_processor(tiny_model_dir)
    text = processor.apply_chat_template(_conversation(Image.new("RGB", (56, 84))), tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are Q-Probe")
    tail = text[text.index("<|im_start|>user"):]
    assert tail == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>This is the global view of a photo, 56x84 "
        "pixels, downscaled 10.0x from the photo itself, 560x840. Rate its quality. You may crop up to 2 regions.<|im_end|>\n"
        "<|im_start|>assistant\n<think>look</think>\n<tool_call>{\"name\": \"crop\", \"arguments\": {\"bbox_2d\": "
        "[1, 2, 30, 40]}}</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>Region\n</tool_response>"
        "<|im_end|>\n"
        "<|im_start|>assistant\n<think>fine</think>\n<answer>{\"score\": 3.5, \"defects\": []}</answer><|im_end|>\n"
    )
    # trl's parsed form of the same turn (reasoning and tool_calls split off) renders to the same text.
    parsed_call = {"role": "assistant", "reasoning_content": "look", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "crop", "arguments": {"bbox_2d": [1, 2, 30, 40]}}}]}
    system_and_user = _conversation(Image.new("RGB", (56, 84)))[:2]
    assert (processor.apply_chat_template([*system_and_user, parsed_call], tokenize=False)
            == processor.apply_chat_template(_conversation(Image.new("RGB", (56, 84)))[:3], tokenize=False))
    # No system turn: Qwen2.5-VL's default; tools declared when the system turn does not already do so.
    bare = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         tools=[protocol.CROP_TOOL_SCHEMA], add_generation_prompt=True)
    assert bare.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools") and "<tools>" in bare
    assert bare.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    full = processor.apply_chat_template(system_and_user, tokenize=False, tools=[protocol.CROP_TOOL_SCHEMA])
    assert full.count("# Tools") == 1


def test_template_passes_trls_checks_for_tools_and_assistant_only_loss(tiny_model_dir: Path) -> None:
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
        is_chat_template_prefix_preserving,
        is_chat_template_stop_token_trained,
        parse_response,
        supports_tool_calling,
    )

    processor = load_processor(tiny_model_dir)
    assert supports_tool_calling(processor)  # GRPOTrainer with tools / environment_factory
    assert is_chat_template_prefix_preserving(processor)  # multi-turn tool rollouts
    assert has_generation_markers(processor.chat_template)  # SFT assistant_only_loss
    assert is_chat_template_stop_token_trained(processor)
    assert get_training_chat_template(processor) is None  # nothing for trl to patch
    tokenizer = processor.tokenizer
    prefix = tokenizer("<|im_start|>assistant\n")["input_ids"]
    turn = protocol.render_turn("look", protocol.render_tool_call([1, 2, 30, 40]))
    parsed = parse_response(tokenizer, tokenizer(turn + "<|im_end|>")["input_ids"], prefix=prefix)
    assert parsed["tool_calls"] == [{"type": "function", "function": {"name": "crop",
                                                                       "arguments": {"bbox_2d": [1, 2, 30, 40]}}}]
    assert protocol.message_text(parsed) == turn
    answer = protocol.render_turn("fine", protocol.render_answer(2.5))
    parsed = parse_response(tokenizer, tokenizer(answer + "<|im_end|>")["input_ids"], prefix=prefix)
    assert protocol.message_text(parsed) == answer


def test_trl_sft_collator_masks_all_but_the_assistant_turns(tiny_model_dir: Path) -> None:
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    processor = load_processor(tiny_model_dir)
    collator = DataCollatorForVisionLanguageModeling(processor=processor, assistant_only_loss=True)
    batch = collator([{"messages": _conversation(Image.new("RGB", (56, 84), "red")), "images": []}])
    assert batch["image_grid_thw"].shape[0] == 2  # the global view and the crop in the tool turn
    learned = processor.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    assert learned == (protocol.render_turn("look", protocol.render_tool_call([1, 2, 30, 40])) + "<|im_end|>\n"
                       + protocol.render_turn("fine", protocol.render_answer(3.5)) + "<|im_end|>\n")


def test_auto_processor_loads_the_image_only_processor(tiny_model_dir: Path) -> None:
    from transformers import AutoProcessor

    from qprobe.models.processor import QProbeProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert type(processor) is QProbeProcessor
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"


def _write(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


@pytest.mark.parametrize(("files", "message"), [
    ({}, "no config.json"),
    ({"config.json": "{not json"}, "not valid JSON"),
    ({"config.json": json.dumps({"model_type": "bert"})}, "model_type 'bert'"),
    ({"config.json": json.dumps({"model_type": "qwen2_5_vl"})}, "no weights"),
    ({"config.json": json.dumps({"model_type": "qwen2_5_vl"}), "model.safetensors": ""}, "without a tokenizer"),
])
def test_not_a_checkpoint_is_one_clear_line(tmp_path: Path, files: dict[str, str], message: str) -> None:
    folder = _write(tmp_path / "ckpt", files)
    with pytest.raises(QProbeError, match=message) as info:
        load_model(folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_missing_folder_and_plain_file(tmp_path: Path) -> None:
    with pytest.raises(QProbeError, match="no such model folder"):
        check_checkpoint(tmp_path / "nothing")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(QProbeError, match="not a folder"):
        check_checkpoint(tmp_path / "file.bin")


def test_init_tiny_command_reads_the_model_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from qprobe.cli import main

    (tmp_path / "params.yaml").write_text("model:\n  out: models/base\n  seed: 3\n  vocab_size: 600\n")
    monkeypatch.chdir(tmp_path)
    assert main(["model", "init-tiny"]) == 0
    assert "parameters" in capsys.readouterr().out
    model, processor = load_model(tmp_path / "models" / "base")
    assert len(processor.tokenizer) <= 600 and model.config.text_config.vocab_size == len(processor.tokenizer)
    assert not [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no staging left
