"""The NPU's decoder layers with the K/V cache resident in the sessions' own input buffers.

pyaxengine's run() copies every input into its session's buffers on every call: for a decode step that is each
layer's whole K/V cache (2 x 2559 x 256 bf16 = 2.6 MB a layer, 73 MB a token for InternVL3-2B), flushed from
the CPU cache on a board and sent over PCIe on an AXCL card. Here the cache never moves:

- Each layer's `K_cache`/`V_cache` input buffer IS its cache. After a layer runs, only its new rows are copied
  from `K_cache_out`/`V_cache_out` into the cache buffer at their positions (512 bytes a row for InternVL3-2B;
  on a card, a copy on the card). A prefill group's history input is the first rows of the same buffer (its
  declared shape), so prefill and decode share it; the first chunk's placeholder history is written as zeros,
  as run() would be fed.
- The layers are chained: every layer after the first reads the previous layer's `output` buffer as its `input`
  and layer 0's `indices` and `mask` buffers as its own, so a step writes those once, not once a layer, and the
  hidden state between layers never visits the host.
- Those shared inputs are written as a diff: the bytes that differ from what the buffer holds (kept in a host
  copy), so from one decode step to the next the mask changes by one column (2 bytes) and the index by a byte
  or two.

No stale row can change an answer: at start-up every K/V buffer is zeroed (uninitialised memory may hold NaN
bit patterns, and a NaN survives any additive mask). After that, a row beyond the current position holds zeros
or a finite row of an earlier answer; the mask gives that column -65536, so its softmax weight is exp(-65536 -
max) = 0 exactly in fp32 and bf16, and 0 times a finite value adds nothing: the same sums as the zeros run()
would have been fed. Rows of an earlier answer inside the current prompt are overwritten by its prefill before
any run reads them.

One answer at a time: a new cache takes the buffers over, and an older cache used after that is refused.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from batch.errors import BackendError
from batch.infer.runtime.npu_buffers import BoundSession, Buffer, RuntimeMismatch, bind
from batch.model.attention_mask import decode_mask, prefill_mask

log = logging.getLogger(__name__)

_IN = ("K_cache", "V_cache", "indices", "input", "mask")
_OUT = ("K_cache_out", "V_cache_out", "output")
_ROWS = (("K_cache", "K_cache_out"), ("V_cache", "V_cache_out"))


@contextlib.contextmanager
def _device_faults() -> Iterator[None]:
    """A run, copy, flush or invalidate the device refused ends this answer (a BackendError), not the worker's job."""
    try:
        yield
    except RuntimeError as exc:
        raise BackendError(f"the NPU refused a step of this answer: {exc}") from exc


