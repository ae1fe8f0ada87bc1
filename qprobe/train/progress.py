"""One status line every few training steps: step/total, the loss or reward, seconds per step, time left.

trl's progress bar says how far a run is; these lines say how it goes, in a form that reads the same
in a terminal, a CI log and the Prefect UI. Every stage adds :class:`StatusLineCallback`
(:func:`qprobe.train.common.run_stage`).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from transformers import TrainerCallback

# The figures a status line shows, the first one a log entry has: SFT logs a loss, GRPO a reward.
FIGURES = ("loss", "reward")
# With status_steps 0, about this many lines in a run.
LINES_PER_RUN = 20


def status_every(status_steps: int, max_steps: int) -> int:
    """Steps between two status lines: ``status_steps``, or for 0 about :data:`LINES_PER_RUN` in the run."""
    return status_steps if status_steps > 0 else max(1, math.ceil(max_steps / LINES_PER_RUN))


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def status_line(stage: str, log_history: list[dict[str, Any]], step: int, max_steps: int,
                seconds_per_step: float) -> str:
    """``stage2: step 10/500, loss 2.3104, 1.84 s/step, 15m01s left`` from a trainer's state.

    The figure is the latest the trainer logged (``log_history``), so it may be a few steps old when
    logging is sparser than the status lines; its step is then said.
    """
    parts = [f"{stage}: step {step}/{max_steps}"]
    for entry in reversed(log_history):
        name = next((key for key in FIGURES if key in entry), None)
        if name is not None:
            at = entry.get("step", step)
            parts.append(f"{name} {entry[name]:.4g}" + (f" (step {at})" if at != step else ""))
            break
    parts += [f"{seconds_per_step:.2f} s/step", f"{_duration((max_steps - step) * seconds_per_step)} left"]
    return ", ".join(parts)


class StatusLineCallback(TrainerCallback):
    """Prints :func:`status_line` every ``status_steps`` steps (see :func:`status_every`), and after the last.

    On a logging step the line waits for that step's log, so it shows the step's own loss or reward.
    Seconds per step average the steps this run made (a resumed run's earlier steps took no time here).
    """

    def __init__(self, stage: str, status_steps: int) -> None:
        self.stage = stage
        self.status_steps = status_steps
        self.every = 1
        self._start = (0.0, 0)  # when this run began, at which step
        self._waiting = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.every = status_every(self.status_steps, state.max_steps)
        self._start = (time.perf_counter(), state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        if not state.is_world_process_zero or not (step % self.every == 0 or step >= state.max_steps):
            return
        if control.should_log:  # the trainer logs this step right after: wait for its figures
            self._waiting = True
        else:
            self._print(state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if self._waiting:
            self._waiting = False
            self._print(state)

    def _print(self, state: Any) -> None:
        from tqdm import tqdm

        began, first = self._start
        seconds_per_step = (time.perf_counter() - began) / max(1, state.global_step - first)
        # Above trl's progress bar, on its stream: a plain print would run into the bar's line.
        tqdm.write(status_line(self.stage, state.log_history, state.global_step, state.max_steps,
                               seconds_per_step), file=sys.stderr)
