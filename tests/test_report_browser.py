"""The HTML report in a real browser: headless Chromium loads it without errors and shows its tables,
figures and gallery, offline, with thumbnails that open the full images. CI needs the Debian package: ``apt-get update && apt-get install -y chromium``."""

from __future__ import annotations

import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from fixtures_browser import chromium, console_lines, needs_chromium
from fixtures_eval import ScriptedBackend, make_bench
from PIL import Image

from qprobe.eval.runner import evaluate, parse_args

pytestmark = needs_chromium


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def count(self, tag: str, **attrs: str) -> int:
        return sum(t == tag and all((a.get(k) or "").startswith(v) for k, v in attrs.items()) for t, a in self.tags)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report of the scripted model on a small bench, with every section filled in."""
    root = tmp_path_factory.mktemp("report")
    bench = make_bench(root / "bench", num_images=8)
    photos = os.environ.get("QPROBE_PHOTOS")
    params = root / "params.yaml"
    params.write_text("evaluate: {}\n")  # the dataclass defaults, whatever the repository's params.yaml says
    cfg = parse_args([
        "--params", str(params), "--data", str(bench), "--split", "all", "--out", str(root / "out"),
        "--metrics", str(root / "evaluate.json"),
        "--global-max-pixels", "12544", "--crop-max-pixels", "12544", "--max-new-tokens", "200",
        "--bootstrap", "50", "--piqe-tile", "256", "--crop-bias-images", "1", "--crop-bias-crops", "2",
        "--repeat-images", "1", "--repeat-runs", "2", "--gallery", "2", "--curves", "[]",
        "--bokeh-limit", "2", *(["--bokeh-dir", photos] if photos else []),
    ])
    return evaluate(cfg, backend=ScriptedBackend()).report


def test_report_dom_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    run = chromium(tmp_path, "--dump-dom", report.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    assert console_lines(run.stderr) == []
    dom = _Elements()
    dom.feed(run.stdout)
    sections = {a.get("id") for t, a in dom.tags if t == "section"}
    assert {"agreement", "outcomes", "groups", "localisation", "cost", "probes", "training", "gallery",
            "config"} <= sections
    # agreement, outcomes, groups, localisation, cost, crop bias, repeatability, config; bokeh adds two
    assert dom.count("table") == (10 if os.environ.get("QPROBE_PHOTOS") else 8)
    assert dom.count("img", src="data:image/png;base64,") == 2  # scatter, groups (no training runs here)
    assert dom.count("img", src="data:image/jpeg;base64,") == 8  # gallery: worst and best, Q-Probe and PIQE
    assert dom.count("img", src="file:") == dom.count("img", src="http") == 0  # self-contained
    assert "Q-Probe evaluation" in run.stdout and "worst" in run.stdout


def test_report_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    run = chromium(tmp_path, "--hide-scrollbars", "--window-size=1280,3000", f"--screenshot={shot}",
                   report.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert console_lines(run.stderr) == []
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (3000, 1280)
    assert pixels.std() > 20  # text, tables and figures, not an empty white page


def test_the_error_check_sees_page_errors(tmp_path: Path) -> None:
    # The checks above pass because the report is clean, not because errors go unseen.
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><script>console.error("boom"); undefinedCall();</script>'
                    "</body></html>")
    run = chromium(tmp_path, "--dump-dom", page.as_uri())
    errors = console_lines(run.stderr)
    assert any("Uncaught" in line for line in errors) and any("boom" in line for line in errors)


# Appended to a copy of the report: what Chromium lays out, written where --dump-dom shows it.
MEASURE = ("<script>document.body.dataset.widths = [...document.querySelectorAll('.gallery a img')]"
           ".map(i => Math.round(i.getBoundingClientRect().width)).join(' ');</script></body>")


def test_gallery_thumbnails_are_large_and_open_the_full_images_beside_the_report(report: Path,
                                                                                 tmp_path: Path) -> None:
    import pandas as pd

    measured = report.with_name("measured.html")  # beside the report: its relative links resolve the same
    measured.write_text(report.read_text().replace("</body>", MEASURE))
    run = chromium(tmp_path, "--window-size=1280,2000", "--dump-dom", measured.as_uri())
    assert run.returncode == 0 and console_lines(run.stderr) == [], run.stderr[-2000:]
    dom = _Elements()
    dom.feed(run.stdout)
    links = [a["href"] for t, a in dom.tags if t == "a" and (a.get("href") or "").startswith("report_images/")]
    thumbs = [a for t, a in dom.tags if t == "img" and (a.get("src") or "").startswith("data:image/jpeg")]
    widths = [int(w) for w in next(a["data-widths"] for t, a in dom.tags if t == "body").split()]
    assert len(links) == len(thumbs) == len(widths) == 8
    photos = dict(pd.read_csv(report.parent / "predictions.csv")[["id", "image"]].itertuples(index=False))
    for href, thumb, width in zip(links, thumbs, widths, strict=True):
        with Image.open(report.parent / href) as full, Image.open(photos[thumb["alt"]]) as photo:
            assert full.size == photo.size  # the whole photo, not the thumbnail again
        assert width >= min(500, photo.width)  # shown larger than the 400 pixels it was
