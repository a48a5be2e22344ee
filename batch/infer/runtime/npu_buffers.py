"""An axengine session's own input and output buffers, driven below pyaxengine's run().

pyaxengine's `run()` copies every fed array into the session's buffers and, on a board, flushes the CPU cache over
each whole buffer; on an AXCL card it copies every array over PCIe. The resident decode path
(batch/infer/runtime/npu_resident.py) instead writes only the bytes that changed, so it needs the buffers
themselves, which pyaxengine keeps in private attributes. This module owns that contact:

- `bind(session)`: checks that the installed pyaxengine exposes what the path needs (the session's attributes,
  the cffi struct fields, the C functions, one buffer per input and output index, each as large as every shape
  group needs according to the model's own IO info) and returns its `BoundSession`; anything else is a
  `RuntimeMismatch` naming what differed (the caller falls back to run()).
- `BoardSession` (AxEngineExecutionProvider, an AX650/AX630C board): the buffers are cached CMM memory that the
  NPU reads from DRAM, so a CPU write is followed by AX_SYS_MflushCache over the bytes written (rounded out to
  cache lines), and a CPU read of NPU output is preceded by AX_SYS_MinvalidateCache over the bytes read.
- `CardSession` (AXCLRTExecutionProvider, an AXCL card in a host): the buffers are card memory, reached with
  axclrtMemcpy host-to-device, device-to-host and device-to-device (a copy on the card, nothing over PCIe).

Checked against pyaxengine 0.1.2 and 0.1.3 (tags 0.1.2rc0 to 0.1.3.rc3 and the main branch at 3554448,
December 2025), whose sessions and cffi layers are the same in everything used here.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

CACHE_LINE = 64  # bytes; Cortex-A55 (AX650N's CPU) data cache line: flushes and invalidates cover whole lines


class RuntimeMismatch(Exception):
    """The installed pyaxengine (or its session) lacks something the resident path needs."""


def pyaxengine_version() -> str:
    try:
        return metadata.version("axengine")
    except metadata.PackageNotFoundError:
        return "of unknown version"


@dataclass(frozen=True)
class Buffer:
    """One buffer the engine reads or writes: its address (virtual on a board, card memory on AXCL) and size."""

    address: int
    size: int
    physical: int = 0  # a board's physical address of the same bytes (the NPU's view)

    def span(self, offset: int, nbytes: int) -> tuple[int, int]:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"bytes {offset}..{offset + nbytes} lie outside a buffer of {self.size}")
        return offset, nbytes


class BoundSession(ABC):
    """One session's buffers by input and output index, and the calls that move bytes and run a shape group."""

    label = "an NPU session"  # its model file, for messages

    def __init__(self, wrapper: Any, input_names: list[list[str]], output_names: list[list[str]]) -> None:
        self.raw = _attribute(wrapper, "_sess", "InferenceSession")
        self.input_names, self.output_names = input_names, output_names
        self._original: dict[int, Buffer] = {}  # inputs repointed by share(), restored by restore()

    @abstractmethod
    def input(self, index: int) -> Buffer: ...

    @abstractmethod
    def output(self, index: int) -> Buffer: ...

    @abstractmethod
    def _point_input(self, index: int, buffer: Buffer) -> None: ...

    @abstractmethod
    def write(self, buffer: Buffer, offset: int, data: np.ndarray) -> None:
        """Host bytes into a buffer at `offset`, visible to the NPU's next run."""

    @abstractmethod
    def read(self, buffer: Buffer, offset: int, nbytes: int) -> np.ndarray:
        """`nbytes` of a buffer as the NPU left them, as a new uint8 array."""

    @abstractmethod
    def copy(self, source: Buffer, source_offset: int, target: Buffer, target_offset: int, nbytes: int) -> None:
        """Bytes the NPU wrote into one buffer, into another, visible to the NPU's next run."""

    @abstractmethod
    def run(self, group: int) -> None: ...

    def share(self, index: int, buffer: Buffer) -> None:
        """Make input `index` read `buffer` (another session's), from now on."""
        self._original.setdefault(index, self.input(index))
        self._point_input(index, buffer)

    def restore(self) -> None:
        """Point every shared input back at the session's own buffer (pyaxengine frees its own on unload); one the
        device refuses stays listed, the others are restored, and the refusal is raised at the end."""
        refused = []
        for index, buffer in list(self._original.items()):
            try:
                self._point_input(index, buffer)
                del self._original[index]
            except Exception as exc:
                refused.append(f"input {index}: {exc}")
        if refused:
            raise RuntimeError("; ".join(refused))


