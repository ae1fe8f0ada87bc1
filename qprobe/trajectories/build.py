"""Probe-CoT (SFT), Probe-RL and the stage-1 set, built from Vista-Bench.

Three Hugging Face datasets, written with ``save_to_disk`` under ``--out``:

``stage1``  low-resolution global views with ``mos`` and ``mos_std``, for GRPO with the Thurstone
            ranking reward (from the bench's training split, or from an imported public IQA manifest).
``sft``     Probe-CoT conversations in trl's format (``messages`` + ``images``), low:high resolution
            mixed ``low_high_ratio``:1. A low-resolution sample is one turn that answers from the view.
            A high-resolution sample is multi-turn: global impression -> crop tool call -> the crop
            (cut by :class:`qprobe.agent.crop.CropTool`, the very tool inference and RL use) -> local
            scrutiny and a critical check against context -> ... -> answer (score = MOS, defect boxes
            in global-view pixels). Crops come from the context-aware planner
            (:mod:`qprobe.trajectories.planner`), reasoning from the template bank
            (:mod:`qprobe.trajectories.composer`).
``rl``      Probe-RL prompts: the global view, ``mos``, ``defects`` (original pixels), ``has_defect`` and
            ``original``, the high-resolution photo the crop tool opens during rollouts.

Only the bench's training split reaches these sets; a validation suite checks it (and the protocol
round trip, crop containment and margins, the low:high ratio) before the stage declares success.

Run it::

    qprobe trajectories --bench data/bench --out data/trajectories --seed 0
"""

from __future__ import annotations

import functools
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from qprobe.agent import protocol
from qprobe.agent.crop import CropTool, global_view
from qprobe.agent.protocol_config import write_limits
from qprobe.bench.texture import TextureMap, texture_map
from qprobe.config import parse_config, to_flat_dict
from qprobe.data.manifest import MANIFEST_NAME, image_path, read_manifest
from qprobe.errors import QProbeError
from qprobe.io import (
    check_out_vs_in,
    check_owned,
    load_image,
    mark_owned,
    write_json_atomic,
)
from qprobe.pages import pictures_folder
from qprobe.trajectories import composer
from qprobe.trajectories.config import TrajectoriesConfig
from qprobe.trajectories.planner import plan_crops
from qprobe.trajectories.samples import SAMPLES_PAGE, write_samples
from qprobe.trajectories.teacher import Teacher

log = logging.getLogger(__name__)

SETS = ("stage1", "sft", "rl")


def _sft_features() -> Any:
    # Spelled out: inference cannot see that a nested block's ``image`` is an image, and would store
    # raw bytes that trl's collator cannot use.
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    block = {"type": Value("string"), "text": Value("string"), "image": ImageFeature()}
    return Features({
        "id": Value("string"), "source": Value("string"), "split": Value("string"), "kind": Value("string"),
        "messages": List({"role": Value("string"), "name": Value("string"), "content": List(block)}),
        "images": List(ImageFeature()), "mos": Value("float64"), "defects": List(List(Value("int64"))),
        "crops": List(List(Value("int64"))), "crop_has_defect": List(Value("bool")),
        "width": Value("int64"), "height": Value("int64"),
    })


# ---------------------------------------------------------------------------------------------------
# One bench photo


@dataclass
class BenchPhoto:
    row: dict[str, Any]
    path: Path
    image: Image.Image
    texture: TextureMap

    @property
    def defects(self) -> list[tuple[str, int, tuple[int, int, int, int]]]:
        return [(d["type"], int(d["severity"]), tuple(int(v) for v in d["bbox"])) for d in self.row["defects"]]


def salient_regions(tmap: TextureMap, fraction: float, n: int = 6) -> list[tuple[int, int, int, int]]:
    """The ``n`` most textured windows of about ``fraction`` of the image (candidates for clean crops)."""
    rows, cols = tmap.values.shape
    side_r = max(1, round(rows * math.sqrt(fraction)))
    side_c = max(1, round(cols * math.sqrt(fraction)))
    means = tmap.box_means(min(side_r, rows), min(side_c, cols))
    order = np.argsort(means, axis=None)[::-1][: n * 8]
    picks: list[tuple[int, int, int, int]] = []
    for flat in order:
        r, c = divmod(int(flat), means.shape[1])
        box = (int(c * tmap.cell_x), int(r * tmap.cell_y), int((c + side_c) * tmap.cell_x),
               int((r + side_r) * tmap.cell_y))
        if all(abs(box[0] - p[0]) > tmap.cell_x * side_c / 2 or abs(box[1] - p[1]) > tmap.cell_y * side_r / 2
               for p in picks):
            picks.append(box)
        if len(picks) == n:
            break
    return picks


