"""pyaxengine's cffi layer for the AXCL card (`axengine._axclrt_capi`), with libaxcl_rt emulated.

Module names as pyaxengine's: `axclrt_cffi` (a real `cffi.FFI` with the declarations of axcl_base.h,
axcl_rt_type.h, axcl_rt_engine_type.h and the runtime's API, axclrtMemcpyKind's values included; its memmove
counts into `memory.copied`) and `axclrt_lib` (the emulated runtime, tests/doubles/axengine/_clib.py).

The card's memory is `_memory.device_memory`: device pointers from 0x4000_0000_0000_0000 up, reachable only
through axclrtMemcpy, which checks the kind against the pointers (a host pointer where a device one belongs, or a
range leaving its allocation, is refused) and counts bytes per kind. An engine IO holds one (device pointer, size)
per input and output index: any device pointer may be set, inside another allocation or another session's buffer
included. axclrtEngineExecute reads each input from device memory through those pointers (after checking the size
the group needs), runs the graph and writes the outputs to device memory. Input and output NAMES and dtypes are
per index, the same in every shape group; dims and sizes are per (group, index). Device memory, models and IOs
belong to the device of the calling thread's current context (axclrtSetDevice, axclrtSetCurrentContext).
Every refused call returns a nonzero status and says why in `memory.errors`.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cffi
import numpy as np

from ._clib import CountingFFI, EmulatedLib
from ._memory import DevicePool, calls, device_memory, memory
from ._model import CompiledModel, Tensor

__all__ = ["axclrt_cffi", "axclrt_lib"]

AXCLRT_CDEF = """
#define AXCL_MAX_DEVICE_COUNT 256
typedef int32_t axclError;
typedef void *axclrtContext;

typedef struct axclrtDeviceList {
    uint32_t num;
    int32_t devices[AXCL_MAX_DEVICE_COUNT];
} axclrtDeviceList;

typedef enum axclrtMemMallocPolicy {
    AXCL_MEM_MALLOC_HUGE_FIRST,
    AXCL_MEM_MALLOC_HUGE_ONLY,
    AXCL_MEM_MALLOC_NORMAL_ONLY
} axclrtMemMallocPolicy;

typedef enum axclrtMemcpyKind {
    AXCL_MEMCPY_HOST_TO_HOST,
    AXCL_MEMCPY_HOST_TO_DEVICE,
    AXCL_MEMCPY_DEVICE_TO_HOST,
    AXCL_MEMCPY_DEVICE_TO_DEVICE,
    AXCL_MEMCPY_HOST_PHY_TO_DEVICE,
    AXCL_MEMCPY_DEVICE_TO_HOST_PHY,
} axclrtMemcpyKind;

#define AXCLRT_ENGINE_MAX_DIM_CNT 32
typedef void* axclrtEngineIOInfo;
typedef void* axclrtEngineIO;

typedef enum axclrtEngineVNpuKind {
    AXCL_VNPU_DISABLE = 0,
    AXCL_VNPU_ENABLE = 1,
    AXCL_VNPU_BIG_LITTLE = 2,
    AXCL_VNPU_LITTLE_BIG = 3,
} axclrtEngineVNpuKind;

typedef enum axclrtEngineDataType {
    AXCL_DATA_TYPE_NONE = 0,
    AXCL_DATA_TYPE_INT4 = 1,
    AXCL_DATA_TYPE_UINT4 = 2,
    AXCL_DATA_TYPE_INT8 = 3,
    AXCL_DATA_TYPE_UINT8 = 4,
    AXCL_DATA_TYPE_INT16 = 5,
    AXCL_DATA_TYPE_UINT16 = 6,
    AXCL_DATA_TYPE_INT32 = 7,
    AXCL_DATA_TYPE_UINT32 = 8,
    AXCL_DATA_TYPE_INT64 = 9,
    AXCL_DATA_TYPE_UINT64 = 10,
    AXCL_DATA_TYPE_FP4 = 11,
    AXCL_DATA_TYPE_FP8 = 12,
    AXCL_DATA_TYPE_FP16 = 13,
    AXCL_DATA_TYPE_BF16 = 14,
    AXCL_DATA_TYPE_FP32 = 15,
    AXCL_DATA_TYPE_FP64 = 16,
} axclrtEngineDataType;