def _attribute(owner: Any, name: str, what: str) -> Any:
    try:
        return getattr(owner, name)
    except AttributeError:
        raise RuntimeMismatch(f"{what} has no attribute {name}") from None


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise RuntimeMismatch(f"{name} cannot be imported ({type(exc).__name__}: {exc})") from None


def _functions(lib: Any, what: str, names: tuple[str, ...]) -> None:
    for name in names:
        _attribute(lib, name, what)


def _fields(ffi: Any, struct: str, names: set[str]) -> None:
    try:
        have = {name for name, _ in ffi.typeof(struct).fields}
    except Exception as exc:
        raise RuntimeMismatch(f"the cffi type {struct} is unknown ({exc})") from None
    if names - have:
        raise RuntimeMismatch(f"{struct} lacks the field(s) {', '.join(sorted(names - have))}")


def _check_sizes(kind: str, have: list[int], needed: list[list[int]], declared: list[list[int]]) -> None:
    """Buffer sizes against every group's needs (from the model's IO info) and the declared shapes' bytes."""
    for group, (sizes, expected) in enumerate(zip(needed, declared, strict=True)):
        if sizes != expected:
            raise RuntimeMismatch(f"shape group {group}'s {kind} sizes {sizes} are not its declared shapes' {expected}")
        for index, size in enumerate(sizes):
            if have[index] < size:
                raise RuntimeMismatch(f"{kind} buffer {index} holds {have[index]} bytes, group {group} needs {size}")


