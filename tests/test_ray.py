"""The data stages on Ray give what they give locally, and a killed Ray worker costs only its shard.

One local Ray (two CPUs, no dashboard) serves the whole module: starting one takes seconds. The
stages find it already started and use it (:func:`qprobe.executors.start_ray`). It starts with the
session's SeaweedFS in its environment, as a cluster's workers have their S3 credentials in theirs:
a Ray worker inherits the environment its Ray started with, not the driver's later changes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fixtures_eval import untimed

from qprobe import cli, storage
from qprobe.bench import outputs
from qprobe.bench.config import BenchConfig
from qprobe.bench.synthesize import synthesize
from qprobe.executors import map_shards, start_ray
from qprobe.ops import roles as R
from qprobe.ops import services as S

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def s3_env(s3: S.ServicesConfig) -> Iterator[None]:
    """The session SeaweedFS's variables in this process (and so in the Ray it starts)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in S.service_env(s3).items():
            patch.setenv(key, value)
        storage.client.cache_clear()
        yield
    storage.client.cache_clear()


@pytest.fixture(scope="module", autouse=True)
def local_ray(s3_env: None) -> Iterator[None]:
    start_ray(workers=2)
    # The shard functions defined here travel by value: Ray's workers cannot import a test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _bench_config(tmp_path: Path, source: Path, out: str, **overrides: object) -> BenchConfig:
    values = {"source": str(source), "out": str(tmp_path / out), "metrics": str(tmp_path / f"{out}.json"),
              "num_images": 10, "min_size": 200, **overrides}
    return BenchConfig(**values)


def test_bench_on_ray_is_byte_identical_to_local_with_any_worker_count(tmp_path: Path, tiny_photos: Path) -> None:
    local = _bench_config(tmp_path, tiny_photos, "local")
    synthesize(local, progress=False)
    expected = _files(Path(local.out))
    assert len(expected) == 23  # 10 images, 10 records, manifest, contact sheet, ledger
    for workers in (1, 2):
        cfg = _bench_config(tmp_path, tiny_photos, f"ray{workers}", executor="ray", workers=workers)
        synthesize(cfg, progress=False)
        got = _files(Path(cfg.out))
        assert got.keys() == expected.keys()
        assert [name for name in got if got[name] != expected[name]] == []


def _record_attempt(folder: str, shard: int) -> int:
    """A shard that leaves one file per attempt (named by shard, holding the worker's pid), then works a while."""
    marker = Path(folder) / f"{shard}.{os.getpid()}.{time.monotonic_ns()}"
    marker.write_text(str(os.getpid()))
    time.sleep(0.5)
    return shard * shard


