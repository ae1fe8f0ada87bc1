"""Contact sheet: a grid of thumbnails with every defect box drawn and labelled ``type severity``.

Each box has its type's colour (:mod:`qprobe.defects`), drawn by :mod:`qprobe.draw`.

One look at ``contact_sheet.jpg`` tells whether defects land on texture, whether boxes match what
changed, and whether the MOS reads right; it is logged to MLflow with the stage's run.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from qprobe.bench.outputs import BenchOut
from qprobe.defects import colour
from qprobe.draw import Mark, draw_marks, font
from qprobe.io import encode_image

TILE = 320  # thumbnail box, pixels
CAPTION = 18  # caption strip under each thumbnail
PAD = 6


def _thumbnail(data: bytes, width: int, height: int) -> Image.Image:
    scale = min(TILE / width, TILE / height)
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (TILE, TILE))  # JPEG decodes at reduced size; other formats ignore it
        return img.convert("RGB").resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                         Image.Resampling.LANCZOS)


def make_contact_sheet(records: Sequence[dict[str, Any]], out: BenchOut, name: str,
                       max_tiles: int = 48, columns: int = 6) -> str | None:
    """Draw up to ``max_tiles`` of ``records`` (manifest rows; images relative to ``out``) into ``name`` in ``out``.

    The tiles are spread evenly over the records, so a large bench is sampled end to end.
    Returns where it wrote the sheet, or ``None`` when there is nothing to draw.
    """
    if not records or max_tiles <= 0:
        return None
    picks = sorted({round(i) for i in np.linspace(0, len(records) - 1, min(len(records), max_tiles))})
    chosen = [records[i] for i in picks]
    thumbs = [_thumbnail(out.read(r["image"]), r["width"], r["height"]) for r in chosen]
    columns = min(columns, len(chosen))
    row_heights = [max(t.height for t in thumbs[i: i + columns]) + CAPTION + PAD
                   for i in range(0, len(thumbs), columns)]
    sheet = Image.new("RGB", (columns * (TILE + PAD) + PAD, sum(row_heights) + PAD), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    caption_font = font(13)
    for index, (record, thumb) in enumerate(zip(chosen, thumbs, strict=True)):
        row = index // columns
        x0 = PAD + (index % columns) * (TILE + PAD)
        y0 = PAD + sum(row_heights[:row])
        marks = [Mark(d["bbox"], colour(d["type"]), f"{d['type']} {d['severity']}")
                 for d in record["defects"] or []]
        sheet.paste(draw_marks(thumb, marks, scale=thumb.width / record["width"]), (x0, y0))
        caption = f"{record['id']}  MOS {record['mos']:.2f}" + ("" if record["defects"] else "  pristine")
        draw.text((x0, y0 + thumb.height + 2), caption, fill=(230, 230, 230), font=caption_font)
    out.write(name, encode_image(sheet, name, quality=88))
    return out.locate(name)
