"""Qwen2's rotary position tables: the inverse frequencies, and the cos/sin rows a CPU decoder layer takes.

Exports of format 3 take their rotary tables as inputs, one row per token, computed here once per step for every
layer; transformers computes the angle position * inv_freq in float32, and each table entry here is the
correctly rounded cos/sin of that float32 angle.
"""

from __future__ import annotations

import numpy as np

from batch.model.modelspec import TextSpec


def inverse_frequencies(text: TextSpec) -> np.ndarray:
    """(head_dim / 2,) float32: 1 / theta^(2i / head_dim), divided by the linear rope scaling factor."""
    d = text.head_dim
    inv_freq = 1.0 / (text.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    return (inv_freq / text.rope_scaling_factor).astype(np.float32)


def rotary_tables(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (len(positions), head_dim / 2) float32, row i for the token at positions[i]."""
    angles = np.asarray(positions, np.float32).reshape(-1, 1) * inv_freq[None, :]  # float32, as transformers
    wide = angles.astype(np.float64)
    return np.cos(wide).astype(np.float32), np.sin(wide).astype(np.float32)


def rotary_inputs(inv_freq: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """A format 3 layer's rotary inputs for tokens at `positions` (B, S): `cos` and `sin`, one row per token, and
    `rope_rows` (B, S), the row of each token."""
    cos, sin = rotary_tables(inv_freq, positions.ravel())
    return {"cos": cos, "sin": sin, "rope_rows": np.arange(positions.size, dtype=np.int64).reshape(positions.shape)}
