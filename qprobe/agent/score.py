"""``qprobe score``: score photos the Q-Probe way and show how the model got there.

For each photo: a global look at the downscaled view, up to ``--max-crops`` crops inspected at
native resolution, and an answer: the score (1-5), the defect boxes mapped back to original pixels,
and the reasoning. ``--json`` prints one object per photo instead (score, defects, every turn with
its boxes and text, token counts, seconds); ``--viz DIR`` draws the crop boxes (cyan, numbered)
and defect boxes (red, with their type) on each photo.

With no ``--model`` the latest model this repository trained is used (stage 3's ``out`` in
``params.yaml``, else stage 2's, else stage 1's), and named; none trained is an error, never a silent
fall back to the untrained base.

A folder is scored in full, recursively, with a progress bar, and its results are written to
``--out`` (default ``outputs/score``) as ``results.csv`` and ``results.jsonl``, in input order. Against
an endpoint ``--concurrency`` photos are scored at once (:mod:`qprobe.agent.inflight`); the results do
not depend on it. A folder run resumes: the photos ``--out`` already holds a result for, from the same
model and settings (``run.json`` beside the results), are not scored again; the photos that failed are,
and a resumed run draws ``--viz`` only for the photos it scores. In such a batch a bad
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from qprobe.agent.backends import Backend, EndpointArgs
from qprobe.agent.crop import budget_size
from qprobe.agent.inflight import ordered_map
from qprobe.agent.protocol_config import PROTOCOL_FIELD, ProtocolLimits, check_limits
from qprobe.config import build_parser, flag_fields, load_params, parse_config
from qprobe.draw import CROP, PREDICTION, Mark, draw_marks, fit
from qprobe.errors import QProbeError, describe
from qprobe.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    check_out_vs_in,
    content_hash,
    load_image,
    save_image_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    from qprobe.agent.rollout import RolloutConfig

log = logging.getLogger(__name__)

DEFAULT_BATCH_OUT = "outputs/score"
VIZ_MAX_SIDE = 1600
RUN_FILE = "run.json"  # beside the results: the model and settings they were scored with


@dataclass
class ScoreConfig(EndpointArgs):
    model: str | None = field(default=None, metadata={
        "help": "Qwen2.5-VL checkpoint folder, or the http(s):// base URL of an OpenAI-compatible server "
                "(default: the latest trained model, stage3's out in --params, else stage2's, else stage1's)"})
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


def _parse(argv: Sequence[str] | None) -> tuple[ScoreConfig, list[Path], str]:
    """The config, the photos and folders to score, and the parameter file (``--params``)."""
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
    return (parse_config(ScoreConfig, "score", flags, prog="qprobe score"), [Path(p) for p in args.paths],
            args.params)


def latest_trained_model(params: str | Path) -> tuple[str, str]:
    """``(folder, stage)`` of the latest stage ``params`` names whose ``out`` holds a trained model.

    Stage 3, else stage 2, else stage 1: the untrained base is never chosen, so a score always comes
    from a model someone trained, and a repository with none says so.
    """
    from qprobe.eval.config import TRAINING_STAGES

    sections = load_params(params)
    outs = {stage: (sections.get(stage) or {}).get("out") for stage in reversed(TRAINING_STAGES)}
    for stage, out in outs.items():
        if out and (Path(out) / "config.json").is_file():
            return str(out), stage
    named = ", ".join(f"{stage}.out {out}" for stage, out in outs.items() if out) or "no stage out paths"
    raise QProbeError(f"{params}: no trained model ({named}: none holds a checkpoint); train one "
                      "(dvc repro stage1) or pass --model")


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


def _write_results(out: Path, results: list[dict[str, Any]], run: dict[str, Any]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(_csv_row(r) for r in results)
    # run.json goes first and comes back last: a run stopped in between leaves results no run claims,
    # which the next run scores afresh rather than take for another model's.
    (out / RUN_FILE).unlink(missing_ok=True)
    write_text_atomic(out / "results.csv", buffer.getvalue())
    write_text_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    write_text_atomic(out / RUN_FILE, json.dumps(run, indent=2) + "\n")


def _run_record(cfg: ScoreConfig, backend: Backend, settings: RolloutConfig) -> dict[str, Any]:
    """What a result depends on besides the photo: the model (a folder by its content) and the settings."""
    local = Path(cfg.model).is_dir()
    return {"model": backend.name, "model_hash": content_hash(cfg.model) if local else None,
            "rollout": asdict(settings), "max_image_pixels": cfg.max_image_pixels}


def _earlier_results(out: Path, run: dict[str, Any], files: list[Path]) -> dict[str, dict[str, Any]]:
    """The results ``out`` holds for ``files`` from a run of the same model and settings, errors left out."""
    lines = out / "results.jsonl"
    if not lines.is_file():
        return {}
    try:
        earlier = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        earlier = None
    if earlier != run:
        print(f"qprobe score: {out} holds results of another model or other settings; scoring afresh",
              file=sys.stderr)
        return {}
    wanted = {str(p) for p in files}
    found: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(lines.read_text().splitlines(), 1):
        try:
            result = json.loads(line)
        except ValueError as exc:
            raise QProbeError(f"{lines}: line {number} is not JSON; delete the file to score afresh") from exc
        if isinstance(result, dict) and "error" not in result and result.get("image") in wanted:
            found[result["image"]] = result
    return found


def _viz_names(files: list[Path]) -> dict[Path, str]:
    """A distinct drawing name per photo (its stem, underscores added on a clash), whatever order they finish in."""
    names: dict[Path, str] = {}
    for path in files:
        name = path.stem
        while name in names.values():
            name += "_"
        names.setdefault(path, name)
    return names


def _score_photo(path: Path, cfg: ScoreConfig, backend: Backend, settings: RolloutConfig,
                 viz_name: str | None) -> dict[str, Any]:
    """One photo's result (and its drawing under ``--viz``); raises what loading or the rollout raises."""
    from qprobe.agent.rollout import rollout

    image = _load(path, cfg)
    trace = rollout(backend, image, settings, source=str(path))
    result = {**trace.to_dict(), "reasoning": trace.reasoning()}
    if cfg.viz and viz_name:
        canvas = draw_boxes(image, trace.crops_original(), result["defects"])
        save_image_atomic(canvas, Path(cfg.viz) / f"{viz_name}.jpg", quality=90)
    return result


