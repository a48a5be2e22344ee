"""pyaxengine's cffi layer for the AXE board (`axengine._axe_capi`), with libax_sys and libax_engine emulated.

Module names as pyaxengine's: `sys_cffi`, `sys_lib`, `engine_cffi`, `engine_lib`. The two FFIs are real
`cffi.FFI` instances holding the C declarations of ax_base_type.h, ax_sys_api.h, ax_engine_type.h (its 64-bit
struct layouts) and ax_engine_api.h, so structs made with them have the board's exact layout; their `memmove`
counts into `memory.copied`. The libraries are emulated (tests/doubles/axengine/_clib.py) on the memory model of
_memory.py: CMM allocations with separate CPU and NPU views, runs that read inputs from DRAM at the IO struct's
physical addresses after checking that every byte the CPU wrote there was flushed, and write outputs to DRAM.

The chip is an AX650 (MC50): AX_ENGINE_SetAffinity exists, AX_ENGINE_GetTotalOps (an MC20E symbol) does not.
Every refused call returns a nonzero status and says why in `memory.errors`.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._clib import CountingFFI, EmulatedLib
from ._memory import calls, cmm, memory
from ._model import CompiledModel, Group, Tensor

__all__ = ["sys_cffi", "sys_lib", "engine_cffi", "engine_lib"]

if platform.architecture()[0] != "64bit":
    raise ImportError("the axengine double declares the 64-bit struct layouts only")

# ax_base_type.h (the types libax_sys uses) and ax_sys_api.h
SYS_CDEF = """
typedef int                     AX_S32;
typedef unsigned int            AX_U32;
typedef unsigned long long int  AX_U64;
typedef signed char             AX_S8;
typedef void                    AX_VOID;

AX_S32 AX_SYS_Init(AX_VOID);
AX_S32 AX_SYS_Deinit(AX_VOID);
AX_S32 AX_SYS_MemAllocCached(AX_U64 *phyaddr, AX_VOID **pviraddr, AX_U32 size, AX_U32 align, const AX_S8 *token);
AX_S32 AX_SYS_MemFree(AX_U64 phyaddr, AX_VOID *pviraddr);
AX_S32 AX_SYS_MflushCache(AX_U64 phyaddr, AX_VOID *pviraddr, AX_U32 size);
AX_S32 AX_SYS_MinvalidateCache(AX_U64 phyaddr, AX_VOID *pviraddr, AX_U32 size);
"""

# ax_base_type.h, ax_engine_type.h (64-bit layouts), ax_engine_api.h
ENGINE_CDEF = """
typedef unsigned long long int  AX_U64;
typedef unsigned int            AX_U32;
typedef unsigned char           AX_U8;
typedef int                     AX_S32;
typedef signed char             AX_S8;
typedef char                    AX_CHAR;
typedef void                    AX_VOID;
typedef enum { AX_FALSE = 0, AX_TRUE = 1 } AX_BOOL;

typedef AX_U32 AX_ENGINE_NPU_SET_T;

typedef enum _AX_ENGINE_TENSOR_LAYOUT_E {
    AX_ENGINE_TENSOR_LAYOUT_UNKNOWN = 0,
    AX_ENGINE_TENSOR_LAYOUT_NHWC = 1,
    AX_ENGINE_TENSOR_LAYOUT_NCHW = 2,
} AX_ENGINE_TENSOR_LAYOUT_T;

typedef enum {
    AX_ENGINE_MT_PHYSICAL = 0,
    AX_ENGINE_MT_VIRTUAL = 1,
    AX_ENGINE_MT_OCM = 2,
} AX_ENGINE_MEMORY_TYPE_T;

typedef enum {
    AX_ENGINE_DT_UNKNOWN = 0,
    AX_ENGINE_DT_UINT8 = 1,
    AX_ENGINE_DT_UINT16 = 2,
    AX_ENGINE_DT_FLOAT32 = 3,
    AX_ENGINE_DT_SINT16 = 4,
    AX_ENGINE_DT_SINT8 = 5,
    AX_ENGINE_DT_SINT32 = 6,
    AX_ENGINE_DT_UINT32 = 7,
    AX_ENGINE_DT_FLOAT64 = 8,
    AX_ENGINE_DT_BFLOAT16 = 9,
    AX_ENGINE_DT_UINT10_PACKED = 100,
    AX_ENGINE_DT_UINT12_PACKED = 101,
    AX_ENGINE_DT_UINT14_PACKED = 102,
    AX_ENGINE_DT_UINT16_PACKED = 103,
} AX_ENGINE_DATA_TYPE_T;

