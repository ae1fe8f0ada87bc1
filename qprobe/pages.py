"""HTML pages from the Jinja2 templates in ``qprobe/templates/``: the evaluation report and the
trajectories' samples page, and the pictures they show.

Autoescape is on: every value a page shows is escaped unless it is a ``markupsafe.Markup`` built on
purpose (with ``Markup.format``, which escapes what goes into it). Both pages extend
``base.html.jinja``, which inlines the one stylesheet, ``style.css.jinja``.

A picture (:class:`Pictures`) is a thumbnail inlined in the page as a data URL, so the page reads
on its own (mailed, offline, in MLflow's artifact view), that opens its full-size image: a JPEG in
the folder beside the page (``report_images/`` for ``report.html``), linked by a relative path so
the page and its folder can move together.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from PIL import Image

from qprobe.draw import Mark, draw_marks, fit
from qprobe.io import write_bytes_atomic

# A thumbnail's longer side, in pixels: two to a row of the page's 1280-pixel column.
THUMB_SIDE = 560


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("qprobe", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render_page(name: str, **context: Any) -> str:
    """Template ``name`` rendered with ``context`` (and ``thumb_side``, which the stylesheet sizes by)."""
    return _environment().get_template(name).render(thumb_side=THUMB_SIDE, **context)


@dataclass(frozen=True)
class Picture:
    """A thumbnail as a page shows it: ``src`` a data URL, ``href`` its full-size file relative to the page."""

    src: str
    href: str
    width: int
    height: int


def pictures_folder(page: Path) -> Path:
    """The folder beside ``page`` that holds the full-size images it links to (``report.html``: ``report_images``)."""
    return page.with_name(f"{page.stem}_images")


class Pictures:
    """The pictures of one page: each a thumbnail and the full-size image it opens, both with their boxes.

    Starting a page's pictures empties its folder, so no image of an earlier page stays beside this one.
    """

    def __init__(self, page: Path) -> None:
        self.folder = pictures_folder(page)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.count = 0

    def add(self, image: Image.Image, name: str, marks: Sequence[Mark] = (), scale: float = 1.0) -> Picture:
        """``image`` with ``marks`` (boxes in pixels of an image ``1 / scale`` times its size) as a picture;
        ``name`` goes into the full-size file's name."""
        self.count += 1
        # The boxes are drawn on each size apart, so a line is as wide on the thumbnail as on the photo.
        thumb, fitted = fit(image.convert("RGB"), THUMB_SIDE)
        draw_marks(thumb, marks, scale=scale * fitted)
        full = draw_marks(image.convert("RGB"), marks, scale=scale)
        file = self.folder / f"{self.count:03d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:60]}.jpg"
        write_bytes_atomic(file, _jpeg(full, quality=92))
        src = "data:image/jpeg;base64," + base64.b64encode(_jpeg(thumb, quality=85)).decode("ascii")
        return Picture(src, f"{self.folder.name}/{file.name}", thumb.width, thumb.height)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
