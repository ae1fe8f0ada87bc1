"""Stage 3: multi-turn crop-tool rollouts through trl's GRPOTrainer, the decoupled and joint rewards, a real run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import pytest
import yaml
from datasets import Dataset, Features, Image, List, Value
from fixtures_train import KilledAfterStep2, latest_run, repo_protocol
from trl.trainer.utils import get_callable_name

from qprobe.agent import protocol
from qprobe.agent.crop import CropTool, global_view
from qprobe.agent.protocol_config import LIMITS_FILE, ProtocolLimits
from qprobe.config import parse_config
from qprobe.errors import QProbeError
from qprobe.io import load_image
from qprobe.models.factory import load_model
from qprobe.train import common, stage3
from qprobe.train.common import stage_processor

ROOT = Path(__file__).resolve().parents[1]

RL_FEATURES = Features({
    "id": Value("string"), "source": Value("string"), "split": Value("string"),
    "prompt": List({"role": Value("string"), "name": Value("string"),
                    "content": List({"type": Value("string"), "text": Value("string")})}),
    "images": List(Image()), "mos": Value("float64"), "mos_std": Value("float64"), "has_defect": Value("bool"),
    "defects": List({"type": Value("string"), "severity": Value("int64"), "bbox": List(Value("int64"))}),
    "original": Value("string"), "width": Value("int64"), "height": Value("int64"),
})


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Any:
    """`qprobe train stage3` sets torch's thread count (torch_threads); in a test it must not outlive the test."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def taught_set(taught_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Probe-RL set on the taught model's photo, laid out as `qprobe trajectories` writes it (4 rows)."""
    image = load_image(taught_model.image_path)
    view, _ = global_view(image, taught_model.global_max_pixels)
    prompt = [{"role": m["role"], "name": None,
               "content": [{"type": b["type"], "text": b.get("text")} for b in m["content"]]}
              for m in protocol.global_turn(view, image.size, taught_model.max_crops)]
    rows = [{"id": f"photo-{i}", "source": "photo", "split": "train", "prompt": prompt, "images": [view],
             "mos": mos, "mos_std": 0.5, "has_defect": True,
             "defects": [{"type": "blur", "severity": 3, "bbox": [171, 91, 343, 263]}],
             "original": str(taught_model.image_path), "width": image.width, "height": image.height}
            for i, mos in enumerate([3.75, 2.0, 4.5, 3.0])]
    out = tmp_path_factory.mktemp("rl") / "rl"
    Dataset.from_list(rows, features=RL_FEATURES).save_to_disk(str(out))
    return out


def section(**overrides: Any) -> dict[str, Any]:
    values = dict(yaml.safe_load((ROOT / "params.yaml").read_text())["stage3"])
    values.update(overrides)
    return values


def write_params(tmp: Path, overrides: dict[str, Any]) -> Path:
    """The embedded default's protocol and stage3 sections, ``overrides`` applied: a protocol limit to the first."""
    limits = {f.name for f in dataclasses.fields(ProtocolLimits)}
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({
        "protocol": {**repo_protocol(), **{k: v for k, v in overrides.items() if k in limits}},
        "stage3": section(**{k: v for k, v in overrides.items() if k not in limits})}))
    return params


def config(tmp: Path, **overrides: Any) -> stage3.Stage3Config:
    return parse_config(stage3.Stage3Config, "stage3", ["--params", str(write_params(tmp, overrides))])


def taught_overrides(taught_model: Any, dataset: Path, tmp: Path) -> dict[str, Any]:
    """The embedded default on the taught model, its photo and budgets, shrunk to seconds; near-greedy."""
    return {"model": str(taught_model.path), "dataset": str(dataset), "out": str(tmp / "model"),
            "metrics": str(tmp / "m.json"), "output_dir": str(tmp / "checkpoints"),
            "global_max_pixels": taught_model.global_max_pixels, "crop_max_pixels": taught_model.crop_max_pixels,
            "max_crops": taught_model.max_crops, "num_generations": 2, "per_device_train_batch_size": 2,
            "max_completion_length": 400, "top_k": 1, "max_steps": 2, "save_steps": 1}