typedef enum {
    AX_ENGINE_CS_FEATUREMAP = 0,
    AX_ENGINE_CS_RAW8 = 12,
    AX_ENGINE_CS_RAW10 = 1,
    AX_ENGINE_CS_RAW12 = 2,
    AX_ENGINE_CS_RAW14 = 11,
    AX_ENGINE_CS_RAW16 = 3,
    AX_ENGINE_CS_NV12 = 4,
    AX_ENGINE_CS_NV21 = 5,
    AX_ENGINE_CS_RGB = 6,
    AX_ENGINE_CS_BGR = 7,
    AX_ENGINE_CS_RGBA = 8,
    AX_ENGINE_CS_GRAY = 9,
    AX_ENGINE_CS_YUV444 = 10,
} AX_ENGINE_COLOR_SPACE_T;

typedef enum { AX_ENGINE_VIRTUAL_NPU_DISABLE = 0 } AX_ENGINE_NPU_MODE_T;
typedef enum { AX_ENGINE_MODEL_TYPE0 = 0 } AX_ENGINE_MODEL_TYPE_T;

typedef struct {
    AX_ENGINE_NPU_MODE_T eHardMode;
    AX_U32 reserve[8];
} AX_ENGINE_NPU_ATTR_T;

typedef struct _AX_ENGINE_IO_META_EX_T {
    AX_ENGINE_COLOR_SPACE_T eColorSpace;
    AX_U64 u64Reserved[18];
} AX_ENGINE_IO_META_EX_T;

typedef struct {
    AX_ENGINE_NPU_SET_T nNpuSet;
    AX_S8* pName;
    AX_U32 reserve[8];
} AX_ENGINE_HANDLE_EXTRA_T;

typedef struct _AX_ENGINE_CMM_INFO_T {
    AX_U32 nCMMSize;
} AX_ENGINE_CMM_INFO_T;

typedef struct _AX_ENGINE_IO_SETTING_T {
    AX_U32 nWbtIndex;
    AX_U64 u64Reserved[7];
} AX_ENGINE_IO_SETTING_T;

typedef struct _AX_ENGINE_IO_META_T {
    AX_CHAR* pName;
    AX_S32* pShape;
    AX_U8 nShapeSize;
    AX_ENGINE_TENSOR_LAYOUT_T eLayout;
    AX_ENGINE_MEMORY_TYPE_T eMemoryType;
    AX_ENGINE_DATA_TYPE_T eDataType;
    AX_ENGINE_IO_META_EX_T* pExtraMeta;
    AX_U32 nSize;
    AX_U32 nQuantizationValue;
    AX_S32* pStride;
    AX_U64 u64Reserved[9];
} AX_ENGINE_IO_META_T;

typedef struct _AX_ENGINE_IO_INFO_T {
    AX_ENGINE_IO_META_T* pInputs;
    AX_U32 nInputSize;
    AX_ENGINE_IO_META_T* pOutputs;
    AX_U32 nOutputSize;
    AX_U32 nMaxBatchSize;
    AX_BOOL bDynamicBatchSize;
    AX_U64 u64Reserved[11];
} AX_ENGINE_IO_INFO_T;

typedef struct _AX_ENGINE_IO_BUFFER_T {
    AX_U64 phyAddr;
    AX_VOID* pVirAddr;
    AX_U32 nSize;
    AX_S32* pStride;
    AX_U8 nStrideSize;
    AX_U64 u64Reserved[11];
} AX_ENGINE_IO_BUFFER_T;

