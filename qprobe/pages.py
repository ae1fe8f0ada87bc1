"""HTML pages from the Jinja2 templates in ``qprobe/templates/``: the evaluation report and the
trajectories' samples page.

Autoescape is on: every value a page shows is escaped unless it is a ``markupsafe.Markup`` built on
purpose (with ``Markup.format``, which escapes what goes into it). Both pages extend
``base.html.jinja``, which inlines the one stylesheet, ``style.css.jinja``, so each page stays a
single self-contained file.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("qprobe", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render_page(name: str, **context: Any) -> str:
    """Template ``name`` rendered with ``context``."""
    return _environment().get_template(name).render(**context)
