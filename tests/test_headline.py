"""The headline: the short set of figures a run logs, ranked, and never more than the cap."""

from __future__ import annotations

import logging

import pytest

from qprobe.eval.config import BASELINES, MODEL
from qprobe.headline import CAP, evaluate_figures, pipeline_figures

METHODS = (MODEL, *BASELINES)  # the default: every baseline on
STAGES = ("bench", "model", "trajectories", "stage1", "stage2", "stage3", "evaluate")


def _method(method: str, base: float) -> dict:
    """One method's metrics as evaluate's summary holds them, with detail the headline leaves out."""
    values = {"srcc": base, "plcc": base + 0.01, "krcc": base - 0.1, "srcc_low": base - 0.2, "n": 8.0,
              "answer_rate": 1.0, "loc.mean_iou": 0.3}
    if method in ("qprobe", "no_tool"):
        values["cost.visual_ratio_total"] = 0.4
    return values


def _evaluate(sets: int) -> dict:
    summary: dict = {"seconds": 12.0}
    for i in range(sets):
        summary[f"set{i}"] = {"images": 8.0, **{m: _method(m, 0.5 + i / 100) for m in METHODS}}
    return summary


def _stages(sets: int) -> dict:
    return {"bench": {"images": 70, "seconds": 3.0}, "stage2": {"rollout_adherence": 0.75, "loss": 1.2},
            "stage3": {"reward": 0.4, "tool_calls_per_rollout": 1.5, "kl": 0.01}, "evaluate": _evaluate(sets)}


def test_one_set_headline_is_every_named_figure_and_nothing_else() -> None:
    figures = pipeline_figures(_stages(1), dict.fromkeys(STAGES, 1.0))
    expected = {*(f"seconds.{s}" for s in STAGES), "stage2.rollout_adherence", "stage3.reward",
                "stage3.tool_calls_per_rollout",
                *(f"evaluate.set0.{m}.{k}" for m in METHODS for k in ("srcc", "plcc", "krcc")),
                *(f"evaluate.set0.{m}.{k}" for m in ("qprobe", "no_tool") for k in ("answer_rate",
                                                                                   "cost.visual_ratio_total"))}
    assert set(figures) == expected and len(figures) <= CAP
    assert figures["evaluate.set0.qprobe.srcc"] == 0.5 and figures["stage2.rollout_adherence"] == 0.75


def test_many_sets_stay_under_the_cap_keeping_qprobe_srcc_of_every_set(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qprobe.headline"):
        figures = pipeline_figures(_stages(9), dict.fromkeys(STAGES, 1.0))
    assert len(figures) == CAP
    assert {f"evaluate.set{i}.qprobe.srcc" for i in range(9)} <= set(figures)
    assert {"seconds.evaluate", "stage2.rollout_adherence", "stage3.reward"} <= set(figures)
    assert not any(".piqe." in k for k in figures)  # the baselines rank after Q-Probe's own figures
    assert "over the cap of 30" in caplog.text


def test_undefined_figures_are_left_out() -> None:
    summary = _evaluate(1)
    summary["set0"]["qprobe"]["srcc"] = None  # a model that never answers
    figures = evaluate_figures(summary)
    assert "set0.qprobe.srcc" not in figures and figures["set0.qprobe.plcc"] == pytest.approx(0.51)
    assert "seconds" not in figures and "set0.images" not in figures