# ---------------------------------------------------------------------------------------------------
# The rollout path, on trl's real GRPOTrainer


def test_crop_reaches_the_model_and_tool_turns_are_masked(tmp_path: Path, taught_model: Any,
                                                          taught_set: Path) -> None:
    import torch

    cfg = config(tmp_path, **taught_overrides(taught_model, taught_set, tmp_path))
    torch.set_num_threads(cfg.torch_threads)  # as `qprobe train stage3` does
    processor = stage_processor(taught_model.path)
    report = stage3.RolloutReport(cfg, stop_ids=[processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id])
    seen: dict[str, Any] = {}
    record = report.record

    def spy(prompts: Any, completions: Any, format_rewards: Any, **kwargs: Any) -> None:
        seen.update(completions=completions, format_rewards=format_rewards, **kwargs)
        record(prompts, completions, format_rewards, **kwargs)

    report.record = spy  # what R_format (and the report) get from trl

    trainer = stage3.GRPOStageTrainer(model=str(taught_model.path), args=cfg,
                                 reward_funcs=stage3.reward_functions(cfg, report),
                                 train_dataset=Dataset.load_from_disk(str(taught_set)), processing_class=processor,
                                 environment_factory=stage3.crop_environment(cfg))
    generations: list[Any] = []
    generate = trainer._generate_single_turn

    def record_generation(prompt_ids: Any, images: Any, multimodal_fields: Any, *args: Any, **kwargs: Any) -> Any:
        generations.append({"images": images, "fields": multimodal_fields})
        return generate(prompt_ids, images, multimodal_fields, *args, **kwargs)

    trainer._generate_single_turn = record_generation
    trainer.model.train()  # as in a training step: its metrics go to the "train" logs
    rows = [trainer.train_dataset[0]] * 2  # one prompt, K = 2 rollouts, as trl's sampler repeats it
    out = trainer._generate_and_score_completions(rows)

    # Turn 1 saw the global view; turn 2 each rollout's global view *and its crop*, as pixels.
    assert len(generations) >= 2
    assert [len(images) for images in generations[0]["images"]] == [1, 1]
    assert [len(images) for images in generations[1]["images"]] == [2, 2]
    view, crop = generations[1]["images"][0]
    assert view.size == (112, 84) and crop.size == (112, 112)
    assert generations[1]["fields"]["image_grid_thw"].tolist() == [[1, 6, 8], [1, 8, 8]] * 2

    # The reward saw the whole rollout: call, crop, answer; and each rollout's crop tool with its record.
    for completion, env in zip(seen["completions"], seen["environments"], strict=True):
        assert [m["role"] for m in completion] == ["assistant", "tool", "assistant"]
        assert env.calls[0].view_box == tuple(map(float, taught_model.call_box))
        assert env.calls[0].original_box == (160, 80, 480, 400)
        answer = stage3.final_answer(completion)
        assert answer is not None and answer.score == taught_model.score
        assert [d.bbox for d in answer.defects] == [tuple(map(float, taught_model.defect_box))]

    # Only the model's own tokens are learned: tool_mask zeroes exactly the tool turn, crop tokens included.
    tokenizer = processor.tokenizer
    ids, learned = out["completion_ids"][0], out["completion_mask"][0] * out["tool_mask"][0]
    masked = tokenizer.decode(ids[(learned == 0) & (out["completion_mask"][0] == 1)])
    assert masked.startswith("\n<|im_start|>user\n<tool_response>\n<|vision_start|>")
    assert masked.count("<|image_pad|>") == 8 * 8 // 4
    assert masked.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(ids[learned == 1]).count("<|im_end|>") == 2  # both assistant turns, their ends
    assert "<tool_call>" in tokenizer.decode(ids[learned == 1]) and "<answer>" in tokenizer.decode(ids[learned == 1])
    assert out["num_images"] == [2, 2]

    # What the step logs: one call per rollout, none failed, a crop of a third of the photo, no truncation.
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["rollouts/tool_calls_per_rollout"] == 1.0 and logged["tools/call_frequency"] == 1.0
    assert logged["rollouts/tool_failure_rate"] == 0.0 and logged["rollouts/truncation_rate"] == 0.0
    assert logged["rollouts/crop_area"] == pytest.approx(320 * 320 / (640 * 480))
    assert logged["rewards/format_reward/mean"] == 1.0 and logged["rewards/localization/mean"] > 0


