"""The Q-Probe model as an MLflow model: ``mlflow.pyfunc.load_model(URI).predict([photo, ...])``.

:func:`qprobe.tracking.register_model` logs a checkpoint folder with this file as its code (MLflow's
models-from-code: the file is saved with the model and run at load time; nothing is pickled). The
loaded model scores photos the ``qprobe score`` way (global look, crops, answer) and returns one
dict per photo, ``Trace.to_dict()``: score, defect boxes, every turn, token counts.
``load_model(URI).unwrap_python_model().backend`` holds the transformers model and processor.

Why a pyfunc and not ``mlflow.transformers``: that flavour saves a pipeline or components and loads
them back through ``Auto*`` classes. Qwen2.5-VL's auto processor is the torchvision one (Q-Probe runs
the PIL one, without torchvision) and would carry the checkpoint's chat template instead of the
protocol's, and no transformers pipeline runs the crop-tool loop. Here the checkpoint folder is the
artifact as the pipeline wrote it (weights, tokenizer, image processor config, ``chat_template.jinja``,
``qprobe-protocol.json``) and loads through :mod:`qprobe.models.factory`, as every stage loads it.
Loading needs the ``qprobe`` package importable (the project installed: ``pip install -e .``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from qprobe.tracking import CHECKPOINT_ARTIFACT


class QProbeModel(PythonModel):
    """Scores photos with the checkpoint under the protocol limits it was trained with."""

    def load_context(self, context: Any) -> None:
        from qprobe.agent.backends import TransformersBackend
        from qprobe.agent.protocol_config import LIMITS_FILE, ProtocolLimits

        folder = Path(context.artifacts[CHECKPOINT_ARTIFACT])
        limits = folder / LIMITS_FILE
        # A model trained here records its pixel budgets; a plain checkpoint runs at the paper's.
        self.limits = ProtocolLimits(**json.loads(limits.read_text())) if limits.is_file() else ProtocolLimits()
        self.backend = TransformersBackend(str(folder))

    # A DataFrame hint, not list[str]: MLflow would infer the signature from a list hint and drop the
    # params schema that register_model gives (max_new_tokens).
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """One JSON object per photo path (``model_input``'s one column; a list of paths becomes that)."""
        from qprobe.agent.rollout import RolloutConfig, rollout
        from qprobe.io import load_image

        settings = RolloutConfig.under(self.limits, max_new_tokens=int((params or {}).get("max_new_tokens", 1024)))
        return [json.dumps(rollout(self.backend, load_image(path), settings, source=str(path)).to_dict())
                for path in model_input.iloc[:, 0]]


mlflow.models.set_model(QProbeModel())
