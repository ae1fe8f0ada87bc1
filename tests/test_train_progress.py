"""The training stages' status line: step/total, loss or reward, seconds per step, time left."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import TrainerState

from qprobe.train.progress import StatusLineCallback, status_every, status_line


def test_status_line_reads_a_trainer_state() -> None:
    state = TrainerState(global_step=10, max_steps=500,
                         log_history=[{"reward": 0.25, "step": 5}, {"loss": 2.31042, "step": 10}])
    line = status_line("stage2", state.log_history, state.global_step, state.max_steps, 1.8)
    assert line == "stage2: step 10/500, loss 2.31, 1.80 s/step, 14m42s left"
    # GRPO logs a reward; a figure logged before this step says which step it is from.
    grpo = status_line("stage3", [{"reward": 0.5, "step": 4}], 6, 4000, 2.0)
    assert grpo == "stage3: step 6/4000, reward 0.5 (step 4), 2.00 s/step, 2h13m left"
    assert status_line("stage1", [], 1, 6, 0.5) == "stage1: step 1/6, 0.50 s/step, 0m02s left"


def test_status_every_n_steps_or_about_twenty_lines_a_run() -> None:
    assert [status_every(0, n) for n in (6, 20, 21, 500)] == [1, 1, 2, 25]
    assert status_every(7, 500) == 7


class _Nearest:
    """A dataset of one-number rows whose mean a single weight learns: a Trainer with nothing else in it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        import torch

        return {"x": torch.tensor([float(i)])}


@pytest.mark.parametrize("status_steps, steps", [(0, [1, 2, 3, 4, 5]), (2, [2, 4, 5])])
def test_the_callback_in_a_real_trainer(tmp_path: Path, capsys: pytest.CaptureFixture[str], status_steps: int,
                                        steps: list[int]) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    class Weight(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> dict:
            return {"loss": ((self.w - x) ** 2).mean()}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, logging_steps=2, per_device_train_batch_size=2,
                             use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=Weight(), args=args, train_dataset=_Nearest())
    trainer.add_callback(StatusLineCallback("tiny", status_steps))
    trainer.train()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tiny: ")]
    assert [int(re.match(r"tiny: step (\d+)/5", line).group(1)) for line in lines] == steps
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    assert sorted(losses) == [2, 4]
    for step, line in zip(steps, lines, strict=True):
        # A logging step shows its own loss; a step between, the last one logged, with its step.
        logged = max((s for s in losses if s <= step), default=None)
        expected = f"tiny: step {step}/5"
        if logged is not None:
            expected += f", loss {losses[logged]:.4g}" + ("" if logged == step else f" (step {logged})")
        assert line.startswith(expected + ", ")
        assert re.fullmatch(r"\d+\.\d\d s/step, \dm\d\ds left", line[len(expected) + 2:]), line