def _outward(box: Sequence[float]) -> list[int]:
    return [math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])]


def high_res_sample(photo: BenchPhoto, cfg: TrajectoriesConfig, rng: random.Random) -> dict[str, Any]:
    """A multi-turn Probe-CoT trajectory over one photo at native resolution."""
    width, height = photo.image.size
    defects = photo.defects
    salient = salient_regions(photo.texture, cfg.planner.clean_crop_fraction)
    limits = cfg.protocol
    plan = plan_crops([d[2] for d in defects], width, height, cfg.planner, rng, limits.max_crops, salient)
    tool = CropTool(photo.image, limits.global_max_pixels, limits.crop_max_pixels, max_calls=limits.max_crops)
    view, geometry = global_view(photo.image, limits.global_max_pixels)
    scale = protocol.downscale_factor(view.size, (width, height))
    messages = protocol.global_turn(view, (width, height), limits.max_crops)
    crops: list[list[int]] = []
    for i, (box, _) in enumerate(plan):
        inside = tuple(d for d in defects if _contains(box, d[2]))
        facts = composer.CropFacts(box=box, defects=inside, texture=photo.texture.box_mean(box))
        lead = (composer.global_impression(facts, width, height, photo.row["mos"], scale, rng, cfg.brief) if i == 0
                else composer.next_target(facts, width, height, rng, cfg.brief))
        view_box = _outward(geometry.to_view(box))
        messages.append(protocol.assistant_turn(protocol.render_turn(lead, protocol.render_tool_call(view_box))))
        blocks = tool.crop(view_box)
        record = tool.calls[-1]
        if record.error:  # the planner only asks for valid boxes; a failure here is a bug
            raise RuntimeError(f"{photo.row['id']}: crop tool refused a planned box: {record.error}")
        crops.append(list(record.original_box))
        messages.append(protocol.tool_turn(blocks))
        messages.append({"role": "_scrutiny", "text": composer.scrutiny(facts, width, height, rng, cfg.brief)})
    # Each crop's scrutiny opens the following assistant turn (the next call, or the answer).
    answer_defects = [protocol.Defect(bbox=tuple(_outward(geometry.to_view(d[2]))), type=d[0]) for d in defects]
    answer = protocol.render_answer(photo.row["mos"], answer_defects)
    final_think = composer.verdict(photo.row["mos"], len(defects))
    messages = _attach_scrutiny(messages, final_think, answer)
    return _sample(photo, "high", messages, crops, [bool(h) for _, h in plan])


