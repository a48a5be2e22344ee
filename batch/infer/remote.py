"""An OpenAI-compatible model server as the model (`model.backend: openai`): llama.cpp's llama-server, vLLM, axllm.

One `ServerModel` answers a unit as the local pipeline does, through the server's `POST /v1/chat/completions`:
the prompt in vlbatch's chat layout (its system turn; several images labelled `Image-1: `, ...; a video's frames
`Frame1: `, ...), the media as `data:` URLs (batch/infer/encode.py, made in the decoding child), the answer
streamed (server-sent events). Timings come from the stream: preparation is the media's encoding, the time to
the first token is the server's ViT and prefill together (`prefill_ms`; `vit_ms` stays 0: the server does not
say), decoding runs from the first token to the last. Token counts come from the stream's `usage`.

Faults of the peer are told apart from the unit's own:
- ServerUnavailable, a PassingFault (the worker waits it out, the unit is asked again): nothing listening, a
  connection or read time-out, 429, 502, 503 and 504 (Retry-After honoured), a stream cut before its end. Each
  request is tried ATTEMPTS times before the fault reaches the worker.
- ServerRefused (the unit fails with the server's own message): 400, 404, 413, 415, 422 and any other 4xx, and 500.
- ServerProtocolError (the unit fails, naming the server): an answer that is not an OpenAI chat stream.
The API key is read from the environment variable `model.api_key_env` names, at each request; it is never kept
in the database or a log line.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batch.errors import PassingFault, VlbatchError
from batch.infer.decode import MediaDecoder
from batch.infer.generate import GenerationResult
from batch.infer.media import media_kind
from batch.infer.prompt import DEFAULT_SYSTEM
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.infer.timings import Timings

BACKEND = "openai"
ATTEMPTS = 3  # tries of one request before a passing fault goes to the worker
RETRY_FIRST_S = 1.0  # the first pause between tries, doubled each time ...
RETRY_CAP_S = 30.0  # ... and never longer, nor a Retry-After longer than this
_PASSING_STATUS = {429, 502, 503, 504}
log = logging.getLogger(__name__)
_NETWORK_ERRORS = (OSError, http.client.HTTPException)  # refused, reset, timed out (socket.timeout is OSError)


class ServerUnavailable(PassingFault):
    """The server cannot answer now (down, busy, too slow, cut off); `retry_after`: seconds it asked to wait."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerRefused(VlbatchError):
    """The server refused this request for good (an image it cannot read, a request too large): the unit fails."""


class ServerProtocolError(VlbatchError):
    """The server answered something that is not an OpenAI chat completion: the unit fails, naming the server."""


@dataclass(frozen=True)
class ServerInfo:
    """What /v1/models says of the model that answers: its name, who serves it, and a digest of the rest."""

    url: str
    name: str
    owned_by: str
    fingerprint: str  # a digest of the model's entry (without its start time) and the server's address

    @property
    def identity(self) -> str:
        """The model id answers are stored and reused under: another model, or another server, is another id."""
        return f"{self.name}@{self.fingerprint}"

    @property
    def node(self) -> str:
        """The server as results name who answered (`results.node`): its host and port."""
        return urlsplit(self.url).netloc


