"""What every training stage shares: inputs, model and processor, LoRA, MLflow, checkpoints, the final save.

A stage module declares its config as a dataclass that extends trl's own (``GRPOConfig``,
``SFTConfig``) with :class:`StageArgs`, builds its trainer, and hands both to :func:`run_stage`, which
does the rest the same way for every stage:

* **Inputs.** ``model`` is a Qwen2.5-VL checkpoint folder (``models/base`` from ``qprobe model
  init-tiny``, or the previous stage's output) or a Hugging Face id, resolved in the local Hugging Face
  cache (the CLI runs offline: download first). The processor is the package's
  (:func:`qprobe.models.factory.load_processor`: image-only, the protocol's chat template and response
  parser), with Qwen2.5-VL's full pixel range, so that the images, which earlier stages already sized
  to their budgets (checked on the data), reach the model unresized: every box in the text is in
  pixels of exactly those images. The budgets are the protocol's (``protocol:``,
  :class:`~qprobe.agent.protocol_config.ProtocolLimits`); the set and the starting model must have been
  made under the same ones (their recorded limits are checked), and the saved model records them.
* **Model.** trl loads it from the path (``model_init_kwargs`` set dtype and attention), so ZeRO-3 and
  device placement follow trl's rules. ``lora`` trains adapters instead of the full model;
  ``freeze_vision`` keeps the vision tower as it is (no gradients, and no adapters in it).
* **Checkpoints.** Every ``save_steps`` steps into ``output_dir/<fingerprint>``; ``resume: auto``
  continues a killed run exactly, and a finished run leaves none (:mod:`qprobe.train.checkpoints`).
* **MLflow.** One run per stage (:func:`qprobe.tracking.stage_run`, nested under the pipeline's run),
  opened by the main process only: params (Q-Probe's fields, and trl's where they differ from trl's
  defaults: :meth:`StageArgs.run_params`), input datasets with their content hashes, trl's step
  metrics (:class:`MlflowLogCallback`; trl's own ``report_to: mlflow`` would open a second run), the
  final metrics, and the final model as a reference to the DVC output: its path and content hash as
  tags, never a copy.
* **Progress.** A status line every ``status_steps`` steps: step/total, loss or reward, seconds per
  step, time left (:mod:`qprobe.train.progress`).
* **Output.** The final model (LoRA merged into the base) with the processor, chat template and the
  protocol's limits it was trained under (:data:`~qprobe.agent.protocol_config.LIMITS_FILE`), written
  beside ``out`` and renamed into place, loadable by :func:`qprobe.models.factory.load_model`; and the
  metrics file for DVC.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from transformers import TrainerCallback

from qprobe import tracking
from qprobe.agent.crop import MIN_PIXELS, MODEL_MAX_PIXELS
from qprobe.agent.protocol_config import PROTOCOL_FIELD, ProtocolLimits, check_limits, write_limits
from qprobe.config import to_flat_dict
from qprobe.errors import QProbeError
from qprobe.io import content_hash, write_json_atomic
from qprobe.models.factory import check_checkpoint, load_processor
from qprobe.train.checkpoints import CheckpointLoading, drop_checkpoints, record_run, use_run_dir
from qprobe.train.history import last_logged, write_curves
from qprobe.train.progress import StatusLineCallback

log = logging.getLogger(__name__)

LANGUAGE_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class StageArgs:
    """The knobs every stage adds to trl's config (the stages set their own defaults)."""

    model: str = field(default="models/base", metadata={"group": "model",
        "help": "Qwen2.5-VL to start from: a checkpoint folder or a Hugging Face id in the local cache"})
    dataset: str = field(default="", metadata={
        "group": "data", "help": "training set: a folder written by `save_to_disk`"})
    out: str = field(default="", metadata={"group": "data", "help": "folder of the final model (the DVC output)"})
    metrics: str = field(default="", metadata={
        "group": "data", "help": "JSON file of the final metrics (DVC metrics)"})
    curves: str = field(default="", metadata={"group": "data",
        "help": "CSV of every logged step's figures (loss, rewards, ...), the stage's DVC plot and the report's "
                "training curves; default: beside metrics, as STEM_curves.csv"})
    resume: str = field(default="auto", metadata={"group": "schedule",
        "help": "auto: continue from the last checkpoint of this configuration in output_dir, if any; "
                "never: start afresh (its checkpoints are removed); or the path of a checkpoint folder"})
    lora: bool = field(default=False, metadata={
        "group": "model", "help": "train LoRA adapters (merged into the final model)"})
    lora_r: int = field(default=16, metadata={"group": "model", "help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"group": "model", "help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.05, metadata={"group": "model", "help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: list(LANGUAGE_LINEAR), metadata={
        "group": "model", "help": "names of the linear layers that get adapters"})
    freeze_vision: bool = field(default=True, metadata={"group": "model",
        "help": "keep the vision tower (ViT and patch merger) frozen; with LoRA, give it no adapters"})
    protocol: ProtocolLimits = field(default_factory=ProtocolLimits, metadata={**PROTOCOL_FIELD, "group": "tool"})
    status_steps: int = field(default=0, metadata={"group": "schedule",
        "help": "print a status line (step/total, loss or reward, seconds per step, time left) every this many "
                "steps; 0: about 20 lines a run (every step when max_steps is 20 or less)"})

    # The help groups (qprobe.config.GROUPS) of the trainer's fields every stage sets in params.yaml or
    # configs/paper.yaml; trl's other fields are listed by `--help-all` only.
    METADATA: ClassVar[dict[str, dict[str, str]]] = {
        **{name: {"group": "model"} for name in ("model_init_kwargs", "bf16", "use_cpu", "activation_checkpointing")},
        **{name: {"group": "schedule"} for name in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
            "warmup_steps", "weight_decay", "max_steps", "num_train_epochs", "logging_steps", "save_strategy",
            "save_steps", "save_total_limit", "seed", "report_to", "dataloader_num_workers")},
    }

    # Config keys that leave the trained weights alone: a change to them resumes the same checkpoints.
    UNTRAINED_KEYS: ClassVar[frozenset[str]] = frozenset({
        "max_steps", "num_train_epochs", "save_steps", "save_strategy", "save_total_limit", "logging_steps",
        "logging_strategy", "logging_first_step", "logging_dir", "output_dir", "run_name", "report_to", "resume",
        "out", "metrics", "curves", "local_rank", "dataloader_num_workers", "disable_tqdm", "status_steps",
    })

    def __post_init__(self) -> None:
        for key in ("model", "dataset", "out", "metrics"):
            if not getattr(self, key):
                raise ValueError(f"{key} must be set")
        if self.resume_from_checkpoint is not None:
            raise ValueError("use `resume` (auto, never or a checkpoint path), not resume_from_checkpoint")
        if not self.curves:
            metrics = Path(self.metrics)
            self.curves = str(metrics.with_name(f"{metrics.stem}_curves.csv"))
        # What the stage was given, before trl's __post_init__ derives fields of its own from it
        # (bf16, report_to, ...): compared with trl's defaults, it is what a run changed (run_params).
        self._given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        super().__post_init__()  # the trl config next in the MRO: StageArgs is a mixin placed before it
        if "mlflow" in self.report_to:  # normalised to a list by now ("all" included)
            raise ValueError("report_to: mlflow would open a second MLflow run; the stage logs to its own run")

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    @property
    def view_max_pixels(self) -> int:
        """The pixel budget of the global views in this stage's set (larger ones are an error)."""
        return self.protocol.global_max_pixels

    def run_params(self) -> dict[str, Any]:
        """The stage run's MLflow params, flat: Q-Probe's fields and the protocol's limits, and trl's fields
        where they differ from trl's defaults (:func:`qprobe.tracking.trainer_params`)."""
        return to_flat_dict(tracking.trainer_params(type(self), self._given))

    def to_dict(self) -> dict[str, Any]:
        """trl's dict of the config, the protocol's limits as a plain mapping (JSON, MLflow, the fingerprint)."""
        return {**super().to_dict(), "protocol": dataclasses.asdict(self.protocol)}