def _kill_first_worker(folder: Path, killed: list[int]) -> None:
    """SIGKILL the worker of the first attempt that appears in ``folder``; note which shard it ran."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        markers = sorted(folder.iterdir())
        if markers:
            # From the name, not the contents: the file can be seen before its pid is written.
            shard, pid = (int(v) for v in markers[0].name.split(".")[:2])
            os.kill(pid, signal.SIGKILL)
            killed.append(shard)
            return
        time.sleep(0.01)


def test_a_killed_ray_worker_costs_only_its_shard(tmp_path: Path) -> None:
    import functools

    attempts = tmp_path / "attempts"
    attempts.mkdir()
    killed: list[int] = []
    killer = threading.Thread(target=_kill_first_worker, args=(attempts, killed))
    killer.start()
    results = list(map_shards(functools.partial(_record_attempt, str(attempts)), list(range(6)),
                              executor="ray", workers=2))
    killer.join()
    assert results == [i * i for i in range(6)]
    assert len(killed) == 1
    runs = {i: len(list(attempts.glob(f"{i}.*"))) for i in range(6)}
    assert runs == {i: 2 if i == killed[0] else 1 for i in range(6)}


def test_bench_survives_a_killed_worker_with_identical_output(tmp_path: Path, tiny_photos: Path) -> None:
    local = _bench_config(tmp_path, tiny_photos, "local")
    synthesize(local, progress=False)
    killed: list[int] = []

    def kill_a_busy_worker() -> None:
        # Ray names a worker process after the task it runs: the first one busy with a shard dies.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killed:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if title.startswith(b"ray::_run_shard"):
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    cfg = _bench_config(tmp_path, tiny_photos, "ray", executor="ray", workers=2)
    synthesize(cfg, progress=False)
    killer.join()
    assert killed, "no Ray worker was seen running a shard"
    expected, got = _files(Path(local.out)), _files(Path(cfg.out))
    assert got.keys() == expected.keys()
    assert [name for name in got if got[name] != expected[name]] == []


def test_trajectories_on_ray_equal_local(tmp_path: Path, tiny_photos: Path) -> None:
    from datasets import load_from_disk

    from qprobe.trajectories.build import SETS, build
    from qprobe.trajectories.config import TrajectoriesConfig

    bench = _bench_config(tmp_path, tiny_photos, "bench", num_images=20)
    synthesize(bench, progress=False)
    # Every split is a training split here: five photos leave few in train.
    local = TrajectoriesConfig(bench=bench.out, out=str(tmp_path / "local"), sft_size=6, rl_size=4, stage1_size=2,
                               train_splits=["train", "val"], samples_html=0)
    build(local, root=tmp_path)
    on_ray = replace(local, out=str(tmp_path / "ray"), executor="ray", workers=2)
    build(on_ray, root=tmp_path)
    for name in SETS:
        a, b = load_from_disk(f"{local.out}/{name}"), load_from_disk(f"{on_ray.out}/{name}")
        assert a.to_list() == b.to_list(), name


def test_evaluate_with_a_local_model_on_ray_equals_local(tmp_path: Path, tiny_photos: Path,
                                                         tiny_model_dir: Path) -> None:
    from qprobe.agent.protocol_config import ProtocolLimits
    from qprobe.eval.config import EvaluateConfig
    from qprobe.eval.scoring import load_sets, make_scorers, score_sets

    bench = _bench_config(tmp_path, tiny_photos, "bench", num_images=3)
    synthesize(bench, progress=False)
    results = []
    for executor in ("local", "ray"):
        cfg = EvaluateConfig(model=str(tiny_model_dir), data=[bench.out], split="all", max_new_tokens=4,
                             baselines=["piqe"], executor=executor, workers=2,
                             protocol=replace(ProtocolLimits(), global_max_pixels=12544, crop_max_pixels=12544))
        traces: list[dict] = []
        frame, skipped = score_sets(load_sets(cfg), make_scorers(cfg, cfg.backend(cfg.model)), cfg, traces)
        # Wall-clock seconds are the one thing two runs never share.
        results.append((frame.drop(columns="cost_seconds").to_json(), skipped, untimed(traces)))
    assert len(results[0][2]) == 3
    assert results[0] == results[1]


# --- bench with an S3 source and out -------------------------------------------------------------


def _objects(prefix: str) -> dict[str, bytes]:
    """The objects under ``prefix`` (an ``s3://`` URI ending in ``/``), by key below it, with their bytes."""
    _, key = storage.parse_s3_uri(prefix)
    return {o.key[len(key):]: storage.download_bytes(o.uri(R.DVC_BUCKET)) for o in storage.list_objects(prefix)}


@pytest.fixture
def s3_photos(tiny_photos: Path) -> str:
    """Three of the tiny photos under a fresh prefix of the session's SeaweedFS; returns the prefix."""
    prefix = f"s3://{R.DVC_BUCKET}/tests/{uuid.uuid4().hex}"
    for name in ("coffee.png", "motorcycle.jpg", "people/astronaut.jpg"):
        storage.upload_file(tiny_photos / name, f"{prefix}/photos/{name}")
    return prefix


def _s3_config(tmp_path: Path, prefix: str, out: str, **overrides: object) -> BenchConfig:
    values = {"source": f"{prefix}/photos", "out": out, "metrics": str(tmp_path / "metrics.json"),
              "num_images": 5, "min_size": 200, "contact_sheet_size": 4, **overrides}
    return BenchConfig(**values)


def test_bench_from_s3_to_s3_equals_a_local_bench_byte_for_byte(tmp_path: Path, s3_photos: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the CLI runs the built-in defaults, as the config does
    local = _s3_config(tmp_path, s3_photos, str(tmp_path / "local"))
    synthesize(local, progress=False)
    expected = _files(Path(local.out))
    assert len(expected) == 13  # 5 images, 5 records, manifest, contact sheet, ledger
    for executor in ("local", "ray"):
        out = f"{s3_photos}/bench-{executor}"
        # Through the CLI, as a user runs it: the MLflow run gets the contact sheet fetched back from S3.
        assert cli.main(["bench", "--source", local.source, "--out", out, "--metrics", local.metrics,
                         "--num-images", "5", "--min-size", "200", "--contact-sheet-size", "4",
                         "--executor", executor, "--workers", "2"]) == 0
        got = _objects(f"{out}/")
        assert got.keys() == expected.keys(), executor
        assert [name for name in got if got[name] != expected[name]] == [], executor
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 2 and all(
        "contact_sheet.jpg" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)} for run in runs)


def test_bench_on_s3_resumes_and_deletes_only_the_objects_its_ledger_lists(tmp_path: Path, s3_photos: str) -> None:
    out = f"{s3_photos}/bench"
    theirs = {"notes.txt": b"my notes", "images/holiday.png": b"a photo of mine"}
    for rel, data in theirs.items():
        storage.upload_bytes(data, f"{out}/{rel}")
    cfg = _s3_config(tmp_path, s3_photos, out, executor="ray", workers=2)
    first = synthesize(cfg, progress=False)
    assert first.metrics["images_new"] == 5

    # A re-run with the same settings makes nothing; one whose record is gone is redone alone.
    assert synthesize(cfg, progress=False).metrics["images_resumed"] == 5
    storage.delete_object(f"{out}/records/{first.records[0]['id']}.json")
    again = synthesize(cfg, progress=False)
    assert (again.metrics["images_new"], again.metrics["images_resumed"]) == (1, 4)

    # Fewer images prune bench's own objects and no one else's.
    fewer = synthesize(replace(cfg, num_images=2), progress=False)
    objects = _objects(f"{out}/")
    mine = {f for r in fewer.records for f in outputs.job_files(r["id"], cfg.format)}
    assert {rel: objects[rel] for rel in theirs} == theirs
    assert set(objects) == mine | set(theirs) | {"manifest.parquet", "contact_sheet.jpg", outputs.LEDGER}
    assert set(json.loads(objects[outputs.LEDGER])["files"]) == mine | set(outputs.FIXED_OUTPUTS)

    # An object in the way of a planned image that bench did not write: refused before writing anything.
    other = f"{s3_photos}/other"
    planned = fewer.records[0]["image"]
    storage.upload_bytes(b"someone else's picture", f"{other}/{planned}")
    with pytest.raises(outputs.ForeignFileError, match=rf"{other}/{planned}: exists but bench did not write it"):
        synthesize(replace(cfg, out=other, num_images=2), progress=False)
    assert _objects(f"{other}/") == {planned: b"someone else's picture"}
