"""AXEngineSession: the AxEngineExecutionProvider session, built as pyaxengine 0.1.3's `axengine._axe` is.

Importing it initialises the runtime (AX_SYS_Init, AX_ENGINE_Init) as pyaxengine does; every C call goes to the
emulated libraries of `_axe_capi`. The session keeps pyaxengine's private attributes under their names
(`_handle` uint64_t**, `_context`, `_io` AX_ENGINE_IO_T*, `_io_buffers`, `_info` (one AX_ENGINE_IO_INFO_T** per
group), `_shape_count`, `_inputs`, `_outputs`, `_io_inputs_pool`/`_io_outputs_pool` ((AX_U64*, AX_VOID**) per
buffer), `_align`, `_cmm_token`, `_model_buffer`...), allocates one cached CMM buffer per input and output index
sized to the largest group, and runs as pyaxengine does: each fed array memmoved into its buffer and the WHOLE
buffer flushed, RunGroupIOSync (RunSyncV2 for a one-group model), each output buffer invalidated and copied out.
The double's checks (`Session._check_run`) come first. Unlike pyaxengine, which never frees its CMM buffers,
the emulation forgets a session's buffers once the session object is gone (the memory is the test process's).

Quirks kept from pyaxengine: it prints [INFO] lines on stdout; a session made from bytes fails (pyaxengine names the
model from its path only); an F-ordered array is copied in its memory order.
"""

from __future__ import annotations

import atexit
import mmap
import os
import weakref
from typing import Any

import ml_dtypes
import numpy as np

from . import _axe_capi
from ._axe_capi import engine_cffi, engine_lib, sys_lib
from ._axe_types import ChipType, ModelType, VNPUType
from ._base_session import Session, SessionOptions
from ._memory import cmm
from ._node import NodeArg

__all__ = ["AXEngineSession"]

_is_sys_initialized = False
_is_engine_initialized = False

_NUMPY = {
    "AX_ENGINE_DT_UINT8": np.dtype(np.uint8),
    "AX_ENGINE_DT_SINT8": np.dtype(np.int8),
    "AX_ENGINE_DT_UINT16": np.dtype(np.uint16),
    "AX_ENGINE_DT_SINT16": np.dtype(np.int16),
    "AX_ENGINE_DT_UINT32": np.dtype(np.uint32),
    "AX_ENGINE_DT_SINT32": np.dtype(np.int32),
    "AX_ENGINE_DT_FLOAT32": np.dtype(np.float32),
    "AX_ENGINE_DT_BFLOAT16": np.dtype(ml_dtypes.bfloat16),
}


def _transform_dtype(dtype: int) -> np.dtype:
    for name, np_dtype in _NUMPY.items():
        if dtype == getattr(engine_lib, name):
            return np_dtype
    raise ValueError(f"Unsupported data type '{dtype}'.")


def _check_cffi_func_exists(lib: Any, func_name: str) -> bool:
    try:
        getattr(lib, func_name)
        return True
    except AttributeError:
        return False


def _get_chip_type() -> ChipType:
    if not _check_cffi_func_exists(engine_lib, "AX_ENGINE_SetAffinity"):
        return ChipType.M57H
    if not _check_cffi_func_exists(engine_lib, "AX_ENGINE_GetTotalOps"):
        return ChipType.MC50
    return ChipType.MC20E


def _get_version() -> str:
    return engine_cffi.string(engine_lib.AX_ENGINE_GetVersion()).decode("utf-8")


def _get_vnpu_type() -> VNPUType:
    attr = engine_cffi.new("AX_ENGINE_NPU_ATTR_T *")
    if engine_lib.AX_ENGINE_GetVNPUAttr(attr) != 0:
        raise RuntimeError("Failed to get VNPU attribute.")
    return VNPUType(attr.eHardMode)


def _initialize_engine() -> None:
    global _is_sys_initialized, _is_engine_initialized
    if sys_lib.AX_SYS_Init() != 0:
        raise RuntimeError("Failed to initialize ax sys.")
    _is_sys_initialized = True
    attr = engine_cffi.new("AX_ENGINE_NPU_ATTR_T *")
    if engine_lib.AX_ENGINE_GetVNPUAttr(attr) != 0:  # the NPU is not initialised: as disabled vNPU
        attr.eHardMode = VNPUType.DISABLED.value
    if engine_lib.AX_ENGINE_Init(attr) != 0:
        raise RuntimeError("Failed to initialize ax sys engine.")
    _is_engine_initialized = True
    print(f"[INFO] Chip type: {ChipType.MC50}")


