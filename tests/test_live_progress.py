"""What a person sees while the pipeline runs: each stage's output live, prefixed, in the terminal and the
Prefect log; bars that stay bars in a terminal and become periodic lines elsewhere; training status lines."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from repo_copy import copy_repo

from tasks.dvc_stage import StageError, dvc, repro_stage
from tasks.stage_output import StageOutput, child_env

REPO = Path(__file__).resolve().parents[1]

# What tqdm writes for a bar of 3 steps, then a line printed with tqdm.write while the bar is up.
BAR = ("ticks:   0%|          | 0/3 [00:00<?, ?it/s]", "ticks:  33%|###3      | 1/3 [00:01<00:02,  1.00it/s]",
       "ticks: 100%|##########| 3/3 [00:03<00:00,  1.00it/s]")
OUTPUT = ("Running stage 'tick':\n> python tick.py\n" + "".join("\r" + frame for frame in BAR[:2])
          + "\r" + " " * 40 + "\rnote\n\r" + BAR[1] + "\r" + BAR[2] + "\ndone\r\n")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def relay(stream: io.StringIO, pieces: list[str], interval: float) -> tuple[StageOutput, list[str]]:
    logged: list[str] = []
    output = StageOutput("tick", stream, logged.append, interval=interval)
    for piece in pieces:
        output.feed(piece)
    output.close()
    return output, logged


def test_elsewhere_than_a_terminal_a_bar_becomes_lines_at_most_one_per_interval() -> None:
    stream = io.StringIO()
    output, logged = relay(stream, [OUTPUT], interval=3600)
    # The bar's first frame, then nothing until its final state; every line of text as it was.
    expected = ["Running stage 'tick':", "> python tick.py", BAR[0], "note", BAR[2], "done"]
    assert logged == [f"[tick] {line}" for line in expected]
    assert stream.getvalue() == "".join(f"{line}\n" for line in logged)
    assert "\r" not in stream.getvalue()
    assert output.head[0] == "Running stage 'tick':" and list(output.tail)[-1] == "done"


def test_with_no_interval_every_frame_is_a_line_and_none_twice() -> None:
    # Cut before the last frame's line break: that frame is relayed on its own, then its line is not.
    cut = OUTPUT.index("\ndone")
    _, logged = relay(io.StringIO(), [OUTPUT[:cut], OUTPUT[cut:]], interval=0)
    assert logged[2:] == [f"[tick] {line}" for line in (BAR[0], BAR[1], "note", BAR[1], BAR[2], "done")]


def test_pieces_cut_anywhere_in_a_line_give_the_same_lines() -> None:
    text = "Running stage 'tick':\n> python tick.py\nwindows line\r\nlast line with no break"
    whole = relay(io.StringIO(), [text], interval=3600)[1]
    cut = relay(io.StringIO(), [text[:10], text[10:40], text[40:52], text[52:]], interval=3600)[1]
    assert whole == cut == ["[tick] Running stage 'tick':", "[tick] > python tick.py", "[tick] windows line",
                            "[tick] last line with no break"]


def test_a_terminal_gets_the_bar_itself_each_frame_prefixed() -> None:
    terminal = Terminal()
    _, logged = relay(terminal, [OUTPUT[:60], OUTPUT[60:]], interval=3600)
    shown = terminal.getvalue()
    assert shown.count("\r[tick] ticks:") == 4  # every frame redrawn in place
    assert "\r" + " " * 40 + "\r[tick] note\n" in shown  # the bar's blanks clear the line, unprefixed
    assert shown.startswith("[tick] Running stage 'tick':\n[tick] > python tick.py\n")
    assert len(logged) == 6  # the log still gets lines


def test_the_child_environment_makes_tqdm_redraw_seldom_only_off_a_terminal() -> None:
    assert "TQDM_MININTERVAL" not in child_env(Terminal())
    env = {**os.environ, **child_env(io.StringIO(), interval=7.5)}
    code = "from tqdm import tqdm; bar = tqdm(total=1); print(bar.mininterval); bar.close()"
    printed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == "7.5"


@pytest.fixture
def tiny_dvc_repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert dvc(["init", "-q"], tmp_path).returncode == 0
    (tmp_path / "boom.py").write_text("import sys\nprint('loading')\nprint('50%|#####     | 1/2', end='\\r')\n"
                                      "sys.exit('boom: the input is missing')\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  boom: {cmd: python boom.py, deps: [boom.py]}\n")
    return tmp_path


@pytest.mark.slow
def test_a_failing_stage_streams_its_output_and_its_error_names_the_last_lines(
        tiny_dvc_repo: Path, capfd: pytest.CaptureFixture[str]) -> None:
    logged: list[str] = []
    with pytest.raises(StageError, match=r"(?s)stage 'boom' failed \(exit \d+\):.*loading.*boom: the input is missing"):
        repro_stage("boom", tiny_dvc_repo, log_line=logged.append)
    out = capfd.readouterr().out
    assert "[boom] loading\n" in out and "[boom] boom: the input is missing\n" in out
    assert "[boom] loading" in logged


_TICK = """import sys, time
from pathlib import Path
from tqdm import tqdm

