"""Load a Qwen2.5-VL checkpoint folder, real or tiny, through one path.

Whatever the checkpoint, Q-Probe runs it with its own pieces: the image-only
:class:`~qprobe.models.processor.QProbeProcessor` (PIL image processor, no torchvision), the
package's chat template (:func:`qprobe.agent.protocol.chat_template`) and the response template
trl's GRPOTrainer parses tool calls with. So ``Qwen/Qwen2.5-VL-7B-Instruct`` downloaded to a folder
and ``models/base`` from ``qprobe model init-tiny`` load, prompt and parse the same way.

A folder that is not a Qwen2.5-VL checkpoint is a :class:`~qprobe.errors.QProbeError` naming the
folder and what is missing, checked before anything heavy is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qprobe.errors import QProbeError

MODEL_TYPE = "qwen2_5_vl"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "vocab.json")


def is_endpoint(spec: str) -> bool:
    """Whether a ``--model`` value names an OpenAI-compatible server rather than a folder."""
    return spec.startswith(("http://", "https://"))


def check_checkpoint(path: str | Path) -> Path:
    """``path`` as a Path if it holds a Qwen2.5-VL checkpoint, else :class:`QProbeError` saying why."""
    path = Path(path)
    if not path.exists():
        raise QProbeError(f"{path}: no such model folder (run `qprobe model init-tiny --out {path}` for the tiny one)")
    if not path.is_dir():
        raise QProbeError(f"{path}: not a folder; a model is a checkpoint folder or an http(s):// endpoint")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise QProbeError(f"{path}: not a Qwen2.5-VL checkpoint (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise QProbeError(f"{config_file}: not valid JSON ({exc})") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != MODEL_TYPE:
        raise QProbeError(f"{path}: not a Qwen2.5-VL checkpoint (model_type {model_type!r}, expected {MODEL_TYPE!r})")
    if not any((path / name).is_file() for name in _WEIGHTS):
        raise QProbeError(f"{path}: Qwen2.5-VL config but no weights ({' or '.join(_WEIGHTS[::2])})")
    if not any((path / name).is_file() for name in _TOKENIZER):
        raise QProbeError(f"{path}: Qwen2.5-VL checkpoint without a tokenizer (tokenizer.json)")
    return path


def apply_protocol(processor: Any) -> Any:
    """Give ``processor`` (and its tokenizer) the package's chat template and response template."""
    from qprobe.agent.protocol import RESPONSE_TEMPLATE, chat_template

    template = chat_template()
    processor.chat_template = template
    processor.tokenizer.chat_template = template
    processor.tokenizer.response_template = RESPONSE_TEMPLATE
    return processor


def load_processor(path: str | Path) -> Any:
    """The image-only processor of a checkpoint folder, with the protocol's templates."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qprobe.models.processor import QProbeProcessor

    path = check_checkpoint(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Explicitly the PIL class: the checkpoint may name the torchvision one.
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise QProbeError(f"{path}: cannot load the tokenizer or image processor ({exc})") from exc
    return apply_protocol(QProbeProcessor(image_processor=image_processor, tokenizer=tokenizer))


def load_model(path: str | Path, device: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, processor)`` from a Qwen2.5-VL checkpoint folder, the model in eval mode.

    By default the model goes to CUDA in bfloat16 where a GPU is visible, else to the CPU in float32
    (bfloat16 matmuls on CPU are slow and lossy for no memory the tiny model needs).
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = check_checkpoint(path)
    processor = load_processor(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=device)
    except (OSError, ValueError, RuntimeError) as exc:
        raise QProbeError(f"{path}: cannot load the Qwen2.5-VL weights ({exc})") from exc
    model.eval()
    return model, processor
