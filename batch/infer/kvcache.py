"""The KV caches: one answer's preallocated per-layer buffers (the NPU's layout), and the growing caches of the CPU
exports: several answers' packed rows, and one answer's head-major history (exports of format 3)."""

from __future__ import annotations

import numpy as np

from batch.model.attention_mask import MASKED


class KVCache:
    """K and V rows of every layer, (1, capacity, kv_dim) each, filled from position 0 upwards."""

    def __init__(self, num_layers: int, capacity: int, kv_dim: int, dtype: np.dtype | type = np.float32) -> None:
        self.capacity = capacity
        self.k = [np.zeros((1, capacity, kv_dim), dtype) for _ in range(num_layers)]
        self.v = [np.zeros((1, capacity, kv_dim), dtype) for _ in range(num_layers)]
        self.length = 0  # rows that hold real positions

    def write(self, layer: int, start: int, k_rows: np.ndarray, v_rows: np.ndarray) -> None:
        """Store rows (1, n, kv_dim) at positions start .. start+n-1 of one layer."""
        n = k_rows.shape[1]
        if start + n > self.capacity:
            raise IndexError(f"KV cache full: positions up to {start + n - 1}, capacity {self.capacity}")
        self.k[layer][:, start : start + n] = k_rows
        self.v[layer][:, start : start + n] = v_rows

    def history(self, layer: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Views (no copy) of the first `length` rows of one layer: (1, length, kv_dim) each."""
        return self.k[layer][:, :length], self.v[layer][:, :length]


class RowCache:
    """K and V of several answers decoded together: per layer (rows, width, kv_dim), or head-major
    (rows, kv_heads, width, head_dim) where `heads` is given; row r at positions 0 upwards.

    The rows in use are packed at the front (`count`), so the history a decode step reads is a prefix view of each
    buffer, never a copy. `width` grows in steps of GROW positions as the longest row needs (a copy then); a row
    shorter than the width sees the rest masked. Each row holds up to `capacity` positions, as a KVCache does.
    Positions are the second-last axis in both layouts.
    """

    GROW = 64

    def __init__(
        self,
        num_layers: int,
        rows: int,
        kv_dim: int,
        capacity: int,
        dtype: np.dtype | type = np.float32,
        heads: int | None = None,
    ):
        self.rows, self.kv_dim, self.capacity, self.dtype = rows, kv_dim, capacity, np.dtype(dtype)
        self._lead = (heads,) if heads else ()  # the axes between rows and positions
        self._last = kv_dim // heads if heads else kv_dim
        self.k, self.v = self._buffers(num_layers, 0)
        self.lengths = np.zeros(rows, np.int64)  # positions each row holds
        self.count = 0

    def _buffers(self, num_layers: int, width: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every layer's K and V buffers, `width` positions wide, one allocation each."""
        shape = (self.rows, *self._lead, width, self._last)
        k = [np.zeros(shape, self.dtype) for _ in range(num_layers)]
        return k, [np.zeros(shape, self.dtype) for _ in range(num_layers)]

    @property
    def width(self) -> int:
        return self.k[0].shape[-2] if self.k else 0

    def _fit(self, length: int) -> None:
        """Widen every buffer to hold `length` positions (rounded up to GROW, at most capacity)."""
        if length <= self.width:
            return
        if length > self.capacity:
            raise IndexError(f"KV cache full: positions up to {length - 1}, capacity {self.capacity}")
        width = min(self.capacity, -(-length // self.GROW) * self.GROW)
        k, v = self._buffers(len(self.k), width)
        for old, new in zip(self.k + self.v, k + v, strict=True):
            new[: self.count, ..., : old.shape[-2], :] = old[: self.count]
        self.k, self.v = k, v

    def add(self, cache: KVCache | RowCache) -> int:
        """Take in a prefilled single-answer cache (a KVCache, or an AnswerCache of this layout) as the next row;
        returns its row."""
        if self.count == self.rows:
            raise IndexError(f"all {self.rows} rows are in use")
        n = cache.length
        self._fit(n + 1)
        row = self.count
        for layer in range(len(self.k)):
            self.k[layer][row, ..., :n, :] = cache.k[layer][0, ..., :n, :]
            self.v[layer][row, ..., :n, :] = cache.v[layer][0, ..., :n, :]
        self.lengths[row] = n
        self.count += 1
        return row

    def remove(self, row: int) -> None:
        """Free a row: the last row in use moves into its place (callers keep their own lists in the same order)."""
        last = self.count - 1
        if row != last:
            for buffers in (self.k, self.v):
                for layer in buffers:
                    layer[row] = layer[last]
            self.lengths[row] = self.lengths[last]
        self.count = last

    def prepare_step(self) -> tuple[np.ndarray, np.ndarray]:
        """Before a decode step: the rows' positions (count,) and their (count, 1, width+1) mask (history + itself)."""
        positions = self.lengths[: self.count].copy()
        self._fit(int(positions.max()) + 1)
        width = self.width
        mask = np.full((self.count, 1, width + 1), MASKED, np.float32)
        allowed = np.arange(width)[None, :] < positions[:, None]  # (count, width)
        mask[:, 0, :width] = np.where(allowed, 0.0, MASKED)
        mask[:, 0, width] = 0.0
        return positions, mask

    def history(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Views (no copy) of the rows in use: (count, [kv_heads,] width, last) each."""
        return self.k[layer][: self.count], self.v[layer][: self.count]

    def write(self, layer: int, positions: np.ndarray, k_rows: np.ndarray, v_rows: np.ndarray) -> None:
        """Store each row's new K/V, (count, 1, kv_dim) or (count, kv_heads, 1, head_dim), at its own position."""
        rows = np.arange(self.count)
        self.k[layer][rows, ..., positions, :] = k_rows[..., 0, :]
        self.v[layer][rows, ..., positions, :] = v_rows[..., 0, :]

    def advance(self) -> None:
        self.lengths[: self.count] += 1


class AnswerCache(RowCache):
    """One answer's head-major history (exports of format 3): a RowCache of one row, filled a chunk at a time.

    Its width grows with the answer (in GROW steps, a copy each), so the history a layer reads is the whole buffer,
    contiguous, with the positions past `length` masked. `reserve` widens it once for a prompt known in advance.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: np.dtype | type):
        super().__init__(num_layers, 1, kv_heads * head_dim, capacity, dtype, heads=kv_heads)
        self.count = 1
        self.binding: object = None  # what a runtime keeps with this answer's decode steps (see onnx_backend)

    @property
    def length(self) -> int:
        """Positions filled."""
        return int(self.lengths[0])

    @length.setter
    def length(self, value: int) -> None:
        self.lengths[0] = value

    def reserve(self, length: int) -> None:
        """Widen the buffers to hold `length` positions now (a prompt's, before its chunks run)."""
        self._fit(length)

    def write_chunk(self, layer: int, start: int, k_rows: np.ndarray, v_rows: np.ndarray) -> None:
        """Store one layer's (1, kv_heads, n, head_dim) K/V rows at positions start .. start+n-1."""
        n = k_rows.shape[-2]
        self._fit(start + n)
        self.k[layer][0, :, start : start + n] = k_rows[0]
        self.v[layer][0, :, start : start + n] = v_rows[0]
