"""`dvc plots show` offline: in a copy of the repository with curve and scatter files of the real
column names, the page DVC writes draws every plot of dvc.yaml in headless Chromium with the network
off, each curve over every step; DVC's own page (Vega from a CDN) stays blank there."""

from __future__ import annotations

import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from fixtures_browser import chromium, console_lines, needs_chromium
from fixtures_dvc import dvc
from repo_copy import copy_repo

from qprobe.eval.config import BASELINES, MODEL

pytestmark = needs_chromium

# The columns as a pipeline run writes them (trl's logged keys; evaluate's wide scatter table), so a
# `y:` naming a column the trainers do not log fails here.
HEADERS = {
    "metrics/stage1_curves.csv": (
        "step,loss,grad_norm,learning_rate,num_tokens,completions/mean_length,completions/min_length,"
        "completions/max_length,completions/clipped_ratio,completions/mean_terminated_length,"
        "completions/min_terminated_length,completions/max_terminated_length,rewards/thurstone/mean,"
        "rewards/thurstone/std,rewards/format_reward/mean,rewards/format_reward/std,reward,reward_std,"
        "frac_reward_zero_std,kl,entropy,clip_ratio/low_mean,clip_ratio/high_mean,clip_ratio/region_mean,"
        "clip_ratio/low_min,clip_ratio/high_max,step_time,epoch"),
    "metrics/stage2_curves.csv": "step,loss,grad_norm,learning_rate,entropy,mean_token_accuracy,num_tokens,epoch",
    "metrics/stage3_curves.csv": (
        "step,loss,grad_norm,learning_rate,num_tokens,completions/mean_length,completions/min_length,"
        "completions/max_length,completions/clipped_ratio,completions/mean_terminated_length,"
        "completions/min_terminated_length,completions/max_terminated_length,tools/call_frequency,"
        "tools/failure_frequency,rewards/accuracy/mean,rewards/accuracy/std,rewards/localization/mean,"
        "rewards/localization/std,rewards/format_reward/mean,rewards/format_reward/std,reward,reward_std,"
        "frac_reward_zero_std,rollouts/crop_area,rollouts/tool_calls_per_rollout,rollouts/tool_failure_rate,"
        "rollouts/truncation_rate,kl,entropy,clip_ratio/low_mean,clip_ratio/high_mean,clip_ratio/region_mean,"
        "clip_ratio/low_min,clip_ratio/high_max,step_time,epoch"),
    "outputs/evaluate/plots/scatter_bench.csv": ",".join(["id", "mos", "has_defect", MODEL, *BASELINES]),
}
ROWS = 12
# DVC's line template draws a hover point layer that is empty until the mouse moves over the plot;
# Vega warns about that empty layer's extent. Nothing else may reach the console.
HOVER_WARNING = "Infinite extent for field"


def _sample(header: str) -> str:
    """``ROWS`` rows of distinct, moving values under ``header`` (ids and flags where the table has them)."""
    columns = header.split(",")
    rows = [header]
    for i in range(ROWS):
        values = {"step": str(i + 1), "id": f"img-{i:02d}", "has_defect": str(i % 2 == 0)}
        rows.append(",".join(values.get(c, f"{2.5 + 2 * math.sin(i + k):.4f}") for k, c in enumerate(columns)))
    return "\n".join(rows) + "\n"


def _div_id(name: str) -> str:
    """The id of a plot's div on DVC's page."""
    from dvc_render.base import Renderer

    return Renderer.remove_special_chars(name)


def _ys(definition: dict) -> list[str]:
    columns = next(iter(definition["y"].values()))
    return columns if isinstance(columns, list) else [columns]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_repo(tmp_path_factory.mktemp("plots"))
    for rel, header in HEADERS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(_sample(header))
    return root


@pytest.fixture(scope="module")
def plots(repo: Path) -> dict[str, dict]:
    """dvc.yaml's plots by id: the top-level ones, and the stages' plot outputs (id: the file, one ``y``)."""
    graph = yaml.safe_load((repo / "dvc.yaml").read_text())
    found = {name: d for entry in graph["plots"] for name, d in entry.items()}
    for stage in graph["stages"].values():
        for entry in stage.get("plots", []):
            (path, props), = entry.items()
            found[path] = {"x": props["x"], "y": {path: props["y"]}}
    return found


class _Views(HTMLParser):
    """Vega's SVG marks per plot: ``view id -> [(aria-roledescription, aria-label, path d)]``."""

    def __init__(self, ids: set[str]) -> None:
        super().__init__()
        self.ids = ids
        self.marks: dict[str, list[tuple[str, str, str]]] = {}
        self.view: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "div" and a.get("id") in self.ids:  # DVC's div of one plot; the views are siblings
            self.view = a["id"]
            self.marks[self.view] = []
        elif tag == "path" and self.view and a.get("role") == "graphics-symbol":
            self.marks[self.view].append((a.get("aria-roledescription", ""), a.get("aria-label", ""), a.get("d", "")))


def _render(repo: Path, tmp_path: Path, *show_args: str) -> tuple[str, list[str]]:
    """Write the page with `dvc plots show` outside the repository and load it offline: (DOM, console)."""
    out = tmp_path / "elsewhere"
    dvc(repo, "plots", "show", "-o", str(out), *show_args)
    # The virtual time budget lets Vega's asynchronous parse and render finish before the DOM is dumped.
    run = chromium(tmp_path, "--virtual-time-budget=20000", "--dump-dom", (out / "index.html").as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, console_lines(run.stderr)


def test_plots_render_offline(repo: Path, plots: dict[str, dict], tmp_path: Path) -> None:
    dom, console = _render(repo, tmp_path)
    assert [line for line in console if HOVER_WARNING not in line] == []
    views = _Views({_div_id(name) for name in plots})
    views.feed(dom)
    assert set(views.marks) == views.ids
    for name, definition in plots.items():
        marks, ys = views.marks[_div_id(name)], _ys(definition)
        if definition.get("template") == "scatter":
            assert sum(kind == "point" for kind, _, _ in marks) == ROWS * len(ys), name
            continue
        # One full line per column over all the steps (DVC also draws each faintly under its smoothing).
        full = [label for kind, label, d in marks if kind == "line mark" and d.count("L") == ROWS - 1]
        assert len(full) >= len(ys), (name, marks)
        if len(ys) > 1:  # several columns: each line is labelled with its column
            assert {label.rsplit("field: ", 1)[-1] for label in full} == set(ys), name


def test_dvc_default_page_is_blank_offline(repo: Path, tmp_path: Path) -> None:
    # The check above can fail: DVC's own page, the one without .dvc/config's template, draws nothing here.
    blank = tmp_path / "cdn.html"
    blank.write_text("<html><head>{scripts}</head><body>{plot_divs}</body></html>")
    dom, console = _render(repo, tmp_path, "--html-template", str(blank))
    assert "cdn.jsdelivr.net" in dom and "<svg" not in dom
    assert any("vegaEmbed is not defined" in line for line in console)
