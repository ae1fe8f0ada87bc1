"""``qprobe score``: score photos the Q-Probe way and show how the model got there.

For each photo: a global look at the downscaled view, up to ``--max-crops`` crops inspected at
native resolution, and an answer: the score (1-5), the defect boxes mapped back to original pixels,
and the reasoning. ``--json`` prints one object per photo instead (score, defects, every turn with
its boxes and text, token counts, seconds); ``--viz DIR`` draws the crop boxes (cyan, numbered)
and defect boxes (red, with their type) on each photo.

A folder is scored in full, recursively, with a progress bar, and its results are written to
``--out`` (default ``outputs/score``) as ``results.csv`` and ``results.jsonl``. In such a batch a bad
file (missing, corrupt, over the pixel limit), or a photo the endpoint fails on (no answer within
``--read-timeout``, an answer of the wrong shape), is reported and recorded with its error, the rest is
scored, and the exit code is 1; a single bad file or failed photo, or a model that cannot be loaded or
reached, is one line on stderr and exit 2.
A model that answers out of protocol (a random tiny model, typically) is not an error: the photo
gets no score, and the parse failure's kind is reported.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from qprobe.agent.backends import EndpointArgs
from qprobe.agent.crop import budget_size
from qprobe.agent.protocol_config import PROTOCOL_FIELD, ProtocolLimits, check_limits
from qprobe.config import build_parser, flag_fields, parse_config
from qprobe.draw import CROP, PREDICTION, Mark, draw_marks, fit
from qprobe.errors import QProbeError, describe
from qprobe.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    check_out_vs_in,
    load_image,
    save_image_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

DEFAULT_BATCH_OUT = "outputs/score"
VIZ_MAX_SIDE = 1600


@dataclass
class ScoreConfig(EndpointArgs):
    model: str = field(default="models/base", metadata={
        "help": "Qwen2.5-VL checkpoint folder, or the http(s):// base URL of an OpenAI-compatible server"})
    json: bool = field(default=False, metadata={"help": "print one JSON object per photo"})
    viz: str | None = field(default=None, metadata={"help": "folder to write each photo with its boxes drawn"})
    out: str | None = field(default=None, metadata={
        "help": f"folder for results.csv and results.jsonl (a folder run defaults to {DEFAULT_BATCH_OUT})"})
    seed: int = field(default=0, metadata={"help": "sampling seed (the same for every photo)"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature; 0 is greedy"})
    max_new_tokens: int = field(default=1024, metadata={"help": "tokens the model may generate per photo, all turns"})
    max_image_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": "refuse photos with more pixels than this (decompression bombs)"})
    protocol: ProtocolLimits = field(default_factory=ProtocolLimits, metadata=PROTOCOL_FIELD)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, minimum in {"max_new_tokens": 1, "max_image_pixels": 1}.items():
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be at least {minimum}, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def _parse(argv: Sequence[str] | None) -> tuple[ScoreConfig, list[Path]]:
    parser = build_parser(ScoreConfig, "qprobe score", description=main.__doc__)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="photos or folders of photos")
    args = parser.parse_intermixed_args(list(argv) if argv is not None else None)
    # Hand the flags back to parse_config so they are typed and validated like every stage's.
    flags = ["--params", args.params]
    for f, _ in flag_fields(ScoreConfig):
        value = getattr(args, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, value]
    return parse_config(ScoreConfig, "score", flags, prog="qprobe score"), [Path(p) for p in args.paths]


def _expand(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise QProbeError(f"{path}: no images in this folder ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            yield from found
        else:
            yield path


def _load(path: Path, cfg: ScoreConfig) -> Image.Image:
    """The photo, or :class:`ImageError` naming it (unreadable, too many pixels, aspect over 200:1)."""
    image = load_image(path, max_pixels=cfg.max_image_pixels)
    try:
        budget_size(image.size, cfg.protocol.global_max_pixels)
    except QProbeError as exc:
        raise ImageError(f"{path}: {exc}") from exc
    return image


def _summary_line(path: Path, result: dict[str, Any]) -> str:
    crops = sum(1 for t in result["turns"] if t["role"] == "tool" and t.get("bbox_original"))
    head = f"{path}: "
    if result["score"] is None:
        failure = result["failure"]
        why = f"{failure['kind']}: {failure['detail']}" if failure else "no answer"
        head += f"no score ({result['outcome']}; {why})"
    else:
        head += f"score {result['score']:.2f}"
    lines = [f"{head} [{crops} crop(s), {result['tokens']['generated_tokens']} tokens, {result['seconds']:.1f} s]"]
    for defect in result["defects"]:
        lines.append(f"  defect {defect['type']} at {defect['bbox_original']} (original pixels)")
    for turn in result["turns"]:
        if turn["role"] == "tool" and turn.get("bbox_original"):
            lines.append(f"  crop {turn['bbox_original']} (original pixels)")
    reasoning = result.get("reasoning")
    if reasoning:
        lines.extend("  | " + line for line in reasoning.splitlines())
    return "\n".join(lines)


def draw_boxes(image: Image.Image, crops: list[tuple[int, int, int, int]],
               defects: list[dict[str, Any]]) -> Image.Image:
    """``image`` (downscaled to at most :data:`VIZ_MAX_SIDE`) with crop and defect boxes drawn."""
    canvas, scale = fit(image, VIZ_MAX_SIDE)
    marks = [*(Mark(box, CROP, f"crop {i}") for i, box in enumerate(crops, 1)),
             *(Mark(d["bbox_original"], PREDICTION, d["type"]) for d in defects)]
    return draw_marks(canvas, marks, scale=scale)


CSV_COLUMNS = ("image", "score", "outcome", "failure_kind", "defects", "crops", "global_visual_tokens",
               "crop_visual_tokens", "full_resolution_visual_tokens", "visual_ratio", "generated_tokens",
               "seconds", "error")


def _csv_row(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        return {"image": result["image"], "error": result["error"]}
    tokens = result["tokens"]
    return {
        "image": result["image"], "score": result["score"], "outcome": result["outcome"],
        "failure_kind": result["failure"]["kind"] if result["failure"] else "",
        "defects": json.dumps(result["defects"]),
        "crops": json.dumps([t["bbox_original"] for t in result["turns"] if t["role"] == "tool"]),
        "global_visual_tokens": tokens["global_visual_tokens"],
        "crop_visual_tokens": sum(tokens["crop_visual_tokens"]),
        "full_resolution_visual_tokens": tokens["full_resolution_visual_tokens"],
        "visual_ratio": tokens["visual_ratio"], "generated_tokens": tokens["generated_tokens"],
        "seconds": result["seconds"], "error": "",
    }


def _write_results(out: Path, results: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(_csv_row(r) for r in results)
    write_text_atomic(out / "results.csv", buffer.getvalue())
    write_text_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))


def main(argv: Sequence[str] | None = None) -> int:
    """Score photos: global view, crops at native resolution, score and defect boxes.

    Examples::

        qprobe score photo.jpg                                    # the model in models/base
        qprobe score photos/ --out outputs/score --viz outputs/viz
        qprobe score photo.jpg --json --max-crops 2 --model /ckpt/Qwen2.5-VL-7B-Instruct
        qprobe score photo.jpg --model http://localhost:8000/v1   # vllm serve Qwen/Qwen2.5-VL-7B-Instruct
    """
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from qprobe.agent.rollout import RolloutConfig, rollout

    cfg, paths = _parse(argv)
    files = list(_expand(paths))
    batch = len(files) > 1 or any(p.is_dir() for p in paths)
    out = Path(cfg.out) if cfg.out else (Path(DEFAULT_BATCH_OUT) if batch else None)
    folders = [p for p in paths if p.is_dir()]
    for flag, folder in (("--out", out), ("--viz", cfg.viz)):
        if folder:
            check_out_vs_in(folder, *folders, what=flag)
    if not batch:
        _load(files[0], cfg)  # a bad single photo fails before the model loads
    check_limits(cfg.model, cfg.protocol, ProtocolLimits.BUDGETS)
    hf_logging.disable_progress_bar()
    backend = cfg.backend(cfg.model)
    settings = RolloutConfig.under(cfg.protocol, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   seed=cfg.seed)
    results: list[dict[str, Any]] = []
    skipped = 0
    emit = tqdm.write if batch else print
    viz_names: set[str] = set()
    try:
        for path in tqdm(files, desc="scoring", unit="photo", disable=not batch, file=sys.stderr):
            try:
                image = _load(path, cfg)
                trace = rollout(backend, image, settings, source=str(path))
            except Exception as exc:  # one photo's failure, whatever it is, never ends a batch
                if not batch:
                    raise
                skipped += 1
                error = str(exc) if isinstance(exc, ImageError) else f"{path}: {describe(exc)}"
                if not isinstance(exc, QProbeError):
                    log.error("%s: scoring failed", path, exc_info=exc)  # a bug: keep its traceback
                print(f"qprobe score: skipped: {error}", file=sys.stderr)
                results.append({"image": str(path), "error": error})
                continue
            result = {**trace.to_dict(), "reasoning": trace.reasoning()}
            results.append(result)
            emit(json.dumps(result) if cfg.json else _summary_line(path, result))
            if cfg.viz:
                name = path.stem
                while name in viz_names:
                    name += "_"
                viz_names.add(name)
                canvas = draw_boxes(image, trace.crops_original(), result["defects"])
                save_image_atomic(canvas, Path(cfg.viz) / f"{name}.jpg", quality=90)
    finally:
        # Whatever was scored before an endpoint went down or a ^C is kept.
        if out is not None and results:
            _write_results(out, results)
            print(f"results: {out / 'results.csv'}, {out / 'results.jsonl'} ({len(results) - skipped} scored, "
                  f"{skipped} skipped)", file=sys.stderr)
    return 1 if skipped else 0
