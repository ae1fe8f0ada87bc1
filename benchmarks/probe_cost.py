"""Visual tokens of a Q-Probe pass against one full-resolution pass, at Qwen2.5-VL-7B's budgets.

For every photo in ``$QPROBE_PHOTOS`` (default ``../shared/photos`` beside the repository) and one
4K frame (the first photo centre-cropped to 16:9 and upscaled to 3840x2160), the real crop tool
(:class:`qprobe.agent.crop.CropTool`) cuts 1-3 context-aware crops and the tokens are counted:

* global view: ``smart_resize`` to 1280*28*28 = 1,003,520 pixels (the paper's budget), one token per
  merged 28x28 patch;
* each crop: a square of ``--crop-fraction`` of the photo's shorter side (0.3: a defect of 8-20% of
  the side with the context the trajectory planner keeps around it), at native resolution, resized
  only if over the crop budget (also 1,003,520 pixels);
* full resolution: one pass over the native pixels, capped at Qwen2.5-VL's processor maximum of
  16384*28*28 = 12,845,056 pixels.

Run::

    .venv/bin/python benchmarks/probe_cost.py [--photos DIR] [--crop-fraction 0.3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

from qprobe.agent.cost import full_resolution_tokens, visual_tokens
from qprobe.agent.crop import DEFAULT_CROP_MAX_PIXELS, DEFAULT_GLOBAL_MAX_PIXELS, MODEL_MAX_PIXELS, CropTool
from qprobe.io import IMAGE_EXTENSIONS, load_image

UHD = (3840, 2160)
# Where the crops sit, as the fraction of the free room left of / above each crop.
CROP_PLACES = ((0.5, 0.5), (0.15, 0.2), (0.85, 0.8))


def uhd_frame(image: Image.Image) -> Image.Image:
    """``image`` centre-cropped to 16:9 and resized to 3840x2160."""
    width, height = image.size
    if width / height > 16 / 9:
        new_w = round(height * 16 / 9)
        box = ((width - new_w) // 2, 0, (width - new_w) // 2 + new_w, height)
    else:
        new_h = round(width * 9 / 16)
        box = (0, (height - new_h) // 2, width, (height - new_h) // 2 + new_h)
    return image.crop(box).resize(UHD, Image.Resampling.LANCZOS)


def measure(name: str, image: Image.Image, args: argparse.Namespace) -> dict:
    tool = CropTool(image, args.global_max_pixels, args.crop_max_pixels, max_calls=len(CROP_PLACES))
    geometry = tool.geometry
    assert geometry is not None
    view_w, view_h = geometry.view
    side = args.crop_fraction * min(view_w, view_h)
    crops = []
    start = time.perf_counter()
    for fx, fy in CROP_PLACES:
        x1, y1 = fx * (view_w - side), fy * (view_h - side)
        blocks = tool.crop([round(x1), round(y1), round(x1 + side), round(y1 + side)])
        crops.append(visual_tokens(blocks[0]["image"].size))
    seconds = (time.perf_counter() - start) / len(CROP_PLACES)
    region = tool.calls[0].original_box
    assert region is not None
    return {
        "name": name, "size": image.size, "global": visual_tokens(geometry.view), "crops": crops,
        "crop_native": (region[2] - region[0], region[3] - region[1]),
        "full": full_resolution_tokens(image.size, MODEL_MAX_PIXELS), "crop_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    default_photos = os.environ.get("QPROBE_PHOTOS") or str(Path(__file__).resolve().parents[1] / ".." / "shared"
                                                             / "photos")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", default=default_photos, help="folder of high-resolution photos")
    parser.add_argument("--global-max-pixels", type=int, default=DEFAULT_GLOBAL_MAX_PIXELS)
    parser.add_argument("--crop-max-pixels", type=int, default=DEFAULT_CROP_MAX_PIXELS)
    parser.add_argument("--crop-fraction", type=float, default=0.3, help="crop side over the shorter side")
    args = parser.parse_args(argv)
    files = sorted(p for p in Path(args.photos).glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        print(f"{args.photos}: no photos (set QPROBE_PHOTOS or pass --photos)", file=sys.stderr)
        return 2
    rows = []
    for path in files:
        image = load_image(path)
        rows.append(measure(path.name, image, args))
        if path == files[0]:
            four_k = measure(f"{path.stem} as 4K UHD", uhd_frame(image), args)
    rows.append(four_k)

    print(f"Budgets (Qwen2.5-VL-7B, as in the paper): global view max_pixels {args.global_max_pixels:,}, "
          f"each crop max_pixels {args.crop_max_pixels:,}, full resolution = native pixels capped at "
          f"{MODEL_MAX_PIXELS:,}; crops are squares of {args.crop_fraction:g} x the shorter side, at native "
          f"resolution.\n")
    header = (f"{'photo':<34} {'size':>10} {'global':>6} {'crop':>5} {'crop px':>9} {'G+1':>6} {'G+2':>6} "
              f"{'G+3':>6} {'full':>6} {'r1':>5} {'r2':>5} {'r3':>5}")
    print(header)
    print("-" * len(header))
    ratios: dict[int, list[float]] = {1: [], 2: [], 3: []}
    for row in rows:
        totals = [row["global"] + sum(row["crops"][:k]) for k in (1, 2, 3)]
        row_ratios = [t / row["full"] for t in totals]
        if row is not four_k:
            for k, r in zip((1, 2, 3), row_ratios, strict=True):
                ratios[k].append(r)
        size = f"{row['size'][0]}x{row['size'][1]}"
        native = f"{row['crop_native'][0]}x{row['crop_native'][1]}"
        print(f"{row['name'][:34]:<34} {size:>10} {row['global']:>6} {row['crops'][0]:>5} {native:>9} "
              f"{totals[0]:>6} {totals[1]:>6} {totals[2]:>6} {row['full']:>6} "
              + " ".join(f"{r:>5.2f}" for r in row_ratios))
    print()
    for k in (1, 2, 3):
        values = ratios[k]
        print(f"global + {k} crop(s): agentic/full-resolution visual tokens, {len(values)} photos: "
              f"mean {statistics.mean(values):.3f}, min {min(values):.3f}, max {max(values):.3f}")
    k4 = [(four_k["global"] + sum(four_k["crops"][:k])) / four_k["full"] for k in (1, 2, 3)]
    print(f"4K UHD 3840x2160: full resolution {four_k['full']:,} tokens; agentic "
          + ", ".join(f"{k} crop(s) {four_k['global'] + sum(four_k['crops'][:k]):,} ({r:.3f})"
                      for k, r in zip((1, 2, 3), k4, strict=True)))
    print(f"crop tool: {1000 * statistics.mean(r['crop_seconds'] for r in rows):.1f} ms per crop on average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
