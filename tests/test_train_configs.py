"""Training configs: accelerate / DeepSpeed files, the stage sections of both profiles, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from fixtures_train import repo_protocol

from qprobe.agent.protocol_config import ProtocolLimits, write_limits
from qprobe.config import ConfigError, parse_config
from qprobe.errors import QProbeError
from qprobe.train.stage1 import Stage1Config
from qprobe.train.stage2 import Stage2Config

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"stage1": Stage1Config, "stage2": Stage2Config}


@pytest.mark.parametrize("name", ["single_process", "ddp", "zero2", "zero3"])
def test_accelerate_configs_parse(name: str) -> None:
    config = load_config_from_file(str(ROOT / "infra" / "accelerate" / f"{name}.yaml"))
    ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if name.startswith("zero"):
        assert config.distributed_type == "DEEPSPEED" and (ROOT / ds_file).is_file()
    else:
        assert ds_file is None


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_parse(stage: int) -> None:
    config = json.loads((ROOT / "infra" / "deepspeed" / f"zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    if stage == 3:  # the stages' final save needs the gathered 16-bit weights, not ZeRO shards
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def section(profile: str, stage: str) -> dict[str, Any]:
    """A stage's params under a profile: params.yaml, with configs/PROFILE.yaml merged over it."""
    values = dict(yaml.safe_load((ROOT / "params.yaml").read_text())[stage])
    if profile != "default":
        values.update(yaml.safe_load((ROOT / "configs" / f"{profile}.yaml").read_text()).get(stage) or {})
    return values


def parse(tmp_path: Path, stage: str, values: dict[str, Any], *flags: str) -> Any:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"protocol": repo_protocol(), stage: values}))
    return parse_config(STAGES[stage], stage, ["--params", str(params), *flags])


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_embedded_default_parses(tmp_path: Path, stage: str) -> None:
    cfg = parse(tmp_path, stage, section("default", stage))
    assert cfg.use_cpu and not cfg.bf16 and cfg.resume == "auto" and cfg.report_to == []
    assert cfg.view_max_pixels == repo_protocol()["low_res_max_pixels" if stage == "stage1" else "global_max_pixels"]


def test_paper_profile_parses(tmp_path: Path) -> None:
    # This machine has no GPU: parse the paper values on the CPU, everything else as written.
    s1 = parse(tmp_path, "stage1", {**section("paper", "stage1"), "use_cpu": True})
    assert s1.model == "Qwen/Qwen2.5-VL-7B-Instruct" and s1.num_generations == 6
    assert s1.learning_rate == 1e-6 and s1.beta == 0.04 and s1.bf16
    assert s1.per_device_train_batch_size * s1.steps_per_generation // s1.num_generations >= 2
    s2 = parse(tmp_path, "stage2", {**section("paper", "stage2"), "use_cpu": True})
    assert s2.bf16 and s2.assistant_only_loss and s2.model == "models/stage1"


def test_flags_override_the_params_file(tmp_path: Path) -> None:
    cfg = parse(tmp_path, "stage1", section("default", "stage1"), "--max-steps", "3", "--rewards",
                "{thurstone_soft: 2.0, format: 0.5}")
    assert cfg.max_steps == 3 and cfg.reward_weights == [2.0, 0.5]