typedef enum axclrtEngineDataLayout {
    AXCL_DATA_LAYOUT_NONE = 0,
    AXCL_DATA_LAYOUT_NHWC = 0,
    AXCL_DATA_LAYOUT_NCHW = 1,
} axclrtEngineDataLayout;

typedef struct axclrtEngineIODims {
    int32_t dimCount;
    int32_t dims[AXCLRT_ENGINE_MAX_DIM_CNT];
} axclrtEngineIODims;

axclError axclInit(const char *config);
axclError axclFinalize();

axclError axclrtGetVersion(int32_t *major, int32_t *minor, int32_t *patch);
const char *axclrtGetSocName();

axclError axclrtGetDeviceList(axclrtDeviceList *deviceList);
axclError axclrtSetDevice(int32_t deviceId);
axclError axclrtResetDevice(int32_t deviceId);

axclError axclrtCreateContext(axclrtContext *context, int32_t deviceId);
axclError axclrtDestroyContext(axclrtContext context);
axclError axclrtSetCurrentContext(axclrtContext context);
axclError axclrtGetCurrentContext(axclrtContext *context);
axclError axclrtGetDefaultContext(axclrtContext *context, int32_t deviceId);

axclError axclrtEngineInit(axclrtEngineVNpuKind npuKind);
axclError axclrtEngineGetVNpuKind(axclrtEngineVNpuKind *npuKind);
axclError axclrtEngineFinalize();

axclError axclrtEngineLoadFromFile(const char *modelPath, uint64_t *modelId);
axclError axclrtEngineLoadFromMem(const void *model, uint64_t modelSize, uint64_t *modelId);
const char* axclrtEngineGetModelCompilerVersion(uint64_t modelId);
axclError axclrtEngineUnload(uint64_t modelId);

axclError axclrtEngineGetIOInfo(uint64_t modelId, axclrtEngineIOInfo *ioInfo);
axclError axclrtEngineGetShapeGroupsCount(axclrtEngineIOInfo ioInfo, int32_t *count);

uint32_t axclrtEngineGetNumInputs(axclrtEngineIOInfo ioInfo);
uint32_t axclrtEngineGetNumOutputs(axclrtEngineIOInfo ioInfo);

uint64_t axclrtEngineGetInputSizeByIndex(axclrtEngineIOInfo ioInfo, uint32_t group, uint32_t index);
uint64_t axclrtEngineGetOutputSizeByIndex(axclrtEngineIOInfo ioInfo, uint32_t group, uint32_t index);

axclError axclrtEngineGetInputDims(axclrtEngineIOInfo ioInfo, uint32_t group, uint32_t index,
                                   axclrtEngineIODims *dims);
axclError axclrtEngineGetOutputDims(axclrtEngineIOInfo ioInfo, uint32_t group, uint32_t index,
                                   axclrtEngineIODims *dims);

const char *axclrtEngineGetInputNameByIndex(axclrtEngineIOInfo ioInfo, uint32_t index);
const char *axclrtEngineGetOutputNameByIndex(axclrtEngineIOInfo ioInfo, uint32_t index);

int32_t axclrtEngineGetInputDataType(axclrtEngineIOInfo ioInfo, uint32_t index, axclrtEngineDataType *type);
int32_t axclrtEngineGetOutputDataType(axclrtEngineIOInfo ioInfo, uint32_t index, axclrtEngineDataType *type);

int32_t axclrtEngineGetInputDataLayout(axclrtEngineIOInfo ioInfo, uint32_t index, axclrtEngineDataLayout *layout);
int32_t axclrtEngineGetOutputDataLayout(axclrtEngineIOInfo ioInfo, uint32_t index, axclrtEngineDataLayout *layout);

axclError axclrtEngineCreateIO(axclrtEngineIOInfo ioInfo, axclrtEngineIO *io);
axclError axclrtEngineDestroyIO(axclrtEngineIO io);