def _failed(path: Path, exc: Exception) -> dict[str, Any]:
    """A batch's record of a photo that could not be scored."""
    error = str(exc) if isinstance(exc, ImageError) else f"{path}: {describe(exc)}"
    if not isinstance(exc, QProbeError):
        log.error("%s: scoring failed", path, exc_info=exc)  # a bug: keep its traceback
    return {"image": str(path), "error": error}


def main(argv: Sequence[str] | None = None) -> int:
    """Score photos: global view, crops at native resolution, score and defect boxes.

    Examples::

        qprobe score photo.jpg                                    # the latest trained model (models/stage3 ...)
        qprobe score photos/ --out outputs/score --viz outputs/viz
        qprobe score photo.jpg --json --max-crops 2 --model /ckpt/Qwen2.5-VL-7B-Instruct
        qprobe score photo.jpg --model http://localhost:8000/v1   # vllm serve Qwen/Qwen2.5-VL-7B-Instruct
        qprobe score photos/ --model http://localhost:8000/v1 --concurrency 64
    """
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from qprobe.agent.rollout import RolloutConfig

    cfg, paths, params = _parse(argv)
    files = list(_expand(paths))
    batch = len(files) > 1 or any(p.is_dir() for p in paths)
    out = Path(cfg.out) if cfg.out else (Path(DEFAULT_BATCH_OUT) if batch else None)
    folders = [p for p in paths if p.is_dir()]
    for flag, folder in (("--out", out), ("--viz", cfg.viz)):
        if folder:
            check_out_vs_in(folder, *folders, what=flag)
    if cfg.model is None:
        cfg.model, stage = latest_trained_model(params)
        print(f"qprobe score: model {cfg.model} (the latest trained, {stage}; --model to choose another)",
              file=sys.stderr)
    if not batch:
        _load(files[0], cfg)  # a bad single photo fails before the model loads
    check_limits(cfg.model, cfg.protocol, ProtocolLimits.BUDGETS)
    hf_logging.disable_progress_bar()
    backend = cfg.backend(cfg.model)
    settings = RolloutConfig.under(cfg.protocol, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   seed=cfg.seed)
    run = _run_record(cfg, backend, settings) if out is not None else {}
    results = _earlier_results(out, run, files) if out is not None and batch else {}
    if results:
        print(f"qprobe score: resuming: {len(results)} of {len(files)} photos already scored in {out}",
              file=sys.stderr)
    todo = [p for p in files if str(p) not in results]
    viz_names = _viz_names(files) if cfg.viz else {}

    def score(path: Path) -> dict[str, Any]:
        try:
            return _score_photo(path, cfg, backend, settings, viz_names.get(path))
        except Exception as exc:  # one photo's failure, whatever it is, never ends a batch
            if not batch:
                raise
            return _failed(path, exc)

    emit = tqdm.write if batch else print
    try:
        scored = ordered_map(score, todo, cfg.in_flight(backend))
        for path, result in tqdm(zip(todo, scored, strict=True), total=len(todo), desc="scoring", unit="photo",
                                 disable=not batch, file=sys.stderr):
            results[str(path)] = result
            if "error" in result:
                print(f"qprobe score: skipped: {result['error']}", file=sys.stderr)
            else:
                emit(json.dumps(result) if cfg.json else _summary_line(path, result))
    finally:
        # Whatever was scored before an endpoint went down or a ^C is kept, in input order.
        ordered = [results[str(p)] for p in files if str(p) in results]
        skipped = sum("error" in r for r in ordered)
        if out is not None and ordered:
            _write_results(out, ordered, run)
            print(f"results: {out / 'results.csv'}, {out / 'results.jsonl'} ({len(ordered) - skipped} scored, "
                  f"{skipped} skipped)", file=sys.stderr)
    return 1 if skipped else 0