# What the GRPO stages (1 and 3) add to StageArgs.METADATA: trl's generation and KL fields.
GRPO_METADATA: dict[str, dict[str, str]] = {
    **{name: {"group": "reward"} for name in ("num_generations", "temperature", "max_completion_length",
                                              "log_completions")},
    # trl's name; the paper's beta is a reward weight (stage 3's `rewards: {localization: ...}`).
    "beta": {"group": "reward", "help": "KL coefficient (trl): weight of the KL penalty to the starting model; "
                                        "not the paper's reward weight beta, which is stage 3's "
                                        "`rewards: {localization: ...}`. 0: no reference model is loaded"},
    **{name: {"group": "model"} for name in ("use_vllm", "vllm_mode", "vllm_server_host", "vllm_server_port",
                                             "vllm_server_timeout")},
}


def stage_config(stage: str) -> type[StageArgs]:
    """The config class of training stage ``stage``: the :class:`StageArgs` subclass ``qprobe.train.<stage>`` declares."""
    module = importlib.import_module(f"qprobe.train.{stage}")
    return next(value for value in vars(module).values() if isinstance(value, type) and issubclass(value, StageArgs)
                and value.__module__ == module.__name__)


# ---------------------------------------------------------------------------------------------------
# Inputs


def resolve_model(spec: str) -> Path:
    """The checkpoint folder behind ``spec``: a folder, or a Hugging Face id in the local cache."""
    path = Path(spec)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return check_checkpoint(path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return check_checkpoint(snapshot_download(spec))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise QProbeError(f"{spec}: no such model folder (`qprobe model init-tiny --out {spec}` builds the tiny "
                          f"one), nor a Hugging Face id in the local cache (download it: `HF_HUB_OFFLINE=0 "
                          f"huggingface-cli download {spec}`)") from exc


def stage_processor(model_path: str | Path) -> Any:
    """The package's processor for ``model_path``, taking every image the earlier stages sized as it is.

    The trajectories stage sized each image with ``smart_resize`` (sides multiples of 28) to its budget,
    and the text's boxes are in those pixels. An image processor whose limits are narrower would
    resize such an image and silently shift every box; with Qwen2.5-VL's own limits, [MIN_PIXELS,
    MODEL_MAX_PIXELS], it leaves it as it is. The budgets themselves are checked on the data
    (:func:`check_pixel_budgets`).
    """
    from transformers.image_utils import SizeDict

    processor = load_processor(model_path)
    processor.image_processor.size = SizeDict(shortest_edge=MIN_PIXELS, longest_edge=MODEL_MAX_PIXELS)
    return processor


def load_dataset_dir(path: str | Path, columns: Iterable[str], limits: ProtocolLimits) -> Any:
    """A dataset written by ``save_to_disk``, checked for the ``columns`` the stage reads and for the
    protocol ``limits`` it was built under (:func:`~qprobe.agent.protocol_config.check_limits`)."""
    from datasets import Dataset, disable_caching, load_from_disk

    # The folder is a DVC output: map/filter must not write their cache files into it (that would
    # change its hash and leave `dvc status` dirty after every training run). Uncached transforms go
    # to a temporary folder instead.
    disable_caching()
    path = Path(path)
    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise QProbeError(f"{path}: no dataset (run `qprobe trajectories` first)") from exc
    if not isinstance(dataset, Dataset):
        raise QProbeError(f"{path}: expected one dataset, found a DatasetDict ({', '.join(dataset)})")
    check_limits(path, limits)
    missing = sorted(set(columns) - set(dataset.column_names))
    if missing:
        raise QProbeError(f"{path}: missing column {missing[0]!r} (has {', '.join(dataset.column_names)})")
    if len(dataset) == 0:
        raise QProbeError(f"{path}: the dataset is empty")
    return dataset


def row_images(row: Mapping[str, Any]) -> list[Any]:
    """A row's images in conversation order: its ``images`` column, then the image blocks of its turns.

    The stage-1 and RL sets keep the global view in ``images`` (trl's placeholders in ``prompt``); Probe-CoT
    keeps every image inline in ``messages``, crops in tool turns included.
    """
    found = list(row.get("images") or [])
    for column in ("prompt", "messages"):
        for message in row.get(column) or []:
            content = message.get("content")
            if isinstance(content, list):
                found += [b["image"] for b in content if b.get("type") == "image" and b.get("image") is not None]
    return found


def _undecoded(feature: Any) -> Any:
    """``feature`` with every image left encoded: reading a row then costs no decoding."""
    from datasets import Image, LargeList, List

    if isinstance(feature, Image):
        return Image(decode=False)
    if isinstance(feature, List):
        return List(_undecoded(feature.feature), length=feature.length)
    if isinstance(feature, LargeList):
        return LargeList(_undecoded(feature.feature))
    if isinstance(feature, dict):  # Features or a struct
        return type(feature)({key: _undecoded(value) for key, value in feature.items()})
    return feature


def check_pixel_budgets(dataset: Any, global_max_pixels: int, crop_max_pixels: int | None = None) -> None:
    """Every row's first image (the global view) fits ``global_max_pixels``, the others (crops) ``crop_max_pixels``.

    Reads image headers only. A larger image means the data was built for another budget than the stage's.
    """
    import io

    from PIL import Image

    headers = dataset.cast(_undecoded(dataset.features))
    for i, row in enumerate(headers):
        for j, item in enumerate(row_images(row)):
            source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
            with Image.open(source) as image:
                width, height = image.size
            limit = global_max_pixels if j == 0 else crop_max_pixels
            if limit is not None and width * height > limit:
                what = "global view" if j == 0 else f"crop {j}"
                raise QProbeError(f"row {i}: its {what} is {width}x{height} = {width * height} pixels, over the "
                                  f"stage's budget of {limit}; build the trajectories with the same budgets")


# ---------------------------------------------------------------------------------------------------
# Model


# Qwen2.5-VL's tokens that mark or hold image and video features: the processor writes them, the model never may.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def suppress_vision_tokens(cfg: Any, tokenizer: Any) -> None:
    """Let a GRPO stage's sampling never draw a vision token (``generation_kwargs.suppress_tokens``).

    trl suppresses the image token only. A sampled ``<|video_pad|>`` (the tiny model, at temperature 1)
    made the next forward's M-RoPE look for a video that is not there: transformers' ``get_rope_index``
    stopped stage 3 with a ``TypeError`` at step 17 of a 20-step run.
    """
    ids = sorted(set(tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))) - {None, tokenizer.unk_token_id})
    cfg.generation_kwargs = {**(cfg.generation_kwargs or {}), "suppress_tokens": ids}


