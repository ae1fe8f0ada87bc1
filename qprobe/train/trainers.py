"""The stages' trainers: trl's, resuming exactly and with trl's known bugs worked around.

* :class:`SFTStageTrainer` (stage 2) and :class:`GRPOStageTrainer` (stages 1 and 3) load a checkpoint's
  weights through :class:`~qprobe.train.checkpoints.CheckpointLoading`; transformers' own loader
  matches none of a Qwen2.5-VL's keys and only warns.
* :class:`GRPOStageTrainer` hands trl's tool loop its image fields as tensors
  (:func:`tensor_image_fields`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trl import GRPOTrainer, SFTTrainer

from qprobe.train.checkpoints import CheckpointLoading


class SFTStageTrainer(CheckpointLoading, SFTTrainer):
    """trl's SFTTrainer, resuming exactly (:class:`CheckpointLoading`)."""


# The processor's per-image fields: trl splits and re-joins them by image when it filters a tool loop's batch.
IMAGE_FIELDS = ("pixel_values", "image_grid_thw")


def tensor_image_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with the image fields as tensors, as trl's ``split_pixel_values_by_grid`` needs them.

    With ``environment_factory`` trl 1.16 merges each prompt's processor output into a list of numpy rows
    (Qwen2.5-VL's processor returns numpy arrays), and splits that list as a tensor in the tool loop's
    branch for a turn whose tools returned no image (every crop of the batch refused): ``'list' object has
    no attribute 'prod'`` ended a stage-3 run at step 17 of 20.
    """
    import numpy as np
    import torch

    return {k: torch.as_tensor(np.stack(v)) if k in IMAGE_FIELDS and isinstance(v, list) and v else v
            for k, v in fields.items()}


class GRPOStageTrainer(CheckpointLoading, GRPOTrainer):
    """trl's GRPOTrainer, resuming exactly (:class:`CheckpointLoading`), its tool loop fed tensors
    (:func:`tensor_image_fields`)."""

    def _tool_call_loop(self, prompts: Any, prompt_ids: Any, completion_ids: Any, completions: Any,
                        logprobs: Any, images: Any, multimodal_fields: Any) -> Any:
        return super()._tool_call_loop(prompts, prompt_ids, completion_ids, completions, logprobs, images,
                                       tensor_image_fields(multimodal_fields))
