"""Probe-CoT / Probe-RL / stage-1 sets built from a real (small) bench."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import yaml
from datasets import load_from_disk
from fixtures_train import repo_protocol

from qprobe.agent import protocol
from qprobe.agent.protocol_config import LIMITS_FILE, ProtocolLimits
from qprobe.bench.config import BenchConfig
from qprobe.bench.synthesize import synthesize
from qprobe.cli import main as cli_main
from qprobe.data.manifest import read_manifest
from qprobe.defects import TYPES
from qprobe.trajectories import composer
from qprobe.trajectories.build import build
from qprobe.trajectories.config import TrajectoriesConfig
from qprobe.trajectories.planner import PlannerConfig
from qprobe.trajectories.samples import sample_images
from qprobe.trajectories.validation import validate_sets
from qprobe.validation.core import ValidationError


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "bench"
    cfg = BenchConfig(source="skimage", out=str(out), metrics=str(out.parent / "bench.json"), num_images=14,
                      seed=0, contact_sheet_size=0, pristine_fraction=0.2)
    synthesize(cfg, progress=False)
    return out


def _cfg(bench: Path, out: Path, **kw) -> TrajectoriesConfig:
    return TrajectoriesConfig(bench=str(bench), out=str(out), metrics=str(out.parent / "m.json"),
                              sft_size=15, rl_size=6, **{"protocol": ProtocolLimits(**repo_protocol()), **kw})


@pytest.fixture(scope="module")
def built(bench: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrajectoriesConfig, dict]:
    cfg = _cfg(bench, tmp_path_factory.mktemp("traj") / "traj")
    return cfg, build(cfg)


def test_sets_counts_and_ratio(built) -> None:
    cfg, counts = built
    assert counts["sft"] == 15 and counts["sft_high"] == 5 and counts["sft_low"] == 10
    sft = load_from_disk(str(Path(cfg.out) / "sft"))
    assert sorted(set(sft["kind"])) == ["high", "low"]
    assert (Path(cfg.out) / "samples.html").read_text().count("<img") >= 5
    assert len(list((Path(cfg.out) / "samples_images").glob("*.jpg"))) >= 5  # what the thumbnails open


def test_each_set_records_the_protocol_limits_it_was_built_under(built) -> None:
    cfg, _ = built
    for name in ("stage1", "sft", "rl"):
        assert json.loads((Path(cfg.out) / name / LIMITS_FILE).read_text()) == repo_protocol(), name
        assert len(load_from_disk(str(Path(cfg.out) / name))) > 0  # the file beside the set leaves it loadable


def test_a_planner_never_plans_past_the_crop_budget_the_prompt_states(bench: Path, tmp_path: Path) -> None:
    cfg = _cfg(bench, tmp_path / "one", protocol=ProtocolLimits(**{**repo_protocol(), "max_crops": 1}))
    build(cfg)
    sft = load_from_disk(str(Path(cfg.out) / "sft"))
    high = [s for s in sft if s["kind"] == "high"]
    assert high and all(len(s["crops"]) == 1 for s in high)
    assert all(any("You may crop up to 1 regions." in (b["text"] or "") for b in m["content"])
               for s in high for m in s["messages"] if m["role"] == "user")
    with pytest.raises(ValueError, match="max_crops must be at least 1"):
        _cfg(bench, tmp_path / "none", protocol=ProtocolLimits(**{**repo_protocol(), "max_crops": 0}))


def test_high_res_trajectory_turn_by_turn(built) -> None:
    cfg, _ = built
    sft = load_from_disk(str(Path(cfg.out) / "sft"))
    high = [s for s in sft if s["kind"] == "high"]
    assert high
    for s in high:
        roles = [m["role"] for m in s["messages"]]
        assert roles[:2] == ["system", "user"] and roles[-1] == "assistant"
        n_crops = roles.count("tool")
        assert n_crops == len(s["crops"]) >= 1 and len(sample_images(s)) == n_crops + 1 and s["images"] == []
        tool_blocks = [b for m in s["messages"] if m["role"] == "tool" for b in m["content"]]
        assert [b["type"] for b in tool_blocks] == ["image", "text"] * n_crops
        assistants = [m for m in s["messages"] if m["role"] == "assistant"]
        parsed = [protocol.parse_assistant(m["content"][0]["text"]) for m in assistants]
        assert all(isinstance(p, protocol.ToolCall) for p in parsed[:-1])
        answer = parsed[-1]
        assert isinstance(answer, protocol.Answer) and answer.score == pytest.approx(s["mos"], abs=0.006)
        assert len(answer.defects) == len(s["defects"])
        # Every defect is inside some crop, and the crops that cover defects keep context around them.
        for d in s["defects"]:
            assert any(c[0] <= d[0] and c[1] <= d[1] and c[2] >= d[2] and c[3] >= d[3] for c in s["crops"])
        # No hidden numbers in the reasoning: no severity digits, no ids or file names.
        for m in assistants:
            think = m["content"][0]["text"].split("</think>")[0]
            assert s["id"] not in think and ".png" not in think and "severity" not in think


def test_rl_and_stage1_rows(built) -> None:
    cfg, _ = built
    rl = load_from_disk(str(Path(cfg.out) / "rl"))
    assert len(rl) == 6
    for row in rl:
        assert Path(row["original"]).is_file()
        assert row["has_defect"] == bool(row["defects"])
        assert row["prompt"][1]["content"][0]["type"] == "image" and len(row["images"]) == 1
    stage1 = load_from_disk(str(Path(cfg.out) / "stage1"))
    manifest = read_manifest(cfg.bench)
    train_ids = set(manifest.loc[manifest["split"] == "train", "id"])
    assert set(stage1["id"]) <= train_ids and set(rl["id"]) <= train_ids
    assert all(1 <= m <= 5 for m in stage1["mos"])


def test_same_seed_same_text(bench: Path, built, tmp_path: Path) -> None:
    cfg, _ = built
    again = replace(cfg, out=str(tmp_path / "again"))
    build(again)
    a = load_from_disk(str(Path(cfg.out) / "sft"))["messages"]
    b = load_from_disk(str(tmp_path / "again" / "sft"))["messages"]
    assert a == b


def test_brief_reasoning_changes_the_words_only_and_keeps_each_phase(bench: Path, built, tmp_path: Path) -> None:
    cfg, _ = built
    brief = replace(cfg, out=str(tmp_path / "brief"), reasoning="brief")
    build(brief)
    full = {s["id"] + s["kind"]: s for s in load_from_disk(str(Path(cfg.out) / "sft"))}
    short = {s["id"] + s["kind"]: s for s in load_from_disk(str(tmp_path / "brief" / "sft"))}
    assert full.keys() == short.keys()
    lengths = {"brief": 0, "full": 0}
    for key, s in short.items():
        f = full[key]
        # The same crops, tool turns and answers: only the reasoning differs.
        assert s["crops"] == f["crops"] and [m["role"] for m in s["messages"]] == [m["role"] for m in f["messages"]]
        turns = [(protocol.split_turn(m["content"][0]["text"]), protocol.split_turn(n["content"][0]["text"]))
                 for m, n in zip(s["messages"], f["messages"], strict=True) if m["role"] == "assistant"]
        assert all(a[1] == b[1] for a, b in turns)
        assert sum(len(a[0]) for a, _ in turns) < 0.7 * sum(len(b[0]) for _, b in turns)
        lengths["brief"] += sum(len(a[0]) for a, _ in turns)
        lengths["full"] += sum(len(b[0]) for _, b in turns)
        first = turns[0][0][0]
        # The decision still opens the first turn, and every defect a crop shows gets its critical check.
        assert first.startswith(composer.DOWNSCALED.split("{")[0] if s["kind"] == "high" else composer.NATIVE)
        if s["kind"] == "high":
            for kind in {d.type for d in protocol.parse_assistant(s["messages"][-1]["content"][0]["text"]).defects}:
                assert f"not {TYPES[kind].confound.split(',')[0]}" in " ".join(a[0] for a, _ in turns)
    assert lengths["brief"] < 0.5 * lengths["full"], lengths


def test_an_unknown_reasoning_style_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "p.yaml"
    params.write_text("trajectories: {reasoning: terse}\n")
    assert cli_main(["trajectories", "--params", str(params)]) == 2
    assert "reasoning must be 'full' or 'brief', got 'terse'" in capsys.readouterr().err.strip().splitlines()[-1]


def test_degradation_only_ablation(bench: Path, tmp_path: Path) -> None:
    cfg = _cfg(bench, tmp_path / "abl", planner=PlannerConfig(strategy="degradation_only"))
    build(cfg)
    sft = load_from_disk(str(tmp_path / "abl" / "sft"))
    for s in sft:
        if s["kind"] == "high" and s["defects"]:
            assert all(s["crop_has_defect"])
            scale = s["width"] / sample_images(s)[0].size[0]  # original pixels per view pixel
            for c, d in zip(s["crops"], s["defects"], strict=False):
                # Tight: the defect box, grown at most to one 28 px view patch, rounded outward.
                assert (c[2] - c[0]) <= max(d[2] - d[0], 56, 28 * scale) + 2 * scale + 2


def test_validation_catches_leaks_and_broken_turns(bench: Path, built) -> None:
    cfg, _ = built
    manifest = read_manifest(cfg.bench)
    sft = load_from_disk(str(Path(cfg.out) / "sft")).to_pandas()
    rl = load_from_disk(str(Path(cfg.out) / "rl")).to_pandas()
    stage1 = load_from_disk(str(Path(cfg.out) / "stage1")).to_pandas()
    test_source = manifest.loc[manifest["split"] == "test", "source"].iloc[0]
    leaked = rl.copy()
    leaked.loc[0, "source"] = test_source
    with pytest.raises(ValidationError, match="test-split source photos reached training"):
        validate_sets(cfg, manifest, sft=sft, rl=leaked, stage1=stage1)
    broken = sft.copy()
    msgs = [dict(m) for m in broken.loc[0, "messages"]]
    msgs[-1] = {"role": "assistant", "name": None, "content": [{"type": "text", "text": "score: 4"}]}
    broken.at[0, "messages"] = msgs
    with pytest.raises(ValidationError, match="does not pass the protocol"):
        validate_sets(cfg, manifest, sft=broken, rl=rl, stage1=stage1)
    lopsided = pd.concat([sft[sft["kind"] == "high"]] * 3)
    with pytest.raises(ValidationError, match="low:high ratio"):
        validate_sets(cfg, manifest, sft=lopsided, rl=rl, stage1=stage1)


def test_cli_refuses_test_split_and_missing_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "p.yaml"
    params.write_text("trajectories: {}\n")
    assert cli_main(["trajectories", "--params", str(params), "--train-splits", "[train, test]"]) == 2
    assert "train_splits must not contain 'test'" in capsys.readouterr().err
    assert cli_main(["trajectories", "--params", str(params), "--bench", str(tmp_path / "nope")]) == 2
    assert "manifest not found" in capsys.readouterr().err


def test_stage1_on_a_set_not_imported_names_the_import_command(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "p.yaml"
    params.write_text("trajectories: {}\n")
    kadid = tmp_path / "data" / "public" / "kadid10k"
    assert cli_main(["trajectories", "--params", str(params), "--stage1-source", str(kadid)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's own log lines
    assert err.startswith("qprobe trajectories: error: trajectories.stage1_source:")
    assert f"`qprobe data import kadid10k --root RELEASE_FOLDER --out {kadid}`" in err


def test_the_paper_profile_trains_stage1_on_kadid_and_the_default_on_the_bench() -> None:
    root = Path(__file__).resolve().parents[1]
    paper = yaml.safe_load((root / "configs" / "paper.yaml").read_text())["trajectories"]
    default = yaml.safe_load((root / "params.yaml").read_text())["trajectories"]
    assert paper["stage1_source"] == "data/public/kadid10k" and default["stage1_source"] == "bench"


class _TeacherHandler(BaseHTTPRequestHandler):
    """A chat-completions endpoint that rewrites by the rules of the test (``server.mode``)."""

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply({"data": [{"id": "teacher-vlm"}]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = request["messages"][-1]["content"]
        assert sum(b["type"] == "image_url" for b in user) >= 2  # the global view and the crops
        text = user[-1]["text"]
        truth = json.loads(text.split("Ground truth: ")[1].split(".\n")[0])
        drafts = json.loads(text.split("assistant turn:\n")[1].split("\n\nAnswer only")[0])
        score = truth["score"] + (0 if self.server.mode == "accept" else 2.0)
        thoughts = [f"Teacher step {i}: the pixels show it plainly." for i in range(len(drafts))]
        content = json.dumps({"score": score, "defect_types": truth["defect_types"], "thoughts": thoughts})
        self._reply({"choices": [{"message": {"content": content}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 10}})


@pytest.fixture
def teacher_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TeacherHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.mark.parametrize("mode", ["accept", "reject"])
def test_teacher_rewrites_are_kept_only_when_they_agree(bench: Path, tmp_path: Path, teacher_server, mode: str) -> None:
    teacher_server.mode = mode
    url = f"http://127.0.0.1:{teacher_server.server_address[1]}"
    cfg = _cfg(bench, tmp_path / "t", teacher=url)
    counts = build(cfg)
    high = [s for s in load_from_disk(str(tmp_path / "t" / "sft")) if s["kind"] == "high"]
    rewritten = [s for s in high if "Teacher step 0" in s["messages"][2]["content"][0]["text"]]
    if mode == "accept":
        assert counts["teacher_kept"] == len(high) == len(rewritten) and counts["teacher_rejected"] == 0
        # The actions are untouched: the same crops and the same answer as without a teacher.
        for s in rewritten:
            assert isinstance(protocol.parse_assistant(s["messages"][-1]["content"][0]["text"]), protocol.Answer)
    else:
        assert counts["teacher_kept"] == 0 and not rewritten
        assert counts["teacher_rejected_score_disagrees"] == len(high)


def test_sft_samples_go_through_trls_collator(built, tiny_model_dir: Path) -> None:
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from qprobe.models.factory import load_processor

    cfg, _ = built
    sft = load_from_disk(str(Path(cfg.out) / "sft"))
    high = next(s for s in sft if s["kind"] == "high")
    low = next(s for s in sft if s["kind"] == "low")
    collator = DataCollatorForVisionLanguageModeling(processor=load_processor(tiny_model_dir),
                                                     assistant_only_loss=True)
    batch = collator([high, low])
    assert batch["image_grid_thw"].shape[0] == len(sample_images(high)) + 1
    assert (batch["labels"] != -100).any(dim=1).all()  # both samples teach their assistant turns
