"""Vista-Bench synthesis: local wavelet-domain defects in texture-rich regions, with boxes and MOS.

For every source photo (:mod:`qprobe.data.sources`), ``qprobe bench``:

1. loads it safely (EXIF, RGB, pixel limit) and skips it with a counted reason if it is too small,
   too large or unreadable;
2. computes its wavelet texture map once (:mod:`qprobe.bench.texture`);
3. makes its variants. Each variant draws, from its own seed, 1-3 defect boxes in textured areas
   (:mod:`qprobe.bench.regions`) with a type and a severity 1-5, injects each defect in the box's
   neighbourhood only (:mod:`qprobe.bench.degradations`; pixels outside the boxes stay identical
   to the photo), and scores the result with the MOS model (:mod:`qprobe.bench.mos`). A share of
   the variants is left pristine.
4. writes ``images/<id>.png`` and then ``records/<id>.json`` (both atomically): an image with its
   record is finished, and a re-run of a killed stage skips it;
5. once all photos are done, assigns splits by source photo, draws ``contact_sheet.jpg``, writes
   ``manifest.parquet`` (with the settings' fingerprint in its metadata) and validates it
   (:mod:`qprobe.validation.bench`), and writes the metrics file.

The output is a folder or an ``s3://`` prefix (:class:`~qprobe.bench.outputs.BenchOut`): with an
S3 source and out, each worker (a Ray task on any machine) reads its photo from S3 and writes its
images and records there itself, and the driver the rest; the objects are the bytes a local run
writes. Ownership: bench deletes and overwrites only files it can prove it wrote
(:mod:`qprobe.bench.outputs`).

Determinism: every image's random generator is seeded from ``(seed, photo key, variant)``, so the
output does not depend on the order photos are processed in, the number of workers, or which
images a resumed run had already finished; the same inputs and seed give byte-identical files.
Images are allocated round-robin over the photos (in an order shuffled by the seed), so
``--num-images`` smaller than the number of photos samples them, and larger makes several
variants of each. The allocation is fixed before any photo is read: a photo that turns out to be
unusable is skipped with its images, and the metrics count it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from qprobe.bench.config import BenchConfig
from qprobe.bench.contact_sheet import make_contact_sheet
from qprobe.bench.degradations import inject
from qprobe.bench.mos import DefectEvidence, mos
from qprobe.bench.outputs import (
    CONTACT_SHEET,
    FIXED_OUTPUTS,
    LEDGER,
    BenchOut,
    bench_metrics,
    job_files,
    job_paths,
    read_ledger,
    refuse_foreign,
    remove_stale,
    write_ledger,
    write_validated_manifest,
)
from qprobe.bench.regions import place_regions
from qprobe.bench.texture import TextureMap, texture_map
from qprobe.config import parse_config, to_flat_dict
from qprobe.data.manifest import MANIFEST_NAME, Defect
from qprobe.data.sources import (
    SkipPhoto,
    Source,
    SourceError,
    SourceItem,
    location,
    open_source,
)
from qprobe.data.splits import assign_splits, stable_int
from qprobe.defects import TYPES
from qprobe.io import check_out_vs_in, encode_image, json_bytes, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One image to make: a variant of a photo, pristine or not."""

    image_id: str
    variant: int
    pristine: bool


@dataclass(frozen=True)
class Task:
    """The pending images of one photo; a worker loads the photo once for all of them."""

    item: SourceItem
    jobs: tuple[Job, ...]


@dataclass
class TaskResult:
    key: str
    records: list[dict[str, Any]] = field(default_factory=list)
    skip_reason: str | None = None
    skip_message: str = ""


@dataclass
class BenchResult:
    manifest: str  # path or s3:// URI, as the contact sheet's
    records: list[dict[str, Any]]
    metrics: dict[str, Any]
    source_digest: str
    contact_sheet: str | None


