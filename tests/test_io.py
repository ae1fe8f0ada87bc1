"""qprobe.io on real files: awkward images, pixel limits, atomic writes, content hashes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qprobe.io import (
    ImageError,
    OutputOverlapError,
    atomic_path,
    check_out_vs_in,
    content_hash,
    image_size,
    load_image,
    load_image_bytes,
    save_image_atomic,
    write_json_atomic,
)


@pytest.mark.parametrize(("name", "reason"), [
    ("truncated", "truncated"),
    ("empty", "empty file"),
    ("text", "not an image"),
])
def test_unreadable_files_raise_image_error_naming_the_file(awkward_images, name, reason):
    path = awkward_images[name]
    with pytest.raises(ImageError, match=reason) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")


def test_sixteen_bit_png_is_scaled_not_clipped(awkward_images):
    img = load_image(awkward_images["deep16"])
    pixels = np.asarray(img)
    assert img.mode == "RGB" and img.size == (320, 240)
    # Clipping at 255 would make it almost all white; scaling keeps the photo's range.
    assert pixels.mean() < 200 and pixels.std() > 20


def test_cmyk_jpeg_becomes_rgb(awkward_images):
    img = load_image(awkward_images["cmyk"])
    reference = load_image(awkward_images["rotated"]).transpose(Image.Transpose.ROTATE_90)
    assert img.mode == "RGB" and img.size == (320, 240)
    # Same photo through a CMYK round trip: close to the RGB original on average.
    assert np.abs(np.asarray(img, dtype=float) - np.asarray(reference, dtype=float)).mean() < 20


def test_alpha_is_composited_over_white(awkward_images):
    pixels = np.asarray(load_image(awkward_images["alpha"]))
    assert pixels.shape == (240, 320, 3)
    assert (pixels[:, :160] == 255).all()  # transparent half
    assert pixels[:, 160:].mean() < 200  # opaque half keeps the photo


def test_exif_orientation_is_applied(awkward_images):
    path = awkward_images["rotated"]
    with Image.open(path) as raw:
        assert raw.size == (320, 240)
    img = load_image(path)
    assert img.size == (240, 320)
    assert image_size(path) == (240, 320)
    # Orientation 6 means "rotate 90 degrees clockwise": the stored top row becomes the right column.
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB"), dtype=float)
    shown = np.asarray(img, dtype=float)
    assert np.abs(shown[:, -1] - stored[0]).mean() < 3


def test_pixel_limit_is_checked_before_decoding(awkward_images):
    with pytest.raises(ImageError, match="over the limit"):
        load_image(awkward_images["large"], max_pixels=800 * 600 - 1)
    assert load_image(awkward_images["large"], max_pixels=800 * 600).size == (800, 600)


def test_load_image_bytes_matches_load_image(awkward_images):
    path = awkward_images["rotated"]
    from_bytes = load_image_bytes(path.read_bytes(), "rotated.jpg")
    assert np.array_equal(np.asarray(from_bytes), np.asarray(load_image(path)))
    with pytest.raises(ImageError, match=r"x\.jpg: empty file"):
        load_image_bytes(b"", "x.jpg")


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out" / "a.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_save_image_atomic_round_trips_losslessly(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    save_image_atomic(Image.fromarray(pixels), path)
    assert np.array_equal(np.asarray(load_image(path)), pixels)
    with pytest.raises(ImageError, match="unknown image suffix"):
        save_image_atomic(Image.fromarray(pixels), tmp_path / "x.unknown")


def test_content_hash_of_a_folder_is_stable_and_content_based(tmp_path: Path):
    for root in (tmp_path / "a", tmp_path / "b"):
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "x.txt").write_text("x")
        (root / "y.txt").write_text("y")
    assert content_hash(tmp_path / "a") == content_hash(tmp_path / "b")
    (tmp_path / "b" / "y.txt").write_text("changed")
    assert content_hash(tmp_path / "a") != content_hash(tmp_path / "b")
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "missing")


@pytest.mark.parametrize(("out", "inputs", "relation"), [
    ("a/photos", ["a/photos"], "is"),
    ("a/photos/out", ["elsewhere", "a/photos"], "is inside"),
    ("a", ["a/photos"], "contains"),
    ("a/./photos/../photos", ["a/photos"], "is"),
])
def test_out_overlapping_an_input_is_refused_in_one_line(tmp_path, monkeypatch, out, inputs, relation):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputOverlapError) as info:
        check_out_vs_in(out, *inputs, what="--out")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--out {out}: {relation} the input folder ")


def test_out_beside_an_input_sharing_its_prefix_is_fine(tmp_path):
    (tmp_path / "photos").mkdir()
    check_out_vs_in(tmp_path / "photos2", tmp_path / "photos", None, what="--out")
    check_out_vs_in(tmp_path / "photos", tmp_path / "photos2", what="--out")
    check_out_vs_in(tmp_path / "out", what="--out")


@pytest.mark.parametrize(("out", "given", "relation"), [
    ("s3://b/photos", "s3://b/photos/", "is"),
    ("s3://b/photos/bench", "s3://b/photos", "is inside"),
    ("s3://b", "s3://b/photos", "contains"),
])
def test_an_s3_out_overlapping_an_s3_input_is_refused(out, given, relation):
    with pytest.raises(OutputOverlapError) as info:
        check_out_vs_in(out, given, what="--out")
    assert str(info.value).startswith(f"--out {out}: {relation} the input prefix {given}; ")


def test_s3_prefixes_apart_or_local_paths_do_not_overlap(tmp_path, monkeypatch):
    check_out_vs_in("s3://b/photos2", "s3://b/photos", what="--out")
    check_out_vs_in("s3://other/photos", "s3://b/photos", what="--out")
    monkeypatch.chdir(tmp_path)  # a local folder named like the bucket is not the bucket
    check_out_vs_in("s3://b/photos/out", "b/photos", what="--out")
    check_out_vs_in("b/photos/out", "s3://b/photos", what="--out")


def test_out_reaching_an_input_through_a_symlink_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "photos")
    with pytest.raises(OutputOverlapError, match="is the input folder"):
        check_out_vs_in(tmp_path / "link", tmp_path / "photos", what="--out")
