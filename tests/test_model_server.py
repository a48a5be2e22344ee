"""`model.backend: openai` against a server that misbehaves on purpose: a small HTTP server on loopback that speaks
the OpenAI chat-completions stream as llama-server does (the shapes in tests/llama_server.py's notes), and fails
the ways a network peer fails: busy (429, 503, with and without Retry-After), a refusal (400 with its message), a
stream cut mid-answer, garbage, nothing listening. Real `vlbatch run` processes over a real spool and database.

The same records as a local answer are checked, and that nothing is committed twice; tests/test_llama_server.py
runs the real llama-server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from spool_env import SpoolEnv

pytestmark = pytest.mark.slow

MODEL = {"id": "internvl3-tiny.gguf", "object": "model", "owned_by": "llamacpp", "created": 0, "meta": {"n": 1}}


class Behaviour:
    """What the stub does with each chat request, in order: 'ok', 'busy-429', 'busy-503', 'refuse', 'cut',
    'garbage'; the last one repeats. Requests are recorded."""

    def __init__(self, *steps: str, retry_after: str | None = "0") -> None:
        self.steps = list(steps) or ["ok"]
        self.retry_after = retry_after
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def next(self, body: dict) -> str:
        with self.lock:
            self.requests.append(body)
            return self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]


def _handler(behaviour: Behaviour, model: dict):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{**model, "created": int(time.time())}]})
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body["_auth"] = self.headers.get("Authorization")
            step = behaviour.next(body)
            if step.startswith("busy"):
                status = int(step.split("-")[1])
                headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after is not None else {}
                return self._json(status, {"error": {"message": "server busy"}}, headers)
            if step == "refuse":
                return self._json(400, {"error": {"code": 400, "message": "failed to decode image bytes"}})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            images = sum(
                1
                for m in body["messages"]
                if isinstance(m["content"], list)
                for p in m["content"]
                if p["type"] == "image_url"
            )
            words = [f"seen{images}", " a", " photo", " of", " things"]
            if step == "garbage":
                self.wfile.write(b"data: <html>not json</html>\n\n")
                return
            for n, word in enumerate(words):
                if step == "cut" and n == 2:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                chunk = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.01)
            last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            usage = {"choices": [], "usage": {"prompt_tokens": 40 + 256 * images, "completion_tokens": len(words)}}
            self.wfile.write(f"data: {json.dumps(last)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    return Handler


@pytest.fixture
def stub():
    servers = []

    def start(behaviour: Behaviour, model: dict = MODEL) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(behaviour, model))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def env(tmp_path: Path) -> SpoolEnv:
    env = SpoolEnv(tmp_path, tmp_path / "no-model-folder")
    env.image("a.jpg", seed=1)
    env.image("b.png", seed=2)
    return env


def _configure(env: SpoolEnv, url: str, **model: object) -> None:
    settings = {"backend": "openai", "url": url, "concurrency": 2, "timeout_seconds": 5, **model}
    env.write_config(model=settings, give_up_seconds=3, heartbeat_seconds=0.5)


def _run(env: SpoolEnv, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VLBATCH_")}
    environ.update(extra_env or {})
    return subprocess.run(env.cli(*args), capture_output=True, text=True, env=environ, cwd=env.root, timeout=120)


def _job(env: SpoolEnv, name: str = "photos", extra: str = "") -> None:
    env.drop(f"{name}.yaml", f"prompt: What is in this photo?\ninputs: ../../media/\n{extra}")


def test_a_folder_job_is_answered_and_recorded_as_a_local_one(env: SpoolEnv, stub):
    behaviour = Behaviour("ok")
    _configure(env, stub(behaviour))
    _job(env)
    done = _run(env, "run")
    assert done.returncode == 0, done.stderr
    rows = env.results()
    assert sorted(Path(json.loads(r["media_paths"])[0]).name for r in rows) == ["a.jpg", "b.png"]
    for row in rows:
        assert row["error"] is None and row["answer"] == "seen1 a photo of things"
        assert row["backend"] == "openai" and row["node"].startswith("127.0.0.1:")
        assert row["model_id"].startswith("internvl3-tiny.gguf@")
        assert (row["output_tokens"], row["prompt_tokens"], row["finish_reason"]) == (5, 296, "stop")
        assert row["ttft_ms"] >= row["preprocess_ms"] + row["prefill_ms"] - 1 and row["decode_ms"] > 0
        assert row["tokens_per_s"] == pytest.approx(4 / (row["decode_ms"] / 1e3), rel=1e-6)
    # the request: vlbatch's system turn, the image as a data URL, the job's settings
    request = behaviour.requests[0]
    assert request["model"] == "internvl3-tiny.gguf" and request["stream"] is True
    assert request["messages"][0]["role"] == "system"
    parts = request["messages"][1]["content"]
    assert parts[0]["image_url"]["url"].startswith(("data:image/jpeg;base64,", "data:image/png;base64,"))
    assert parts[-1] == {"type": "text", "text": "\nWhat is in this photo?"}
    assert request["max_tokens"] == 12 and request["temperature"] == 0
    # who answered: the server's model and address, on the gallery's cards and in status
    from batch.service.web.cards import card

    assert card(rows[0], lambda path: None)["answered_by"] == f"internvl3-tiny.gguf at {rows[0]['node']}"
    local = card({**rows[0], "backend": "onnxruntime"}, lambda path: None)
    assert local["answered_by"] == ""


def test_the_same_job_again_is_reused_and_another_model_answers_again(env: SpoolEnv, stub):
    behaviour = Behaviour("ok")
    url = stub(behaviour)
    _configure(env, url)
    _job(env)
    assert _run(env, "run").returncode == 0
    _job(env, "again")
    assert _run(env, "run").returncode == 0
    assert len(env.results()) == 2 and len(behaviour.requests) == 2  # reused: no request, no new answer
    other = stub(Behaviour("ok"), {**MODEL, "id": "internvl3-other.gguf"})
    _configure(env, other)
    _job(env, "other")
    assert _run(env, "run").returncode == 0
    rows = env.results()
    assert len(rows) == 4 and rows[-1]["model_id"].startswith("internvl3-other.gguf@")


@pytest.mark.parametrize("busy", ["busy-429", "busy-503"])
@pytest.mark.parametrize("retry_after", ["1", None])
def test_a_busy_server_is_waited_for_and_each_file_answered_once(env: SpoolEnv, stub, busy: str, retry_after):
    behaviour = Behaviour(busy, "ok", retry_after=retry_after)
    _configure(env, stub(behaviour), concurrency=1)
    _job(env)
    started = time.monotonic()
    done = _run(env, "run")
    assert done.returncode == 0, done.stderr
    rows = env.results()
    assert len(rows) == 2 and all(r["error"] is None for r in rows)
    assert len(behaviour.requests) == 3  # the busy answer, then one request per file
    if retry_after == "1":
        assert time.monotonic() - started >= 1.0


def test_a_stream_cut_mid_answer_is_asked_again_and_committed_once(env: SpoolEnv, stub):
    behaviour = Behaviour("cut", "ok")
    _configure(env, stub(behaviour), concurrency=1)
    _job(env)
    assert _run(env, "run").returncode == 0
    rows = env.results()
    assert len(rows) == 2 and all(r["answer"] == "seen1 a photo of things" for r in rows)


def test_a_refused_request_fails_that_file_with_the_server_s_message(env: SpoolEnv, stub):
    _configure(env, stub(Behaviour("refuse", "ok")), concurrency=1)
    _job(env)
    done = _run(env, "run")
    assert done.returncode == 1  # a file failing for the first time
    rows = env.results()
    failed = [r for r in rows if r["error"]]
    assert len(failed) == 1 and "HTTP 400: failed to decode image bytes" in failed[0]["error"]
    assert [r["answer"] for r in rows if not r["error"]] == ["seen1 a photo of things"]
    assert (env.jobs / "failed" / "photos.yaml").exists()


def test_garbage_fails_loudly_naming_the_server(env: SpoolEnv, stub):
    url = stub(Behaviour("garbage"))
    _configure(env, url, concurrency=1)
    _job(env)
    assert _run(env, "run").returncode == 1
    errors = [r["error"] for r in env.results()]
    assert len(errors) == 2 and all(e.startswith(f"{url}: a stream event that is not JSON") for e in errors)


def test_nothing_listening_is_a_passing_fault_and_nothing_is_recorded(env: SpoolEnv):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _configure(env, f"http://127.0.0.1:{port}")
    _job(env)
    done = _run(env, "run")
    assert done.returncode == 3, done.stderr  # gave up on a fault of the machine after spool.give_up_seconds
    assert "cannot reach the server" in done.stderr
    assert (env.inbox / "photos.yaml").exists()  # handed back, to run again
    assert env.results() == []


def test_the_api_key_is_sent_and_never_stored(env: SpoolEnv, stub):
    behaviour = Behaviour("ok")
    _configure(env, stub(behaviour), api_key_env="SERVER_KEY_FOR_TEST")
    _job(env)
    done = _run(env, "run", extra_env={"SERVER_KEY_FOR_TEST": "sk-secret-123"})
    assert done.returncode == 0, done.stderr
    assert [r["_auth"] for r in behaviour.requests] == ["Bearer sk-secret-123"] * 2
    assert b"sk-secret-123" not in env.db_path.read_bytes()
    assert "sk-secret-123" not in done.stderr


def test_ask_streams_the_server_s_answer(env: SpoolEnv, stub):
    behaviour = Behaviour("ok")
    _configure(env, stub(behaviour))
    done = _run(env, "ask", "-p", "What is here?", str(env.media / "a.jpg"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "seen1 a photo of things"
    assert "ttft" in done.stderr and len(behaviour.requests) == 1


def test_estimate_and_ray_say_why_not(env: SpoolEnv, stub):
    _configure(env, stub(Behaviour("ok")))
    _job(env)
    ray = _run(env, "run", "--ray")
    assert ray.returncode == 1 and "model.concurrency" in ray.stderr
    estimate = _run(env, "estimate", str(env.inbox / "photos.yaml"))
    assert estimate.returncode == 1 and "a model server's speed is its own" in estimate.stderr


def test_together_video_and_text_jobs_in_internvl_s_layout(env: SpoolEnv, stub):
    """Several images labelled Image-1, Image-2; a video's frames Frame1 ... FrameN (video_frames); a job without
    inputs as plain chat; a HEIC photo re-encoded as JPEG (servers read JPEG, PNG, WebP)."""
    import numpy as np
    from synthetic import synthetic_image, write_heic, write_video

    frames = [np.asarray(synthetic_image(96, 64, seed=s)) for s in range(12)]
    write_video(env.media / "clip.mp4", frames)
    write_heic(env.media / "phone.heic", synthetic_image(120, 90, seed=5))
    behaviour = Behaviour("ok")
    _configure(env, stub(behaviour), concurrency=1)
    env.drop("pair.yaml", "prompt: Compare them.\ninputs: [../../media/a.jpg, ../../media/b.png]\nmode: together\n")
    env.drop("clip.yaml", "prompt: What happens?\ninputs: ../../media/clip.mp4\nvideo_frames: 4\n")
    env.drop("text.yaml", "prompt: Say hello.\n")
    env.drop("heic.yaml", "prompt: Caption it.\ninputs: ../../media/phone.heic\n")
    done = _run(env, "run")
    assert done.returncode == 0, done.stderr
    by_prompt = {
        r["messages"][-1]["content"][-1]["text"].strip()
        if isinstance(r["messages"][-1]["content"], list)
        else r["messages"][-1]["content"]: r["messages"][-1]["content"]
        for r in behaviour.requests
    }
    pair = by_prompt["Compare them."]
    assert [p.get("text") for p in pair if p["type"] == "text"] == ["Image-1: ", "\nImage-2: ", "\nCompare them."]
    clip = by_prompt["What happens?"]
    labels = [p["text"] for p in clip if p["type"] == "text"]
    assert labels == ["Frame1: ", "\nFrame2: ", "\nFrame3: ", "\nFrame4: ", "\nWhat happens?"]
    assert all(p["image_url"]["url"].startswith("data:image/jpeg;base64,") for p in clip if p["type"] == "image_url")
    assert by_prompt["Say hello."] == "Say hello."
    heic = by_prompt["Caption it."]
    assert heic[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    answers = {r["prompt"]: r for r in env.results()}
    assert answers["What happens?"]["tiles"] == 4 and answers["Compare them."]["tiles"] == 2


def test_images_go_as_they_are_unless_a_server_could_misread_them(tmp_path: Path):
    """An upright JPEG, PNG or WebP is sent byte for byte; a JPEG rotated by its EXIF tag, or an image over the
    size caps, is decoded upright and sent as JPEG (a server would not turn it); a video as its sampled frames."""
    import io

    import numpy as np
    from PIL import Image
    from synthetic import synthetic_image, write_video

    from batch.infer import encode
    from batch.infer.settings import MediaSettings

    settings = MediaSettings(video_frames=3)
    plain = tmp_path / "plain.jpg"
    synthetic_image(120, 80, seed=1).save(plain, quality=90)
    png = tmp_path / "plain.png"
    synthetic_image(120, 80, seed=2).save(png)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # 90 degrees clockwise
    synthetic_image(120, 80, seed=3).save(rotated, exif=exif)
    (mime1, data1), (mime2, data2), (mime3, data3) = encode.encode_media([plain, png, rotated], "image", settings)
    assert (mime1, data1) == ("image/jpeg", plain.read_bytes())
    assert (mime2, data2) == ("image/png", png.read_bytes())
    assert mime3 == "image/jpeg" and data3 != rotated.read_bytes()
    assert Image.open(io.BytesIO(data3)).size == (80, 120)  # upright, as vlbatch's own model sees it
    big = tmp_path / "big.png"
    synthetic_image(encode.MAX_EDGE + 100, 64, seed=4).save(big)
    ((mime, data),) = encode.encode_media([big], "image", settings)
    assert mime == "image/jpeg" and max(Image.open(io.BytesIO(data)).size) == encode.MAX_EDGE
    clip = tmp_path / "clip.mp4"
    write_video(clip, [np.asarray(synthetic_image(96, 64, seed=s)) for s in range(12)])
    frames = encode.encode_media([clip], "video", settings)
    assert [m for m, _ in frames] == ["image/jpeg"] * 3
