"""Photo sources: folders, S3 (moto at the edge), scikit-image's photos, a local HF dataset; skip reasons."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qprobe import storage
from qprobe.data.sources import SKIMAGE_PHOTOS, SkipPhoto, SourceError, decode, open_source


def test_folder_is_listed_recursively_in_order_with_image_suffixes_only(tiny_photos):
    (tiny_photos / "notes.txt").write_text("not a photo")
    (tiny_photos / ".hidden.jpg").write_bytes(b"")
    (tiny_photos / "UPPER.JPG").write_bytes((tiny_photos / "coffee.png").read_bytes())
    source = open_source(str(tiny_photos))
    keys = [item.key for item in source.items]
    assert keys == sorted(keys)
    assert set(keys) == {"people/astronaut.jpg", "coffee.png", "animals/cat.jpg", "rocket.png",
                         "motorcycle.jpg", "UPPER.JPG"}
    item = next(i for i in source.items if i.key == "animals/cat.jpg")
    assert item.uri == (tiny_photos / "animals" / "cat.jpg").as_posix()
    photo = item.load()
    assert photo.pixels.shape == (240, 320, 3) and photo.pixels.dtype == np.uint8
    assert len(photo.md5) == 32


def test_gifs_and_unresolvable_links_are_listed_as_skipped_not_dropped(tiny_photos):
    Image.open(tiny_photos / "coffee.png").save(tiny_photos / "animals" / "clip.gif")
    (tiny_photos / "loop.jpg").symlink_to("loop.jpg")
    (tiny_photos / "a.png").symlink_to("b.png")
    (tiny_photos / "b.png").symlink_to("a.png")
    (tiny_photos / "gone.png").symlink_to("nowhere.png")
    (tiny_photos / "linked.png").symlink_to("coffee.png")  # a good link is a photo like any other
    source = open_source(str(tiny_photos))
    assert "linked.png" in {i.key for i in source.items} and len(source.items) == 6
    skipped = {str(s).split(": ", 1)[0].removeprefix(f"{tiny_photos.as_posix()}/"): (s.reason, str(s).split(": ", 1)[1])
               for s in source.skipped}
    assert skipped == {
        "a.png": ("unreadable", "symlink loop"), "b.png": ("unreadable", "symlink loop"),
        "loop.jpg": ("unreadable", "symlink loop"), "gone.png": ("unreadable", "symlink to a missing file"),
        "animals/clip.gif": ("unsupported", "GIF files are not taken as photos "
                                            "(convert to one of .jpeg, .jpg, .png, .tif, .tiff, .webp)")}


def test_a_folder_of_only_gifs_says_what_it_skipped(tmp_path, tiny_photos):
    (tmp_path / "gifs").mkdir()
    Image.open(tiny_photos / "coffee.png").save(tmp_path / "gifs" / "a.gif")
    with pytest.raises(SourceError, match=r"gifs: no images found \(looked for .*\); 1 skipped, the first: .*a.gif: GIF"):
        open_source(str(tmp_path / "gifs"))


def test_a_photo_beyond_the_models_aspect_ratio_is_skipped():
    buffer = io.BytesIO()
    Image.new("RGB", (2010, 10)).save(buffer, format="PNG")
    with pytest.raises(SkipPhoto, match=r"^strip.png: 2010x10 is wider than the model's 200:1 aspect ratio limit$") as info:
        decode(buffer.getvalue(), "strip.png", 256, 10**8)
    assert info.value.reason == "extreme_aspect"
    buffer = io.BytesIO()
    Image.new("RGB", (10, 2000)).save(buffer, format="PNG")  # 200:1 exactly is what the model takes
    assert decode(buffer.getvalue(), "tall.png", 256, 10**8).pixels.shape == (2000, 10, 3)


def test_listing_does_not_read_photos(tiny_photos):
    (tiny_photos / "broken.jpg").write_bytes(b"garbage")
    source = open_source(str(tiny_photos))  # listing succeeds: the bad file fails only when loaded
    bad = next(i for i in source.items if i.key == "broken.jpg")
    with pytest.raises(SkipPhoto) as info:
        bad.load()
    assert info.value.reason == "unreadable"


@pytest.mark.parametrize("setup", ["missing", "empty", "file", "only_text"])
def test_missing_or_empty_folder_is_a_clear_error(tmp_path, setup):
    path = tmp_path / "src"
    if setup == "empty":
        path.mkdir()
    elif setup == "file":
        path.write_text("x")
    elif setup == "only_text":
        path.mkdir()
        (path / "readme.txt").write_text("x")
    with pytest.raises(SourceError) as info:
        open_source(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("name", "reason", "kwargs"), [
    ("truncated", "unreadable", {}),
    ("empty", "unreadable", {}),
    ("text", "unreadable", {}),
    ("large", "too_large", {"max_pixels": 400_000}),
    ("small", "too_small", {"min_size": 256}),
])
def test_decode_skips_with_a_reason(awkward_images, name, reason, kwargs):
    path = awkward_images[name]
    with pytest.raises(SkipPhoto) as info:
        decode(path.read_bytes(), str(path), kwargs.get("min_size", 0), kwargs.get("max_pixels", 10**8))
    assert info.value.reason == reason
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "size"), [("deep16", (240, 320)), ("cmyk", (240, 320)),
                                             ("alpha", (240, 320)), ("rotated", (320, 240))])
def test_decode_loads_awkward_but_valid_photos(awkward_images, name, size):
    path = awkward_images[name]
    photo = decode(path.read_bytes(), str(path), 256, 10**8)
    assert photo.pixels.shape == (*size, 3)


def test_min_size_is_the_longer_side(awkward_images):
    data = awkward_images["rotated"].read_bytes()  # 320x240
    assert decode(data, "r.jpg", 320, 10**8).pixels.shape == (320, 240, 3)
    with pytest.raises(SkipPhoto, match="below the minimum size"):
        decode(data, "r.jpg", 321, 10**8)


def test_skimage_source_lists_the_bundled_photos_and_loads_them():
    source = open_source("skimage")
    assert [i.uri for i in source.items] == [f"skimage:{n}" for n in SKIMAGE_PHOTOS]
    astronaut = next(i for i in source.items if i.uri == "skimage:astronaut").load()
    assert astronaut.pixels.shape == (512, 512, 3)
    assert Path(source.lineage_uri).is_dir()


def test_hf_dataset_from_a_local_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = []
    for shade in (40, 120, 200):
        buffer = io.BytesIO()
        Image.fromarray(np.full((300, 400, 3), shade, np.uint8)).save(buffer, format="PNG")
        rows.append({"bytes": buffer.getvalue(), "path": None})
    folder = tmp_path / "hf"
    (folder / "data").mkdir(parents=True)
    table = datasets.Dataset.from_dict({"label": [0, 1, 2], "picture": rows})
    table.cast_column("picture", datasets.Image()).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    source = open_source(f"hf:{folder}:train")
    assert [i.key for i in source.items] == ["train/00000000", "train/00000001", "train/00000002"]
    photo = source.items[1].load()
    assert photo.pixels.shape == (300, 400, 3) and int(photo.pixels.mean()) == 120
    with pytest.raises(SourceError, match="no column 'image'"):
        open_source(f"hf:{folder}:train", image_column="image")


def test_hf_dataset_not_in_the_cache_is_a_clear_error():
    with pytest.raises(SourceError, match="hf:nobody/no-such-dataset:test"):
        open_source("hf:nobody/no-such-dataset:test")


@pytest.mark.parametrize(("uri", "parsed"), [
    ("s3://bucket/a/b/", ("bucket", "a/b/")),
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/x.jpg", ("bucket", "x.jpg")),
])
def test_parse_s3_uri(uri, parsed):
    assert storage.parse_s3_uri(uri) == parsed


@pytest.mark.parametrize("uri", ["s3://", "bucket/prefix", "/local/path"])
def test_parse_s3_uri_refuses_non_s3(uri):
    with pytest.raises(storage.StorageError):
        storage.parse_s3_uri(uri)


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 (unit tests only; the real S3 server test lives elsewhere) with a bucket of photos."""
    moto = pytest.importorskip("moto")
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage.client.cache_clear()
    with moto.mock_aws():
        storage.client().create_bucket(Bucket="photos")
        yield storage.client()
    storage.client.cache_clear()


