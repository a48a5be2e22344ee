"""Streaming detokenization: turn generated token ids into text chunks without splitting UTF-8 characters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
# A multi-byte character needs at most 3 more bytes after its first; beyond this many pending tokens the
# trailing U+FFFD is most likely garbage, so we look for a safe split point to keep the window short.
_MAX_PENDING = 8


class SupportsDecode(Protocol):
    """Anything with a transformers-style decode, e.g. a transformers tokenizer."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Emits text token by token, holding back a character until all of its bytes have arrived.

    Decodes only a short window of recent tokens (prefix_offset .. end) and emits what that window adds past
    its already-emitted part (prefix_offset .. read_offset), unless the new text ends in U+FFFD, which means
    the last character may still be incomplete. Assumes decoding is compositional at character boundaries,
    as for byte-level BPE tokenizers without cleanup of tokenization spaces.
    """

    def __init__(self, tokenizer: SupportsDecode, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far by add() and flush()."""
        return "".join(self._chunks)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _emit(self, text: str, read_offset: int, prefix_offset: int) -> str:
        delta = text[len(self._prefix_text) :]
        self._prefix_offset = prefix_offset
        self._read_offset = read_offset
        self._prefix_text = self._decode(prefix_offset, read_offset)
        if delta:
            self._chunks.append(delta)
        return delta

    def add(self, token_id: int) -> str:
        """Append one token id and return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        new_text = self._decode(self._prefix_offset)
        if len(new_text) > len(self._prefix_text) and not new_text.endswith(_REPLACEMENT):
            return self._emit(new_text, len(self._ids), self._read_offset)
        if len(self._ids) - self._read_offset > _MAX_PENDING:
            return self._split_pending(new_text)
        return ""

    def _split_pending(self, full: str) -> str:
        """Emit up to the latest token boundary that later tokens can no longer change, if there is one.

        A boundary j is settled when decoding [prefix_offset, j) and [j, end) separately gives the same text
        as decoding them together and the second part is not empty: an unfinished character before j would
        either have merged with the bytes after j (fewer characters together) or has been ruled invalid.
        """
        n = len(self._ids)
        for j in range(n - 1, max(self._read_offset, n - _MAX_PENDING - 1), -1):
            head = self._decode(self._prefix_offset, j)
            tail = self._decode(j)
            if tail and len(head) > len(self._prefix_text) and head + tail == full:
                # The window restarts at j: the check above showed that decoding from j stands on its own.
                return self._emit(head, j, j)
        return ""

    def flush(self) -> str:
        """Return whatever is still held back, e.g. an incomplete character at the end of the stream."""
        rest = self._decode(self._prefix_offset)[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        if rest:
            self._chunks.append(rest)
        return rest
