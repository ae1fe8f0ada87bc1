"""The protocol's limits, set once for every stage: the ``protocol:`` section of ``params.yaml``.

The global-view, crop and low-resolution pixel budgets and the crop budget are facts of the protocol,
not of one stage: the trajectories stage cuts its images and states the crop budget in its prompts
with them, the training stages check their data and map boxes with them, and ``score`` and
``evaluate`` must show a model the images it was trained on. Every stage's config takes one
:class:`ProtocolLimits` (:func:`qprobe.config.parse_config` fills a field that names its section from
that section, with a flag per limit), so there is one value to change (docs/architecture.md, Where
each kind of change goes).

A model run on other budgets than it was trained on sees images of another size and points with
another geometry, silently. So the limits travel with what was made under them: ``qprobe
trajectories`` writes them into each set it builds and every training stage into the model it saves
(:data:`LIMITS_FILE`), and a stage that loads a set or a model checks them (:func:`check_limits`).

A module of its own, free of torch and transformers, so that ``qprobe score --help`` stays light.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from qprobe.errors import QProbeError

SECTION = "protocol"
LIMITS_FILE = "qprobe-protocol.json"  # in each trajectory set and each trained model's folder
# The paper's Qwen2.5-VL-7B budget for the global view and for each crop: 1280 merged 28 px patches.
PAPER_MAX_PIXELS = 1280 * 28 * 28  # 1,003,520
# Metadata of the field by which a stage's config takes the limits:
# ``protocol: ProtocolLimits = field(default_factory=ProtocolLimits, metadata=PROTOCOL_FIELD)``.
PROTOCOL_FIELD = {"help": f"the protocol's limits: the {SECTION!r} section (one flag per limit)", "section": SECTION}


@dataclass(frozen=True)
class ProtocolLimits:
    """The protocol's pixel budgets (``smart_resize`` max_pixels) and crop budget (defaults: the paper's 7B)."""

    global_max_pixels: int = field(default=PAPER_MAX_PIXELS, metadata={
        "help": "pixel budget of the global view (smart_resize; 1280*28*28 = 1003520 for the paper's 7B)"})
    crop_max_pixels: int = field(default=PAPER_MAX_PIXELS, metadata={"help": "pixel budget of each crop"})
    low_res_max_pixels: int = field(default=PAPER_MAX_PIXELS, metadata={
        "help": "size of a low-resolution photo: the whole photo at this budget is its own global view "
                "(stage 1's views, the low-resolution Probe-CoT samples, stage 2's downscaled check)"})
    max_crops: int = field(default=3, metadata={
        "help": "crop calls allowed per photo, the budget the prompt states; one more gets the tool's refusal"})

    # What a model's images depend on. The crop budget is stated in each prompt, so a run may lower it
    # (``score --max-crops 1``, evaluate's no-tool baseline); a set's prompts fix it.
    BUDGETS: ClassVar[tuple[str, ...]] = ("global_max_pixels", "crop_max_pixels", "low_res_max_pixels")

    def __post_init__(self) -> None:
        for name in self.BUDGETS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_crops < 0:
            raise ValueError(f"max_crops must be at least 0, got {self.max_crops}")


def write_limits(folder: str | Path, limits: ProtocolLimits) -> None:
    """Record ``limits`` in ``folder`` (a trajectory set, a saved model): what it was made under."""
    from qprobe.io import write_json_atomic

    write_json_atomic(Path(folder) / LIMITS_FILE, dataclasses.asdict(limits))


def check_limits(folder: str | Path, limits: ProtocolLimits, names: Collection[str] | None = None) -> None:
    """``folder``'s recorded limits (those in ``names``; default all) equal ``limits``, or :class:`QProbeError`.

    A folder without the file is accepted: a plain Hugging Face checkpoint (Qwen2.5-VL-7B-Instruct), a
    model id or an endpoint URL (no folder at all) records nothing, and its budgets are the run's to choose.
    """
    path = Path(folder) / LIMITS_FILE
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise QProbeError(f"{path}: unreadable protocol limits ({exc})") from exc
    if not isinstance(stored, dict):
        raise QProbeError(f"{path}: expected a mapping of protocol limits, got {type(stored).__name__}")
    for name in names if names is not None else [f.name for f in dataclasses.fields(limits)]:
        if name in stored and stored[name] != getattr(limits, name):
            raise QProbeError(f"{folder}: made with {SECTION}.{name} {stored[name]}, but this run has "
                              f"{getattr(limits, name)}; run with the same {SECTION} limits or rebuild it")
