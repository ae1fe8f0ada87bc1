"""High-resolution no-reference sets, the kind a model that crops at native resolution is held out on:
UHD-IQA (6,073 photos 3840 px wide) and HRIQ (1,120 photos at 2880x2160). Each image is its own source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qprobe.data.public.common import (
    DatasetError,
    Entry,
    Release,
    Scale,
    Table,
    find_file,
    read_table,
    require_image,
    scored,
)

UHDIQA = Scale(0, 1)
HRIQ = Scale(1, 5)

# UHD-IQA's `set` column (and its per-set folders and files) -> the manifest's split.
_UHDIQA_SETS = {"training": "train", "validation": "val", "test": "test"}
_UHDIQA_COLUMNS = ("image_name", "quality_mos")
# The column of HRIQ's score file that its authors' own scripts read as the MOS (1-based, as MATLAB counts).
_HRIQ_MOS_POSITION = 8


def load_uhdiqa(root: Path) -> Release:
    """UHD-IQA: ``uhd-iqa-metadata.csv`` (``image_name``, ``quality_mos``, ``set``) + ``training/``,
    ``validation/``, ``test/``.

    The official split is the ``set`` column. The AIM 2024 challenge's package ships one file per set
    instead (``uhd-iqa-training-metadata.csv``, ``uhd-iqa-validation-metadata.csv``, and the test one once
    its scores were published): read where the full metadata file is absent, each row in its file's set.
    """
    path = _optional_file(root, "uhd-iqa-metadata.csv")
    if path is None:
        return _uhdiqa_per_set(root)
    table = read_table(path, (*_UHDIQA_COLUMNS, "set"))
    entries = []
    for row, values in table.rows:
        value = table.text(row, values, "set")
        if value not in _UHDIQA_SETS:
            raise DatasetError(f"{table.where(row, 'set')}: unknown set {value!r} "
                               f"(expected {', '.join(_UHDIQA_SETS)})")
        entries.append(_uhdiqa_entry(table, row, values, value))
    return Release(entries, [table.path])


def _uhdiqa_per_set(root: Path) -> Release:
    """The challenge layout: one metadata file per set."""
    tables = [(name, read_table(path, _UHDIQA_COLUMNS)) for name in _UHDIQA_SETS
              if (path := _optional_file(root, f"uhd-iqa-{name}-metadata.csv")) is not None]
    if not tables:
        raise DatasetError(f"{root}: missing uhd-iqa-metadata.csv (or the challenge's "
                           f"uhd-iqa-training-metadata.csv ...; looked in the folder and one folder below)")
    entries = [_uhdiqa_entry(table, row, values, name) for name, table in tables for row, values in table.rows]
    return Release(entries, [table.path for _, table in tables])


def _optional_file(root: Path, name: str) -> Path | None:
    try:
        return find_file(root, name)
    except DatasetError:
        return None


def _uhdiqa_entry(table: Table, row: int, values: dict[str, Any], set_name: str) -> Entry:
    """A row of a UHD-IQA metadata file; its image is in the folder named after its set."""
    name = table.text(row, values, "image_name")
    image = require_image(table.path.parent / set_name / name, table.where(row, "image_name"))
    return scored(name, image, image, table.score(row, values, "quality_mos", UHDIQA), UHDIQA,
                  split=_UHDIQA_SETS[set_name])


def load_hriq(root: Path) -> Release:
    """HRIQ: ``hriq_mos_file.csv`` + the photos at 2880x2160, the resolution the subjects rated.

    The release documents no column names: its authors' scripts read the image's path (relative to the
    release folder) from the first column and the MOS, on 1-5, from the eighth. So does this loader, unless
    a column is named ``MOS`` (any case), which it then prefers. An image path that is a bare name is looked
    up in ``2880x2160/`` (the release also ships 1024x768 and 512x384 copies, never rated as such). No
    official split: the import draws one.
    """
    table = read_table(find_file(root, "hriq_mos_file.csv"), ())
    if not table.columns or not table.columns[0]:
        raise DatasetError(f"{table.path}: expected a header row naming the image column first")
    image_column = table.columns[0]
    mos_column = next((c for c in table.columns if c.lower() == "mos"), None)
    if mos_column is None:
        if len(table.columns) < _HRIQ_MOS_POSITION:
            raise DatasetError(f"{table.path}: expected a 'MOS' column or the MOS in column {_HRIQ_MOS_POSITION}, "
                               f"found {len(table.columns)} columns ({', '.join(table.columns)})")
        mos_column = table.columns[_HRIQ_MOS_POSITION - 1]
    folder = table.path.parent
    entries = []
    for row, values in table.rows:
        name = table.text(row, values, image_column)
        image = folder / name if (folder / name).is_file() else folder / "2880x2160" / name
        require_image(image, table.where(row, image_column))
        entries.append(scored(Path(name).name, image, image, table.score(row, values, mos_column, HRIQ), HRIQ))
    return Release(entries, [table.path])
