"""The DeQA-Score meta bundle (``Data-DeQA-Score``), which many IQA papers reuse for their splits.

Layout: ``<SET>/metas/train_*.json`` and ``test_*.json``, each a list of
``{"id", "image", "gt_score", "gt_score_norm", "std", "std_norm", ...}`` entries whose ``image`` is
relative to the bundle root (``KONIQ/images/x.jpg``). DeQA's ``gen_soft_label.py`` writes
``gt_score`` and ``std`` as the source dataset published them and ``gt_score_norm`` as a min-max
rescaling of each set onto 1-5. Bundles derived from it name the score ``score`` and the image
``img_path``; both are read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qprobe.data.public import synthetic, wild
from qprobe.data.public.common import DatasetError, Entry, Release, Scale, number, require_image, spread

# The bundle's folder -> the published scale of its gt_score: the same mapping as the set's own
# loader, so an image gets the same mos whichever way it is imported.
FOLDER_SCALES: dict[str, Scale] = {
    "KONIQ": wild.KONIQ,
    "SPAQ": wild.SPAQ,
    "LIVE-WILD": wild.LIVEC,
    "AGIQA3K": wild.AGIQA,
    "KADID10K": synthetic.KADID,
    "TID2013": synthetic.TID2013,
    "CSIQ": synthetic.CSIQ,
    "PIPAL": synthetic.PIPAL,
}
# Full-reference folders: the reference's name, so a carved val split keeps one scene together. The
# bundle ships no references and spreads a scene's distortions over several folders (PIPAL's
# Distortion_1..4, CSIQ's per-type folders), so the source is the notional <SET>/references/<name>.
_REFERENCES: dict[str, Callable[[str], str]] = {
    "KADID10K": synthetic.reference_name,
    "TID2013": synthetic.reference_name,
    "PIPAL": synthetic.reference_name,
    "CSIQ": synthetic.csiq_reference_name,
}
_NORM = Scale(1, 5)


def load_deqa(root: Path) -> Release:
    """Every ``<SET>/metas/train*.json`` / ``test*.json`` under the bundle root; the file name gives the split.

    A set not in :data:`FOLDER_SCALES` is read from DeQA's own ``gt_score_norm`` / ``std_norm``.
    """
    metas = sorted(p for p in root.glob("*/metas/*.json") if p.stem.split("_")[0] in ("train", "test"))
    if not metas:
        raise DatasetError(f"{root}: no <SET>/metas/train_*.json or test_*.json (the Data-DeQA-Score layout)")
    entries = []
    for meta in metas:
        folder = meta.parent.parent.name.upper()
        split = "train" if meta.stem.startswith("train") else "test"
        try:
            items = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{meta}: not a readable JSON file ({exc})") from exc
        if not isinstance(items, list):
            raise DatasetError(f"{meta}: expected a list of entries, got {type(items).__name__}")
        for i, item in enumerate(items, start=1):
            entries.append(_entry(root, meta, i, item, folder, split))
    return Release(entries, metas)


def _entry(root: Path, meta: Path, i: int, item: Any, folder: str, split: str) -> Entry:
    def where(key: str) -> str:
        return f"{meta}: entry {i}, key {key!r}"

    if not isinstance(item, dict):
        raise DatasetError(f"{meta}: entry {i}: expected an object, got {type(item).__name__}")
    image_key = next((k for k in ("image", "img_path") if k in item), "image")
    relpath = str(item.get(image_key) or "")
    if not relpath:
        raise DatasetError(f"{where(image_key)}: missing")
    image = require_image(root / relpath, where(image_key))
    reference = _REFERENCES.get(folder)
    source = root / meta.parent.parent.name / "references" / reference(image.name) if reference else image

    scale = FOLDER_SCALES.get(folder)
    score_key = next((k for k in ("gt_score", "score") if k in item), None)
    if scale is not None and score_key is not None:
        raw = scale.check(number(item[score_key], where(score_key)), where(score_key))
        std = spread(item["std"], where("std")) if item.get("std") is not None else None
        return Entry(key=relpath, image=image, source=source, mos_raw=raw, mos=scale.mos(raw),
                     mos_std=None if std is None else scale.std(std), split=split)
    if "gt_score_norm" not in item:
        raise DatasetError(f"{where('gt_score_norm')}: missing; needed where the set ({folder}) has no "
                           f"known scale (known: {', '.join(FOLDER_SCALES)})")
    mos = _NORM.check(number(item["gt_score_norm"], where("gt_score_norm")), where("gt_score_norm"))
    std = spread(item["std_norm"], where("std_norm")) if item.get("std_norm") is not None else None
    raw = number(item[score_key], where(score_key)) if score_key is not None else mos
    return Entry(key=relpath, image=image, source=source, mos_raw=raw, mos=mos, mos_std=std, split=split)
