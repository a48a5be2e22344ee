"""One result as both views show it: its media previews beside the answer (or the failure), job, tags and timings."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batch.infer.media import VIDEO_EXTENSIONS

# control characters a model may emit (NUL among them): shown as U+FFFD, so pages stay text
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
PROMPT_CHARS = 2000  # of a prompt, on each card (a job file may hold a far longer one; every card repeats it)


def printable(text: str | None) -> str | None:
    """Text as the pages show it: control characters (a model may emit NUL) replaced by U+FFFD."""
    return _CONTROL.sub("\ufffd", text) if text else text


def tag_labels(tags_json: str | None) -> list[str]:
    """A job's tags as short labels: list items as they are, mapping entries as key=value."""
    tags = json.loads(tags_json) if tags_json else None
    if isinstance(tags, dict):
        return [f"{key}={_scalar(value)}" for key, value in tags.items()]
    if isinstance(tags, list):
        return [_scalar(value) for value in tags]
    return [] if tags is None else [_scalar(tags)]


def shown_prompt(prompt: str | None) -> str:
    """The prompt as a card shows it: printable, and cut at PROMPT_CHARS characters (said with an ellipsis)."""
    text = printable(prompt) or ""
    return text if len(text) <= PROMPT_CHARS else text[:PROMPT_CHARS].rstrip() + "\u2026"


def timing_labels(row: dict[str, Any]) -> list[str]:
    """The recorded timings worth a glance: ViT, time to first token, decode speed, tokens out."""
    labels = []
    for column, label, unit in (("vit_ms", "ViT", "ms"), ("ttft_ms", "TTFT", "ms")):
        if row.get(column) is not None:
            labels.append(f"{label} {row[column]:,.0f} {unit}")
    if row.get("tokens_per_s"):
        labels.append(f"{row['tokens_per_s']:.1f} tok/s")
    if row.get("output_tokens") is not None:
        labels.append(f"{row['output_tokens']} tokens")
    return labels


def answered_by(row: dict[str, Any]) -> str:
    """Which model server answered ("model at host:port"); empty for an answer of vlbatch's own model."""
    if row.get("backend") != "openai":
        return ""
    return f"{(row.get('model_id') or '').split('@')[0]} at {row.get('node') or 'a server'}"


def card(
    row: dict[str, Any], preview_url: Callable[[str], str | None], shown_path: Callable[[str], str] = str
) -> dict[str, Any]:
    """A result row (as `ResultFilter.select` returns it) as the card templates expect it.

    `preview_url` maps a recorded media path to the URL of its preview, or None when there is none to show;
    `shown_path` to the path a reader sees (pages meant to be copied elsewhere show less than the full path).
    """
    media = [
        {
            "name": Path(path).name,
            "path": shown_path(path),
            "src": preview_url(path),
            "video": Path(path).suffix.lower() in VIDEO_EXTENSIONS,
        }
        for path in json.loads(row.get("media_paths") or "[]")
    ]
    tags = tag_labels(row.get("tags"))
    answer, error = printable(row.get("answer")), printable(row.get("error"))
    for path in json.loads(row.get("media_paths") or "[]") if error else ():
        error = error.replace(path, shown_path(path))  # a reason names its file: as the card shows it
    created = (row.get("created_utc") or "").replace("T", " ")[:19]
    return {
        "id": row.get("link_id"),
        "media": media,
        "answer": answer,
        "error": error,
        "prompt": shown_prompt(row.get("prompt")),
        "job_id": row["job_id"],
        "run_id": row.get("run_id"),
        "reused": bool(row.get("reused")),
        "finish_reason": row.get("finish_reason"),
        "tags": tags,
        "timings": timing_labels(row),
        "answered_by": answered_by(row),
        "created": f"{created} UTC" if created else "",
        "search_text": " ".join([answer or error or "", row["job_id"], *tags, *(m["name"] for m in media)]).lower(),
    }


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)
