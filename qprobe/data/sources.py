"""Photo sources for the bench: a local folder, S3, scikit-image's bundled photos, a cached HF dataset.

A source is named by one string (``--source``):

=====================  ==========================================================================
``path/to/folder``     every image below it, recursively (jpg, jpeg, png, webp, tif, tiff)
``s3://bucket/prefix`` every image object under the prefix (boto3, :mod:`qprobe.storage`)
``skimage``            scikit-image's bundled photos, 14 scenes (astronaut, coffee, ... up to 1411 px)
``hf:NAME[:split]``    an image column of a Hugging Face dataset already in the local cache (or
                       a local dataset folder); read offline, ``split`` defaults to ``train``
=====================  ==========================================================================

:func:`open_source` lists the source without reading any photo: it yields :class:`SourceItem`
entries, each holding a stable ``key`` (the photo's path inside the source: ids, seeds and splits
derive from it, so they do not change when the folder moves), the ``uri`` recorded in the manifest,
and a picklable loader, so that a process pool can load photos in its workers and a folder of
thousands of photos is never held in memory at once.

:meth:`SourceItem.load` reads the photo through :mod:`qprobe.io` (EXIF orientation, RGB, pixel
limit, corrupt files) and checks its size and aspect ratio from the header before decoding. A photo
that cannot be used raises :class:`SkipPhoto` with a reason code (``too_small``, ``too_large``,
``extreme_aspect``, ``unreadable``) and a one-line message; the caller logs and counts it and goes
on. Files the listing itself cannot take (GIFs, symlink loops and dangling links with a photo's
suffix) are not dropped silently either: they are in :attr:`Source.skipped`, as ``unsupported`` or
``unreadable``.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qprobe import offline, storage
from qprobe.errors import QProbeError
from qprobe.io import ImageError, load_image_bytes

SOURCE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff"})
# Image files that are not taken as photos (animations, 256-colour palettes), but counted as skipped.
UNSUPPORTED_EXTENSIONS = frozenset({".gif"})
SKIP_REASONS = ("too_small", "too_large", "extreme_aspect", "unsupported", "unreadable")
# Qwen2.5-VL's smart_resize refuses a longer:shorter side ratio above this (qprobe.agent.crop.budget_size
# reports it at scoring time); the bench skips such photos instead of writing images no model can read.
MAX_ASPECT_RATIO = 200

# scikit-image's bundled photographs, 14 scenes: the val and test splits hold scenes no training set
# has, and five training scenes were too few for the tiny model to generalise to them. The grey ones
# (brick ... moon) load as RGB like any grey photo; the motorcycle is the left view of its stereo pair
# (the right view is nearly the same picture and would leak across splits).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "motorcycle", "retina", "rocket",
                  "immunohistochemistry", "brick", "camera", "coins", "grass", "gravel", "moon")


class SourceError(QProbeError, ValueError):
    """A source that does not exist, cannot be listed or holds no images."""


class SkipPhoto(Exception):
    """One photo the bench cannot use; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Photo:
    """A decoded photo: uint8 RGB pixels and the md5 of the bytes it was read from."""

    pixels: np.ndarray
    md5: str


@dataclass(frozen=True)
class SourceItem:
    key: str
    uri: str
    loader: Callable[[], tuple[bytes, str]] = field(repr=False)

    def load(self, min_size: int = 0, max_pixels: int = 64_000_000) -> Photo:
        """Decode the photo; raise :class:`SkipPhoto` when it is unreadable or out of the size limits."""
        try:
            data, name = self.loader()
        except (OSError, QProbeError) as exc:
            raise SkipPhoto("unreadable", f"{self.uri}: {exc}") from exc
        return decode(data, name, min_size, max_pixels)


@dataclass(frozen=True)
class Source:
    spec: str
    items: list[SourceItem]
    lineage_uri: str  # what MLflow records as the dataset's source (a path or an s3:// URI)
    skipped: list[SkipPhoto] = field(default_factory=list)  # files listed but not taken (see the module docstring)


