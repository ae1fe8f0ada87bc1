"""What a Q-Probe pass costs in tokens, against one pass at full resolution.

Qwen2.5-VL turns an image into one token per merged 28x28 patch after ``smart_resize``:
``tokens = (h / 28) * (w / 28)`` with ``h, w`` the resized sides (multiples of 28) for the given
``max_pixels``. The agentic pass pays for the global view plus each crop; the alternative it
replaces is one pass over the photo at the model's full-resolution budget (native pixels, capped at
Qwen2.5-VL's 12,845,056-pixel processor maximum). The ratio of the two is the saving the paper
argues for; text tokens (prompts, reasoning, tool turns) are counted beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qprobe.agent.crop import MODEL_MAX_PIXELS, PATCH, budget_size


def visual_tokens(size: tuple[int, int], max_pixels: int | None = None) -> int:
    """Visual tokens of an image of ``size`` (``(width, height)``); resized to ``max_pixels`` first if given."""
    width, height = budget_size(size, max_pixels) if max_pixels is not None else size
    return (width // PATCH) * (height // PATCH)


def full_resolution_tokens(size: tuple[int, int], max_pixels: int = MODEL_MAX_PIXELS) -> int:
    """Visual tokens of a single pass over the photo at the model's full-resolution budget."""
    return visual_tokens(size, max_pixels)


@dataclass
class Cost:
    """Token accounting of one scored photo."""

    global_visual_tokens: int
    crop_visual_tokens: list[int] = field(default_factory=list)
    text_tokens: int = 0  # the final conversation's tokens that are not image tokens
    generated_tokens: int = 0  # what the model wrote, all turns together
    full_resolution_visual_tokens: int = 0

    @property
    def agentic_visual_tokens(self) -> int:
        return self.global_visual_tokens + sum(self.crop_visual_tokens)

    @property
    def visual_ratio(self) -> float:
        """Agentic visual tokens over full-resolution ones (below 1: the agent is cheaper)."""
        return self.agentic_visual_tokens / max(1, self.full_resolution_visual_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agentic_visual_tokens": self.agentic_visual_tokens,
                "visual_ratio": round(self.visual_ratio, 4)}