def image_rng(seed: int, key: str, variant: int) -> np.random.Generator:
    """The generator of one image: a function of the seed, the photo's key and the variant only."""
    return np.random.default_rng([seed, stable_int("image", key, variant)])


def image_id(key: str, variant: int) -> str:
    """A stable, filename-safe id: the photo's name, a hash of its key (two folders may share names), the variant."""
    stem = re.sub(r"[^a-z0-9]+", "-", Path(key).stem.lower()).strip("-")[:40] or "photo"
    return f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}-{variant:02d}"


def plan_jobs(items: list[SourceItem], num_images: int | None, pristine_fraction: float,
              seed: int) -> list[tuple[SourceItem, list[Job]]]:
    """Allocate images round-robin over the photos (seed-shuffled) and choose the pristine ones.

    Pristine images go to distinct photos first (a second pristine copy of a photo would be a
    duplicate image), on a second round only when there are more pristine images than photos.
    """
    order = sorted(items, key=lambda it: stable_int("order", seed, it.key))
    total = num_images if num_images is not None else len(order)
    slots = [(i, v) for v in range(math.ceil(total / len(order))) for i in range(len(order))][:total]
    pristine = set(slots[: round(pristine_fraction * total)])
    jobs: dict[int, list[Job]] = {}
    for i, v in slots:
        jobs.setdefault(i, []).append(Job(image_id(order[i].key, v), v, (i, v) in pristine))
    return [(order[i], jobs[i]) for i in sorted(jobs)]


def synthesize_image(pixels: np.ndarray, texture: TextureMap, rng: np.random.Generator,
                     cfg: BenchConfig) -> tuple[np.ndarray, list[Defect], list[DefectEvidence]]:
    """Draw boxes, types and severities from ``rng`` and inject them into a copy of ``pixels``."""
    height, width = pixels.shape[:2]
    count = int(rng.integers(cfg.defects_per_image[0], cfg.defects_per_image[1] + 1))
    boxes = place_regions(texture, count, rng, size_range=(cfg.region_size[0], cfg.region_size[1]),
                          max_overlap=cfg.max_overlap, top_fraction=cfg.top_fraction)
    image = pixels.copy()
    defects, evidence = [], []
    for box in boxes:
        kind = cfg.types[int(rng.integers(len(cfg.types)))]
        severity = int(rng.integers(1, 6))
        inject(image, kind, severity, box, rng, feather=cfg.feather)
        defects.append(Defect(kind, severity, box))
        area = (box[2] - box[0]) * (box[3] - box[1]) / (width * height)
        evidence.append(DefectEvidence(TYPES[kind].visibility, severity, area, texture.box_mean(box)))
    return image, defects, evidence


def _save(pixels: np.ndarray, out: BenchOut, rel: str, fmt: str) -> None:
    image = Image.fromarray(pixels)
    if fmt == "png":
        # zlib level 1: a third of the encode time of the default level 6, files ~3% larger.
        data = encode_image(image, rel, compress_level=1)
    else:
        data = encode_image(image, rel, lossless=True, quality=50, method=2, exact=True)
    out.write(rel, data)


