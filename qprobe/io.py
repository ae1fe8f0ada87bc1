"""Safe image I/O, atomic writes and content hashes.

Every image the pipeline reads goes through :func:`load_image`: EXIF orientation is applied, the
result is 8-bit RGB, the pixel count is checked *before* decoding (decompression bombs), and a
corrupt, truncated or non-image file raises :class:`ImageError` with a message naming the file.

Every file the pipeline writes goes through an atomic write (temp file in the same folder, then
``os.replace``), so a stage killed mid-write leaves either the old file or the new one, never half
of one, and a re-run can trust any file it finds.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qprobe import storage
from qprobe.errors import QProbeError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"})
DEFAULT_MAX_PIXELS = 64_000_000  # ~8K x 8K; larger files are refused unless the caller raises it

_UMASK = os.umask(0)
os.umask(_UMASK)

# Our own check runs before decoding; Pillow's bomb guard would otherwise refuse files we allow.
Image.MAX_IMAGE_PIXELS = None


class ImageError(QProbeError, ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


class OutputOverlapError(QProbeError, ValueError):
    """An output folder that is, holds or lies inside one of the command's inputs."""


def outside_folder(relpath: str) -> str | None:
    """Why the relative path ``relpath`` does not name a file inside its folder, or None when it does.

    Judged on the text alone (nothing outside the folder is looked at): absolute paths, drive or
    UNC paths, and paths whose ``..`` climb above the folder are refused. For paths read from files
    (manifest rows, bench's list of its own files) before they are opened or deleted.
    """
    if PurePosixPath(relpath).is_absolute() or PureWindowsPath(relpath).anchor:
        return "is absolute"
    normal = posixpath.normpath(relpath.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        return "leaves the folder"
    return None


OWNER_FILE = ".qprobe-owner"  # in a folder a command writes whole: which command wrote it


class ForeignFolderError(QProbeError, ValueError):
    """An output folder holding files the command cannot prove it wrote."""


def check_owned(folder: str | Path, command: str, known: Iterable[str] = ()) -> None:
    """Refuse to replace or prune ``folder`` unless ``command`` can prove it wrote what is there.

    Proof is one of: the folder is absent or empty; it carries :data:`OWNER_FILE` naming ``command``
    (:func:`mark_owned`); or every entry in it is one of the ``known`` names the command writes (a
    folder from before owner files). Anything else is somebody's data, and the command stops before
    writing, with a one-line error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise ForeignFolderError(f"{folder}: not a folder; `qprobe {command}` writes a folder there "
                                     "(nothing was written)")
        return
    owner = folder / OWNER_FILE
    if owner.is_file() and owner.read_text().strip() == command:
        return
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in set(known))
    if foreign:
        raise ForeignFolderError(f"{folder}: holds files `qprobe {command}` did not write (e.g. {foreign[0]}); "
                                 "choose a new or empty output folder (nothing was written or deleted)")


def mark_owned(folder: str | Path, command: str) -> None:
    """Record in ``folder`` that ``command`` wrote it, so a later run may replace it (:func:`check_owned`)."""
    write_text_atomic(Path(folder) / OWNER_FILE, command + "\n")


def check_out_vs_in(out: str | Path, *inputs: str | Path | None, what: str) -> None:
    """Refuse ``out`` when it equals, lies inside or contains any of ``inputs`` (``None`` entries are skipped).

    Call it before anything is written: a command whose output folder overlaps its input would
    overwrite or prune the very files it reads. Paths are compared after resolving symlinks and
    ``..``, by whole components, so ``/a/photos2`` is not inside ``/a/photos``; ``s3://bucket/prefix``
    locations are compared the same way, by bucket and key components (an S3 location never overlaps
    a local one). ``what`` names the flag of the output in the message (``--out``).
    """
    target = _location_parts(out)
    for given in inputs:
        if given is None:
            continue
        source = _location_parts(given)
        if target == source:
            relation = "is"
        elif target[: len(source)] == source:
            relation = "is inside"
        elif source[: len(target)] == target:
            relation = "contains"
        else:
            continue
        kind = "prefix" if storage.is_s3_uri(str(given)) else "folder"
        raise OutputOverlapError(f"{what} {out}: {relation} the input {kind} {given}; choose an output {kind} "
                                 "apart from the inputs (nothing was written)")


def _location_parts(location: str | Path) -> tuple[str, ...]:
    """A folder's resolved path components, or ``("s3://", bucket, *key components)`` for an S3 location."""
    if storage.is_s3_uri(str(location)):
        bucket, prefix = storage.parse_s3_uri(str(location))
        return (storage.SCHEME, bucket, *(part for part in prefix.split("/") if part))
    return Path(location).resolve().parts


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert("RGB") clips 16-bit values at 255 (a white image); scale instead.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels are shown over white, as a viewer would show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _open(source: str | Path | bytes, name: str, max_pixels: int) -> Image.Image:
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ImageError(f"{name}: cannot open ({exc.strerror or exc})") from exc
    with stream:
        try:
            img = Image.open(stream)
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not an image file Pillow can read") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: corrupt image header ({exc})") from exc
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(f"{name}: empty image ({width}x{height})")
        if width * height > max_pixels:
            raise ImageError(
                f"{name}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels}"
            )
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(f"{name}: corrupt or truncated image data ({exc})") from exc
    # A malformed EXIF block must not lose an otherwise good image.
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``path`` as an upright 8-bit RGB image, or raise :class:`ImageError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    return _open(path, str(path), max_pixels)


def load_image_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Like :func:`load_image` for bytes already in memory (S3 objects, datasets); ``name`` is for errors."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    return _open(data, name, max_pixels)


def image_size(path: str | Path) -> tuple[int, int]:
    """Width and height from the header alone (EXIF orientation applied), without decoding pixels."""
    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# The name atomic_path gives its temporary file: ".<name>.<mkstemp's 8 characters>.tmp<suffix>".
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>.*)")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On an exception the temporary file is removed and ``path`` is untouched; a killed process
    leaves it behind, and :func:`atomic_temp_target` tells which file it was for.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_temp_target(path: str | Path) -> Path | None:
    """The file a temporary of :func:`atomic_path` was to replace (a killed write's leftover), or None."""
    path = Path(path)
    match = _TEMP_NAME.fullmatch(path.name)
    if match is None or Path(match["name"]).suffix != match["suffix"]:
        return None
    return path.with_name(match["name"])


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the JSON every file of the pipeline holds: indented, keys sorted, a final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode("utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, json_bytes(obj))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def encode_image(img: Image.Image, name: str | Path, **save_kwargs: Any) -> bytes:
    """``img`` encoded in the format of ``name``'s suffix: the bytes a save to that file would write."""
    suffix = PurePosixPath(str(name)).suffix
    fmt = Image.registered_extensions().get(suffix.lower())
    if fmt is None:
        raise ImageError(f"{name}: unknown image suffix {suffix!r}")
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def save_image_atomic(img: Image.Image, path: str | Path, **save_kwargs: Any) -> None:
    """Save ``img`` to ``path`` (format from the suffix) in one atomic rename."""
    write_bytes_atomic(path, encode_image(img, path, **save_kwargs))


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_hash(path: str | Path) -> str:
    """md5 of a file, or of a folder's sorted ``relpath md5`` listing (stable across machines)."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    digest = hashlib.md5()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()} {file_md5(file)}\n".encode())
    return digest.hexdigest()