def _contains(outer: Sequence[int], inner: Sequence[int]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def _attach_scrutiny(messages: list[dict[str, Any]], final_think: str, answer: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    pending = ""
    for m in messages:
        if m["role"] == "_scrutiny":
            pending = m["text"]
            continue
        if m["role"] == "assistant" and pending:
            think, action = protocol.split_turn(m["content"][0]["text"])
            m = protocol.assistant_turn(protocol.render_turn(f"{pending} {think}", action))
            pending = ""
        out.append(m)
    think = f"{pending} {final_think}".strip()
    out.append(protocol.assistant_turn(protocol.render_turn(think, answer)))
    return out


def low_res_sample(photo: BenchPhoto, cfg: TrajectoriesConfig, rng: random.Random) -> dict[str, Any]:
    """A one-turn sample: the photo at the low-resolution budget is its own global view."""
    small, _ = global_view(photo.image, cfg.protocol.low_res_max_pixels)
    _, geometry = global_view(small, cfg.protocol.global_max_pixels)
    sx, sy = small.size[0] / photo.image.size[0], small.size[1] / photo.image.size[1]
    defects = [(t, s, (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)) for t, s, b in photo.defects]
    messages = protocol.global_turn(small, small.size, cfg.protocol.max_crops)
    think = composer.low_res_impression(photo.row["mos"], defects, *small.size, rng, cfg.brief)
    answer = protocol.render_answer(photo.row["mos"], [
        protocol.Defect(bbox=tuple(_outward(geometry.to_view(b))), type=t) for t, _, b in defects])
    messages.append(protocol.assistant_turn(protocol.render_turn(think, answer)))
    return _sample(photo, "low", messages, [], [])


def _strip_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prompt format: image blocks are placeholders, the pixels live in the ``images`` column in order."""
    out = []
    for m in messages:
        content = [{"type": "image", "text": None} if b.get("type") == "image" else
                   {"type": "text", "text": b["text"]} for b in m["content"]]
        out.append({"role": m["role"], "name": m.get("name"), "content": content})
    return out


def _inline_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SFT format: every image sits in its block, tool turns included.

    trl's collator fills ``images``-column placeholders only outside tool turns, so a crop must be
    inline; the global view goes inline too, because a stored block always has every key and a
    placeholder is recognised by its missing ``image``. The ``images`` column stays empty.
    """
    return [{"role": m["role"], "name": m.get("name"),
             "content": [{"type": b["type"], "text": b.get("text"), "image": b.get("image")} for b in m["content"]]}
            for m in messages]


def _sample(photo: BenchPhoto, kind: str, messages: list[dict[str, Any]], crops: list[list[int]],
            crop_has_defect: list[bool]) -> dict[str, Any]:
    return {
        "id": photo.row["id"], "source": photo.row["source"], "split": photo.row["split"], "kind": kind,
        "messages": _inline_images(messages), "images": [], "mos": float(photo.row["mos"]),
        "defects": [list(d[2]) for d in photo.defects], "crops": crops, "crop_has_defect": crop_has_defect,
        "width": photo.image.size[0], "height": photo.image.size[1],
    }


def rl_prompt(photo: BenchPhoto, cfg: TrajectoriesConfig, root: Path) -> dict[str, Any]:
    view, _ = global_view(photo.image, cfg.protocol.global_max_pixels)
    messages = _strip_images(protocol.global_turn(view, photo.image.size, cfg.protocol.max_crops))
    return {
        "id": photo.row["id"], "source": photo.row["source"], "split": photo.row["split"],
        "prompt": messages, "images": [view], "mos": float(photo.row["mos"]),
        "mos_std": float(photo.row["mos_std"] or 0.0), "has_defect": bool(photo.row["has_defect"]),
        "defects": [{"type": t, "severity": s, "bbox": list(b)} for t, s, b in photo.defects],
        "original": _relative(photo.path, root), "width": photo.image.size[0], "height": photo.image.size[1],
    }


def stage1_prompt(row: dict[str, Any], image: Image.Image, cfg: TrajectoriesConfig) -> dict[str, Any]:
    view, _ = global_view(image, cfg.protocol.low_res_max_pixels)
    return {
        "id": row["id"], "source": row["source"], "split": row["split"],
        "prompt": _strip_images(protocol.global_turn(view, view.size, 0)), "images": [view],
        "mos": float(row["mos"]), "mos_std": float(row["mos_std"] if row.get("mos_std") is not None else 0.0),
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


# ---------------------------------------------------------------------------------------------------
# The stage


def _training_rows(manifest: pd.DataFrame, splits: Sequence[str]) -> list[dict[str, Any]]:
    rows = manifest[manifest["split"].isin(list(splits))].to_dict("records")
    if not rows:
        raise QProbeError(f"{manifest.attrs.get('path')}: no rows in splits {list(splits)}")
    for r in rows:
        r["defects"] = [dict(d) for d in (r["defects"] if r["defects"] is not None else [])]
    return rows


def _schedule(n: int, pool: int, rng: random.Random) -> list[int]:
    """``n`` indices into a pool: every item once per pass, passes shuffled."""
    order: list[int] = []
    while len(order) < n:
        batch = list(range(pool))
        rng.shuffle(batch)
        order.extend(batch)
    return order[:n]


@dataclass(frozen=True)
class Shard:
    """One record to make: SFT sample number ``index`` of ``kind`` (``low`` or ``high``), an ``rl`` prompt or a
    ``stage1`` prompt (from the bench's own photos)."""

    index: int
    kind: str
    row: dict[str, Any]
    path: Path


def make_record(shard: Shard, photo: BenchPhoto, cfg: TrajectoriesConfig, root: Path) -> dict[str, Any]:
    """The record of one shard; its random choices depend on the seed, the index and the photo only."""
    if shard.kind == "rl":
        return rl_prompt(photo, cfg, root)
    if shard.kind == "stage1":
        return stage1_prompt(photo.row, photo.image, cfg)
    rng = random.Random(f"{cfg.seed}:{shard.index}:{shard.row['id']}")
    return (low_res_sample if shard.kind == "low" else high_res_sample)(photo, cfg, rng)


def make_photo_records(shards: Sequence[Shard], cfg: TrajectoriesConfig, root: Path) -> list[dict[str, Any]]:
    """The records of one photo's shards, in order: the photo is decoded once for all of them."""
    image = load_image(shards[0].path)
    texture = texture_map(np.asarray(image))
    return [make_record(s, BenchPhoto(s.row, s.path, image, texture), cfg, root) for s in shards]


def _made_by_photo(cfg: TrajectoriesConfig, shards: list[Shard], root: Path) -> list[dict[str, Any]]:
    """Each shard's record, in shard order, made photo by photo: a 2-3K photo's decode and texture map
    cost more than its samples, and the sets visit each photo several times. A shard's randomness
    depends on its index and photo only, so the order they are made in changes no byte."""
    by_photo: dict[Path, list[int]] = {}
    for i, shard in enumerate(shards):
        by_photo.setdefault(shard.path, []).append(i)
    photos = sorted(by_photo, key=str)
    make = functools.partial(make_photo_records, cfg=cfg, root=root)
    made: list[dict[str, Any]] = [{}] * len(shards)
    with tqdm(total=len(shards), desc="trajectories", unit="record") as bar:
        for path, records in zip(photos, cfg.map(make, [[shards[i] for i in by_photo[p]] for p in photos]),
                                 strict=True):
            for i, record in zip(by_photo[path], records, strict=True):
                made[i] = record
            bar.update(len(records))
    return made


def build(cfg: TrajectoriesConfig, root: Path | None = None) -> dict[str, Any]:
    """Write the three datasets under ``cfg.out``; returns the counts. Validates before it returns."""
    from datasets import Dataset

    root = root or Path.cwd()
    out = Path(cfg.out)
    # The finished sets replace the whole folder: it must be one this command wrote.
    check_owned(out, "trajectories", known=(*SETS, SAMPLES_PAGE, pictures_folder(Path(SAMPLES_PAGE)).name))
    public = stage1_manifest(cfg.stage1_source)  # first: a set not imported fails before any work
    manifest = read_manifest(cfg.bench)
    manifest_path = Path(manifest.attrs["path"])
    rows = _training_rows(manifest, cfg.train_splits)
    rng = random.Random(cfg.seed)
    n_high = max(1, round(cfg.sft_size / (1 + cfg.low_high_ratio)))
    n_low = cfg.sft_size - n_high
    kinds = ["high"] * n_high + ["low"] * n_low
    rng.shuffle(kinds)
    picks = _schedule(cfg.sft_size, len(rows), rng)
    rl_picks = _schedule(cfg.rl_size or len(rows), len(rows), rng)
    stage1_rows = rows if public is None else _training_rows(public, cfg.train_splits)
    stage1_picks = _schedule(cfg.stage1_size or len(stage1_rows), len(stage1_rows), rng)
    # Absolute paths: a Ray worker need not share this process's working directory.
    paths = [image_path(manifest_path, r["image"]).resolve() for r in rows]
    shards = [Shard(i, kind, rows[p], paths[p]) for i, (kind, p) in enumerate(zip(kinds, picks, strict=True))]
    shards += [Shard(i, "rl", rows[p], paths[p]) for i, p in enumerate(rl_picks)]
    if public is None:  # the bench's own photos: made in the same pass, each photo decoded once
        shards += [Shard(i, "stage1", rows[p], paths[p]) for i, p in enumerate(stage1_picks)]
    made = _made_by_photo(cfg, shards, root.resolve())
    sft, rl = made[:len(picks)], made[len(picks):len(picks) + len(rl_picks)]
    stage1 = made[len(picks) + len(rl_picks):] if public is None else _public_stage1(
        cfg, stage1_rows, stage1_picks, Path(public.attrs["path"]))
    teacher = Teacher(cfg.teacher, cfg.teacher_tolerance) if cfg.teacher else None
    if teacher:
        # The teacher is one endpoint: asked from here, in schedule order, its counts in one place.
        sft = [teacher.rewrite(sample) if sample["kind"] == "high" else sample for sample in sft]

    # Great Expectations takes seconds to import: only a run that validates pays for it, not --help.
    from qprobe.trajectories.validation import validate_sets

    validate_sets(cfg, manifest, sft=pd.DataFrame(sft), rl=pd.DataFrame(rl), stage1=pd.DataFrame(stage1))
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for name, records in (("stage1", stage1), ("sft", sft), ("rl", rl)):
        Dataset.from_list(records, features=_sft_features() if name == "sft" else None).save_to_disk(str(staging / name))
        write_limits(staging / name, cfg.protocol)  # what the training stages check the set against
    write_samples(sft, cfg.samples_html, staging / SAMPLES_PAGE)
    mark_owned(staging, "trajectories")
    # Swap in the finished folder in one rename, so a killed run never leaves a half-written set.
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return {
        "sft": len(sft), "sft_high": n_high, "sft_low": n_low, "rl": len(rl), "stage1": len(stage1),
        "crops": sum(len(s["crops"]) for s in sft),
        "clean_crops": sum(not h for s in sft for h in s["crop_has_defect"]),
        "rl_with_defect": sum(r["has_defect"] for r in rl),
        **(teacher.stats.as_metrics() if teacher else {}),
    }


def stage1_manifest(source: str) -> pd.DataFrame | None:
    """The imported public IQA manifest that ``stage1_source`` names; None for ``bench`` (the bench's photos).

    One not imported yet is one line naming the ``qprobe data import`` command that makes it (the paper
    profile points stage 1 at KADID-10k, which a fresh clone does not hold).
    """
    if source == "bench":
        return None
    path = Path(source)
    if not path.is_file() and not (path / MANIFEST_NAME).is_file():
        folder = path.parent if path.suffix == ".parquet" else path
        # The folder's name is the loader's in the profiles (data/public/kadid10k); `data import` lists them all.
        raise QProbeError(f"trajectories.stage1_source: {source} is not imported; import it with `qprobe data "
                          f"import {folder.name} --root RELEASE_FOLDER --out {folder}` (or set stage1_source: bench)")
    return read_manifest(path)


def _public_stage1(cfg: TrajectoriesConfig, rows: list[dict[str, Any]], picks: list[int],
                   manifest_path: Path) -> list[dict[str, Any]]:
    return [stage1_prompt(rows[i], load_image(image_path(manifest_path, rows[i]["image"])), cfg)
            for i in tqdm(picks, desc="stage1", unit="image")]


def main(argv: Sequence[str] | None = None) -> int:
    """``qprobe trajectories [--bench DIR] [--out DIR] [--seed S] ...`` (defaults: ``trajectories:`` in params.yaml)."""
    from qprobe.tracking import log_artifact, log_dataset, log_metrics, stage_run

    cfg = parse_config(TrajectoriesConfig, "trajectories", argv, prog="qprobe trajectories",
                       description=__doc__)
    check_out_vs_in(cfg.out, cfg.bench, what="--out")
    start = time.perf_counter()
    with stage_run("trajectories", to_flat_dict(cfg)):
        log_dataset(cfg.bench, "vista-bench", "input")
        counts = build(cfg)
        counts["seconds"] = round(time.perf_counter() - start, 2)
        for name in SETS:
            log_dataset(Path(cfg.out) / name, f"probe-{name}", "output")
        log_metrics(counts)
        page = Path(cfg.out) / SAMPLES_PAGE
        log_artifact(page)
        for path in sorted(pictures_folder(page).glob("*")):
            log_artifact(path, artifact_path=pictures_folder(page).name)
        write_json_atomic(cfg.metrics, counts)
    print(f"trajectories: {counts['sft']} SFT ({counts['sft_high']} high / {counts['sft_low']} low resolution), "
          f"{counts['rl']} RL prompts, {counts['stage1']} stage-1 samples -> {cfg.out}")
    return 0
