"""``qprobe bench`` end to end on real photos: outputs, determinism, resume, bad inputs, CLI, MLflow."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from qprobe import cli
from qprobe.bench import outputs
from qprobe.bench import synthesize as bench
from qprobe.bench.config import BenchConfig
from qprobe.bench.outputs import ForeignFileError
from qprobe.bench.synthesize import plan_jobs, synthesize
from qprobe.data.manifest import SCHEMA, manifest_metadata, read_manifest
from qprobe.data.sources import SourceError, SourceItem
from qprobe.io import load_image, save_image_atomic
from qprobe.validation import ValidationError


def _config(tmp_path: Path, source: Path | str, out: str = "bench", **overrides) -> BenchConfig:
    values = {"source": str(source), "out": str(tmp_path / out), "metrics": str(tmp_path / f"{out}.json"),
              "num_images": 10, "seed": 0, "min_size": 200, **overrides}
    return BenchConfig(**values)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bench_writes_a_valid_manifest_images_and_metrics(tmp_path, tiny_photos):
    datasets = pytest.importorskip("datasets")
    cfg = _config(tmp_path, tiny_photos, pristine_fraction=0.2)
    result = synthesize(cfg, progress=False)
    out = Path(cfg.out)

    manifest = read_manifest(out)
    assert len(manifest) == 10 and manifest["id"].is_unique
    assert list(manifest.columns[: len(SCHEMA.names)]) == SCHEMA.names
    assert manifest.groupby("source")["split"].nunique().max() == 1
    assert (manifest.groupby("source").size() == 2).all()  # 10 images round-robin over 5 photos
    assert (~manifest["has_defect"]).sum() == 2 and manifest.loc[~manifest["has_defect"], "source"].is_unique

    for row in manifest.itertuples():
        image = np.asarray(load_image(out / row.image))
        source = np.asarray(load_image(row.source))
        assert image.shape == (row.height, row.width, 3) == source.shape
        outside = np.ones(image.shape[:2], dtype=bool)
        for defect in row.defects:
            x1, y1, x2, y2 = defect["bbox"]
            assert 0 <= x1 < x2 <= row.width and 0 <= y1 < y2 <= row.height and 1 <= defect["severity"] <= 5
            outside[y1:y2, x1:x2] = False
            assert np.any(image[y1:y2, x1:x2] != source[y1:y2, x1:x2])
        # Everything outside the boxes is the source photo, bit for bit.
        assert np.array_equal(image[outside], source[outside])
        assert row.has_defect == bool(len(row.defects))
        assert (row.mos == 4.8) == (not row.has_defect) and 1.0 <= row.mos <= 5.0 and row.mos_std > 0

    loaded = datasets.load_dataset("parquet", data_files=str(result.manifest), split="train")
    assert loaded.num_rows == 10 and set(SCHEMA.names) <= set(loaded.column_names)
    with_defects = next(r for r in loaded if r["has_defect"])
    assert set(with_defects["defects"][0]) == {"type", "severity", "bbox"}

    metrics = json.loads(Path(cfg.metrics).read_text())
    assert metrics["images"] == metrics["images_new"] == 10 and metrics["sources_used"] == 5
    assert metrics["defects"] == sum(metrics["defects_by_type"].values()) == sum(
        metrics["defects_by_severity"].values()) == sum(len(d) for d in manifest["defects"])
    assert metrics["skipped"]["total"] == 0 and sum(metrics["splits"].values()) == 10
    assert 1.0 <= metrics["mos"]["min"] <= metrics["mos"]["mean"] <= metrics["mos"]["max"] <= 5.0
    assert (out / "contact_sheet.jpg").stat().st_size > 10_000
    assert len(list((out / "records").glob("*.json"))) == 10


def test_same_seed_gives_byte_identical_output_with_any_worker_count(tmp_path, tiny_photos):
    a = _config(tmp_path, tiny_photos, out="a", workers=1)
    b = _config(tmp_path, tiny_photos, out="b", workers=2)
    first = synthesize(a, progress=False)
    synthesize(b, progress=False)
    files_a, files_b = _files(Path(a.out)), _files(Path(b.out))
    assert files_a.keys() == files_b.keys() and len(files_a) == 23  # 10 images, 10 records, manifest, sheet, ledger
    assert [k for k in files_a if files_a[k] != files_b[k]] == []
    other = synthesize(_config(tmp_path, tiny_photos, out="c", seed=1), progress=False)
    assert [r["defects"] for r in other.records] != [r["defects"] for r in first.records]


def test_killed_run_resumes_without_redoing_finished_images(tmp_path, tiny_photos, monkeypatch):
    reference = _config(tmp_path, tiny_photos, out="reference")
    synthesize(reference, progress=False)

    cfg = _config(tmp_path, tiny_photos, out="run")
    real_save, saved = bench._save, []

    def save_then_die(pixels, out, rel, fmt):
        if len(saved) == 4:
            raise KeyboardInterrupt  # the stage is killed while writing its fifth image
        real_save(pixels, out, rel, fmt)
        saved.append(rel)

    monkeypatch.setattr(bench, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        synthesize(cfg, progress=False)
    monkeypatch.undo()
    out = Path(cfg.out)
    assert not (out / "manifest.parquet").exists()
    assert len(list((out / "records").glob("*.json"))) == 4
    finished = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    unfinished = next(r["image"] for r in synthesize(reference, progress=False).records
                      if not (out / r["image"]).exists())
    # The leftover of the killed atomic write of the fifth image, named as qprobe.io.atomic_path names it.
    (out / f"images/.{Path(unfinished).name}.k1ll3d_x.tmp.png").write_bytes(b"half a file")

    result = synthesize(cfg, progress=False)
    assert result.metrics["images_new"] == 6 and result.metrics["images_resumed"] == 4
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert _files(out) == _files(Path(reference.out))

    # An image whose record is missing (killed between the two writes) is redone; nothing else is.
    victim = sorted((out / "records").iterdir())[0]
    victim.unlink()
    assert synthesize(cfg, progress=False).metrics["images_new"] == 1
    assert _files(out) == _files(Path(reference.out))

    # Other synthesis parameters invalidate every finished image; fewer images prune the rest.
    changed = synthesize(_config(tmp_path, tiny_photos, out="run", feather=0.0, num_images=5), progress=False)
    assert changed.metrics["images_new"] == 5
    assert len(list((out / "images").iterdir())) == len(list((out / "records").iterdir())) == 5


def _kill_after(monkeypatch, images: int) -> None:
    """Make the next synthesis die (KeyboardInterrupt) while writing image ``images + 1``."""
    real_save, saved = bench._save, []

    def save_then_die(pixels, out, rel, fmt):
        if len(saved) == images:
            raise KeyboardInterrupt
        real_save(pixels, out, rel, fmt)
        saved.append(rel)

    monkeypatch.setattr(bench, "_save", save_then_die)


@pytest.mark.parametrize("first", ["finished", "killed"])
def test_a_rerun_with_another_seed_after_a_kill_equals_a_fresh_run(tmp_path, tiny_photos, monkeypatch, first):
    fresh = _config(tmp_path, tiny_photos, out="fresh", seed=1)
    synthesize(fresh, progress=False)
    cfg = _config(tmp_path, tiny_photos, out="run", seed=0)
    out = Path(cfg.out)
    if first == "killed":
        _kill_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt) if first == "killed" else nullcontext():
        synthesize(cfg, progress=False)
    monkeypatch.undo()

    reseeded = _config(tmp_path, tiny_photos, out="run", seed=1)
    _kill_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        synthesize(reseeded, progress=False)
    monkeypatch.undo()
    # No manifest describes a folder whose images are half seed 0, half seed 1.
    assert not (out / "manifest.parquet").exists()
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert {r["fingerprint"] for r in records} == {cfg.fingerprint(), reseeded.fingerprint()}

    result = synthesize(reseeded, progress=False)
    assert result.metrics["images_resumed"] == 3
    assert _files(out) == _files(Path(fresh.out))
    assert manifest_metadata(out)[outputs.FINGERPRINT_KEY] == reseeded.fingerprint() != cfg.fingerprint()


def test_only_files_bench_wrote_are_ever_deleted_or_overwritten(tmp_path, tiny_photos):
    out = tmp_path / "mixed"
    mine = {"notes.txt": b"my notes", "images/holiday.png": (tiny_photos / "coffee.png").read_bytes(),
            "records/2024.json": b'{"mine": true}', "images/.x.png.abcdefgh.tmp.png": b"not a bench leftover"}
    for rel, data in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    cfg = _config(tmp_path, tiny_photos, out="mixed")
    first = synthesize(cfg, progress=False)
    assert first.metrics["images"] == 10
    fewer = synthesize(_config(tmp_path, tiny_photos, out="mixed", num_images=4, seed=3), progress=False)
    assert len(list((out / "records").glob("*-*.json"))) == 4
    assert {rel: (out / rel).read_bytes() for rel in mine} == mine
    assert set(json.loads((out / outputs.LEDGER).read_text())["files"]) == (
        {r["image"] for r in fewer.records} | {f"records/{r['id']}.json" for r in fewer.records}
        | set(outputs.FIXED_OUTPUTS))

    # A file in the way of a planned image that bench cannot prove it wrote: refused, nothing changes.
    other = _config(tmp_path, tiny_photos, out="other")
    planned = synthesize(other, progress=False).records[0]["image"]
    shutil.rmtree(other.out)
    (Path(other.out) / "images").mkdir(parents=True)
    (Path(other.out) / planned).write_bytes(b"someone else's picture")
    with pytest.raises(ForeignFileError, match=rf"{planned}: exists but bench did not write it"):
        synthesize(other, progress=False)
    assert _files(Path(other.out)) == {planned: b"someone else's picture"}

    # A list naming a file outside the folder is not trusted with anything.
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / outputs.LEDGER).write_text(json.dumps({"files": ["records/2024.json", "../victim.txt"]}))
    with pytest.raises(ForeignFileError, match=r"unreadable list of the files bench wrote \('\.\./victim\.txt' "
                                               r"leaves the folder\); bench cannot tell"):
        synthesize(cfg, progress=False)
    assert victim.read_text() == "keep me" and {rel: (out / rel).read_bytes() for rel in mine} == mine


def test_bad_inputs_are_skipped_counted_and_logged(tmp_path, tiny_photos, awkward_images, caplog):
    (tiny_photos / "awkward").mkdir()
    for path in awkward_images.values():
        (tiny_photos / "awkward" / path.name).write_bytes(path.read_bytes())
    cfg = _config(tmp_path, tiny_photos, num_images=None, min_size=256, max_pixels=400_000)
    with caplog.at_level("WARNING", logger="qprobe.bench.synthesize"):
        result = synthesize(cfg, progress=False)
    assert result.metrics["skipped"] == {"total": 5, "too_small": 1, "too_large": 1, "extreme_aspect": 0,
                                         "unsupported": 0, "unreadable": 3}
    assert result.metrics["sources_listed"] == 14 and result.metrics["sources_used"] == 9
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(skips) == 5 and all("\n" not in s for s in skips)
    for name in ("truncated", "empty", "text", "large", "small"):
        assert any(f"awkward/{name}." in s for s in skips), name
    manifest = read_manifest(cfg.out)
    rotated = manifest[manifest["source"].str.endswith("awkward/rotated.jpg")].iloc[0]
    assert (rotated.width, rotated.height) == (240, 320)  # EXIF orientation applied
    alpha = manifest[manifest["source"].str.endswith("awkward/alpha.png")].iloc[0]
    assert np.asarray(load_image(Path(cfg.out) / alpha.image))[:, :100].min() >= 200  # transparent -> white


def test_listing_skips_are_counted_and_every_skip_is_written_above_the_progress_bar(tmp_path, tiny_photos, capsys):
    Image.open(tiny_photos / "coffee.png").save(tiny_photos / "clip.gif")
    (tiny_photos / "loop.jpg").symlink_to("loop.jpg")
    Image.new("RGB", (2010, 10)).save(tiny_photos / "strip.png")
    result = synthesize(_config(tmp_path, tiny_photos, num_images=None, contact_sheet_size=0), progress=True)
    assert result.metrics["skipped"] == {"total": 3, "too_small": 0, "too_large": 0, "extreme_aspect": 1,
                                         "unsupported": 1, "unreadable": 1}
    assert result.metrics["images"] == 5
    err = capsys.readouterr().err
    assert "bench:" in err and "img/s" in err  # the bar was drawn
    # tqdm.write clears the bar's line ("\r", blanks, "\r") before each line it prints; a line
    # printed past tqdm would follow the bar's text instead.
    starts = [m.start() for m in re.finditer(r"skipped \(", err)]
    assert len(starts) == 3
    assert all(re.search(r"\r *\r$", err[:start]) for start in starts), err


def test_missing_or_empty_source_fails_cleanly_through_the_cli(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    for source, message in [(tmp_path / "missing", "source folder not found"), (empty, "no images found")]:
        out, metrics = tmp_path / "out", tmp_path / "m.json"
        code = cli.main(["bench", "--source", str(source), "--out", str(out), "--metrics", str(metrics)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert err[-1].startswith(f"qprobe bench: error: {source}: {message}")
        assert not out.exists() and not metrics.exists()


def test_an_s3_out_inside_the_s3_source_is_refused_before_anything_is_read(tmp_path, capsys):
    metrics = tmp_path / "m.json"
    code = cli.main(["bench", "--source", "s3://b/photos", "--out", "s3://b/photos/bench", "--metrics", str(metrics)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qprobe bench: error: --out s3://b/photos/bench: is inside the input prefix s3://b/photos; choose an "
        "output prefix apart from the inputs (nothing was written)")
    assert not metrics.exists()


def test_a_source_with_no_usable_photo_writes_nothing(tmp_path, awkward_images):
    unusable = tmp_path / "unusable"
    unusable.mkdir()
    for name in ("truncated", "empty", "text"):
        (unusable / awkward_images[name].name).write_bytes(awkward_images[name].read_bytes())
    cfg = _config(tmp_path, unusable)
    with pytest.raises(SourceError, match=r"unusable: no usable photos among 3 \(3 unreadable\)"):
        synthesize(cfg, progress=False)
    assert not Path(cfg.out).exists() and not Path(cfg.metrics).exists()


def test_bad_parameters_are_one_line_errors(capsys):
    assert cli.main(["bench", "--types", "[blur, sparkle]"]) == 2
    assert "bench: types: unknown defect type 'sparkle' (known: blur, noise," in capsys.readouterr().err
    assert cli.main(["bench", "--types", "[]"]) == 2
    assert "bench: types: expected at least one defect type" in capsys.readouterr().err
    assert cli.main(["bench", "--splits", "{train: 0.5, test: 0.2}"]) == 2
    assert "summing to 1" in capsys.readouterr().err


def test_a_manifest_failing_validation_is_not_left_as_good(tmp_path, tiny_photos):
    cfg = _config(tmp_path, tiny_photos)
    result = synthesize(cfg, progress=False)
    out = Path(cfg.out)
    tampered = out / result.records[3]["image"]
    save_image_atomic(load_image(tampered).resize((100, 100)), tampered)  # its record still says 320x240
    with pytest.raises(ValidationError) as info:
        synthesize(cfg, progress=False)
    assert f"{result.records[3]['id']}: " in str(info.value) and "manifest says 320x240" in str(info.value)
    assert not (out / "manifest.parquet").exists()
    assert len(read_manifest(out / "manifest.invalid.parquet")) == 10
    # Repairing the output (removing the bad image) lets the next run redo it and pass.
    tampered.unlink()
    synthesize(cfg, progress=False)
    assert (out / "manifest.parquet").exists() and not (out / "manifest.invalid.parquet").exists()


def test_default_stage_through_the_cli_records_the_mlflow_run(tmp_path, monkeypatch):
    """``qprobe bench`` with params.yaml's section (the shipped photos), smaller, into a temporary folder."""
    import mlflow

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    # MLflow puts artifacts in ./mlruns next to a sqlite store: keep them out of the repository.
    monkeypatch.chdir(tmp_path)
    out, metrics = tmp_path / "bench", tmp_path / "bench.json"
    # The default's photo folder is relative to the repository, and this test runs elsewhere.
    photos = params.parent / yaml.safe_load(params.read_text())["bench"]["source"]
    argv = ["bench", "--params", str(params), "--out", str(out), "--metrics", str(metrics), "--num-images", "12",
            "--source", str(photos)]
    assert cli.main(argv) == 0
    saved = json.loads(metrics.read_text())
    assert saved["images"] == 12 and saved["sources_used"] == 12 and saved["skipped"]["total"] == 0
    assert saved["source_long_side"]["min"] >= 2000  # the project's subject: high-resolution photos
    assert all(saved["splits"][s] > 0 for s in ("train", "val", "test"))

    run = mlflow.search_runs(experiment_names=["qprobe"], output_format="list")[0]
    assert run.data.tags["qprobe.stage"] == "bench" and run.info.status == "FINISHED"
    assert run.data.params["source"] == str(photos) and run.data.params["num_images"] == "12"
    assert run.data.metrics["images"] == 12 and run.data.metrics["skipped.total"] == 0
    assert sum(run.data.metrics[f"defects_by_type.{t}"] for t in saved["defects_by_type"]) == saved["defects"]
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"source", "output"}
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"contact_sheet.jpg", "bench.json"} <= artifacts


