"""Q-Probe inference and a stage-2 training step at paper scale: Qwen2.5-VL-7B's architecture on one GPU.

Nothing can be downloaded on the machines this runs on, so the model is Qwen2.5-VL-7B-Instruct's
published architecture (:data:`QWEN25_VL_7B`) with random bf16 weights: time and memory depend on
the shapes, not on the values. The inputs are shaped as ``configs/paper.yaml`` shapes them, each
image ``smart_resize``-d to at most 1280 merged 28x28 patches (1,003,520 pixels):

1. **prefill**, one forward pass over (a) the global view of a 4K frame (3840x2160) alone, (b) the
   Q-Probe conversation of that view and two native-resolution crops of 648x648 pixels (0.3 of the
   short side, as ``benchmarks/probe_cost.py``), and (c) the 4K frame in one pass at Qwen2.5-VL's
   full-resolution maximum (12,845,056 pixels): latency, peak memory, and (b) against (c);
2. **decode**, greedy generation of ``--new-tokens`` after (b)'s prefill, for one rollout and for
   stage 3's group of K=6: tokens per second;
3. **stage-2 step**, forward and backward over the longest trajectory the paper profile allows
   (global view + 3 crops, all at the full budget: 5,120 visual tokens, plus ``--text-tokens`` of
   text), vision tower frozen, activation checkpointing on, bf16, as ``configs/paper.yaml`` trains:
   seconds and peak memory. The optimizer is not stepped (AdamW's fp32 states for 7.6B trainable
   parameters alone exceed one 80 GB card); the per-GPU share of weights, gradients and AdamW states
   under ZeRO-3 on 8 GPUs is computed from the parameter counts and printed beside it.

Attention is PyTorch's SDPA (flash-attn is not installed there); the paper profile asks for
``flash_attention_2``, which needs less memory for long sequences, so the figures are an upper bound.

Run::

    python benchmarks/paper_scale_gpu.py --json results.json              # on a GPU: the 7B
    python benchmarks/paper_scale_gpu.py --scale tiny --device cpu --frame 1280x720   # the same code, on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

try:  # the PIL processor's module imports without torchvision
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
except ImportError:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

PATCH, MERGE = 14, 2
BUDGET = 1280 * 28 * 28  # the paper's pixel budget per image
FULL_RESOLUTION = 16384 * 28 * 28  # Qwen2.5-VL's processor maximum
IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653

# Qwen2.5-VL-7B-Instruct's config.json (the values that shape compute and memory).
QWEN25_VL_7B: dict[str, Any] = {
    "text_config": {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
        "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu", "in_chans": 3, "tokens_per_second": 2,
    },
    "image_token_id": IMAGE_PAD, "video_token_id": 151656,
    "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END, "tie_word_embeddings": False,
}
# The same architecture shrunk, to try the script on a CPU.
TINY: dict[str, Any] = {
    "text_config": {**QWEN25_VL_7B["text_config"], "hidden_size": 128, "intermediate_size": 256,
                    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},  # halves of 16-wide heads
    "vision_config": {**QWEN25_VL_7B["vision_config"], "depth": 2, "hidden_size": 64, "intermediate_size": 128,
                      "num_heads": 4, "out_hidden_size": 128, "fullatt_block_indexes": [1]},
    **{k: v for k, v in QWEN25_VL_7B.items() if k not in ("text_config", "vision_config")},
}


def build(scale: str, device: torch.device, dtype: torch.dtype) -> Any:
    config = Qwen2_5_VLConfig(**(QWEN25_VL_7B if scale == "7b" else TINY))
    with device:
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def grid(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """Patch rows and columns of an image of ``size`` (width, height) after ``smart_resize``."""
    height, width = smart_resize(size[1], size[0], factor=PATCH * MERGE, min_pixels=4 * 28 * 28,
                                 max_pixels=max_pixels)
    return height // PATCH, width // PATCH


def conversation(images: list[tuple[int, int]], text_tokens: int, device: torch.device,
                 dtype: torch.dtype, batch: int = 1) -> dict[str, torch.Tensor]:
    """Token ids and pixel patches of a conversation: text, then each image followed by more text."""
    gen = torch.Generator().manual_seed(0)
    text = text_tokens // (len(images) + 1)
    ids: list[torch.Tensor] = [torch.randint(0, 151000, (text,), generator=gen)]
    for rows, cols in images:
        pads = torch.full((rows * cols // MERGE**2,), IMAGE_PAD)
        ids += [torch.tensor([VISION_START]), pads, torch.tensor([VISION_END]),
                torch.randint(0, 151000, (text,), generator=gen)]
    input_ids = torch.cat(ids).unsqueeze(0).repeat(batch, 1).to(device)
    patches = sum(rows * cols for rows, cols in images) * batch
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(patches, 3 * 2 * PATCH * PATCH, generator=gen).to(device, dtype),
        "image_grid_thw": torch.tensor([[1, rows, cols] for rows, cols in images] * batch, device=device),
    }


def measure(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, Any]:
    """Median seconds over ``repeats`` runs after one warm-up, and their peak memory in GiB (or the OOM)."""
    try:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"seconds": round(statistics.median(times), 4), "peak_gib": round(peak, 2)}


class Results(dict):
    """Figures printed as they come and rewritten to ``path`` each time: a timeout keeps what was measured."""

    def __init__(self, path: str | None) -> None:
        super().__init__()
        self.path = path

    def record(self, key: str, value: Any) -> None:
        self[key] = value
        print(key, json.dumps(value), flush=True)
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self, f, indent=2)


def visual_tokens(images: list[tuple[int, int]]) -> int:
    return sum(rows * cols // MERGE**2 for rows, cols in images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("7b", "tiny"), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens per decode measurement")
    parser.add_argument("--text-tokens", type=int, default=1024, help="text tokens of the stage-2 trajectory")
    parser.add_argument("--group", type=int, default=6, help="stage 3's K rollouts per photo, decoded together")
    parser.add_argument("--frame", default="3840x2160", help="the photo, WIDTHxHEIGHT (a 4K frame)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)

    start = time.perf_counter()
    model = build(args.scale, device, dtype)
    visual = sum(p.numel() for n, p in model.named_parameters() if "visual." in f".{n}")
    total = sum(p.numel() for p in model.parameters())
    results = Results(args.json)
    results.record("model", {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "scale": args.scale,
        "torch": torch.__version__, "parameters": total, "vision_parameters": visual,
        "build_seconds": round(time.perf_counter() - start, 1)})

    frame = tuple(int(side) for side in args.frame.split("x"))
    crop_side = round(0.3 * min(frame))
    view, crop, full = grid(frame, BUDGET), grid((crop_side, crop_side), BUDGET), grid(frame, FULL_RESOLUTION)
    cases = {"global_view": [view], "q_probe_view_and_2_crops": [view, crop, crop], "full_resolution": [full]}
    with torch.inference_mode():
        for name, images in cases.items():
            inputs = conversation(images, 512, device, dtype)
            figures = measure(lambda inputs=inputs: model(**inputs, use_cache=False, logits_to_keep=1),
                              device, args.repeats)
            results.record(f"prefill.{name}", {"visual_tokens": visual_tokens(images),
                                               "tokens": inputs["input_ids"].shape[1], **figures})
        probe, one = results["prefill.q_probe_view_and_2_crops"], results["prefill.full_resolution"]
        if "seconds" in probe and "seconds" in one:
            results.record("prefill.q_probe_over_full_resolution", {
                "seconds": round(probe["seconds"] / one["seconds"], 3),
                "visual_tokens": round(probe["visual_tokens"] / one["visual_tokens"], 3)})

        # Decode speed from two generations that share the prefill: 1 new token, then --new-tokens.
        for batch in (1, args.group):
            inputs = conversation(cases["q_probe_view_and_2_crops"], 512, device, dtype, batch=batch)
            runs = {n: measure(lambda inputs=inputs, n=n: model.generate(
                **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0),
                device, max(1, args.repeats - 1)) for n in (1, args.new_tokens)}
            first, last = runs[1], runs[args.new_tokens]
            figures = dict(last)
            if "seconds" in first and "seconds" in last and last["seconds"] > first["seconds"]:
                decode = last["seconds"] - first["seconds"]
                figures["decode_tokens_per_second"] = round(batch * (args.new_tokens - 1) / decode, 1)
            results.record(f"decode.batch_{batch}", {"new_tokens": args.new_tokens, **figures})

    # Stage 2 as the paper profile trains: frozen tower, checkpointed decoder, the longest trajectory.
    # (qprobe.train.common.freeze_vision does the same, but importing it needs trl, which the GPU machine lacks.)
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_("visual." not in f".{name}")
    # transformers renamed the switch; older releases (5.17 on the GPU machine) have only the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    images = [view] * 4  # the view and 3 crops, each as large as the budget allows
    inputs = conversation(images, args.text_tokens, device, dtype)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_PAD, -100)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=labels, use_cache=False).loss.backward()

    # ZeRO-3 on 8 GPUs shards bf16 weights, bf16 gradients, and AdamW's fp32 master weights and two moments.
    zero3 = (total * 2 + trainable * (2 + 4 + 4 + 4)) / 8 / 2**30
    results.record("stage2_step", {
        "tokens": inputs["input_ids"].shape[1], "visual_tokens": visual_tokens(images),
        "trainable_parameters": trainable, **measure(step, device, args.repeats),
        "zero3_8gpu_states_gib_per_gpu": round(zero3, 2)})


if __name__ == "__main__":
    main()
