"""What a prompt costs in tokens on one model: the text around its images, and how many tiles still fit.

The pipeline sizes each request with it before decoding (the tile budget a decode may use), and `vlbatch
estimate` counts a job's prompt tokens with it before anything runs, so both count alike. Every tile adds the
same number of image-context tokens (one token each), and the text around them does not depend on how many
there are, so a prompt's length is its text tokens plus tiles * tokens_per_tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from batch.infer.prompt import DEFAULT_SYSTEM, MediaKind, PromptMedia, build_prompt

_CACHED = 256  # text-token counts kept: one per (question, kind, item count) seen lately


class PromptBudget:
    """A model's tokenizer, tile size in tokens, system turn and prefill capacity: prompts sized without pixels."""

    def __init__(
        self, tokenizer: Any, tokens_per_tile: int, capacity: int, system: str | None = DEFAULT_SYSTEM
    ) -> None:
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile
        self.capacity = capacity
        self.system = system
        self._text_tokens: dict[tuple[str, str | None, int], int] = {}

    def encode(
        self, question: str, kind: MediaKind | None, per_item: Sequence[int]
    ) -> tuple[np.ndarray, PromptMedia | None]:
        """The prompt's token ids with room for `per_item` tiles per image (or frame); none for text only."""
        media = PromptMedia(kind, tuple(per_item)) if per_item and kind is not None else None
        text = build_prompt(question, media, self.tokens_per_tile, self.system)
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), dtype=np.int64), media

    def text_tokens(self, question: str, kind: MediaKind | None = None, items: int = 0) -> int:
        """The prompt's tokens other than image-context ones, for `items` images (or frames) of `kind`.

        Tokenized once per (question, kind, items): a prompt with thousands of image tokens is slow to encode.
        """
        key = (question, kind, items) if kind is not None and items else (question, None, 0)
        count = self._text_tokens.get(key)
        if count is None:
            if key[1] is not None:
                count = len(self.encode(question, kind, (1,) * items)[0]) - items * self.tokens_per_tile
            else:
                count = len(self.encode(question, None, ())[0])
            if len(self._text_tokens) >= _CACHED:
                self._text_tokens.clear()
            self._text_tokens[key] = count
        return count

    def prompt_tokens(self, question: str, kind: MediaKind | None, per_item: Sequence[int]) -> int:
        """The prompt's length with `per_item` tiles per image (or frame): what encode() gives, without encoding."""
        if kind is None or not per_item:
            return self.text_tokens(question)
        return self.text_tokens(question, kind, len(per_item)) + sum(per_item) * self.tokens_per_tile

    def tile_budget(self, question: str, kind: MediaKind, items: int) -> int:
        """The most tiles, all images (or frames) together, whose prompt still fits the capacity; at least 1."""
        return max(1, (self.capacity - self.text_tokens(question, kind, items)) // self.tokens_per_tile)

    def too_long(self, question: str, n: int, media: PromptMedia | None) -> str:
        """Why a prompt of `n` tokens does not fit, and what would."""
        text_only = self.text_tokens(question)
        message = f"prompt is {n} tokens but this model prefills at most {self.capacity}"
        if media is None:
            return message + "; shorten the text"
        per_item = (n - text_only) / len(media.tiles)
        fit = max(0, int((self.capacity - text_only) // per_item))
        what = "frame" if media.kind == "video" else "image"
        fits = f"1 {what} fits" if fit == 1 else f"{fit} {what}s fit"
        return (
            f"{message}: {text_only} of text and {len(media.tiles)} {what}s at about {per_item:.0f} tokens each; "
            f"at most {fits} (use fewer {what}s or a lower max_tiles)"
        )