def test_metrics_report_each_source_photos_longer_side_once():
    def record(key: str, width: int, height: int) -> dict:
        return {"key": key, "width": width, "height": height, "defects": [], "has_defect": False, "mos": 4.8,
                "split": "train"}

    # Two variants of a landscape photo, one of a portrait photo: the longer side, whichever it is.
    records = [record("a.jpg", 3000, 1993), record("a.jpg", 3000, 1993), record("b.png", 1333, 2000)]
    metrics = outputs.bench_metrics(records, Counter(), new=3, listed=2, seconds=1.0)
    assert metrics["sources_used"] == 2 and metrics["source_long_side"] == {"min": 2000, "max": 3000}


def _items(n: int) -> list[SourceItem]:
    return [SourceItem(key=f"p{i}.jpg", uri=f"p{i}.jpg", loader=print) for i in range(n)]


def test_plan_spreads_images_over_photos_and_pristine_over_distinct_photos():
    plan = plan_jobs(_items(7), 49, 0.15, seed=0)
    assert sorted(len(jobs) for _, jobs in plan) == [7] * 7
    pristine = [item.key for item, jobs in plan for job in jobs if job.pristine]
    assert len(pristine) == 7 and len(set(pristine)) == 7
    few = plan_jobs(_items(7), 3, 0.0, seed=0)
    assert [len(jobs) for _, jobs in few] == [1, 1, 1]
    assert {i.key for i, _ in few} != {i.key for i, _ in plan_jobs(_items(7), 3, 0.0, seed=5)}
    assert sum(len(j) for _, j in plan_jobs(_items(7), None, 0.0, seed=0)) == 7
