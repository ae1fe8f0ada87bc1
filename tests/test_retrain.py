"""Scheduled retraining: the promotion rule, the model registry, and the flow for real."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from qprobe import tracking
from tasks.registry import decide


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "promote", "reason"),
    [
        (0.80, None, 0.01, True, "no champion yet"),
        (0.80, 0.70, 0.01, True, "beats champion by +0.1000"),
        (0.705, 0.70, 0.01, False, "below the margin"),
        (0.71, 0.70, 0.01, True, "beats champion"),  # exactly the margin wins
        (None, 0.70, 0.01, False, "no score"),
        (math.nan, None, 0.01, False, "no score"),
        (0.5, math.nan, 0.01, True, "no champion yet"),
    ],
)
def test_promotion_rule(challenger, champion, margin, promote, reason) -> None:
    decision = decide(challenger, champion, margin)
    assert decision.promote is promote and reason in decision.reason


def test_registry_round_trip(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    assert tracking.model_version("champion", root=tmp_path) is None
    first = tracking.register_model(model, tags={"pipeline_run": "abc"}, root=tmp_path)
    tracking.set_alias("champion", first, root=tmp_path)
    (model / "config.json").write_text('{"model_type": "qwen2_5_vl", "v": 2}')
    second = tracking.register_model(model, root=tmp_path)
    assert (first, second) == ("1", "2")
    champion = tracking.model_version("champion", root=tmp_path)
    assert str(champion.version) == "1" and champion.tags["pipeline_run"] == "abc"
    assert str(tracking.model_version("challenger", root=tmp_path).version) == "2"
    # The registry holds its own copy: the champion survives the workspace folder changing.
    folder = tracking.download_version(champion, tmp_path / "dl")
    assert (folder / "config.json").read_text() == '{"model_type": "qwen2_5_vl"}'
    assert champion.tags["model.md5"] != tracking.model_version("challenger", root=tmp_path).tags["model.md5"]
