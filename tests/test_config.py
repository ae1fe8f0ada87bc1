"""Typed params: defaults from params.yaml, flags override, every mistake is one clear line."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qprobe.cli import main as cli_main
from qprobe.config import SECTIONS, ConfigError, from_dict, load_params, parse_config
from qprobe.profiles import apply_profile


@dataclass
class Demo:
    out: str = field(default="data/x", metadata={"help": "output folder"})
    steps: int = field(default=3, metadata={"help": "steps"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    lora: bool = field(default=False, metadata={"help": "use LoRA"})
    types: list[str] = field(default_factory=lambda: ["blur"], metadata={"help": "types"})
    limit: int | None = field(default=None, metadata={"help": "optional limit"})


def _params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_section_defaults_then_flags_override(tmp_path: Path) -> None:
    params = _params(tmp_path, "demo:\n  steps: 7\n  lr: 2\n  types: [noise, jpeg]\n")
    cfg = parse_config(Demo, "demo", ["--params", str(params), "--lr", "0.5", "--lora"])
    assert cfg == Demo(steps=7, lr=0.5, lora=True, types=["noise", "jpeg"])
    assert isinstance(cfg.lr, float)


def test_flags_parse_lists_and_null(tmp_path: Path) -> None:
    params = _params(tmp_path, "demo: {}\n")
    cfg = parse_config(Demo, "demo", ["--params", str(params), "--types", "[a, b]", "--limit", "4"])
    assert cfg.types == ["a", "b"] and cfg.limit == 4
    assert parse_config(Demo, "demo", ["--params", str(params), "--limit", "null"]).limit is None
    assert parse_config(Demo, "demo", ["--params", str(params), "--lr", "1e-5"]).lr == 1e-5  # YAML 1.1 string


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("demo:\n  stepz: 1\n", "unknown key 'stepz'"),
        ("demo:\n  steps: many\n", "demo.steps: expected an integer, got 'many'"),
        ("demo:\n  lora: 1\n", "demo.lora: expected true or false"),
        ("demo:\n  types: blur\n", "demo.types: expected a list"),
        ("demo: [1, 2]\n", "section 'demo' must be a mapping"),
        ("demo: {steps: [\n", "not valid YAML"),
    ],
)
def test_bad_params_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    params = _params(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        parse_config(Demo, "demo", ["--params", str(params)])
    assert message in str(info.value)
    assert str(params) in str(info.value)


@pytest.mark.parametrize("path", ["params.yaml", "configs/paper.yaml"])
def test_committed_parameter_files_hold_only_known_sections(path: str) -> None:
    assert set(load_params(path)) <= set(SECTIONS)


def test_every_dvc_stage_reads_a_known_section() -> None:
    import yaml

    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    read = {section for stage in stages.values() for section in stage.get("params", [])}
    assert read and read <= set(SECTIONS)


def test_misspelt_section_names_the_file_and_the_closest_section(tmp_path: Path) -> None:
    params = _params(tmp_path, "bnech:\n  seed: 1\nstage1: {}\n")
    with pytest.raises(ConfigError) as info:
        load_params(params)
    assert str(info.value) == f"{params}: unknown section 'bnech' (did you mean 'bench'?)"
    # A stage reading another section still refuses the file: its typo would run defaults elsewhere.
    with pytest.raises(ConfigError, match="unknown section 'bnech'"):
        parse_config(Demo, "stage1", ["--params", str(params)])
    with pytest.raises(ConfigError, match=r"unknown section 'zzz' \(expected one of: bench, "):
        load_params(_params(tmp_path, "zzz: {}\n"))


def test_misspelt_section_in_a_profile_is_refused(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "params.yaml").write_text("bench:\n  seed: 0\n")
    (tmp_path / "configs" / "typo.yaml").write_text("trajectoires:\n  sft_size: 9\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown section 'trajectoires' \(did you mean 'trajectories'"):
        apply_profile("typo", tmp_path)
    assert (tmp_path / "params.yaml").read_text() == "bench:\n  seed: 0\n"


def test_bad_flag_names_the_flag(tmp_path: Path) -> None:
    params = _params(tmp_path, "demo: {}\n")
    with pytest.raises(ConfigError, match="--steps: expected an integer"):
        parse_config(Demo, "demo", ["--params", str(params), "--steps", "1.5"])


def test_explicit_missing_params_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="parameter file not found"):
        parse_config(Demo, "demo", ["--params", str(tmp_path / "nope.yaml")])


def test_from_dict_nested_where() -> None:
    with pytest.raises(ConfigError, match=r"x\.lr: expected a number"):
        from_dict(Demo, {"lr": "fast"}, "x")


def test_profile_merges_and_keeps_comments(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "params.yaml").write_text("# top comment\nbench:\n  seed: 0  # why\n  out: data/bench\n")
    (tmp_path / "configs" / "paper.yaml").write_text("bench:\n  seed: 0\n  min_size: 2000\nstage1:\n  lr: 1.0e-6\n")
    assert apply_profile("paper", tmp_path) == 2
    text = (tmp_path / "params.yaml").read_text()
    assert "# top comment" in text and "# why" in text
    assert "min_size: 2000" in text and "lr: 1.0e-6" in text
    with pytest.raises(ConfigError, match="no such profile"):
        apply_profile("nope", tmp_path)


def test_cli_unknown_command_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli_main(["--help"]) == 0
    assert "profile" in capsys.readouterr().out


def test_cli_config_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["profile", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qprobe profile: error:") and "\n" not in err


def test_an_out_elsewhere_takes_its_metrics_along(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tiny_photos: Path) -> None:
    """`qprobe bench --out X` (the README's example) leaves the pipeline's metrics/bench.json alone."""
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--source", str(tiny_photos), "--num-images", "2", "--contact-sheet-size", "0", "--min-size", "200"]
    assert cli_main([*args, "--out", "data/mybench"]) == 0
    assert json.loads((tmp_path / "data" / "mybench.metrics.json").read_text())["images"] == 2
    assert not (tmp_path / "metrics").exists()
    assert cli_main([*args, "--out", "data/other", "--metrics", "m.json"]) == 0
    assert (tmp_path / "m.json").is_file() and not (tmp_path / "data" / "other.metrics.json").exists()


def test_list_options_take_several_values_or_one_yaml_list(tmp_path: Path) -> None:
    """`--baselines piqe no_tool`, as `--data a b`, everywhere a field is a list; a YAML list still works."""

    @dataclass
    class Demo:
        names: list[str] = field(default_factory=list)
        sizes: list[int] = field(default_factory=lambda: [1])
        pair: list[float] | None = None

    params = tmp_path / "params.yaml"
    params.write_text("demo: {}\n")
    cfg = parse_config(Demo, "demo", ["--params", str(params), "--names", "piqe", "no_tool", "--sizes", "2", "3"])
    assert (cfg.names, cfg.sizes) == (["piqe", "no_tool"], [2, 3])
    assert parse_config(Demo, "demo", ["--params", str(params), "--sizes", "[4, 5]"]).sizes == [4, 5]
    assert parse_config(Demo, "demo", ["--params", str(params), "--pair", "null"]).pair is None
    with pytest.raises(ConfigError, match="--sizes"):
        parse_config(Demo, "demo", ["--params", str(params), "--sizes", "2", "x"])


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("qprobe 0.")
