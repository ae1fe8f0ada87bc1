"""Write ``plots.html``, the page `dvc plots show` fills, with Vega, Vega-Lite and Vega-Embed inlined.

DVC's own page loads the three libraries from a CDN, so offline (these machines, a laptop on a
train) it is blank. ``.dvc/config`` points ``plots.html_template`` at this page instead. The
libraries are inlined rather than linked because DVC writes the page wherever ``-o`` says: a
relative ``<script src>`` would break there, an inlined one cannot.

The packages are the pinned versions below, fetched with ``npm pack`` and checked against the
registry's sha512 integrity before use. Run from anywhere (needs npm and the registry once)::

    python assets/vega/build.py
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "plots.html"
# name, version, the registry's sha512 integrity of the tarball, the browser build inside it.
PACKAGES = (
    ("vega", "5.33.1", "1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
     "build/vega.min.js"),
    ("vega-lite", "5.23.0", "l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
     "build/vega-lite.min.js"),
    ("vega-embed", "6.29.0", "PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
     "build/vega-embed.min.js"),
)
# DVC replaces {refresh_tag} and {plot_divs}; it leaves out {scripts} (its CDN tags) on purpose.
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>Q-Probe plots</title>
%(scripts)s
    <script>
        // SVG, not Vega-Embed's default canvas: sharp at any zoom, and each mark is an element
        // (tests/test_dvc_plots.py counts them).
        window.vegaEmbed = ((embed) => (el, spec, opts) => embed(el, spec, {renderer: "svg", ...opts}))(window.vegaEmbed);
    </script>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch(name: str, version: str, integrity: str, member: str, folder: Path) -> str:
    """The ``member`` file of ``name@version``'s npm tarball, after checking the tarball's integrity."""
    out = subprocess.run(["npm", "pack", f"{name}@{version}", "--silent", "--pack-destination", str(folder)],
                         capture_output=True, text=True, check=True, timeout=300)
    tarball = folder / out.stdout.strip().splitlines()[-1]
    digest = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if digest != integrity:
        raise SystemExit(f"{tarball.name}: sha512 {digest} is not the pinned {integrity}")
    with tarfile.open(tarball) as tar:
        source = tar.extractfile(f"package/{member}")
        if source is None:
            raise SystemExit(f"{tarball.name}: no {member}")
        return source.read().decode("utf-8")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        scripts = []
        for name, version, integrity, member in PACKAGES:
            code = fetch(name, version, integrity, member, Path(tmp))
            # DVC would replace a placeholder inside the code, and a "</script" would end the tag early.
            if any(p in code for p in ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script")):
                raise SystemExit(f"{name}@{version}: its code holds a DVC placeholder or </script")
            scripts.append(f"    <!-- {name}@{version} ({member}), BSD-3-Clause: assets/vega/LICENSE.{name} -->\n"
                           f"    <script>{code}</script>")
    TEMPLATE.write_text(PAGE % {"scripts": "\n".join(scripts)}, encoding="utf-8")
    print(f"wrote {TEMPLATE}")


if __name__ == "__main__":
    main()
