"""Behavioural probes: failure modes a correlation with MOS does not show.

Each probe takes any scorer (:class:`qprobe.eval.baselines.Scorer`): the agent, the agent without its
tool, or PIQE as a deterministic reference, and returns a :class:`ProbeResult` (summary numbers for
the metrics file, and one row per image for the report).

**Cropping bias** (:func:`crop_bias`). Q-Probe inspects crops, and a model that has learnt "a
zoomed-in crop looks soft, so it is worse" will mark every crop of a clean photo down, and with it
the photo. The probe scores a pristine photo, then crops of it made by the crop tool itself (the
same geometry, native-resolution pixels and crop budget as in a rollout: :class:`CropTool`), each
scored as a photo in its own right. The mean shift (crop score minus photo score) should be near
zero; a clearly negative one is the bias. Crops are the centre then the four quadrants of the global
view, each half its width and height.

**Bokeh** (:func:`bokeh`). A shallow depth of field is a photographer's choice, not a defect: a sound
judge must not call it blur. The probe scores pristine photos with natural bokeh (listed in the
``bokeh.txt`` sidecar shipped beside this module, or any list) and counts a photo as *flagged* when
the method reports a ``blur`` defect on it or scores it below ``poor_below`` (3 on the MOS scale,
where PIQE's "poor" band begins).

**Repeatability** (:func:`repeatability`). Sampling makes an agent's score a random variable; the
probe scores each image ``runs`` times with different seeds and reports the standard deviation of
the scores per image and on average. A deterministic method gives 0.

In ``qprobe evaluate``, :func:`run_probes` picks each probe's images and methods from the config: a
new probe is its function here, its call there, and its section in the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qprobe.agent.backends import Backend
from qprobe.agent.crop import CropTool, Geometry
from qprobe.agent.protocol import Box
from qprobe.data.manifest import image_path
from qprobe.errors import QProbeError
from qprobe.eval.baselines import AgentScorer, Scorer
from qprobe.eval.config import MODEL, EvaluateConfig
from qprobe.eval.scoring import EvalSet, has_defect
from qprobe.io import IMAGE_EXTENSIONS, load_image

log = logging.getLogger(__name__)

BOKEH_LIST = "bokeh.txt"
NAN = float("nan")
Named = tuple[str, Image.Image]


@dataclass
class ProbeResult:
    """A probe's summary (flat numbers for the metrics file) and its per-image rows."""

    summary: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else NAN


def crop_boxes(geometry: Geometry, count: int) -> list[Box]:
    """Up to five view boxes, each half the view's width and height: the centre, then the quadrants."""
    w, h = geometry.view
    hw, hh = w / 2, h / 2
    boxes = [(w / 4, h / 4, w / 4 + hw, h / 4 + hh), (0, 0, hw, hh), (hw, 0, w, hh), (0, hh, hw, h), (hw, hh, w, h)]
    return [tuple(float(round(v)) for v in box) for box in boxes[:count]]  # type: ignore[misc]


def tool_crops(image: Image.Image, count: int, global_max_pixels: int,
               crop_max_pixels: int) -> list[tuple[Image.Image, tuple[int, int, int, int]]]:
    """The crops the crop tool returns for :func:`crop_boxes`, with their regions in original pixels."""
    tool = CropTool(image, global_max_pixels, crop_max_pixels, max_calls=count)
    crops = []
    for box in crop_boxes(Geometry.for_size(image.size, global_max_pixels), count):
        blocks = tool.crop(list(box))
        record = tool.calls[-1]
        if record.error or record.original_box is None:
            raise QProbeError(f"crop {list(box)} of a {image.size[0]}x{image.size[1]} photo failed: {record.error}")
        crops.append((next(b["image"] for b in blocks if b["type"] == "image"), record.original_box))
    return crops


def crop_bias(scorer: Scorer, images: Sequence[Named], crops: int = 4, global_max_pixels: int = 50176,
              crop_max_pixels: int = 50176, seed: int = 0) -> ProbeResult:
    """Score each pristine photo, then its tool crops; summarise the crop-minus-photo shifts."""
    if not 1 <= crops <= 5:
        raise ValueError(f"crop_bias takes 1 to 5 crops per photo, got {crops}")
    shifts: list[float] = []
    rows = []
    for name, image in images:
        whole = scorer(image, seed=seed).score
        row: dict[str, Any] = {"image": name, "score": whole, "crops": []}
        for crop, region in tool_crops(image, crops, global_max_pixels, crop_max_pixels):
            score = scorer(crop, seed=seed).score
            shift = score - whole if score is not None and whole is not None else None
            row["crops"].append({"region": list(region), "size": list(crop.size), "score": score, "shift": shift})
            if shift is not None:
                shifts.append(shift)
        rows.append(row)
    values = np.asarray(shifts)
    pairs = len(images) * crops
    return ProbeResult(summary={
        "images": float(len(images)),
        "pairs": float(pairs),
        "answered_pairs": float(values.size),
        "mean_shift": _mean(values),
        "mean_abs_shift": _mean(np.abs(values)),
        "shift_sem": float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else NAN,
    }, rows=rows)


def bokeh_list(path: str | Path | None = None) -> list[str]:
    """File names from a list (one per line, ``#`` comments); the shipped ``bokeh.txt`` by default."""
    if path is None:
        text = resources.files("qprobe.eval").joinpath(BOKEH_LIST).read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise QProbeError(f"{path}: cannot read the bokeh list ({exc.strerror or exc})") from exc
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [n for n in names if n]