def run_task(task: Task, cfg: BenchConfig) -> TaskResult:
    """Load one photo and make its pending images (in a worker process or Ray task when the executor has one)."""
    out = BenchOut(cfg.out)
    result = TaskResult(key=task.item.key)
    try:
        photo = task.item.load(cfg.min_size, cfg.max_pixels)
    except SkipPhoto as skip:
        result.skip_reason, result.skip_message = skip.reason, str(skip)
        return result
    texture = texture_map(photo.pixels, cfg.texture_size, cfg.texture_levels)
    height, width = photo.pixels.shape[:2]
    for job in task.jobs:
        if job.pristine:
            pixels, defects, evidence = photo.pixels, [], []
        else:
            rng = image_rng(cfg.seed, task.item.key, job.variant)
            pixels, defects, evidence = synthesize_image(photo.pixels, texture, rng, cfg)
        score, std = mos(evidence)
        image_path, record_path = job_paths(job.image_id, cfg.format)
        record = {
            "id": job.image_id,
            "image": image_path,
            "source": task.item.uri,
            "width": width,
            "height": height,
            "has_defect": bool(defects),
            "defects": [d.to_dict() for d in defects],
            "mos": round(score, 4),
            "mos_std": round(std, 4),
            "key": task.item.key,
            "variant": job.variant,
            "pristine": job.pristine,
            "texture": [round(e.texture, 4) for e in evidence],
            "source_md5": photo.md5,
            "fingerprint": cfg.fingerprint(),
        }
        # Image first, record second: a record on disk means its image is complete.
        _save(pixels, out, image_path, cfg.format)
        out.write(record_path, json_bytes(record))
        result.records.append(record)
    return result


def _finished(out: BenchOut, present: set[str], job: Job, cfg: BenchConfig) -> dict[str, Any] | None:
    """The record of ``job`` if a previous run finished it with the same parameters, else None.

    ``present`` is the output's listing: one listing, not a look-up per image (S3 round trips).
    """
    image_path, record_path = job_paths(job.image_id, cfg.format)
    if not (record_path in present and image_path in present):
        return None
    try:
        record = json.loads(out.read(record_path))
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != cfg.fingerprint() or record.get("pristine") != job.pristine:
        return None
    return record


def _run_tasks(tasks: list[Task], cfg: BenchConfig, bar: tqdm) -> Iterator[TaskResult]:
    # One shard per photo, wherever it runs (qprobe.executors): a worker loads its photo once.
    for task, result in zip(tasks, cfg.map(functools.partial(run_task, cfg=cfg), tasks), strict=True):
        yield result
        bar.update(len(task.jobs))


