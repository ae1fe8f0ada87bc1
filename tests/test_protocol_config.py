"""The protocol's limits have one home (``protocol:``), every stage reads it, and what was made under
other limits (a trajectory set, a trained model) is refused with one line naming it and both values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from qprobe.agent import score
from qprobe.agent.protocol_config import LIMITS_FILE, ProtocolLimits, check_limits, write_limits
from qprobe.cli import main as cli_main
from qprobe.config import ConfigError, parse_config
from qprobe.errors import QProbeError
from qprobe.eval.config import EvaluateConfig
from qprobe.profiles import apply_profile
from qprobe.train.stage1 import Stage1Config
from qprobe.train.stage2 import Stage2Config
from qprobe.train.stage3 import Stage3Config
from qprobe.trajectories.config import TrajectoriesConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"trajectories": TrajectoriesConfig, "stage1": Stage1Config, "stage2": Stage2Config,
           "stage3": Stage3Config, "evaluate": EvaluateConfig}


def repo_params(tmp_path: Path, profile: str) -> Path:
    """The repository's params.yaml under ``profile``, copied into ``tmp_path``."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    if profile != "default":
        apply_profile(profile, tmp_path)
    return tmp_path / "params.yaml"


def every_config(params: Path, *flags: str) -> dict[str, Any]:
    """Each stage's config as its command reads it from ``params`` (training on the CPU: no GPU here)."""
    cpu = {"stage1": ["--use-cpu"], "stage2": ["--use-cpu"], "stage3": ["--use-cpu", "--no-use-vllm"]}
    configs = {name: parse_config(cls, name, ["--params", str(params), *flags, *cpu.get(name, [])])
               for name, cls in CONFIGS.items()}
    configs["score"] = score._parse(["--params", str(params), *flags, "photo.jpg"])[0]
    return configs


@pytest.mark.parametrize("profile", ["default", "paper"])
def test_one_change_to_the_protocol_section_reaches_every_stage(profile: str, tmp_path: Path) -> None:
    params = repo_params(tmp_path, profile)
    data = yaml.safe_load(params.read_text())
    data["protocol"]["global_max_pixels"] = 448 * 448
    params.write_text(yaml.safe_dump(data))
    expected = ProtocolLimits(**data["protocol"])
    assert expected.crop_max_pixels == (1003520 if profile == "paper" else 50176)
    configs = every_config(params)
    assert {name: cfg.protocol for name, cfg in configs.items()} == dict.fromkeys(configs, expected)
    # What each stage does with it: stage 1's views are the low-resolution ones, the others the global ones.
    assert configs["stage1"].view_max_pixels == expected.low_res_max_pixels
    assert configs["stage2"].view_max_pixels == configs["stage3"].view_max_pixels == 448 * 448
    assert configs["stage3"].max_tool_calling_iterations == expected.max_crops + 1
    rollout = configs["evaluate"].rollout()
    assert (rollout.global_max_pixels, rollout.crop_max_pixels, rollout.max_crops) == (
        448 * 448, expected.crop_max_pixels, expected.max_crops)
    assert configs["evaluate"].rollout(max_crops=0).max_crops == 0  # the no-tool baseline


def test_a_flag_overrides_one_limit_for_one_run(tmp_path: Path) -> None:
    params = repo_params(tmp_path, "default")
    cfg = score._parse(["photo.jpg", "--params", str(params), "--max-crops", "2"])[0]
    assert cfg.protocol == ProtocolLimits(50176, 50176, 50176, max_crops=2)
    with pytest.raises(ConfigError, match="max_crops must be at least 0"):
        score._parse(["photo.jpg", "--params", str(params), "--max-crops", "-1"])


@pytest.mark.parametrize("section", ["trajectories", "stage3", "evaluate", "score"])
def test_a_limit_set_in_a_stage_section_is_refused(section: str, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"protocol": {"max_crops": 3}, section: {"max_crops": 2}}))
    with pytest.raises(ConfigError) as info:
        if section == "score":
            score._parse(["photo.jpg", "--params", str(params)])
        else:
            parse_config(CONFIGS[section], section, ["--params", str(params)])
    assert str(info.value) == f"{params}:{section}: 'max_crops' is set once for every stage, in the 'protocol' section"


def test_committed_parameter_files_set_the_limits_in_protocol_only() -> None:
    limits = {"protocol", *ProtocolLimits.BUDGETS, "max_crops"}
    for path in ("params.yaml", "configs/paper.yaml"):
        data = yaml.safe_load((ROOT / path).read_text())
        assert not [(s, k) for s, keys in data.items() if s != "protocol" for k in keys if k in limits], path


def test_stored_limits_that_differ_are_one_line_naming_the_folder_and_both_values(tmp_path: Path) -> None:
    tiny = ProtocolLimits(50176, 50176, 50176, 3)
    write_limits(tmp_path, tiny)
    assert json.loads((tmp_path / LIMITS_FILE).read_text()) == {
        "global_max_pixels": 50176, "crop_max_pixels": 50176, "low_res_max_pixels": 50176, "max_crops": 3}
    check_limits(tmp_path, tiny)
    paper = ProtocolLimits()
    with pytest.raises(QProbeError) as info:
        check_limits(tmp_path, paper)
    assert str(info.value) == (f"{tmp_path}: made with protocol.global_max_pixels 50176, but this run has 1003520; "
                               "run with the same protocol limits or rebuild it")
    # A model is run with fewer crops at will (the prompt says how many); its budgets are fixed.
    fewer = ProtocolLimits(50176, 50176, 50176, max_crops=1)
    check_limits(tmp_path, fewer, ProtocolLimits.BUDGETS)
    with pytest.raises(QProbeError, match=r"protocol\.max_crops 3, but this run has 1"):
        check_limits(tmp_path, fewer)
    check_limits(tmp_path / "plain-hf-checkpoint", paper)  # records nothing: accepted
    (tmp_path / LIMITS_FILE).write_text("{")
    with pytest.raises(QProbeError, match="unreadable protocol limits"):
        check_limits(tmp_path, tiny)


def test_score_refuses_a_model_trained_on_other_budgets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    write_limits(model, ProtocolLimits(1003520, 1003520, 1003520, 3))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48)).save(photo)
    params = repo_params(tmp_path, "default")
    assert cli_main(["score", str(photo), "--params", str(params), "--model", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"qprobe score: error: {model}: made with protocol.global_max_pixels 1003520, but this run has "
                   "50176; run with the same protocol limits or rebuild it")
