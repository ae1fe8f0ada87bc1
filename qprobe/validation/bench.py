"""The bench manifest's suite: what ``qprobe bench`` checks before it calls a manifest good.

Two frames are validated. The manifest itself (one row per image): unique ids and image paths,
no nulls in required columns, splits from ``train``/``val``/``test``, MOS in ``[1, 5]``,
``mos_std >= 0``, ``has_defect`` true exactly when ``defects`` is non-empty, every image path
relative and inside the bench folder (or S3 prefix), every image file present with the recorded width and height, and no source photo in two splits. The defects
exploded to one row each: severity in ``1..5``, a known type, and a non-empty box inside its image.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path

import great_expectations.expectations as gxe
import pandas as pd

from qprobe.bench.outputs import BenchOut
from qprobe.data.manifest import SPLITS
from qprobe.io import outside_folder
from qprobe.validation.core import Check, Suite, require

MAX_LISTED = 5  # offending rows named per Python check


def defects_frame(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per defect: ``id, type, severity, x1, y1, x2, y2, width, height``."""
    rows = [
        {"id": row.id, "type": d["type"], "severity": d["severity"],
         "x1": d["bbox"][0], "y1": d["bbox"][1], "x2": d["bbox"][2], "y2": d["bbox"][3],
         "width": row.width, "height": row.height}
        for row in manifest.itertuples(index=False)
        for d in (row.defects if row.defects is not None else [])
    ]
    columns = ["id", "type", "severity", "x1", "y1", "x2", "y2", "width", "height"]
    return pd.DataFrame(rows, columns=columns)


def _listed(lines: list[str]) -> Iterator[str]:
    yield from lines[:MAX_LISTED]
    if len(lines) > MAX_LISTED:
        yield f"... and {len(lines) - MAX_LISTED} more like these"


def splits_disjoint_by_source(manifest: pd.DataFrame) -> Iterator[str]:
    splits = manifest.groupby("source")["split"].unique()
    leaks = [f"source {src} is in several splits ({', '.join(sorted(s))})" for src, s in splits.items() if len(s) > 1]
    yield from _listed(leaks)


def image_files_check(root: str | Path) -> Check:
    """A check that every ``image`` lies inside ``root`` (a folder or ``s3://`` prefix) and exists there with the row's width and height."""

    def check(manifest: pd.DataFrame) -> Iterator[str]:
        out = BenchOut(str(root))
        problems = []
        for row in manifest.itertuples(index=False):
            if reason := outside_folder(row.image):
                problems.append(f"{row.id}: image path {row.image!r} {reason}")
                continue
            path = out.locate(row.image)
            try:
                size = out.image_size(row.image)
            except FileNotFoundError:
                problems.append(f"{row.id}: image file {path} is missing")
                continue
            except OSError as exc:
                problems.append(f"{row.id}: image file {path} is unreadable ({exc})")
                continue
            if size != (row.width, row.height):
                problems.append(f"{row.id}: {path} is {size[0]}x{size[1]}, manifest says {row.width}x{row.height}")
        yield from _listed(problems)

    return check


def manifest_suite(root: str | Path) -> Suite:
    """The suite for the manifest rows; image paths are resolved against ``root`` (a folder or ``s3://`` prefix)."""
    return Suite(
        name="manifest",
        expectations=[
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("id", "image", "source", "split", "has_defect", "mos")],
            gxe.ExpectColumnValuesToBeUnique(column="id"),
            gxe.ExpectColumnValuesToBeUnique(column="image"),
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
            gxe.ExpectColumnValuesToBeBetween(column="mos", min_value=1.0, max_value=5.0),
            gxe.ExpectColumnValuesToBeBetween(column="mos_std", min_value=0.0),
            gxe.ExpectColumnValuesToBeBetween(column="width", min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="height", min_value=1),
            gxe.ExpectColumnPairValuesToBeEqual(column_A="has_defect", column_B="defects_listed"),
        ],
        checks=[splits_disjoint_by_source, image_files_check(root)],
    )


def defects_suite(types: Collection[str]) -> Suite:
    return Suite(
        name="defects",
        expectations=[
            gxe.ExpectColumnValuesToBeBetween(column="severity", min_value=1, max_value=5),
            gxe.ExpectColumnValuesToBeInSet(column="type", value_set=sorted(types)),
            gxe.ExpectColumnValuesToBeBetween(column="x1", min_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="y1", min_value=0),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="x2", column_B="x1"),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="y2", column_B="y1"),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="width", column_B="x2", or_equal=True),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="height", column_B="y2", or_equal=True),
        ],
    )


def validate_bench_manifest(manifest: pd.DataFrame, root: str | Path, types: Collection[str], name: str) -> None:
    """Raise :class:`~qprobe.validation.core.ValidationError` (every failure listed) unless the manifest is good.

    ``root`` is the folder or ``s3://`` prefix the manifest's image paths are relative to; ``types``
    the known defect types.
    """
    rows = manifest.assign(defects_listed=[d is not None and len(d) > 0 for d in manifest["defects"]])
    require((manifest_suite(root), rows), (defects_suite(types), defects_frame(manifest)), name=name)
