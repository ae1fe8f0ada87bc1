"""``qprobe evaluate`` end to end on a tiny bench: the random tiny model (parse failures everywhere,
which must be counted and survived) and a scripted model that follows the protocol."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from fixtures_eval import ScriptedBackend, make_bench

from qprobe.agent.protocol_config import ProtocolLimits, write_limits
from qprobe.config import ConfigError, to_flat_dict
from qprobe.errors import QProbeError
from qprobe.eval.config import EvaluateConfig
from qprobe.eval.curves import training_curves
from qprobe.eval.outputs import SUMMARY
from qprobe.eval.runner import evaluate, main, parse_args
from qprobe.eval.scoring import load_sets


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bench(tmp_path_factory.mktemp("eval") / "bench", num_images=8)


@pytest.fixture(scope="module", autouse=True)
def _one_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One MLflow store for the module (creating one takes seconds); each test has its own experiment."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield
    if before is None:
        del os.environ["MLFLOW_TRACKING_URI"]
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True)
def _own_experiment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", request.node.name[:60])


def _flags(bench: Path, out: Path) -> list[str]:
    # Defaults from the dataclass, not from the repository's params.yaml: the test sets what it needs. No
    # curve files: the default paths are relative to the working directory, which a pipeline run fills.
    params = bench.parent / "params.yaml"
    params.write_text("evaluate: {curves: []}\n")
    return ["--params", str(params), "--data", str(bench), "--split", "all", "--out", str(out),
            "--metrics", str(out / "evaluate.json"),
            "--global-max-pixels", "12544", "--crop-max-pixels", "12544", "--max-new-tokens", "8",
            "--bootstrap", "50", "--piqe-tile", "256", "--crop-bias-images", "1", "--crop-bias-crops", "2",
            "--repeat-images", "1", "--repeat-runs", "2", "--bokeh-limit", "1", "--gallery", "2"]


def _config(bench: Path, out: Path, *extra: str) -> EvaluateConfig:
    return parse_args([*_flags(bench, out), *extra])


def _stage_runs() -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    return client.search_runs([experiment.experiment_id], filter_string="tags.`qprobe.stage` = 'evaluate'")


def test_random_tiny_model_end_to_end(bench: Path, tiny_model_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    photos = os.environ.get("QPROBE_PHOTOS")
    extra = ["--bokeh-dir", photos] if photos else []
    # A few tokens, no tool-less twin (the scripted run below has it): every rollout of the random model
    # is a parse failure anyway.
    assert main(["--model", str(tiny_model_dir), *_flags(bench, out), "--max-new-tokens", "4",
                 "--crop-bias-crops", "1", "--baselines", "[piqe, piqe_patch]", *extra]) == 0
    assert "evaluate bench: SRCC n/a, answer rate 0.000" in capsys.readouterr().out

    metrics = json.loads((out / "metrics_full.json").read_text())
    assert all(isinstance(v, float | type(None)) for v in metrics.values())  # every metric, flat
    assert metrics["bench.images"] == 8 and metrics["bench.skipped"] == 0
    assert metrics["bench.sources"] == 8  # round-robin over the 14 bundled photos: one image of each of 8
    assert not any(".no_tool." in k for k in metrics)
    for method in ("qprobe",):
        assert metrics[f"bench.{method}.answer_rate"] == 0 and metrics[f"bench.{method}.srcc"] is None
        outcomes = sum(v for k, v in metrics.items() if k.startswith(f"bench.{method}.outcome."))
        failures = sum(v for k, v in metrics.items() if k.startswith(f"bench.{method}.failure."))
        assert outcomes == failures == 8
        assert metrics[f"bench.{method}.cost.generated_tokens"] <= 4
        assert 0 < metrics[f"bench.{method}.cost.visual_ratio"] < 1
        assert metrics[f"bench.{method}.loc.recall"] == 0  # no answer, no box
    assert metrics["bench.piqe.answer_rate"] == 1 and metrics["bench.piqe.srcc"] is not None
    assert metrics["bench.piqe.srcc_low"] <= metrics["bench.piqe.srcc"] <= metrics["bench.piqe.srcc_high"]
    assert metrics["probes.crop_bias.piqe.answered_pairs"] == 1
    assert metrics["probes.crop_bias.qprobe.answered_pairs"] == 0
    assert metrics["probes.repeat.qprobe.runs"] == 2
    assert ("probes.bokeh.piqe.photos" in metrics) == bool(photos)
    # The DVC metrics file: the summary, nested, its values those of the full file.
    summary = json.loads((out / "evaluate.json").read_text())
    assert set(summary) == {"seconds", "bench"} and set(summary["bench"]) == {"images", "sources", "skipped", "qprobe", "piqe",
                                                                              "piqe_patch"}
    assert set(summary["bench"]["qprobe"]) == set(SUMMARY) and summary["bench"]["qprobe"]["srcc"] is None
    assert all(metrics[f"bench.{k}"] == v for k, v in to_flat_dict(summary["bench"]).items())
    assert len(to_flat_dict(summary)) < 40 < len(metrics)

    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 8 * 3 and set(predictions["method"]) == {"qprobe", "piqe", "piqe_patch"}
    assert predictions.loc[predictions["method"] == "qprobe", "failure"].notna().all()
    assert len((out / "traces.jsonl").read_text().splitlines()) == 8
    scatter = pd.read_csv(out / "plots" / "scatter_bench.csv")  # wide: one column per method, for dvc plots
    assert list(scatter.columns) == ["id", "mos", "has_defect", "qprobe", "piqe", "piqe_patch"]
    assert len(scatter) == 8 and scatter["qprobe"].isna().all() and scatter["piqe"].notna().all()
    groups = pd.read_csv(out / "plots" / "groups_bench.csv")
    assert {"by", "group", "n", "qprobe_srcc", "piqe_mae", "piqe_patch_srcc"} <= set(groups.columns)
    assert set(groups["by"]) == {"type", "severity"} and "pristine" in set(groups["group"])
    assert not list((out / "plots").glob("curves_*.csv"))
    report = (out / "report.html").read_text()
    assert "unanswered" in report and "No curve file of the training stages" in report

    (run,) = _stage_runs()
    # The run logs the headline only: the defined figures, Q-Probe's undefined SRCC left out.
    assert set(run.data.metrics) == {"seconds", "bench.qprobe.answer_rate", "bench.qprobe.cost.visual_ratio_total",
                                     *(f"bench.{m}.{k}" for m in ("piqe", "piqe_patch") for k in ("srcc", "plcc", "krcc"))}
    assert run.data.metrics["bench.piqe.srcc"] == metrics["bench.piqe.srcc"]
    assert run.data.params["model"] == str(tiny_model_dir)
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).list_artifacts(run.info.run_id)}
    assert {"report.html", "evaluate.json", "metrics_full.json", "predictions.csv", "plots"} <= artifacts


def _write_curves(folder: Path) -> list[str]:
    """Curve files as the training stages write them (train.history.write_curves): step, then logged keys."""
    paths = []
    for stage, key in (("stage1", "reward"), ("stage2", "loss"), ("stage3", "reward")):
        path = folder / f"{stage}_curves.csv"
        rows = [{"step": step, key: 0.2 * step if key == "reward" else 2.0 - 0.3 * step, "learning_rate": 1e-5}
                for step in range(1, 6)]
        pd.DataFrame(rows).to_csv(path, index=False)
        paths.append(str(path))
    return paths


def test_scripted_model_end_to_end_with_training_curves(bench: Path, tmp_path: Path) -> None:
    curves = _write_curves(tmp_path)
    out = tmp_path / "out"
    result = evaluate(_config(bench, out, "--max-new-tokens", "200", "--curves", *curves), backend=ScriptedBackend())
    metrics = result.metrics
    assert metrics["bench.qprobe.answer_rate"] == 1 and metrics["bench.no_tool.answer_rate"] == 1
    assert math.isfinite(metrics["bench.qprobe.srcc"]) and metrics["bench.qprobe.outcome.answer"] == 8
    assert metrics["bench.qprobe.cost.crops"] == 1 and metrics["bench.no_tool.cost.crops"] == 0
    assert metrics["bench.qprobe.cost.turns"] == 2
    assert metrics["bench.qprobe.cost.visual_ratio"] > metrics["bench.no_tool.cost.visual_ratio"]
    # One predicted box per image: false alarms on the pristine images, some IoU on the others.
    assert metrics["bench.qprobe.loc.false_alarm_rate"] == 1
    assert metrics["bench.qprobe.loc.predicted_boxes"] == 8 and metrics["bench.qprobe.loc.mean_iou"] >= 0
    assert metrics["probes.crop_bias.qprobe.answered_pairs"] == 2
    assert metrics["probes.repeat.qprobe.answer_rate"] == 1 and metrics["probes.repeat.qprobe.mean_std"] > 0
    assert any(k.startswith("bench.qprobe.type.") for k in metrics)
    assert any(k.startswith("bench.qprobe.severity.") for k in metrics)

    drawn = training_curves(curves)  # the reward and loss columns, not the learning rate
    assert set(drawn["metric"]) == {"reward", "loss"} and set(drawn["stage"]) == {"stage1", "stage2", "stage3"}
    assert list(drawn[drawn["stage"] == "stage1"]["step"]) == [1, 2, 3, 4, 5]
    report = (out / "report.html").read_text()
    assert 'alt="training curves"' in report and "worst</h3>" in report and "best</h3>" in report
    assert {p.name for p in (out / "plots").iterdir()} == {
        "scatter_bench.png", "groups_bench.png", "reward_curves.png", "scatter_bench.csv", "groups_bench.csv"}
    probes = json.loads((out / "probes.json").read_text())
    assert set(probes) == {"crop_bias", "repeat"} and probes["repeat"]["qprobe"]["rows"][0]["std"] > 0


def test_training_curves_missing_or_broken_files_are_skipped(tmp_path: Path) -> None:
    assert training_curves([]) is None
    assert training_curves([tmp_path / "stage1_curves.csv"]) is None  # not written (yet)
    (tmp_path / "stage2_curves.csv").write_text("loss\n1.0\n")  # no step column
    (tmp_path / "stage3_curves.csv").write_bytes(b"\x00\xff not a table")
    assert training_curves([tmp_path / f"stage{i}_curves.csv" for i in (1, 2, 3)]) is None


def test_several_manifests_after_one_flag(bench: Path, tmp_path: Path) -> None:
    cfg = parse_args(["--data", str(bench), str(bench / "manifest.parquet"), "--split", "all", "--limit", "3"])
    sets = load_sets(cfg)
    assert [s.name for s in sets] == ["bench", "bench-2"]
    assert [len(s.rows) for s in sets] == [3, 3]
    assert list(sets[0].rows["id"]) == list(sets[1].rows["id"])  # the same seeded sample
    assert parse_args(["--data", "[a, b]"]).data == ["a", "b"]
    assert parse_args(["--data", "one"]).data == ["one"]


def test_a_model_trained_on_other_budgets_is_refused(bench: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_limits(model, ProtocolLimits())  # the paper's budgets; the run's are 12544 (the flags)
    with pytest.raises(QProbeError, match=rf"^{model}: made with protocol.global_max_pixels 1003520, but this run "
                                          r"has 12544;"):
        evaluate(_config(bench, tmp_path / "out", "--model", str(model)))


def test_a_missing_split_names_the_splits_present(bench: Path, tmp_path: Path) -> None:
    cfg = _config(bench, tmp_path, "--split", "holdout")
    with pytest.raises(QProbeError, match=r"no rows in split 'holdout' \(splits present: .*train.*--split all"):
        load_sets(cfg)


def test_bad_settings_are_config_errors(bench: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown baseline 'niqe'"):
        _config(bench, tmp_path, "--baselines", "[piqe, niqe]")
    with pytest.raises(ConfigError, match="crop_bias_crops"):
        _config(bench, tmp_path, "--crop-bias-crops", "6")


class FirstCallFails(ScriptedBackend):
    """The scripted model behind an endpoint that answers its first request out of shape."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, messages: list, **kwargs: object) -> object:
        self.calls += 1
        if self.calls == 1:
            raise QProbeError("http://127.0.0.1:1/v1/chat/completions: usage must be an object, got 'lots'")
        return super().generate(messages, **kwargs)


