"""Generation backends behind one interface: local transformers, or an OpenAI-compatible server.

A backend turns the conversation so far (protocol messages, images inline as PIL) into the next
assistant text. :class:`TransformersBackend` runs any Qwen2.5-VL checkpoint folder in-process
(loaded by :mod:`qprobe.models.factory`: CUDA in bfloat16 where a GPU is visible, else CPU in
float32), rendering with the package's chat template. :class:`OpenAIBackend` talks to a
chat-completions endpoint such as ``vllm serve Qwen/Qwen2.5-VL-7B-Instruct``: images go as
lossless PNG data URLs (a quality judge must not see recompression).

Tool turns go as the user turns the package's chat template renders them as. The template is the one
definition of a tool turn: the model learnt from it (trl renders ``role: tool`` through it in SFT and in
stage 3's tool loop) and the local backend renders with it. A server applies its own template to
``role: tool`` messages instead: the stock Qwen2.5-VL one writes ``<|im_start|>tool``, a turn the model
never saw, and OpenAI's tool messages carry no images. So :func:`to_openai_messages` sends each run of
tool results as one user turn framed with the text cut from the template's own rendering
(:func:`~qprobe.agent.protocol.tool_response_frame`), never a second hand-written copy: the stock
template on the server sees the same text, and one served with ``--chat-template
qprobe/agent/chat_template.jinja`` the same tokens.

Every request has a connect timeout and a read timeout. A refused or timed-out connection, a dropped
or reset one and a 5xx/429 answer are retried with exponential backoff (jittered, so the rollouts in
flight together do not come back in step), each retry logged; a read timeout is
not: the server took the request and is still on it or stuck, and asking again would only add to its
queue and multiply the wait. With the defaults (5 s to connect, 45 s to answer, 4 retries from 1 s)
a server that accepts connections and never answers fails in 45 s, one that refuses them in about
15 s. Whatever goes wrong (down, stuck, an error status, an answer that is not JSON or not shaped like
a chat completion) is a one-line :class:`~qprobe.errors.QProbeError` naming the URL, so a batch can
record it against the one photo and go on.

An :class:`OpenAIBackend` may be called from several threads at once: ``--concurrency`` rollouts are
kept in flight (:mod:`qprobe.agent.inflight`), each thread with its own keep-alive HTTP session.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from PIL import Image

from qprobe.agent.protocol import message_text, tool_response_frame
from qprobe.errors import QProbeError
from qprobe.models.factory import is_endpoint

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 45.0
DEFAULT_RETRIES = 4
DEFAULT_CONCURRENCY = 16

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


_ENCODED: dict[int, str] = {}  # id(image) -> its data URL, while the image lives
_ENCODED_LOCK = threading.Lock()


def image_data_url(image: Image.Image) -> str:
    """``image`` as a lossless PNG data URL, encoded once however many turns send it again.

    Every request carries the whole conversation, so a rollout's global view goes out once per turn;
    encoding was most of the client's time. A protocol image is never changed once made, so its
    encoding is kept, by identity, until the image is freed. Level 1 is as lossless as the default
    6, and 4-5x faster for about 6% more bytes.
    """
    key = id(image)
    with _ENCODED_LOCK:
        url = _ENCODED.get(key)
    if url is None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        with _ENCODED_LOCK:
            _ENCODED[key] = url
        weakref.finalize(image, _forget, key)
    return url


def _forget(key: int) -> None:
    with _ENCODED_LOCK:
        _ENCODED.pop(key, None)


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
    frame = tool_response_frame()
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "assistant":
            out.append({"role": "assistant", "content": message_text(message)})
        elif role == "tool":
            # Consecutive tool messages share one user turn, as in the template.
            follows_tool = i > 0 and messages[i - 1]["role"] == "tool"
            blocks = [{"type": "text", "text": frame.next_open if follows_tool else frame.first_open},
                      *_openai_blocks(message["content"]), {"type": "text", "text": frame.close}]
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

    def __init__(self, url: str, model: str | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, max_retries: int = DEFAULT_RETRIES,
                 backoff: float = 1.0, api_key: str | None = None) -> None:
        if not is_endpoint(url):
            raise QProbeError(f"{url}: an endpoint URL starts with http:// or https://")
        parts = urlsplit(url.rstrip("/"))
        # The OpenAI convention is a base URL ending in /v1; a bare host gets it added.
        self.base_url = url.rstrip("/") + ("/v1" if parts.path in ("", "/") else "")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_retries = max_retries
        self.backoff = backoff
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._local = threading.local()  # one requests.Session per thread: a session is not thread-safe
        self.model = model or self._served_model()
        self.name = f"{self.base_url} ({self.model})"

    def _session(self) -> Any:
        """This thread's session: its connections are kept alive across the turns of its rollouts."""
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        """The decoded JSON answer to one request, retried as the module docstring says."""
        import requests

        url = self.base_url + path
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                log.warning("%s: %s; retry %d of %d in %.2g s", url, problem, attempt, self.max_retries, delay)
                time.sleep(delay)
            try:
                response = self._session().request(method, url, json=payload, headers=self._headers,
                                                   timeout=(self.connect_timeout, self.read_timeout))
            except requests.ReadTimeout as exc:
                raise QProbeError(f"{url}: no answer within {self.read_timeout:g} s (read timeout; "
                                  "a stuck request is not retried)") from exc
            except requests.ConnectTimeout:
                problem = f"no connection within {self.connect_timeout:g} s"
                continue
            except requests.RequestException as exc:  # refused, reset, dropped mid-answer
                problem = f"cannot connect ({_first_line(exc)})"
                continue
            if response.status_code in self.RETRY_STATUS:
                problem = f"HTTP {response.status_code}: {_one_line(response.text, 200)}"
                continue
            if response.status_code >= 400:
                raise QProbeError(f"{url}: HTTP {response.status_code}: {_one_line(response.text, 300)}")
            try:
                return response.json()
            except (ValueError, RecursionError) as exc:
                raise QProbeError(f"{url}: the answer is not JSON ({_one_line(response.text, 200)!r})") from exc
        raise QProbeError(f"{url}: unreachable after {self.max_retries + 1} attempts: {problem}")

    def _served_model(self) -> str:
        listing = self._request("GET", "/models")
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise QProbeError(f"{self.base_url}/models: expected an object with a 'data' list, got "
                              f"{_preview(listing)}")
        models = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]
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
        text, finish_reason, prompt_tokens, completion_tokens = _completion(answer, f"{self.base_url}/chat/completions")
        return Generation(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          finish_reason=finish_reason, seconds=time.perf_counter() - start)


