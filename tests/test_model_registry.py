"""The final model in MLflow: a pyfunc loadable by the README's one-liner that generates, one registered
version per pipeline run, and an experiment that opens in MLflow's model-training view."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from flows.pipeline import FINAL_MODEL, REPORT, _log_model_and_report
from qprobe import tracking
from qprobe.agent.protocol import chat_template


@pytest.fixture(scope="module")
def registered(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny model registered as ``qprobe`` with the alias ``champion``: (repository root, tracking URI)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        tracking.register_model(tiny_model_dir, alias="champion", tags={"pipeline_run": "abc"}, root=root)
    return root, uri


def test_the_one_liner_loads_the_model_and_it_generates(registered: tuple[Path, str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered[1])
    mlflow.set_tracking_uri(registered[1])
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(photo)

    model = mlflow.pyfunc.load_model("models:/qprobe@champion")  # README, "Load a model"
    [result] = [json.loads(r) for r in model.predict([str(photo)], params={"max_new_tokens": 6})]
    assert result["image"] == str(photo) and result["tokens"]["generated_tokens"] == 6
    assert result["turns"][0]["role"] == "assistant" and result["turns"][0]["completion_tokens"] == 6
    # It runs with the protocol's chat template, which the logged checkpoint carries with its processor.
    processor = model.unwrap_python_model().backend.processor
    assert processor.chat_template == chat_template()
    version = tracking.model_version("champion")
    folder = tracking.download_version(version, tmp_path / "dl")
    assert (folder / "chat_template.jinja").read_text() == chat_template()
    assert {"processor_config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    assert version.tags["pipeline_run"] == "abc" and version.tags["model.md5"]


def test_each_pipeline_run_registers_a_version_and_links_the_report(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / FINAL_MODEL)
    (tmp_path / REPORT).parent.mkdir(parents=True)
    (tmp_path / REPORT).write_text("<html>report</html>")
    versions = []
    for _ in range(2):
        with tracking.stage_run("pipeline", root=tmp_path) as parent:
            versions.append(_log_model_and_report(tmp_path, ["stage2", "stage3"], parent.info.run_id))
        run = mlflow.get_run(parent.info.run_id)
        assert run.data.tags["model.version"] == f"qprobe/{versions[-1]}"
        assert mlflow.MlflowClient().get_model_version(tracking.MODEL_NAME, versions[-1]).tags["pipeline_run"] == parent.info.run_id
        assert [a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)] == ["report.html"]
    assert versions == ["1", "2"]  # one registered model, a version per run
    with tracking.stage_run("pipeline", root=tmp_path) as parent:  # a run without stage 3 registers nothing
        assert _log_model_and_report(tmp_path, ["bench"], parent.info.run_id) is None


def test_the_experiment_opens_in_the_model_training_view(tmp_path: Path) -> None:
    with tracking.stage_run("bench", root=tmp_path):
        pass
    experiment = mlflow.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # An experiment made without it (plain MLflow, an older Q-Probe) gets the tag on the next run.
    mlflow.set_experiment_tag("mlflow.experimentKind", "genai_development")
    with tracking.stage_run("bench", root=tmp_path):
        pass
    assert mlflow.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT).tags["mlflow.experimentKind"] == (
        "custom_model_development")


def test_registering_outside_a_terminal_prints_no_progress_bar(tiny_model_dir: Path, tmp_path: Path,
                                                                capfd: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The flow's output in CI or a log file: MLflow's artifact bars would be carriage-return frames there.
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    capfd.readouterr()  # the fixtures' own output
    tracking.register_model(tiny_model_dir, root=tmp_path)
    out, err = capfd.readouterr()
    assert "\r" not in out + err and "artifacts" not in (out + err).lower(), (out + err)[-300:]
