"""The small interface every runtime implements; prompt building, chunking, sampling and timing stay shared."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from batch.infer.kvcache import KVCache, RowCache


class Backend(ABC):
    """Runs the ViT, one decoder layer at a time, and the post graph.

    Shapes are discovered from the model files by each implementation: `chunk_len` (prefill chunk),
    `prefill_capacity` (longest prompt), `kv_capacity` (positions the cache holds, prompt + answer).
    Hidden states travel between layers in the runtime's own dtype (`hidden_dtype`).
    A runtime that decodes several answers together (`max_rows` > 1) also implements the row methods.
    """

    max_rows: int = 1  # answers one decode step may carry

    name: str
    chunk_len: int
    prefill_capacity: int
    kv_capacity: int
    num_layers: int
    hidden_dtype: np.dtype

    @abstractmethod
    def vit(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 tiles -> (N, tokens_per_tile, hidden) float32 features."""

    @abstractmethod
    def new_cache(self) -> KVCache:
        """An empty KV cache of this runtime's capacity and dtype."""

    @abstractmethod
    def prefill_chunk(self, layer: int, hidden: np.ndarray, start: int, cache: KVCache) -> np.ndarray:
        """Run `layer` over the chunk's (1, n, hidden) states whose first position is `start`; n <= chunk_len.

        The history is cache rows 0 .. start-1; the chunk's K/V rows are written to the cache.
        Returns the chunk's (1, n, hidden) output states.
        """

    @abstractmethod
    def decode(self, layer: int, hidden: np.ndarray, pos: int, cache: KVCache) -> np.ndarray:
        """Run `layer` for one token at `pos` (history rows 0 .. pos-1); writes its K/V row."""

    def prefill_layers(self, hidden: np.ndarray, start: int, cache: KVCache) -> np.ndarray:
        """Every layer over one chunk (prefill_chunk layer by layer); a runtime may run them together."""
        for layer in range(self.num_layers):
            hidden = self.prefill_chunk(layer, hidden, start, cache)
        return hidden

    def decode_layers(self, hidden: np.ndarray, pos: int, cache: KVCache) -> np.ndarray:
        """Every layer for one token (decode layer by layer); a runtime may run them together."""
        for layer in range(self.num_layers):
            hidden = self.decode(layer, hidden, pos, cache)
        return hidden

    @abstractmethod
    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """(1, 1, hidden) last state -> (vocab,) float32 logits."""

    def new_row_cache(self, rows: int) -> RowCache:
        """An empty cache for up to `rows` answers decoded together."""
        raise NotImplementedError(f"{self.name} decodes one answer at a time")

    def decode_rows(self, layer: int, hidden: np.ndarray, positions: np.ndarray, mask: np.ndarray, cache: RowCache):
        """Run `layer` for one token of each row in use: (count, 1, hidden) at `positions`; writes their K/V."""
        raise NotImplementedError(f"{self.name} decodes one answer at a time")

    def decode_rows_layers(self, hidden: np.ndarray, positions: np.ndarray, mask: np.ndarray, cache: RowCache):
        """Every layer for one token of each row in use (decode_rows layer by layer); a runtime may share work."""
        for layer in range(self.num_layers):
            hidden = self.decode_rows(layer, hidden, positions, mask, cache)
        return hidden

    def logits_rows(self, hidden: np.ndarray) -> np.ndarray:
        """(count, 1, hidden) last states -> (count, vocab) float32 logits."""
        raise NotImplementedError(f"{self.name} decodes one answer at a time")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions."""
