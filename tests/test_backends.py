"""Backends: the OpenAI-compatible client against a local HTTP server, and the local transformers one."""

from __future__ import annotations

import base64
import csv
import io
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_endpoint import StandInEndpoint, completion
from PIL import Image

from qprobe.agent.backends import (
    DEFAULT_READ_TIMEOUT,
    OpenAIBackend,
    TransformersBackend,
    make_backend,
    to_openai_messages,
)
from qprobe.agent.protocol import render_answer, render_tool_call, render_turn
from qprobe.agent.rollout import RolloutConfig, rollout
from qprobe.errors import QProbeError


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
    with StandInEndpoint([CALL, ANSWER]) as server:
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
    with StandInEndpoint([ANSWER], failures=2, status=500) as server:
        backend = OpenAIBackend(server.url, max_retries=3, backoff=0.01)
        generation = backend.generate([{"role": "user", "content": "hi"}], max_new_tokens=8)
    assert generation.text == ANSWER and len(server.requests) == 3


def test_gives_up_after_the_retries_naming_the_url() -> None:
    with StandInEndpoint([], failures=10, status=503) as server:
        backend = OpenAIBackend(server.url, max_retries=2, backoff=0.01)
        with pytest.raises(QProbeError, match=r"chat/completions: unreachable after 3 attempts: HTTP 503"):
            backend.generate([{"role": "user", "content": "hi"}], max_new_tokens=8)


def test_client_errors_are_not_retried() -> None:
    with StandInEndpoint([], failures=5, status=400) as server:
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
    with StandInEndpoint([]) as server:
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


