"""llama.cpp's llama-server for the tests: the tiny InternVL model as GGUF, a server process, and its fixtures.

`make llama-server` builds .venv/llama-server/bin/llama-server from the llama.cpp source vendored in the pinned
llama-cpp-python sdist. The fixtures skip, saying so, only while that binary is missing; with it, any failure
(conversion, start, health) fails the test. Load them with `pytest_plugins = ["llama_server"]`.

The language model is written by bench/peer_llamacpp.py's GGUF writer (the tiny tokenizer is refused by
llama.cpp's converter), the projector by llama.cpp's own `convert_hf_to_gguf.py --mmproj` through
bench/peer_mtmd.py, both f16, from the original InternVL layout, with one tile per image (256 image tokens).

What this llama-server (llama.cpp 0.5.0-dev, build b1-0c1e570) answers, as seen on the tiny model:

- `GET /health`: 200 `{"status":"ok"}` once the model is loaded; before, every endpoint answers 503
  `{"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}` (from its source).
- `GET /v1/models`: `{"object": "list", "data": [{"id": "model.gguf", "aliases": ["model.gguf"], "tags": [],
  "object": "model", "created": <unix s>, "owned_by": "llamacpp", "meta": {"vocab_type": 2, "n_vocab": 1024,
  "n_ctx": 2048, "n_ctx_train": 32768, "n_embd": 64, "n_params": 229952, "size": 461056, "ftype": "F16"}}],
  "models": [<Ollama-style entry: name, model, capabilities ["completion", "multimodal"], details, ...>]}`.
  The id is -m as given (a path if a path was given; --alias overrides); meta.n_ctx is one slot's context.
- `GET /props`: total_slots, default_generation_settings.n_ctx (one slot's), modalities {"vision": true,
  "video": true, "audio": false}, chat_template (chatml when the GGUF has none), bos_token, eos_token
  ("<|im_end|>"), build_info ("b1-0c1e570"), model_path, media_marker, ui: false.
- `POST /v1/chat/completions` with `"stream": true`: 200, text/event-stream; `data: {json}` lines, each followed
  by a blank line, the last `data: [DONE]`. A chunk: `{"choices": [{"finish_reason": null, "index": 0, "delta":
  {"content": "<text>"}}], "created": <s>, "id": "chatcmpl-<32 letters>", "model": "model.gguf",
  "system_fingerprint": "b1-0c1e570", "object": "chat.completion.chunk"}`. The first delta is `{"role":
  "assistant", "content": null}` only when the first token makes text on its own (a token ending inside a UTF-8
  character is held back, and that chunk then never comes); a chunk may carry several tokens, and undecodable
  bytes come as U+FFFD. The last chunk with a choice: `"finish_reason": "length"` (max_tokens, or the slot's
  context full: then fewer tokens) or `"stop"`, `"delta": {}`, and `"timings": {"cache_n", "prompt_n",
  "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n", "predicted_ms",
  "predicted_per_token_ms", "predicted_per_second"}`. With `"stream_options": {"include_usage": true}` the
  timings move to one more chunk, `"choices": []` with `"usage": {"completion_tokens", "prompt_tokens",
  "total_tokens", "prompt_tokens_details": {"cached_tokens"}}`; without it no usage at all. Unstreamed, the
  answer is `"object": "chat.completion"` with `message` and `usage`.
- Several images in one message (text, image, text, image, ...) are accepted, each image its own tokens (256
  a tile here, plus <img> and </img>); one image and a short question make 273 prompt tokens.
- Prompts are cached per slot (`cache_prompt`, on by default): asking the same again evaluates 1 prompt token.
- An image it cannot decode: 400 `{"error": {"code": 400, "message": "Failed to load image or audio file",
  "type": "invalid_request_error"}}`, streamed or not, before any stream starts.
- `-np N -c CTX`: N slots of CTX / N tokens each (kv_unified off when -np is given; without -np, 4 slots share
  all of CTX). A longer prompt: 400 `{"error": {"code": 400, "message": "request (1073 tokens) exceeds the
  available context size (1024 tokens), try increasing it", "type": "exceed_context_size_error",
  "n_prompt_tokens": 1073, "n_ctx": 1024}}`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER_DIR = REPO / ".venv" / "llama-server"
BINARY = SERVER_DIR / "bin" / "llama-server"
MISSING = f"{BINARY.relative_to(REPO)} is missing: `make llama-server` builds it"


def llama_source(build_dir: Path = SERVER_DIR) -> Path:
    """The llama.cpp source the server was built from (its CMake cache says), whose converter writes the mmproj."""
    cache = build_dir / "CMakeCache.txt"
    for line in cache.read_text().splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            return Path(line.split("=", 1)[1])
    raise RuntimeError(f"{cache}: no CMAKE_HOME_DIRECTORY")


def convert_for_llama(hf_dir: Path, out_dir: Path, max_tiles: int = 1) -> tuple[Path, Path]:
    """OUT_DIR/model.gguf and OUT_DIR/mmproj.gguf (both f16) from an original-layout InternVL folder.

    Kept when both are there already. max_tiles is the projector's max_dynamic_patch: llama.cpp tiles each image
    itself up to that many tiles (a thumbnail added past one).
    """
    model, mmproj = out_dir / "model.gguf", out_dir / "mmproj.gguf"
    if model.exists() and mmproj.exists():
        return model, mmproj
    source = llama_source()
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    try:
        import gguf  # noqa: F401
    except ImportError:  # only `make llama-server`, not the bench extra: the vendored gguf-py writes as well
        sys.path.append(str(source / "gguf-py"))
    from peer_llamacpp import write_gguf
    from peer_mtmd import convert_mmproj

    out_dir.mkdir(parents=True, exist_ok=True)
    partial = model.with_suffix(".partial")
    write_gguf(hf_dir, partial)
    partial.replace(model)
    convert_mmproj(hf_dir, mmproj, max_tiles, source)
    return model, mmproj


def free_port() -> int:
    """A TCP port on loopback nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """One llama-server process on 127.0.0.1:port serving a model and its projector; logs in log_path.

    start() waits until GET /health answers 200; kill() is SIGKILL (a crash), stop() a clean shutdown; start()
    again brings it back on the same port.
    """

    def __init__(
        self,
        model: Path,
        mmproj: Path,
        log_dir: Path,
        parallel: int = 2,
        ctx: int = 4096,
        port: int | None = None,
        threads: int | None = None,
        extra_args: tuple[str, ...] = (),
        binary: Path = BINARY,
    ) -> None:
        self.model, self.mmproj, self.binary = model, mmproj, binary
        self.parallel, self.ctx, self.threads = parallel, ctx, threads
        self.extra_args = tuple(extra_args)
        self.port = port or free_port()
        self.log_path = log_dir / f"llama-server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # run in the model's folder and given its file name, which is then the model's id in /v1/models
        command = [str(self.binary), "-m", self.model.name, "--mmproj", str(self.mmproj.resolve())]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "-np", str(self.parallel), "-c", str(self.ctx)]
        command += ["--no-webui", "--no-warmup"]
        if self.threads:
            command += ["-t", str(self.threads)]
        return command + list(self.extra_args)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 120.0) -> LlamaServer:
        """Start the process and wait (up to timeout seconds) for /health to answer 200."""
        if self.running():
            raise RuntimeError(f"llama-server on port {self.port} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.model.parent
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.health() == 200:
                return self
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"llama-server on port {self.port} not healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def health(self) -> int | None:
        """GET /health's status code; None when nothing answers."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed or answered."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after timeout seconds."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def llama_binary() -> Path:
    """The llama-server binary; the test is skipped (only) when it has not been built."""
    if not (BINARY.is_file() and os.access(BINARY, os.X_OK)):
        pytest.skip(MISSING)
    return BINARY


@pytest.fixture(scope="session")
def llama_gguf(llama_binary: Path, tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model's (model.gguf, mmproj.gguf), written once per session."""
    return convert_for_llama(tiny_hf, tmp_path_factory.mktemp("llama_gguf"))


@pytest.fixture(scope="module")
def llama_server(
    llama_binary: Path, llama_gguf: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """A running llama-server with the tiny model, 2 slots of 2048 tokens, for one test module; stopped after it.

    A test that kills it starts it again (server.start()) before it ends.
    """
    model, mmproj = llama_gguf
    server = LlamaServer(model, mmproj, tmp_path_factory.mktemp("llama_server"), parallel=2, ctx=4096, threads=2)
    with server:
        yield server