# ---------------------------------------------------------------------------------------------------
# One scripted model through both loops: inference's rollout and trl's tool loop agree turn for turn


def scripted_turns(last: str) -> list[str]:
    """Four crops (the 4th past a budget of 3, so refused), then ``last``: an answer, or a call after the refusal."""
    boxes = [[0, 0, 56, 56], [56, 28, 112, 84], [10, 10, 20, 20], [28, 0, 84, 56]]
    crops = [protocol.render_turn(f"look {i}", protocol.render_tool_call(box)) for i, box in enumerate(boxes)]
    if last == "answer":
        return [*crops, protocol.render_turn("soft", protocol.render_answer(3.25, [protocol.Defect((30, 20, 60, 50),
                                                                                                  "blur")]))]
    return [*crops, protocol.render_turn("again", protocol.render_tool_call([0, 0, 28, 28]))]


def test_a_scripted_model_takes_the_same_turns_in_the_rollout_loop_and_in_trls_tool_loop(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    import numpy as np
    from fixtures_eval import Replay
    from PIL import Image as PILImage

    from qprobe.agent.rollout import RolloutConfig, rollout

    photo = PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    budget = 112 * 112  # 112x84 view of the 640x480 photo; crops of at most 112x112
    cfg = config(tmp_path, model=str(tiny_model_dir), out=str(tmp_path / "model"), output_dir=str(tmp_path / "ckpt"),
                 global_max_pixels=budget, crop_max_pixels=budget, max_crops=3, num_generations=2,
                 per_device_train_batch_size=2, max_completion_length=1000, max_steps=1)
    view, _ = global_view(photo, budget)
    prompt = [{"role": m["role"], "name": None,
               "content": [{"type": b["type"], "text": b.get("text")} for b in m["content"]]}
              for m in protocol.global_turn(view, photo.size, cfg.protocol.max_crops)]
    row = {"id": "photo", "source": "photo", "split": "train", "prompt": prompt, "images": [view], "mos": 3.0,
           "mos_std": 0.5, "has_defect": True, "defects": [{"type": "blur", "severity": 3, "bbox": [171, 114, 343, 286]}],
           "original": str(tmp_path / "photo.png"), "width": 640, "height": 480}
    dataset = Dataset.from_list([row], features=RL_FEATURES)
    processor = stage_processor(tiny_model_dir)
    tokenizer = processor.tokenizer
    trainer = stage3.GRPOStageTrainer(model=str(tiny_model_dir), args=cfg, reward_funcs=stage3.reward_functions(cfg),
                                      train_dataset=dataset, processing_class=processor,
                                      environment_factory=stage3.crop_environment(cfg))

    # The two rollouts of the prompt follow one script each; trl calls generate once per turn for both.
    scripts = [scripted_turns("answer"), scripted_turns("call")]
    trl_prompts: list[list[int]] = []

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def generate(prompt_ids: Any, images: Any, fields: Any, *args: Any, **kwargs: Any) -> Any:
        turn = len(trl_prompts)
        trl_prompts.append(list(prompt_ids[0]))
        return [[*tokenizer.encode(script[turn], add_special_tokens=False), end] for script in scripts], None

    seen: dict[str, Any] = {}
    tool_loop = trainer._tool_call_loop

    def spy(*args: Any) -> Any:
        out = tool_loop(*args)
        seen["completions"] = out[1]
        return out

    trainer._generate_single_turn, trainer._tool_call_loop = generate, spy
    trainer._generate_and_score_completions([dataset[0]] * 2)

    outcomes = []
    for script, completion, env in zip(scripts, seen["completions"], trainer.environments, strict=True):
        backend = Replay(script)
        trace = rollout(backend, photo, RolloutConfig(global_max_pixels=budget, crop_max_pixels=budget,
                                                      max_crops=cfg.protocol.max_crops, max_new_tokens=1000))
        # Turn for turn: the same roles, the same parsed assistant turns, the same tool results.
        assert [m["role"] for m in completion] == [t.role for t in trace.turns]
        for message, turn in zip(completion, trace.turns, strict=True):
            if turn.role == "assistant":
                assert protocol.parse_assistant(protocol.message_text(message)) == turn.parsed
            else:
                blocks = message["content"]
                assert "".join(b["text"] for b in blocks if b["type"] == "text") == turn.text
                assert next((b["image"].size for b in blocks if b["type"] == "image"), None) == turn.crop_size
        # The same crops in original pixels, and the same final answer.
        assert [c.original_box for c in env.calls] == [c.original_box for c in trace.tool.calls]
        assert stage3.final_answer(completion) == trace.answer
        outcomes.append((trace.outcome, len(trace.turns), [t.text[:30] for t in trace.turns if t.role == "tool"][-1]))
        # Each generation saw the same conversation: trl's token ids are the template's rendering of the loop's.
        if script is scripts[0]:
            assert [processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[0]
                    for messages, _ in backend.calls] == trl_prompts

    # Three crops, a refusal, then the answer; or, asked again after the refusal, the end without one.
    refusal = "error: the crop budget of 3 is"
    assert outcomes == [("answer", 9, refusal), ("crop_budget", 9, refusal)]
    # The 3rd box, [10, 10, 20, 20], is grown to one merged patch, [1, 1, 29, 29], then mapped by 40/7.
    assert trace.crops_original()[2] == (5, 5, 166, 166)


# ---------------------------------------------------------------------------------------------------
# The reward on hand-made rollouts: decoupled against joint, by hand


def call(box: list[int]) -> dict[str, Any]:
    """An assistant turn that calls the crop tool, as trl's response parser hands it to the rewards."""
    return {"role": "assistant", "reasoning_content": "Check this region.", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "crop", "arguments": {"bbox_2d": box}}}]}


