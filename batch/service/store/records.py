"""What a stored answer is: the key that makes two answers interchangeable, the row a result becomes, and the SQL
that reads its timings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from batch.infer.generate import GenerationResult
from batch.infer.media import PREPROCESS_VERSION
from batch.infer.prompt import DEFAULT_SYSTEM, TEMPLATE_VERSION, build_prompt
from batch.infer.settings import GenerationSettings, MediaSettings, answer_settings

# SQL over a `results` row, as batch/infer/timings.py defines its columns. An answer's share of its worker's decode
# time: decode_ms counts every step it took part in, each shared by decode_rows answers on average (NULL in rows
# from before batched decode: alone); Timings.decode_share_ms is the same
DECODE_SHARE_MS = "decode_ms / max(coalesce(decode_rows, 1), 1)"
# the tokens its decode steps made (every one after the first), which tokens_per_s is the rate of
DECODE_TOKENS = "coalesce(tokens_per_s * decode_ms / 1000.0, 0)"
# its own time from its media to its last token: ttft_ms already holds preprocess_ms, vit_ms and prefill_ms
ANSWER_MS = "coalesce(ttft_ms, 0) + coalesce(decode_ms, 0)"


def cache_key(
    media_sha256: Sequence[str],
    prompt: str,
    generation: GenerationSettings,
    media: MediaSettings,
    model_id: str,
    system: str | None = DEFAULT_SYSTEM,
) -> str:
    """Equal keys, equal answers: the media bytes, the text the model is sent (system turn and template
    included), every setting that shapes an answer, the template and preprocessing versions, and the model."""
    payload = {
        "media": list(media_sha256),
        "text": build_prompt(prompt, None, 0, system),
        "settings": answer_settings(generation, media),
        "versions": {"template": TEMPLATE_VERSION, "preprocess": PREPROCESS_VERSION},
        "model": model_id,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def answer_row(result: GenerationResult, backend: str) -> dict[str, Any]:
    """The `results` columns that a generated answer fills (the others say what was asked, and when)."""
    timings = result.timings
    return {
        "answer": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "image_tokens": result.image_tokens,
        "output_tokens": result.output_tokens,
        "tiles": result.tiles,
        "preprocess_ms": timings.preprocess_ms,
        "vit_ms": timings.vit_ms,
        "prefill_ms": timings.prefill_ms,
        "ttft_ms": timings.ttft_ms,
        "decode_ms": timings.decode_ms,
        "tokens_per_s": timings.tokens_per_s,
        "decode_rows": timings.decode_rows,
        "backend": backend,
    }


def failure_class(exc: BaseException) -> str:
    """The class of a unit's failure, for telling a repeated failure from a new one: the error's type, and for
    media the way decoding failed (a time-out or a crash can pass where a broken file cannot)."""
    reason = str(getattr(exc, "reason", exc)).lower()
    for words, name in (
        ("timed out", "decode_timeout"),
        ("memory cap", "decode_memory"),
        ("crashed", "decoder_crashed"),
        ("died", "decoder_crashed"),
    ):
        if words in reason:
            return name
    return type(exc).__name__


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