def test_openai_messages_render_as_the_package_template_renders_the_conversation() -> None:
    """What a server given --chat-template qprobe/agent/chat_template.jinja renders: the same text as
    the protocol messages (images as image_url blocks, which the template draws as the same tokens)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from qprobe.agent import protocol

    crop = [{"type": "image", "image": Image.new("RGB", (28, 28))}, {"type": "text", "text": "Region A"}]
    messages = [*protocol.global_turn(Image.new("RGB", (56, 28)), (560, 280), 2), protocol.assistant_turn(CALL),
                protocol.tool_turn(crop), protocol.tool_turn([{"type": "text", "text": "error: spent"}]),
                protocol.assistant_turn(ANSWER)]
    sent = to_openai_messages(messages)
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user", "assistant"]
    rendered, _ = render_jinja_template([messages, sent], chat_template=protocol.chat_template())
    assert rendered[0] == rendered[1] and "</tool_response>\n<tool_response>\nerror: spent" in rendered[0]


def test_local_backend_picks_cpu_float32_and_generates(tiny_model_dir: Path) -> None:
    backend = make_backend(str(tiny_model_dir))
    assert isinstance(backend, TransformersBackend)
    assert backend.model.device.type == "cpu" and str(backend.model.dtype) == "torch.float32"
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    first = backend.generate(messages, max_new_tokens=5, temperature=1.0, seed=3)
    again = backend.generate(messages, max_new_tokens=5, temperature=1.0, seed=3)
    assert first.text == again.text and first.completion_tokens <= 5 and first.prompt_tokens > 0


@pytest.mark.parametrize(("body", "message"), [
    ({"choices": []}, "expected choices[0].message, got {'choices': []}"),
    ([1, 2], "expected choices[0].message"),
    ({"choices": [{"message": "hi"}]}, "expected choices[0].message"),
    ({"choices": [{"message": {"content": ["x"]}}]}, "choices[0].message.content must be text"),
    (completion(ANSWER, usage="lots"), "usage must be an object, got 'lots'"),
    (completion(ANSWER, usage={"prompt_tokens": "12"}), "usage.prompt_tokens must be a count, got '12'"),
    (completion(ANSWER, usage={"completion_tokens": 10**400}), "usage.completion_tokens must be a count, got a huge"),
])
def test_a_malformed_answer_is_one_line_naming_the_url(body: object, message: str) -> None:
    with StandInEndpoint([body]) as server:
        backend = OpenAIBackend(server.url, backoff=0.01)
        with pytest.raises(QProbeError) as info:
            backend.generate([{"role": "user", "content": "hi"}], max_new_tokens=8)
    text = str(info.value)
    assert text.startswith(f"{server.url}/chat/completions: ") and message in text and "\n" not in text


def test_a_model_listing_that_is_not_an_object_is_one_line() -> None:
    with StandInEndpoint([], models=[{"id": "m"}]) as server, pytest.raises(QProbeError) as info:
        OpenAIBackend(server.url)
    assert str(info.value) == f"{server.url}/models: expected an object with a 'data' list, got [{{'id': 'm'}}]"


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.connections: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                self.connections.append(self.sock.accept()[0])
            except TimeoutError:
                continue

    def __enter__(self) -> SilentServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for conn in self.connections:
            conn.close()
        self.sock.close()


@pytest.mark.slow  # waits out the default read timeout (45 s)
@pytest.mark.timeout(60)  # the guard: with the defaults a server that never answers fails within 60 s
def test_score_against_a_server_that_never_answers_fails_with_the_default_timeout(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qprobe.cli import main

    photo = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(photo)
    with SilentServer() as server:
        rc = main(["score", str(photo), "--model", server.url])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"{server.url}/models: no answer within {DEFAULT_READ_TIMEOUT:g} s" in err[0]
    assert len(server.connections) == 1  # a stuck request is not sent again


def test_score_over_a_malformed_endpoint_records_the_bad_photo_and_scores_the_rest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qprobe.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 48), (90, 90, 90)).save(folder / f"{name}.png")
    huge_box = render_turn("soft", '<answer>{"score": 2.5, "defects": [{"bbox_2d": [-1e308, -1e308, 1e308, 1e308], '
                                   '"type": "blur"}]}</answer>')
    huge_score = render_turn("fine", '<answer>{"score": ' + "9" * 400 + ', "defects": []}</answer>')
    out = tmp_path / "out"
    with StandInEndpoint([huge_box, completion(ANSWER, usage="lots"), huge_score], models=[{"id": "m"}]) as server:
        # One photo at a time: the server's answers are replayed in order, photo a's first.
        flags = ["--model", server.url, "--out", str(out), "--global-max-pixels", "3136", "--crop-max-pixels", "3136",
                 "--concurrency", "1"]
        assert main(["score", str(folder), *flags]) == 2  # a list from /v1/models: no model to talk to
        listing = capsys.readouterr().err.strip().splitlines()
        rc = main(["score", str(folder), "--served-model", "m", *flags])
    assert len(listing) == 1 and f"{server.url}/models: expected an object with a 'data' list" in listing[0]
    assert rc == 1 and f"skipped: {folder / 'b.png'}: {server.url}/chat/completions: usage" in capsys.readouterr().err
    rows = {Path(r["image"]).name: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["a.png"]["score"] == "2.5" and not rows["a.png"]["error"]
    assert json.loads(rows["a.png"]["defects"])[0]["bbox_original"] == [0, 0, 64, 48]  # clamped to the photo
    assert rows["b.png"]["error"] == (f"{folder / 'b.png'}: {server.url}/chat/completions: usage must be an "
                                      "object, got 'lots'")
    assert rows["c.png"]["failure_kind"] == "score_out_of_range" and not rows["c.png"]["score"]
    assert not rows["c.png"]["error"]


def test_an_agent_scorer_records_an_endpoint_failure_as_its_prediction() -> None:
    from qprobe.eval.baselines import AgentScorer

    photo = Image.new("RGB", (64, 48))
    with StandInEndpoint([completion(ANSWER, usage="lots"), ANSWER]) as server:
        scorer = AgentScorer(OpenAIBackend(server.url), RolloutConfig(global_max_pixels=3136, crop_max_pixels=3136))
        failed, scored = scorer(photo), scorer(photo)
    assert failed.score is None and failed.outcome == "error" and failed.trace is None
    assert failed.error == f"{server.url}/chat/completions: usage must be an object, got 'lots'"
    assert scored.score == 2.5 and scored.outcome == "answer" and scored.error is None