class ResidentCache:
    """An answer's place in the resident buffers: how many positions it holds (the rows live on the device)."""

    def __init__(self, capacity: int, generation: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.generation = generation


def _index(names: list[list[str]], name: str, path: Any) -> int:
    """`name`'s index, the same in every shape group (one buffer per index serves them all)."""
    found = {group.index(name) if name in group else -1 for group in names}
    if len(found) != 1 or -1 in found:
        raise RuntimeMismatch(f"{path}: {name} is not at one index in every shape group ({sorted(found)})")
    return found.pop()


class _Layer:
    """One decoder layer's bound session and the indices of the inputs and outputs the path uses."""

    def __init__(self, session: Any, bound: BoundSession) -> None:
        self.session, self.bound = session, bound
        self.path = session.path
        self.inputs = {name: _index(bound.input_names, name, self.path) for name in _IN}
        self.outputs = {name: _index(bound.output_names, name, self.path) for name in _OUT}

    def input(self, name: str) -> Buffer:
        return self.bound.input(self.inputs[name])

    def output(self, name: str) -> Buffer:
        return self.bound.output(self.outputs[name])

    def nbytes(self, group: int, name: str) -> int:
        return _nbytes(self.session.input(group, name))


class _Shared:
    """A buffer every layer reads, written as the byte ranges that differ from what it holds."""

    def __init__(self, bound: BoundSession, buffer: Buffer) -> None:
        self.bound, self.buffer = bound, buffer
        self.held = np.zeros(buffer.size, np.uint8)
        self.known = 0  # bytes of `held` that mirror the buffer (none until first written)

    def put(self, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        n = data.size
        known = min(self.known, n)
        changed = np.flatnonzero(data[:known] != self.held[:known])
        start = int(changed[0]) if changed.size else known
        end = n if known < n else (int(changed[-1]) + 1 if changed.size else 0)
        if end > start:
            self.bound.write(self.buffer, start, data[start:end])
            self.held[start:end] = data[start:end]
        self.known = max(self.known, n)


def _nbytes(node: Any) -> int:
    """Bytes of a declared input or output (shape and numpy dtype)."""
    return int(np.prod(node.shape)) * node.dtype.itemsize


def _declared(session: Any) -> tuple[list[list[str]], list[list[str]], list[list[int]], list[list[int]]]:
    """A session's input and output names and byte sizes per shape group, in declared order."""
    return (
        [list(group) for group in session.inputs],
        [[node.name for node in group] for group in session.outputs],
        [[_nbytes(node) for node in group.values()] for group in session.inputs],
        [[_nbytes(node) for node in group] for group in session.outputs],
    )


class ResidentLayers:
    """Prefill and decode over every decoder layer with the K/V cache kept in the sessions' buffers.

    `sessions` are the backend's per-layer sessions (batch.infer.runtime.axengine_backend._Session: `.session`
    the axengine.InferenceSession, `.inputs[group]` {name: node}, `.outputs[group]` [node]). Raises
    RuntimeMismatch when the installed pyaxengine or the models' layout is not what the path needs.
    """

    def __init__(self, sessions: Sequence[Any], chunk_len: int) -> None:
        self.chunk_len = chunk_len
        self.layers: list[_Layer] = []
        bound: list[BoundSession] = []
        # the shared buffers go back to their sessions when this is closed or collected, and at exit before
        # pyaxengine's own exit hook (registered when axengine was imported, so it runs after this one) unloads
        # the sessions: an AXCL session frees whatever its IO points at. Neither hook holds `self`.
        self._give_back = weakref.finalize(self, _give_back, bound)
        self._give_back.atexit = False
        atexit.register(self._give_back)
        try:
            for session in sessions:
                self.layers.append(_Layer(session, bind(session.session, *_declared(session))))
                bound.append(self.layers[-1].bound)
                bound[-1].label = str(session.path)
            self._check_chain()
            first = self.layers[0]
            for before, layer in zip(self.layers, self.layers[1:], strict=False):
                layer.bound.share(layer.inputs["input"], before.output("output"))
                for name in ("indices", "mask"):
                    layer.bound.share(layer.inputs[name], first.input(name))
            for layer in self.layers:
                for name in ("K_cache", "V_cache"):
                    buffer = layer.input(name)
                    layer.bound.write(buffer, 0, np.zeros(buffer.size, np.uint8))
        except Exception:
            self.close()
            raise
        self._shared = {name: _Shared(first.bound, first.input(name)) for name in ("indices", "mask", "input")}
        # each layer's (K_cache_out, K_cache) and (V_cache_out, V_cache) buffers, read once: they never move
        self._rows = [[(layer.output(out), layer.input(name)) for name, out in _ROWS] for layer in self.layers]
        self._last = self.layers[-1].output("output")
        decode = first.session.inputs[0]
        self.kv_dtype = decode["K_cache"].dtype
        self._row = decode["K_cache"].shape[2] * self.kv_dtype.itemsize
        self._hidden = decode["input"].shape[-1]
        self._hidden_dtype = decode["input"].dtype
        self._mask_dtype = decode["mask"].dtype
        self._mask_cols = decode["mask"].shape[2]
        self.capacity = decode["K_cache"].shape[1]
        self.generation = 0

    def _check_chain(self) -> None:
        """Every layer's hidden output has the next layer's input shape, and the shared buffers are large enough."""
        first = self.layers[0]
        for group in range(len(first.session.inputs)):
            for before, layer in zip(self.layers, self.layers[1:], strict=False):
                out = before.session.outputs[group][before.outputs["output"]]
                into = layer.session.input(group, "input")
                if (out.shape, out.dtype) != (into.shape, into.dtype):
                    raise RuntimeMismatch(
                        f"{before.path} group {group}: output {out.shape} {out.dtype} cannot feed the next layer's "
                        f"input {into.shape} {into.dtype}"
                    )
        for before, layer in zip(self.layers, self.layers[1:], strict=False):
            pairs = [("input", before.output("output"))] + [(name, first.input(name)) for name in ("indices", "mask")]
            for name, source in pairs:
                needed = max(layer.nbytes(group, name) for group in range(len(layer.session.inputs)))
                if source.size < needed:
                    raise RuntimeMismatch(
                        f"{layer.path}: {name} needs {needed} bytes, the shared buffer has {source.size}"
                    )

    def new_cache(self) -> ResidentCache:
        """Take the buffers over for a new answer (an older ResidentCache is refused from now on)."""
        self.generation += 1
        return ResidentCache(self.capacity, self.generation)

    def _owned(self, cache: Any) -> None:
        if not isinstance(cache, ResidentCache) or cache.generation != self.generation:
            raise BackendError("this K/V cache no longer holds the NPU's buffers: a newer answer took them over")

    def prefill(self, hidden: np.ndarray, start: int, cache: ResidentCache) -> np.ndarray:
        """Every layer over one chunk's (1, n, hidden) states at `start`; returns the last layer's (1, n, hidden)."""
        with _device_faults():
            return self._prefill(hidden, start, cache)

    def decode(self, hidden: np.ndarray, pos: int, cache: ResidentCache) -> np.ndarray:
        """Every layer for one token at `pos`; returns the last layer's (1, 1, hidden)."""
        with _device_faults():
            return self._decode(hidden, pos, cache)

    def _prefill(self, hidden: np.ndarray, start: int, cache: ResidentCache) -> np.ndarray:
        self._owned(cache)
        n, chunk = hidden.shape[1], self.chunk_len
        group = start // chunk + 1
        first = self.layers[0]
        if start % chunk or n > chunk or group >= len(first.session.inputs):
            raise BackendError(f"prefill chunk at {start} of {n} tokens is outside the compiled groups")
        if start + n > self.capacity:
            raise IndexError(f"KV cache full: positions up to {start + n - 1}, capacity {self.capacity}")
        mask = first.session.input(group, "mask")
        x = np.zeros((1, chunk, self._hidden), self._hidden_dtype)
        x[:, :n] = hidden
        self._shared["indices"].put(np.arange(start, start + chunk, dtype=np.uint32))
        self._shared["mask"].put(prefill_mask(start, n, chunk, mask.shape[2]).astype(self._mask_dtype))
        self._shared["input"].put(x)
        for layer, rows in zip(self.layers, self._rows, strict=True):
            if start == 0:  # the first chunk's graph takes a placeholder history: zeros, as run() is fed
                for (_, cache), (name, _) in zip(rows, _ROWS, strict=True):
                    layer.bound.write(cache, 0, np.zeros(layer.nbytes(group, name), np.uint8))
            self._run(layer, rows, group, start, n)
        return self._read_hidden(n)

    def _decode(self, hidden: np.ndarray, pos: int, cache: ResidentCache) -> np.ndarray:
        self._owned(cache)
        if pos >= self.capacity:
            raise IndexError(f"KV cache full: positions up to {pos}, capacity {self.capacity}")
        self._shared["indices"].put(np.full(1, pos, np.uint32))
        self._shared["mask"].put(decode_mask(pos, self._mask_cols).astype(self._mask_dtype))
        self._shared["input"].put(np.asarray(hidden, self._hidden_dtype))
        for layer, rows in zip(self.layers, self._rows, strict=True):
            self._run(layer, rows, 0, pos, 1)
        return self._read_hidden(1)

    def _run(self, layer: _Layer, rows: list[tuple[Buffer, Buffer]], group: int, pos: int, count: int) -> None:
        """Run one layer's group, then copy its `count` new K and V rows into its cache at `pos`."""
        try:
            layer.bound.run(group)
        except RuntimeError as exc:
            raise BackendError(f"{layer.path}: {exc}") from exc
        for new_rows, cache in rows:
            layer.bound.copy(new_rows, 0, cache, pos * self._row, count * self._row)

    def _read_hidden(self, n: int) -> np.ndarray:
        """The last layer's first n output states, (1, n, hidden)."""
        data = self.layers[-1].bound.read(self._last, 0, n * self._hidden * self._hidden_dtype.itemsize)
        return data.view(self._hidden_dtype).reshape(1, n, self._hidden)

    def close(self) -> None:
        """Give every session its own buffers back (pyaxengine frees them on unload, once each)."""
        atexit.unregister(self._give_back)
        self._give_back()


def _give_back(bound: list[BoundSession]) -> None:
    """Point every shared input back at its session's own buffer; a session that refuses is logged, the rest go on."""
    for session in bound:
        try:
            session.restore()
        except Exception as exc:  # the device refused: its unload may free a buffer twice, nothing more to do
            log.warning("the NPU session %s kept a shared buffer (%s)", session.label, exc)
