"""Resuming restores the state: a run SIGKILLed after a checkpoint and re-run ends where an uninterrupted one does.

Each case runs one stage config three times as `qprobe train` subprocesses on one torch thread: to the end;
killed with a real SIGKILL once a checkpoint is complete; re-run, which resumes. The two final models must
hold the same weights and the steps after the resume point the same logged figures, which they do only if
weights, optimizer, scheduler, RNG and data position all came back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from fixtures_train import bench_and_trajectories, latest_run, repo_protocol, train, train_killed
from safetensors.torch import load_file, save_file

from qprobe.errors import QProbeError
from qprobe.models.factory import load_model
from qprobe.train.checkpoints import last_checkpoint, load_checkpoint_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bench of 14 photos and its trajectories (stage 2 trains on the 6 Probe-CoT samples)."""
    return bench_and_trajectories(tmp_path_factory.mktemp("data"), num_images=14, sft_size=6, rl_size=4,
                                  pristine_fraction=0.2)


# Stage 2's embedded default shrunk to seconds: 6 steps, a checkpoint every 2 (the resume point), more
# steps than one epoch of its 6 samples, so the resumed run also crosses an epoch. The GRPO stages are not
# here: from the tiny random model (and the taught one) every rollout earns the same reward, so every
# advantage is 0 and GRPO never changes a weight; equal final weights would prove nothing.
SFT = {"dataset": "traj/sft", "heldout_bench": "bench", "max_steps": 6, "warmup_steps": 2,
       "per_device_train_batch_size": 2, "heldout_samples": 1, "heldout_max_new_tokens": 8, "logging_steps": 1}
CASES = {
    "stage2": ("stage2", SFT, ["loss", "learning_rate", "grad_norm"]),
    "stage2-lora": ("stage2", {**SFT, "lora": True}, ["loss", "learning_rate", "grad_norm"]),
}


def write_params(folder: Path, stage: str, model: Path, data: Path, overrides: dict[str, Any]) -> Path:
    section = yaml.safe_load((ROOT / "params.yaml").read_text())[stage]
    section.update(overrides, model=str(model), out=str(folder / "model"), metrics=str(folder / "m.json"),
                   output_dir=str(folder / "checkpoints"), save_steps=2, seed=0)
    for key in ("dataset", "heldout_bench"):
        if key in overrides:
            section[key] = str(data / overrides[key])
    folder.mkdir(parents=True, exist_ok=True)
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump({"protocol": repo_protocol(), stage: section}))
    return params


def history(run: Any, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, key)}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_killed_run_resumes_to_the_uninterrupted_result(case: str, tmp_path: Path, tiny_model_dir: Path,
                                                        data: Path) -> None:
    stage, overrides, keys = CASES[case]
    whole = write_params(tmp_path / "whole", stage, tiny_model_dir, data, overrides)
    train(stage, whole, tmp_path / "whole.log")
    uninterrupted = latest_run()

    killed = write_params(tmp_path / "killed", stage, tiny_model_dir, data, overrides)
    train_killed(stage, killed, tmp_path / "killed" / "checkpoints", tmp_path / "killed.log")
    assert not (tmp_path / "killed" / "model").exists()
    train(stage, killed, tmp_path / "resumed.log")
    resumed = latest_run()

    checkpoint = Path(resumed.data.tags["qprobe.resumed_from"])
    resumed_at = int(checkpoint.name.removeprefix("checkpoint-"))
    steps = overrides["max_steps"]
    assert 0 < resumed_at < steps
    for key in keys:
        before, after = history(uninterrupted, key), history(resumed, key)
        assert sorted(after) == list(range(resumed_at + 1, steps + 1)), key
        assert after == pytest.approx({s: before[s] for s in after}, rel=1e-5, abs=1e-7), key

    expected, got = load_file(tmp_path / "whole" / "model" / "model.safetensors"), \
        load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.allclose(expected[k], got[k])] == []
    # The weights did change: equal final models from a run that never trained would prove nothing.
    start = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.allclose(start[k], got[k]) for k in start if "visual" not in k)

    # The curve file (the stage's DVC plot) of the resumed run covers every step, as the uninterrupted one's.
    curves = {name: pd.read_csv(tmp_path / name / "m_curves.csv") for name in ("whole", "killed")}
    assert list(curves["killed"]["step"]) == list(range(1, overrides["max_steps"] + 1))
    for key in keys:
        assert curves["killed"][key].to_numpy() == pytest.approx(curves["whole"][key].to_numpy(), rel=1e-5, abs=1e-7)


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The tiny model, perturbed, saved as the Trainer saves a checkpoint (save_pretrained: legacy key names)."""
    model, processor = load_model(tiny_model_dir, device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5)
    folder = tmp_path / "checkpoint-3"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_checkpoint_weights_load_under_the_models_own_names(checkpoint: Path, tiny_model_dir: Path) -> None:
    saved = load_file(checkpoint / "model.safetensors")
    assert any(k.startswith("model.layers.") for k in saved)  # legacy names: the Trainer's own loader misses them
    model, _ = load_model(tiny_model_dir, device="cpu")
    params = dict(model.named_parameters())
    load_checkpoint_weights(model, checkpoint)
    expected, _ = load_model(checkpoint, device="cpu")
    assert all(torch.equal(t, expected.state_dict()[k]) for k, t in model.state_dict().items())
    assert all(params[n] is p for n, p in model.named_parameters())  # in place: an optimizer's refs stay valid


@pytest.mark.parametrize(("change", "message"), [
    (lambda w: {k.replace(".mlp.", ".ffn."): t for k, t in w.items()}, r"missing \(first .*mlp.*unknown to the model"),
    (lambda w: {k: t for k, t in w.items() if "q_proj" not in k}, r"of the model's weights missing \(first .*q_proj"),
])
def test_checkpoint_that_does_not_match_is_an_error(checkpoint: Path, tiny_model_dir: Path, change: Any,
                                                     message: str) -> None:
    weights = load_file(checkpoint / "model.safetensors")
    save_file(change(weights), checkpoint / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_model(tiny_model_dir, device="cpu")
    with pytest.raises(QProbeError, match=rf"^{checkpoint}: its weights do not match the model: .*{message}"):
        load_checkpoint_weights(model, checkpoint)


def test_last_checkpoint_skips_one_cut_short(tmp_path: Path) -> None:
    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert last_checkpoint(tmp_path / "none") is None