def _completion(answer: Any, url: str) -> tuple[str, str, int, int]:
    """Text, finish reason ("stop" or "length") and token counts of a chat-completions answer.

    A missing ``content`` is an empty turn and a missing ``usage`` counts 0 tokens (servers differ);
    anything present but of the wrong shape is a :class:`QProbeError`: the server is not speaking the
    protocol, and a guess would put made-up numbers into the results.
    """
    choices = answer.get("choices") if isinstance(answer, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise QProbeError(f"{url}: expected choices[0].message, got {_preview(answer)}")
    text = message.get("content")
    if not isinstance(text, str | None):
        raise QProbeError(f"{url}: choices[0].message.content must be text, got {_preview(text)}")
    usage = answer.get("usage")
    if not isinstance(usage, dict | None):
        raise QProbeError(f"{url}: usage must be an object, got {_preview(usage)}")
    counts = []
    for key in ("prompt_tokens", "completion_tokens"):
        value = (usage or {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31):
            raise QProbeError(f"{url}: usage.{key} must be a count, got {_preview(value)}")
        counts.append(value or 0)
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    return text or "", finish, counts[0], counts[1]


def _preview(value: Any) -> str:
    """A short one-line rendering of a JSON value for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return "a huge integer"
    return _one_line(repr(value), 80)


def _one_line(text: str, limit: int) -> str:
    return " ".join(text.split())[:limit]


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def make_backend(spec: str, *, served_model: str | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, max_retries: int = DEFAULT_RETRIES) -> Backend:
    """A backend for ``--model``: an ``http(s)://`` endpoint, else a checkpoint folder."""
    if is_endpoint(spec):
        return OpenAIBackend(spec, model=served_model, connect_timeout=connect_timeout, read_timeout=read_timeout,
                             max_retries=max_retries)
    return TransformersBackend(spec)


@dataclass
class EndpointArgs:
    """How a command reaches ``--model`` when it is an ``http(s)://`` endpoint: the fields its config shares."""

    served_model: str | None = field(default=None, metadata={
        "help": "model name on the server (default: the first one it lists)"})
    connect_timeout: float = field(default=DEFAULT_CONNECT_TIMEOUT, metadata={
        "help": "seconds to wait for a connection to the endpoint, per attempt"})
    read_timeout: float = field(default=DEFAULT_READ_TIMEOUT, metadata={
        "help": "seconds to wait for the endpoint's answer to one request; a timed-out request is not retried"})
    retries: int = field(default=DEFAULT_RETRIES, metadata={
        "help": "retries of a failed connection or a 429/5xx answer, with exponential backoff from 1 s"})
    concurrency: int = field(default=DEFAULT_CONCURRENCY, metadata={
        "help": "rollouts in flight at once against an endpoint (a local model scores one photo at a time)"})

    def __post_init__(self) -> None:
        if not (self.connect_timeout > 0 and self.read_timeout > 0):
            raise ValueError(f"timeouts must be > 0, got connect {self.connect_timeout}, read {self.read_timeout}")
        if self.retries < 0:
            raise ValueError(f"retries must be at least 0, got {self.retries}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")

    def backend(self, spec: str) -> Backend:
        """The backend for ``spec`` (the command's ``--model``), reached with these settings."""
        return make_backend(spec, served_model=self.served_model, connect_timeout=self.connect_timeout,
                            read_timeout=self.read_timeout, max_retries=self.retries)

    def in_flight(self, backend: Backend) -> int:
        """Rollouts to keep in flight on ``backend``: ``concurrency`` for an endpoint, else 1 (a local model
        computes on this machine's one device; threads would only contend for it)."""
        return self.concurrency if isinstance(backend, OpenAIBackend) else 1
