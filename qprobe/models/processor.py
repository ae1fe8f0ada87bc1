"""Qwen2.5-VL's processor for images only, loadable with ``AutoProcessor``.

The stock ``Qwen2_5_VLProcessor`` also builds a video processor, which needs torchvision; the PyPI
torchvision is a CUDA build that fails to import on CPU machines and then breaks transformers' image
processing (docs/architecture.md, Stack facts). Q-Probe feeds images only, so this subclass takes just the image
processor (``Qwen2VLImageProcessorPil``: PIL, no torchvision), the tokenizer and the chat template;
everything else, the expansion of ``<|image_pad|>`` to one token per merged patch included, is the
stock processor's. Importing this module registers it with ``AutoProcessor`` for Qwen2.5-VL configs.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoProcessor, Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


class QProbeProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        # Skip Qwen2_5_VLProcessor.__init__, which insists on a video processor; ProcessorMixin
        # reads the sub-processors from this signature.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


AutoProcessor.register(Qwen2_5_VLConfig, QProbeProcessor, exist_ok=True)