def synthesize(cfg: BenchConfig, source: Source | None = None, progress: bool = True) -> BenchResult:
    """Make the bench described by ``cfg`` (see the module docstring); returns what it wrote.

    Raises :class:`~qprobe.data.sources.SourceError` for a missing or empty source and
    :class:`~qprobe.bench.outputs.ForeignFileError` for a file in the way that bench did not write
    (both before writing anything), and :class:`~qprobe.validation.core.ValidationError` for a
    manifest that fails its suite.
    """
    start = time.perf_counter()
    source = source or open_source(cfg.source, cfg.image_column)
    out = BenchOut(cfg.out)
    new_folder = not out.exists()
    owned = read_ledger(out)
    present = out.files()
    plan = plan_jobs(source.items, cfg.num_images, cfg.pristine_fraction, cfg.seed)
    finished: dict[str, dict[str, Any]] = {}
    tasks: list[Task] = []
    pending_files: set[str] = set()
    for item, jobs in plan:
        pending = []
        for job in jobs:
            record = _finished(out, present, job, cfg)
            if record is None:
                pending.append(job)
                pending_files |= job_files(job.image_id, cfg.format)
            else:
                finished[job.image_id] = record
        if pending:
            tasks.append(Task(item, tuple(pending)))
    refuse_foreign(out, pending_files, owned, present)
    # Listed before written: a run killed at any point leaves no file of its own off the list.
    owned |= pending_files | set(FIXED_OUTPUTS)
    owned |= {f for image_id in finished for f in job_files(image_id, cfg.format)}
    write_ledger(out, owned)
    if tasks:
        out.delete(MANIFEST_NAME)
    total = sum(len(jobs) for _, jobs in plan)
    if finished:
        log.info("resuming: %d of %d images already done in %s", len(finished), total, out.root)

    skipped: Counter = Counter()
    new = 0
    # Console logging goes through tqdm.write inside this block: a skip line is printed above the
    # bar instead of over it.
    with logging_redirect_tqdm(), tqdm(total=total, initial=len(finished), unit="img", desc="bench",
                                       disable=not progress, dynamic_ncols=True) as bar:
        for skip in source.skipped:
            skipped[skip.reason] += 1
            log.warning("skipped (%s): %s", skip.reason, skip)
        for result in _run_tasks(tasks, cfg, bar):
            if result.skip_reason:
                skipped[result.skip_reason] += 1
                log.warning("skipped (%s): %s", result.skip_reason, result.skip_message)
            for record in result.records:
                finished[record["id"]] = record
                new += 1

    records = sorted(finished.values(), key=lambda r: r["id"])
    if not records:
        if new_folder:  # a run that made nothing leaves nothing: only the ledger was written
            out.delete(LEDGER)
            out.remove_root()
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        raise SourceError(f"{source.spec}: no usable photos among {len(source.items)} ({reasons})")
    splits = assign_splits(sorted({r["key"] for r in records}), cfg.splits, cfg.seed)
    for record in records:
        record["split"] = splits[record["key"]]

    keep = {f for r in records for f in job_files(r["id"], cfg.format)} | set(FIXED_OUTPUTS)
    removed = remove_stale(out, owned, keep)
    if removed:
        log.info("removed %d files of images no longer in the plan", removed)
    write_ledger(out, keep)
    sheet = make_contact_sheet(records, out, CONTACT_SHEET, cfg.contact_sheet_size)
    # Last: a manifest in place names only images that are there (a reader of an S3 prefix included).
    manifest = write_validated_manifest(records, out, cfg.fingerprint())
    metrics = bench_metrics(records, skipped, new, len(source.items), time.perf_counter() - start)
    write_json_atomic(cfg.metrics, metrics)
    listing = "".join(f"{k} {m}\n" for k, m in sorted({(r["key"], r["source_md5"]) for r in records}))
    log.info("bench: %d images (%d new, %d skipped photos) in %s, %.1f s", len(records), new,
             sum(skipped.values()), out.root, metrics["seconds"])
    return BenchResult(manifest=manifest, records=records, metrics=metrics,
                       source_digest=hashlib.md5(listing.encode()).hexdigest(), contact_sheet=sheet)


def main(argv: list[str] | None = None) -> int:
    """Synthesise Vista-Bench and record the run in MLflow.

    With no options it runs the ``bench:`` section of ``params.yaml`` (what ``dvc repro bench`` runs)::

        qprobe bench
        qprobe bench --source ../shared/photos --out data/bench --num-images 200 --seed 1 --workers 2
        qprobe bench --source s3://photos/raw --min-size 2000 --workers 8
        qprobe bench --source s3://photos/raw --out s3://photos/bench --executor ray --ray-address auto

    Writes ``OUT/manifest.parquet``, ``OUT/images/*.png``, ``OUT/records/*.json`` (resume state),
    ``OUT/contact_sheet.jpg`` and the metrics file. OUT may be an ``s3://`` prefix.
    """
    from qprobe.tracking import log_artifact, log_dataset, log_metrics, stage_run

    cfg = parse_config(BenchConfig, "bench", argv, prog="qprobe bench", description=inspect.cleandoc(main.__doc__ or ""))
    check_out_vs_in(cfg.out, location(cfg.source), what="--out")
    # List the source before the MLflow run starts: a missing or empty source writes nothing at all.
    source = open_source(cfg.source, cfg.image_column)
    with stage_run("bench", to_flat_dict(cfg)):
        result = synthesize(cfg, source)
        log_dataset(source.lineage_uri, name=f"bench-source:{cfg.source}", context="source",
                    digest=result.source_digest)
        log_dataset(cfg.out, name="vista-bench", context="output")
        log_metrics(to_flat_dict(result.metrics))
        if result.contact_sheet is not None:
            with BenchOut(cfg.out).local_copy(CONTACT_SHEET) as sheet:
                log_artifact(sheet)
        log_artifact(cfg.metrics)
    return 0