def test_s3_source_lists_and_loads_under_the_prefix(s3, tiny_photos):
    for path in sorted(tiny_photos.rglob("*.*")):
        storage.upload_file(path, f"s3://photos/raw/{path.relative_to(tiny_photos).as_posix()}")
    s3.put_object(Bucket="photos", Key="raw/readme.txt", Body=b"not a photo")
    s3.put_object(Bucket="photos", Key="other/coffee.png", Body=(tiny_photos / "coffee.png").read_bytes())
    source = open_source("s3://photos/raw")
    assert [i.key for i in source.items] == ["animals/cat.jpg", "coffee.png", "motorcycle.jpg",
                                             "people/astronaut.jpg", "rocket.png"]
    assert source.items[0].uri == "s3://photos/raw/animals/cat.jpg"
    local = open_source(str(tiny_photos))
    s3_photo = source.items[1].load()
    local_photo = next(i for i in local.items if i.key == "coffee.png").load()
    assert s3_photo.md5 == local_photo.md5
    assert np.array_equal(s3_photo.pixels, local_photo.pixels)


def test_s3_missing_bucket_or_empty_prefix_is_a_clear_error(s3):
    with pytest.raises(SourceError, match=r"s3://nobucket/x: bucket not found"):
        open_source("s3://nobucket/x")
    with pytest.raises(SourceError, match=r"s3://photos/empty: no images found"):
        open_source("s3://photos/empty")


def test_s3_upload_download_round_trip(s3, tmp_path):
    folder = tmp_path / "up"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.txt").write_text("b")
    uris = storage.upload_dir(folder, "s3://photos/run1/")
    assert uris == ["s3://photos/run1/a.txt", "s3://photos/run1/sub/b.txt"]
    assert storage.download_bytes("s3://photos/run1/sub/b.txt") == b"b"
    target = storage.download_file("s3://photos/run1/a.txt", tmp_path / "down" / "a.txt")
    assert target.read_text() == "a"
    with pytest.raises(storage.StorageError, match="no such object") as info:
        storage.download_bytes("s3://photos/run1/missing.txt")
    assert "testing" not in str(info.value)  # the credentials never reach a message


def test_bench_runs_on_an_s3_source(s3, tiny_photos, tmp_path):
    from qprobe.bench.config import BenchConfig
    from qprobe.bench.synthesize import synthesize

    for path in sorted(tiny_photos.rglob("*.*")):
        storage.upload_file(path, f"s3://photos/raw/{path.relative_to(tiny_photos).as_posix()}")
    cfg = BenchConfig(source="s3://photos/raw", out=str(tmp_path / "bench"), metrics=str(tmp_path / "m.json"),
                      num_images=5, min_size=200)
    result = synthesize(cfg, progress=False)
    assert sorted(r["source"] for r in result.records) == sorted(
        f"s3://photos/raw/{p.relative_to(tiny_photos).as_posix()}" for p in tiny_photos.rglob("*.*"))
