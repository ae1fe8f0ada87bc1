"""Scoring: the evaluation sets, and every image of them through every method into one table.

:func:`load_sets` reads the manifests of ``--data`` (filtered to ``--split``, sampled down to
``--limit``); :func:`score_sets` runs each readable image through each scorer
(:mod:`qprobe.eval.baselines`) and returns the predictions table: one row per image and method,
with the true defects beside the predicted ones and the agent's cost in ``cost_<key>`` columns.
Against an endpoint ``--concurrency`` images are scored at once (:mod:`qprobe.agent.inflight`), the
table in the same order whatever the concurrency.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from qprobe.agent.backends import Backend
from qprobe.agent.inflight import ordered_map
from qprobe.data.manifest import image_path, read_manifest
from qprobe.errors import QProbeError
from qprobe.eval.baselines import AgentScorer, PiqeScorer, Prediction, Scorer, SsimScorer
from qprobe.eval.config import MODEL, EvaluateConfig
from qprobe.io import load_image

log = logging.getLogger(__name__)

COST_KEYS = ("turns", "crops", "global_visual_tokens", "crop_visual_tokens", "visual_tokens", "text_tokens",
             "generated_tokens", "full_resolution_visual_tokens", "visual_ratio", "seconds")


@dataclass
class EvalSet:
    """One manifest's rows to evaluate."""

    name: str
    manifest: Path
    rows: pd.DataFrame


def _set_name(path: Path, taken: set[str]) -> str:
    folder = path if path.is_dir() else path.parent
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", folder.name or "data").strip("-") or "data"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def load_sets(cfg: EvaluateConfig) -> list[EvalSet]:
    """The manifests of ``cfg.data``, filtered to ``cfg.split`` and sampled down to ``cfg.limit``."""
    sets, taken = [], set()
    for spec in cfg.data:
        path = Path(spec)
        frame = read_manifest(path)
        manifest = Path(frame.attrs["path"])
        # Before the split and the limit: an image's original may be in rows neither keeps.
        frame["reference"] = pristine_originals(frame)
        if cfg.split != "all":
            present = sorted(set(frame["split"].astype(str)))
            frame = frame[frame["split"] == cfg.split]
            if frame.empty:
                raise QProbeError(f"{manifest}: no rows in split {cfg.split!r} (splits present: "
                                  f"{', '.join(present) or 'none'}); pass --split all to evaluate every row")
        frame = frame.sort_values("id").reset_index(drop=True)
        if cfg.limit is not None and len(frame) > cfg.limit:
            keep = np.random.default_rng(cfg.seed).choice(len(frame), size=cfg.limit, replace=False)
            frame = frame.iloc[np.sort(keep)].reset_index(drop=True)
        sets.append(EvalSet(name=_set_name(path, taken), manifest=manifest, rows=frame))
    return sets


def make_scorers(cfg: EvaluateConfig, backend: Backend) -> dict[str, Scorer]:
    scorers: dict[str, Scorer] = {MODEL: AgentScorer(backend, cfg.rollout(), name=MODEL)}
    if "no_tool" in cfg.baselines:
        scorers["no_tool"] = AgentScorer(backend, cfg.rollout(max_crops=0), name="no_tool")
    if "piqe" in cfg.baselines:
        scorers["piqe"] = PiqeScorer("global")
    if "piqe_patch" in cfg.baselines:
        scorers["piqe_patch"] = PiqeScorer("patch", tile=cfg.piqe_tile, worst=cfg.piqe_worst)
    if "ssim" in cfg.baselines:
        scorers["ssim"] = SsimScorer(cfg.max_image_pixels)
    return scorers


def _true_defects(row: pd.Series) -> list[dict[str, Any]]:
    defects = row["defects"] if row["defects"] is not None else []
    return [{"type": str(d["type"]), "severity": int(d["severity"]), "bbox": [int(v) for v in d["bbox"]]}
            for d in defects]


def _defect_flag(value: Any) -> bool | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else bool(value)


def has_defect(row: pd.Series) -> bool | None:
    """The row's ``has_defect``; ``None`` where unknown (null, or nan as pandas may read it)."""
    return _defect_flag(row["has_defect"])


