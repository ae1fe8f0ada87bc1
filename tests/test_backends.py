"""Backends: the OpenAI-compatible client against a local HTTP server, and the local transformers one."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from qprobe.agent.backends import OpenAIBackend, TransformersBackend, make_backend, to_openai_messages
from qprobe.agent.protocol import render_answer, render_tool_call, render_turn
from qprobe.agent.rollout import RolloutConfig, rollout
from qprobe.errors import QProbeError


class FakeServer:
    """A chat-completions server on 127.0.0.1: replays ``replies``, may fail first, records requests."""

    def __init__(self, replies: list[str], failures: int = 0, status: int = 500) -> None:
        self.replies = list(replies)
        self.failures = failures
        self.status = status
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: dict | str) -> None:
                data = (json.dumps(body) if isinstance(body, dict) else body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "Qwen/Qwen2.5-VL-7B-Instruct"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(payload)
                if server.failures:
                    server.failures -= 1
                    self._send(server.status, "overloaded")
                    return
                text = server.replies.pop(0)
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 1500, "completion_tokens": 40}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def free_port_url() -> Iterator[str]:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"


CALL = render_turn("the top left looks soft", render_tool_call([0, 0, 56, 56]))
ANSWER = render_turn("a local blur", render_answer(2.5, []))


def test_rollout_over_the_endpoint_sends_the_crop_as_an_image() -> None:
    photo = Image.new("RGB", (640, 480), (120, 30, 200))
    with FakeServer([CALL, ANSWER]) as server:
        backend = make_backend(server.url)
        assert isinstance(backend, OpenAIBackend) and backend.model == "Qwen/Qwen2.5-VL-7B-Instruct"
        trace = rollout(backend, photo, RolloutConfig(global_max_pixels=112 * 112, crop_max_pixels=112 * 112,
                                                      max_crops=2, max_new_tokens=300, seed=7))
    assert trace.outcome == "answer" and trace.score == 2.5
    first, second = server.requests
    assert first["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and first["seed"] == 7 and first["temperature"] == 0
    assert first["max_tokens"] == 300 and second["max_tokens"] == 260  # one budget over all turns
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][2]["content"] == CALL
    tool = second["messages"][3]["content"]
    assert tool[0] == {"type": "text", "text": "<tool_response>\n"} and tool[-1]["text"] == "\n</tool_response>"
    url = tool[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    crop = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert crop.size == (112, 112) and crop.getpixel((5, 5)) == (120, 30, 200)  # lossless
    view = Image.open(io.BytesIO(base64.b64decode(second["messages"][1]["content"][0]["image_url"]["url"][22:])))
    assert view.size == (112, 84)
    assert trace.turns[0].prompt_tokens == 1500 and trace.cost.generated_tokens == 80


def test_retries_after_a_server_error() -> None:
    with FakeServer([ANSWER], failures=2, status=500) as server:
        backend = OpenAIBackend(server.url, max_retries=3, backoff=0.01)
        generation = backend.generate([{"role": "user", "content": "hi"}], max_new_tokens=8)
    assert generation.text == ANSWER and len(server.requests) == 3


def test_gives_up_after_the_retries_naming_the_url() -> None:
    with FakeServer([], failures=10, status=503) as server:
        backend = OpenAIBackend(server.url, max_retries=2, backoff=0.01)
        with pytest.raises(QProbeError, match=r"chat/completions: unreachable after 3 attempts: HTTP 503"):
            backend.generate([{"role": "user", "content": "hi"}], max_new_tokens=8)


def test_client_errors_are_not_retried() -> None:
    with FakeServer([], failures=5, status=400) as server:
        backend = OpenAIBackend(server.url, max_retries=3, backoff=0.01)
        with pytest.raises(QProbeError, match="HTTP 400"):
            backend.generate([{"role": "user", "content": "hi"}], max_new_tokens=8)
    assert len(server.requests) == 1


def test_unreachable_endpoint_is_a_clear_error(free_port_url: str) -> None:
    with pytest.raises(QProbeError) as info:
        OpenAIBackend(free_port_url, max_retries=1, backoff=0.01)
    message = str(info.value)
    assert message.startswith(f"{free_port_url}/models: unreachable after 2 attempts: cannot connect")
    assert "\n" not in message


def test_bare_host_gets_the_v1_prefix() -> None:
    with FakeServer([]) as server:
        backend = OpenAIBackend(server.url.removesuffix("/v1"), model="m")
    assert backend.base_url == server.url and backend.model == "m"


def test_consecutive_tool_messages_share_one_user_turn() -> None:
    image = Image.new("RGB", (28, 28))
    tool = {"role": "tool", "name": "crop", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": "Region A"}]}
    converted = to_openai_messages([{"role": "assistant", "content": "x"}, tool, tool])
    assert [m["role"] for m in converted] == ["assistant", "user"]
    texts = [b.get("text") for b in converted[1]["content"]]
    assert texts == ["<tool_response>\n", None, "Region A", "\n</tool_response>",
                     "\n<tool_response>\n", None, "Region A", "\n</tool_response>"]


def test_local_backend_picks_cpu_float32_and_generates(tiny_model_dir: Path) -> None:
    backend = make_backend(str(tiny_model_dir))
    assert isinstance(backend, TransformersBackend)
    assert backend.model.device.type == "cpu" and str(backend.model.dtype) == "torch.float32"
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    first = backend.generate(messages, max_new_tokens=5, temperature=1.0, seed=3)
    again = backend.generate(messages, max_new_tokens=5, temperature=1.0, seed=3)
    assert first.text == again.text and first.completion_tokens <= 5 and first.prompt_tokens > 0
