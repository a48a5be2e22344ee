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
    buffer, never a copy. `width` grows in steps of GROW positions as the longest row needs; a row shorter than the
    width sees the rest masked (zeros). Each row holds up to `capacity` positions, as a KVCache does. Positions are
    the second-last axis in both layouts.

    Each buffer is a view of a larger store. Widening spreads the rows' runs of positions apart inside that store
    (a move within memory already in use), instead of a new allocation each time, whose fresh pages cost more than
    the copy itself (about 50 ms per step after 2,200 positions of a 2B model, 0.8 ms per token); only when the
    store is full is a new one made, twice as wide.
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
        self._runs = rows * (heads or 1)  # runs of positions per buffer: one per row (and KV head)
        self._stores = [np.zeros(0, self.dtype) for _ in range(2 * num_layers)]  # every layer's K, then every V
        self.width = 0
        self.k, self.v = self._views()
        self.lengths = np.zeros(rows, np.int64)  # positions each row holds
        self.count = 0

    def _views(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every layer's K and V buffers, `width` positions wide: prefix views of the stores."""
        shape = (self.rows, *self._lead, self.width, self._last)
        views = [store[: self._runs * self.width * self._last].reshape(shape) for store in self._stores]
        half = len(views) // 2
        return views[:half], views[half:]

    def _fit(self, length: int) -> None:
        """Widen every buffer to hold `length` positions (rounded up to GROW, at most capacity)."""
        if length <= self.width:
            return
        if length > self.capacity:
            raise IndexError(f"KV cache full: positions up to {length - 1}, capacity {self.capacity}")
        old, width = self.width, min(self.capacity, -(-length // self.GROW) * self.GROW)
        used = self.count * (self._runs // self.rows)  # runs that hold rows in use; the rest stay zero
        for i, store in enumerate(self._stores):
            if store.size < self._runs * width * self._last:
                self._stores[i] = self._moved(store, old, width, used)
            else:
                self._spread(store, old, width, used)
        self.width = width
        self.k, self.v = self._views()

    def _moved(self, store: np.ndarray, old: int, width: int, used: int) -> np.ndarray:
        """A new store twice as wide as `width` (at most capacity) holding the used runs of `store`."""
        wider = np.zeros(self._runs * min(self.capacity, 2 * width) * self._last, self.dtype)
        last = self._last
        runs = store[: used * old * last].reshape(used, old, last)
        wider[: self._runs * width * last].reshape(self._runs, width, last)[:used, :old] = runs
        return wider

    def _spread(self, store: np.ndarray, old: int, width: int, used: int) -> None:
        """Move the used runs of `store` from `old` positions apart to `width` apart, in place, and zero the rest."""
        last = self._last
        for run in range(used - 1, 0, -1):  # the last first: each lands past the runs not yet moved
            start = run * width * last
            store[start : start + old * last] = store[run * old * last : (run + 1) * old * last]
        for run in range(used):
            store[(run * width + old) * last : (run + 1) * width * last] = 0
        store[used * width * last : self._runs * width * last] = 0

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