typedef struct _AX_ENGINE_IO_T {
    AX_ENGINE_IO_BUFFER_T* pInputs;
    AX_U32 nInputSize;
    AX_ENGINE_IO_BUFFER_T* pOutputs;
    AX_U32 nOutputSize;
    AX_U32 nBatchSize;
    AX_ENGINE_IO_SETTING_T* pIoSetting;
    AX_U64 u64Reserved[10];
} AX_ENGINE_IO_T;

const AX_CHAR* AX_ENGINE_GetVersion(AX_VOID);
AX_VOID AX_ENGINE_NPUReset(AX_VOID);
AX_S32 AX_ENGINE_Init(AX_ENGINE_NPU_ATTR_T* pNpuAttr);
AX_S32 AX_ENGINE_GetVNPUAttr(AX_ENGINE_NPU_ATTR_T* pNpuAttr);
AX_S32 AX_ENGINE_Deinit(AX_VOID);
AX_S32 AX_ENGINE_GetModelType(const AX_VOID* pData, AX_U32 nDataSize, AX_ENGINE_MODEL_TYPE_T* pModelType);
AX_S32 AX_ENGINE_CreateHandleV2(uint64_t** pHandle, const AX_VOID* pData, AX_U32 nDataSize,
                                AX_ENGINE_HANDLE_EXTRA_T* pExtraParam);