def test_an_endpoint_failure_on_one_image_is_recorded_and_the_rest_evaluated(bench: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _config(bench, out, "--max-new-tokens", "200", "--baselines", "[]", "--crop-bias-images", "0",
                  "--repeat-images", "0", "--bokeh-limit", "0", "--curves", "[]")
    result = evaluate(cfg, backend=FirstCallFails())
    assert result.metrics["bench.qprobe.outcome.error"] == 1 and result.metrics["bench.qprobe.outcome.answer"] == 7
    failed = result.predictions[result.predictions["outcome"] == "error"]
    assert len(failed) == 1 and failed["score"].isna().all() and "usage must be an object" in failed["error"].iloc[0]
    assert "usage must be an object" in (out / "predictions.csv").read_text()


@pytest.fixture(scope="module")
def two_photo_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five images of each of two photos, one of each pristine: the originals full-reference methods need."""
    from PIL import Image
    from skimage import data

    from qprobe.bench.config import BenchConfig
    from qprobe.bench.synthesize import synthesize

    root = tmp_path_factory.mktemp("two_photos")
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()).save(root / f"{name}.png")
    out = root / "bench"
    synthesize(BenchConfig(source=str(root), out=str(out), metrics=str(root / "bench.json"), num_images=10,
                           pristine_fraction=0.2, contact_sheet_size=0), progress=False)
    return out


def test_full_reference_ssim_scores_each_image_against_its_photos_original(two_photo_bench: Path,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _config(two_photo_bench, out, "--max-new-tokens", "200", "--baselines", "[piqe, ssim]",
                  "--curves", "[]", "--repeat-images", "0")
    result = evaluate(cfg, backend=ScriptedBackend())
    metrics, predictions = result.metrics, result.predictions
    assert metrics["bench.ssim.answer_rate"] == 1 and metrics["bench.ssim.n"] == 10
    # It sees the injected defects and nothing of the content: on two photos it ranks them better than
    # PIQE does (0.59 against 0.35), and each photo's original scores 1.
    assert metrics["bench.ssim.srcc"] > max(0.5, metrics["bench.piqe.srcc"])
    ssim_rows = predictions[predictions["method"] == "ssim"]
    pristine = ssim_rows["has_defect"] == False  # noqa: E712 (a column of bools)
    assert pristine.sum() == 2 and (ssim_rows.loc[pristine, "raw"] > 1 - 1e-6).all()
    assert (ssim_rows.loc[~pristine, "raw"] < 1 - 1e-6).all()
    # The probes' photos have no original: SSIM is not among their methods.
    probes = json.loads((out / "probes.json").read_text())
    assert "piqe" in probes["crop_bias"] and "ssim" not in probes["crop_bias"]
    assert "SSIM (full reference)" in (out / "report.html").read_text()


def test_an_images_original_is_found_outside_its_split_and_sample(two_photo_bench: Path, tmp_path: Path) -> None:
    manifest = pd.read_parquet(two_photo_bench / "manifest.parquet")
    originals = manifest[~manifest["has_defect"]].set_index("source")["image"]
    sets = load_sets(_config(two_photo_bench, tmp_path, "--limit", "3"))
    rows = sets[0].rows
    assert len(rows) == 3 and list(rows["reference"]) == list(rows["source"].map(originals))


def test_images_without_a_pristine_original_get_no_ssim_score(bench: Path, tmp_path: Path) -> None:
    # A public IQA set: has_defect unknown, so no row is anybody's original.
    public = pd.read_parquet(bench / "manifest.parquet").assign(has_defect=None)
    folder = tmp_path / "public"
    folder.mkdir()
    for image in public["image"]:
        (folder / image).parent.mkdir(parents=True, exist_ok=True)
        (folder / image).symlink_to(bench / image)
    public.to_parquet(folder / "manifest.parquet")
    cfg = _config(folder, tmp_path / "out", "--baselines", "[ssim]", "--max-new-tokens", "200", "--curves", "[]",
                  "--crop-bias-images", "0", "--repeat-images", "0", "--bokeh-limit", "0")
    result = evaluate(cfg, backend=ScriptedBackend())
    assert result.metrics["public.ssim.outcome.no_reference"] == 8 and result.metrics["public.ssim.srcc"] is None
