"""Rollouts in flight against an endpoint: the same results in the same order at any concurrency,
folder runs that resume, one failing photo among many; and ``qprobe score``'s default model."""

from __future__ import annotations

import csv
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_endpoint import StandInEndpoint, protocol_turns
from fixtures_eval import make_bench, untimed
from PIL import Image

from qprobe.agent.backends import OpenAIBackend
from qprobe.agent.inflight import ordered_map
from qprobe.cli import main
from qprobe.config import parse_config
from qprobe.eval.config import EvaluateConfig
from qprobe.eval.scoring import load_sets, make_scorers, score_sets

SMALL = ["--global-max-pixels", "3136", "--crop-max-pixels", "3136"]


def _photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i:02d}.png")
    return folder


def _results(out: Path) -> list[object]:
    return [untimed(json.loads(line)) for line in (out / "results.jsonl").read_text().splitlines()]


def _csvuntimed(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def test_ordered_map_keeps_input_order_and_raises_in_turn() -> None:
    def slow_square(n: int) -> int:
        time.sleep(random.Random(n).uniform(0, 0.02))  # finishing order differs from input order
        if n == 7:
            raise ValueError("seven")
        return n * n

    assert list(ordered_map(slow_square, range(7), 4)) == [n * n for n in range(7)]
    results = ordered_map(slow_square, range(12), 4)
    assert [next(results) for _ in range(7)] == [n * n for n in range(7)]
    with pytest.raises(ValueError, match="seven"):
        next(results)


def test_twenty_photos_at_concurrency_8_give_the_results_of_concurrency_1(tmp_path: Path) -> None:
    folder = _photos(tmp_path / "photos", 20)
    outs = {}
    for concurrency in (1, 8):
        with StandInEndpoint(protocol_turns(crop=True), latency=0.05) as server:
            outs[concurrency] = tmp_path / f"out{concurrency}"
            assert main(["score", str(folder), "--model", server.url, "--out", str(outs[concurrency]),
                         "--concurrency", str(concurrency), *SMALL]) == 0
        # A crop, then the answer, per photo; never more in flight than asked, and more than one when asked.
        assert len(server.requests) == 40 and (server.most_in_flight == 1 if concurrency == 1 else 1 < server.most_in_flight <= concurrency)
    serial, concurrent = _results(outs[1]), _results(outs[8])
    assert [r["image"] for r in serial] == [str(folder / f"p{i:02d}.png") for i in range(20)]
    assert len({r["score"] for r in serial}) > 10  # each photo its own answer: a swap would show
    assert all(r["outcome"] == "answer" and len(r["turns"]) == 3 for r in serial)
    assert concurrent == serial and _csvuntimed(outs[8]) == _csvuntimed(outs[1])


def test_a_folder_run_resumes_scoring_only_what_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _photos(tmp_path / "photos", 6)
    out = tmp_path / "out"
    # The first request is refused (400: not retried): that one photo fails, the five others are scored.
    with StandInEndpoint(protocol_turns(crop=True), failures=1, status=400) as server:
        flags = ["--model", server.url, "--out", str(out), "--concurrency", "4", *SMALL]
        assert main(["score", str(folder), *flags]) == 1
        first = _results(out)
        failed = [r for r in first if "error" in r]
        assert len(first) == 6 and len(failed) == 1 and "HTTP 400" in failed[0]["error"]
        assert len(server.requests) == 11
        capsys.readouterr()

        assert main(["score", str(folder), *flags]) == 0
        assert "resuming: 5 of 6 photos already scored" in capsys.readouterr().err
        assert len(server.requests) == 13  # only the failed photo again: a crop and an answer
        again = _results(out)
        assert [r["image"] for r in again] == [r["image"] for r in first]
        assert [r for r in again if r["image"] != failed[0]["image"]] == [r for r in first if "error" not in r]

        assert main(["score", str(folder), *flags, "--max-crops", "2"]) == 0  # other settings: every photo again
        assert "another model or other settings; scoring afresh" in capsys.readouterr().err
        assert len(server.requests) == 25


def test_evaluate_at_concurrency_8_gives_the_predictions_of_concurrency_1(tmp_path: Path) -> None:
    bench = make_bench(tmp_path / "bench")
    cfg = parse_config(EvaluateConfig, None, ["--data", str(bench), "--split", "all", "--baselines", "[no_tool]",
                                              *SMALL])
    frames = {}
    with StandInEndpoint(protocol_turns(crop=True), latency=0.02) as server:
        backend = OpenAIBackend(server.url)
        for concurrency in (1, 8):
            frame, skipped = score_sets(load_sets(cfg), make_scorers(cfg, backend), cfg, [], concurrency)
            frames[concurrency] = frame.drop(columns="cost_seconds")
    assert server.most_in_flight > 1 and not skipped
    assert len(frames[1]) == 2 * len(load_sets(cfg)[0].rows) and frames[1]["score"].notna().all()
    assert frames[8].equals(frames[1])


def test_score_defaults_to_the_latest_trained_model(tiny_model_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("stage1: {out: models/s1}\nstage2: {out: models/s2}\nstage3: {out: models/s3}\n")
    photo = _photos(tmp_path / "photos", 1) / "p00.png"
    Path("models/s3").mkdir(parents=True)  # a folder with no checkpoint in it is not a trained model
    assert main(["score", str(photo)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qprobe score: error: params.yaml: no trained model (stage3.out models/s3, stage2.out models/s2, "
                   "stage1.out models/s1: none holds a checkpoint); train one (dvc repro stage1) or pass --model"]

    for stage in ("s1", "s2"):
        shutil.copytree(tiny_model_dir, f"models/{stage}")
    assert main(["score", str(photo), "--json", "--max-new-tokens", "8", *SMALL]) == 0
    captured = capsys.readouterr()
    assert "qprobe score: model models/s2 (the latest trained, stage2" in captured.err
    assert json.loads(captured.out)["image"] == str(photo)
