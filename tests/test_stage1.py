"""Stage 1 through trl's real GRPOTrainer on the tiny model: outputs, MLflow, a killed run resumed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from fixtures_train import KilledAfterStep2, bench_and_trajectories, latest_run, repo_protocol

from qprobe.agent.protocol_config import LIMITS_FILE, ProtocolLimits, write_limits
from qprobe.errors import QProbeError
from qprobe.io import content_hash
from qprobe.models.factory import load_model
from qprobe.train import checkpoints, common, stage1


@pytest.fixture(scope="module")
def stage1_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = bench_and_trajectories(tmp_path_factory.mktemp("data"), num_images=7, sft_size=3, rl_size=1)
    return root / "traj" / "stage1"


def run(tmp: Path, model: Path, dataset: Path, **overrides: Any) -> dict[str, Any]:
    """``qprobe train stage1`` on the embedded default, shrunk to seconds, through its own params file."""
    section = yaml.safe_load(Path("params.yaml").read_text())["stage1"]
    section.update(model=str(model), dataset=str(dataset), out=str(tmp / "model"), metrics=str(tmp / "m.json"),
                   output_dir=str(tmp / "checkpoints"), num_generations=2, per_device_train_batch_size=4,
                   max_completion_length=8, max_steps=4, save_steps=1)
    section.update(overrides)
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({"protocol": repo_protocol(), "stage1": section}))
    assert stage1.main(["--params", str(params)]) == 0
    return json.loads((tmp / "m.json").read_text())


@pytest.mark.slow
def test_grpo_run_is_killed_resumes_and_saves(tmp_path: Path, tiny_model_dir: Path, stage1_set: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(common, "MlflowLogCallback", KilledAfterStep2)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, tiny_model_dir, stage1_set)
    (run_dir,) = list((tmp_path / "checkpoints").iterdir())
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "model").exists() and latest_run().info.status == "KILLED"  # a Ctrl-C: killed, not failed

    # The rerun continues from checkpoint-2: its run logs steps 3 and 4 only.
    metrics = run(tmp_path, tiny_model_dir, stage1_set)
    assert metrics["global_step"] == 4
    assert {"reward", "rewards/thurstone/mean", "rewards/format_reward/mean", "kl", "train_runtime"} <= set(metrics)
    resumed = latest_run()
    assert resumed.data.tags["qprobe.resumed_from"] == str(run_dir / "checkpoint-2")
    history = mlflow.MlflowClient().get_metric_history(resumed.info.run_id, "rewards/thurstone/mean")
    assert [m.step for m in history] == [3, 4]
    assert resumed.data.tags["qprobe.model.md5"] == content_hash(tmp_path / "model")
    assert resumed.data.tags["qprobe.model.path"] == str(tmp_path / "model")
    assert json.loads((tmp_path / "model" / LIMITS_FILE).read_text()) == repo_protocol()
    assert resumed.data.params["num_generations"] == "2"
    _, processor = load_model(tmp_path / "model", device="cpu")
    assert processor.chat_template and (tmp_path / "model" / "chat_template.jinja").is_file()
    assert not (tmp_path / "model" / "training_args.bin").exists()
    # A finished run leaves nothing to resume: the next one starts afresh.
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_model_trained_on_other_budgets_is_refused(tmp_path: Path, tiny_model_dir: Path,
                                                    stage1_set: Path) -> None:
    import shutil

    model = tmp_path / "paper-model"
    shutil.copytree(tiny_model_dir, model)
    write_limits(model, ProtocolLimits())  # trained at the paper's budgets; this run's are the embedded default's
    with pytest.raises(QProbeError, match=rf"^{model}: made with protocol.global_max_pixels 1003520, but this run "
                                          r"has 50176;"):
        run(tmp_path, model, stage1_set)
    assert not (tmp_path / "checkpoints").exists()  # refused before training


def test_fingerprint_ignores_how_long_and_what_is_logged() -> None:
    def config(**changes: Any) -> stage1.Stage1Config:
        return stage1.Stage1Config(**{"use_cpu": True, "bf16": False, "activation_checkpointing": False,
                                      "num_generations": 2,
                                      "per_device_train_batch_size": 4, **changes})

    digests = {"model": "m", "dataset": "d"}
    base = checkpoints.fingerprint(config(), digests)
    same = [config(max_steps=9, save_steps=3, logging_steps=2, out="elsewhere", resume="never")]
    other = [config(learning_rate=1e-3), config(num_generations=4, per_device_train_batch_size=8), config(rewards={"thurstone": 2.0})]
    assert {checkpoints.fingerprint(c, digests) for c in same} == {base}
    assert checkpoints.fingerprint(config(), {**digests, "dataset": "e"}) != base
    assert all(checkpoints.fingerprint(c, digests) != base for c in other)