class BoardSession(BoundSession):
    """A session on an AX650/AX630C board: cached CMM buffers, written and flushed, invalidated and read."""

    def __init__(self, wrapper: Any, input_names, output_names, input_bytes, output_bytes) -> None:
        super().__init__(wrapper, input_names, output_names)
        raw = self.raw
        capi = _module("axengine._axe_capi")
        self.ffi = _attribute(capi, "engine_cffi", "axengine._axe_capi")
        self.engine = _attribute(capi, "engine_lib", "axengine._axe_capi")
        self.sys_ffi = _attribute(capi, "sys_cffi", "axengine._axe_capi")
        self.sys = _attribute(capi, "sys_lib", "axengine._axe_capi")
        _functions(self.engine, "axengine's engine library", ("AX_ENGINE_RunGroupIOSync", "AX_ENGINE_RunSyncV2"))
        _functions(self.sys, "axengine's sys library", ("AX_SYS_MflushCache", "AX_SYS_MinvalidateCache"))
        _fields(self.ffi, "AX_ENGINE_IO_T", {"pInputs", "nInputSize", "pOutputs", "nOutputSize"})
        _fields(self.ffi, "AX_ENGINE_IO_BUFFER_T", {"phyAddr", "pVirAddr", "nSize"})
        _fields(self.ffi, "AX_ENGINE_IO_INFO_T", {"pInputs", "nInputSize", "pOutputs", "nOutputSize"})
        _fields(self.ffi, "AX_ENGINE_IO_META_T", {"pName", "nSize"})
        what = type(raw).__name__
        self._handle = _attribute(raw, "_handle", what)
        self._context = _attribute(raw, "_context", what)
        self._io = _attribute(raw, "_io", what)
        info = _attribute(raw, "_info", what)
        groups = _attribute(raw, "_shape_count", what)
        if groups != len(input_names) or len(info) != groups:
            raise RuntimeMismatch(
                f"{what} has {groups} shape groups and {len(info)} IO infos, the model declares {len(input_names)}"
            )
        io = self._io[0]
        if io.nInputSize != len(input_names[0]) or io.nOutputSize != len(output_names[0]):
            raise RuntimeMismatch(f"{what}'s IO holds {io.nInputSize} inputs and {io.nOutputSize} outputs")
        for group in range(groups):
            meta = info[group][0]
            names = [self.ffi.string(meta.pInputs[i].pName).decode() for i in range(meta.nInputSize)]
            outs = [self.ffi.string(meta.pOutputs[i].pName).decode() for i in range(meta.nOutputSize)]
            if names != input_names[group] or outs != output_names[group]:
                raise RuntimeMismatch(f"shape group {group}'s IO info names {names} -> {outs}")
        _check_sizes(
            "input",
            [io.pInputs[i].nSize for i in range(io.nInputSize)],
            [[info[g][0].pInputs[i].nSize for i in range(io.nInputSize)] for g in range(groups)],
            input_bytes,
        )
        _check_sizes(
            "output",
            [io.pOutputs[i].nSize for i in range(io.nOutputSize)],
            [[info[g][0].pOutputs[i].nSize for i in range(io.nOutputSize)] for g in range(groups)],
            output_bytes,
        )
        self._run = self.engine.AX_ENGINE_RunGroupIOSync if groups > 1 else None

    def _buffer(self, entry: Any) -> Buffer:
        return Buffer(int(self.ffi.cast("uintptr_t", entry.pVirAddr)), int(entry.nSize), int(entry.phyAddr))

    def input(self, index: int) -> Buffer:
        return self._buffer(self._io[0].pInputs[index])

    def output(self, index: int) -> Buffer:
        return self._buffer(self._io[0].pOutputs[index])

    def _point_input(self, index: int, buffer: Buffer) -> None:
        entry = self._io[0].pInputs[index]
        entry.phyAddr = buffer.physical
        entry.pVirAddr = self.ffi.cast("void *", buffer.address)
        entry.nSize = buffer.size

    def _lines(self, buffer: Buffer, offset: int, nbytes: int) -> tuple[int, int]:
        """The byte range rounded out to whole cache lines, kept inside the buffer (its start is 128-aligned)."""
        start = offset - offset % CACHE_LINE
        end = min(buffer.size, -(-(offset + nbytes) // CACHE_LINE) * CACHE_LINE)
        return start, end - start

    def _flush(self, buffer: Buffer, offset: int, nbytes: int) -> None:
        start, size = self._lines(buffer, offset, nbytes)
        self.sys.AX_SYS_MflushCache(buffer.physical + start, self.sys_ffi.cast("void *", buffer.address + start), size)

    def _invalidate(self, buffer: Buffer, offset: int, nbytes: int) -> None:
        start, size = self._lines(buffer, offset, nbytes)
        self.sys.AX_SYS_MinvalidateCache(
            buffer.physical + start, self.sys_ffi.cast("void *", buffer.address + start), size
        )

    def write(self, buffer: Buffer, offset: int, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data)
        buffer.span(offset, data.nbytes)
        self.ffi.memmove(self.ffi.cast("void *", buffer.address + offset), data, data.nbytes)
        self._flush(buffer, offset, data.nbytes)

    def read(self, buffer: Buffer, offset: int, nbytes: int) -> np.ndarray:
        buffer.span(offset, nbytes)
        self._invalidate(buffer, offset, nbytes)
        view = self.ffi.buffer(self.ffi.cast("char *", buffer.address + offset), nbytes)
        return np.frombuffer(view, np.uint8).copy()

    def copy(self, source: Buffer, source_offset: int, target: Buffer, target_offset: int, nbytes: int) -> None:
        source.span(source_offset, nbytes)
        target.span(target_offset, nbytes)
        self._invalidate(source, source_offset, nbytes)
        self.ffi.memmove(
            self.ffi.cast("void *", target.address + target_offset),
            self.ffi.cast("void *", source.address + source_offset),
            nbytes,
        )
        self._flush(target, target_offset, nbytes)

    def run(self, group: int) -> None:
        if self._run is None:
            status = self.engine.AX_ENGINE_RunSyncV2(self._handle[0], self._context[0], self._io)
        else:
            status = self._run(self._handle[0], self._context[0], group, self._io)
        if status != 0:
            raise RuntimeError(f"AX_ENGINE_RunGroupIOSync failed with status 0x{status & 0xFFFFFFFF:08x}")


class CardSession(BoundSession):
    """A session on an AXCL card: its buffers are card memory, reached with axclrtMemcpy."""

    def __init__(self, wrapper: Any, input_names, output_names, input_bytes, output_bytes) -> None:
        super().__init__(wrapper, input_names, output_names)
        raw = self.raw
        capi = _module("axengine._axclrt_capi")
        self.ffi = _attribute(capi, "axclrt_cffi", "axengine._axclrt_capi")
        self.lib = lib = _attribute(capi, "axclrt_lib", "axengine._axclrt_capi")
        _functions(
            lib,
            "axengine's AXCL runtime library",
            (
                "axclrtMemcpy",
                "axclrtEngineExecute",
                "axclrtSetCurrentContext",
                "axclrtEngineGetNumInputs",
                "axclrtEngineGetNumOutputs",
                "axclrtEngineGetInputNameByIndex",
                "axclrtEngineGetOutputNameByIndex",
                "axclrtEngineGetInputSizeByIndex",
                "axclrtEngineGetOutputSizeByIndex",
                "axclrtEngineGetInputBufferByIndex",
                "axclrtEngineGetOutputBufferByIndex",
                "axclrtEngineSetInputBufferByIndex",
                "AXCL_MEMCPY_HOST_TO_DEVICE",
                "AXCL_MEMCPY_DEVICE_TO_HOST",
                "AXCL_MEMCPY_DEVICE_TO_DEVICE",
            ),
        )
        what = type(raw).__name__
        self._model = _attribute(raw, "_model_id", what)
        self._context = _attribute(raw, "_context_id", what)
        self._io = _attribute(raw, "_io", what)
        self._thread = _attribute(raw, "_thread_context", what)
        info = _attribute(raw, "_info", what)[0]
        groups = _attribute(raw, "_shape_count", what)
        if groups != len(input_names):
            raise RuntimeMismatch(f"{what} has {groups} shape groups, the model declares {len(input_names)}")
        inputs, outputs = lib.axclrtEngineGetNumInputs(info), lib.axclrtEngineGetNumOutputs(info)
        names = [self.ffi.string(lib.axclrtEngineGetInputNameByIndex(info, i)).decode() for i in range(inputs)]
        outs = [self.ffi.string(lib.axclrtEngineGetOutputNameByIndex(info, i)).decode() for i in range(outputs)]
        if any(names != group for group in input_names) or any(outs != group for group in output_names):
            raise RuntimeMismatch(f"the IO info names {names} -> {outs}")
        self._inputs = [self._get(lib.axclrtEngineGetInputBufferByIndex, i) for i in range(inputs)]
        self._outputs = [self._get(lib.axclrtEngineGetOutputBufferByIndex, i) for i in range(outputs)]
        _check_sizes(
            "input",
            [b.size for b in self._inputs],
            [[int(lib.axclrtEngineGetInputSizeByIndex(info, g, i)) for i in range(inputs)] for g in range(groups)],
            input_bytes,
        )
        _check_sizes(
            "output",
            [b.size for b in self._outputs],
            [[int(lib.axclrtEngineGetOutputSizeByIndex(info, g, i)) for i in range(outputs)] for g in range(groups)],
            output_bytes,
        )

    def _get(self, function: Any, index: int) -> Buffer:
        pointer, size = self.ffi.new("void **"), self.ffi.new("uint64_t *")
        status = function(self._io[0], index, pointer, size)
        if status != 0:
            raise RuntimeMismatch(f"the session's IO has no buffer {index} (status 0x{status & 0xFFFFFFFF:08x})")
        return Buffer(int(self.ffi.cast("uintptr_t", pointer[0])), int(size[0]))

    def input(self, index: int) -> Buffer:
        return self._inputs[index]

    def output(self, index: int) -> Buffer:
        return self._outputs[index]

    def _point_input(self, index: int, buffer: Buffer) -> None:
        self._check(
            "axclrtEngineSetInputBufferByIndex",
            self.lib.axclrtEngineSetInputBufferByIndex(
                self._io[0], index, self.ffi.cast("void *", buffer.address), buffer.size
            ),
        )
        self._inputs[index] = buffer

    def _check(self, call: str, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"{call} failed with status 0x{status & 0xFFFFFFFF:08x}")

    def _memcpy(self, target: int, source: int, nbytes: int, kind: int) -> None:
        pointer = self.ffi.cast
        self._check(
            "axclrtMemcpy", self.lib.axclrtMemcpy(pointer("void *", target), pointer("void *", source), nbytes, kind)
        )

    def write(self, buffer: Buffer, offset: int, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data)
        buffer.span(offset, data.nbytes)
        self._memcpy(buffer.address + offset, data.ctypes.data, data.nbytes, self.lib.AXCL_MEMCPY_HOST_TO_DEVICE)

    def read(self, buffer: Buffer, offset: int, nbytes: int) -> np.ndarray:
        buffer.span(offset, nbytes)
        out = np.empty(nbytes, np.uint8)
        self._memcpy(out.ctypes.data, buffer.address + offset, nbytes, self.lib.AXCL_MEMCPY_DEVICE_TO_HOST)
        return out

    def copy(self, source: Buffer, source_offset: int, target: Buffer, target_offset: int, nbytes: int) -> None:
        source.span(source_offset, nbytes)
        target.span(target_offset, nbytes)
        self._memcpy(
            target.address + target_offset,
            source.address + source_offset,
            nbytes,
            self.lib.AXCL_MEMCPY_DEVICE_TO_DEVICE,
        )

    def run(self, group: int) -> None:
        self._check("axclrtSetCurrentContext", self.lib.axclrtSetCurrentContext(self._thread[0]))
        self._check(
            "axclrtEngineExecute", self.lib.axclrtEngineExecute(self._model[0], self._context[0], group, self._io[0])
        )


def bind(wrapper: Any, input_names, output_names, input_bytes, output_bytes) -> BoundSession:
    """The buffers of an axengine.InferenceSession, on whichever provider it runs; RuntimeMismatch if the
    installed pyaxengine is not the one this module knows. Names and byte sizes are per shape group, in the
    session's declared order (what get_inputs/get_outputs list)."""
    raw = _attribute(wrapper, "_sess", "InferenceSession")
    kind = type(raw).__name__
    try:
        if kind == "AXEngineSession":
            return BoardSession(wrapper, input_names, output_names, input_bytes, output_bytes)
        if kind == "AXCLRTSession":
            return CardSession(wrapper, input_names, output_names, input_bytes, output_bytes)
    except RuntimeMismatch:
        raise
    except Exception as exc:  # a cffi type or call that does not take these arguments, any other difference
        raise RuntimeMismatch(f"{kind}: {type(exc).__name__}: {exc}") from None
    raise RuntimeMismatch(f"an unknown session class {kind} (known: AXEngineSession, AXCLRTSession)")
