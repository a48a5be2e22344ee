"""A test double of `axengine` (pyaxengine) that runs the documented NPU contract on onnxruntime.

An ".axmodel" here is a JSON file: the ONNX graph it stands for and, per shape group, the fixed names,
shapes and dtypes of its inputs and outputs (what a compiled axmodel declares). Like the real runtime,
`run()` refuses a feed whose shapes or dtypes differ from the group's declaration; unlike it, the double
also refuses unknown or missing input names, so a caller bug surfaces instead of reading a stale buffer.
Inputs and outputs are cast at the boundary exactly as declared (bf16 hidden states and KV rows), and a
group marked `placeholder_history` (the first prefill chunk) ignores its K/V inputs, as compiled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnxruntime as ort

__all__ = ["InferenceSession", "NodeArg", "ContractError", "calls"]

# Every run() call, for tests that check what was fed: (model file name, shape group).
calls: list[tuple[str, int]] = []


class ContractError(AssertionError):
    """A feed that the compiled model cannot take."""


class NodeArg:
    def __init__(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape

    def __repr__(self) -> str:
        return f"NodeArg(name={self.name!r}, dtype={self.dtype!r}, shape={self.shape})"


def _arg(node: dict[str, Any]) -> NodeArg:
    return NodeArg(node["name"], node["dtype"], tuple(node["shape"]))


def _np(dtype: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


class InferenceSession:
    def __init__(self, path_or_bytes: str | os.PathLike, sess_options: Any = None, providers: Any = None, **_: Any):
        path = Path(path_or_bytes)
        spec = json.loads(path.read_text())
        if spec.get("format") != "axengine-double":
            raise RuntimeError("Failed to load model.")
        self._name = path.name
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._ort = ort.InferenceSession(spec["onnx"], sess_options=options, providers=["CPUExecutionProvider"])
        self._groups = spec["groups"]
        self._inputs = [[_arg(n) for n in g["inputs"]] for g in self._groups]
        self._outputs = [[_arg(n) for n in g["outputs"]] for g in self._groups]

    def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
        return self._inputs[shape_group]

    def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
        return self._outputs[shape_group]

    def run(
        self,
        output_names: list[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: object = None,
        shape_group: int = 0,
    ) -> list[np.ndarray]:
        if not 0 <= shape_group < len(self._groups):
            raise ValueError(f"Invalid shape group: {shape_group}")
        declared = {a.name: a for a in self._inputs[shape_group]}
        if set(input_feed) != set(declared):
            raise ContractError(
                f"{self._name} group {shape_group}: fed {sorted(input_feed)}, declared {sorted(declared)}"
            )
        for name, array in input_feed.items():
            arg = declared[name]
            ok = isinstance(array, np.ndarray) and list(array.shape) == list(arg.shape)
            if not ok or array.dtype != _np(arg.dtype):
                got = (getattr(array, "shape", None), getattr(array, "dtype", type(array)))
                raise ContractError(
                    f"{self._name} group {shape_group}: input {name} expects shape {arg.shape} and dtype "
                    f"{arg.dtype}, got shape {got[0]} and dtype {got[1]}"
                )
        calls.append((self._name, shape_group))
        feed = {}
        for name, array in input_feed.items():
            feed[name] = array.astype(np.float32) if array.dtype == _np("bfloat16") else array
        if self._groups[shape_group].get("placeholder_history"):
            kv = self._groups[shape_group]["kv_dim"]
            feed["K_cache"] = feed["V_cache"] = np.zeros((1, 0, kv), np.float32)
        results = self._ort.run(None, feed)
        wanted = output_names or [a.name for a in self._outputs[shape_group]]
        out = []
        for arg, value in zip(self._outputs[shape_group], results, strict=True):
            if tuple(value.shape) != arg.shape:
                raise ContractError(f"{self._name}: output {arg.name} came out {value.shape}, declared {arg.shape}")
            if arg.name in wanted:
                out.append(value.astype(_np(arg.dtype)))
        return out
