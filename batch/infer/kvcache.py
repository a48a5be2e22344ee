"""The KV cache (preallocated per-layer buffers written by position) and the additive attention masks."""

from __future__ import annotations

import numpy as np

# exp() of this underflows to exactly 0 in fp32 and bf16; it is what the NPU graphs were compiled with
MASKED = -65536.0


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


def prefill_mask(start: int, n: int, rows: int, cols: int, dtype: type = np.float32) -> np.ndarray:
    """(1, rows, cols) mask for a chunk whose first token sits at position `start`.

    Real row r sees positions 0 .. start+r. Padding rows (r >= n) see causally too, so they stay finite:
    their outputs are dropped, but a NaN there would leak into the chunk's own keys.
    """
    positions = np.arange(cols)[None, :]
    allowed = positions <= (start + np.arange(rows))[:, None]
    return np.where(allowed, 0.0, MASKED).astype(dtype)[None]


def decode_mask(pos: int, cols: int, dtype: type = np.float32) -> np.ndarray:
    """(1, 1, cols) mask for one new token at `pos` over a cache of cols-1 rows plus itself (last column)."""
    mask = np.full((1, 1, cols), MASKED, dtype=dtype)
    mask[..., :pos] = 0.0
    mask[..., -1] = 0.0
    return mask