def pristine_originals(frame: pd.DataFrame) -> pd.Series:
    """Each row's pristine original for full-reference methods: the ``image`` of the first row (by id)
    of its ``source`` with ``has_defect`` false, or None where its source has none (public sets)."""
    pristine = frame[frame["has_defect"].map(lambda v: _defect_flag(v) is False)]
    originals = pristine.sort_values("id").drop_duplicates("source").set_index("source")["image"]
    return frame["source"].map(originals).astype(object).where(frame["source"].isin(originals.index), None)


def _record(set_name: str, row: pd.Series, path: Path, method: str, prediction: Prediction) -> dict[str, Any]:
    true = _true_defects(row)
    record = {
        "set": set_name, "id": str(row["id"]), "image": str(path), "method": method,
        "mos": float(row["mos"]), "has_defect": has_defect(row),
        "types": sorted({d["type"] for d in true}), "severity": max((d["severity"] for d in true), default=0),
        "true_defects": true, "score": prediction.score, "raw": prediction.raw, "outcome": prediction.outcome,
        "failure": prediction.failure, "defects": prediction.defects, "crops": prediction.crops,
        "error": prediction.error,
    }
    record.update({f"cost_{k}": prediction.cost.get(k) for k in COST_KEYS})
    return record


@dataclass(frozen=True)
class ImageShard:
    """One image to score: its set, its manifest row, its path as recorded and the file to read."""

    set_name: str
    row: pd.Series
    path: Path
    file: Path
    reference: Path | None = None  # the file of its pristine original, for full-reference methods


@dataclass
class ImageResult:
    records: list[dict[str, Any]]
    traces: list[dict[str, Any]]
    skipped: str | None = None  # why the image could not be read


def score_image(shard: ImageShard, scorers: dict[str, Scorer], cfg: EvaluateConfig) -> ImageResult:
    """One image through every scorer (in a worker process or Ray task when the executor has one)."""
    try:
        image = load_image(shard.file, max_pixels=cfg.max_image_pixels)
    except QProbeError as exc:
        return ImageResult([], [], skipped=str(exc))
    result = ImageResult([], [])
    for method, scorer in scorers.items():
        prediction = scorer(image, seed=cfg.seed, reference=shard.reference)
        result.records.append(_record(shard.set_name, shard.row, shard.path, method, prediction))
        if prediction.trace is not None:
            result.traces.append({"set": shard.set_name, "id": str(shard.row["id"]), "method": method,
                                  **prediction.trace})
    return result


def score_sets(sets: Sequence[EvalSet], scorers: dict[str, Scorer], cfg: EvaluateConfig,
               traces: list[dict[str, Any]], concurrency: int = 1) -> tuple[pd.DataFrame, Counter]:
    """Every image of every set through every scorer; unreadable images are counted and skipped.

    An endpoint is asked for ``concurrency`` images at once from threads of this process (the server
    batches them); a local model's images are shards of the executor (:mod:`qprobe.executors`), and a
    worker gets the scorers, model included, once.
    """
    records: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    score = functools.partial(score_image, scorers=scorers, cfg=cfg)
    for eval_set in sets:
        shards = []
        for _, row in eval_set.rows.iterrows():
            path = image_path(eval_set.manifest, str(row["image"]))
            original = None if row["reference"] is None else image_path(eval_set.manifest, str(row["reference"]))
            # Read by absolute path: a Ray worker need not share this process's working directory.
            shards.append(ImageShard(eval_set.name, row, path, path.resolve(),
                                     None if original is None else original.resolve()))
        mapped = ordered_map(score, shards, concurrency) if concurrency > 1 else cfg.map(score, shards)
        for result in tqdm(mapped, total=len(shards), desc=f"evaluate {eval_set.name}",
                           unit="img", file=sys.stderr, disable=None):
            if result.skipped is not None:
                log.warning("skipped: %s", result.skipped)
                skipped[eval_set.name] += 1
            records.extend(result.records)
            traces.extend(result.traces)
    return pd.DataFrame.from_records(records), skipped
