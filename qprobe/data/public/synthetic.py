"""Full-reference sets: synthetic or restoration distortions of pristine references.

Each image's source is its reference, so splits keep every version of one scene together.
"""

from __future__ import annotations

import os
from pathlib import Path

from qprobe.data.public.common import (
    DatasetError,
    Release,
    Scale,
    find_dir,
    find_file,
    label,
    number,
    read_table,
    require_image,
    scored,
    spread,
)
from qprobe.io import IMAGE_EXTENSIONS

KADID = Scale(1, 5)
TID2013 = Scale(0, 9)
CSIQ = Scale(0, 1, higher_is_better=False)
# Elo has no bounds and PIPAL publishes none: a fixed bracket keeps the mapping the same for every
# subset and release; a score outside it is reported, never clipped.
PIPAL = Scale(800, 2000)

# CSIQ's dst_type -> (folder under dst_imgs/, the type as written in the file name)
_CSIQ_TYPES = {
    "noise": ("awgn", "AWGN"),
    "jpeg": ("jpeg", "JPEG"),
    "jpeg 2000": ("jpeg2000", "jpeg2000"),
    "fnoise": ("fnoise", "fnoise"),
    "blur": ("blur", "BLUR"),
    "contrast": ("contrast", "contrast"),
}
_PIPAL_LABELS = {"Train_Label": "train", "Val_Label": "val", "Test_Label": "test"}


def reference_name(name: str) -> str:
    """The reference of a KADID, TID2013 or PIPAL image: ``I01_01_01.png`` -> ``I01.png``."""
    return name.split("_")[0] + Path(name).suffix


def csiq_reference_name(name: str) -> str:
    """The reference of a CSIQ image: ``1600.AWGN.1.png`` -> ``1600.png``."""
    return name.split(".")[0] + Path(name).suffix


def load_kadid10k(root: Path) -> Release:
    """KADID-10k: ``dmos.csv`` (``dist_img, ref_img, dmos, var``) + ``images/`` (references included)."""
    table = read_table(find_file(root, "dmos.csv"), ("dist_img", "ref_img", "dmos", "var"))
    images = table.path.parent / "images"
    entries = []
    for row, values in table.rows:
        name = table.text(row, values, "dist_img")
        image = require_image(images / name, table.where(row, "dist_img"))
        source = images / table.text(row, values, "ref_img")
        std = table.spread(row, values, "var") ** 0.5  # the release gives the variance of the ratings
        entries.append(scored(name, image, source, table.score(row, values, "dmos", KADID), KADID, std=std))
    return Release(entries, [table.path])


def load_tid2013(root: Path) -> Release:
    """TID2013: ``mos_with_names.txt`` (``MOS name`` per line), ``mos_std.txt`` + ``distorted_images/``.

    File names are matched without regard to case: the list says ``I01_01_1.bmp`` where the
    archive holds ``i01_01_1.bmp`` for some images, and references end in ``.BMP``.
    """
    mos_file = find_file(root, "mos_with_names.txt")
    base = mos_file.parent
    distorted = _by_lower_name(find_dir(base, "distorted_images"))
    references_dir = base / "reference_images"
    references = _by_lower_name(references_dir) if references_dir.is_dir() else {}
    std_file = base / "mos_std.txt"
    stds = _lines(std_file) if std_file.is_file() else None
    lines = _lines(mos_file)
    if stds is not None and len(stds) != len(lines):
        raise DatasetError(f"{std_file}: {len(stds)} lines for the {len(lines)} images of {mos_file}")
    entries = []
    for i, (n, line) in enumerate(lines):
        words = line.split()
        if len(words) != 2:
            raise DatasetError(f"{mos_file}: line {n}: expected 'MOS name', got {line!r}")
        name = words[1]
        where = f"{mos_file}: line {n}, column 'name'"
        image = require_image(distorted.get(name.lower(), base / "distorted_images" / name), where)
        where = f"{mos_file}: line {n}, column 'MOS'"
        raw = TID2013.check(number(words[0], where), where)
        std = None if stds is None else spread(stds[i][1], f"{std_file}: line {stds[i][0]}, column 'std'")
        ref = reference_name(name)
        source = references.get(ref.lower(), references_dir / ref)
        entries.append(scored(name, image, source, raw, TID2013, std=std))
    return Release(entries, [mos_file, *([std_file] if stds is not None else [])])


def load_csiq(root: Path) -> Release:
    """CSIQ: ``csiq.DMOS.xlsx`` (sheet ``all_by_image``; or its CSV export ``csiq.DMOS.csv``) +
    ``dst_imgs/<type>/<image>.<TYPE>.<level>.png`` and the references in ``src_imgs/``."""
    table = read_table(find_file(root, "csiq.DMOS.csv", "csiq.DMOS.xlsx"),
                       ("image", "dst_type", "dst_lev", "dmos_std", "dmos"), sheet="all_by_image")
    base = table.path.parent
    entries = []
    for row, values in table.rows:
        image_name = table.text(row, values, "image")
        kind = table.text(row, values, "dst_type").lower()
        if kind not in _CSIQ_TYPES:
            raise DatasetError(f"{table.where(row, 'dst_type')}: unknown distortion {kind!r} "
                               f"(expected {', '.join(_CSIQ_TYPES)})")
        level = label(table.number(row, values, "dst_lev"))
        folder, token = _CSIQ_TYPES[kind]
        name = f"{image_name}.{token}.{level}.png"
        image = require_image(base / "dst_imgs" / folder / name, table.where(row, "image"))
        entries.append(scored(name, image, base / "src_imgs" / csiq_reference_name(name),
                              table.score(row, values, "dmos", CSIQ), CSIQ,
                              std=table.spread(row, values, "dmos_std")))
    return Release(entries, [table.path])


def load_pipal(root: Path) -> Release:
    """PIPAL: ``Train_Label/A0001.txt`` ... (``image,elo`` per line) + the images anywhere below.

    The training distortions ship as ``Distortion_1`` .. ``Distortion_4`` and the references as
    ``Train_Ref``; the images are found by name under the release folder. ``Val_Label`` and
    ``Test_Label``, where the later NTIRE releases are present, give the official val and test splits.
    """
    label_dirs = {}
    for folder, split in _PIPAL_LABELS.items():
        try:
            label_dirs[find_dir(root, folder)] = split
        except DatasetError:
            continue
    if not label_dirs:
        raise DatasetError(f"{root}: missing folder Train_Label (the per-reference Elo score files of PIPAL)")
    base = next(iter(label_dirs)).parent
    index = _images_by_name(base)
    entries, annotations = [], []
    for label_dir, split in label_dirs.items():
        for txt in sorted(label_dir.glob("*.txt")):
            annotations.append(txt)
            for n, line in _lines(txt):
                words = [w.strip() for w in line.split(",")]
                if len(words) != 2:
                    raise DatasetError(f"{txt}: line {n}: expected 'image,score', got {line!r}")
                name = words[0]
                image = require_image(index.get(name, base / name), f"{txt}: line {n}, column 'image'")
                where = f"{txt}: line {n}, column 'score'"
                ref = reference_name(name)
                source = index.get(ref, base / "Train_Ref" / ref)
                entries.append(scored(name, image, source, PIPAL.check(number(words[1], where), where), PIPAL,
                                      split=split))
    return Release(entries, annotations)


def _lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a text file with their 1-based numbers."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read as text ({exc})") from exc
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _by_lower_name(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_file()}


def _images_by_name(base: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for filename in sorted(filenames):
            if Path(filename).suffix.lower() in IMAGE_EXTENSIONS:
                index.setdefault(filename, Path(dirpath) / filename)
    return index
