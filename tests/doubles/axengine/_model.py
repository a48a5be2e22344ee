"""What the emulated NPU loads and runs: a double's ".axmodel", a JSON file naming an ONNX graph and its groups.

The file (written by tests/doubles/axmodel_folder.py) holds `"format": "axengine-double"`, the ONNX graph it stands
for, and per shape group the fixed names, shapes and dtypes of its inputs and outputs (what a compiled axmodel
declares). `CompiledModel.execute` takes each input as the raw bytes the NPU reads, casts them at the boundary
exactly as declared (bf16 hidden states and KV rows become float32 for onnxruntime), runs the graph, and gives
each output back as the raw bytes of its declared dtype. A group marked `placeholder_history` (the first prefill
chunk) ignores its K/V inputs, as compiled: the graph sees an empty history instead.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnxruntime as ort

FORMAT = "axengine-double"
BF16 = np.dtype(ml_dtypes.bfloat16)
_HISTORY = ("K_cache", "V_cache")


class ContractError(AssertionError):
    """A feed that the compiled model cannot take."""


def numpy_dtype(name: str) -> np.dtype:
    return BF16 if name == "bfloat16" else np.dtype(name)


@dataclass(frozen=True)
class Tensor:
    """One declared input or output of one shape group."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @functools.cached_property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class Group:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    ignored: frozenset[str]  # inputs the compiled graph does not read (a placeholder history)
    kv_dim: int


def _tensor(node: dict[str, Any]) -> Tensor:
    return Tensor(str(node["name"]), numpy_dtype(node["dtype"]), tuple(int(d) for d in node["shape"]))


def _ort_session(path: str) -> Any:
    """The graph behind a double's file, on the process's shared onnxruntime thread pool: once an onnxruntime
    model is open (the CPU backend makes that pool), onnxruntime refuses sessions with pools of their own."""
    from batch.model.ort_options import session_options

    return ort.InferenceSession(path, sess_options=session_options(), providers=["CPUExecutionProvider"])


class CompiledModel:
    """A loaded double axmodel: its shape groups and the onnxruntime graph that computes them."""

    def __init__(self, spec: dict[str, Any], label: str) -> None:
        self.label = label
        self.groups = [
            Group(
                tuple(_tensor(n) for n in g["inputs"]),
                tuple(_tensor(n) for n in g["outputs"]),
                frozenset(_HISTORY) if g.get("placeholder_history") else frozenset(),
                int(g.get("kv_dim", 0)),
            )
            for g in spec["groups"]
        ]
        self._ort = _ort_session(spec["onnx"])

    @classmethod
    def parse(cls, data: bytes, label: str) -> CompiledModel | None:
        """The model in `data`, or None where it is not a double's axmodel (the runtime's load failure)."""
        try:
            spec = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(spec, dict) or spec.get("format") != FORMAT or not spec.get("groups"):
            return None
        return cls(spec, label)

    def execute(self, group: int, raw_inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run shape group `group` on the bytes of each declared input; the bytes of each declared output."""
        g = self.groups[group]
        feed: dict[str, np.ndarray] = {}
        for tensor, raw in zip(g.inputs, raw_inputs, strict=True):
            if tensor.name in g.ignored:
                continue
            value = raw.view(tensor.dtype).reshape(tensor.shape)
            feed[tensor.name] = value.astype(np.float32) if tensor.dtype == BF16 else value.copy()
        for name in g.ignored:
            feed[name] = np.zeros((1, 0, g.kv_dim), np.float32)
        results = self._ort.run(None, feed)
        out = []
        for tensor, value in zip(g.outputs, results, strict=True):
            if tuple(value.shape) != tensor.shape:
                raise ContractError(
                    f"{self.label}: output {tensor.name} came out {value.shape}, declared {list(tensor.shape)}"
                )
            out.append(np.ascontiguousarray(value.astype(tensor.dtype)).reshape(-1).view(np.uint8))
        return out
