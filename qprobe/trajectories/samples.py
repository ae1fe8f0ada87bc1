"""The samples page of ``qprobe trajectories`` (``samples.html``): Probe-CoT trajectories to read.

Each sample's images (global view, then its crops) are drawn beside the turns' text, with the crop
and true defect boxes on the global view (:mod:`qprobe.draw`, ``templates/samples.html.jinja``);
each thumbnail opens its full-size image in ``samples_images/`` beside the page
(:class:`qprobe.pages.Pictures`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from qprobe.draw import CROP, TRUTH, Mark, legend
from qprobe.io import write_text_atomic
from qprobe.pages import Pictures, render_page

SAMPLES_PAGE = "samples.html"  # in the trajectories' output folder


def sample_images(sample: dict[str, Any]) -> list[Image.Image]:
    """The images of an SFT sample, in conversation order (global view first, then the crops)."""
    return [b["image"] for m in sample["messages"] for b in m["content"] if b["type"] == "image"]


def write_samples(sft: list[dict[str, Any]], n: int, page: Path) -> Path:
    """Write the page of sample trajectories to ``page`` (``templates/samples.html.jinja``): images with the
    crop and true defect boxes beside each turn's text, and their full-size images beside it; returns ``page``."""
    pictures = Pictures(page)
    high = [s for s in sft if s["kind"] == "high"][: max(1, n - 1)]
    low = [s for s in sft if s["kind"] == "low"][:1]
    samples = []
    for s in high + low:
        images = iter(sample_images(s))
        turns = []
        for m in s["messages"]:
            cells = []
            for block in m["content"]:
                if block["type"] == "image":
                    img = next(images)
                    marks = []
                    if m["role"] == "user" and s["kind"] == "high":
                        marks = [*(Mark(c, CROP) for c in s["crops"]),
                                 *(Mark(d, TRUTH) for d in s["defects"])]
                    cells.append({"picture": pictures.add(img, str(s["id"]), marks, scale=img.size[0] / s["width"])})
                elif m["role"] != "system":
                    cells.append({"text": block["text"] or ""})
            if cells:
                turns.append({"role": m["role"], "cells": cells})
        samples.append({"id": s["id"], "kind": s["kind"], "mos": s["mos"], "turns": turns})
    write_text_atomic(page, render_page("samples.html.jinja", title="Probe-CoT sample trajectories",
                                        legend=legend(CROP, TRUTH), samples=samples))
    return page
