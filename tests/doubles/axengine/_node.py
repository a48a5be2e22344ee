"""NodeArg: one declared input or output of a session's shape group, as pyaxengine's `axengine._node`."""

from __future__ import annotations

import numpy as np


class NodeArg:
    """`.shape` is a list of ints and `.dtype` a numpy dtype object (ml_dtypes' bfloat16 for bf16), never a string."""

    def __init__(self, name: str, dtype: np.dtype, shape: list[int]) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape

    def __repr__(self) -> str:
        return f"NodeArg(name={self.name!r}, dtype={self.dtype!r}, shape={self.shape})"
