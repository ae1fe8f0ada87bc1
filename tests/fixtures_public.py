"""Tiny releases of the public IQA datasets, each in its official layout and file format.

Every builder writes a few small images and the score files exactly as the dataset ships them
(column names, separators, sheet offsets, MATLAB variables), with scores at both ends of the
published range, and returns a :class:`Spec`: what the import of that folder must produce.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Spec:
    count: int  # images the manifest must hold
    # release key -> (published score, expected mos, expected mos_std or None)
    scores: dict[str, tuple[float, float, float | None]] = field(default_factory=dict)
    official_splits: dict[str, str] = field(default_factory=dict)  # release key -> split


def write_image(path: Path, size: tuple[int, int] = (12, 8), shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), (shade * 37) % 256, dtype=np.uint8)
    pixels[: size[1] // 2, :, 1] = 200
    Image.fromarray(pixels).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def build_koniq10k(root: Path, *, sets: bool = True) -> Spec:
    """``koniq10k_scores_and_distributions.csv`` + ``1024x768/*.jpg`` (+ the authors' sets file)."""
    names = [f"{10004473376 + i}.jpg" for i in range(10)]
    mos = np.linspace(1.0, 5.0, len(names))
    set_of = ["training"] * 6 + ["validation"] * 2 + ["test"] * 2
    for i, name in enumerate(names):
        write_image(root / "1024x768" / name, (16, 12), i)
    counts = [[0, 0, 25, 73, 7] for _ in names]
    write_csv(root / "koniq10k_scores_and_distributions.csv",
              ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"],
              [[n, *c, sum(c), m, 0.5, 77.38] for n, c, m in zip(names, counts, mos, strict=True)])
    if sets:
        write_csv(root / "koniq10k_distributions_sets.csv",
                  ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "set"],
                  [[n, 0.0, 0.0, 0.238, 0.695, 0.067, 105, 77.38, 0.5, s]
                   for n, s in zip(names, set_of, strict=True)])
    return Spec(count=10, scores={names[0]: (1.0, 1.0, 0.5), names[-1]: (5.0, 5.0, 0.5)},
                official_splits=dict(zip(names, ["train"] * 6 + ["val"] * 2 + ["test"] * 2, strict=True))
                if sets else {})


SPAQ_COLUMNS = ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]


def spaq_rows() -> list[list[object]]:
    return [[f"{i:05d}.jpg", m, 50, 50, 50, 50, 50] for i, m in enumerate(np.linspace(0, 100, 10), start=1)]


def build_spaq(root: Path) -> Spec:
    """``Annotations/MOS and Image attribute scores.csv`` (the sheet's CSV export) + ``TestImage/*.jpg``."""
    rows = spaq_rows()
    for i, row in enumerate(rows):
        write_image(root / "TestImage" / str(row[0]), (16, 12), i)
    write_csv(root / "Annotations" / "MOS and Image attribute scores.csv", SPAQ_COLUMNS, rows)
    return Spec(count=10, scores={"00001.jpg": (0.0, 1.0, None), "00010.jpg": (100.0, 5.0, None)})


def build_kadid10k(root: Path) -> Spec:
    """``kadid10k/dmos.csv`` + ``kadid10k/images/`` with references ``I01.png`` .. beside the distortions."""
    base = root / "kadid10k"
    rows = []
    for r in range(1, 6):
        write_image(base / "images" / f"I{r:02d}.png", shade=r)
        for d, level in ((1, 1), (2, 3)):
            name = f"I{r:02d}_{d:02d}_{level:02d}.png"
            write_image(base / "images" / name, shade=r + d)
            rows.append([name, f"I{r:02d}.png", 1.0 + (len(rows) % 5), 0.25])
    rows[-1][2] = 5.0
    write_csv(base / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], rows)
    return Spec(count=10, scores={"I01_01_01.png": (1.0, 1.0, 0.5), "I05_02_03.png": (5.0, 5.0, 0.5)})


def build_livec(root: Path) -> Spec:
    """``ChallengeDB_release/Data/*.mat`` (MATLAB cell array + row vectors) + ``Images/`` (+ trainingImages)."""
    import scipy.io

    base = root / "ChallengeDB_release"
    names = ["t1.bmp", "t2.bmp"] + [f"{10 + i}.bmp" for i in range(8)]
    for i, name in enumerate(names):
        folder = base / "Images" / ("trainingImages" if name.startswith("t") else "")
        write_image(folder / name, (10, 10), i)
    cell = np.empty((len(names), 1), dtype=object)
    cell[:, 0] = names
    mos = np.array([[40.0, 60.0, *np.linspace(0.0, 100.0, 8)]])
    data = base / "Data"
    data.mkdir(parents=True)
    scipy.io.savemat(data / "AllImages_release.mat", {"AllImages_release": cell})
    scipy.io.savemat(data / "AllMOS_release.mat", {"AllMOS_release": mos})
    scipy.io.savemat(data / "AllStdDev_release.mat", {"AllStdDev_release": np.full((1, len(names)), 20.0)})
    return Spec(count=8, scores={"10.bmp": (0.0, 1.0, 0.8), "17.bmp": (100.0, 5.0, 0.8)})


def build_agiqa3k(root: Path) -> Spec:
    """``data.csv`` (prompts quoted where they hold commas) + ``AGIQA-3K/*.jpg``."""
    names = [f"{model}_normal_{i:03d}.jpg" for model in ("AttnGAN", "midjourney") for i in range(4)]
    rows = []
    for i, (name, m) in enumerate(zip(names, np.linspace(0.0, 5.0, len(names)), strict=True)):
        write_image(root / "AGIQA-3K" / name, (16, 16), i)
        rows.append([name, "a cat, sci-fi style", "", "", "sci-fi style", m, 0.5, 1.0, 0.4])
    write_csv(root / "data.csv", ["name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality",
                                  "mos_align", "std_align"], rows)
    return Spec(count=8, scores={names[0]: (0.0, 1.0, 0.4), names[-1]: (5.0, 5.0, 0.4)})


def build_pipal(root: Path, *, val: bool = False) -> Spec:
    """``Train_Label/A0001.txt`` .. (``name,elo``), ``Train_Ref/``, ``Distortion_1`` .. ``Distortion_2``."""
    elo = iter([800.0, 1446.2686, 1500.5, 1200.0, 1333.3, 1600.0, 1700.0, 1100.0, 1400.0, 2000.0, 1250.0, 1350.0])
    for r in range(1, 5):
        ref = f"A{r:04d}"
        write_image(root / "Train_Ref" / f"{ref}.bmp", shade=r)
        lines = []
        for d in range(3):
            name = f"{ref}_{d:02d}_{d + 1:02d}.bmp"
            write_image(root / f"Distortion_{d % 2 + 1}" / name, shade=r + d)
            lines.append(f"{name},{next(elo)}\n")
        (root / "Train_Label").mkdir(exist_ok=True)
        (root / "Train_Label" / f"{ref}.txt").write_text("".join(lines))
    spec = Spec(count=12, scores={"A0001_00_01.bmp": (800.0, 1.0, None), "A0004_00_01.bmp": (2000.0, 5.0, None)})
    if val:
        write_image(root / "Val_Ref" / "A0100.bmp")
        write_image(root / "Val_Dis" / "A0100_10_00.bmp")
        (root / "Val_Label").mkdir()
        (root / "Val_Label" / "A0100.txt").write_text("A0100_10_00.bmp,1500.0\n")
        spec.count += 1
        spec.official_splits["A0100_10_00.bmp"] = "val"
    return spec


CSIQ_REFS = ("1600", "aerial_city", "boston", "bridge")
# dst_type as in the sheet, and the file name it gives: dst_imgs/<folder>/<image>.<TOKEN>.<level>.png
CSIQ_TYPES = (("noise", "awgn", "AWGN"), ("jpeg 2000", "jpeg2000", "jpeg2000"), ("blur", "blur", "BLUR"))


def csiq_rows() -> list[list[object]]:
    """The ``all_by_image`` table: title rows above, three blank columns to the left."""
    rows: list[list[object]] = [["", "", "", "CSIQ DMOS"], [], [],
                                ["", "", "", "image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"]]
    dmos = iter(np.linspace(0.0, 1.0, len(CSIQ_REFS) * len(CSIQ_TYPES)))
    for ref in CSIQ_REFS:
        for idx, (kind, _, _) in enumerate(CSIQ_TYPES, start=1):
            rows.append(["", "", "", int(ref) if ref.isdigit() else ref, idx, kind, 2, 0.05, float(next(dmos))])
    return rows


def build_csiq(root: Path) -> Spec:
    """``csiq.DMOS.csv`` (CSV export of sheet ``all_by_image``) + ``dst_imgs/<type>/`` + ``src_imgs/``."""
    for r, ref in enumerate(CSIQ_REFS):
        write_image(root / "src_imgs" / f"{ref}.png", shade=r)
        for _, folder, token in CSIQ_TYPES:
            write_image(root / "dst_imgs" / folder / f"{ref}.{token}.2.png", shade=r + len(token))
    with open(root / "csiq.DMOS.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(csiq_rows())
    return Spec(count=12, scores={"1600.AWGN.2.png": (0.0, 5.0, 0.2), "bridge.BLUR.2.png": (1.0, 1.0, 0.2)})


def build_tid2013(root: Path) -> Spec:
    """``mos_with_names.txt`` + ``mos_std.txt`` + ``distorted_images/`` and ``reference_images/`` (mixed case)."""
    lines, stds = [], []
    mos = iter(np.linspace(0.0, 9.0, 8))
    for r in (1, 2, 3, 25):
        ref = f"I{r:02d}" if r != 25 else "i25"
        write_image(root / "reference_images" / f"{ref.upper()}.BMP", shade=r)
        for d in (1, 2):
            listed = f"{ref}_{d:02d}_{d}.bmp"
            # The archive stores some distortions with a lower-case prefix the list spells in upper case.
            stored = listed.lower() if r == 2 else listed
            write_image(root / "distorted_images" / stored, shade=r + d)
            lines.append(f"{next(mos):.5f} {listed}\n")
            stds.append("0.90000\n")
    (root / "mos_with_names.txt").write_text("".join(lines))
    (root / "mos_std.txt").write_text("".join(stds))
    return Spec(count=8, scores={"I01_01_1.bmp": (0.0, 1.0, 0.4), "i25_02_2.bmp": (9.0, 5.0, 0.4)})


def build_deqa(root: Path) -> Spec:
    """``Data-DeQA-Score``: ``<SET>/images`` + ``<SET>/metas/{train,test}_*.json``, plus DeQA's mos/split json."""
    koniq = []
    for i, m in enumerate(np.linspace(1.0, 5.0, 10)):
        name = f"KONIQ/images/{826373 + i}.jpg"
        write_image(root / name, (16, 12), i)
        koniq.append({"id": f"{826373 + i}.jpg->{m}", "image": name, "gt_score": float(m),
                      "gt_score_norm": float(m), "std": 0.5, "std_norm": 0.5,
                      "level_probs": [0.0, 0.5, 0.5, 0.0, 0.0]})
    kadid = []
    for r in range(1, 5):
        for d in (1, 2):
            name = f"KADID10K/images/I{r:02d}_{d:02d}_01.png"
            write_image(root / name, shade=r + d)
            kadid.append({"id": name, "image": name, "gt_score": 1.0 + r, "std": 0.6})
    custom = [{"img_path": "CUSTOM/images/a.png", "score": 62.0, "gt_score_norm": 3.5, "std_norm": 0.3}]
    write_image(root / "CUSTOM/images/a.png")
    metas = {"KONIQ/metas/train_koniq_7k.json": koniq[:7], "KONIQ/metas/test_koniq_2k.json": koniq[7:],
             "KADID10K/metas/train_kadid_8k.json": kadid, "CUSTOM/metas/test_custom.json": custom,
             "KONIQ/metas/mos.json": {"x.jpg": {"mos": "3.0", "std": "0.5"}},
             "KONIQ/metas/split.json": {"train": [], "test": []}}
    for relpath, content in metas.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_text(json.dumps(content, indent=4))
    return Spec(count=19,
                scores={"KONIQ/images/826373.jpg": (1.0, 1.0, 0.5), "KONIQ/images/826382.jpg": (5.0, 5.0, 0.5),
                        "KADID10K/images/I04_01_01.png": (5.0, 5.0, 0.6), "CUSTOM/images/a.png": (62.0, 3.5, 0.3)},
                official_splits={"KONIQ/images/826380.jpg": "test", "CUSTOM/images/a.png": "test"})


def build_uhdiqa(root: Path, *, per_set: bool = False) -> Spec:
    """``UHD-IQA-database/uhd-iqa-metadata.csv`` + ``training/``, ``validation/``, ``test/`` (the images are
    3840 px wide in the release; tiny here); ``per_set``: the AIM 2024 challenge's one file per set."""
    folder = root / "UHD-IQA-database"
    sets = ["training"] * 4 + ["validation"] * 2 + ["test"] * 2
    names = [f"{1000 + i}.jpg" for i in range(len(sets))]
    mos = np.linspace(0.0, 1.0, len(names))
    for i, (name, where) in enumerate(zip(names, sets, strict=True)):
        write_image(folder / where / name, (24, 16), i)
    rows = [[n, round(m, 6), s, "", 4000, 2667, 100, 10, 5, 50, 1, 123456, "someone", "https://pixabay.com/x", f"x-{n}"]
            for n, m, s in zip(names, mos, sets, strict=True)]
    header = ["image_name", "quality_mos", "set", "subset", "orig_width", "orig_height", "views", "likes",
              "favorites", "downloads", "comments", "image_bytes", "user_name", "page_url", "image_name_orig"]
    if per_set:
        for name in ("training", "validation", "test"):
            write_csv(folder / f"uhd-iqa-{name}-metadata.csv", header, [r for r in rows if r[2] == name])
    else:
        write_csv(folder / "uhd-iqa-metadata.csv", header, rows)
    return Spec(count=len(names), scores={names[0]: (0.0, 1.0, None), names[-1]: (1.0, 5.0, None)},
                official_splits=dict(zip(names, ["train"] * 4 + ["val"] * 2 + ["test"] * 2, strict=True)))


def build_hriq(root: Path) -> Spec:
    """``hriq_mos_file.csv`` (image path first, the MOS in the eighth column) + ``2880x2160/`` (and the
    smaller copies the release ships beside them)."""
    names = [f"{i:04d}.jpg" for i in range(1, 9)]
    mos = np.linspace(1.0, 5.0, len(names))
    for i, name in enumerate(names):
        write_image(root / "2880x2160" / name, (32, 24), i)
        write_image(root / "512x384" / name, (8, 6), i)
    write_csv(root / "hriq_mos_file.csv", ["filename", "r1", "r2", "r3", "r4", "r5", "n", "mos_value", "std"],
              [[f"2880x2160/{n}", 0, 1, 5, 10, 9, 25, m, 0.7] for n, m in zip(names, mos, strict=True)])
    return Spec(count=len(names), scores={names[0]: (1.0, 1.0, None), names[-1]: (5.0, 5.0, None)})


BUILDERS = {
    "koniq10k": build_koniq10k,
    "spaq": build_spaq,
    "kadid10k": build_kadid10k,
    "livec": build_livec,
    "agiqa3k": build_agiqa3k,
    "pipal": build_pipal,
    "csiq": build_csiq,
    "tid2013": build_tid2013,
    "deqa": build_deqa,
    "uhdiqa": build_uhdiqa,
    "hriq": build_hriq,
}