@pytest.mark.parametrize(("stage", "change", "message"), [
    ("stage1", {"learnin_rate": 1e-5}, "unknown key 'learnin_rate'"),
    ("stage1", {"num_generations": "six"}, "num_generations: expected an integer"),
    ("stage1", {"num_generations": 8}, "each device sees 1 image"),
    ("stage1", {"reward_weights": [2.0, 1.0]}, "not reward_weights"),
    ("stage1", {"report_to": "mlflow"}, "second MLflow run"),
    ("stage1", {"resume_from_checkpoint": "x"}, "use `resume`"),
    ("stage2", {"assistant_only_loss": False}, "assistant_only_loss must stay true"),
    ("stage2", {"out": ""}, "out must be set"),
])
def test_bad_values_are_clear_errors(tmp_path: Path, stage: str, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse(tmp_path, stage, {**section("default", stage), **change})
    assert f"params.yaml:{stage}" in str(info.value)


def test_each_device_needs_whole_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two processes of 2 completions each with K = 4: trl's global check passes, the groups would split.
    monkeypatch.setattr(Stage1Config, "world_size", property(lambda self: 2))
    change = {"num_generations": 4, "per_device_train_batch_size": 2}
    with pytest.raises(ConfigError, match="= 2 must be a multiple of num_generations = 4"):
        parse(tmp_path, "stage1", {**section("default", "stage1"), **change})


def test_unknown_reward_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QProbeError, match="unknown or unused reward 'fidelity'"):
        parse(tmp_path, "stage1", {**section("default", "stage1"), "rewards": {"fidelity": 1.0}})


def test_dvc_stages() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, data in (("stage1", "data/trajectories/stage1"), ("stage2", "data/trajectories/sft")):
        stage = stages[name]
        assert stage["cmd"] == f"qprobe train {name}" and stage["params"] == ["protocol", name]
        assert data in stage["deps"]
        assert stage["outs"] == [f"models/{name}"]
        assert stage["plots"] == [{f"metrics/{name}_curves.csv": {"cache": False, "title": f"{name} loss", "x": "step",
                                                                  "y": "loss"}}]
        assert stage["metrics"] == [{f"metrics/{name}.json": {"cache": False}}]
        assert all((ROOT / dep).exists() for dep in stage["deps"] if dep.startswith("qprobe"))
    assert "models/base" in stages["stage1"]["deps"] and "models/stage1" in stages["stage2"]["deps"]


def test_loading_a_dataset_never_writes_into_its_dvc_folder(tmp_path: Path) -> None:
    from datasets import Dataset

    from qprobe.train.common import load_dataset_dir

    folder = tmp_path / "sft"
    Dataset.from_list([{"id": "a", "kind": "high"}, {"id": "b", "kind": "low"}]).save_to_disk(str(folder))
    before = sorted(p.name for p in folder.iterdir())
    dataset = load_dataset_dir(folder, ["id"], ProtocolLimits())
    assert len(dataset.filter(lambda r: r["kind"] == "high").map(lambda r: {"n": 1})) == 1
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_set_built_under_other_limits_is_refused(tmp_path: Path) -> None:
    from datasets import Dataset

    from qprobe.train.common import load_dataset_dir

    folder = tmp_path / "rl"
    Dataset.from_list([{"id": "a"}]).save_to_disk(str(folder))
    write_limits(folder, ProtocolLimits(**repo_protocol()))
    assert len(load_dataset_dir(folder, ["id"], ProtocolLimits(**repo_protocol()))) == 1
    with pytest.raises(QProbeError, match=rf"^{folder}: made with protocol.max_crops 3, but this run has 2;"):
        load_dataset_dir(folder, ["id"], ProtocolLimits(**{**repo_protocol(), "max_crops": 2}))


def test_curves_hold_one_row_per_logged_step_and_the_last_values_the_metrics(tmp_path: Path) -> None:
    import pandas as pd

    from qprobe.train.history import last_logged, write_curves

    history = [{"loss": 2.0, "learning_rate": 1e-5, "step": 1}, {"reward": 0.5, "step": 1},
               {"loss": 1.5, "flag": True, "step": 2},
               {"train_runtime": 9.0, "train_loss": 1.7, "step": 2}]  # the final summary: not a step
    write_curves(history, tmp_path / "c.csv")
    curves = pd.read_csv(tmp_path / "c.csv")
    assert list(curves["step"]) == [1, 2] and list(curves["loss"]) == [2.0, 1.5]
    assert curves["reward"].iloc[0] == 0.5 and pd.isna(curves["reward"].iloc[1]) and "flag" not in curves
    assert last_logged(history) == {"loss": 1.5, "learning_rate": 1e-5, "reward": 0.5}
