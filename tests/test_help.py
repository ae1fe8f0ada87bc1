"""`--help` that helps: a stage's own options first, grouped, with the values in force; trl's behind --help-all."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from qprobe.cli import COMMANDS
from qprobe.cli import main as cli_main
from qprobe.config import GROUPS, build_parser, parse_config, plain_text

ROOT = Path(__file__).resolve().parents[1]
# The help must show a stage's own options before this line (the 7B's trl list runs to ~1,100 lines).
SHORT_HELP_LINES = 260


@dataclass
class Grouped:
    out: str = field(default="data/x", metadata={"group": "data", "help": "output folder"})
    rate: float = field(default=1e-3, metadata={"group": "schedule", "help": "the rate (:class:`~torch.optim.AdamW`)"})
    hidden: int = field(default=7, metadata={"help": "an inherited trainer knob"})


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        cli_main(list(argv))
    assert done.value.code == 0
    return capsys.readouterr().out


def test_plain_text_drops_restructuredtext() -> None:
    assert plain_text("see :class:`~transformers.Trainer` and :func:`qprobe.io.load`") == \
        "see `Trainer` and `qprobe.io.load`"
    assert plain_text("[`~trl.GRPOConfig`] sets ``beta``; :ref:`the docs <grpo>`") == \
        "`GRPOConfig` sets `beta`; `the docs`"
    assert plain_text("Run it::\n\n    qprobe x") == "Run it:\n\n    qprobe x"


def test_grouped_help_shows_values_in_force_and_hides_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # a short path: argparse wraps long ones at their hyphens
    params = Path("p.yaml")
    params.write_text("demo:\n  rate: 0.5\n")
    with pytest.raises(SystemExit):
        parse_config(Grouped, "demo", ["--params", str(params), "--help"], prog="qprobe demo")
    short = " ".join(capsys.readouterr().out.split())
    assert GROUPS["data"] in short and GROUPS["schedule"] in short
    assert "(default: data/x)" in short and f"({params}: 0.5)" in short  # the file's value, named as such
    assert "`AdamW`" in short and ":class:" not in short
    assert "--hidden" not in short and "--help-all: the full description and 1 more options" in short
    with pytest.raises(SystemExit):
        parse_config(Grouped, "demo", ["--params", str(params), "--help-all"], prog="qprobe demo")
    assert "--hidden HIDDEN" in capsys.readouterr().out
    # Hidden from --help, a trainer knob is still a flag.
    assert parse_config(Grouped, "demo", ["--params", str(params), "--hidden", "3"]).hidden == 3


def test_unknown_group_is_refused() -> None:
    @dataclass
    class Typo:
        out: str = field(default="x", metadata={"group": "dat"})

    with pytest.raises(ValueError, match=r"Typo\.out: unknown help group 'dat'"):
        build_parser(Typo, "qprobe typo")


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_stage_help_is_short_grouped_and_complete(stage: str, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)  # the values in force: params.yaml's
    lines = _help(capsys, "train", stage, "--help").splitlines()
    text = "\n".join(lines)
    assert len(lines) < SHORT_HELP_LINES and lines[0] == f"usage: qprobe train {stage} [options]"
    first_group = next(i for i, line in enumerate(lines) if line == GROUPS["data"] + ":")
    assert first_group < 12  # the summary line, then the stage's options: no 35-line essay first
    # Every key either profile sets for the stage is an option of its short help (a profile's change is visible).
    for profile in (ROOT / "params.yaml", ROOT / "configs" / "paper.yaml"):
        for key in yaml.safe_load(profile.read_text()).get(stage) or {}:
            assert f"--{key.replace('_', '-')}" in text, f"{profile.name} sets {stage}.{key}, which --help hides"
    assert "--adam-beta1" not in text and "--help-all" in text  # trl's other knobs wait behind --help-all
    assert _markup(text) == []
    assert "(params.yaml: " in text


def test_stage3_help_names_the_reward_weights_apart_from_trl_beta(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    text = " ".join(_help(capsys, "train", "stage3", "--help").split())
    rewards = text[text.index("--rewards REWARDS"):text.index("--reward-options")]
    assert "{accuracy: alpha, localization: beta, format: gamma}" in rewards and "--beta" in rewards
    beta = text[text.index("--beta BETA"):]
    assert beta.startswith("--beta BETA KL coefficient (trl)") and "not the paper's reward weight beta" in beta
    full = _help(capsys, "train", "stage3", "--help-all")
    assert "--adam-beta1" in full and "Reward, decoupled" in full and _markup(full) == []


# reStructuredText a --help must not show: literal quotes, roles, a literal block's "::", Hugging Face links.
MARKUP = ("``", ":class:", ":func:", ":mod:", ":meth:", ":data:", ":ref:", "[`~")


def _markup(text: str) -> list[str]:
    """The reStructuredText left in ``text``: each marker found, and each line ending in ``::``."""
    return [m for m in MARKUP if m in text] + [line for line in text.splitlines() if line.rstrip().endswith("::")]


# Every command but the training stages (test_stage_help_is_short_grouped_and_complete checks those), and
# the sub-commands of those that have them; the flows' own entry points.
COMMAND_HELP = [c.split() for c in COMMANDS if not c.startswith("train ")] + [
    ["experiments", "run"], ["experiments", "report"], ["services", "up"], ["launch", "local", "bench"]]


@pytest.mark.parametrize("argv", COMMAND_HELP, ids=" ".join)
def test_no_command_help_shows_restructuredtext(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    assert len(COMMAND_HELP) >= len(COMMANDS)  # a command added to the CLI is checked here too
    with pytest.raises(SystemExit) as done:
        sys.exit(cli_main([*argv, "--help"]))
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: qprobe " + argv[0]) and _markup(text) == []


@pytest.mark.parametrize("flow", ["flows.pipeline", "flows.retrain"])
def test_no_flow_help_shows_restructuredtext(flow: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(flow)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m {flow}") and _markup(text) == []
