"""The provider sessions' common part, as pyaxengine's `axengine._base_session`, plus the double's strictness.

`Session.get_inputs(g)`/`get_outputs(g)` behave as pyaxengine's (a group past the last raises ValueError or
IndexError). `Session._check_run` is what the double adds before a run touches any memory: every input of the
group fed with its exact name set, shape and dtype (ContractError otherwise); outputs placed through
`output_names.index(name)` for every declared output, so a partial list raises ValueError (list.index's), an unknown
or repeated name raises ValueError, and None means all in declared order. pyaxengine 0.1.3 reads
`output_names.index(declared[k])` as an output INDEX and appends that output k-th, so it returns the requested order
only when the reordering is its own inverse (declared order, the reverse, swaps); any other order is a
ContractError here, since the real runtime would hand the outputs back permuted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ._model import ContractError
from ._node import NodeArg


class SessionOptions:
    pass


class Session(ABC):
    def __init__(self) -> None:
        self._shape_count = 0
        self._inputs: list[list[NodeArg]] = []
        self._outputs: list[list[NodeArg]] = []
        self._file_name = "model"

    def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
        if shape_group > self._shape_count:
            raise ValueError(f"Shape group '{shape_group}' is out of range, total {self._shape_count}.")
        return self._inputs[shape_group]

    def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
        if shape_group > self._shape_count:
            raise ValueError(f"Shape group '{shape_group}' is out of range, total {self._shape_count}.")
        return self._outputs[shape_group]

    def _check_run(self, output_names: list[str] | None, input_feed: dict[str, Any], shape_group: int) -> list[int]:
        """Where each declared output goes in the returned list; raises before anything is copied."""
        name = self._file_name
        if not 0 <= shape_group < self._shape_count:
            raise ValueError(f"Invalid shape group: {shape_group}")
        declared = {a.name: a for a in self.get_inputs(shape_group)}
        if set(input_feed) != set(declared):
            raise ContractError(f"{name} group {shape_group}: fed {sorted(input_feed)}, declared {sorted(declared)}")
        for key, array in input_feed.items():
            arg = declared[key]
            ok = isinstance(array, np.ndarray) and list(array.shape) == list(arg.shape)
            if not ok or array.dtype != arg.dtype:
                got = (getattr(array, "shape", None), getattr(array, "dtype", type(array)))
                raise ContractError(
                    f"{name} group {shape_group}: input {key} expects shape {arg.shape} and dtype "
                    f"{arg.dtype}, got shape {got[0]} and dtype {got[1]}"
                )
        declared_out = [a.name for a in self.get_outputs(shape_group)]
        names = declared_out if output_names is None else list(output_names)
        places = [names.index(out) for out in declared_out]  # a missing name raises list.index's ValueError
        if len(names) != len(declared_out):  # an unknown (or repeated) name: no declared output fills its place
            raise ValueError(f"{name} group {shape_group}: output names {names}, declared {declared_out}")
        if any(places[place] != k for k, place in enumerate(places)):
            raise ContractError(
                f"{name} group {shape_group}: output names {names} reorder the declared {declared_out} in a way "
                "pyaxengine returns permuted (it takes output_names.index(declared[k]) as an output index); ask "
                "in declared order, None, or a reordering that is its own inverse"
            )
        return places

    @abstractmethod
    def run(
        self,
        output_names: list[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: object = None,
        shape_group: int = 0,
    ) -> list[np.ndarray]: ...
