"""A test double of `axengine` (pyaxengine) that runs the documented NPU contract on onnxruntime.

An ".axmodel" here is a JSON file: the ONNX graph it stands for and, per shape group, the fixed names,
shapes and dtypes of its inputs and outputs (what a compiled axmodel declares). As strict as pyaxengine:

- `InferenceSession(path, sess_options=None, provider_options=None, providers=None)` takes provider names or
  (name, {"device_id": N}) tuples; a name that is not a known provider, or not available on this "machine"
  (`AVAILABLE`, what `get_available_providers()` lists), raises ValueError, as does a bad device_id.
- `get_inputs(g)`/`get_outputs(g)` give NodeArgs whose `.shape` is a list of ints and whose `.dtype` is a numpy
  dtype object (ml_dtypes' bfloat16 for bf16), never a string.
- `run(output_names, feed, shape_group=g)` checks every input of the group: the exact name set, exact shape,
  exact dtype (ContractError otherwise). Outputs are placed through `output_names.index(name)` for every
  declared output, so a partial list raises ValueError (list.index's), an unknown name raises ValueError, the
  order of `output_names` is the order returned, and None returns all in declared order.

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

__all__ = ["InferenceSession", "NodeArg", "ContractError", "calls", "sessions", "get_available_providers"]

PROVIDERS = ("AxEngineExecutionProvider", "AXCLRTExecutionProvider")  # every name pyaxengine knows
AVAILABLE = ["AxEngineExecutionProvider"]  # what this "machine" offers; tests may change it
DEVICES = 4  # device ids 0 .. DEVICES-1 exist

# Every run() call, for tests that check what was fed: (model file name, shape group).
calls: list[tuple[str, int]] = []
# Every session created: (model file name, the providers it resolved to as [(name, options)]).
sessions: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = []


def get_available_providers() -> list[str]:
    return list(AVAILABLE)


def _resolve_providers(providers: Any) -> list[tuple[str, dict[str, Any]]]:
    if providers is None:
        return [(AVAILABLE[0], {})]
    if isinstance(providers, str) or not isinstance(providers, list | tuple) or not providers:
        raise ValueError(f"providers must be a non-empty list, got {providers!r}")
    out = []
    for entry in providers:
        name, options = (entry, {}) if isinstance(entry, str) else entry
        if name not in PROVIDERS:
            raise ValueError(f"Unknown provider: {name}")
        if name not in AVAILABLE:
            raise ValueError(f"Selected provider {name} is not available (available: {AVAILABLE})")
        if not isinstance(options, dict) or set(options) - {"device_id"}:
            raise ValueError(f"Unknown provider options: {options!r}")
        device = options.get("device_id", 0)
        if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < DEVICES:
            raise ValueError(f"Invalid device_id: {device!r}")
        out.append((name, dict(options)))
    return out


class ContractError(AssertionError):
    """A feed that the compiled model cannot take."""


class NodeArg:
    def __init__(self, name: str, dtype: np.dtype, shape: list[int]) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape

    def __repr__(self) -> str:
        return f"NodeArg(name={self.name!r}, dtype={self.dtype!r}, shape={self.shape})"


def _np(dtype: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def _arg(node: dict[str, Any]) -> NodeArg:
    return NodeArg(node["name"], _np(node["dtype"]), [int(d) for d in node["shape"]])


def _ort_session(path: str) -> Any:
    """The graph behind a double's file, on the process's shared onnxruntime thread pool: once an onnxruntime
    model is open (the CPU backend makes that pool), onnxruntime refuses sessions with pools of their own."""
    from batch.model.ort_options import session_options

    return ort.InferenceSession(path, sess_options=session_options(), providers=["CPUExecutionProvider"])


class InferenceSession:
    def __init__(
        self,
        path_or_bytes: str | os.PathLike,
        sess_options: Any = None,
        provider_options: Any = None,
        providers: Any = None,
        **_: Any,
    ):
        resolved = _resolve_providers(providers)
        path = Path(path_or_bytes)
        spec = json.loads(path.read_text())
        if spec.get("format") != "axengine-double":
            raise RuntimeError("Failed to load model.")
        self._name = path.name
        self._ort = _ort_session(spec["onnx"])
        self._groups = spec["groups"]
        self._inputs = [[_arg(n) for n in g["inputs"]] for g in self._groups]
        self._outputs = [[_arg(n) for n in g["outputs"]] for g in self._groups]
        self._providers = resolved
        sessions.append((self._name, resolved))

    def get_providers(self) -> list[str]:
        return [name for name, _ in self._providers]

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
            if not ok or array.dtype != arg.dtype:
                got = (getattr(array, "shape", None), getattr(array, "dtype", type(array)))
                raise ContractError(
                    f"{self._name} group {shape_group}: input {name} expects shape {arg.shape} and dtype "
                    f"{arg.dtype}, got shape {got[0]} and dtype {got[1]}"
                )
        declared_out = [a.name for a in self._outputs[shape_group]]
        names = declared_out if output_names is None else list(output_names)
        places = [names.index(name) for name in declared_out]  # a missing name raises list.index's ValueError
        if len(names) != len(declared_out):  # an unknown (or repeated) name: no declared output fills its place
            raise ValueError(f"{self._name} group {shape_group}: output names {names}, declared {declared_out}")
        calls.append((self._name, shape_group))
        feed = {}
        for name, array in input_feed.items():
            feed[name] = array.astype(np.float32) if array.dtype == _np("bfloat16") else array
        if self._groups[shape_group].get("placeholder_history"):
            kv = self._groups[shape_group]["kv_dim"]
            feed["K_cache"] = feed["V_cache"] = np.zeros((1, 0, kv), np.float32)
        results = self._ort.run(None, feed)
        out: list[Any] = [None] * len(names)
        for arg, value, place in zip(self._outputs[shape_group], results, places, strict=True):
            if list(value.shape) != arg.shape:
                raise ContractError(f"{self._name}: output {arg.name} came out {value.shape}, declared {arg.shape}")
            out[place] = value.astype(arg.dtype)
        return out