AX_S32 AX_ENGINE_DestroyHandle(uint64_t* nHandle);
AX_S32 AX_ENGINE_GetIOInfo(uint64_t* nHandle, AX_ENGINE_IO_INFO_T** pIO);
AX_S32 AX_ENGINE_GetGroupIOInfoCount(uint64_t* nHandle, AX_U32* pCount);
AX_S32 AX_ENGINE_GetGroupIOInfo(uint64_t* nHandle, AX_U32 nIndex, AX_ENGINE_IO_INFO_T** pIO);
AX_S32 AX_ENGINE_GetHandleModelType(uint64_t* nHandle, AX_ENGINE_MODEL_TYPE_T* pModelType);
AX_S32 AX_ENGINE_CreateContextV2(uint64_t* nHandle, uint64_t** pContext);
AX_S32 AX_ENGINE_RunSyncV2(uint64_t* handle, uint64_t* context, AX_ENGINE_IO_T* pIO);
AX_S32 AX_ENGINE_RunGroupIOSync(uint64_t* handle, uint64_t* context, AX_U32 nIndex, AX_ENGINE_IO_T* pIO);
AX_S32 AX_ENGINE_SetAffinity(uint64_t* nHandle, AX_ENGINE_NPU_SET_T nNpuSet);
AX_S32 AX_ENGINE_GetAffinity(uint64_t* nHandle, AX_ENGINE_NPU_SET_T* pNpuSet);
AX_S32 AX_ENGINE_GetCMMUsage(uint64_t* nHandle, AX_ENGINE_CMM_INFO_T* pCMMInfo);
const AX_CHAR* AX_ENGINE_GetModelToolsVersion(uint64_t* nHandle);
AX_S32 AX_ENGINE_GetTotalOps();
"""

sys_cffi = CountingFFI()
sys_cffi.cdef(SYS_CDEF)
engine_cffi = CountingFFI()
engine_cffi.cdef(ENGINE_CDEF)
# the emulated library keeps its own reference: a C library does not look up Python module names
_ffi, _sys_ffi = engine_cffi, sys_cffi


def _code(value: int) -> int:
    """An AX_S32 status from its unsigned 0x8xxxxxxx spelling (the codes themselves are the double's)."""
    return value - (1 << 32)


ERR_SYS_NOT_INIT = _code(0x800B0010)
ERR_SYS_ILLEGAL_PARAM = _code(0x800B000A)
ERR_SYS_NOMEM = _code(0x800B0018)
ERR_ENGINE_NOT_INIT = _code(0x80060010)
ERR_ENGINE_ILLEGAL_PARAM = _code(0x8006000A)
ERR_ENGINE_NULL_PTR = _code(0x8006000B)
ERR_ENGINE_UNKNOWN_MODEL = _code(0x80060023)
ERR_ENGINE_NOT_MATCH = _code(0x80060026)

_DTYPES = {
    "uint8": "AX_ENGINE_DT_UINT8",
    "int8": "AX_ENGINE_DT_SINT8",
    "uint16": "AX_ENGINE_DT_UINT16",
    "int16": "AX_ENGINE_DT_SINT16",
    "uint32": "AX_ENGINE_DT_UINT32",
    "int32": "AX_ENGINE_DT_SINT32",
    "float32": "AX_ENGINE_DT_FLOAT32",
    "float64": "AX_ENGINE_DT_FLOAT64",
    "bfloat16": "AX_ENGINE_DT_BFLOAT16",
}
_VERSION = _ffi.new("char[]", b"2.6.3a (emulated)")
_TOOLS_VERSION = _ffi.new("char[]", b"4.0 (axengine double)")


def _addr(pointer: Any) -> int:
    return int(_ffi.cast("uintptr_t", pointer))


def _refuse(status: int, reason: str) -> int:
    memory.errors.append(reason)
    return status


@dataclass(eq=False)
class _Handle:
    """A created handle: the model, its per-group IO info (C structs), its contexts."""

    cell: Any  # uint64_t[1]: the address the caller holds as its handle
    model: CompiledModel
    infos: list[Any]  # AX_ENGINE_IO_INFO_T* per shape group
    keep: list[Any]
    contexts: dict[int, Any] = field(default_factory=dict)
    affinity: int = 0


class _State:
    def __init__(self) -> None:
        self.sys_ready = False
        self.engine_ready = False
        self.npu_mode = 0
        self.handles: dict[int, _Handle] = {}


_state = _State()


def _io_info(group: Group, keep: list[Any]) -> Any:
    info = _ffi.new("AX_ENGINE_IO_INFO_T *")
    for kind, tensors in (("Input", group.inputs), ("Output", group.outputs)):
        metas = _ffi.new(f"AX_ENGINE_IO_META_T[{len(tensors)}]")
        keep.append(metas)
        for k, tensor in enumerate(tensors):
            meta = metas[k]
            name = _ffi.new("char[]", tensor.name.encode())
            shape = _ffi.new("AX_S32[]", list(tensor.shape))
            strides = _ffi.new("AX_S32[]", _strides(tensor))
            extra = _ffi.new("AX_ENGINE_IO_META_EX_T *")
            keep += [name, shape, strides, extra]
            meta.pName, meta.pShape, meta.nShapeSize = name, shape, len(tensor.shape)
            meta.eLayout = engine_lib.AX_ENGINE_TENSOR_LAYOUT_UNKNOWN
            meta.eMemoryType = engine_lib.AX_ENGINE_MT_PHYSICAL
            meta.eDataType = getattr(engine_lib, _DTYPES[tensor.dtype.name])
            extra.eColorSpace = engine_lib.AX_ENGINE_CS_FEATUREMAP
            meta.pExtraMeta, meta.nSize, meta.pStride = extra, tensor.nbytes, strides
        setattr(info, f"p{kind}s", metas)
        setattr(info, f"n{kind}Size", len(tensors))
    info.nMaxBatchSize = 1
    info.bDynamicBatchSize = engine_lib.AX_FALSE
    return info


def _strides(tensor: Tensor) -> list[int]:
    strides, step = [], tensor.dtype.itemsize
    for dim in reversed(tensor.shape):
        strides.append(step)
        step *= dim
    return strides[::-1]


def _handle(pointer: Any) -> _Handle | None:
    return None if pointer == _ffi.NULL else _state.handles.get(_addr(pointer))


# libax_sys ----------------------------------------------------------------------------------------------------


def AX_SYS_Init() -> int:
    _state.sys_ready = True
    return 0


def AX_SYS_Deinit() -> int:
    _state.sys_ready = False
    return 0


def AX_SYS_MemAllocCached(phy: Any, vir: Any, size: int, align: int, token: Any) -> int:
    if not _state.sys_ready:
        return _refuse(ERR_SYS_NOT_INIT, "AX_SYS_MemAllocCached before AX_SYS_Init")
    if phy == _sys_ffi.NULL or vir == _sys_ffi.NULL or size == 0:
        return _refuse(ERR_SYS_ILLEGAL_PARAM, f"AX_SYS_MemAllocCached of {size} bytes into NULL")
    try:
        block = cmm.alloc(size, align)
    except ValueError as exc:
        return _refuse(ERR_SYS_ILLEGAL_PARAM, f"AX_SYS_MemAllocCached: {exc}")
    phy[0] = block.phy
    vir[0] = _sys_ffi.cast("void *", block.vir)
    return 0


def AX_SYS_MemFree(phy: int, vir: Any) -> int:
    if not cmm.free(phy, _addr(vir)):
        return _refuse(ERR_SYS_ILLEGAL_PARAM, f"AX_SYS_MemFree(0x{phy:x}, 0x{_addr(vir):x}): not a live CMM block")
    return 0


def AX_SYS_MflushCache(phy: int, vir: Any, size: int) -> int:
    cmm.flush(phy, _addr(vir), size)
    return 0


def AX_SYS_MinvalidateCache(phy: int, vir: Any, size: int) -> int:
    cmm.invalidate(phy, _addr(vir), size)
    return 0


# libax_engine -------------------------------------------------------------------------------------------------


def AX_ENGINE_GetVersion() -> Any:
    return _VERSION


def AX_ENGINE_Init(attr: Any) -> int:
    if not _state.sys_ready:
        return _refuse(ERR_ENGINE_NOT_INIT, "AX_ENGINE_Init before AX_SYS_Init")
    _state.npu_mode = attr.eHardMode if attr != _ffi.NULL else 0
    _state.engine_ready = True
    return 0


def AX_ENGINE_GetVNPUAttr(attr: Any) -> int:
    if not _state.engine_ready:
        return ERR_ENGINE_NOT_INIT  # how pyaxengine learns that the NPU is not initialised yet: no error
    attr.eHardMode = _state.npu_mode
    return 0


def AX_ENGINE_Deinit() -> int:
    _state.engine_ready = False
    return 0


def AX_ENGINE_GetModelType(data: Any, size: int, model_type: Any) -> int:
    if data == _ffi.NULL or model_type == _ffi.NULL:
        return _refuse(ERR_ENGINE_NULL_PTR, "AX_ENGINE_GetModelType with NULL")
    model_type[0] = engine_lib.AX_ENGINE_MODEL_TYPE0  # single core
    return 0


def AX_ENGINE_CreateHandleV2(handle: Any, data: Any, size: int, extra: Any) -> int:
    if not _state.engine_ready:
        return _refuse(ERR_ENGINE_NOT_INIT, "AX_ENGINE_CreateHandleV2 before AX_ENGINE_Init")
    if handle == _ffi.NULL or data == _ffi.NULL:
        return _refuse(ERR_ENGINE_NULL_PTR, "AX_ENGINE_CreateHandleV2 with NULL")
    label = "model"
    if extra != _ffi.NULL and extra.pName != _ffi.NULL:
        label = _ffi.string(_ffi.cast("char *", extra.pName)).decode()
    model = CompiledModel.parse(_ffi.buffer(_ffi.cast("char *", data), size)[:], label)
    if model is None:
        return _refuse(ERR_ENGINE_UNKNOWN_MODEL, f"AX_ENGINE_CreateHandleV2: {label} is not a compiled model")
    for group in model.groups:
        unknown = {t.dtype.name for t in group.inputs + group.outputs} - set(_DTYPES)
        if unknown:
            return _refuse(ERR_ENGINE_UNKNOWN_MODEL, f"AX_ENGINE_CreateHandleV2: {label} has dtypes {unknown}")
    keep: list[Any] = []
    cell = _ffi.new("uint64_t *")
    _state.handles[_addr(cell)] = _Handle(cell, model, [_io_info(g, keep) for g in model.groups], keep)
    handle[0] = cell
    return 0


def AX_ENGINE_DestroyHandle(handle: Any) -> int:
    if handle == _ffi.NULL:
        return ERR_ENGINE_NULL_PTR  # what pyaxengine's _unload does to a handle it never made: no error
    if _state.handles.pop(_addr(handle), None) is None:
        return _refuse(ERR_ENGINE_ILLEGAL_PARAM, f"AX_ENGINE_DestroyHandle(0x{_addr(handle):x}): no such handle")
    return 0


def AX_ENGINE_GetIOInfo(handle: Any, io_info: Any) -> int:
    return AX_ENGINE_GetGroupIOInfo(handle, 0, io_info)


def AX_ENGINE_GetGroupIOInfoCount(handle: Any, count: Any) -> int:
    h = _handle(handle)
    if h is None:
        return _refuse(ERR_ENGINE_ILLEGAL_PARAM, "AX_ENGINE_GetGroupIOInfoCount: no such handle")
    count[0] = len(h.infos)
    return 0


def AX_ENGINE_GetGroupIOInfo(handle: Any, index: int, io_info: Any) -> int:
    h = _handle(handle)
    if h is None or index >= len(h.infos) or io_info == _ffi.NULL:
        return _refuse(ERR_ENGINE_ILLEGAL_PARAM, f"AX_ENGINE_GetGroupIOInfo: no group {index} of that handle")
    io_info[0] = h.infos[index]
    return 0


def AX_ENGINE_GetHandleModelType(handle: Any, model_type: Any) -> int:
    if _handle(handle) is None:
        return _refuse(ERR_ENGINE_ILLEGAL_PARAM, "AX_ENGINE_GetHandleModelType: no such handle")
    model_type[0] = engine_lib.AX_ENGINE_MODEL_TYPE0
    return 0


def AX_ENGINE_CreateContextV2(handle: Any, context: Any) -> int:
    h = _handle(handle)
    if h is None or context == _ffi.NULL:
        return _refuse(ERR_ENGINE_ILLEGAL_PARAM, "AX_ENGINE_CreateContextV2: no such handle")
    cell = _ffi.new("uint64_t *")
    h.contexts[_addr(cell)] = cell
    context[0] = cell
    return 0


def AX_ENGINE_SetAffinity(handle: Any, npu_set: int) -> int:
    h = _handle(handle)
    if h is None or not 0 < npu_set < 8:
        return _refuse(ERR_ENGINE_ILLEGAL_PARAM, f"AX_ENGINE_SetAffinity({npu_set})")
    h.affinity = npu_set
    return 0


def AX_ENGINE_GetAffinity(handle: Any, npu_set: Any) -> int:
    h = _handle(handle)
    if h is None:
        return _refuse(ERR_ENGINE_ILLEGAL_PARAM, "AX_ENGINE_GetAffinity: no such handle")
    npu_set[0] = h.affinity
    return 0


def AX_ENGINE_GetModelToolsVersion(handle: Any) -> Any:
    return _TOOLS_VERSION if _handle(handle) is not None else _ffi.NULL


def AX_ENGINE_RunSyncV2(handle: Any, context: Any, io: Any) -> int:
    return _run("AX_ENGINE_RunSyncV2", handle, context, 0, io)


def AX_ENGINE_RunGroupIOSync(handle: Any, context: Any, index: int, io: Any) -> int:
    return _run("AX_ENGINE_RunGroupIOSync", handle, context, index, io)


def _run(call: str, handle: Any, context: Any, index: int, io_ptr: Any) -> int:
    """One run: read each input from DRAM where the IO struct points, run the graph, write outputs to DRAM."""
    h = _handle(handle)
    if h is None:
        return _refuse(ERR_ENGINE_ILLEGAL_PARAM, f"{call}: no such handle")
    model = h.model
    if context == _ffi.NULL or _addr(context) not in h.contexts:
        return _refuse(ERR_ENGINE_ILLEGAL_PARAM, f"{call}: {model.label}: not a context of this handle")
    if index >= len(model.groups):
        return _refuse(ERR_ENGINE_ILLEGAL_PARAM, f"{call}: {model.label} has no shape group {index}")
    if io_ptr == _ffi.NULL:
        return _refuse(ERR_ENGINE_NULL_PTR, f"{call}: {model.label}: NULL AX_ENGINE_IO_T")
    io, group = io_ptr[0], model.groups[index]
    if io.nInputSize != len(group.inputs) or io.nOutputSize != len(group.outputs):
        return _refuse(
            ERR_ENGINE_NOT_MATCH,
            f"{call}: {model.label} group {index} has {len(group.inputs)} inputs and {len(group.outputs)} "
            f"outputs, the IO {io.nInputSize} and {io.nOutputSize}",
        )
    places = []
    for kind, buffers, tensors in (("input", io.pInputs, group.inputs), ("output", io.pOutputs, group.outputs)):
        if buffers == _ffi.NULL:
            return _refuse(ERR_ENGINE_NULL_PTR, f"{call}: {model.label}: NULL {kind} buffers")
        for i, tensor in enumerate(tensors):
            buffer = buffers[i]
            if buffer.nSize < tensor.nbytes:
                return _refuse(
                    ERR_ENGINE_ILLEGAL_PARAM,
                    f"{call}: {model.label} group {index}: {kind} {tensor.name} needs {tensor.nbytes} bytes, "
                    f"its buffer says {buffer.nSize}",
                )
            found = cmm.device_range(buffer.phyAddr, tensor.nbytes)
            if found is None:
                return _refuse(
                    ERR_ENGINE_ILLEGAL_PARAM,
                    f"{call}: {model.label} group {index}: {kind} {tensor.name}: {tensor.nbytes} bytes at phy "
                    f"0x{buffer.phyAddr:x} are not inside one CMM block{cmm.gone(buffer.phyAddr)}",
                )
            places.append((tensor, found))
    reads, writes = places[: len(group.inputs)], places[len(group.inputs) :]
    for tensor, (block, offset) in reads:
        if tensor.name not in group.ignored:
            cmm.check_clean(block, offset, tensor.nbytes, model.label, tensor.name)
    calls.append((model.label, index))
    memory.runs += 1
    results = model.execute(index, [block.device[o : o + t.nbytes] for t, (block, o) in reads])
    for (tensor, (block, offset)), raw in zip(writes, results, strict=True):
        block.device[offset : offset + tensor.nbytes] = raw
    return 0


def name_handle(handle: Any, label: str) -> None:
    """The double's own hook: name a handle's model by its file (pyaxengine gives the runtime the stem only)."""
    h = _handle(handle)
    if h is not None:
        h.model.label = label


def device_bytes(phy: int, size: int) -> np.ndarray:
    """The double's own view of DRAM (what the NPU would read), for tests."""
    found = cmm.device_range(phy, size)
    if found is None:
        raise ValueError(f"{size} bytes at phy 0x{phy:x} are not inside one CMM block")
    block, offset = found
    return block.device[offset : offset + size].copy()


_SYS = ["AX_SYS_Init", "AX_SYS_Deinit", "AX_SYS_MemAllocCached", "AX_SYS_MemFree"]
_SYS += ["AX_SYS_MflushCache", "AX_SYS_MinvalidateCache"]
_ENGINE = ["AX_ENGINE_GetVersion", "AX_ENGINE_Init", "AX_ENGINE_GetVNPUAttr", "AX_ENGINE_Deinit"]
_ENGINE += ["AX_ENGINE_GetModelType", "AX_ENGINE_CreateHandleV2", "AX_ENGINE_DestroyHandle", "AX_ENGINE_GetIOInfo"]
_ENGINE += ["AX_ENGINE_GetGroupIOInfoCount", "AX_ENGINE_GetGroupIOInfo", "AX_ENGINE_GetHandleModelType"]
_ENGINE += ["AX_ENGINE_CreateContextV2", "AX_ENGINE_RunSyncV2", "AX_ENGINE_RunGroupIOSync"]
_ENGINE += ["AX_ENGINE_SetAffinity", "AX_ENGINE_GetAffinity", "AX_ENGINE_GetModelToolsVersion"]
# not emulated, so missing as from a library that lacks them: AX_ENGINE_NPUReset, AX_ENGINE_GetCMMUsage and
# AX_ENGINE_GetTotalOps (present on MC20E chips only: pyaxengine tells the chip by it)

sys_lib = EmulatedLib("libax_sys.so (emulated)", sys_cffi, SYS_CDEF, {n: globals()[n] for n in _SYS})
engine_lib = EmulatedLib("libax_engine.so (emulated)", engine_cffi, ENGINE_CDEF, {n: globals()[n] for n in _ENGINE})
