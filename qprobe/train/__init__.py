"""Training: stage 1 (GRPO, Thurstone ranking), stage 2 (hybrid-resolution SFT), stage 3 (agentic GRPO) on trl.

Each stage is one module with a ``main`` (``qprobe train stageN``); what they share (model loading,
LoRA, MLflow, the final save) is :mod:`qprobe.train.common`, and its checkpoints and resuming are
:mod:`qprobe.train.checkpoints`.
"""