def lora_config(cfg: StageArgs) -> Any:
    """peft's ``LoraConfig`` for the language model's linear layers (and the vision tower's, unless frozen)."""
    if not cfg.lora:
        return None
    from peft import LoraConfig

    targets: list[str] | str = list(cfg.lora_target_modules)
    if cfg.freeze_vision:
        names = "|".join(re.escape(t) for t in cfg.lora_target_modules)
        targets = rf"^(?!.*\bvisual\.).*\.(?:{names})$"
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def freeze_vision(model: Any) -> int:
    """Stop gradients to the vision tower (ViT blocks and patch merger); returns how many tensors froze."""
    frozen = 0
    for name, param in model.named_parameters():
        if "visual." in f".{name}" and param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise QProbeError("freeze_vision: found no vision-tower parameters (expected names containing 'visual.')")
    return frozen


class MlflowLogCallback(TrainerCallback):
    """The trainer's logs, as metrics at the global step, into the stage's MLflow run (main process only).

    Not transformers' ``MLflowCallback``: that one logs every TrainingArguments field as a param and can
    open its own run; the stage's run already holds the params.
    """

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        import mlflow

        if state.is_world_process_zero and logs and mlflow.active_run() is not None:
            tracking.log_metrics(logs, step=state.global_step)


# ---------------------------------------------------------------------------------------------------
# The run


