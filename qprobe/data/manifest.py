"""The bench manifest: one row per image, the contract between every stage that reads images.

Columns (``docs/architecture.md``, *Data schemas*):

==============  =========================================================================
``id``          unique string id
``image``       image path relative to the manifest's folder
``source``      the pristine original (path or URI) the image was made from; splits are by source
``width``       pixels of the stored image (EXIF orientation applied)
``height``
``split``       ``train`` / ``val`` / ``test``
``has_defect``  bool; null where unknown (public IQA sets)
``defects``     list of ``{type, severity 1-5, bbox [x1, y1, x2, y2]}`` in original pixels
``mos``         mean opinion score mapped to 1-5
``mos_std``     its standard deviation on the same scale (null where unknown)
``mos_raw``     the score as the dataset published it (null for synthesised images)
==============  =========================================================================

The file is Parquet, written atomically, and loads with
``datasets.load_dataset("parquet", data_files=".../manifest.parquet")``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qprobe.errors import QProbeError
from qprobe.io import atomic_path

MANIFEST_NAME = "manifest.parquet"
SPLITS = ("train", "val", "test")

DEFECT_TYPE = pa.struct(
    [
        pa.field("type", pa.string()),
        pa.field("severity", pa.int32()),
        pa.field("bbox", pa.list_(pa.int32(), 4)),
    ]
)

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("has_defect", pa.bool_()),
        pa.field("defects", pa.list_(DEFECT_TYPE)),
        pa.field("mos", pa.float64(), nullable=False),
        pa.field("mos_std", pa.float64()),
        pa.field("mos_raw", pa.float64()),
    ]
)


@dataclass(frozen=True)
class Defect:
    type: str
    severity: int
    bbox: tuple[int, int, int, int]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bbox"] = [int(v) for v in self.bbox]
        return d


class ManifestError(QProbeError, ValueError):
    """A manifest file that does not follow the schema."""


def _row(record: dict[str, Any]) -> dict[str, Any]:
    row = {name: record.get(name) for name in SCHEMA.names}
    defects = row["defects"] or []
    row["defects"] = [d.to_dict() if isinstance(d, Defect) else dict(d) for d in defects]
    return row


def write_manifest(records: list[dict[str, Any]], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``records`` (dicts with the schema's keys) to ``path`` atomically; returns the path.

    ``metadata`` goes into the Parquet schema's key/value metadata (see :func:`manifest_metadata`).
    """
    path = Path(path)
    if path.is_dir() or path.suffix != ".parquet":
        path = path / MANIFEST_NAME
    table = pa.Table.from_pylist([_row(r) for r in records], schema=SCHEMA.with_metadata(metadata or {}))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest (file or the folder holding ``manifest.parquet``) into a DataFrame.

    Raises :class:`ManifestError` naming the file and the first missing column.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise ManifestError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [n for n in SCHEMA.names if n not in table.column_names and n != "mos_raw"]
    if missing:
        raise ManifestError(f"{path}: missing column {missing[0]!r} (expected {', '.join(SCHEMA.names)})")
    df = table.to_pandas()
    if "mos_raw" not in df:
        df["mos_raw"] = None
    df.attrs["path"] = str(path)
    return df


def manifest_metadata(path: str | Path) -> dict[str, str]:
    """The key/value metadata :func:`write_manifest` stored (Arrow's own keys left out), from the footer alone."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        stored = pq.read_schema(path).metadata or {}
    except Exception as exc:
        raise ManifestError(f"{path}: not a readable Parquet file ({exc})") from exc
    return {k.decode(): v.decode() for k, v in stored.items() if not k.startswith(b"ARROW:")}


def image_path(manifest_path: str | Path, relpath: str) -> Path:
    """Absolute path of a manifest row's image (``image`` is relative to the manifest's folder)."""
    manifest_path = Path(manifest_path)
    folder = manifest_path if manifest_path.is_dir() else manifest_path.parent
    return folder / relpath