def answer(score: float, box: list[int]) -> dict[str, Any]:
    return {"role": "assistant", "reasoning_content": "Soft against its context.",
            "content": protocol.render_answer(score, [protocol.Defect(tuple(box), "blur")])}


@pytest.fixture
def hand_made(tmp_path: Path) -> dict[str, Any]:
    """Three rollouts on a 224x224 photo (its global view at 50176 pixels is the photo: boxes need no mapping).

    MOS 3, one blur defect at [50, 0, 150, 100]; every answer scores 3.5 and boxes [0, 0, 100, 100]:
    R_acc = exp(-0.5) = 0.60653, R_loc = IoU = 5000 / 15000 = 1/3.

    * ``good``: a crop of [0, 0, 112, 112], then the answer: R_format 1;
    * ``bad_box``: a crop outside the view (the tool answers ``error: ...``), then the same answer: R_format 0;
    * ``unanswered``: a crop of [0, 0, 224, 112], then another call that never ran (out of turns): no answer.
    """
    from PIL import Image as PILImage

    photo = PILImage.new("RGB", (224, 224), (120, 90, 60))
    envs = [CropTool(photo, global_max_pixels=50176, crop_max_pixels=50176, max_calls=3) for _ in range(3)]
    tool = {"role": "tool", "name": "crop"}
    completions = [
        [call([0, 0, 112, 112]), {**tool, "content": envs[0].crop([0, 0, 112, 112])}, answer(3.5, [0, 0, 100, 100])],
        [call([300, 300, 400, 400]), {**tool, "content": envs[1].crop([300, 300, 400, 400])},
         answer(3.5, [0, 0, 100, 100])],
        [call([0, 0, 224, 112]), {**tool, "content": envs[2].crop([0, 0, 224, 112])}, call([0, 0, 50, 50])],
    ]
    end = 497  # <|im_end|>: every turn ended by itself
    columns = {"mos": [3.0] * 3, "has_defect": [True] * 3, "width": [224] * 3, "height": [224] * 3,
               "defects": [[{"type": "blur", "severity": 3, "bbox": [50, 0, 150, 100]}]] * 3,
               "completion_ids": [[1, end]] * 3, "environments": envs}
    return {"completions": completions, "columns": columns, "cfg": config(tmp_path)}


