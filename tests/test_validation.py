"""The validation runner (Great Expectations + Python checks) and the bench manifest's suite."""

from __future__ import annotations

from pathlib import Path

import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qprobe.data.manifest import read_manifest, write_manifest
from qprobe.errors import QProbeError
from qprobe.validation import Suite, ValidationError, require, validate
from qprobe.validation.bench import validate_bench_manifest

TYPES = ("blur", "noise", "jpeg", "ringing", "pixelation", "banding")


def test_runner_collects_readable_failures_from_expectations_and_checks():
    df = pd.DataFrame({"id": ["a", "b", "b"], "score": [1.0, 7.5, 3.0]})
    suite = Suite(
        "scores",
        expectations=[gxe.ExpectColumnValuesToBeUnique(column="id"),
                      gxe.ExpectColumnValuesToBeBetween(column="score", min_value=1, max_value=5)],
        checks=[lambda frame: [f"row {i} is odd" for i in frame.index if i == 1]],
    )
    failures = validate(df, suite)
    assert len(failures) == 3
    assert failures[0].startswith("scores: expect_column_values_to_be_unique(column=id): 2 rows fail")
    assert "expect_column_values_to_be_between(column=score, min_value=1" in failures[1] and "7.5" in failures[1]
    assert failures[2] == "scores: row 1 is odd"


def test_require_raises_one_line_error_listing_every_suite():
    good = Suite("good", [gxe.ExpectColumnValuesToNotBeNull(column="x")])
    bad = Suite("bad", [gxe.ExpectColumnValuesToBeInSet(column="x", value_set=[1])])
    df = pd.DataFrame({"x": [1, 2]})
    require((good, df), name="fine.parquet")
    with pytest.raises(ValidationError) as info:
        require((good, df), (bad, df), name="data.parquet")
    error = info.value
    assert isinstance(error, QProbeError)
    assert error.failures == [line for line in error.failures if line.startswith("bad: ")] and len(error.failures) == 1
    assert str(error).startswith("data.parquet failed validation (1 failed checks): bad: expect_column_values_to_be_in_set")
    assert "\n" not in str(error)


def test_the_same_expectations_can_be_reused_across_runs():
    expectations = [gxe.ExpectColumnValuesToBeBetween(column="x", min_value=0)]
    for _ in range(2):
        assert validate(pd.DataFrame({"x": [1, 2]}), Suite("s", expectations)) == []
        assert len(validate(pd.DataFrame({"x": [-1, 2]}), Suite("s", expectations))) == 1


def _bench(tmp_path: Path) -> list[dict]:
    """Three good manifest rows whose images exist."""
    rows = []
    for i, (source, split) in enumerate([("a.jpg", "train"), ("a.jpg", "train"), ("b.jpg", "test")]):
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "images" / f"im{i}.png")
        rows.append({"id": f"im{i}", "image": f"images/im{i}.png", "source": source, "width": 80, "height": 60,
                     "split": split, "has_defect": i != 2, "mos": 3.0, "mos_std": 0.5,
                     "defects": [{"type": "blur", "severity": 3, "bbox": [10, 10, 40, 30]}] if i != 2 else []})
    return rows


def _failures(tmp_path: Path, rows: list[dict]) -> list[str]:
    write_manifest(rows, tmp_path / "manifest.parquet")
    try:
        validate_bench_manifest(read_manifest(tmp_path), tmp_path, TYPES, name="m")
    except ValidationError as exc:
        return exc.failures
    return []


def test_good_bench_manifest_passes(tmp_path):
    assert _failures(tmp_path, _bench(tmp_path)) == []


@pytest.mark.parametrize(("breakage", "expected"), [
    pytest.param(lambda rows, root: rows[1].update(id="im0"), "expect_column_values_to_be_unique(column=id)", id="duplicate-id"),
    pytest.param(lambda rows, root: rows[0]["defects"][0].update(bbox=[10, 10, 90, 30]), "column_A=width, column_B=x2", id="box-past-right-edge"),
    pytest.param(lambda rows, root: rows[0]["defects"][0].update(bbox=[40, 10, 10, 30]), "column_A=x2, column_B=x1", id="box-inverted"),
    pytest.param(lambda rows, root: rows[0]["defects"][0].update(severity=7), "column=severity", id="severity-7"),
    pytest.param(lambda rows, root: rows[0]["defects"][0].update(type="glitter"), "column=type", id="unknown-type"),
    pytest.param(lambda rows, root: rows[0].update(mos=5.5), "column=mos,", id="mos-above-5"),
    pytest.param(lambda rows, root: rows[0].update(mos_std=-0.1), "column=mos_std", id="negative-std"),
    pytest.param(lambda rows, root: rows[2].update(has_defect=True), "column_A=has_defect", id="has-defect-without-defects"),
    pytest.param(lambda rows, root: rows[1].update(defects=[]), "column_A=has_defect", id="defects-without-has-defect"),
    pytest.param(lambda rows, root: rows[2].update(source="a.jpg"), "source a.jpg is in several splits (test, train)", id="source-in-two-splits"),
    pytest.param(lambda rows, root: (root / "images" / "im1.png").unlink(), "im1: image file", id="missing-image"),
    pytest.param(lambda rows, root: rows[1].update(width=81), "is 80x60, manifest says 81x60", id="wrong-size"),
    pytest.param(lambda rows, root: rows[1].update(split="holdout"), "column=split", id="unknown-split"),
])
def test_each_broken_rule_is_reported(tmp_path, breakage, expected):
    rows = _bench(tmp_path)
    breakage(rows, tmp_path)
    failures = _failures(tmp_path, rows)
    assert any(expected in line for line in failures), failures


def test_image_paths_outside_the_bench_folder_are_refused(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    rows = _bench(bench)
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(outside)  # a real file of the right size
    escapes = {"im0": str(outside), "im1": "../outside.png", "im2": "images/../../outside.png"}
    for row in rows:
        row["image"] = escapes[row["id"]]
    failures = _failures(bench, rows)
    assert failures == ["manifest: im0: image path " + repr(str(outside)) + " is absolute",
                        "manifest: im1: image path '../outside.png' leaves the folder",
                        "manifest: im2: image path 'images/../../outside.png' leaves the folder"]
    rows[0]["image"], rows[1]["image"] = "C:\\bench\\im0.png", "images/../images/im1.png"
    rows[2]["image"] = "images/im2.png"
    assert _failures(bench, rows) == ["manifest: im0: image path 'C:\\\\bench\\\\im0.png' is absolute"]
