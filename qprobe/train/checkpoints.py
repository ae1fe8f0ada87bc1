"""Checkpoints of a training stage: where they go, which one a run resumes, how its weights load.

A stage saves a checkpoint every ``save_steps`` steps into ``output_dir/<fingerprint>``, the
fingerprint hashing the config (minus the keys that only set how long to train or what to record)
and the contents of the model and dataset. ``resume: auto`` continues a killed run from its last
checkpoint (also with a larger ``max_steps``); a run of another configuration starts afresh in its
own folder. Once the final model is saved all checkpoints go, so a finished run is never resumed.
Resuming restores the weights, the optimizer and scheduler, the RNG states and the position in the
data: everything but the weights is transformers' own. The weights are not: transformers saves a
Qwen2.5-VL with its legacy keys (``model.layers.*``) but the Trainer loads them back by the
model's own (``model.language_model.layers.*``), matches none and only warns. The stages' trainers
(:mod:`qprobe.train.trainers`, which :func:`~qprobe.train.common.run_stage` insists on) load a checkpoint through :func:`load_checkpoint_weights` instead: full weights renamed
as ``from_pretrained`` renames them, LoRA adapters through peft, and any key missing or left over is
a :class:`~qprobe.errors.QProbeError` naming the checkpoint, whether ``resume`` found it or named it.
``auto`` takes the last *complete* checkpoint (``trainer_state.json`` is written last), so a run
killed while saving one resumes from the one before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from qprobe.errors import QProbeError
from qprobe.io import write_json_atomic

if TYPE_CHECKING:  # common.py imports this module: the config's class is needed for annotations only
    from qprobe.train.common import StageArgs

log = logging.getLogger(__name__)

RUN_FILE = "qprobe-run.json"  # in each checkpoint folder: what its fingerprint was made of


def fingerprint(cfg: StageArgs, digests: Mapping[str, str]) -> str:
    """Hash of what the trained weights depend on: the config less its UNTRAINED_KEYS, and the inputs."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in cfg.UNTRAINED_KEYS}
    blob = json.dumps({"config": settings, "inputs": dict(digests)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def last_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of ``run_dir`` with the most steps, if any.

    The Trainer writes ``trainer_state.json`` last: a folder without it was cut short while saving.
    """
    steps = {int(m[1]): path for path in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name))
             and (path / TRAINER_STATE_NAME).is_file()}
    return steps[max(steps)] if steps else None


def use_run_dir(cfg: StageArgs, digests: Mapping[str, str]) -> str | None:
    """Point ``cfg.output_dir`` at this configuration's checkpoint folder; the checkpoint to resume, if any.

    Only an unfinished run has checkpoints there: a finished one removed them (:func:`drop_checkpoints`).
    """
    base = Path(cfg.output_dir)
    run_dir = base / fingerprint(cfg, digests)
    cfg.output_dir = str(run_dir)
    if cfg.resume == "never":
        if cfg.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
        return None
    if cfg.resume != "auto":
        if not (Path(cfg.resume) / TRAINER_STATE_NAME).is_file():
            raise QProbeError(f"resume: {cfg.resume} is not a checkpoint folder (no {TRAINER_STATE_NAME})")
        return cfg.resume
    checkpoint = last_checkpoint(run_dir)
    if checkpoint is None:
        return None
    log.info("resuming from %s", checkpoint)
    return str(checkpoint)


def load_checkpoint_weights(model: Any, checkpoint: str | Path) -> None:
    """Load a checkpoint's trained weights into ``model``, every key matched, in place (no new parameters).

    A PEFT model takes the LoRA adapters of ``adapter_model.safetensors`` through peft. Any other takes the
    full weights of ``model.safetensors`` (or its shards), their keys renamed by transformers' conversion
    mapping for the model as ``from_pretrained`` renames them: ``save_pretrained`` wrote them back to the
    legacy names. A key of the model the checkpoint lacks (tied copies aside), or one of the checkpoint the
    model lacks, is a :class:`QProbeError`: a resumed run that silently kept its starting weights would
    train on as if nothing were wrong.
    """
    from peft import PeftModel

    checkpoint = Path(checkpoint)
    if isinstance(model, PeftModel):
        result = model.load_adapter(str(checkpoint), model.active_adapter, is_trainable=True)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    else:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        expected = model.state_dict()
        weights = {rename_source_key(key, renamings, [], model.base_model_prefix, expected)[0]: tensor
                   for key, tensor in _read_weights(checkpoint).items()}
        result = model.load_state_dict(weights, strict=False)
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        missing = [k for k in result.missing_keys if tied.get(k) not in weights]
        unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        found = "; ".join(f"{len(keys)} {what} (first {keys[0]})" for what, keys in
                          (("of the model's weights missing", missing), ("unknown to the model", unexpected))
                          if keys)
        raise QProbeError(f"{checkpoint}: its weights do not match the model: {found}; resume from a checkpoint "
                          f"of this configuration, or start afresh with `resume: never`")


def _read_weights(checkpoint: Path) -> dict[str, Any]:
    """Every tensor of a checkpoint's ``model.safetensors`` or of the shards its index names."""
    from safetensors.torch import load_file
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    index = checkpoint / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (checkpoint / SAFE_WEIGHTS_NAME).is_file():
        files = [SAFE_WEIGHTS_NAME]
    else:
        raise QProbeError(f"{checkpoint}: no weights to resume from ({SAFE_WEIGHTS_NAME} or its index)")
    return {key: tensor for name in files for key, tensor in load_file(checkpoint / name, device="cpu").items()}


class CheckpointLoading:
    """A trainer mixin: resuming loads the weights with :func:`load_checkpoint_weights`, not the Trainer's loader.

    Optimizer, scheduler, RNG states and the data position stay the Trainer's own. Under DeepSpeed the
    Trainer never calls this: the engine loads its own checkpoint.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_checkpoint_weights(model if model is not None else self.model, resume_from_checkpoint)


def record_run(cfg: StageArgs, digests: Mapping[str, str]) -> None:
    """Mark ``cfg.output_dir`` as a run folder (the only kind :func:`drop_checkpoints` removes) and record
    what its fingerprint was made of."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RUN_FILE, {"inputs": dict(digests), "model": cfg.model, "dataset": cfg.dataset})


def drop_checkpoints(cfg: StageArgs) -> None:
    """Once the final model is saved, no checkpoint is worth resuming: remove every run folder.

    A finished run leaves none behind, so a rerun (new code, ``dvc repro -f``) trains afresh, exactly
    as the first time; only a run that never finished is resumed.
    """
    for run_dir in Path(cfg.output_dir).parent.iterdir():
        if (run_dir / RUN_FILE).is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