def _finalize_engine() -> None:
    if _is_engine_initialized:
        engine_lib.AX_ENGINE_Deinit()
    if _is_sys_initialized:
        sys_lib.AX_SYS_Deinit()


_initialize_engine()
atexit.register(_finalize_engine)


class AXEngineSession(Session):
    def __init__(
        self,
        path_or_bytes: str | bytes | os.PathLike,
        sess_options: SessionOptions | None = None,
        provider_options: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self._chip_type = _get_chip_type()
        self._vnpu_type = _get_vnpu_type()
        self._handle = engine_cffi.new("uint64_t **")
        self._context = engine_cffi.new("uint64_t **")
        self._io = engine_cffi.new("AX_ENGINE_IO_T *")

        if isinstance(path_or_bytes, str | os.PathLike):
            self._file_name = os.path.basename(path_or_bytes)
            self._model_name = os.path.splitext(self._file_name)[0]
            with open(path_or_bytes, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._model_buffer = engine_cffi.from_buffer("char[]", mapped)
            self._model_buffer_size = len(mapped)
            self._mmapped_file = mapped
        elif isinstance(path_or_bytes, bytes):
            self._model_buffer = engine_cffi.new("char[]", path_or_bytes)
            self._model_buffer_size = len(path_or_bytes)
        else:
            raise TypeError(f"Unable to load model from type '{type(path_or_bytes)}'")

        self._model_type = self._get_model_type()
        if self._chip_type is ChipType.MC50:
            if self._vnpu_type is VNPUType.ENABLED and self._model_type is not ModelType.SINGLE:
                raise ValueError(f"Model type '{self._model_type}' is not allowed when vnpu is {self._vnpu_type}.")
            if self._vnpu_type in (VNPUType.BIG_LITTLE, VNPUType.LITTLE_BIG) and self._model_type is ModelType.TRIPLE:
                raise ValueError(f"Model type '{self._model_type}' is not allowed when vnpu is {self._vnpu_type}.")

        if self._load() != 0:
            raise RuntimeError("Failed to load model.")
        _axe_capi.name_handle(self._handle[0], self._file_name)
        self._compiler_version = self._get_model_tool_version()

        try:
            self._shape_count = self._get_shape_count()
        except AttributeError:  # a runtime without shape groups
            self._shape_count = 1
        self._info = self._get_info()
        self._inputs = self._get_inputs()
        self._outputs = self._get_outputs()

        self._align = 128
        self._cmm_token = engine_cffi.new("AX_S8[]", b"PyEngine")
        io = self._io[0]
        io.nInputSize = len(self.get_inputs())
        io.nOutputSize = len(self.get_outputs())
        inputs = engine_cffi.new(f"AX_ENGINE_IO_BUFFER_T[{io.nInputSize}]")
        outputs = engine_cffi.new(f"AX_ENGINE_IO_BUFFER_T[{io.nOutputSize}]")
        self._io_buffers = (inputs, outputs)
        io.pInputs, io.pOutputs = inputs, outputs
        self._io_inputs_pool = self._allocate("Input", io.pInputs, io.nInputSize)
        self._io_outputs_pool = self._allocate("Output", io.pOutputs, io.nOutputSize)
        phys = [int(phy[0]) for phy, _ in self._io_inputs_pool + self._io_outputs_pool]
        weakref.finalize(self, cmm.release, phys)

    def _allocate(self, kind: str, buffers: Any, count: int) -> list[tuple[Any, Any]]:
        """One cached CMM block per index, as large as the index's largest group needs."""
        pool = []
        for i in range(count):
            size = max(getattr(self._info[g][0], f"p{kind}s")[i].nSize for g in range(self._shape_count))
            buffers[i].nSize = size
            phy, vir = engine_cffi.new("AX_U64 *"), engine_cffi.new("AX_VOID **")
            pool.append((phy, vir))
            if sys_lib.AX_SYS_MemAllocCached(phy, vir, size, self._align, self._cmm_token) != 0:
                raise RuntimeError(f"Failed to allocate memory for {kind.lower()}.")
            buffers[i].phyAddr = phy[0]
            buffers[i].pVirAddr = vir[0]
        return pool

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            self._unload()

    def _get_model_type(self) -> ModelType:
        model_type = engine_cffi.new("AX_ENGINE_MODEL_TYPE_T *")
        if engine_lib.AX_ENGINE_GetModelType(self._model_buffer, self._model_buffer_size, model_type) != 0:
            raise RuntimeError("Failed to get model type.")
        return ModelType(model_type[0])

    def _get_model_tool_version(self) -> str:
        return engine_cffi.string(engine_lib.AX_ENGINE_GetModelToolsVersion(self._handle[0])).decode("utf-8")

    def _load(self) -> int:
        extra = engine_cffi.new("AX_ENGINE_HANDLE_EXTRA_T *")
        extra_name = engine_cffi.new("char[]", self._model_name.encode("utf-8"))
        extra.pName = extra_name
        ret = engine_lib.AX_ENGINE_CreateHandleV2(self._handle, self._model_buffer, self._model_buffer_size, extra)
        if ret == 0:
            ret = engine_lib.AX_ENGINE_CreateContextV2(self._handle[0], self._context)
        return ret

    def _get_info(self) -> list[Any]:
        total = []
        for group in range(self._shape_count):
            info = engine_cffi.new("AX_ENGINE_IO_INFO_T **")
            if self._shape_count == 1:
                ret = engine_lib.AX_ENGINE_GetIOInfo(self._handle[0], info)
            else:
                ret = engine_lib.AX_ENGINE_GetGroupIOInfo(self._handle[0], group, info)
            if ret != 0:
                raise RuntimeError(f"Failed to get model the {group}th shape.")
            total.append(info)
        return total

    def _get_shape_count(self) -> int:
        count = engine_cffi.new("AX_U32 *")
        if engine_lib.AX_ENGINE_GetGroupIOInfoCount(self._handle[0], count) != 0:
            raise RuntimeError("Failed to get model shape group.")
        return int(count[0])

    def _unload(self) -> None:
        engine_lib.AX_ENGINE_DestroyHandle(self._handle[0])
        self._handle[0] = engine_cffi.NULL

    def _get_io(self, kind: str) -> list[list[NodeArg]]:
        groups = []
        for group in range(self._shape_count):
            info = self._info[group][0]
            metas = getattr(info, f"p{kind}s")
            args = []
            for index in range(getattr(info, f"n{kind}Size")):
                meta = metas[index]
                name = engine_cffi.string(meta.pName).decode("utf-8")
                shape = [meta.pShape[i] for i in range(meta.nShapeSize)]
                args.append(NodeArg(name, _transform_dtype(meta.eDataType), shape))
            groups.append(args)
        return groups

    def _get_inputs(self) -> list[list[NodeArg]]:
        return self._get_io("Input")

    def _get_outputs(self) -> list[list[NodeArg]]:
        return self._get_io("Output")

    def run(
        self,
        output_names: list[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: object = None,
        shape_group: int = 0,
    ) -> list[np.ndarray]:
        places = self._check_run(output_names, input_feed, shape_group)
        io = self._io[0]
        for key, npy in input_feed.items():
            for i, one in enumerate(self.get_inputs(shape_group)):
                if one.name == key:
                    if not (npy.flags.c_contiguous or npy.flags.f_contiguous):
                        npy = np.ascontiguousarray(npy)
                    buffer = io.pInputs[i]
                    engine_cffi.memmove(buffer.pVirAddr, engine_cffi.cast("void *", npy.ctypes.data), npy.nbytes)
                    sys_lib.AX_SYS_MflushCache(buffer.phyAddr, buffer.pVirAddr, buffer.nSize)
                    break

        if self._shape_count > 1:
            ret = engine_lib.AX_ENGINE_RunGroupIOSync(self._handle[0], self._context[0], shape_group, self._io)
        else:
            ret = engine_lib.AX_ENGINE_RunSyncV2(self._handle[0], self._context[0], self._io)
        if ret != 0:
            raise RuntimeError("Failed to run model.")

        outputs: list[Any] = [None] * len(places)
        for i, (arg, place) in enumerate(zip(self.get_outputs(shape_group), places, strict=True)):
            buffer = io.pOutputs[i]
            sys_lib.AX_SYS_MinvalidateCache(buffer.phyAddr, buffer.pVirAddr, buffer.nSize)
            size = arg.dtype.itemsize * int(np.prod(arg.shape))
            data = np.frombuffer(engine_cffi.buffer(buffer.pVirAddr, size), dtype=arg.dtype)
            outputs[place] = data.reshape(arg.shape).copy()
        return outputs
