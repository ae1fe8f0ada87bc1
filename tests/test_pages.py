"""The report and the samples page: autoescaped templates (what a cell holds is shown, never run), one
palette for their boxes, thumbnails that open the full image, figure labels that can be read."""

from __future__ import annotations

import base64
import io
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from qprobe.draw import CROP, MEANINGS, TRUTH, css_colour
from qprobe.eval.report import ReportData, write_report
from qprobe.pages import THUMB_SIDE
from qprobe.trajectories.samples import write_samples

SCRIPT = "<script>alert('x')</script>"


class Tags(HTMLParser):
    """The tags of a page and the text inside each ``<td>`` and ``<pre>``, unescaped."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.cells: list[str] = []
        self.links: list[tuple[str, dict[str, str | None]]] = []  # (href, its <img>'s attributes)
        self.inside = False
        self.href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "a":
            self.href = dict(attrs).get("href")
        if tag == "img" and self.href is not None:
            self.links.append((self.href, dict(attrs)))
        if tag in ("td", "pre"):
            self.cells.append("")
            self.inside = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self.href = None
        if tag in ("td", "pre"):
            self.inside = False

    def handle_data(self, data: str) -> None:
        if self.inside:
            self.cells[-1] += data


def _parse(page: str) -> Tags:
    tags = Tags()
    tags.feed(page)
    return tags


def test_a_report_cell_holding_markup_is_escaped(tmp_path: Path) -> None:
    predictions = pd.DataFrame(columns=["set", "id", "method", "score", "mos"])
    data = ReportData(title="Q-Probe <b>evaluation</b>", model=SCRIPT, config={"model": SCRIPT}, sets=["bench"],
                      methods=["qprobe"], nested={"bench": {"qprobe": {"n": 3, "outcome.answer": 3}}},
                      predictions=predictions, probes={}, curves=None, gallery=2, stages=[SCRIPT], seconds=1.0)
    page = write_report(data, {}, tmp_path / "report.html").read_text()
    tags = _parse(page)
    assert "script" not in tags.tags and "b" in tags.tags  # the meta line's own <b>, not the title's
    assert SCRIPT in tags.cells  # the config table shows the text as it is
    assert "&lt;script&gt;" in page and "Q-Probe &lt;b&gt;evaluation&lt;/b&gt;" in page
    assert tags.tags.count("style") == 1 and "figure img{" in page  # the shared stylesheet, inlined


def test_the_report_names_the_run_and_the_model_weights_beside_the_commit(tmp_path: Path) -> None:
    import mlflow

    from qprobe.io import content_hash

    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"weights")
    data = ReportData(title="t", model=str(model), config={}, sets=["bench"], methods=["qprobe"],
                      nested={"bench": {"qprobe": {"n": 3, "outcome.answer": 3}}},
                      predictions=pd.DataFrame(columns=["set", "id", "method", "score", "mos"]),
                      probes={}, curves=None, gallery=2, stages=[], seconds=1.0)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        page = write_report(data, {}, tmp_path / "report.html").read_text()
    assert f"MLflow run {run.info.run_id}" in page and f"model md5 {content_hash(model)[:12]}" in page


def _sample(sample_id: str, view: Image.Image, crops: list, defects: list, text: str) -> dict:
    """A high-resolution SFT sample of one user turn: the global view ``view``, then ``text``."""
    return {"id": sample_id, "kind": "high", "mos": 3.0, "width": view.width, "height": view.height,
            "crops": crops, "defects": defects,
            "messages": [{"role": "user", "content": [{"type": "image", "image": view, "text": None},
                                                      {"type": "text", "text": text}]}]}


def test_a_samples_page_turn_holding_markup_is_escaped(tmp_path: Path) -> None:
    view = Image.new("RGB", (64, 48), (90, 90, 90))
    sample = _sample(SCRIPT, view, [[0, 0, 32, 24]], [[4, 4, 12, 12]], SCRIPT)
    page = write_samples([sample], 2, tmp_path / "samples.html").read_text()
    tags = _parse(page)
    assert "script" not in tags.tags and tags.tags.count("img") == 1
    assert SCRIPT in tags.cells and page.count("&lt;script&gt;") == 3  # the heading, the image's alt, the turn
    assert tags.tags.count("style") == 1 and "figure img{" in page  # the same stylesheet as the report


def _colour_at(image: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=int)[xy[1], xy[0]]


def test_a_samples_thumbnail_opens_the_full_image_beside_the_page_in_the_shared_palette(tmp_path: Path) -> None:
    view = Image.new("RGB", (1600, 1200), (128, 128, 128))
    crop, defect = [100, 100, 900, 700], [1000, 800, 1400, 1100]
    page = write_samples([_sample("s1", view, [crop], [defect], "look")], 2, tmp_path / "out" / "samples.html")
    tags = _parse(page.read_text())
    (href, img), = tags.links
    full = page.parent / href
    assert not Path(href).is_absolute() and full.parent.name == "samples_images" and full.is_file()
    with Image.open(full) as opened:
        assert opened.size == (1600, 1200)  # the full image, its boxes where the sample has them
        assert np.abs(_colour_at(opened, (500, 100)) - CROP).max() < 40
        assert np.abs(_colour_at(opened, (1200, 800)) - TRUTH).max() < 40
    thumb = Image.open(io.BytesIO(base64.b64decode(str(img["src"]).split(",", 1)[1])))
    assert thumb.size == (THUMB_SIDE, 420) and (img["width"], img["height"]) == (str(THUMB_SIDE), "420")
    assert THUMB_SIDE >= 500  # larger than the 360-400 pixels the pages had
    # The legend names the colours the boxes are drawn in: the palette of qprobe.draw, no copy of its own.
    for colour in (CROP, TRUTH):
        assert f'<span style="color:{css_colour(colour)}">■</span> {MEANINGS[colour]}' in page.read_text()


def test_a_report_thumbnail_opens_the_full_image_beside_the_page(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    Image.new("RGB", (1200, 900), (120, 120, 120)).save(photo)
    predictions = pd.DataFrame([{
        "set": "bench", "id": "p/1", "method": "qprobe", "score": 3.5, "mos": 3.0, "image": str(photo),
        "outcome": "answer", "failure": None, "crops": [[10, 10, 300, 300]],
        "true_defects": [{"bbox": [400, 400, 800, 700], "type": "blur", "severity": 2}],
        "defects": [{"bbox": [420, 420, 780, 680], "type": "blur"}]}])
    data = ReportData(title="t", model="m", config={}, sets=["bench"], methods=["qprobe"],
                      nested={"bench": {"qprobe": {"n": 1}}}, predictions=predictions, probes={}, curves=None,
                      gallery=2, stages=[], seconds=1.0)
    stale = tmp_path / "out" / "report_images" / "old.jpg"
    stale.parent.mkdir(parents=True)
    stale.touch()
    page = write_report(data, {}, tmp_path / "out" / "report.html")
    (href, img), = _parse(page.read_text()).links
    assert href.startswith("report_images/") and Image.open(page.parent / href).size == (1200, 900)
    assert img["width"] == str(THUMB_SIDE) and not stale.exists()  # an earlier page's images are gone
    for colour in MEANINGS:
        assert css_colour(colour) in page.read_text()


def _contrast(foreground: str, background: str = "white") -> float:
    """The WCAG contrast ratio of two colours (1 to 21)."""
    from matplotlib.colors import to_rgb

    def luminance(colour: str) -> float:
        channels = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
        return 0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2]

    light, dark = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def test_the_n_a_label_of_a_group_without_a_value_is_legible() -> None:
    from matplotlib.figure import Figure

    from qprobe.eval.figures import _bars

    ax = Figure().subplots()
    _bars(ax, {"qprobe": {"blur": math.nan, "noise": 0.5}}, ["qprobe"], "SRCC by type", "SRCC")
    (label,) = [t for t in ax.texts if t.get_text() == "n/a"]
    tick = ax.get_xticklabels()[0]
    assert label.get_fontsize() >= tick.get_fontsize() >= 7  # as large as the group names it sits over
    assert _contrast(label.get_color()) >= 4.5  # WCAG AA for text, on the axes' white
