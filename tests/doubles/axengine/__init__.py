"""A test double of `axengine` (pyaxengine 0.1.3): its Python layer as the real one, its C libraries emulated.

The package mirrors pyaxengine's modules: `InferenceSession` (as `_session.py`'s) holds the provider session in
`self._sess` and its name in `self._provider`; AxEngineExecutionProvider makes an `_axe.AXEngineSession` (the AXE
board: `_axe_capi`'s sys_cffi/sys_lib/engine_cffi/engine_lib), AXCLRTExecutionProvider an
`_axclrt.AXCLRTSession` (the AXCL card: `_axclrt_capi`'s axclrt_cffi/axclrt_lib). The cffi FFIs are real, with
the runtime's struct layouts; the libraries are emulated in Python on the memory model of `_memory` (the board's
cached CMM, not coherent with the NPU; the card's device memory behind axclrtMemcpy), so code that goes below
`run()` to the private attributes and the C functions meets the same rules as on the hardware.

An ".axmodel" here is a JSON file: the ONNX graph it stands for and, per shape group, the fixed names, shapes and
dtypes of its inputs and outputs (`_model`). As strict as pyaxengine, and stricter:

- `InferenceSession(path, sess_options=None, providers=None, provider_options=None)` takes provider names or
  (name, {"device_id": N}) tuples; a name that is not a known provider, or not available on this "machine"
  (`AVAILABLE`, what `get_available_providers()` lists), raises ValueError, as does a bad device_id (`DEVICES`).
  The AXCL session reads its device from `provider_options[0]` as pyaxengine does: a tuple's options are kept
  and never passed on (pyaxengine 0.1.3), so a device_id given only there leaves the session on device 0.
- `get_inputs(g)`/`get_outputs(g)` give NodeArgs whose `.shape` is a list of ints and whose `.dtype` is a numpy
  dtype object (ml_dtypes' bfloat16 for bf16), never a string.
- `run(output_names, feed, shape_group=g)` checks every input of the group: the exact name set, exact shape,
  exact dtype (ContractError otherwise); output names as `_base_session` says.

`calls` gets (model file name, shape group) for every run of a graph on the emulated NPU, `sessions` (model file
name, providers as resolved) for every session made; `memory` counts the bytes moved and holds `errors`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ._base_session import SessionOptions
from ._memory import CoherenceError, calls, memory, sessions
from ._model import ContractError
from ._node import NodeArg

__all__ = [
    "InferenceSession",
    "NodeArg",
    "SessionOptions",
    "ContractError",
    "CoherenceError",
    "calls",
    "sessions",
    "memory",
    "get_available_providers",
]

PROVIDERS = ("AxEngineExecutionProvider", "AXCLRTExecutionProvider")  # every name pyaxengine knows
AVAILABLE = ["AxEngineExecutionProvider"]  # what this "machine" offers; tests may change it
DEVICES = 4  # device ids 0 .. DEVICES-1 exist
print("[INFO] Available providers: ", AVAILABLE)  # pyaxengine talks on stdout: on import and for each session


def get_available_providers() -> list[str]:
    return list(AVAILABLE)


def get_all_providers() -> list[str]:
    return list(PROVIDERS)


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


class InferenceSession:
    def __init__(
        self,
        path_or_bytes: str | bytes | os.PathLike,
        sess_options: SessionOptions | None = None,
        providers: Any = None,
        provider_options: Any = None,
        **kwargs: Any,
    ) -> None:
        self._sess: Any = None
        self._sess_options = sess_options
        self._available_providers = get_available_providers()
        resolved = _resolve_providers(providers)
        self._providers = resolved
        self._provider, self._provider_options = resolved[0]
        self._name = Path(path_or_bytes).name if isinstance(path_or_bytes, str | os.PathLike) else "model"
        print(f"[INFO] Using provider: {self._provider}")
        if self._provider == "AXCLRTExecutionProvider":
            from ._axclrt import AXCLRTSession

            self._sess = AXCLRTSession(path_or_bytes, sess_options, provider_options, **kwargs)
        else:
            from ._axe import AXEngineSession

            self._sess = AXEngineSession(path_or_bytes, sess_options, provider_options, **kwargs)
        sessions.append((self._name, resolved))

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> bool:
        return False

    def get_session_options(self) -> SessionOptions | None:
        return self._sess_options

    def get_providers(self) -> list[str]:
        return [name for name, _ in self._providers]

    def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
        return self._sess.get_inputs(shape_group)

    def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
        return self._sess.get_outputs(shape_group)

    def run(
        self,
        output_names: list[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: object = None,
        shape_group: int = 0,
    ) -> list[np.ndarray]:
        return self._sess.run(output_names, input_feed, run_options, shape_group)
