"""Per-image cost of Vista-Bench synthesis, against a bare wavelet round trip of the same image.

For every photo in ``$QPROBE_PHOTOS`` (default ``../shared/photos`` beside the repository) plus
one of them upscaled to 3840 px wide (4K), it measures:

* ``roundtrip``: ``pywt.wavedec2`` + ``pywt.waverec2`` of the whole image (float32 RGB, the
  degradations' wavelet and levels): the cost of the naive approach that transforms the full
  image to edit its detail bands;
* ``synth``: texture map + region placement + defect injection + MOS on decoded pixels;
* ``e2e``: what ``qprobe bench`` does per image: decode the file, synthesise, encode and write the
  PNG and its record (``run_task`` with one image);
* ``peak``: peak Python-tracked memory of the synthesis (numpy arrays; tracemalloc), in MiB.

Each time is the best of ``--repeat`` runs. The target is ``e2e / roundtrip <= 3``.

    .venv/bin/python benchmarks/bench_synthesis.py [--photos DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pywt
from PIL import Image

from qprobe.bench.config import BenchConfig
from qprobe.bench.degradations import DEGRADATIONS, LEVELS, WAVELET
from qprobe.bench.mos import mos
from qprobe.bench.synthesize import Job, Task, image_rng, run_task, synthesize_image
from qprobe.bench.texture import texture_map
from qprobe.data.sources import SOURCE_EXTENSIONS, SourceItem, decode

REPO = Path(__file__).resolve().parents[1]
UPSCALED_WIDTH = 3840


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def roundtrip(pixels: np.ndarray) -> None:
    coeffs = pywt.wavedec2(pixels.astype(np.float32), WAVELET, level=LEVELS, axes=(0, 1))
    pywt.waverec2(coeffs, WAVELET, axes=(0, 1))


def synthesis(pixels: np.ndarray, cfg: BenchConfig, key: str) -> int:
    texture = texture_map(pixels, cfg.texture_size, cfg.texture_levels)
    _, defects, evidence = synthesize_image(pixels, texture, image_rng(cfg.seed, key, 0), cfg)
    mos(evidence)
    return len(defects)


def peak_mib(fn: Callable[[], object]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def inputs(folder: Path) -> list[tuple[str, bytes]]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SOURCE_EXTENSIONS)
    if not files:
        raise SystemExit(f"{folder}: no photos (set QPROBE_PHOTOS or pass --photos)")
    photos = [(p.name, p.read_bytes()) for p in files]
    # One photo upscaled to 4K, stored as a high-quality JPEG as a camera would deliver it.
    name, data = next(((n, d) for n, d in photos if n.endswith(".jpg")), photos[0])
    base = Image.open(io.BytesIO(data)).convert("RGB")
    upscaled = base.resize((UPSCALED_WIDTH, round(base.height * UPSCALED_WIDTH / base.width)),
                           Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    upscaled.save(buffer, format="JPEG", quality=95)
    photos.append((f"{Path(name).stem}@4K.jpg", buffer.getvalue()))
    return photos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", default=os.environ.get("QPROBE_PHOTOS", str(REPO.parent / "shared" / "photos")))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as out:
        cfg = BenchConfig(out=out, min_size=0)
        print(f"{'photo':<34} {'size':>10} {'defects':>7} {'roundtrip':>9} {'synth':>7} {'ratio':>6} "
              f"{'e2e':>7} {'ratio':>6} {'peak MiB':>8}")
        for name, data in inputs(Path(args.photos)):
            pixels = decode(data, name, 0, cfg.max_pixels).pixels
            height, width = pixels.shape[:2]
            item = SourceItem(key=name, uri=name, loader=lambda data=data, name=name: (data, name))
            task = Task(item, (Job(Path(name).stem, 0, False),))
            defects = synthesis(pixels, cfg, name)
            t_round = best_of(args.repeat, lambda pixels=pixels: roundtrip(pixels))
            t_synth = best_of(args.repeat, lambda pixels=pixels, name=name: synthesis(pixels, cfg, name))
            t_e2e = best_of(args.repeat, lambda task=task: run_task(task, cfg))
            peak = peak_mib(lambda pixels=pixels, name=name: synthesis(pixels, cfg, name))
            rows.append((t_round, t_synth, t_e2e))
            print(f"{name:<34} {f'{width}x{height}':>10} {defects:>7} {t_round:>8.3f}s {t_synth:>6.3f}s "
                  f"{t_synth / t_round:>6.2f} {t_e2e:>6.3f}s {t_e2e / t_round:>6.2f} {peak:>8.1f}")

    synth_ratios = [s / r for r, s, _ in rows]
    e2e_ratios = [e / r for r, _, e in rows]
    print()
    print(f"images: {len(rows)}; types: {', '.join(DEGRADATIONS)}; best of {args.repeat}")
    print(f"synth / roundtrip: median {statistics.median(synth_ratios):.2f}, max {max(synth_ratios):.2f}")
    print(f"e2e   / roundtrip: median {statistics.median(e2e_ratios):.2f}, max {max(e2e_ratios):.2f} (target <= 3)")
    print(f"mean seconds per image: roundtrip {statistics.mean(r for r, _, _ in rows):.3f}, "
          f"synth {statistics.mean(s for _, s, _ in rows):.3f}, e2e {statistics.mean(e for _, _, e in rows):.3f}")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