ACC, LOC = math.exp(-0.5), 1 / 3


def test_decoupled_reward_by_hand(hand_made: dict[str, Any]) -> None:
    cfg = hand_made["cfg"]
    assert cfg.reward_mode == "decoupled" and cfg.rewards == {"accuracy": 1.0, "localization": 0.5, "format": 0.5}
    funcs = stage3.reward_functions(cfg)
    values = {get_callable_name(f): f([None] * 3, hand_made["completions"], **hand_made["columns"]) for f in funcs}
    assert values["accuracy"] == pytest.approx([ACC, ACC, 0.0])
    assert values["localization"] == pytest.approx([LOC, LOC, 0.0])
    # The bad box costs the format reward; so does the unanswered call.
    assert values["format_reward"] == [1.0, 0.0, 0.0]
    total = [sum(w * v for w, v in zip(cfg.reward_weights, column, strict=True))
             for column in zip(*values.values(), strict=True)]
    assert total == pytest.approx([ACC + 0.5 * LOC + 0.5, ACC + 0.5 * LOC, 0.0])
    assert total == pytest.approx([1.27320, 0.77320, 0.0], abs=1e-5)


def test_joint_reward_by_hand(hand_made: dict[str, Any], tmp_path: Path) -> None:
    cfg = config(tmp_path, reward_mode="joint")
    funcs = stage3.reward_functions(cfg)
    assert cfg.reward_weights == [1.0] and len(funcs) == 1
    logged: dict[str, float] = {}
    values = funcs[0]([None] * 3, hand_made["completions"], log_metric=logged.__setitem__, **hand_made["columns"])
    # R_acc (1 + R_loc) R_format: the bad box's accurate score and found defect earn nothing at all.
    assert values == pytest.approx([ACC * (1 + LOC), 0.0, 0.0])
    assert values[0] == pytest.approx(0.80871, abs=1e-5)
    assert logged["rewards/accuracy/mean"] == pytest.approx(2 * ACC / 3)
    assert logged["rewards/localization/mean"] == pytest.approx(2 * LOC / 3)
    assert logged["rewards/format_reward/mean"] == pytest.approx(1 / 3)


def test_report_counts_calls_failures_crops_and_truncation(hand_made: dict[str, Any]) -> None:
    report = stage3.RolloutReport(hand_made["cfg"], stop_ids=[497, 0])
    logged: dict[str, float] = {}
    (format_reward,) = [f for f in stage3.reward_functions(hand_made["cfg"], report)
                        if get_callable_name(f) == "format_reward"]
    format_reward([None] * 3, hand_made["completions"], log_metric=logged.__setitem__, **hand_made["columns"])
    rates = {"tool_calls_per_rollout": 1.0, "tool_failure_rate": 1 / 3, "truncation_rate": 1 / 3,
             "crop_area": (0.25 + 0.5) / 2}
    # One step whose three rollouts (one group: K = 4 in the default) earn R = 1.27, 0.77 and 0: a signal.
    assert logged == pytest.approx({**{f"rollouts/{k}": v for k, v in rates.items()}, "rollouts/signal": 1.0})
    assert report.summary() == pytest.approx({"rollouts": 3, **rates, "signal_steps": 1.0,
                                              "format_first_quarter": 1 / 3, "format_last_quarter": 1 / 3,
                                              "tool_calls_first_quarter": 1.0, "tool_calls_last_quarter": 1.0})
    facts = stage3.RolloutFacts.read(hand_made["completions"][0], None, [1, 2], frozenset({497, 0}))
    assert facts.truncated  # out of tokens: the last token is no end of turn


