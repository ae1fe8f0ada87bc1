"""The output of ``qprobe bench`` (a folder, or an S3 prefix): its layout, the files bench owns there, the manifest and metrics.

:class:`BenchOut` is where bench writes, a local folder or ``s3://bucket/prefix``, its files named
by their path relative to it. On S3 every worker (a Ray task on any machine) writes its images and
records as objects itself, and the driver the ledger, contact sheet and manifest; nothing needs the
driver's disk. A local write is atomic (a temporary file renamed into place); an S3 PUT is atomic
by nature, so a prefix never holds half an object and has no leftovers to clean.

The manifest is written beside its final name (on S3: in a temporary folder), validated, then put
in place (:func:`write_validated_manifest`), after every other file of the run, so a reader never
sees a manifest naming an image that is not there yet; :func:`bench_metrics` is the metrics file's
content.

Ownership: the output may hold files bench did not write (it may be any folder or prefix a user
names). Bench lists every file it writes in ``.qprobe-owned.json`` (written *before* the files)
and deletes only files in that list, and locally leftovers of its own killed atomic writes of
them. A run whose plan would overwrite an image or record that is not in the list refuses before
writing anything; a finished record of the same settings (it names its image and the settings'
fingerprint, and is rewritten byte for byte anyway) is taken over. A run that has images to
(re)make or remove deletes the old manifest first, so a killed run never leaves a manifest that
describes images it has replaced or removed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qprobe import storage
from qprobe.data.manifest import MANIFEST_NAME, SPLITS, read_manifest, write_manifest
from qprobe.data.sources import SKIP_REASONS
from qprobe.defects import TYPES
from qprobe.errors import QProbeError
from qprobe.io import atomic_temp_target, image_size, json_bytes, outside_folder, write_bytes_atomic

IMAGES_DIR = "images"
RECORDS_DIR = "records"
CONTACT_SHEET = "contact_sheet.jpg"
INVALID_MANIFEST = "manifest.invalid.parquet"
CANDIDATE_MANIFEST = "manifest.candidate.parquet"
LEDGER = ".qprobe-owned.json"
FINGERPRINT_KEY = "qprobe.bench.fingerprint"  # the manifest's metadata key of the settings' fingerprint
# The documented outputs at fixed names: always bench's to write (and to remove when invalid).
FIXED_OUTPUTS = (MANIFEST_NAME, CANDIDATE_MANIFEST, INVALID_MANIFEST, CONTACT_SHEET)
# Enough of a PNG or WebP file to hold its header, for an image's size without downloading it.
_HEADER_BYTES = 1 << 16


@dataclass(frozen=True)
class BenchOut:
    """Bench's output: a folder or an ``s3://bucket/prefix`` (``root``); files are paths relative to it.

    It pickles as its root alone, so a worker anywhere writes to the same place.
    """

    root: str

    @property
    def is_s3(self) -> bool:
        return storage.is_s3_uri(self.root)

    def locate(self, rel: str) -> str:
        """The path or URI of the file ``rel`` (for messages, and what a reader opens)."""
        return f"{self.root.rstrip('/')}/{rel}" if self.is_s3 else str(Path(self.root) / rel)

    def exists(self) -> bool:
        """Whether the folder exists, or the prefix holds any object."""
        if self.is_s3:
            return next(storage.list_objects(self.locate("")), None) is not None
        return Path(self.root).exists()

    def files(self) -> set[str]:
        """Every file there, as relative paths (locally a symlink counts, dangling or not); one listing."""
        if self.is_s3:
            _, prefix = storage.parse_s3_uri(self.locate(""))
            return {obj.key[len(prefix):] for obj in storage.list_objects(self.locate(""))}
        root = Path(self.root)
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_symlink() or not p.is_dir()}

    def read(self, rel: str) -> bytes:
        """The bytes of ``rel``; a missing file raises :class:`FileNotFoundError` (on S3 too)."""
        if self.is_s3:
            return storage.download_bytes(self.locate(rel))
        return Path(self.locate(rel)).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        """Write ``rel`` whole, atomically (see the module docstring)."""
        if self.is_s3:
            storage.upload_bytes(data, self.locate(rel))
        else:
            write_bytes_atomic(self.locate(rel), data)

    def delete(self, rel: str) -> None:
        """Delete ``rel`` if it is there."""
        if self.is_s3:
            storage.delete_object(self.locate(rel))
        else:
            Path(self.locate(rel)).unlink(missing_ok=True)

    def remove_root(self) -> None:
        """Remove the emptied folder (an S3 prefix with no objects is already gone)."""
        if not self.is_s3:
            Path(self.root).rmdir()

    def image_size(self, rel: str) -> tuple[int, int]:
        """Width and height of the image ``rel`` from its header; :class:`FileNotFoundError` when missing."""
        if not self.is_s3:
            return image_size(self.locate(rel))
        # The header alone, not the whole image; bench's images come from arrays and carry no EXIF
        # orientation to apply.
        with Image.open(io.BytesIO(storage.download_bytes(self.locate(rel), first=_HEADER_BYTES))) as img:
            return img.size

    def leftovers(self, owned: set[str], present: set[str]) -> set[str]:
        """Of ``present``, the temporaries of killed atomic writes of ``owned`` files (none on S3: PUTs leave none)."""
        if self.is_s3:
            return set()
        return {rel for rel in present if (target := atomic_temp_target(rel)) is not None
                and target.as_posix() in owned}

    @contextlib.contextmanager
    def staged(self, rel: str) -> Iterator[Path]:
        """A local path to write ``rel`` at before :meth:`publish`: beside its place locally, a temporary folder for S3."""
        if not self.is_s3:
            yield Path(self.locate(rel))
            return
        with tempfile.TemporaryDirectory(prefix="qprobe-bench-") as folder:
            yield Path(folder) / Path(rel).name

    def publish(self, path: Path, rel: str) -> None:
        """Move the local file ``path`` to ``rel`` (a rename locally, an upload to S3)."""
        if self.is_s3:
            storage.upload_file(path, self.locate(rel))
            path.unlink()
        else:
            os.replace(path, self.locate(rel))

    @contextlib.contextmanager
    def local_copy(self, rel: str) -> Iterator[Path]:
        """A local path holding ``rel``, for tools that open files (MLflow's artifact upload)."""
        if not self.is_s3:
            yield Path(self.locate(rel))
            return
        with tempfile.TemporaryDirectory(prefix="qprobe-bench-") as folder:
            yield storage.download_file(self.locate(rel), Path(folder) / Path(rel).name)


class ForeignFileError(QProbeError, ValueError):
    """A file in the output folder that bench would have to overwrite but cannot prove it wrote."""


def job_paths(job_id: str, fmt: str) -> tuple[str, str]:
    """The image and the record one image writes, relative to the output (the ledger's form)."""
    return f"{IMAGES_DIR}/{job_id}.{fmt}", f"{RECORDS_DIR}/{job_id}.json"


def job_files(job_id: str, fmt: str) -> set[str]:
    return set(job_paths(job_id, fmt))


def read_ledger(out: BenchOut) -> set[str]:
    """The files (relative paths) bench recorded as its own in ``out``; empty for an output it never wrote."""
    path = out.locate(LEDGER)
    try:
        files = json.loads(out.read(LEDGER))["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("'files' is not a list of paths")
        escaping = next((f for f in files if outside_folder(f)), None)
        if escaping is not None:
            raise ValueError(f"{escaping!r} {outside_folder(escaping)}")
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ForeignFileError(f"{path}: unreadable list of the files bench wrote ({exc}); "
                               "bench cannot tell its files from others: choose another --out") from exc
    return set(files)


def write_ledger(out: BenchOut, files: set[str]) -> None:
    """Record ``files`` as bench's own in ``out``."""
    out.write(LEDGER, json_bytes({"files": sorted(files)}))


def refuse_foreign(out: BenchOut, files: set[str], owned: set[str], present: set[str]) -> None:
    """Raise :class:`ForeignFileError` if any of ``files`` is ``present`` in ``out`` but is not ``owned``."""
    foreign = sorted((files - owned) & present)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ForeignFileError(f"{out.locate(foreign[0])}{more}: exists but bench did not write it (not in "
                               f"{out.locate(LEDGER)}); move it away or choose another --out (nothing was written)")


def remove_stale(out: BenchOut, owned: set[str], keep: set[str]) -> int:
    """Delete the owned files not in ``keep`` (earlier plans) and leftovers of killed writes of owned files.

    Returns how many files it deleted. A file that is not in ``owned`` is never touched. The
    manifest goes first: it may name the images about to go.
    """
    present = out.files()
    stale = sorted(((owned - keep) & present) | out.leftovers(owned, present))
    if stale:
        out.delete(MANIFEST_NAME)
    for rel in stale:
        out.delete(rel)
    return len(stale)


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


def write_validated_manifest(records: list[dict[str, Any]], out: BenchOut, fingerprint: str) -> str:
    """Write the manifest beside its final name, validate it, then put it in place; returns where.

    A manifest that fails is kept as ``manifest.invalid.parquet`` for inspection, and any older
    ``manifest.parquet`` is removed, so nothing downstream mistakes it for a good one.
    """
    # GX takes seconds to import; only the parent process, once, needs it.
    from qprobe.validation.bench import validate_bench_manifest
    from qprobe.validation.core import ValidationError

    final = out.locate(MANIFEST_NAME)
    with out.staged(CANDIDATE_MANIFEST) as staged:
        candidate = write_manifest(records, staged, metadata={FINGERPRINT_KEY: fingerprint})
        try:
            validate_bench_manifest(read_manifest(candidate), out.root, TYPES, name=final)
        except ValidationError:
            out.publish(candidate, INVALID_MANIFEST)
            out.delete(MANIFEST_NAME)
            raise
        out.publish(candidate, MANIFEST_NAME)
    out.delete(INVALID_MANIFEST)
    return final