def decode(data: bytes, name: str, min_size: int, max_pixels: int) -> Photo:
    """Check the header's size against the limits, then decode with :func:`qprobe.io.load_image_bytes`."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Exception:
        # Whatever the header problem, the full loader below reports it in its own words.
        width = height = None
    if width is not None and height is not None:
        if width * height > max_pixels:
            raise SkipPhoto("too_large", f"{name}: {width}x{height} is over the pixel limit ({max_pixels})")
        if max(width, height) < min_size:
            raise SkipPhoto("too_small", f"{name}: {width}x{height} is below the minimum size ({min_size} px)")
        if width and height and max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            raise SkipPhoto("extreme_aspect", f"{name}: {width}x{height} is wider than the model's "
                                              f"{MAX_ASPECT_RATIO}:1 aspect ratio limit")
    try:
        image = load_image_bytes(data, name, max_pixels=max_pixels)
    except ImageError as exc:
        raise SkipPhoto("unreadable", str(exc)) from exc
    return Photo(pixels=np.asarray(image), md5=hashlib.md5(data).hexdigest())


def _read_file(path: str) -> tuple[bytes, str]:
    return Path(path).read_bytes(), path


def _read_s3(uri: str) -> tuple[bytes, str]:
    return storage.download_bytes(uri), uri


def _read_skimage(name: str) -> tuple[bytes, str]:
    from skimage import data

    pixels = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    # Lossless PNG bytes, so the photo goes through the same checks and hash as any other source.
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), f"skimage:{name}"


@functools.lru_cache(maxsize=4)
def _hf_dataset(name: str, split: str, column: str) -> tuple[Any, str]:
    # Offline before the hub client is first imported: a cache miss must fail at once, not retry a
    # network these machines do not have.
    offline.apply()
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for "not available offline"
        raise SourceError(
            f"hf:{name}:{split}: cannot load from the local Hugging Face cache (offline): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    if column and column not in dataset.column_names:
        raise SourceError(f"hf:{name}:{split}: no column {column!r} (columns: {', '.join(dataset.column_names)})")
    if not column:
        column = next((c for c, f in dataset.features.items() if isinstance(f, datasets.Image)), "")
        if not column:
            raise SourceError(f"hf:{name}:{split}: no image column (columns: {', '.join(dataset.column_names)})")
    # Raw bytes, not PIL images: every photo goes through qprobe.io's checks.
    return dataset.cast_column(column, datasets.Image(decode=False)), column


def _read_hf(name: str, split: str, column: str, index: int) -> tuple[bytes, str]:
    dataset, column = _hf_dataset(name, split, column)
    cell = dataset[index][column]
    label = f"hf:{name}:{split}/{index}"
    if cell is None:
        return b"", label
    if cell.get("bytes"):
        return cell["bytes"], label
    return Path(cell["path"]).read_bytes(), label


def _unsupported(uri: str) -> SkipPhoto | None:
    """The skip of a listed file with an image suffix the bench does not take, or None."""
    suffix = Path(uri).suffix.lower()
    if suffix in UNSUPPORTED_EXTENSIONS:
        return SkipPhoto("unsupported", f"{uri}: {suffix[1:].upper()} files are not taken as photos "
                                        f"(convert to one of {', '.join(sorted(SOURCE_EXTENSIONS))})")
    return None


def _unresolvable_link(path: Path) -> SkipPhoto | None:
    """The skip of a symlink that loops or dangles (``is_file`` is False for both), or None."""
    if not path.is_symlink():
        return None
    try:
        path.resolve(strict=True)
    except FileNotFoundError:
        return SkipPhoto("unreadable", f"{path.as_posix()}: symlink to a missing file")
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's "Symlink loop"
        return SkipPhoto("unreadable", f"{path.as_posix()}: symlink loop")
    return None


def _folder(root: Path, spec: str) -> Source:
    if not root.exists():
        raise SourceError(f"{spec}: source folder not found")
    if not root.is_dir():
        raise SourceError(f"{spec}: source is a file, not a folder of photos")
    items, skipped = [], []
    for path in sorted(root.rglob("*")):
        if path.name.startswith(".") or path.suffix.lower() not in SOURCE_EXTENSIONS | UNSUPPORTED_EXTENSIONS:
            continue
        rel = path.relative_to(root).as_posix()
        uri = (root / rel).as_posix()
        if skip := _unresolvable_link(path) or (_unsupported(uri) if path.is_file() else None):
            skipped.append(skip)
        elif path.is_file():
            items.append(SourceItem(key=rel, uri=uri, loader=functools.partial(_read_file, str(path))))
    return Source(spec=spec, items=items, lineage_uri=str(root.resolve()), skipped=skipped)


def _s3(spec: str) -> Source:
    bucket, prefix = storage.parse_s3_uri(spec)
    try:
        objects = list(storage.list_objects(spec, SOURCE_EXTENSIONS | UNSUPPORTED_EXTENSIONS))
    except storage.StorageError as exc:
        raise SourceError(str(exc)) from exc
    base = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    items, skipped = [], []
    for obj in objects:
        uri = obj.uri(bucket)
        key = obj.key[len(base):] if obj.key.startswith(base) else obj.key
        if skip := _unsupported(uri):
            skipped.append(skip)
        else:
            items.append(SourceItem(key=key, uri=uri, loader=functools.partial(_read_s3, uri)))
    return Source(spec=spec, items=items, lineage_uri=spec, skipped=skipped)


def _skimage(spec: str) -> Source:
    import skimage.data

    items = [SourceItem(key=f"{name}.png", uri=f"skimage:{name}", loader=functools.partial(_read_skimage, name))
             for name in SKIMAGE_PHOTOS]
    return Source(spec=spec, items=items, lineage_uri=str(Path(skimage.data.__file__).parent))


def _hf(spec: str, column: str) -> Source:
    name, _, split = spec[len("hf:"):].partition(":")
    if not name:
        raise SourceError(f"{spec}: expected hf:NAME[:split]")
    split = split or "train"
    dataset, column = _hf_dataset(name, split, column)
    items = [SourceItem(key=f"{split}/{i:08d}", uri=f"hf:{name}:{split}/{i}",
                        loader=functools.partial(_read_hf, name, split, column, i))
             for i in range(len(dataset))]
    cache = dataset.cache_files[0]["filename"] if dataset.cache_files else name
    return Source(spec=spec, items=items, lineage_uri=str(Path(cache).parent))


def local_folder(spec: str) -> Path | None:
    """The local folder a source string names, or None for ``skimage``, ``hf:`` and ``s3://`` sources."""
    if spec == "skimage" or spec.startswith("hf:") or storage.is_s3_uri(spec):
        return None
    return Path(spec)


def location(spec: str) -> str | Path | None:
    """The folder or ``s3://`` prefix a source string names (what an output must not overlap); None for
    ``skimage`` and ``hf:`` sources."""
    return spec if storage.is_s3_uri(spec) else local_folder(spec)


def open_source(spec: str, image_column: str = "") -> Source:
    """List the photos of ``spec`` (see the module docstring); raise :class:`SourceError` if there are none."""
    if spec == "skimage":
        source = _skimage(spec)
    elif spec.startswith("hf:"):
        source = _hf(spec, image_column)
    elif (folder := local_folder(spec)) is None:
        source = _s3(spec)
    else:
        source = _folder(folder, spec)
    if not source.items:
        skipped = f"; {len(source.skipped)} skipped, the first: {source.skipped[0]}" if source.skipped else ""
        raise SourceError(f"{spec}: no images found (looked for {', '.join(sorted(SOURCE_EXTENSIONS))}){skipped}")
    return source