def test_report_finds_the_steps_with_a_signal_and_the_format_rewards_first_and_last_quarter(
        hand_made: dict[str, Any]) -> None:
    report = stage3.RolloutReport(hand_made["cfg"], stop_ids=[497, 0])
    (format_reward,) = [f for f in stage3.reward_functions(hand_made["cfg"], report)
                        if get_callable_name(f) == "format_reward"]
    completions, columns = hand_made["completions"], hand_made["columns"]
    # Steps 1-2: three rollouts that stop at their first call, unanswered: no crop, R = 0 each, no gradient;
    # steps 3-4: the three of hand_made.
    silent = {k: [v[2]] * 3 for k, v in columns.items()}
    for step in range(4):
        batch, cols = ([completions[2][:1]] * 3, silent) if step < 2 else (completions, columns)
        format_reward([None] * 3, batch, trainer_state=SimpleNamespace(global_step=step), **cols)
    summary = report.summary()
    assert summary["signal_steps"] == 0.5
    assert (summary["format_first_quarter"], summary["format_last_quarter"]) == pytest.approx((0.0, 1 / 3))
    assert (summary["tool_calls_first_quarter"], summary["tool_calls_last_quarter"]) == (0.0, 1.0)


def test_sampling_never_draws_a_vision_token(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = config(tmp_path, generation_kwargs={"min_p": 0.05})
    tokenizer = stage_processor(tiny_model_dir).tokenizer
    common.suppress_vision_tokens(cfg, tokenizer)
    vision = {tokenizer.convert_tokens_to_ids(t) for t in common.VISION_TOKENS}
    assert len(vision) == 5 and set(cfg.generation_kwargs["suppress_tokens"]) == vision
    assert cfg.generation_kwargs["min_p"] == 0.05  # the section's own generation settings stay


def test_group_signal_and_quarter_means() -> None:
    assert not stage3.group_signal([1.0, 1.0, 0.0, 0.0], num_generations=2)  # each group agrees
    assert stage3.group_signal([1.0, 1.0, 0.0, 0.5], num_generations=2)
    assert stage3.quarter_means([0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0]) == (0.0, 1.0)
    assert stage3.quarter_means([0.0, 1.0, 1.0]) == (0.0, 1.0)  # fewer than 4 steps: one step each
    assert stage3.quarter_means([0.25]) == (0.25, 0.25)


# ---------------------------------------------------------------------------------------------------
# Configuration


def test_params_sections_parse(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert cfg.use_cpu and not cfg.bf16 and cfg.resume == "auto" and not cfg.use_vllm
    assert cfg.model == "models/stage2" and cfg.dataset == "data/trajectories/rl"
    assert cfg.protocol == ProtocolLimits(**repo_protocol())
    assert cfg.max_tool_calling_iterations == cfg.protocol.max_crops + 1 and not cfg.log_completions

    paper_file = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    params = tmp_path / "paper.yaml"
    params.write_text(yaml.safe_dump({"protocol": {**repo_protocol(), **paper_file["protocol"]},
                                      "stage3": {**section(), **paper_file["stage3"], "use_cpu": True}}))  # no GPU here
    cfg = parse_config(stage3.Stage3Config, "stage3", ["--params", str(params)])
    assert cfg.use_vllm and cfg.vllm_mode == "server" and cfg.bf16 and cfg.reward_mode == "decoupled"
    assert cfg.protocol.global_max_pixels == cfg.protocol.crop_max_pixels == 1003520
    assert cfg.max_completion_length >= cfg.protocol.max_crops * 1280  # every crop's tokens fit


@pytest.mark.parametrize(("change", "message"), [
    ({"reward_mode": "both"}, "reward_mode must be one of"),
    ({"rewards": {"accuracy": 1.0, "thurstone": 1.0, "format": 1.0}}, "not 'thurstone'"),
    ({"rewards": {"accuracy": 1.0}}, "needs 'format'"),
    ({"reward_mode": "joint", "rewards": {"accuracy": 1.0, "format": 1.0}}, "needs 'localization'"),
    ({"max_tool_calling_iterations": 9}, "set max_crops"),
    ({"log_completions": True}, "crashes on the crop images"),
    ({"use_vllm": True, "vllm_mode": "colocate"}, "vllm_mode: server"),
    ({"reward_options": {"accuracy": {"sigma": 1}}}, "unknown option 'sigma'"),
])
def test_bad_configs_fail_clearly(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(QProbeError, match=message):  # a ConfigError naming the file and section, or the registry's
        config(tmp_path, **change)


def test_dvc_stage() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stage = stages["stage3"]
    assert stage["cmd"] == "qprobe train stage3" and stage["params"] == ["protocol", "stage3"]
    assert {"models/stage2", "data/trajectories/rl", "data/bench", "qprobe/train/stage3.py", "qprobe/train/common.py",
            "qprobe/rewards.py", "qprobe/reward_math.py", "qprobe/agent/crop.py", "qprobe/agent/protocol.py",
            "qprobe/agent/chat_template.jinja"} <= set(stage["deps"])
    assert all((ROOT / dep).exists() for dep in stage["deps"] if dep.startswith("qprobe"))
    assert stage["outs"] == ["models/stage3"]
    assert stage["plots"] == [{"metrics/stage3_curves.csv": {"cache": False, "title": "stage3 loss", "x": "step",
                                                             "y": "loss"}}]
    assert stage["metrics"] == [{"metrics/stage3.json": {"cache": False}}]
    assert {"models/stage3", "metrics/stage3_curves.csv"} <= set(stages["evaluate"]["deps"])


def test_prompts_must_state_the_stage_budgets(tmp_path: Path, taught_model: Any, taught_set: Path) -> None:
    cfg = config(tmp_path, **taught_overrides(taught_model, taught_set, tmp_path))
    dataset = Dataset.load_from_disk(str(taught_set))
    stage3.check_prompts(dataset, cfg)
    with pytest.raises(QProbeError, match="You may crop up to 3 regions"):
        stage3.check_prompts(dataset, config(tmp_path, **{**taught_overrides(taught_model, taught_set, tmp_path),
                                                          "max_crops": 3}))
    assert stage3.originals_folder(dataset) == str(taught_model.image_path.parent)


# ---------------------------------------------------------------------------------------------------
# A real run: `qprobe train stage3` through trl's GRPOTrainer, MLflow, checkpoints and resume


def run(tmp: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    assert stage3.main(["--params", str(write_params(tmp, overrides))]) == 0
    return json.loads((tmp / "m.json").read_text())


@pytest.mark.slow
def test_grpo_run_calls_the_tool_logs_and_resumes(tmp_path: Path, taught_model: Any, taught_set: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = {**taught_overrides(taught_model, taught_set, tmp_path), "max_steps": 3}
    with monkeypatch.context() as patch:
        patch.setattr(common, "MlflowLogCallback", KilledAfterStep2)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, overrides)
    killed = latest_run()
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    client = mlflow.MlflowClient()
    history = client.get_metric_history(killed.info.run_id, "rollouts/tool_calls_per_rollout")
    assert [m.step for m in history] == [1, 2] and all(m.value > 0 for m in history)
    samples = [json.loads(line) for line in mlflow.artifacts.load_text(
        f"runs:/{killed.info.run_id}/rollouts/step-000001.jsonl").splitlines()]
    assert len(samples) == 2 and samples[0]["step"] == 1
    assert [t["role"] for t in samples[0]["turns"]] == ["assistant", "tool", "assistant"]
    assert samples[0]["turns"][1]["crop"] == [112, 112] and samples[0]["crops"][0]["original_box"] == [160, 80, 480, 400]
    assert set(samples[0]["rewards"]) == {"accuracy", "localization", "format"} and samples[0]["reward"] > 0

    # The rerun continues from checkpoint-2, finishes, and saves.
    metrics = run(tmp_path, overrides)
    resumed = latest_run()
    assert resumed.data.tags["qprobe.stage"] == "stage3"
    assert resumed.data.tags["qprobe.resumed_from"] == str(run_dir / "checkpoint-2")
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "rollouts/tool_calls_per_rollout")] == [3]
    assert metrics["global_step"] == 3
    # The metrics file: the run's figures over all its rollouts (2 here, since the resume), and the last step's.
    assert metrics["rollouts"] == 2 and metrics["tool_calls_per_rollout"] > 0 and metrics["tools/call_frequency"] > 0
    assert {"rewards/accuracy/mean", "rewards/localization/mean", "rewards/format_reward/mean", "reward",
            "tool_failure_rate", "truncation_rate", "crop_area", "completions/mean_length", "kl"} <= set(metrics)
    assert resumed.data.metrics["tool_calls_per_rollout"] == metrics["tool_calls_per_rollout"]
    assert {d.dataset.name for d in resumed.inputs.dataset_inputs} >= {"model", "dataset", "originals", "stage3-model"}
    load_model(tmp_path / "model", device="cpu")
    recorded = json.loads((tmp_path / "model" / LIMITS_FILE).read_text())  # what score and evaluate check
    assert recorded["global_max_pixels"] == taught_model.global_max_pixels and recorded["max_crops"] == 2

    # The joint ablation: one coupled reward for trl, the components still logged under the same names.
    metrics = run(tmp_path, {**overrides, "reward_mode": "joint", "max_steps": 1})
    assert metrics["rewards/joint_reward/mean"] > 0 and metrics["tool_calls_per_rollout"] > 0
    assert {"rewards/accuracy/mean", "rewards/localization/mean", "rewards/format_reward/mean"} <= set(metrics)


def test_the_tool_loop_gets_image_fields_trl_can_split(tiny_model_dir: Path) -> None:
    """trl merges the processor's output of each prompt (numpy) into lists; its tool loop, for a turn
    whose crops all failed, splits them per sample as tensors. After tensor_image_fields it can."""
    from PIL import Image
    from transformers import AutoProcessor
    from trl.trainer.utils import split_pixel_values_by_grid

    from qprobe.train.trainers import tensor_image_fields

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    merged: dict[str, list] = {}
    sizes = [(224, 168), (112, 112)]
    for size in sizes:  # as trl's _tokenize_prompts does with environment_factory
        prompt = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", size)},
                                               {"type": "text", "text": "score it"}]}]
        out = processor.apply_chat_template(conversation=[prompt], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)
        for key, value in out.items():
            if key not in ("input_ids", "attention_mask"):
                merged.setdefault(key, []).append(value)
    fields = {k: [row for v in values for row in v] for k, values in merged.items()}
    with pytest.raises(AttributeError):
        split_pixel_values_by_grid({**fields, "num_images": [1, 1]})
    split = split_pixel_values_by_grid({**tensor_image_fields(fields), "num_images": [1, 1]})
    grids = [g.tolist() for g in split["image_grid_thw"]]
    assert len(grids) == 2 and grids[0] != grids[1]
    assert [p.shape[0] for p in split["pixel_values"]] == [t * h * w for [[t, h, w]] in grids]
