"""No-reference sets: authentic (in-the-wild) photos and AI-generated images; each image is its own source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qprobe.data.public.common import (
    DatasetError,
    Release,
    Scale,
    find_dir,
    find_file,
    number,
    read_table,
    require_image,
    scored,
    spread,
)

KONIQ = Scale(1, 5)
SPAQ = Scale(0, 100)
LIVEC = Scale(0, 100)
AGIQA = Scale(0, 5)

_KONIQ_SETS = {"training": "train", "validation": "val", "test": "test"}
# The CSV export, where someone made one, wins over the official xlsx: it needs no openpyxl.
_SPAQ_SCORES = (
    "Annotations/MOS and Image attribute scores.csv",
    "MOS and Image attribute scores.csv",
    "Annotations/MOS and Image attribute scores.xlsx",
    "MOS and Image attribute scores.xlsx",
)


def load_koniq10k(root: Path) -> Release:
    """KonIQ-10k: ``koniq10k_scores_and_distributions.csv`` + ``1024x768/`` (or ``512x384/``).

    The official split comes from ``koniq10k_distributions_sets.csv`` (the ``set`` column of the
    authors' metadata) when it lies beside the scores; its ``MOS`` column is on another scale
    (the rescaled z-score), so scores are always read from the release's score file.
    """
    scores = read_table(find_file(root, "koniq10k_scores_and_distributions.csv"), ("image_name", "MOS", "SD"))
    images = find_dir(root, "1024x768", "512x384")
    sets, sets_path = _koniq_sets(root)
    entries = []
    for row, values in scores.rows:
        name = scores.text(row, values, "image_name")
        image = require_image(images / name, scores.where(row, "image_name"))
        split = None
        if sets is not None:
            if name not in sets:
                raise DatasetError(f"{sets_path}: no row for {name} (listed in {scores.path}, row {row})")
            split = sets[name]
        entries.append(scored(name, image, image, scores.score(row, values, "MOS", KONIQ), KONIQ,
                              std=scores.spread(row, values, "SD"), split=split))
    return Release(entries, [scores.path, *([sets_path] if sets_path else [])])


def _koniq_sets(root: Path) -> tuple[dict[str, str] | None, Path | None]:
    try:
        path = find_file(root, "koniq10k_distributions_sets.csv")
    except DatasetError:
        return None, None
    table = read_table(path, ("image_name", "set"))
    sets = {}
    for row, values in table.rows:
        value = table.text(row, values, "set")
        if value not in _KONIQ_SETS:
            raise DatasetError(f"{table.where(row, 'set')}: unknown set {value!r} "
                               f"(expected {', '.join(_KONIQ_SETS)})")
        sets[table.text(row, values, "image_name")] = _KONIQ_SETS[value]
    return sets, path


def load_spaq(root: Path) -> Release:
    """SPAQ: ``Annotations/MOS and Image attribute scores.xlsx`` (or its CSV export) + ``TestImage/``."""
    table = read_table(find_file(root, *_SPAQ_SCORES), ("Image name", "MOS"))
    images = find_dir(root, "TestImage")
    entries = []
    for row, values in table.rows:
        name = table.text(row, values, "Image name")
        image = require_image(images / name, table.where(row, "Image name"))
        entries.append(scored(name, image, image, table.score(row, values, "MOS", SPAQ), SPAQ))
    return Release(entries, [table.path])


def load_livec(root: Path) -> Release:
    """LIVE Challenge (LIVE-Wild): ``Data/AllImages_release.mat``, ``AllMOS_release.mat``,
    ``AllStdDev_release.mat`` + ``Images/``.

    The 7 images named ``t*.bmp`` (``Images/trainingImages/``) were shown to subjects to practise
    before the study; like every published protocol, the import leaves them out (1,162 images).
    """
    data = find_dir(root, "Data")
    names_file, mos_file, std_file = (data / f"{v}.mat" for v in ("AllImages_release", "AllMOS_release",
                                                                   "AllStdDev_release"))
    names = [str(np.asarray(item).ravel()[0]) for item in _mat_variable(names_file, "AllImages_release").ravel()]
    mos = _mat_variable(mos_file, "AllMOS_release").ravel()
    std = _mat_variable(std_file, "AllStdDev_release").ravel() if std_file.is_file() else None
    for path, values in ((mos_file, mos), (std_file, std)):
        if values is not None and len(values) != len(names):
            raise DatasetError(f"{path}: {len(values)} values for the {len(names)} images of {names_file}")
    images = data.parent / "Images"
    entries = []
    for i, name in enumerate(names):
        if name.startswith("t"):
            continue
        image = require_image(images / name, f"{names_file}: entry {i + 1}, variable 'AllImages_release'")
        where = f"{mos_file}: entry {i + 1}, variable 'AllMOS_release'"
        raw = LIVEC.check(number(mos[i], where), where)
        sd = None if std is None else spread(std[i], f"{std_file}: entry {i + 1}, variable 'AllStdDev_release'")
        entries.append(scored(name, image, image, raw, LIVEC, std=sd))
    return Release(entries, [p for p in (names_file, mos_file, std_file) if p.is_file()])


def _mat_variable(path: Path, name: str) -> Any:
    import scipy.io

    if not path.is_file():
        raise DatasetError(f"{path}: missing (the LIVE Challenge release's Data folder holds it)")
    try:
        content = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises ValueError, TypeError or OSError for a bad file
        raise DatasetError(f"{path}: not a readable MATLAB file ({exc})") from exc
    if name not in content:
        found = ", ".join(k for k in content if not k.startswith("__")) or "none"
        raise DatasetError(f"{path}: missing variable {name!r} (found {found})")
    return np.asarray(content[name])


def load_agiqa3k(root: Path) -> Release:
    """AGIQA-3K: ``data.csv`` (column ``mos_quality``, ``std_quality``) + its images.

    The images sit in ``AGIQA-3K/`` or ``images/`` beside ``data.csv``, or beside it directly,
    depending on which of the authors' downloads was unpacked.
    """
    table = read_table(find_file(root, "data.csv"), ("name", "mos_quality", "std_quality"))
    folder = table.path.parent
    folders = [d for d in (folder / "AGIQA-3K", folder / "images", folder) if d.is_dir()]
    entries = []
    for row, values in table.rows:
        name = table.text(row, values, "name")
        image = next((d / name for d in folders if (d / name).is_file()), folder / name)
        require_image(image, table.where(row, "name"))
        entries.append(scored(name, image, image, table.score(row, values, "mos_quality", AGIQA), AGIQA,
                              std=table.spread(row, values, "std_quality")))
    return Release(entries, [table.path])