def save_final(trainer: Any, cfg: StageArgs, model_path: Path, processor: Any) -> Path:
    """Write the trained model with the processor and chat template to ``cfg.out``, atomically.

    Every process must call it (ZeRO-3 gathers the weights); the main one writes. LoRA adapters are
    merged into a fresh copy of the base, so every stage's output is a plain checkpoint folder.
    """
    out = Path(cfg.out)
    staging = out.with_name(out.name + ".partial")
    if cfg.is_main:
        shutil.rmtree(staging, ignore_errors=True)
    if cfg.lora:
        adapter = Path(cfg.output_dir) / "adapter"
        trainer.save_model(str(adapter))
        if cfg.is_main:
            _merge_adapter(model_path, adapter, staging, trainer.model.dtype)
    else:
        trainer.save_model(str(staging))
    if not cfg.is_main:
        return out
    processor.save_pretrained(str(staging))
    write_limits(staging, cfg.protocol)
    # The pickled config is in MLflow and params.yaml; the folder holds only what loads the model.
    (staging / "training_args.bin").unlink(missing_ok=True)
    check_checkpoint(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def _merge_adapter(model_path: Path, adapter: Path, out: Path, dtype: Any) -> None:
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=dtype)
    PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(str(out))


def release(trainer: Any) -> None:
    """Let go of the trained engine, so that the main process can load the saved model to evaluate it.

    Under ZeRO-3 the engine's shards and optimizer states still fill the device, and while its
    DeepSpeed config is registered transformers would load any new model sharded (and refuse a device).
    """
    import gc

    import torch
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    trainer.accelerator.free_memory()
    unset_hf_deepspeed_config()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_stage(stage: str, cfg: StageArgs, make_trainer: Callable[[Path, Any], Any],
              extra_inputs: Mapping[str, str] | None = None,
              evaluate: Callable[[Path], Mapping[str, float]] | None = None,
              eval_inputs: Mapping[str, str] | None = None) -> dict[str, float]:
    """Train one stage end to end; returns its metrics (also written to ``cfg.metrics`` and MLflow).

    ``make_trainer(model_path, processor)`` builds the stage's trainer. ``extra_inputs`` are other
    folders training reads (name -> path), hashed into the checkpoints' fingerprint and logged like the
    model and dataset. ``evaluate`` runs on the main process with the saved model's folder; its metrics
    join the stage's; the folders it reads, ``eval_inputs``, are logged but leave the fingerprint alone.
    """
    import mlflow

    start = time.perf_counter()
    model_path = resolve_model(cfg.model)
    check_limits(model_path, cfg.protocol, ProtocolLimits.BUDGETS)
    processor = stage_processor(model_path)
    inputs = {"model": str(model_path), "dataset": cfg.dataset, **(extra_inputs or {}), **(eval_inputs or {})}
    digests = {name: content_hash(path) for name, path in inputs.items()}
    checkpoint = use_run_dir(cfg, {k: v for k, v in digests.items() if k not in (eval_inputs or {})})
    with tracking.stage_run(stage, cfg.run_params()) if cfg.is_main else contextlib.nullcontext():
        if cfg.is_main:
            record_run(cfg, digests)
            for name, path in inputs.items():
                tracking.log_dataset(path, name, "input", digest=digests[name])
            mlflow.set_tags({"qprobe.checkpoints": cfg.output_dir, "qprobe.resumed_from": checkpoint or ""})
        trainer = make_trainer(model_path, processor)
        if not isinstance(trainer, CheckpointLoading):
            raise TypeError(f"{stage}: make_trainer must build a CheckpointLoading trainer (SFTStageTrainer, "
                            f"GRPOStageTrainer), or resuming would not restore the weights")
        if cfg.freeze_vision and not cfg.lora:
            freeze_vision(trainer.model)
        trainer.add_callback(MlflowLogCallback())
        trainer.add_callback(StatusLineCallback(stage, cfg.status_steps))
        result = trainer.train(resume_from_checkpoint=checkpoint)
        out = save_final(trainer, cfg, model_path, processor)
        state = trainer.state
        release(trainer)
        del trainer
        if not cfg.is_main:
            return {}
        # The trainer's own logs reached MLflow through the callback; only what comes after is new there.
        final = dict(evaluate(out)) if evaluate is not None else {}
        final["seconds"] = round(time.perf_counter() - start, 2)
        tracking.log_metrics(final, step=state.global_step)
        metrics = {**last_logged(state.log_history), **result.metrics, "global_step": float(state.global_step),
                   **final}
        digest = tracking.log_dataset(out, f"{stage}-model", "output")
        mlflow.set_tags({"qprobe.model.path": str(out), "qprobe.model.md5": digest})
        write_json_atomic(cfg.metrics, metrics)
        write_curves(state.log_history, cfg.curves)
        drop_checkpoints(cfg)
    return metrics
