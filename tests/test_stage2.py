"""Stage 2: crops in tool turns through trl's collator, the loss mask, pixel budgets, and a real SFT run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from datasets import load_from_disk
from fixtures_train import bench_and_trajectories, repo_protocol
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from qprobe.errors import QProbeError
from qprobe.models.factory import load_model
from qprobe.train import stage2
from qprobe.train.common import check_pixel_budgets, row_images, stage_processor

BUDGET = 50176  # the trajectories stage's default budgets, global view and crops


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bench of 14 photos (2 in the val split) and its trajectories."""
    return bench_and_trajectories(tmp_path_factory.mktemp("data"), num_images=14, sft_size=6, rl_size=6,
                                  pristine_fraction=0.2)


@pytest.fixture(scope="module")
def high(data: Path) -> dict[str, Any]:
    """A high-resolution Probe-CoT row: crops in its tool turns."""
    return next(row for row in load_from_disk(str(data / "traj" / "sft")) if row["kind"] == "high")


def test_trl_collator_takes_crops_from_tool_turns_and_masks_all_but_assistant_turns(
        tiny_model_dir: Path, high: dict[str, Any]) -> None:
    images = row_images(high)
    assert len(images) >= 2 and high["images"] == []  # the global view and the crops, inline
    processor = stage_processor(tiny_model_dir)
    batch = DataCollatorForVisionLanguageModeling(processor=processor, assistant_only_loss=True)([high])
    # Every image, crops included, reaches the model at its own size: grid (t, h/14, w/14).
    sizes = [(int(w) * 14, int(h) * 14) for _, h, w in batch["image_grid_thw"].tolist()]
    assert sizes == [image.size for image in images]
    labels = batch["labels"][0]
    learned = processor.tokenizer.decode(batch["input_ids"][0][labels != -100])
    turns = [m["content"][0]["text"] for m in high["messages"] if m["role"] == "assistant"]
    assert learned == "".join(f"{t}<|im_end|>\n" for t in turns)


def test_kind_repeats(data: Path) -> None:
    sft = load_from_disk(str(data / "traj" / "sft"))
    kinds = list(sft["kind"])
    assert stage2.repeat_kinds(sft, {"low": 1, "high": 1}) is sft
    assert sorted(stage2.repeat_kinds(sft, {"low": 1, "high": 3})["kind"]) == sorted(kinds + ["high"] * 2 * kinds.count("high"))
    assert set(stage2.repeat_kinds(sft, {"low": 0, "high": 1})["kind"]) == {"high"}


def test_pixel_budgets_are_checked(data: Path) -> None:
    sft = load_from_disk(str(data / "traj" / "sft"))
    check_pixel_budgets(sft, BUDGET, BUDGET)
    with pytest.raises(QProbeError, match=r"crop \d .* over the stage's budget of 3136"):
        check_pixel_budgets(sft, BUDGET, 56 * 56)
    with pytest.raises(QProbeError, match="global view"):
        check_pixel_budgets(sft, 56 * 56, BUDGET)


@pytest.mark.slow
def test_sft_run_saves_and_checks_heldout(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    section = yaml.safe_load(Path("params.yaml").read_text())["stage2"]
    section.update(model=str(tiny_model_dir), dataset=str(data / "traj" / "sft"), heldout_bench=str(data / "bench"),
                   out=str(tmp_path / "model"), metrics=str(tmp_path / "m.json"),
                   output_dir=str(tmp_path / "checkpoints"), max_steps=3, warmup_steps=0, save_steps=2,
                   per_device_train_batch_size=2, heldout_samples=1, heldout_max_new_tokens=16, logging_steps=1)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"protocol": repo_protocol(), "stage2": section}))
    assert stage2.main(["--params", str(params)]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["global_step"] == 3 and metrics["heldout_samples"] == 1
    for key in ("format_adherence", "tool_call_rate", "rollout_adherence", "answer_first_rate",
                "format_adherence_low_res", "answer_first_rate_low_res"):
        assert 0 <= metrics[key] <= 1
    assert {"loss", "mean_token_accuracy", "train_loss"} <= set(metrics)
    load_model(tmp_path / "model", device="cpu")
    run = mlflow.search_runs(experiment_names=["qprobe"], output_format="list")[0]
    assert run.data.tags["qprobe.stage"] == "stage2"
    assert {"format_adherence", "tool_call_rate", "answer_first_rate_low_res", "loss"} <= set(run.data.metrics)
    assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {"model", "dataset", "heldout_bench", "stage2-model"}