def bokeh(scorer: Scorer, photos: Sequence[Named], poor_below: float = 3.0, seed: int = 0) -> ProbeResult:
    """Score pristine shallow-depth-of-field photos; a blur defect or a poor score is a false flag."""
    rows = []
    for name, image in photos:
        prediction = scorer(image, seed=seed)
        blur = any(d["type"] == "blur" for d in prediction.defects)
        low = prediction.score is not None and prediction.score < poor_below
        rows.append({"image": name, "score": prediction.score, "blur_defect": blur, "low_score": low,
                     "flagged": blur or low, "defects": prediction.defects})
    answered = [r for r in rows if r["score"] is not None]
    return ProbeResult(summary={
        "photos": float(len(rows)),
        "answered": float(len(answered)),
        "flag_rate": _mean([float(r["flagged"]) for r in answered]),
        "blur_defect_rate": _mean([float(r["blur_defect"]) for r in answered]),
        "low_score_rate": _mean([float(r["low_score"]) for r in answered]),
        "mean_score": _mean([r["score"] for r in answered]),
    }, rows=rows)


def repeatability(scorer: Scorer, images: Sequence[Named], runs: int = 3, seed: int = 0) -> ProbeResult:
    """Score each image ``runs`` times (seeds ``seed .. seed + runs - 1``); the spread of its scores."""
    if runs < 2:
        raise ValueError(f"repeatability needs at least 2 runs, got {runs}")
    rows = []
    stds = []
    for name, image in images:
        scores = [scorer(image, seed=seed + r).score for r in range(runs)]
        answered = [s for s in scores if s is not None]
        std = float(np.std(answered, ddof=1)) if len(answered) > 1 else None
        if std is not None:
            stds.append(std)
        rows.append({"image": name, "scores": scores, "std": std})
    answered_runs = sum(s is not None for r in rows for s in r["scores"])
    return ProbeResult(summary={
        "images": float(len(rows)),
        "runs": float(runs),
        "answer_rate": answered_runs / (len(rows) * runs) if rows else NAN,
        "mean_std": _mean(stds),
        "max_std": float(max(stds)) if stds else NAN,
    }, rows=rows)


# ---------------------------------------------------------------------------------------------------
# The probes of an evaluation


def _bokeh_photos(cfg: EvaluateConfig) -> list[tuple[str, Path]]:
    if cfg.bokeh_dir is None:
        return []
    folder = Path(cfg.bokeh_dir)
    if not folder.is_dir():
        log.warning("bokeh probe skipped: %s is not a folder", folder)
        return []
    names = bokeh_list(cfg.bokeh_list)
    missing = [n for n in names
               if not (folder / n).is_file() or (folder / n).suffix.lower() not in IMAGE_EXTENSIONS]
    found = [(n, folder / n) for n in names if n not in missing]
    wanted = len(names) if cfg.bokeh_limit is None else min(cfg.bokeh_limit, len(names))
    if len(found) < wanted:  # short of photos; a folder holding just the ones a limit takes is fine
        log.warning("bokeh probe: %d listed photos not in %s (%s)", len(missing), folder, ", ".join(missing[:5]))
    return found[:wanted]


def run_probes(sets: Sequence[EvalSet], scorers: dict[str, Scorer], backend: Backend,
               cfg: EvaluateConfig) -> dict[str, dict[str, ProbeResult]]:
    """Cropping bias, bokeh and repeatability, each for the methods it is meaningful for (blind ones)."""
    results: dict[str, dict[str, ProbeResult]] = {}
    # The probes' photos have no pristine original to compare with.
    scorers = {name: scorer for name, scorer in scorers.items() if not scorer.full_reference}

    def load(named: Sequence[tuple[str, Path]]) -> list[tuple[str, Any]]:
        return [(name, load_image(path, max_pixels=cfg.max_image_pixels)) for name, path in named]

    pristine = [(f"{s.name}/{r['id']}", image_path(s.manifest, str(r["image"])))
                for s in sets for _, r in s.rows.iterrows() if has_defect(r) is False]
    if cfg.crop_bias_images and pristine:
        images = load(pristine[: cfg.crop_bias_images])
        results["crop_bias"] = {
            name: crop_bias(scorer, images, cfg.crop_bias_crops, cfg.protocol.global_max_pixels,
                            cfg.protocol.crop_max_pixels, seed=cfg.seed)
            for name, scorer in scorers.items()}
    elif cfg.crop_bias_images:
        log.warning("cropping-bias probe skipped: no image marked pristine (has_defect false) in the sets")

    photos = _bokeh_photos(cfg)
    if photos:
        images = load(photos)
        results["bokeh"] = {name: bokeh(scorer, images, seed=cfg.seed) for name, scorer in scorers.items()}

    if cfg.repeat_images:
        first = [(f"{s.name}/{r['id']}", image_path(s.manifest, str(r["image"])))
                 for s in sets for _, r in s.rows.iterrows()][: cfg.repeat_images]
        sampled = AgentScorer(backend, cfg.rollout(temperature=cfg.repeat_temperature), name=MODEL)
        results["repeat"] = {MODEL: repeatability(sampled, load(first), cfg.repeat_runs, seed=cfg.seed)}
    return results
