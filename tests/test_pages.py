"""The report and the samples page come from autoescaped templates: what a cell holds is shown, never run."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
from PIL import Image

from qprobe.eval.report import ReportData, write_report
from qprobe.trajectories.samples import samples_html

SCRIPT = "<script>alert('x')</script>"


class Tags(HTMLParser):
    """The tags of a page and the text inside each ``<td>`` and ``<pre>``, unescaped."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.cells: list[str] = []
        self.inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("td", "pre"):
            self.cells.append("")
            self.inside = True

    def handle_endtag(self, tag: str) -> None:
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


def test_a_samples_page_turn_holding_markup_is_escaped() -> None:
    view = Image.new("RGB", (64, 48), (90, 90, 90))
    sample = {"id": SCRIPT, "kind": "high", "mos": 3.0, "width": 64, "height": 48, "crops": [[0, 0, 32, 24]],
              "defects": [[4, 4, 12, 12]],
              "messages": [{"role": "user", "content": [{"type": "image", "image": view, "text": None},
                                                        {"type": "text", "text": SCRIPT}]}]}
    page = samples_html([sample], 2)
    tags = _parse(page)
    assert "script" not in tags.tags and tags.tags.count("img") == 1
    assert SCRIPT in tags.cells and page.count("&lt;script&gt;") == 2  # the heading and the turn
    assert tags.tags.count("style") == 1 and "figure img{" in page  # the same stylesheet as the report
