"""What every public-dataset loader shares: entries, score scales, score tables and file lookups.

A loader reads one official release and returns a :class:`Release`: one :class:`Entry` per rated
image, with its score already checked against the dataset's published range and mapped onto 1-5
by the dataset's :class:`Scale`. Every problem is a :class:`DatasetError` whose message names the
file, and the row and column (or line, or JSON entry and key) where it was found.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qprobe.errors import QProbeError

XLSX_SUFFIXES = (".xlsx", ".xlsm")


class DatasetError(QProbeError, ValueError):
    """A release that does not follow its official layout; the message names file, row and column."""


@dataclass(frozen=True)
class Scale:
    """A dataset's published score range, mapped linearly onto 1-5 with 5 the best quality."""

    low: float
    high: float
    higher_is_better: bool = True

    def mos(self, raw: float) -> float:
        t = (raw - self.low) / (self.high - self.low)
        return 1.0 + 4.0 * (t if self.higher_is_better else 1.0 - t)

    def std(self, raw_std: float) -> float:
        """A standard deviation on the raw scale, on the 1-5 scale (the same factor, never inverted)."""
        return raw_std * 4.0 / (self.high - self.low)

    def check(self, raw: float, where: str) -> float:
        if not self.low <= raw <= self.high:
            raise DatasetError(f"{where}: score {raw:g} is outside the published range "
                               f"[{self.low:g}, {self.high:g}]")
        return raw


@dataclass(frozen=True)
class Entry:
    """One rated image of a release."""

    key: str  # the release's own name for the image; the manifest id is "<dataset>:<key>"
    image: Path
    source: Path  # the pristine reference (full-reference sets) or the image itself
    mos_raw: float
    mos: float
    mos_std: float | None = None
    split: str | None = None  # the official split; None where the release has none


@dataclass
class Release:
    entries: list[Entry]
    # The score files read; their md5 is the dataset digest recorded in MLflow (hashing every
    # image of a 10k-image release on each import would take minutes).
    annotations: list[Path] = field(default_factory=list)


def scored(key: str, image: Path, source: Path, raw: float, scale: Scale, *,
           std: float | None = None, split: str | None = None) -> Entry:
    """An :class:`Entry` whose raw score (already range-checked) and std are mapped by ``scale``."""
    return Entry(key=key, image=image, source=source, mos_raw=raw, mos=scale.mos(raw),
                 mos_std=None if std is None else scale.std(std), split=split)


def number(value: Any, where: str) -> float:
    """``value`` (a cell, a JSON value, a word of a text file) as a finite float."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        x = float(value)
    else:
        text = "" if value is None else str(value).strip()
        try:
            x = float(text)
        except ValueError:
            raise DatasetError(f"{where}: expected a number, got {text!r}") from None
    if not math.isfinite(x):
        raise DatasetError(f"{where}: expected a finite number, got {x}")
    return x


def spread(value: Any, where: str) -> float:
    """A standard deviation or variance: a number that is not negative."""
    x = number(value, where)
    if x < 0:
        raise DatasetError(f"{where}: a spread cannot be negative, got {x:g}")
    return x


def label(value: Any) -> str:
    """A cell as text; spreadsheets store names such as CSIQ's ``1600`` as numbers."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value).strip()


@dataclass
class Table:
    """A score sheet (CSV or xlsx): its header and its non-blank rows with their row numbers."""

    path: Path
    columns: list[str]
    rows: list[tuple[int, dict[str, Any]]]

    def where(self, row: int, column: str) -> str:
        return f"{self.path}: row {row}, column {column!r}"

    def text(self, row: int, values: dict[str, Any], column: str) -> str:
        text = label(values.get(column))
        if not text:
            raise DatasetError(f"{self.where(row, column)}: empty cell")
        return text

    def number(self, row: int, values: dict[str, Any], column: str) -> float:
        return number(values.get(column), self.where(row, column))

    def spread(self, row: int, values: dict[str, Any], column: str) -> float:
        return spread(values.get(column), self.where(row, column))

    def score(self, row: int, values: dict[str, Any], column: str, scale: Scale) -> float:
        where = self.where(row, column)
        return scale.check(number(values.get(column), where), where)


def read_table(path: Path, required: Sequence[str], sheet: str | None = None) -> Table:
    """Read a CSV file or an xlsx sheet whose header row holds every name in ``required``.

    The header is the first row that names all of them, so sheets with title rows above the table
    (CSIQ's) read like plain CSV files. ``sheet`` picks an xlsx worksheet (default: the first).
    """
    grid = _xlsx_rows(path, sheet) if path.suffix.lower() in XLSX_SUFFIXES else _csv_rows(path)
    best: list[str] = []
    for index, (_, cells) in enumerate(grid):
        names = [label(c) for c in cells]
        if all(r in names for r in required):
            rows = [(n, dict(zip(names, values, strict=False))) for n, values in grid[index + 1:]
                    if any(label(v) for v in values)]
            return Table(path=path, columns=names, rows=rows)
        if sum(r in names for r in required) > sum(r in best for r in required) or not best:
            best = names
    missing = [r for r in required if r not in best]
    found = ", ".join(n for n in best if n) or "nothing"
    raise DatasetError(f"{path}: missing column {missing[0]!r} (needs {', '.join(required)}; "
                       f"its header has {found})")


def _csv_rows(path: Path) -> list[tuple[int, list[Any]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            sample = fh.read(8192)
            fh.seek(0)
            # A spreadsheet exported in a comma-decimal locale uses ';'; the official CSVs use ','.
            try:
                dialect: Any = csv.Sniffer().sniff(sample, delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel
            reader = csv.reader(fh, dialect)
            return [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _xlsx_rows(path: Path, sheet: str | None) -> list[tuple[int, list[Any]]]:
    import openpyxl

    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises zipfile, KeyError and its own errors for a bad file
        raise DatasetError(f"{path}: not a readable xlsx workbook ({exc})") from exc
    try:
        if sheet is not None and sheet not in workbook.sheetnames:
            raise DatasetError(f"{path}: no sheet {sheet!r} (has {', '.join(workbook.sheetnames)})")
        worksheet = workbook[sheet] if sheet is not None else workbook.worksheets[0]
        return [(n, list(row)) for n, row in enumerate(worksheet.iter_rows(values_only=True), start=1)]
    finally:
        workbook.close()


def find_file(root: Path, *names: str) -> Path:
    """The first of ``names`` (relative paths) found at ``root`` or one folder below it.

    Release archives often unpack into a wrapper folder (``kadid10k/``, ``ChallengeDB_release/``),
    so ``--root`` may name either the archive's folder or the folder that holds it.
    """
    for name in names:
        for candidate in (root / name, *sorted(root.glob(f"*/{name}"))):
            if candidate.is_file():
                return candidate
    raise DatasetError(f"{root}: missing {' or '.join(names)} (looked in the folder and one folder below)")


def find_dir(root: Path, *names: str) -> Path:
    """Like :func:`find_file`, for a folder."""
    for name in names:
        for candidate in (root / name, *sorted(root.glob(f"*/{name}"))):
            if candidate.is_dir():
                return candidate
    raise DatasetError(f"{root}: missing folder {' or '.join(names)} (looked in the folder and one folder below)")


def require_image(path: Path, where: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{where}: image {path} not found")
    return path
