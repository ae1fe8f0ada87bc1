"""How long the protocol's parser and strict format check take on long model output.

A runaway generation in GRPO or from an endpoint can be tens of thousands of characters; the
parser and the format reward read every one of them, once per completion per step, so their cost
must grow linearly with the text. For answers of about 1k, 10k and 100k characters in several
shapes, this prints the best time of :func:`~qprobe.agent.protocol.parse_assistant` plus
:func:`~qprobe.agent.protocol.format_failure`, and the ratio time(100k) / time(10k): about 10 is
linear, about 100 quadratic.

Shapes: a long ``<think>`` then an answer; an answer with many defect boxes (past
``MAX_DEFECTS``, so a format failure); deeply nested and unclosed tags; and a long think followed by
stray text (what made the old backtracking check quadratic); whitespace and end tokens at the end.

Run::

    .venv/bin/python benchmarks/parse_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from qprobe.agent import protocol

SIZES = (1_000, 10_000, 100_000)
ANSWER = '<answer>{"score": 3.5, "defects": []}</answer>'


def _repeat(unit: str, size: int) -> str:
    return unit * max(1, size // len(unit))


def long_think(size: int) -> str:
    return f"<think>{_repeat('the sky looks clean ', size)}</think>\n{ANSWER}"


def many_boxes(size: int) -> str:
    defect = {"bbox_2d": [10, 20, 300, 400], "type": "blur"}
    count = max(1, size // len(json.dumps(defect)))
    return f'<think>x</think>\n<answer>{json.dumps({"score": 3, "defects": [defect] * count})}</answer>'


def nested_tags(size: int) -> str:
    return _repeat("<think><answer>[{", size)


def think_then_stray_text(size: int) -> str:
    return f"<think>{_repeat('a ', size)}</think> so {ANSWER}"


def trailing_end_tokens(size: int) -> str:
    return f"<think>x</think>\n{ANSWER}" + _repeat(" <|im_end|>\n", size)


SHAPES: dict[str, Callable[[int], str]] = {
    "long think": long_think,
    "many boxes": many_boxes,
    "nested tags": nested_tags,
    "think + stray text": think_then_stray_text,
    "trailing end tokens": trailing_end_tokens,
}


def best_seconds(text: str, repeats: int) -> float:
    """The fastest of ``repeats`` runs of the parser and the strict check on ``text``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        protocol.parse_assistant(text)
        protocol.format_failure(text)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per text; the best is reported")
    args = parser.parse_args()
    print(f"{'shape':<22}" + "".join(f"{f'{s // 1000}k chars':>14}" for s in SIZES) + f"{'100k/10k':>10}")
    for name, make in SHAPES.items():
        seconds = {size: best_seconds(make(size), args.repeats) for size in SIZES}
        ratio = seconds[100_000] / seconds[10_000] if seconds[10_000] else float("nan")
        print(f"{name:<22}" + "".join(f"{seconds[s] * 1000:>11.3f} ms" for s in SIZES) + f"{ratio:>10.1f}")


if __name__ == "__main__":
    main()