class ServerModel:
    """A model behind an OpenAI-compatible server; `answer` is safe to call from several threads at once."""

    def __init__(
        self,
        url: str,
        name: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 300.0,
        decoder: MediaDecoder | None = None,
        system: str | None = DEFAULT_SYSTEM,
    ) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise VlbatchError(f"model.url must be an http:// or https:// address, got {url!r}")
        self.url = url.rstrip("/")
        self._parts = parts
        self._base = parts.path.rstrip("/")
        if not self._base.endswith("/v1"):
            self._base += "/v1"
        self.wanted = name
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.decoder = decoder
        self.system = system
        self._info: ServerInfo | None = None

    # the server and its model ------------------------------------------------------------------------------
    @property
    def info(self) -> ServerInfo:
        """The model's name and fingerprint, asked of the server once (ServerUnavailable while it cannot be reached)."""
        if self._info is None:
            self._info = self._model_info()
        return self._info

    def _model_info(self) -> ServerInfo:
        status, body = self._request("GET", "/models", None)
        try:
            models = json.loads(body)["data"]
            entries = {str(m["id"]): m for m in models}
        except (ValueError, KeyError, TypeError) as exc:
            raise ServerProtocolError(f"{self.url}: GET /v1/models is not a model list ({exc!r})") from None
        if self.wanted is not None:
            if self.wanted not in entries:
                names = ", ".join(sorted(entries)) or "none"
                raise VlbatchError(f"{self.url} serves no model {self.wanted!r} (it serves: {names}); set model.name")
            entry = entries[self.wanted]
        elif len(entries) == 1:
            entry = next(iter(entries.values()))
        else:
            names = ", ".join(sorted(entries)) or "none"
            raise VlbatchError(f"{self.url} serves {len(entries)} models ({names}): name one in model.name")
        stable = {k: v for k, v in entry.items() if k != "created"}  # a restart changes only the start time
        digest = hashlib.sha256(json.dumps([self.url, stable], sort_keys=True).encode()).hexdigest()[:12]
        return ServerInfo(self.url, str(entry["id"]), str(entry.get("owned_by") or ""), digest)

    # one unit -----------------------------------------------------------------------------------------------
    def answer(
        self,
        question: str,
        media: Sequence[Path],
        generation: GenerationSettings,
        settings: MediaSettings,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """The server's answer to the question about these files, with its timings and token counts."""
        started = time.perf_counter()
        messages, count = self.messages(question, media, settings)
        timings = Timings(preprocess_ms=(time.perf_counter() - started) * 1e3)
        body = self.body(messages, generation, settings)
        last: ServerUnavailable | None = None
        for attempt in range(ATTEMPTS):
            try:
                return self._stream(body, timings, count, on_text)
            except ServerUnavailable as exc:
                last = exc
                if attempt + 1 < ATTEMPTS:
                    wait = exc.retry_after if exc.retry_after is not None else RETRY_FIRST_S * 2**attempt
                    delay = min(RETRY_CAP_S, wait)
                    log.warning("%s; asking again in %.1f s", exc, delay)
                    time.sleep(delay)
        assert last is not None
        raise last

    def messages(
        self, question: str, media: Sequence[Path], settings: MediaSettings
    ) -> tuple[list[dict[str, Any]], int]:
        """The chat messages for a unit, and how many images they carry."""
        content: list[dict[str, Any]] = []
        files: list[tuple[str, bytes]] = []
        if media:
            paths = [Path(p) for p in media]
            kind = "video" if media_kind(paths[0]) == "video" else "image"
            if kind == "video" and len(paths) > 1:
                raise VlbatchError(f"one video per question, without other media: {', '.join(p.name for p in paths)}")
            if self.decoder is None:
                raise VlbatchError("no media decoder for a server request")
            files = self.decoder.encode(paths, kind, settings)
            for n, (mime, data) in enumerate(files, 1):
                label = f"Frame{n}: " if kind == "video" else f"Image-{n}: " if len(files) > 1 else ""
                if label:
                    content.append({"type": "text", "text": ("\n" if n > 1 else "") + label})
                url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
                content.append({"type": "image_url", "image_url": {"url": url}})
            content.append({"type": "text", "text": "\n" + question})
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": content if media else question})
        return messages, len(files)

    def body(
        self, messages: list[dict[str, Any]], generation: GenerationSettings, settings: MediaSettings
    ) -> dict[str, Any]:
        """The request: the settings every OpenAI-compatible server honours, and the others where they mean
        something (top_k, ignore_eos; vLLM's mm_processor_kwargs for InternVL's tile budget)."""
        body: dict[str, Any] = {
            "model": self.info.name,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": generation.max_new_tokens,
            "temperature": generation.temperature,
            "top_p": generation.top_p,
        }
        if generation.seed is not None:
            body["seed"] = generation.seed
        if generation.top_k:
            body["top_k"] = generation.top_k
        if generation.ignore_eos:
            body["ignore_eos"] = True
        if self.info.owned_by == "vllm":  # InternVL's tile budget per image, as the local pipeline tiles
            body["mm_processor_kwargs"] = {"max_dynamic_patch": settings.max_tiles}
        return body

    def _stream(
        self, body: dict[str, Any], timings: Timings, images: int, on_text: Callable[[str], None] | None
    ) -> GenerationResult:
        sent = time.perf_counter()
        pieces: list[str] = []
        first = last = None
        finish = None
        usage: dict[str, Any] = {}
        for chunk in self._events(body):
            if not isinstance(chunk, dict):
                raise ServerProtocolError(f"{self.url}: a stream event that is not a JSON object: {chunk!r:.200}")
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    pieces.append(text)
                    if on_text is not None:
                        on_text(text)
                finish = choice.get("finish_reason") or finish
        if finish is None:
            raise ServerUnavailable(f"{self.url}: the answer stream ended before its end (no finish_reason)")
        ended = time.perf_counter()
        first = first or ended
        last = last or first
        output = int(usage.get("completion_tokens") or len(pieces))
        timings.prefill_ms = (first - sent) * 1e3
        timings.ttft_ms = timings.preprocess_ms + timings.prefill_ms
        timings.decode_ms = (last - first) * 1e3
        timings.decode_tokens = max(output - 1, 0)
        timings.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        return GenerationResult(
            "".join(pieces),
            [-1] * output,  # the server gives the count, not the ids
            int(usage.get("prompt_tokens") or 0),
            0,
            "length" if finish == "length" else "stop",
            timings,
            images,
        )

    # HTTP ---------------------------------------------------------------------------------------------------
    def _events(self, body: dict[str, Any]) -> Iterator[Any]:
        """The JSON objects of the answer's server-sent events, up to `data: [DONE]` or the stream's end."""
        conn, response = self._open("POST", "/chat/completions", body)
        try:
            done = False
            for raw in _lines(response, self.url):
                line = raw.strip()
                if not line.startswith("data:"):
                    continue  # comments, event names, blank separators
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    yield json.loads(data)
                except ValueError:
                    raise ServerProtocolError(f"{self.url}: a stream event that is not JSON: {data!r:.200}") from None
            if not done and response.getheader("content-type", "").startswith("application/json"):
                raise ServerProtocolError(f"{self.url}: answered JSON where a stream was asked for")
        finally:
            conn.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, bytes]:
        conn, response = self._open(method, path, body)
        try:
            return response.status, _read(response, self.url)
        finally:
            conn.close()

    def _open(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[Any, Any]:
        """Send a request and take its status line: ServerUnavailable when the server cannot be reached or is busy,
        ServerRefused for a refusal that will not pass; the open connection and response otherwise."""
        parts = self._parts
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.hostname, parts.port, timeout=self.timeout_s)
        headers = {"Accept": "text/event-stream, application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, self._base + path, body=data, headers=headers)
            response = conn.getresponse()
        except _NETWORK_ERRORS as exc:
            conn.close()
            raise ServerUnavailable(f"{self.url}: cannot reach the server ({type(exc).__name__}: {exc})") from None
        if response.status < 300:
            return conn, response
        try:
            text = _read(response, self.url).decode("utf-8", "replace")
        except ServerUnavailable:
            text = ""
        finally:
            conn.close()
        message = _error_message(text)
        if response.status in _PASSING_STATUS:
            raise ServerUnavailable(
                f"{self.url}: busy or unavailable (HTTP {response.status}: {message})",
                _retry_after(response.getheader("Retry-After")),
            )
        if response.status in (401, 403):
            raise ServerRefused(
                f"{method} {self.url}{path}: HTTP {response.status} ({message}): the server wants a key; put it in "
                "the variable model.api_key_env names"
            )
        raise ServerRefused(f"{self.url} refused the request: HTTP {response.status}: {message}")


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(text: str) -> str:
    """The server's own words: OpenAI's {"error": {"message": ...}}, or the start of whatever it sent."""
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)[:500]
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())[:500] or "no message"


def _read(response: Any, url: str) -> bytes:
    try:
        return response.read()
    except _NETWORK_ERRORS as exc:
        raise ServerUnavailable(f"{url}: the connection broke while reading ({type(exc).__name__}: {exc})") from None


def _lines(response: Any, url: str) -> Iterator[str]:
    while True:
        try:
            raw = response.readline()
        except _NETWORK_ERRORS as exc:
            raise ServerUnavailable(f"{url}: the answer stream broke ({type(exc).__name__}: {exc})") from None
        if not raw:
            return
        yield raw.decode("utf-8", "replace")
