"""``qprobe model init-tiny``: a real Qwen2.5-VL with random weights, built offline in seconds.

No weights can be downloaded on the machines this pipeline is developed and tested on, so the
embedded default profile starts every stage from this model. It is the genuine
``Qwen2_5_VLForConditionalGeneration`` architecture (vision tower with window attention and the
patch merger, M-RoPE text decoder), only small: by default text hidden 128 in 2 layers (4 heads of
32, so ``mrope_section`` sums to 16 = head_dim / 2; ``hidden_size`` and ``num_layers`` widen and
deepen it), vision hidden 64 in 2 blocks, tied embeddings; about 0.67M parameters, a forward+backward
well under a second on a laptop CPU.

Its tokenizer is a byte-level BPE trained with ``tokenizers`` on the protocol's own text (system
prompt, user prompts, tool turns, rendered tool calls and answers with their tags, JSON keys, digits
and defect names, all through the chat template), so protocol text costs few tokens and the tiny
model can learn the format in a few dozen SFT steps. It is wrapped in ``Qwen2Tokenizer`` (Qwen's
pre-tokenizer: digits split one by one) with Qwen2.5-VL's special tokens at the usual names.

Everything is saved with ``save_pretrained`` (model, tokenizer, image processor, chat template)
and loads through :func:`qprobe.models.factory.load_model`, like a real checkpoint. The same seed
gives byte-identical files. The folder is written beside its destination and renamed into place, so
a killed run never leaves half a model.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qprobe.config import parse_config
from qprobe.defects import names

log = logging.getLogger(__name__)

# Qwen2.5-VL's special tokens, by their real names (ids differ: this vocabulary is tiny).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Added but not special, as <tool_call> is in Qwen2.5: they survive `decode(skip_special_tokens=True)`.
# The protocol's other tags join them so that each tag is one token the tiny model learns at once.
PROTOCOL_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>", "<answer>", "</answer>",
                   "<tool_response>", "</tool_response>")

HEAD_DIM = 32  # text attention heads of 32: MROPE_SECTION sums to head_dim / 2
MROPE_SECTION = (4, 6, 6)
VISION_HIDDEN, VISION_DEPTH, VISION_HEADS, VISION_FFN = 64, 2, 2, 128
MAX_POSITIONS = 32768
PROCESSOR_MAX_PIXELS = 16384 * 28 * 28  # Qwen2.5-VL's own processor limit: the callers size images


@dataclass
class TinyModelConfig:
    out: str = field(default="models/base", metadata={"help": "folder to write the checkpoint to"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights and of the tokenizer corpus"})
    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary target (the corpus may yield fewer)"})
    hidden_size: int = field(default=128, metadata={
        "help": f"text decoder width: heads of {HEAD_DIM}, half as many key/value heads, a feed-forward twice as wide"})
    num_layers: int = field(default=2, metadata={"help": "text decoder layers"})
    answer_warmup_steps: int = field(default=0, metadata={
        "help": "next-token steps on one-turn answers with random scores, so that stage 1 starts from a model "
                "that has seen the answer format, as the paper's starts from an instruct model (0: random weights)"})
    answer_warmup_lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the answer warm-up"})
    answer_warmup_batch: int = field(default=4, metadata={"help": "conversations per answer warm-up step"})
    answer_warmup_max_pixels: int = field(default=50176, metadata={
        "help": "pixel budget of the warm-up's images: stage 1's views (protocol.low_res_max_pixels)"})

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size {self.vocab_size} is below the 256 bytes plus special tokens")
        if self.hidden_size < 2 * HEAD_DIM or self.hidden_size % (2 * HEAD_DIM):
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of {2 * HEAD_DIM} (an even number "
                             f"of heads of {HEAD_DIM})")
        if self.num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        if self.answer_warmup_steps < 0 or self.answer_warmup_batch < 1 or self.answer_warmup_max_pixels < 56 * 56:
            raise ValueError("answer_warmup_steps must be >= 0, answer_warmup_batch >= 1 and "
                             f"answer_warmup_max_pixels >= {56 * 56}")


_THOUGHTS = (
    "The global view looks sharp and well exposed, with fine texture in the foliage.",
    "Overall the photo is clean, but the fine detail in the upper left may hide blur or noise.",
    "The sky is smooth; the textured region near the centre deserves a closer look.",
    "At native resolution the crop shows soft edges, a local blur against the sharp surroundings.",
    "The crop shows block artifacts typical of jpeg compression, unlike the rest of the photo.",
    "The crop is clean: texture and edges match the global context, no defect here.",
    "Grainy noise and colour banding appear in the crop, though the global view hid them.",
    "Halos of ringing and pixelation along the edges; the defect is local, so the score drops a little.",
)


def _corpus(seed: int, samples: int = 300) -> Iterator[str]:
    """The protocol's own text: prompts, tool turns, calls and answers, through the chat template."""
    from qprobe.agent import protocol

    rng = random.Random(seed)
    yield protocol.system_prompt()
    yield " ".join(names()) + " 0 1 2 3 4 5 6 7 8 9 score defects bbox_2d type crop name arguments"
    for _ in range(samples):
        w, h = rng.randrange(28, 2000, 28), rng.randrange(28, 2000, 28)
        ow, oh = w * rng.randint(1, 4), h * rng.randint(1, 4)
        box = sorted(rng.sample(range(w), 2)) + sorted(rng.sample(range(h), 2))
        view_box = (box[0], box[2], box[1], box[3])
        original = tuple(v * ow // w if i % 2 == 0 else v * oh // h for i, v in enumerate(view_box))
        defects = [protocol.Defect(bbox=view_box, type=rng.choice(names()))
                   for _ in range(rng.randint(0, 2))]
        yield protocol.user_prompt((w, h), (ow, oh), rng.randint(1, 4))
        yield protocol.region_line(view_box, original, (ow, oh), (w, h))
        yield protocol.render_turn(rng.choice(_THOUGHTS), protocol.render_tool_call(view_box))
        yield protocol.render_turn(rng.choice(_THOUGHTS), protocol.render_answer(rng.uniform(1, 5), defects))
    # Whole conversations through the chat template: the glue between turns, as the model sees it.
    yield from _template_samples(rng)


def _template_samples(rng: random.Random) -> Iterator[str]:
    from transformers.utils.chat_template_utils import render_jinja_template

    from qprobe.agent import protocol

    image = {"type": "image"}  # the template only needs the block's type to place the vision tokens
    for _ in range(20):
        box = [rng.randrange(0, 500), rng.randrange(0, 500), rng.randrange(500, 1000), rng.randrange(500, 1000)]
        messages = [
            protocol.system_message(),
            {"role": "user", "content": [image, {"type": "text",
                                                 "text": protocol.user_prompt((812, 616), (3248, 2464), 3)}]},
            protocol.assistant_turn(protocol.render_turn(rng.choice(_THOUGHTS), protocol.render_tool_call(box))),
            protocol.tool_turn([image, {"type": "text",
                                        "text": protocol.region_line(box, box, (3248, 2464), (812, 616))}]),
            protocol.assistant_turn(protocol.render_turn(rng.choice(_THOUGHTS), protocol.render_answer(3.5))),
        ]
        rendered, _ = render_jinja_template([messages], chat_template=protocol.chat_template(),
                                            add_generation_prompt=True)
        yield rendered[0]


# What a model that answers at once thinks of a photo it sees whole: the warm-up's reasoning, varied so that
# what it learns is the answer that follows any of them.
_VERDICTS = (
    "The photo is shown at its native resolution, so the view hides no detail.",
    "Seen at full size, the photo is sharp and well exposed.",
    "The photo looks soft in places, with some noise in the shadows.",
    "Exposure and colour are natural; I can judge it as a whole without cropping.",
)


def warmup_conversation(rng: random.Random, max_pixels: int) -> tuple[list[dict[str, Any]], str]:
    """A stage-1-shaped conversation (a smooth random image as its own view) and an answer with a random score.

    The score is random: the warm-up teaches the format, and nothing of any photo's quality.
    """
    import numpy as np
    from PIL import Image

    from qprobe.agent import protocol

    side = int(max_pixels**0.5) // 28 * 28
    width, height = rng.randrange(56, side + 1, 28), rng.randrange(56, side + 1, 28)
    cells = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(cells).resize((width, height), Image.Resampling.BILINEAR)
    prompt = protocol.global_turn(image, (width, height), rng.randint(1, 4))
    return prompt, protocol.render_turn(rng.choice(_VERDICTS), protocol.render_answer(rng.uniform(1, 5)))


def answer_warmup(model: Any, processor: Any, steps: int, seed: int, lr: float = 3e-3, batch: int = 4,
                  max_pixels: int = 50176) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps on :func:`warmup_conversation` samples, the loss
    on the answer only; returns each step's loss."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = processor.tokenizer.pad_token_id
    model.train()
    losses = []
    for _ in range(steps):
        texts, images, answer_lengths = [], [], []
        for _ in range(batch):
            prompt, answer = warmup_conversation(rng, max_pixels)
            head = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            texts.append(head + answer + "<|im_end|>")
            images.append(prompt[1]["content"][0]["image"])
            # The answer opens with <think>, a token of its own: no merge spans the head and the answer.
            answer_lengths.append(len(processor.tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]))
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
        labels = inputs["input_ids"].clone()
        # Padding is on the right: each row's answer ends where its attention mask does.
        for row, (length, answer_length) in enumerate(zip(inputs["attention_mask"].sum(1).tolist(), answer_lengths,
                                                         strict=True)):
            labels[row, :length - answer_length] = -100
        labels[labels == pad] = -100
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    model.eval()
    return losses


