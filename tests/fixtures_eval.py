"""Helpers for the evaluation and rollout tests: a scripted backend that follows the protocol, a backend that
replays fixed turns, and a tiny bench."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.agent.backends import Generation
from qprobe.agent.protocol import Defect, render_answer, render_tool_call, render_turn


class ScriptedBackend:
    """A model that always crops the centre of the view, then answers with a score and one blur box.

    The score follows the view's brightness (so it varies across images), plus noise drawn from the
    seed when sampling (temperature > 0), so repeatability has something to measure. A second crop
    request is never made: with the tool disabled the refusal comes back and it answers.
    """

    name = "scripted"

    def generate(self, messages: list[dict[str, Any]], *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> Generation:
        view = messages[1]["content"][0]["image"]
        w, h = view.size
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        if not any(m["role"] == "assistant" for m in messages):
            text = render_turn("Check the centre.", render_tool_call(box))
        else:
            score = 1.0 + 4.0 * float(np.asarray(view.convert("L")).mean()) / 255.0
            if temperature > 0:
                score += random.Random(seed).uniform(-0.2, 0.2)
            score = min(5.0, max(1.0, score))
            text = render_turn("The centre is soft.", render_answer(score, [Defect(box, "blur")]))
        return Generation(text=text, prompt_tokens=200 + 10 * len(messages), completion_tokens=20,
                          finish_reason="stop", seconds=0.001)


class Replay:
    """A backend that replays fixed turns, and records what it was shown."""

    name = "replay"

    def __init__(self, texts: list[str], finish: str = "stop") -> None:
        self._texts: Iterator[str] = iter(texts)
        self.finish = finish
        self.calls: list[tuple[list[dict[str, Any]], int]] = []

    def generate(self, messages: list[dict[str, Any]], *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> Generation:
        self.calls.append((list(messages), max_new_tokens))
        text = next(self._texts)
        return Generation(text=text, prompt_tokens=100, completion_tokens=min(10, max_new_tokens),
                          finish_reason=self.finish, seconds=0.0)


def make_bench(out: Path, num_images: int = 8) -> Path:
    """A small Vista-Bench from scikit-image's photos; returns the folder holding manifest.parquet."""
    from qprobe.bench.config import BenchConfig
    from qprobe.bench.synthesize import synthesize

    synthesize(BenchConfig(source="skimage", out=str(out), metrics=str(out.parent / f"{out.name}-metrics.json"),
                           num_images=num_images, contact_sheet_size=0), progress=False)
    return out


def untimed(value: object) -> object:
    """``value`` without its ``seconds`` keys at any depth: wall-clock times differ between any two runs."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value