axclError axclrtEngineSetInputBufferByIndex(axclrtEngineIO io, uint32_t index, const void *dataBuffer, uint64_t size);
axclError axclrtEngineSetOutputBufferByIndex(axclrtEngineIO io, uint32_t index, const void *dataBuffer, uint64_t size);
axclError axclrtEngineGetInputBufferByIndex(axclrtEngineIO io, uint32_t index, void **dataBuffer, uint64_t *size);
axclError axclrtEngineGetOutputBufferByIndex(axclrtEngineIO io, uint32_t index, void **dataBuffer, uint64_t *size);

axclError axclrtEngineCreateContext(uint64_t modelId, uint64_t *contextId);

axclError axclrtEngineExecute(uint64_t modelId, uint64_t contextId, uint32_t group, axclrtEngineIO io);

axclError axclrtMalloc(void **devPtr, size_t size, axclrtMemMallocPolicy policy);
axclError axclrtMallocCached(void **devPtr, size_t size, axclrtMemMallocPolicy policy);
axclError axclrtMemcpy(void *dstPtr, const void *srcPtr, size_t count, axclrtMemcpyKind kind);
axclError axclrtFree(void *devPtr);
axclError axclrtMemFlush(void *devPtr, size_t size);
"""

axclrt_cffi = CountingFFI()
axclrt_cffi.cdef(AXCLRT_CDEF)
ffi = axclrt_cffi


def _code(value: int) -> int:
    """An axclError from its unsigned 0x8xxxxxxx spelling (the codes themselves are the double's)."""
    return value - (1 << 32)


ERR_NOT_INIT = _code(0x80020010)
ERR_INVALID_PARAM = _code(0x80020001)
ERR_NULL_POINTER = _code(0x80020002)
ERR_NO_CONTEXT = _code(0x80020011)
ERR_NO_MEMORY = _code(0x80020018)
ERR_MEMCPY = _code(0x80020020)
ERR_BAD_FREE = _code(0x80020021)
ERR_MODEL_LOAD = _code(0x80030001)
ERR_MODEL_ID = _code(0x80030002)
ERR_IO = _code(0x80030003)
ERR_EXECUTE = _code(0x80030004)

DEVICE_BUS_BASE = 0x81  # device ids are PCIe bus numbers: device_id N of pyaxengine is the N-th of the list
_KINDS = {
    "AXCL_MEMCPY_HOST_TO_HOST": "h2h",
    "AXCL_MEMCPY_HOST_TO_DEVICE": "h2d",
    "AXCL_MEMCPY_DEVICE_TO_HOST": "d2h",
    "AXCL_MEMCPY_DEVICE_TO_DEVICE": "d2d",
}
_DTYPES = {
    "uint8": "AXCL_DATA_TYPE_UINT8",
    "int8": "AXCL_DATA_TYPE_INT8",
    "uint16": "AXCL_DATA_TYPE_UINT16",
    "int16": "AXCL_DATA_TYPE_INT16",
    "uint32": "AXCL_DATA_TYPE_UINT32",
    "int32": "AXCL_DATA_TYPE_INT32",
    "float32": "AXCL_DATA_TYPE_FP32",
    "float64": "AXCL_DATA_TYPE_FP64",
    "float16": "AXCL_DATA_TYPE_FP16",
    "bfloat16": "AXCL_DATA_TYPE_BF16",
}
_SOC_NAME = ffi.new("char[]", b"AX650N")
_COMPILER_VERSION = ffi.new("char[]", b"4.0 (axengine double)")


def _addr(pointer: Any) -> int:
    return int(ffi.cast("uintptr_t", pointer))


def _refuse(status: int, reason: str) -> int:
    memory.errors.append(reason)
    return status


def _device_count() -> int:
    """How many devices the card's host sees: the package's DEVICES (tests change it), 4 without one."""
    package = sys.modules.get(__name__.rpartition(".")[0])
    return int(getattr(package, "DEVICES", 4))


@dataclass(eq=False)
class _Model:
    model: CompiledModel
    device: int
    info: Any  # char[1]: its address is the model's axclrtEngineIOInfo
    names: dict[tuple[str, int], Any] = field(default_factory=dict)  # ("Input"/"Output", index) -> char[]
    contexts: set[int] = field(default_factory=set)

    def tensors(self, kind: str, group: int) -> tuple[Tensor, ...]:
        g = self.model.groups[group]
        return g.inputs if kind == "Input" else g.outputs


@dataclass(eq=False)
class _Io:
    model_id: int
    cell: Any
    inputs: list[tuple[int, int]]  # (device address, size) per index; (0, 0) until set
    outputs: list[tuple[int, int]]


class _State:
    def __init__(self) -> None:
        self.initialized = False
        self.engine_kind: int | None = None
        self.contexts: dict[int, tuple[Any, int]] = {}  # context address -> (cell, device id)
        self.defaults: dict[int, int] = {}  # device id -> its default context
        self.current = threading.local()  # .context: the calling thread's current context address
        self.models: dict[int, _Model] = {}
        self.infos: dict[int, int] = {}  # info address -> model id
        self.ios: dict[int, _Io] = {}
        self.next_id = 1


_state = _State()


def _current_device() -> int | None:
    context = getattr(_state.current, "context", None)
    found = _state.contexts.get(context) if context is not None else None
    return found[1] if found else None


def _devices() -> list[int]:
    return [DEVICE_BUS_BASE + i for i in range(_device_count())]


# axcl.h, axcl_rt.h, axcl_rt_device.h, axcl_rt_context.h ------------------------------------------------------


def axclInit(config: Any) -> int:
    _state.initialized = True
    return 0


def axclFinalize() -> int:
    _state.initialized = False
    return 0


def axclrtGetVersion(major: Any, minor: Any, patch: Any) -> int:
    major[0], minor[0], patch[0] = 3, 6, 2
    return 0


def axclrtGetSocName() -> Any:
    return _SOC_NAME


def axclrtGetDeviceList(device_list: Any) -> int:
    if not _state.initialized:
        return _refuse(ERR_NOT_INIT, "axclrtGetDeviceList before axclInit")
    devices = _devices()
    device_list.num = len(devices)
    for i, device in enumerate(devices):
        device_list.devices[i] = device
    return 0


def _new_context(device: int) -> int:
    cell = ffi.new("char[1]")
    _state.contexts[_addr(cell)] = (cell, device)
    return _addr(cell)


def axclrtSetDevice(device: int) -> int:
    if not _state.initialized:
        return _refuse(ERR_NOT_INIT, "axclrtSetDevice before axclInit")
    if device not in _devices():
        return _refuse(ERR_INVALID_PARAM, f"axclrtSetDevice({device}): no such device (have {_devices()})")
    if device not in _state.defaults:
        _state.defaults[device] = _new_context(device)
    _state.current.context = _state.defaults[device]
    return 0


def axclrtResetDevice(device: int) -> int:
    return 0 if device in _devices() else _refuse(ERR_INVALID_PARAM, f"axclrtResetDevice({device})")


def axclrtCreateContext(context: Any, device: int) -> int:
    if device not in _devices():
        return _refuse(ERR_INVALID_PARAM, f"axclrtCreateContext on device {device}: no such device")
    context[0] = ffi.cast("void *", _new_context(device))
    _state.current.context = _addr(context[0])
    return 0


def axclrtDestroyContext(context: Any) -> int:
    if _state.contexts.pop(_addr(context), None) is None:
        return _refuse(ERR_INVALID_PARAM, "axclrtDestroyContext: not a context")
    return 0


def axclrtSetCurrentContext(context: Any) -> int:
    if _addr(context) not in _state.contexts:
        return _refuse(ERR_INVALID_PARAM, f"axclrtSetCurrentContext(0x{_addr(context):x}): not a context")
    _state.current.context = _addr(context)
    return 0


def axclrtGetCurrentContext(context: Any) -> int:
    current = getattr(_state.current, "context", None)
    if current is None or current not in _state.contexts:
        return _refuse(ERR_NO_CONTEXT, "axclrtGetCurrentContext: this thread has no context (axclrtSetDevice)")
    context[0] = ffi.cast("void *", current)
    return 0


def axclrtGetDefaultContext(context: Any, device: int) -> int:
    if device not in _state.defaults:
        return _refuse(ERR_NO_CONTEXT, f"axclrtGetDefaultContext: device {device} was never set")
    context[0] = ffi.cast("void *", _state.defaults[device])
    return 0


# axcl_rt_engine.h ---------------------------------------------------------------------------------------------


def axclrtEngineInit(kind: int) -> int:
    if _current_device() is None:
        return _refuse(ERR_NO_CONTEXT, "axclrtEngineInit without a device (axclrtSetDevice)")
    if _state.engine_kind is None:
        _state.engine_kind = kind
    return 0


def axclrtEngineGetVNpuKind(kind: Any) -> int:
    if _state.engine_kind is None:
        return _refuse(ERR_NOT_INIT, "axclrtEngineGetVNpuKind before axclrtEngineInit")
    kind[0] = _state.engine_kind
    return 0


def axclrtEngineFinalize() -> int:
    _state.engine_kind = None
    return 0


def _load(data: bytes, label: str, model_id: Any) -> int:
    device = _current_device()
    if device is None or _state.engine_kind is None:
        return _refuse(ERR_NO_CONTEXT, f"loading {label} without a device context or axclrtEngineInit")
    model = CompiledModel.parse(data, label)
    if model is None:
        return _refuse(ERR_MODEL_LOAD, f"{label} is not a compiled model")
    first = model.groups[0]
    for g, group in enumerate(model.groups):
        for kind, tensors, first_tensors in (
            ("input", group.inputs, first.inputs),
            ("output", group.outputs, first.outputs),
        ):
            same = [(t.name, t.dtype) for t in tensors] == [(t.name, t.dtype) for t in first_tensors]
            if not same or any(t.dtype.name not in _DTYPES for t in tensors):
                return _refuse(ERR_MODEL_LOAD, f"{label} group {g}: {kind} names or dtypes differ from group 0's")
    model_id[0] = _state.next_id
    info = ffi.new("char[1]")
    _state.models[_state.next_id] = _Model(model, device, info)
    _state.infos[_addr(info)] = _state.next_id
    _state.next_id += 1
    return 0


def axclrtEngineLoadFromFile(path: Any, model_id: Any) -> int:
    if path == ffi.NULL or model_id == ffi.NULL:
        return _refuse(ERR_NULL_POINTER, "axclrtEngineLoadFromFile with NULL")
    name = ffi.string(path).decode()
    try:
        data = Path(name).read_bytes()
    except OSError as exc:
        return _refuse(ERR_MODEL_LOAD, f"axclrtEngineLoadFromFile({name}): {exc}")
    return _load(data, Path(name).name, model_id)


def axclrtEngineLoadFromMem(model: Any, size: int, model_id: Any) -> int:
    found = device_memory.find(_addr(model), size)
    if found is None:
        return _refuse(ERR_MODEL_LOAD, f"axclrtEngineLoadFromMem: {size} bytes at 0x{_addr(model):x} not on device")
    block, offset = found
    return _load(block.data[offset : offset + size].tobytes(), "model", model_id)


def axclrtEngineGetModelCompilerVersion(model_id: int) -> Any:
    return _COMPILER_VERSION if model_id in _state.models else ffi.NULL


def axclrtEngineUnload(model_id: int) -> int:
    model = _state.models.pop(model_id, None)
    if model is None:
        return _refuse(ERR_MODEL_ID, f"axclrtEngineUnload({model_id}): no such model")
    _state.infos.pop(_addr(model.info), None)
    return 0


def axclrtEngineGetIOInfo(model_id: int, info: Any) -> int:
    model = _state.models.get(model_id)
    if model is None:
        return _refuse(ERR_MODEL_ID, f"axclrtEngineGetIOInfo({model_id}): no such model")
    info[0] = ffi.cast("void *", model.info)
    return 0


def _by_info(info: Any) -> _Model | None:
    model_id = _state.infos.get(_addr(info))
    return None if model_id is None else _state.models.get(model_id)


def axclrtEngineGetShapeGroupsCount(info: Any, count: Any) -> int:
    model = _by_info(info)
    if model is None:
        return _refuse(ERR_IO, "axclrtEngineGetShapeGroupsCount: not an IO info")
    count[0] = len(model.model.groups)
    return 0


def _num(info: Any, kind: str) -> int:
    model = _by_info(info)
    return 0 if model is None else len(model.tensors(kind, 0))


def axclrtEngineGetNumInputs(info: Any) -> int:
    return _num(info, "Input")


def axclrtEngineGetNumOutputs(info: Any) -> int:
    return _num(info, "Output")


def _tensor(info: Any, kind: str, group: int, index: int) -> Tensor | None:
    model = _by_info(info)
    if model is None or group >= len(model.model.groups) or index >= len(model.tensors(kind, group)):
        return None
    return model.tensors(kind, group)[index]


def axclrtEngineGetInputSizeByIndex(info: Any, group: int, index: int) -> int:
    tensor = _tensor(info, "Input", group, index)
    return 0 if tensor is None else tensor.nbytes


def axclrtEngineGetOutputSizeByIndex(info: Any, group: int, index: int) -> int:
    tensor = _tensor(info, "Output", group, index)
    return 0 if tensor is None else tensor.nbytes


def _dims(info: Any, kind: str, group: int, index: int, dims: Any) -> int:
    tensor = _tensor(info, kind, group, index)
    if tensor is None or dims == ffi.NULL:
        return _refuse(ERR_IO, f"axclrtEngineGet{kind}Dims: no {kind.lower()} {index} in group {group}")
    dims.dimCount = len(tensor.shape)
    for i, d in enumerate(tensor.shape):
        dims.dims[i] = d
    return 0


def axclrtEngineGetInputDims(info: Any, group: int, index: int, dims: Any) -> int:
    return _dims(info, "Input", group, index, dims)


def axclrtEngineGetOutputDims(info: Any, group: int, index: int, dims: Any) -> int:
    return _dims(info, "Output", group, index, dims)


def _name(info: Any, kind: str, index: int) -> Any:
    model, tensor = _by_info(info), _tensor(info, kind, 0, index)
    if model is None or tensor is None:
        return ffi.NULL
    return model.names.setdefault((kind, index), ffi.new("char[]", tensor.name.encode()))


def axclrtEngineGetInputNameByIndex(info: Any, index: int) -> Any:
    return _name(info, "Input", index)


def axclrtEngineGetOutputNameByIndex(info: Any, index: int) -> Any:
    return _name(info, "Output", index)


def _data_type(info: Any, kind: str, index: int, data_type: Any) -> int:
    tensor = _tensor(info, kind, 0, index)
    if tensor is None or data_type == ffi.NULL:
        return _refuse(ERR_IO, f"axclrtEngineGet{kind}DataType: no {kind.lower()} {index}")
    data_type[0] = getattr(axclrt_lib, _DTYPES[tensor.dtype.name])
    return 0


def axclrtEngineGetInputDataType(info: Any, index: int, data_type: Any) -> int:
    return _data_type(info, "Input", index, data_type)


def axclrtEngineGetOutputDataType(info: Any, index: int, data_type: Any) -> int:
    return _data_type(info, "Output", index, data_type)


def _layout(info: Any, kind: str, index: int, layout: Any) -> int:
    if _tensor(info, kind, 0, index) is None or layout == ffi.NULL:
        return _refuse(ERR_IO, f"axclrtEngineGet{kind}DataLayout: no {kind.lower()} {index}")
    layout[0] = axclrt_lib.AXCL_DATA_LAYOUT_NONE
    return 0


def axclrtEngineGetInputDataLayout(info: Any, index: int, layout: Any) -> int:
    return _layout(info, "Input", index, layout)


def axclrtEngineGetOutputDataLayout(info: Any, index: int, layout: Any) -> int:
    return _layout(info, "Output", index, layout)


def axclrtEngineCreateIO(info: Any, io: Any) -> int:
    model_id = _state.infos.get(_addr(info))
    if model_id is None or io == ffi.NULL:
        return _refuse(ERR_IO, "axclrtEngineCreateIO: not an IO info")
    model = _state.models[model_id]
    cell = ffi.new("char[1]")
    n_in, n_out = len(model.tensors("Input", 0)), len(model.tensors("Output", 0))
    _state.ios[_addr(cell)] = _Io(model_id, cell, [(0, 0)] * n_in, [(0, 0)] * n_out)
    io[0] = ffi.cast("void *", cell)
    return 0


def axclrtEngineDestroyIO(io: Any) -> int:
    if _state.ios.pop(_addr(io), None) is None:
        return _refuse(ERR_IO, "axclrtEngineDestroyIO: not an IO")
    return 0


def _set_buffer(io: Any, kind: str, index: int, data: Any, size: int) -> int:
    call = f"axclrtEngineSet{kind}BufferByIndex"
    found = _state.ios.get(_addr(io))
    slots = None if found is None else (found.inputs if kind == "Input" else found.outputs)
    if slots is None or index >= len(slots):
        return _refuse(ERR_IO, f"{call}: no {kind.lower()} {index} in that IO")
    address = _addr(data)
    if not DevicePool.is_device(address) or device_memory.find(address, size) is None:
        return _refuse(ERR_INVALID_PARAM, f"{call}({index}): {size} bytes at 0x{address:x} are not device memory")
    slots[index] = (address, size)
    return 0


def axclrtEngineSetInputBufferByIndex(io: Any, index: int, data: Any, size: int) -> int:
    return _set_buffer(io, "Input", index, data, size)


def axclrtEngineSetOutputBufferByIndex(io: Any, index: int, data: Any, size: int) -> int:
    return _set_buffer(io, "Output", index, data, size)


def _get_buffer(io: Any, kind: str, index: int, data: Any, size: Any) -> int:
    found = _state.ios.get(_addr(io))
    slots = None if found is None else (found.inputs if kind == "Input" else found.outputs)
    if slots is None or index >= len(slots) or data == ffi.NULL or size == ffi.NULL:
        return _refuse(ERR_IO, f"axclrtEngineGet{kind}BufferByIndex: no {kind.lower()} {index} in that IO")
    data[0] = ffi.cast("void *", slots[index][0])
    size[0] = slots[index][1]
    return 0


def axclrtEngineGetInputBufferByIndex(io: Any, index: int, data: Any, size: Any) -> int:
    return _get_buffer(io, "Input", index, data, size)


def axclrtEngineGetOutputBufferByIndex(io: Any, index: int, data: Any, size: Any) -> int:
    return _get_buffer(io, "Output", index, data, size)


def axclrtEngineCreateContext(model_id: int, context: Any) -> int:
    model = _state.models.get(model_id)
    if model is None or context == ffi.NULL:
        return _refuse(ERR_MODEL_ID, f"axclrtEngineCreateContext({model_id}): no such model")
    context[0] = _state.next_id
    model.contexts.add(_state.next_id)
    _state.next_id += 1
    return 0


def axclrtEngineExecute(model_id: int, context: int, group: int, io: Any) -> int:
    """One run: read each input from device memory through the IO, run the graph, write outputs there."""
    model = _state.models.get(model_id)
    if model is None:
        return _refuse(ERR_MODEL_ID, f"axclrtEngineExecute({model_id}): no such model")
    label = model.model.label
    if context not in model.contexts:
        return _refuse(ERR_EXECUTE, f"axclrtEngineExecute: {label}: {context} is not a context of this model")
    if _current_device() != model.device:
        return _refuse(ERR_NO_CONTEXT, f"axclrtEngineExecute: {label}: the thread's context is not its device's")
    found = _state.ios.get(_addr(io))
    if found is None or found.model_id != model_id:
        return _refuse(ERR_IO, f"axclrtEngineExecute: {label}: not an IO of this model")
    if group >= len(model.model.groups):
        return _refuse(ERR_EXECUTE, f"axclrtEngineExecute: {label} has no shape group {group}")
    places = []
    for kind, slots in (("Input", found.inputs), ("Output", found.outputs)):
        for index, (tensor, (address, size)) in enumerate(zip(model.tensors(kind, group), slots, strict=True)):
            where = f"axclrtEngineExecute: {label} group {group}: {kind.lower()} {index} ({tensor.name})"
            if address == 0:
                return _refuse(ERR_IO, f"{where}: no buffer set")
            if size < tensor.nbytes:
                return _refuse(ERR_IO, f"{where} needs {tensor.nbytes} bytes, its buffer has {size}")
            block = device_memory.find(address, tensor.nbytes)
            if block is None or block[0].device != model.device:
                return _refuse(ERR_IO, f"{where}: 0x{address:x} is not live memory of device {model.device}")
            places.append((tensor, block))
    n_in = len(found.inputs)
    calls.append((label, group))
    memory.runs += 1
    results = model.model.execute(group, [b.data[o : o + t.nbytes] for t, (b, o) in places[:n_in]])
    for (tensor, (block, offset)), raw in zip(places[n_in:], results, strict=True):
        block.data[offset : offset + tensor.nbytes] = raw
    return 0


# axcl_rt_memory.h ---------------------------------------------------------------------------------------------


def axclrtMalloc(pointer: Any, size: int, policy: int) -> int:
    device = _current_device()
    if device is None:
        return _refuse(ERR_NO_CONTEXT, "axclrtMalloc without a device context (axclrtSetDevice)")
    if pointer == ffi.NULL or size == 0:
        return _refuse(ERR_INVALID_PARAM, f"axclrtMalloc of {size} bytes into NULL")
    pointer[0] = ffi.cast("void *", device_memory.alloc(size, device).addr)
    return 0


def axclrtMallocCached(pointer: Any, size: int, policy: int) -> int:
    return axclrtMalloc(pointer, size, policy)


def _device_range(call: str, role: str, pointer: Any, count: int) -> tuple[Any, int] | str:
    address = _addr(pointer)
    if not DevicePool.is_device(address):
        return f"{call}: {role} 0x{address:x} is not a device pointer"
    found = device_memory.find(address, count)
    if found is None:
        return f"{call}: {count} bytes at {role} 0x{address:x} leave its device allocation"
    if found[0].device != _current_device():
        return f"{call}: {role} 0x{address:x} is memory of device {found[0].device}, not the current one"
    return found


def _host_range(call: str, role: str, pointer: Any) -> str | None:
    address = _addr(pointer)
    if address == 0:
        return f"{call}: {role} is NULL"
    if DevicePool.is_device(address):
        return f"{call}: {role} 0x{address:x} is a device pointer where a host one belongs"
    return None


def axclrtMemcpy(dst: Any, src: Any, count: int, kind: int) -> int:
    names = {getattr(axclrt_lib, k): v for k, v in _KINDS.items()}
    if kind not in names:
        return _refuse(ERR_MEMCPY, f"axclrtMemcpy: kind {kind} (host physical memory) is not emulated")
    direction = names[kind]
    call = f"axclrtMemcpy({direction})"
    if direction != "h2h" and _current_device() is None:
        return _refuse(ERR_NO_CONTEXT, f"{call} without a device context")
    ends = {}
    for role, pointer, side in (("dst", dst, direction[2]), ("src", src, direction[0])):
        found = _device_range(call, role, pointer, count) if side == "d" else _host_range(call, role, pointer)
        if isinstance(found, str):
            return _refuse(ERR_MEMCPY, found)
        ends[role] = found
    if direction == "h2h":
        cffi.FFI.memmove(ffi, dst, src, count)  # not counted as `copied`: the runtime's own copy
    elif direction == "h2d":
        block, offset = ends["dst"]
        block.data[offset : offset + count] = np.frombuffer(ffi.buffer(ffi.cast("char *", src), count), np.uint8)
    elif direction == "d2h":
        block, offset = ends["src"]
        ffi.buffer(ffi.cast("char *", dst), count)[:] = memoryview(block.data[offset : offset + count])
    else:
        (dst_block, dst_offset), (src_block, src_offset) = ends["dst"], ends["src"]
        dst_block.data[dst_offset : dst_offset + count] = src_block.data[src_offset : src_offset + count]
    setattr(memory, direction, getattr(memory, direction) + count)
    return 0


def axclrtFree(pointer: Any) -> int:
    address = _addr(pointer)
    if not device_memory.free(address):
        inside = device_memory.find(address, 0) if DevicePool.is_device(address) else None
        why = "inside a live allocation, not its start" if inside else "not a live allocation (freed already?)"
        return _refuse(ERR_BAD_FREE, f"axclrtFree(0x{address:x}): {why}")
    return 0


def axclrtMemFlush(pointer: Any, size: int) -> int:
    if device_memory.find(_addr(pointer), size) is None:
        return _refuse(ERR_INVALID_PARAM, f"axclrtMemFlush: {size} bytes at 0x{_addr(pointer):x}")
    return 0


_IMPLEMENTED = [name for name in globals() if name.startswith("axcl") and callable(globals()[name])]
axclrt_lib = EmulatedLib("libaxcl_rt.so (emulated)", axclrt_cffi, AXCLRT_CDEF, {n: globals()[n] for n in _IMPLEMENTED})
