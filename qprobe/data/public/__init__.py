"""Public IQA datasets, read from their official release layouts into bench manifests.

``qprobe data import NAME --root DIR_OR_S3 --out DIR`` reads one release, maps its scores onto
the pipeline's 1-5 scale (``docs/architecture.md``, *Data schemas*), and writes ``DIR/manifest.parquet`` in the
bench manifest schema (:mod:`qprobe.data.manifest`), so evaluation runs on KonIQ-10k, SPAQ, KADID
and the rest exactly as it runs on Vista-Bench.

Each loader is one plain function, ``(root: Path) -> Release``, in :data:`LOADERS`:

=========  ==========================================  ==============  ======================  ==========================
NAME       official files read                         published raw   mos on 1-5              figure from
=========  ==========================================  ==============  ======================  ==========================
koniq10k   koniq10k_scores_and_distributions.csv       MOS 1-5         = MOS                   5-point ACR; Hosu et al.,
           (MOS, SD), 1024x768/ (or 512x384/);                                                 TIP 2020
           split: koniq10k_distributions_sets.csv
spaq       Annotations/MOS and Image attribute         MOS 0-100       1 + 4 MOS/100           slider 0-100; Fang et al.,
           scores.xlsx (or .csv), TestImage/                                                   CVPR 2020
kadid10k   dmos.csv (dmos, var), images/               DMOS 1-5,       = dmos; std = sqrt var  DCR 1 (very annoying) to
                                                       5 = best                                5 (imperceptible); Lin et
                                                                                               al., QoMEX 2019
livec      Data/AllImages_release.mat,                 MOS 0-100       1 + 4 MOS/100           slider 0-100; Ghadiyaram
           AllMOS_release.mat, AllStdDev_release.mat,                                          & Bovik, TIP 2016 and the
           Images/                                                                             release's readme
agiqa3k    data.csv (mos_quality, std_quality)         MOS 0-5         1 + 4 MOS/5             Li et al., TCSVT 2023
pipal      Train_Label/*.txt (Elo), Distortion_*/,     Elo, no bound   1 + 4 (Elo-800)/1200    none published: the fixed
           Train_Ref/                                                                          bracket 800-2000 Elo
csiq       csiq.DMOS.xlsx sheet all_by_image (or       DMOS 0-1,       5 - 4 DMOS (inverted)   Larson & Chandler, JEI
           csiq.DMOS.csv), dst_imgs/, src_imgs/        0 = best                                2010
tid2013    mos_with_names.txt, mos_std.txt,            MOS 0-9         1 + 4 MOS/9             Ponomarenko et al., SPIC
           distorted_images/, reference_images/                                                2015 (and its readme)
deqa       <SET>/metas/train_*.json, test_*.json       gt_score on     the set's row above;    DeQA-Score,
           (Data-DeQA-Score bundle)                    its set's       else gt_score_norm      build_soft_labels/
                                                       scale           (DeQA's 1-5)            gen_soft_label.py
uhdiqa     uhd-iqa-metadata.csv (image_name,           MOS 0-1         1 + 4 MOS               Hosu et al., ECCV
           quality_mos, set), training/, validation/,                                          workshops 2024 (UHD-IQA
           test/ (or the challenge's per-set files)                                            benchmark database)
hriq       hriq_mos_file.csv (image path in column 1,  MOS 1-5         = MOS                   5-point ACR; Huang, Wan
           MOS in column 8 or a MOS column),                                                   & Korhonen, ICASSP 2024
           2880x2160/
=========  ==========================================  ==============  ======================  ==========================

``mos_std`` is the published standard deviation times the same factor (4 / (high - low)); it is
null where the release gives none (SPAQ, PIPAL). ``mos_raw`` keeps the published value. A score
outside its published range is an error, never clipped.

Rows: ``id`` is ``NAME:<the release's own image name>`` (stable across machines and re-imports);
``source`` is the pristine reference for full-reference sets (KADID, TID2013, CSIQ, PIPAL and their
DeQA folders) and the image itself for the others; ``has_defect`` is null and ``defects`` empty
(whole-image scores, no boxes).

Images are not copied: ``image`` and ``source`` are paths relative to the output folder pointing
back into the release, so ``qprobe.data.manifest.image_path(manifest, row.image)`` opens the
original file while the release stays where it was imported from. An ``s3://`` root is first
downloaded to ``--cache-dir`` (default ``OUT/release``, resumable: objects already there with the
same size are kept), which keeps such an output folder self-contained.

Splits are by source, so no scene is in two splits. The official split is kept where the release
has one (KonIQ-10k's and UHD-IQA's ``set`` column; DeQA's train/test files; PIPAL's Train/Val/Test label
folders); a split the release lacks is drawn, seeded, from the sources of its train part:
``--test-fraction`` and ``--val-fraction`` of them. Where a release has no split at all, that is the whole set.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qprobe.config import ConfigError, parse_config
from qprobe.data.manifest import MANIFEST_NAME, SPLITS, write_manifest
from qprobe.data.public.common import DatasetError, Entry, Release
from qprobe.data.public.deqa import load_deqa
from qprobe.data.public.highres import load_hriq, load_uhdiqa
from qprobe.data.public.synthetic import load_csiq, load_kadid10k, load_pipal, load_tid2013
from qprobe.data.public.wild import load_agiqa3k, load_koniq10k, load_livec, load_spaq
from qprobe.data.splits import assign_splits
from qprobe.errors import QProbeError
from qprobe.io import check_out_vs_in, file_md5, image_size
from qprobe.storage import is_s3_uri

log = logging.getLogger(__name__)

Loader = Callable[[Path], Release]

LOADERS: dict[str, Loader] = {
    "koniq10k": load_koniq10k,
    "spaq": load_spaq,
    "kadid10k": load_kadid10k,
    "livec": load_livec,
    "agiqa3k": load_agiqa3k,
    "pipal": load_pipal,
    "csiq": load_csiq,
    "tid2013": load_tid2013,
    "deqa": load_deqa,
    "uhdiqa": load_uhdiqa,
    "hriq": load_hriq,
}

__all__ = ["LOADERS", "DatasetError", "Entry", "ImportConfig", "Release", "import_dataset", "main"]


@dataclass
class ImportConfig:
    root: str = field(default="", metadata={"help": "the official release: a folder, or s3://bucket/prefix"})
    out: str = field(default="", metadata={"help": "output folder; gets manifest.parquet"})
    seed: int = field(default=0, metadata={"help": "seed of the splits drawn where the release has none"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of the train part's sources drawn into val where the release has no val split"})
    test_fraction: float = field(default=0.2, metadata={
        "help": "share of the train part's sources drawn into test where the release has no test split"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "where an s3:// root is downloaded (default: OUT/release)"})
    track: bool = field(default=True, metadata={"help": "record an MLflow run (--no-track skips it)"})

    def __post_init__(self) -> None:
        if not self.root:
            raise ConfigError("--root is required: the folder (or s3://bucket/prefix) of the release")
        if not self.out:
            raise ConfigError("--out is required: the folder that gets manifest.parquet")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')}: expected a share in [0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("--val-fraction + --test-fraction must leave a train split (sum below 1)")


def import_dataset(name: str, config: ImportConfig) -> tuple[Path, dict[str, int]]:
    """Import release ``name`` as ``config`` says; returns the manifest path and the images per split."""
    name = _known(name)
    out = Path(config.out)
    root = _local_root(config, out)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (--root)")
    release = LOADERS[name](root)
    if not release.entries:
        raise DatasetError(f"{root}: the {name} release lists no images")
    splits = _entry_splits(release.entries, config.seed, config.val_fraction, config.test_fraction)
    records = _records(name, release.entries, splits, out)
    path = write_manifest(records, out / MANIFEST_NAME)
    tally = Counter(splits)
    counts = {s: tally.get(s, 0) for s in SPLITS}
    print(f"{name}: {len(records)} images -> {path}")
    for split, n in counts.items():
        print(f"  {split:<5} {n}")
    if config.track:
        _track(name, config, release, path, counts)
    return path, counts


def _known(name: str) -> str:
    if name.lower() not in LOADERS:
        raise QProbeError(f"unknown dataset {name!r}; known: {', '.join(LOADERS)}")
    return name.lower()


def _local_root(config: ImportConfig, out: Path) -> Path:
    from qprobe import storage

    if not storage.is_s3_uri(config.root):
        return Path(config.root)
    cache = Path(config.cache_dir) if config.cache_dir else out / "release"
    fetched, kept = storage.sync_prefix(config.root, cache)
    if not fetched and not kept:
        raise DatasetError(f"{config.root}: no objects under this prefix")
    log.info("%s: %d objects downloaded, %d already in %s", config.root, len(fetched), kept, cache)
    return cache


def _entry_splits(entries: Sequence[Entry], seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """One split per entry: the official one where given, else drawn by source from the train part.

    Entries without an official split count as the train part. Each of val and test that no entry
    has officially gets its ``*_fraction`` of the train part's sources, with all their images, by
    the bench's rule (:func:`qprobe.data.splits.assign_splits`; at least one source stays in train).
    """
    splits = [e.split or "train" for e in entries]
    official = {e.split for e in entries if e.split}
    drawn = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in official}
    pool = sorted({str(e.source) for e, s in zip(entries, splits, strict=True) if s == "train"})
    moved = assign_splits(pool, {"train": 1.0 - sum(drawn.values()), **drawn}, seed)
    result = [moved[str(e.source)] if s == "train" else s for e, s in zip(entries, splits, strict=True)]
    shared = _sources_in_several_splits(entries, result)
    if shared:
        log.warning("%d sources have images in more than one official split (e.g. %s); kept as published",
                    len(shared), shared[0])
    return result


def _sources_in_several_splits(entries: Sequence[Entry], splits: Sequence[str]) -> list[str]:
    seen: dict[str, set[str]] = {}
    for entry, split in zip(entries, splits, strict=True):
        seen.setdefault(str(entry.source), set()).add(split)
    return sorted(s for s, where in seen.items() if len(where) > 1)


def _records(name: str, entries: Sequence[Entry], splits: Sequence[str], out: Path) -> list[dict[str, Any]]:
    out_abs = os.path.abspath(out)

    def relative(path: Path) -> str:
        return Path(os.path.relpath(os.path.abspath(path), out_abs)).as_posix()

    records, ids = [], set()
    for entry, split in zip(entries, splits, strict=True):
        record_id = f"{name}:{entry.key}"
        if record_id in ids:
            raise DatasetError(f"{entry.image}: listed twice (id {record_id!r})")
        ids.add(record_id)
        try:
            width, height = image_size(entry.image)
        except Exception as exc:  # Pillow raises several types for a file that is not an image
            raise DatasetError(f"{entry.image}: not a readable image ({exc})") from exc
        records.append({
            "id": record_id, "image": relative(entry.image), "source": relative(entry.source),
            "width": width, "height": height, "split": split, "has_defect": None, "defects": [],
            "mos": entry.mos, "mos_std": entry.mos_std, "mos_raw": entry.mos_raw,
        })
    return records


def _track(name: str, config: ImportConfig, release: Release, manifest: Path, counts: dict[str, int]) -> None:
    from qprobe.tracking import log_dataset, log_metrics, stage_run

    digest = hashlib.md5("".join(f"{p.name} {file_md5(p)}\n" for p in release.annotations).encode()).hexdigest()
    with stage_run("data-import", {"dataset": name, **asdict(config)}):
        log_dataset(config.root, name=f"{name}-release", context="source", digest=digest)
        log_dataset(manifest, name=name, context="output")
        log_metrics({"images": sum(counts.values()), **{f"images_{s}": n for s, n in counts.items()}})


def main(argv: Sequence[str] | None = None) -> int:
    """Import a public IQA dataset as a bench manifest.

    Example::

        qprobe data import koniq10k --root data/raw/koniq10k --out data/public/koniq10k
        qprobe data import kadid10k --root s3://datasets/kadid10k --out data/public/kadid10k --seed 1
        qprobe data import deqa --root data/raw/Data-DeQA-Score --out data/public/deqa --no-track
    """
    argv = list(argv or [])
    name = argv.pop(0) if argv and not argv[0].startswith("-") else None
    if name is not None:
        name = _known(name)
    description = f"NAME is one of: {', '.join(LOADERS)}. The module docstring of qprobe.data.public has the layouts."
    config = parse_config(ImportConfig, "data_import", argv, prog="qprobe data import NAME", description=description)
    if name is None:
        raise QProbeError(f"missing dataset NAME (one of: {', '.join(LOADERS)})")
    check_out_vs_in(config.out, None if is_s3_uri(config.root) else config.root, what="--out")
    import_dataset(name, config)
    return 0