def train_tokenizer(seed: int, vocab_size: int) -> Any:
    """A byte-level BPE on the protocol corpus, as a ``Qwen2Tokenizer`` with Qwen's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    # Exactly Qwen2Tokenizer's normaliser and pre-tokeniser, so the merges mean the same once wrapped.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(PROTOCOL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[SPECIAL_TOKENS[0]],
        show_progress=False,
    )
    # Registered before training so that no merge ever spans a special token in the template samples.
    bpe.add_special_tokens(list(SPECIAL_TOKENS))
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, errors="replace",
                               model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in PROTOCOL_TOKENS])
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def build_model(tokenizer: Any, seed: int, hidden_size: int = 128, num_layers: int = 2) -> Any:
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    end, pad = ids("<|im_end|>"), ids("<|endoftext|>")
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": hidden_size // HEAD_DIM,
            "num_key_value_heads": hidden_size // HEAD_DIM // 2,
            "max_position_embeddings": MAX_POSITIONS,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(MROPE_SECTION)},
            "bos_token_id": None,
            "eos_token_id": end,
            "pad_token_id": pad,
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": VISION_DEPTH,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_FFN,
            "num_heads": VISION_HEADS,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [VISION_DEPTH - 1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=[end, pad], pad_token_id=pad, bos_token_id=None)
    return model


def build_tiny(out: str | Path, seed: int = 0, vocab_size: int = 1024, hidden_size: int = 128,
               num_layers: int = 2, warmup: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the tiny checkpoint to ``out`` (replacing it); returns a summary (parameters, vocabulary).

    ``warmup`` (keyword arguments of :func:`answer_warmup` but the model, processor and seed) trains the
    random model briefly on the answer format before it is saved.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qprobe.models.factory import apply_protocol, load_model
    from qprobe.models.processor import QProbeProcessor

    out = Path(out)
    tokenizer = train_tokenizer(seed, vocab_size)
    image_processor = Qwen2VLImageProcessorPil(max_pixels=PROCESSOR_MAX_PIXELS, min_pixels=56 * 56)
    processor = apply_protocol(QProbeProcessor(image_processor=image_processor, tokenizer=tokenizer))
    model = build_model(tokenizer, seed, hidden_size, num_layers)
    losses = answer_warmup(model, processor, seed=seed, **warmup) if warmup and warmup.get("steps") else []
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        load_model(staging, device="cpu")  # what is written must load through the factory
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vision_parameters": sum(p.numel() for p in model.model.visual.parameters()),
        "vocab_size": len(tokenizer),
        **({"answer_warmup_first_loss": losses[0], "answer_warmup_last_loss": losses[-1]} if losses else {}),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Build the tiny random Qwen2.5-VL.

    Example::

        qprobe model init-tiny                       # params.yaml `model:` (out models/base, seed)
        qprobe model init-tiny --out /tmp/tiny --seed 1
    """
    from qprobe import tracking

    cfg = parse_config(TinyModelConfig, "model", argv, prog="qprobe model init-tiny",
                       description=main.__doc__)
    with tracking.stage_run("model", params=asdict(cfg)):
        summary = build_tiny(cfg.out, cfg.seed, cfg.vocab_size, cfg.hidden_size, cfg.num_layers, warmup={
            "steps": cfg.answer_warmup_steps, "lr": cfg.answer_warmup_lr, "batch": cfg.answer_warmup_batch,
            "max_pixels": cfg.answer_warmup_max_pixels})
        tracking.log_metrics(summary)
        tracking.log_dataset(cfg.out, name="tiny-qwen2.5-vl", context="output")
    print(f"{cfg.out}: tiny Qwen2.5-VL, {summary['parameters']:,} parameters "
          f"({summary['vision_parameters']:,} in the vision tower), vocabulary {summary['vocab_size']}")
    return 0
