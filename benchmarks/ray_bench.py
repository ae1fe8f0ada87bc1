"""Bench synthesis on 1 and 2 local Ray workers, and on ``--executor local --workers 2``: images per second.

The same photos (``$QPROBE_PHOTOS``, default ``../shared/photos`` beside the repository; the first
``--photos-limit`` of them) and settings go through :func:`qprobe.bench.synthesize.synthesize` three
times in one run, each into a fresh folder. A local Ray is started with the worker count as its CPUs
before the clock starts (its start-up is a once-per-run cost, not throughput) and shut down after.
The target on a 2-core machine: 2 Ray workers at least 1.6x one.

    .venv/bin/python benchmarks/ray_bench.py [--photos DIR] [--num-images 16] [--photos-limit 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from qprobe.bench.config import BenchConfig
from qprobe.bench.synthesize import synthesize
from qprobe.data.sources import SOURCE_EXTENSIONS
from qprobe.executors import start_ray

REPO = Path(__file__).resolve().parents[1]


def photo_folder(source: Path, limit: int, into: Path) -> Path:
    """The first ``limit`` photos of ``source``, linked into ``into``: every run reads the same files."""
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in SOURCE_EXTENSIONS)[:limit]
    if not files:
        raise SystemExit(f"{source}: no photos (set QPROBE_PHOTOS or pass --photos)")
    into.mkdir(parents=True)
    for path in files:
        (into / path.name).symlink_to(path.resolve())
    return into


def images_per_second(photos: Path, out: Path, num_images: int, executor: str, workers: int) -> float:
    cfg = BenchConfig(source=str(photos), out=str(out), metrics=str(out.with_suffix(".json")), num_images=num_images,
                      min_size=0, executor=executor, workers=workers, contact_sheet_size=0)
    ray = start_ray(workers) if executor == "ray" else None
    try:
        result = synthesize(cfg, progress=False)
    finally:
        if ray is not None:
            ray.shutdown()
    return len(result.records) / result.metrics["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path,
                        default=Path(os.environ.get("QPROBE_PHOTOS", REPO.parent / "shared" / "photos")))
    parser.add_argument("--photos-limit", type=int, default=8, help="photos used (one shard each)")
    parser.add_argument("--num-images", type=int, default=16, help="images made in each run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    try:
        photos = photo_folder(args.photos, args.photos_limit, work / "photos")
        runs = {"ray, 1 worker": ("ray", 1), "ray, 2 workers": ("ray", 2), "local, 2 workers": ("local", 2)}
        rates = {}
        for i, (label, (executor, workers)) in enumerate(runs.items()):
            rates[label] = images_per_second(photos, work / f"out{i}", args.num_images, executor, workers)
            print(f"{label:18s} {rates[label]:6.2f} images/s", flush=True)
        one = rates["ray, 1 worker"]
        print(f"ray 2 workers / ray 1 worker:    {rates['ray, 2 workers'] / one:.2f}x (target >= 1.6x on 2 cores)")
        print(f"ray 2 workers / local 2 workers: {rates['ray, 2 workers'] / rates['local, 2 workers']:.2f}x")
        print(f"{args.num_images} images from {len(list(photos.iterdir()))} photos, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
