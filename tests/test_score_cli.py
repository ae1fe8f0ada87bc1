"""`qprobe score`: JSON output, folders with a bad file, visualisations, and one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qprobe.cli import main

SMALL = ["--global-max-pixels", "3136", "--crop-max-pixels", "3136", "--max-new-tokens", "8"]


def _photo(path: Path, size: tuple[int, int] = (320, 240), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_json_output_of_the_taught_model(taught_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    viz = tmp_path / "viz"
    rc = main(["score", str(taught_model.image_path), "--model", str(taught_model.path), "--json",
               "--viz", str(viz), *taught_model.flags()])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image"] == str(taught_model.image_path) and (result["width"], result["height"]) == (640, 480)
    assert result["score"] == 3.75 and result["outcome"] == "answer" and result["failure"] is None
    assert result["defects"] == [{"type": "blur", "bbox_view": [30, 20, 60, 50], "bbox_original": [171, 114, 343, 286]}]
    assert [t["role"] for t in result["turns"]] == ["assistant", "tool", "assistant"]
    assert result["turns"][0]["parsed"] == {"type": "tool_call", "name": "crop", "bbox_view": [28, 14, 84, 70]}
    assert result["turns"][1]["bbox_original"] == [160, 80, 480, 400] and result["turns"][1]["crop_size"] == [112, 112]
    assert result["tokens"]["global_visual_tokens"] == 12 and result["tokens"]["crop_visual_tokens"] == [16]
    assert result["tokens"]["generated_tokens"] > 0 and result["seconds"] > 0
    assert "soft against sharp surroundings" in result["reasoning"]
    drawn = Image.open(viz / "photo.jpg")
    assert drawn.size == (640, 480)


def test_human_output_names_score_defects_crops_and_reasoning(taught_model,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", str(taught_model.image_path), "--model", str(taught_model.path),
                 *taught_model.flags()]) == 0
    out = capsys.readouterr().out
    assert f"{taught_model.image_path}: score 3.75 [1 crop(s)" in out
    assert "defect blur at [171, 114, 343, 286] (original pixels)" in out
    assert "crop [160, 80, 480, 400] (original pixels)" in out
    assert "| The global view looks smooth; check the upper left." in out


def test_random_model_reports_the_parse_failure(tiny_model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    photo = _photo(tmp_path / "a.png")
    assert main(["score", str(photo), "--model", str(tiny_model_dir), "--json", *SMALL]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["score"] is None and result["outcome"] in ("parse_failure", "token_budget")
    assert result["failure"]["kind"]


def test_folder_run_reports_the_bad_file_and_scores_the_rest(tiny_model_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    _photo(folder / "one.png")
    _photo(folder / "sub" / "two.jpg", (200, 300), seed=1)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not even tried")
    out = tmp_path / "results"
    rc = main(["score", str(folder), "--model", str(tiny_model_dir), "--out", str(out), *SMALL])
    captured = capsys.readouterr()
    assert rc == 1
    assert f"skipped: {folder / 'broken.jpg'}:" in captured.err and "1 skipped" in captured.err
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [Path(r["image"]).name for r in rows] == ["broken.jpg", "one.png", "two.jpg"]
    assert rows[0]["error"] and not rows[1]["error"] and rows[1]["outcome"]
    assert int(rows[2]["global_visual_tokens"]) == 2  # 200x300 at 3136 pixels: a 28x56 view
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and "error" in lines[0] and lines[2]["height"] == 300


def test_non_checkpoint_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = _photo(tmp_path / "a.png")
    (tmp_path / "not_a_model").mkdir()
    assert main(["score", str(photo), "--model", str(tmp_path / "not_a_model")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"qprobe score: error: {tmp_path / 'not_a_model'}: not a Qwen2.5-VL checkpoint (no config.json)"


def test_endpoint_down_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    photo = _photo(tmp_path / "a.png")
    assert main(["score", str(photo), "--model", f"http://127.0.0.1:{port}/v1", "--retries", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"http://127.0.0.1:{port}/v1/models: unreachable" in err[0]


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "missing.jpg", "no such file"),
    (lambda d: (d / "bad.png").write_bytes(b"garbage") and d / "bad.png", "not an image file"),
    (lambda d: _photo(d / "big.png", (400, 300)), "120000 pixels is over the limit of 100000"),
    (lambda d: _photo(d / "thin.png", (2010, 10)), "aspect ratio must be smaller than 200"),
])
def test_bad_single_photo_is_one_line(make, message: str, tiny_model_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = make(tmp_path)
    rc = main(["score", str(path), "--model", str(tiny_model_dir), "--max-image-pixels", "100000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(path) in err[0] and message in err[0]


def test_bad_flag_value_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = _photo(tmp_path / "a.png")
    assert main(["score", str(photo), "--max-crops", "-1"]) == 2
    assert "max_crops must be at least 0" in capsys.readouterr().err


def test_default_batch_output_folder(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _photo(tmp_path / "in" / "x.png")
    shutil.copy(tmp_path / "in" / "x.png", tmp_path / "in" / "y.png")
    assert main(["score", "in", "--model", str(tiny_model_dir), *SMALL]) == 0
    assert (tmp_path / "outputs" / "score" / "results.csv").is_file()
