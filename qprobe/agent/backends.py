"""Generation backends behind one interface: local transformers, or an OpenAI-compatible server.

A backend turns the conversation so far (protocol messages, images inline as PIL) into the next
assistant text. :class:`TransformersBackend` runs any Qwen2.5-VL checkpoint folder in-process
(loaded by :mod:`qprobe.models.factory`: CUDA in bfloat16 where a GPU is visible, else CPU in
float32), rendering with the package's chat template. :class:`OpenAIBackend` talks to a
chat-completions endpoint such as ``vllm serve Qwen/Qwen2.5-VL-7B-Instruct``: images go as
lossless PNG data URLs (a quality judge must not see recompression), tool turns go as user turns
wrapped in ``<tool_response>`` exactly as the chat template renders them, so the stock Qwen2.5-VL
template on the server sees the same text (serve with ``--chat-template
qprobe/agent/chat_template.jinja`` for token-identical prompts). Network failures and 5xx/429
answers are retried with exponential backoff; an endpoint that stays down is a
:class:`~qprobe.errors.QProbeError` naming the URL.
"""

from __future__ import annotations

import base64
import io
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from PIL import Image

from qprobe.agent.protocol import message_text
from qprobe.errors import QProbeError
from qprobe.models.factory import is_endpoint


@dataclass(frozen=True)
class Generation:
    """One assistant turn as generated."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": the model ended its turn; "length": the token budget cut it
    seconds: float


class Backend(Protocol):
    name: str

    def generate(self, messages: list[dict[str, Any]], *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> Generation:
        """The next assistant turn for ``messages`` (greedy when ``temperature`` is 0)."""
        ...


class TransformersBackend:
    """A Qwen2.5-VL checkpoint folder run in-process with transformers."""

    def __init__(self, path: str, device: str | None = None, dtype: Any = None, top_p: float = 1.0) -> None:
        from qprobe.models.factory import load_model

        self.name = str(path)
        self.model, self.processor = load_model(path, device=device, dtype=dtype)
        self.top_p = top_p
        tokenizer = self.processor.tokenizer
        self._stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    def generate(self, messages: list[dict[str, Any]], *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> Generation:
        import torch
        from transformers import GenerationConfig

        start = time.perf_counter()
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        ).to(self.model.device)
        sampling = temperature > 0
        # A full config, not the checkpoint's defaults: the same call means the same decoding everywhere.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature if sampling else None,
            top_p=self.top_p if sampling else None, top_k=None, eos_token_id=self._stop_ids,
            pad_token_id=self._stop_ids[1],
        )
        torch.manual_seed(seed)
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=config)
        prompt_len = inputs["input_ids"].shape[1]
        new = output[0, prompt_len:].tolist()
        stopped = bool(new) and new[-1] in self._stop_ids
        text = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        return Generation(text=text, prompt_tokens=prompt_len, completion_tokens=len(new),
                          finish_reason="stop" if stopped else "length", seconds=time.perf_counter() - start)


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _openai_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for block in content or []:
        if block.get("type") == "image":
            blocks.append({"type": "image_url", "image_url": {"url": image_data_url(block["image"])}})
        elif block.get("type") == "text":
            blocks.append({"type": "text", "text": block["text"]})
    return blocks


def to_openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Protocol messages -> chat-completions messages that render as the package template does."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "assistant":
            out.append({"role": "assistant", "content": message_text(message)})
        elif role == "tool":
            # Consecutive tool messages share one user turn, as in the template.
            follows_tool = i > 0 and messages[i - 1]["role"] == "tool"
            blocks = [{"type": "text", "text": "\n<tool_response>\n" if follows_tool else "<tool_response>\n"},
                      *_openai_blocks(message["content"]), {"type": "text", "text": "\n</tool_response>"}]
            if follows_tool:
                out[-1]["content"].extend(blocks)
            else:
                out.append({"role": "user", "content": blocks})
        elif role == "system":
            out.append({"role": "system", "content": "".join(b["text"] for b in _openai_blocks(message["content"])
                                                             if b["type"] == "text")})
        else:
            out.append({"role": role, "content": _openai_blocks(message["content"])})
    return out


class OpenAIBackend:
    """A chat-completions endpoint (vLLM, SGLang, ...) serving a Qwen2.5-VL model."""

    RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

    def __init__(self, url: str, model: str | None = None, timeout: float = 120.0, max_retries: int = 4,
                 backoff: float = 1.0, api_key: str | None = None) -> None:
        if not is_endpoint(url):
            raise QProbeError(f"{url}: an endpoint URL starts with http:// or https://")
        parts = urlsplit(url.rstrip("/"))
        # The OpenAI convention is a base URL ending in /v1; a bare host gets it added.
        self.base_url = url.rstrip("/") + ("/v1" if parts.path in ("", "/") else "")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.model = model or self._served_model()
        self.name = f"{self.base_url} ({self.model})"

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        import requests

        url = self.base_url + path
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = requests.request(method, url, json=payload, headers=self._headers, timeout=self.timeout)
            except requests.Timeout:
                problem = f"no answer within {self.timeout:g} s"
                continue
            except requests.ConnectionError as exc:
                problem = f"cannot connect ({_first_line(exc)})"
                continue
            if response.status_code in self.RETRY_STATUS:
                problem = f"HTTP {response.status_code}: {response.text.strip()[:200]}"
                continue
            if response.status_code >= 400:
                raise QProbeError(f"{url}: HTTP {response.status_code}: {response.text.strip()[:300]}")
            try:
                return response.json()
            except ValueError as exc:
                raise QProbeError(f"{url}: the answer is not JSON ({response.text.strip()[:200]!r})") from exc
        raise QProbeError(f"{url}: unreachable after {self.max_retries + 1} attempts: {problem}")

    def _served_model(self) -> str:
        listing = self._request("GET", "/models")
        models = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict) and m.get("id")]
        if not models:
            raise QProbeError(f"{self.base_url}/models: the server lists no model; name one with --served-model")
        return models[0]

    def generate(self, messages: list[dict[str, Any]], *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> Generation:
        start = time.perf_counter()
        payload = {
            "model": self.model,
            "messages": to_openai_messages(messages),
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
            # Special tokens stay out of the text; <tool_call> is not special in Qwen2.5, so it stays.
            "skip_special_tokens": True,
        }
        answer = self._request("POST", "/chat/completions", payload)
        try:
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise QProbeError(f"{self.base_url}/chat/completions: unexpected answer {str(answer)[:200]}") from exc
        usage = answer.get("usage") or {}
        return Generation(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            seconds=time.perf_counter() - start,
        )


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def make_backend(spec: str, *, served_model: str | None = None, timeout: float = 120.0,
                 max_retries: int = 4) -> Backend:
    """A backend for ``--model``: an ``http(s)://`` endpoint, else a checkpoint folder."""
    if is_endpoint(spec):
        return OpenAIBackend(spec, model=served_model, timeout=timeout, max_retries=max_retries)
    return TransformersBackend(spec)
