"""A stand-in OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benchmarks.

One implementation for both: the backend tests replay scripted answers through it, the concurrency
test and ``benchmarks/endpoint_throughput.py`` have it answer protocol-valid turns
(:func:`protocol_turns`) after a fixed latency, many requests at once.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from qprobe.agent.protocol import Defect, render_answer, render_tool_call, render_turn

Reply = Callable[[dict[str, Any]], Any]


def completion(text: str, usage: object = None) -> dict[str, Any]:
    """A chat-completions answer body carrying ``text``."""
    return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage if usage is not None else {"prompt_tokens": 1500, "completion_tokens": 40}}


def protocol_turns(crop: bool = True) -> Reply:
    """Protocol-valid assistant turns: a crop call first (``crop``), then an answer whose score and box
    follow from the photo's global view, so results swapped between photos would show."""

    def reply(payload: dict[str, Any]) -> str:
        messages = payload["messages"]
        if crop and not any(m["role"] == "assistant" for m in messages):
            return render_turn("the upper left looks soft", render_tool_call([0, 0, 28, 28]))
        view = next(b["image_url"]["url"] for m in messages if isinstance(m["content"], list)
                    for b in m["content"] if b.get("type") == "image_url")
        digest = zlib.crc32(view.encode())
        box = (digest % 8, digest // 8 % 8, 20 + digest // 64 % 8, 20 + digest // 512 % 8)
        return render_turn("a local blur", render_answer(1 + digest % 401 / 100, [Defect(box, "blur")]))

    return reply


class StandInEndpoint:
    """A chat-completions server on 127.0.0.1 (``url`` ends in ``/v1``), used as a context manager.

    ``reply`` gives each answer: a list is replayed in order, a callable is asked with the request's
    payload; an answer is the assistant's text, or a whole body (any JSON value) sent as it is. The
    first ``failures`` requests get ``status`` instead; every answer waits ``latency`` seconds, each
    request in its own thread, as a server batching them would. ``models`` is what ``/v1/models``
    answers; ``requests`` records every chat payload, ``most_in_flight`` the most answered at once.
    """

    def __init__(self, reply: list[Any] | Reply, *, latency: float = 0.0, failures: int = 0, status: int = 500,
                 models: object = None) -> None:
        replies = list(reply) if isinstance(reply, list) else None
        self.reply: Reply = (lambda _: replies.pop(0)) if replies is not None else reply
        self.latency = latency
        self.models = models if models is not None else {"object": "list",
                                                          "data": [{"id": "Qwen/Qwen2.5-VL-7B-Instruct"}]}
        self.failures = failures
        self.status = status
        self.requests: list[dict[str, Any]] = []
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's server
            disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: object) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, server.models)
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(payload)
                    fail = server.failures > 0
                    server.failures -= fail
                    reply = None if fail else server.reply(payload)
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                time.sleep(server.latency)
                with server._lock:
                    server.in_flight -= 1
                if fail:
                    self._send(server.status, "overloaded")
                else:
                    self._send(200, completion(reply) if isinstance(reply, str) else reply)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # the default 5 would drop connections when 64 arrive at once

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StandInEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
