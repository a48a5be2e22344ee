"""The additive attention masks the decoder layer graphs take (the exported ONNX layers and the NPU's axmodels)."""

from __future__ import annotations

import numpy as np

# exp() of this underflows to exactly 0 in fp32 and bf16; it is what the NPU graphs were compiled with
MASKED = -65536.0


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


def chunk_mask(start: int, n: int, width: int, dtype: type = np.float32) -> np.ndarray:
    """(1, n, width + n) mask for n tokens at positions start .. start+n-1 over a history `width` positions wide
    (exports of format 3): the history's positions below `start` and the chunk's own tokens causally."""
    history = np.broadcast_to(np.where(np.arange(width) < start, 0.0, MASKED), (n, width))
    own = np.where(np.arange(n)[None, :] <= np.arange(n)[:, None], 0.0, MASKED)
    return np.concatenate([history, own], axis=1).astype(dtype)[None]
