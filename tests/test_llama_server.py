"""The real llama-server (`make llama-server`) serving the tiny InternVL model: what the tests of
`model.backend: openai` count on it answering (models list, a streamed answer to an image, usage, several
images in one message, the errors), and that the fixture can kill it and start it again on its port."""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest
from PIL import Image

if TYPE_CHECKING:  # imported by pytest_plugins below, so that pytest rewrites its asserts
    from llama_server import LlamaServer

pytest_plugins = ["llama_server"]
pytestmark = pytest.mark.slow

IMAGE_TOKENS = 256  # one 448x448 tile of the tiny model: 32x32 patches, pixel-shuffled by 0.5


def png_url(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, or of a POST of body as JSON; HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read().decode()


def sse_events(text: str) -> list[dict]:
    """The JSON events of a chat stream; asserts the framing: `data: ` lines, a blank line after each, [DONE] last."""
    lines = text.split("\n")
    assert lines[-3:] == ["data: [DONE]", "", ""], text[-200:]
    payloads = lines[0:-3:2]
    assert all(blank == "" for blank in lines[1:-3:2]), text
    assert all(line.startswith("data: ") for line in payloads), text
    return [json.loads(line[len("data: ") :]) for line in payloads]


def chat(server: LlamaServer, content: list[dict], max_tokens: int = 8, **extra: object) -> tuple[int, str, str]:
    body = {"model": "model.gguf", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    body |= {"temperature": 0, **extra}
    return request(server.url + "/v1/chat/completions", body)


def photo(color: tuple[int, int, int], question: str = "Describe this image.") -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": png_url(color)}}, {"type": "text", "text": question}]


def frames(n: int) -> list[dict]:
    """A clip as InternVL reads one: 'FrameK: ' before each frame, the question last."""
    content: list[dict] = []
    for k in range(n):
        content += [{"type": "text", "text": f"Frame{k + 1}: "}]
        content += [{"type": "image_url", "image_url": {"url": png_url((30 * k, 90, 200 - 20 * k))}}]
    return content + [{"type": "text", "text": "What happens in this video?"}]


def test_lists_the_one_model_and_its_slots(llama_server: LlamaServer) -> None:
    status, _, text = request(llama_server.url + "/v1/models")
    assert status == 200
    models = json.loads(text)
    assert models["object"] == "list"
    [entry] = models["data"]
    assert entry["id"] == "model.gguf" and entry["object"] == "model" and entry["owned_by"] == "llamacpp"
    assert entry["meta"]["n_vocab"] == 1024 and entry["meta"]["n_ctx"] == 2048  # -c 4096 over -np 2
    props = json.loads(request(llama_server.url + "/props")[2])
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 2048
    assert props["modalities"]["vision"] is True
    assert props["eos_token"] == "<|im_end|>"


def test_streams_an_answer_to_an_image_with_usage(llama_server: LlamaServer) -> None:
    status, content_type, text = chat(
        llama_server, photo((200, 40, 40)), stream=True, stream_options={"include_usage": True}
    )
    assert status == 200 and content_type.startswith("text/event-stream")
    events = sse_events(text)
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1 and all(e["system_fingerprint"] for e in events)
    *answer, last, usage_chunk = events
    assert all(e["choices"][0]["finish_reason"] is None for e in answer)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in answer)
    usage = usage_chunk["usage"]
    assert usage_chunk["choices"] == []
    assert usage["prompt_tokens"] > IMAGE_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == ("length" if usage["completion_tokens"] == 8 else "stop")
    # the same question unstreamed: the same greedy answer, in one message
    status, _, text = chat(llama_server, photo((200, 40, 40)))
    assert status == 200
    whole = json.loads(text)
    assert whole["choices"][0]["message"]["content"] == streamed
    assert whole["usage"]["completion_tokens"] == usage["completion_tokens"]


def test_usage_only_when_asked(llama_server: LlamaServer) -> None:
    status, _, text = chat(llama_server, photo((10, 120, 10)), stream=True)
    assert status == 200
    events = sse_events(text)
    assert all("usage" not in e and e["choices"] for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert events[-1]["timings"]["predicted_n"] >= 1  # llama.cpp's own figures, on the last chunk


def test_takes_several_frames_in_one_message(llama_server: LlamaServer) -> None:
    prompt_tokens = {}
    for n in (1, 3):
        status, _, text = chat(llama_server, frames(n), stream=True, stream_options={"include_usage": True})
        assert status == 200, text
        prompt_tokens[n] = sse_events(text)[-1]["usage"]["prompt_tokens"]
    assert prompt_tokens[3] - prompt_tokens[1] >= 2 * IMAGE_TOKENS  # each frame its own image tokens


def test_refuses_a_prompt_longer_than_its_slot(llama_server: LlamaServer) -> None:
    status, _, text = chat(llama_server, frames(8), stream=True)  # 8 x ~265 tokens > 2048 a slot
    assert status == 400
    error = json.loads(text)["error"]
    assert error["type"] == "exceed_context_size_error" and error["n_ctx"] == 2048


def test_refuses_an_image_it_cannot_decode(llama_server: LlamaServer) -> None:
    garbage = "data:image/png;base64," + base64.b64encode(os.urandom(256)).decode()
    content = [{"type": "image_url", "image_url": {"url": garbage}}, {"type": "text", "text": "Describe."}]
    status, content_type, text = chat(llama_server, content, stream=True)
    assert status == 400 and content_type.startswith("application/json")
    assert json.loads(text)["error"] == {
        "code": 400,
        "message": "Failed to load image or audio file",
        "type": "invalid_request_error",
    }


def test_answers_two_requests_at_once(llama_server: LlamaServer) -> None:
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda c: chat(llama_server, photo(c), max_tokens=16), [(0, 0, 0), (255, 255, 0)]))
    assert [status for status, _, _ in answers] == [200, 200]


def test_killed_and_started_again_on_its_port(llama_server: LlamaServer) -> None:
    port = llama_server.port
    llama_server.kill()
    assert llama_server.health() is None  # nothing listens
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(llama_server.url + "/v1/models", timeout=5)
    llama_server.start()
    assert llama_server.port == port and llama_server.health() == 200
    assert chat(llama_server, photo((1, 2, 3)))[0] == 200
