"""The samples page of ``qprobe trajectories`` (``samples.html``): Probe-CoT trajectories to read.

Each sample's images (global view, then its crops) are drawn beside the turns' text, with the crop
and true defect boxes on the global view (:mod:`qprobe.draw`, ``templates/samples.html.jinja``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

from PIL import Image

from qprobe.draw import CROP, TRUTH, Mark, css_colour, draw_marks, fit
from qprobe.pages import render_page


def sample_images(sample: dict[str, Any]) -> list[Image.Image]:
    """The images of an SFT sample, in conversation order (global view first, then the crops)."""
    return [b["image"] for m in sample["messages"] for b in m["content"] if b["type"] == "image"]


def _thumb(image: Image.Image, marks: Sequence[Mark] = (), scale: float = 1.0, side: int = 360) -> str:
    """``image`` fitted into ``side``, ``marks`` drawn (their boxes times ``scale``), as a data URL."""
    image, fitted = fit(image, side)
    draw_marks(image, marks, scale=scale * fitted)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def samples_html(sft: list[dict[str, Any]], n: int) -> str:
    """A self-contained page of sample trajectories (``templates/samples.html.jinja``): images with the
    crop and true defect boxes beside each turn's text."""
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
                    cells.append({"image": _thumb(img, marks, scale=img.size[0] / s["width"])})
                elif m["role"] != "system":
                    cells.append({"text": block["text"] or ""})
            if cells:
                turns.append({"role": m["role"], "cells": cells})
        samples.append({"id": s["id"], "kind": s["kind"], "mos": s["mos"], "turns": turns})
    legend = [(css_colour(CROP), "crops"), (css_colour(TRUTH), "true defects (global-view pixels)")]
    return render_page("samples.html.jinja", title="Probe-CoT sample trajectories", legend=legend,
                       samples=samples)
