"""OpenAI Batch compatibility: request JSONL files turned into job files, results turned into output JSONL lines.

The format is the one of OpenAI's Batch API (also read and written by vLLM's ``run-batch``): each input line is
``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...], ...}}`` and each
output line is ``{"id", "custom_id", "response": {"status_code", "request_id", "body": <chat.completion>},
"error"}``.

:func:`requests_to_jobs` checks the whole input file before it writes anything: every bad line is reported with
its 1-based line number and the reason, and one bad line rejects the whole file (nothing is left behind). Only
what vlbatch can honour is accepted: no system message (InternVL3's own system prompt is used), one user message
of text and up to ``MAX_TOGETHER`` images, no conversation history, no key that would change the answer and is
not supported (``n`` > 1, ``tools``, ``stop``, ``logprobs``, ``response_format``, ...). Images are local files
only: a path, a ``file://`` URL or a ``data:image/...;base64,`` URI, never a network URL. Images sent as data
URIs are written (content-addressed, ``<sha256>.<ext>``) into a media folder, by default ``<out_dir>/media``,
which must lie under an allowed media folder so the worker may read them.

:func:`result_lines` formats result rows (as stored in the ``results`` table, with the request's ``custom_id``)
as output lines, with ids derived from the result id so the same rows always give the same file.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import difflib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch import strict_yaml
from batch.errors import MediaError, VlbatchError
from batch.infer.media import media_kind
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.service.atomic_write import write_atomic
from batch.service.spool.jobfile import MAX_TOGETHER, JobRejected, parse_job
from batch.service.spool.spool import free_path

CHAT_COMPLETIONS_URL = "/v1/chat/completions"
MAX_REQUESTS = 50_000  # lines per input file, as OpenAI's Batch API
MAX_DATA_URI_BYTES = 20 * 1024 * 1024  # decoded size of one data: URI image
MAX_LINE_BYTES = MAX_TOGETHER * (4 * MAX_DATA_URI_BYTES // 3 + 4) + 1024 * 1024  # room for the largest images
MAX_CUSTOM_ID_CHARS = 128  # the job id limit of batch.service.spool.jobfile
MAX_REPORTED = 50  # bad lines listed in one error message
MEDIA_FOLDER = "media"  # default media folder for data: URI images, inside out_dir

IMAGE_MIME_SUFFIXES: dict[str, str] = {
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
}

_REQUEST_KEYS = ("custom_id", "method", "url", "body")
_MAPPED_KEYS = ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed")
_HARMLESS_KEYS: dict[str, tuple[type, str]] = {
    "model": (str, "a string"),
    "user": (str, "a string"),
    "metadata": (dict, "an object"),
    "store": (bool, "true or false"),
}
# keys that change nothing at these values (clients often send the defaults)
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "stream": (False,),
    "logprobs": (False,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "stop": ([],),
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
}
_KNOWN_BODY_KEYS = (*_MAPPED_KEYS, *_HARMLESS_KEYS, *_NEUTRAL_VALUES)
_USER_KEYS = ("role", "content", "name")
_IMAGE_DETAILS = ("auto", "low", "high")
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class BatchFileRejected(VlbatchError):
    """A request file with bad lines; ``problems`` holds one ``<file> line <n>: <reason>`` per bad line."""

    def __init__(self, path: object, problems: Sequence[str]) -> None:
        shown = list(problems[:MAX_REPORTED])
        more = len(problems) - len(shown)
        lines = [*shown, *([f"... and {more} more"] if more else [])]
        count = f"{len(problems)} bad line{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{path}: {count}; no job was written\n" + "\n".join(lines))
        self.path = path
        self.problems = list(problems)


class _Bad(Exception):
    """Internal: the reason one request line is refused."""


@dataclass
class _Request:
    """One valid request line, ready to become a job file."""

    line: int
    custom_id: str
    job_id: str
    prompt: str
    images: list[Path] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Requests to jobs


def requests_to_jobs(
    path: Path,
    out_dir: Path,
    allowed_media_roots: Sequence[Path],
    *,
    media_dir: Path | None = None,
    id_prefix: str = "",
) -> list[Path]:
    """Turn an OpenAI Batch request file into one job file per request in ``out_dir``; their paths, in file order.

    Every line is checked first; any bad line raises :class:`BatchFileRejected` listing every bad line, and then
    nothing is written (data: URI images already saved are removed again). Image paths must lie under
    ``allowed_media_roots`` (relative ones resolve against the request file's folder); data: URI images are saved
    in ``media_dir`` (default ``out_dir/media``), which must lie under them too. Each job's id is ``id_prefix``
    followed by the request's ``custom_id``; its tags name the custom_id and the request file. Every job written
    is accepted by :func:`batch.service.spool.jobfile.parse_job`; submit each with ``submit_job``.
    """
    path, out_dir = Path(path), Path(out_dir)
    media = _MediaFolder(Path(media_dir) if media_dir is not None else out_dir / MEDIA_FOLDER)
    reader = _RequestReader(path, _real_roots(allowed_media_roots), media, id_prefix)
    try:
        requests = reader.read_all()
        return _write_jobs(path, requests, out_dir, reader.roots)
    except BaseException:
        media.remove_created()
        raise


def _real_roots(roots: Iterable[Path]) -> tuple[Path, ...]:
    return tuple(dict.fromkeys(Path(os.path.realpath(os.path.expanduser(root))) for root in roots))


def _where(path: Path, line: int) -> str:
    return f"{path.name} line {line}"


class _RequestReader:
    """Reads and checks every line of a request file, collecting the bad ones."""

    def __init__(self, path: Path, roots: tuple[Path, ...], media: _MediaFolder, id_prefix: str) -> None:
        self.path = path
        self.roots = roots
        self.media = media
        self.id_prefix = id_prefix
        self.base = path.resolve().parent
        self.seen: dict[str, int] = {}  # custom_id -> its line
        self.problems: list[str] = []

    def read_all(self) -> list[_Request]:
        requests = []
        for number, raw in self._lines():
            try:
                request = self._request(number, raw)
            except _Bad as exc:
                self.problems.append(f"{_where(self.path, number)}: {exc}")
                continue
            if request is not None:
                requests.append(request)
        if not requests and not self.problems:
            self.problems.append(f"{self.path.name}: holds no requests")
        if len(requests) + len(self.problems) > MAX_REQUESTS:
            self.problems.append(f"{self.path.name}: more than {MAX_REQUESTS} requests; split it into several files")
        if self.problems:
            raise BatchFileRejected(self.path, self.problems)
        return requests

    def _lines(self) -> Iterator[tuple[int, bytes | None]]:
        """(1-based line number, bytes) per line; None for a line over MAX_LINE_BYTES (skipped, not kept)."""
        try:
            handle = open(self.path, "rb")
        except OSError as exc:
            raise BatchFileRejected(self.path, [f"{self.path.name}: cannot read it ({exc.strerror})"]) from None
        with handle:
            number = 0
            while raw := handle.readline(MAX_LINE_BYTES + 1):
                number += 1
                if len(raw) > MAX_LINE_BYTES:
                    while raw and not raw.endswith(b"\n"):
                        raw = handle.readline(1 << 20)
                    yield number, None
                else:
                    yield number, raw

    def _request(self, number: int, raw: bytes | None) -> _Request | None:
        if raw is None:
            raise _Bad(f"line is longer than {MAX_LINE_BYTES} bytes")
        text = _decode(raw).removeprefix("\ufeff" if number == 1 else "")
        if not text.strip():
            return None  # blank lines are skipped
        obj = _load_json(text)
        custom_id = self._envelope(obj, number)
        body = obj["body"]
        prompt, urls = _messages(body.get("messages"))
        overrides = _overrides(body)
        images = list(dict.fromkeys(self._image(url) for url in urls))  # duplicates are one input
        return _Request(number, custom_id, self.id_prefix + custom_id, prompt, images, overrides)

    def _envelope(self, obj: dict[str, Any], number: int) -> str:
        """Check the request's own keys; its custom_id."""
        unknown = [key for key in obj if key not in _REQUEST_KEYS]
        if unknown:
            raise _Bad(f"unknown key {unknown[0]!r} (a request has custom_id, method, url and body)")
        for key in _REQUEST_KEYS:
            if key not in obj:
                raise _Bad(f"missing key {key!r}")
        custom_id = obj["custom_id"]
        _check_custom_id(custom_id, self.id_prefix)
        if obj["method"] != "POST":
            raise _Bad(f'method must be "POST", got {_show(obj["method"])}')
        if obj["url"] != CHAT_COMPLETIONS_URL:
            raise _Bad(
                f"url must be {CHAT_COMPLETIONS_URL} (only chat completions are supported), got {_show(obj['url'])}"
            )
        if not isinstance(obj["body"], dict):
            raise _Bad(f"body must be a JSON object, got {_show(obj['body'])}")
        if custom_id in self.seen:
            raise _Bad(f"custom_id {custom_id!r} is already used on line {self.seen[custom_id]}")
        self.seen[custom_id] = number
        return custom_id

    def _image(self, url: str) -> Path:
        if url[:5].lower() == "data:":
            return self.media.save(url, self.roots)
        scheme = _URL_SCHEME.match(url)
        if scheme is None:
            return self._local_image(url, url)
        if scheme.group(1).lower() != "file":
            raise _Bad(f"image_url must be a file path, a file:// URL or a data: URI (got {_shorten(url)})")
        return self._local_image(_file_url_path(url), url)

    def _local_image(self, spec: str, url: str) -> Path:
        if not spec.strip():
            raise _Bad("image_url is empty")
        if "\0" in spec:  # os.path.realpath would raise ValueError
            raise _Bad(f"image {_shorten(url)!r} holds a NUL character")
        candidate = self.base / os.path.expanduser(spec)
        real = Path(os.path.realpath(candidate))
        if not any(real.is_relative_to(root) for root in self.roots):
            allowed = ", ".join(str(root) for root in self.roots) or "none given"
            raise _Bad(f"image {_shorten(url)} is outside the allowed media folders ({allowed})")
        if not real.exists():
            raise _Bad(f"image {_shorten(url)} not found (looked for {candidate})")
        if not real.is_file():
            raise _Bad(f"image {_shorten(url)} is not a regular file")
        try:
            kind = media_kind(real)
        except MediaError as exc:
            raise _Bad(f"image {_shorten(url)}: {exc.reason}") from None
        if kind != "image":
            raise _Bad(f"image_url {_shorten(url)} is a {kind}; only images are supported")
        return real


def _check_custom_id(custom_id: Any, prefix: str) -> None:
    """The rules of a job id (batch.service.spool.jobfile), as the custom_id becomes the job's id."""
    if not isinstance(custom_id, str) or not custom_id:
        raise _Bad(f"custom_id must be a non-empty string, got {_show(custom_id)}")
    job_id = prefix + custom_id
    if job_id != job_id.strip():
        raise _Bad(f"custom_id {custom_id!r} must not start or end with spaces (it becomes the job id)")
    if len(job_id) > MAX_CUSTOM_ID_CHARS:
        raise _Bad(f"custom_id is longer than {MAX_CUSTOM_ID_CHARS - len(prefix)} characters (it becomes the job id)")
    if job_id.startswith(".") or any(ch in "/\\" or not ch.isprintable() for ch in job_id):
        raise _Bad(
            f"custom_id {custom_id!r} must not start with '.' or hold slashes or control characters "
            "(it becomes the job id)"
        )


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def _load_json(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise _Bad(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise _Bad("JSON nested too deeply") from None
    except ValueError as exc:  # an integer of more than 4300 digits (sys.get_int_max_str_digits)
        raise _Bad(f"not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(obj, dict):
        raise _Bad(f"must be a JSON object, got {_show(obj)}")
    return obj


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Bad(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Bad(f"{name} is not a JSON number")


def _show(value: Any) -> str:
    """A JSON author's view of a value, shortened."""
    text = json.dumps(value, ensure_ascii=False) if _is_json_scalar(value) else type(value).__name__
    names = {"dict": "an object", "list": "a list"}
    return names.get(text, _shorten(text))


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Messages


def _messages(messages: Any) -> tuple[str, list[str]]:
    """The prompt and the image URLs of the one user message; anything else refused."""
    if not isinstance(messages, list) or not messages:
        raise _Bad("body.messages must be a non-empty list of messages")
    user = None
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _Bad(f"messages[{index}] must be an object, got {_show(message)}")
        role = message.get("role")
        if role in ("system", "developer"):
            raise _Bad(
                f"{role} messages are not supported; InternVL3's own system prompt is used "
                "(put the instruction in the user message)"
            )
        if role in ("assistant", "tool", "function"):
            raise _Bad(f"{role} messages are not supported (one user message per request, no conversation history)")
        if role != "user":
            raise _Bad(f"messages[{index}] has an unsupported role {_show(role)}")
        if user is not None:
            raise _Bad("only one user message per request is supported")
        user = message
    if user is None:
        raise _Bad("body.messages holds no user message")
    return _user_content(user)


def _user_content(message: dict[str, Any]) -> tuple[str, list[str]]:
    unknown = [key for key in message if key not in _USER_KEYS]
    if unknown:
        raise _Bad(f"user message key {unknown[0]!r} is not supported")
    content = message.get("content")
    if isinstance(content, str):
        texts, urls = [content], []
    elif isinstance(content, list):
        texts, urls = _parts(content)
    else:
        raise _Bad(f"user message content must be text or a list of text and image_url parts, got {_show(content)}")
    prompt = "\n".join(text.strip() for text in texts if text.strip())
    if not prompt:
        raise _Bad("the user message has no text (every request needs a question or instruction)")
    if len(urls) > MAX_TOGETHER:
        raise _Bad(f"{len(urls)} images in one request; at most {MAX_TOGETHER} are supported")
    return prompt, urls


def _parts(parts: list[Any]) -> tuple[list[str], list[str]]:
    texts, urls = [], []
    for index, part in enumerate(parts):
        where = f"content[{index}]"
        if not isinstance(part, dict):
            raise _Bad(f"{where} must be an object, got {_show(part)}")
        kind = part.get("type")
        if kind == "text":
            _only_keys(part, ("type", "text"), where)
            if not isinstance(part.get("text"), str):
                raise _Bad(f"{where}.text must be a string, got {_show(part.get('text'))}")
            texts.append(part["text"])
        elif kind == "image_url":
            _only_keys(part, ("type", "image_url"), where)
            urls.append(_image_url(part.get("image_url"), where))
        else:
            raise _Bad(f"{where} has type {_show(kind)}; only text and image_url parts are supported")
    return texts, urls


def _image_url(value: Any, where: str) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("url"), str):
        raise _Bad(f"{where}.image_url must be an object with a url string, got {_show(value)}")
    _only_keys(value, ("url", "detail"), f"{where}.image_url")
    if value.get("detail", "auto") not in _IMAGE_DETAILS:
        raise _Bad(f"{where}.image_url.detail must be one of {', '.join(_IMAGE_DETAILS)}, got {_show(value['detail'])}")
    return value["url"]


def _only_keys(obj: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    unknown = [key for key in obj if key not in keys]
    if unknown:
        raise _Bad(f"{where} key {unknown[0]!r} is not supported")


def _file_url_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise _Bad(f"image_url {_shorten(url)} names a host; a file:// URL must be local (file:///path)")
    if parts.query or parts.fragment:
        raise _Bad(f"image_url {_shorten(url)} has a query or fragment; a file:// URL names a file only")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise _Bad(f"image_url {_shorten(url)} must be an absolute file:// URL (file:///path)")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Body keys and generation overrides


def _overrides(body: dict[str, Any]) -> dict[str, Any]:
    """The job's generation overrides from the body; a key that would change the answer unsupported is refused."""
    for key, value in body.items():
        if value is None or key in _MAPPED_KEYS:
            continue
        if key in _HARMLESS_KEYS:
            kind, expected = _HARMLESS_KEYS[key]
            if not isinstance(value, kind):
                raise _Bad(f"body.{key} must be {expected}, got {_show(value)}")
            continue
        if key in _NEUTRAL_VALUES and any(_same(value, neutral) for neutral in _NEUTRAL_VALUES[key]):
            continue
        raise _Bad(_unsupported(key, value))
    out: dict[str, Any] = {}
    tokens = _max_tokens(body)
    if tokens is not None:
        out["max_new_tokens"] = tokens
    if body.get("temperature") is not None:
        out["temperature"] = _number(body, "temperature", 0.0, 2.0, low_open=False)
    if body.get("top_p") is not None:
        out["top_p"] = _number(body, "top_p", 0.0, 1.0, low_open=True)
    if body.get("top_k") is not None:  # vLLM's extra sampling parameter; -1 (vLLM) and 0 mean off
        top_k = _integer(body, "top_k", -1)
        out["top_k"] = max(top_k, 0)
    if body.get("seed") is not None:
        out["seed"] = _integer(body, "seed", 0)
    return out


def _same(value: Any, neutral: Any) -> bool:
    if isinstance(neutral, bool) or isinstance(value, bool):
        return value is neutral
    if isinstance(neutral, int):
        return isinstance(value, (int, float)) and value == neutral
    return type(value) is type(neutral) and value == neutral


def _unsupported(key: str, value: Any) -> str:
    if key == "n":
        return f"n must be 1 (one answer per request), got {_show(value)}"
    if key == "stream":
        return "stream must be false (answers are written to the results file)"
    if key in _NEUTRAL_VALUES:
        return f"body key {key!r} is not supported (it would change the answer); remove it"
    close = difflib.get_close_matches(key, _KNOWN_BODY_KEYS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"body key {key!r} is not supported{hint}; remove it"


def _max_tokens(body: dict[str, Any]) -> int | None:
    values = {
        key: _integer(body, key, 1) for key in ("max_tokens", "max_completion_tokens") if body.get(key) is not None
    }
    if len(set(values.values())) > 1:
        raise _Bad(
            f"max_tokens ({values['max_tokens']}) and max_completion_tokens ({values['max_completion_tokens']}) differ"
        )
    return next(iter(values.values()), None)


def _integer(body: dict[str, Any], key: str, low: int) -> int:
    value = body[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"body.{key} must be an integer, got {_show(value)}")
    if value < low:
        raise _Bad(f"body.{key} must be at least {low}, got {value}")
    return value


def _number(body: dict[str, Any], key: str, low: float, high: float, *, low_open: bool) -> float | int:
    value = body[key]
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))  # ints: no OverflowError
    if isinstance(value, bool) or not finite:
        raise _Bad(f"body.{key} must be a number, got {_show(value)}")
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _Bad(f"body.{key} must be in {bounds}, got {value}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# data: URI images


class _MediaFolder:
    """Where data: URI images are saved, content-addressed; remembers what it created so a rejection removes it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.real = Path(os.path.realpath(folder))
        self.created_files: list[Path] = []
        self.created_folders: list[Path] = []

    def save(self, url: str, roots: tuple[Path, ...]) -> Path:
        """The saved image's real path; _Bad for a malformed, oversized or non-image data: URI."""
        data, suffix = _decode_data_uri(url)
        if not any(self.real.is_relative_to(root) for root in roots):
            allowed = ", ".join(str(root) for root in roots) or "none given"
            raise _Bad(
                f"data: URI images are saved in {self.folder}, which is outside the allowed media folders "
                f"({allowed}); the worker could not read them"
            )
        target = self.real / f"{hashlib.sha256(data).hexdigest()}{suffix}"
        try:
            self._ensure_folder()
            if not (target.is_file() and not target.is_symlink() and _sha256(target) == _sha256_bytes(data)):
                existed = target.exists() or target.is_symlink()
                write_atomic(target, data)
                if not existed:
                    self.created_files.append(target)
        except OSError as exc:
            raise _Bad(f"cannot save the data: URI image as {target} ({exc.strerror or exc})") from None
        return target

    def _ensure_folder(self) -> None:
        missing = []
        folder = self.real
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        self.real.mkdir(parents=True, exist_ok=True)
        self.created_folders.extend(reversed(missing))

    def remove_created(self) -> None:
        for path in self.created_files:
            with contextlib.suppress(OSError):
                path.unlink()
        for folder in reversed(self.created_folders):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        self.created_files.clear()
        self.created_folders.clear()


def _decode_data_uri(url: str) -> tuple[bytes, str]:
    """The image bytes of a ``data:image/<type>;base64,<data>`` URI and the file suffix for its type."""
    header, comma, payload = url[5:].partition(",")
    params = [part.strip().lower() for part in header.split(";")]
    mime = params[0]
    if not comma or len(params) < 2 or params[-1] != "base64":
        raise _Bad("a data: URI image must be base64-encoded (data:image/png;base64,...)")
    if mime not in IMAGE_MIME_SUFFIXES:
        kinds = ", ".join(sorted({name.removeprefix("image/") for name in IMAGE_MIME_SUFFIXES}))
        raise _Bad(f"data: URI type {mime!r} is not supported; images only ({kinds})")
    limit_mb = MAX_DATA_URI_BYTES // (1024 * 1024)
    if len(payload) > 4 * math.ceil(MAX_DATA_URI_BYTES / 3):
        raise _Bad(f"data: URI image is larger than {limit_mb} MB")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _Bad("data: URI is not valid base64") from None
    if not data:
        raise _Bad("data: URI holds no data")
    if len(data) > MAX_DATA_URI_BYTES:
        raise _Bad(f"data: URI image is larger than {limit_mb} MB")
    if not _signature_matches(mime, data):
        raise _Bad(f"data: URI does not hold {mime} data (its first bytes do not match)")
    return data, IMAGE_MIME_SUFFIXES[mime]


def _signature_matches(mime: str, data: bytes) -> bool:
    if mime in ("image/jpeg", "image/jpg"):
        return data.startswith(b"\xff\xd8\xff")
    if mime == "image/png":
        return data.startswith(b"\x89PNG\r\n\x1a\n")
    if mime == "image/gif":
        return data.startswith((b"GIF87a", b"GIF89a"))
    if mime == "image/webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    if mime == "image/bmp":
        return data.startswith(b"BM")
    return data.startswith((b"II*\x00", b"MM\x00*"))  # tiff


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Writing the job files


def _job_mapping(request: _Request, batch_name: str) -> dict[str, Any]:
    mapping: dict[str, Any] = {
        "id": request.job_id,
        "prompt": request.prompt,
        "inputs": [str(image) for image in request.images],  # [] for a text-only request
    }
    if len(request.images) > 1:
        mapping["mode"] = "together"
    mapping.update(request.overrides)
    mapping["tags"] = {"openai_custom_id": request.custom_id, "openai_batch": batch_name}
    return mapping


def _file_name(custom_id: str, taken: set[str]) -> str:
    stem = _SAFE_NAME.sub("_", custom_id).strip("._")[:100] or "request"
    name, n = f"{stem}.yaml", 1
    while name.lower() in taken:
        name, n = f"{stem}.{n}.yaml", n + 1
    taken.add(name.lower())
    return name


def _write_jobs(source: Path, requests: list[_Request], out_dir: Path, roots: tuple[Path, ...]) -> list[Path]:
    """Write the jobs into a hidden staging folder, check each with parse_job, then move them into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".openai-batch-"))
    moved: list[Path] = []
    try:
        taken: set[str] = set()
        staged = []
        for request in requests:
            text = strict_yaml.dump_exact(_job_mapping(request, source.name))
            job_path = staging / _file_name(request.job_id, taken)
            job_path.write_text(text, encoding="utf-8")
            staged.append(job_path)
        _check_jobs(source, requests, staged, roots)
        for job_path in staged:
            target = free_path(out_dir, job_path.name)
            os.replace(job_path, target)
            moved.append(target)
        return moved
    except BaseException:
        for target in moved:
            with contextlib.suppress(OSError):
                target.unlink()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_jobs(source: Path, requests: list[_Request], staged: list[Path], roots: tuple[Path, ...]) -> None:
    """Every job as the worker will read it; BatchFileRejected naming the request line of each refused one."""
    problems = []
    for request, job_path in zip(requests, staged, strict=True):
        try:
            parse_job(job_path, allowed_roots=list(roots), generation=GenerationSettings(), media=MediaSettings())
        except JobRejected as exc:
            problems.append(f"{_where(source, request.line)}: the job it becomes is refused: {exc.reason}")
    if problems:
        raise BatchFileRejected(source, problems)


# ---------------------------------------------------------------------------------------------------------------
# Results to output lines


def result_lines(rows: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """One OpenAI Batch output line (JSON, no trailing newline) per result row, in the rows' order.

    A row needs ``custom_id``, ``answer``, ``error``, ``finish_reason``, ``prompt_tokens``, ``output_tokens``,
    ``model_id``, ``created_utc`` (ISO 8601: when the answer was made, the body's ``created``) and ``result_id``;
    a row with an error or without an answer becomes an error line. Ids derive from ``result_id``, so the same
    rows always give the same lines. The caller makes each ``custom_id`` unique and each ``result_id`` too
    (`vlbatch results` passes the id of the run's link, and ``reports.CustomIds`` for the custom_id).
    """
    for row in rows:
        yield json.dumps(result_record(row), ensure_ascii=False)


def result_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """The output object for one result row (see :func:`result_lines`)."""
    result_id = int(row["result_id"])
    record: dict[str, Any] = {"id": f"batch_req_{result_id}", "custom_id": row["custom_id"]}
    if row.get("error") or row.get("answer") is None:
        code = "processing_error" if row.get("error") else "no_answer"
        message = row.get("error") or "no answer was produced"
        return {**record, "response": None, "error": {"code": code, "message": message}}
    prompt_tokens = int(row.get("prompt_tokens") or 0)
    output_tokens = int(row.get("output_tokens") or 0)
    body = {
        "id": f"chatcmpl-{result_id}",
        "object": "chat.completion",
        "created": _unix_seconds(row["created_utc"]),
        "model": row.get("model_id") or "unknown",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": row["answer"]},
                "finish_reason": row.get("finish_reason") or "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens,
        },
    }
    response = {"status_code": 200, "request_id": f"req_{result_id}", "body": body}
    return {**record, "response": response, "error": None}


def _unix_seconds(stamp: str) -> int:
    """Whole seconds since the epoch of an ISO 8601 time; a time without an offset is taken as UTC."""
    text = stamp.strip()
    text = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp())
