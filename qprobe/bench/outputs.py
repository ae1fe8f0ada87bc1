"""The output folder of ``qprobe bench``: its layout, the files bench owns there, the manifest and metrics.

The manifest is written beside its final name, validated, then renamed into place
(:func:`write_validated_manifest`); :func:`bench_metrics` is the metrics file's content.

Ownership: the output folder may hold files bench did not write (it may be any folder a user
names). Bench lists every file it writes in ``.qprobe-owned.json`` (written atomically, *before*
the files) and deletes only files in that list, and leftovers of its own killed atomic writes of
them. A run whose plan would overwrite an image or record that is not in the list refuses before
writing anything; a finished record of the same settings (it names its image and the settings'
fingerprint, and is rewritten byte for byte anyway) is taken over. A run that has images to
(re)make removes the old manifest first, so a killed run never leaves a manifest that describes
images it has replaced.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.data.manifest import MANIFEST_NAME, SPLITS, read_manifest, write_manifest
from qprobe.data.sources import SKIP_REASONS
from qprobe.defects import TYPES
from qprobe.errors import QProbeError
from qprobe.io import atomic_temp_target, outside_folder, write_json_atomic

IMAGES_DIR = "images"
RECORDS_DIR = "records"
CONTACT_SHEET = "contact_sheet.jpg"
INVALID_MANIFEST = "manifest.invalid.parquet"
CANDIDATE_MANIFEST = "manifest.candidate.parquet"
LEDGER = ".qprobe-owned.json"
FINGERPRINT_KEY = "qprobe.bench.fingerprint"  # the manifest's metadata key of the settings' fingerprint
# The documented outputs at fixed names: always bench's to write (and to remove when invalid).
FIXED_OUTPUTS = (MANIFEST_NAME, CANDIDATE_MANIFEST, INVALID_MANIFEST, CONTACT_SHEET)


class ForeignFileError(QProbeError, ValueError):
    """A file in the output folder that bench would have to overwrite but cannot prove it wrote."""


def job_files(job_id: str, fmt: str) -> set[str]:
    """The files one image writes, relative to the output folder (the ledger's form)."""
    return {f"{IMAGES_DIR}/{job_id}.{fmt}", f"{RECORDS_DIR}/{job_id}.json"}


def read_ledger(out: Path) -> set[str]:
    """The files (relative paths) bench recorded as its own in ``out``; empty for a folder it never wrote."""
    path = out / LEDGER
    if not path.exists():
        return set()
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("'files' is not a list of paths")
        escaping = next((f for f in files if outside_folder(f)), None)
        if escaping is not None:
            raise ValueError(f"{escaping!r} {outside_folder(escaping)}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ForeignFileError(f"{path}: unreadable list of the files bench wrote ({exc}); "
                               "bench cannot tell its files from others: choose another --out") from exc
    return set(files)


def write_ledger(out: Path, files: set[str]) -> None:
    """Record ``files`` as bench's own in ``out``."""
    write_json_atomic(out / LEDGER, {"files": sorted(files)})


def refuse_foreign(out: Path, files: set[str], owned: set[str]) -> None:
    """Raise :class:`ForeignFileError` if any of ``files`` exists in ``out`` but is not ``owned``."""
    foreign = sorted(f for f in files - owned if os.path.lexists(out / f))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ForeignFileError(f"{out / foreign[0]}{more}: exists but bench did not write it (not in "
                               f"{out / LEDGER}); move it away or choose another --out (nothing was written)")


def remove_stale(out: Path, owned: set[str], keep: set[str]) -> int:
    """Delete the owned files not in ``keep`` (earlier plans) and leftovers of killed writes of owned files.

    Returns how many files it deleted. A file that is not in ``owned`` is never touched.
    """
    stale = [out / rel for rel in sorted(owned - keep)]
    for folder in (out, out / IMAGES_DIR, out / RECORDS_DIR):
        if folder.is_dir():
            stale += [p for p in sorted(folder.glob(".*.tmp*"))
                      if (target := atomic_temp_target(p)) is not None
                      and target.relative_to(out).as_posix() in owned]
    removed = 0
    for path in stale:
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def bench_metrics(records: list[dict[str, Any]], skipped: Counter, new: int, listed: int,
                  seconds: float) -> dict[str, Any]:
    """The metrics file of a run: counts of images, defects, skipped photos and splits, the MOS's spread, and
    the longer side of the source photos used (what "high resolution" means for this bench)."""
    defects = [d for r in records for d in r["defects"]]
    long_sides = list({r["key"]: max(r["width"], r["height"]) for r in records}.values())
    scores = np.array([r["mos"] for r in records], dtype=np.float64)
    return {
        "images": len(records),
        "images_new": new,
        "images_resumed": len(records) - new,
        "pristine": sum(not r["has_defect"] for r in records),
        "with_defects": sum(bool(r["has_defect"]) for r in records),
        "defects": len(defects),
        "sources_listed": listed,
        "sources_used": len(long_sides),
        "source_long_side": {"min": min(long_sides), "max": max(long_sides)},
        "skipped": {"total": sum(skipped.values()), **{reason: skipped.get(reason, 0) for reason in SKIP_REASONS}},
        "defects_by_type": {t: sum(d["type"] == t for d in defects) for t in TYPES},
        "defects_by_severity": {str(s): sum(d["severity"] == s for d in defects) for s in range(1, 6)},
        "splits": {s: sum(r["split"] == s for r in records) for s in SPLITS},
        "mos": {"mean": round(float(scores.mean()), 4), "std": round(float(scores.std()), 4),
                "min": round(float(scores.min()), 4), "max": round(float(scores.max()), 4)},
        "seconds": round(seconds, 2),
    }


def write_validated_manifest(records: list[dict[str, Any]], out: Path, fingerprint: str) -> Path:
    """Write the manifest beside its final name, validate it, then rename it into place.

    A manifest that fails is kept as ``manifest.invalid.parquet`` for inspection, and any older
    ``manifest.parquet`` is removed, so nothing downstream mistakes it for a good one.
    """
    # GX takes seconds to import; only the parent process, once, needs it.
    from qprobe.validation.bench import validate_bench_manifest
    from qprobe.validation.core import ValidationError

    final, invalid = out / MANIFEST_NAME, out / INVALID_MANIFEST
    candidate = write_manifest(records, out / CANDIDATE_MANIFEST, metadata={FINGERPRINT_KEY: fingerprint})
    try:
        validate_bench_manifest(read_manifest(candidate), out, TYPES, name=str(final))
    except ValidationError:
        os.replace(candidate, invalid)
        final.unlink(missing_ok=True)
        raise
    os.replace(candidate, final)
    invalid.unlink(missing_ok=True)
    return final