go = Path(sys.argv[1])
print("waiting for", go.name)  # the test creates it once it has read this line: only a live relay gets here
deadline = time.monotonic() + 90
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("never told to go: the stage's output did not reach the terminal while it ran")
    time.sleep(0.1)
for _ in tqdm(range(3), desc="ticks"):
    time.sleep(0.05)
print("done")
"""


@pytest.mark.slow
def test_the_flow_shows_a_stage_output_while_it_runs(tmp_path: Path, prefect_harness: None) -> None:
    """`python -m flows.pipeline` for real, its stdout and stderr read as a terminal would show them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL

    (tmp_path / "repo").mkdir()
    root = copy_repo(tmp_path / "repo")
    (root / "tick.py").write_text(_TICK)
    stages = yaml.safe_load((root / "dvc.yaml").read_text())
    stages["stages"]["tick"] = {"cmd": "python tick.py ../go", "deps": ["tick.py"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_HOME": str(tmp_path / "prefect")}
    shown: list[str] = []
    with subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--stages", "tick"], cwd=root, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for raw in proc.stdout:
            assert b"\r" not in raw  # not a terminal: no bar frames
            shown.append(raw.decode().rstrip("\n"))
            if shown[-1].startswith("[tick] waiting for go"):
                (tmp_path / "go").touch()
    text = "\n".join(shown)
    assert proc.returncode == 0, text[-3000:]

    def at(pattern: str) -> int:
        found = [i for i, line in enumerate(shown) if re.search(pattern, line)]
        assert len(found) == 1, (pattern, text[-3000:])
        return found[0]

    start, end = at(r"stage tick \(1/1\): started here"), at(r"stage tick \(1/1\): ran, \d+\.\d s")
    assert start < at(r"^\[tick\] waiting for go$") < at(r"^\[tick\] ticks: 100%") < at(r"^\[tick\] done$") < end
    assert not any("waiting for go" in line and not line.startswith("[tick] ") for line in shown)

    # The MLflow run, and the command that opens it, come first.
    opening = at(r"MLflow run \w+: `.*mlflow ui --backend-store-uri ")
    assert opening < start
    run_id = re.search(r"MLflow run (\w+):", shown[opening]).group(1)
    assert os.environ["MLFLOW_TRACKING_URI"] in shown[opening]
    assert f"#/experiments/{mlflow.get_run(run_id).info.experiment_id}/runs/{run_id}" in shown[opening]

    # The Prefect log of the flow run holds the same lines.
    flow_run_id = mlflow.get_run(run_id).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    messages = [entry.message for entry in logs]
    assert "[tick] waiting for go" in messages and "[tick] done" in messages
    assert any(m.startswith("[tick] ticks: 100%") for m in messages)
    assert not any("\r" in m for m in messages)
