"""AXCLRTSession: the AXCLRTExecutionProvider session, built as pyaxengine 0.1.3's `axengine._axclrt` is.

Importing it initialises the runtime (axclInit) as pyaxengine does; every C call goes to the emulated libaxcl_rt
of `_axclrt_capi`. The session keeps pyaxengine's private attributes under their names (`_model_id` uint64_t*,
`_context_id`, `_io` axclrtEngineIO*, `_info` axclrtEngineIOInfo*, `_thread_context`, `_shape_count`,
`_device_index`, `_device_id`, `_inputs`, `_outputs`), allocates one device buffer per input and output index
sized to the largest group, and runs as pyaxengine does: the thread's context set, each fed array copied host to
device into its index's buffer, axclrtEngineExecute, each output copied device to host. The device is the
`device_id` of `provider_options[0]`, as pyaxengine reads it. Like pyaxengine, every session stays listed in
`_all_model_instances` until the process exits (when the runtime frees their buffers and unloads them).

Quirks kept from pyaxengine: it prints [INFO] lines on stdout; the path must be a str (it is `.encode()`d); an F-ordered
array is copied in its memory order; `_unload` frees whatever device pointers the IO holds at the time.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import ml_dtypes
import numpy as np

from ._axclrt_capi import axclrt_cffi, axclrt_lib
from ._axclrt_types import VNPUType
from ._base_session import Session, SessionOptions
from ._node import NodeArg

__all__ = ["AXCLRTSession"]

_is_axclrt_initialized = False
_is_axclrt_engine_initialized = False
_all_model_instances: list[AXCLRTSession] = []

_NUMPY = {
    "AXCL_DATA_TYPE_UINT8": np.dtype(np.uint8),
    "AXCL_DATA_TYPE_INT8": np.dtype(np.int8),
    "AXCL_DATA_TYPE_UINT16": np.dtype(np.uint16),
    "AXCL_DATA_TYPE_INT16": np.dtype(np.int16),
    "AXCL_DATA_TYPE_UINT32": np.dtype(np.uint32),
    "AXCL_DATA_TYPE_INT32": np.dtype(np.int32),
    "AXCL_DATA_TYPE_FP32": np.dtype(np.float32),
    "AXCL_DATA_TYPE_BF16": np.dtype(ml_dtypes.bfloat16),
}


def _transform_dtype(dtype: int) -> np.dtype:
    for name, np_dtype in _NUMPY.items():
        if dtype == getattr(axclrt_lib, name):
            return np_dtype
    raise ValueError(f"Unsupported data type '{dtype}'.")


def _initialize_axclrt() -> None:
    global _is_axclrt_initialized
    ret = axclrt_lib.axclInit([])
    if ret != 0:
        raise RuntimeError(f"Failed to initialize axcl runtime. {ret}.")
    _is_axclrt_initialized = True


def _finalize_axclrt() -> None:
    global _is_axclrt_initialized, _is_axclrt_engine_initialized
    for instance in list(_all_model_instances):
        instance._unload()
    if _is_axclrt_engine_initialized:
        axclrt_lib.axclrtEngineFinalize()
        _is_axclrt_engine_initialized = False
    if _is_axclrt_initialized:
        axclrt_lib.axclFinalize()
        _is_axclrt_initialized = False


_initialize_axclrt()
atexit.register(_finalize_axclrt)


def _get_vnpu_type() -> VNPUType:
    kind = axclrt_cffi.new("axclrtEngineVNpuKind *")
    if axclrt_lib.axclrtEngineGetVNpuKind(kind) != 0:
        raise RuntimeError("Failed to get VNPU attribute.")
    return VNPUType(kind[0])


def _get_version() -> str:
    major, minor, patch = (axclrt_cffi.new("int32_t *") for _ in range(3))
    axclrt_lib.axclrtGetVersion(major, minor, patch)
    return f"{major[0]}.{minor[0]}.{patch[0]}"


class AXCLRTSession(Session):
    def __init__(
        self,
        path_or_bytes: str | bytes | os.PathLike,
        sess_options: SessionOptions | None = None,
        provider_options: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self._device_index = 0
        self._io = None
        self._model_id = None
        if provider_options is not None and "device_id" in provider_options[0]:
            self._device_index = provider_options[0].get("device_id", 0)

        devices = axclrt_cffi.new("axclrtDeviceList *")
        ret = axclrt_lib.axclrtGetDeviceList(devices)
        if ret != 0 or devices.num == 0:
            raise RuntimeError(f"Get AXCL device failed {ret}, find total {devices.num} device.")
        if self._device_index >= devices.num:
            raise RuntimeError(f"Device index {self._device_index} is out of range, total {devices.num} device.")
        self._device_id = devices.devices[self._device_index]
        if axclrt_lib.axclrtSetDevice(self._device_id) != 0:
            raise RuntimeError("Set AXCL device failed.")

        global _is_axclrt_engine_initialized
        if axclrt_lib.axclrtEngineInit(axclrt_cffi.cast("axclrtEngineVNpuKind", VNPUType.DISABLED.value)) != 0:
            if axclrt_lib.axclrtEngineGetVNpuKind(axclrt_cffi.new("axclrtEngineVNpuKind *")) != 0:
                raise RuntimeError("axclrtEngineInit failed.")
        else:
            _is_axclrt_engine_initialized = True

        self.soc_name = axclrt_cffi.string(axclrt_lib.axclrtGetSocName()).decode()
        self._thread_context = axclrt_cffi.new("axclrtContext *")
        if axclrt_lib.axclrtGetCurrentContext(self._thread_context) != 0:
            raise RuntimeError("axclrtGetCurrentContext failed")

        self._model_id = axclrt_cffi.new("uint64_t *")
        self._context_id = axclrt_cffi.new("uint64_t *")
        self._vnpu_type = _get_vnpu_type()

        if self._load(path_or_bytes) != 0:
            raise RuntimeError("Failed to load model.")
        self._file_name = os.path.basename(path_or_bytes) if isinstance(path_or_bytes, str) else "model"
        self._compiler_version = self._get_model_tool_version()

        self._info = self._get_info()
        self._shape_count = self._get_shape_count()
        self._inputs = self._get_inputs()
        self._outputs = self._get_outputs()
        self._io = self._prepare_io()
        _all_model_instances.append(self)

    def __del__(self) -> None:
        if getattr(self, "_model_id", None) is not None:
            self._unload()
        if self in _all_model_instances:
            _all_model_instances.remove(self)

    def _load(self, path_or_bytes: Any) -> int:
        if isinstance(path_or_bytes, str | os.PathLike):
            model_path = axclrt_cffi.new("char[]", path_or_bytes.encode("utf-8"))  # a PathLike has no encode
            if axclrt_lib.axclrtEngineLoadFromFile(model_path, self._model_id) != 0:
                raise RuntimeError("axclrtEngineLoadFromFile failed.")
        elif isinstance(path_or_bytes, bytes):
            buffer = axclrt_cffi.new("char[]", path_or_bytes)
            device = axclrt_cffi.new("void **", axclrt_cffi.NULL)
            if axclrt_lib.axclrtMalloc(device, len(path_or_bytes), axclrt_lib.AXCL_MEM_MALLOC_NORMAL_ONLY) != 0:
                raise RuntimeError("axclrtMalloc failed.")
            kind = axclrt_lib.AXCL_MEMCPY_HOST_TO_DEVICE
            if axclrt_lib.axclrtMemcpy(device[0], buffer, len(path_or_bytes), kind) != 0:
                axclrt_lib.axclrtFree(device[0])
                raise RuntimeError("axclrtMemcpy failed.")
            ret = axclrt_lib.axclrtEngineLoadFromMem(device[0], len(path_or_bytes), self._model_id)
            axclrt_lib.axclrtFree(device[0])
            if ret != 0:
                raise RuntimeError("axclrtEngineLoadFromMem failed.")
        else:
            raise TypeError(f"Unable to load model from type '{type(path_or_bytes)}'")
        ret = axclrt_lib.axclrtEngineCreateContext(self._model_id[0], self._context_id)
        if ret != 0:
            raise RuntimeError("axclrtEngineCreateContext failed")
        return ret

    def _unload(self) -> None:
        if self._io is not None:
            size = axclrt_cffi.new("uint64_t *")
            pointer = axclrt_cffi.new("void **")
            for i in range(axclrt_lib.axclrtEngineGetNumInputs(self._info[0])):
                axclrt_lib.axclrtEngineGetInputBufferByIndex(self._io[0], i, pointer, size)
                axclrt_lib.axclrtFree(pointer[0])
            for i in range(axclrt_lib.axclrtEngineGetNumOutputs(self._info[0])):
                axclrt_lib.axclrtEngineGetOutputBufferByIndex(self._io[0], i, pointer, size)
                axclrt_lib.axclrtFree(pointer[0])
            axclrt_lib.axclrtEngineDestroyIO(self._io[0])
            self._io = None
        if self._model_id is not None and self._model_id[0] != 0:
            axclrt_lib.axclrtEngineUnload(self._model_id[0])
            self._model_id[0] = 0

    def _get_model_tool_version(self) -> str:
        return axclrt_cffi.string(axclrt_lib.axclrtEngineGetModelCompilerVersion(self._model_id[0])).decode()

    def _get_info(self) -> Any:
        info = axclrt_cffi.new("axclrtEngineIOInfo *")
        if axclrt_lib.axclrtEngineGetIOInfo(self._model_id[0], info) != 0:
            raise RuntimeError("axclrtEngineGetIOInfo failed.")
        return info

    def _get_shape_count(self) -> int:
        count = axclrt_cffi.new("int32_t *")
        if axclrt_lib.axclrtEngineGetShapeGroupsCount(self._info[0], count) != 0:
            axclrt_lib.axclrtEngineUnload(self._model_id[0])
            raise RuntimeError("axclrtEngineGetShapeGroupsCount failed.")
        return int(count[0])

    def _get_io(self, kind: str) -> list[list[NodeArg]]:
        info = self._info[0]
        count = getattr(axclrt_lib, f"axclrtEngineGetNum{kind}s")(info)
        groups = []
        for group in range(self._shape_count):
            args = []
            for index in range(count):
                name = axclrt_cffi.string(getattr(axclrt_lib, f"axclrtEngineGet{kind}NameByIndex")(info, index))
                data_type = axclrt_cffi.new("axclrtEngineDataType *")
                if getattr(axclrt_lib, f"axclrtEngineGet{kind}DataType")(info, index, data_type) != 0:
                    raise RuntimeError(f"axclrtEngineGet{kind}DataType failed.")
                dims = axclrt_cffi.new("axclrtEngineIODims *")
                if getattr(axclrt_lib, f"axclrtEngineGet{kind}Dims")(info, group, index, dims) != 0:
                    raise RuntimeError(f"axclrtEngineGet{kind}Dims failed.")
                shape = [dims.dims[i] for i in range(dims.dimCount)]
                args.append(NodeArg(name.decode("utf-8"), _transform_dtype(data_type[0]), shape))
            groups.append(args)
        return groups

    def _get_inputs(self) -> list[list[NodeArg]]:
        return self._get_io("Input")

    def _get_outputs(self) -> list[list[NodeArg]]:
        return self._get_io("Output")

    def _prepare_io(self) -> Any:
        io = axclrt_cffi.new("axclrtEngineIO *")
        ret = axclrt_lib.axclrtEngineCreateIO(self._info[0], io)
        if ret != 0:
            raise RuntimeError(f"axclrtEngineCreateIO failed {ret}.")
        for kind in ("Input", "Output"):
            for i in range(getattr(axclrt_lib, f"axclrtEngineGetNum{kind}s")(self._info[0])):
                size_of = getattr(axclrt_lib, f"axclrtEngineGet{kind}SizeByIndex")
                size = max(size_of(self._info[0], group, i) for group in range(self._shape_count))
                pointer = axclrt_cffi.new("void **")
                ret = axclrt_lib.axclrtMalloc(pointer, size, axclrt_lib.AXCL_MEM_MALLOC_NORMAL_ONLY)
                if ret != 0 or pointer[0] == axclrt_cffi.NULL:
                    raise RuntimeError(f"axclrtMalloc failed {ret} for {kind.lower()} {i}.")
                ret = getattr(axclrt_lib, f"axclrtEngineSet{kind}BufferByIndex")(io[0], i, pointer[0], size)
                if ret != 0:
                    raise RuntimeError(f"axclrtEngineSet{kind}BufferByIndex failed {ret} for {kind.lower()} {i}.")
        return io

    def run(
        self,
        output_names: list[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: object = None,
        shape_group: int = 0,
    ) -> list[np.ndarray]:
        places = self._check_run(output_names, input_feed, shape_group)
        if axclrt_lib.axclrtSetCurrentContext(self._thread_context[0]) != 0:
            raise RuntimeError("axclrtSetCurrentContext failed")

        pointer = axclrt_cffi.new("void **")
        size = axclrt_cffi.new("uint64_t *")
        for key, npy in input_feed.items():
            for i, one in enumerate(self.get_inputs(shape_group)):
                if one.name == key:
                    if not (npy.flags.c_contiguous or npy.flags.f_contiguous):
                        npy = np.ascontiguousarray(npy)
                    if axclrt_lib.axclrtEngineGetInputBufferByIndex(self._io[0], i, pointer, size) != 0:
                        raise RuntimeError(f"axclrtEngineGetInputBufferByIndex failed for input {i}.")
                    host = axclrt_cffi.cast("void *", npy.ctypes.data)
                    kind = axclrt_lib.AXCL_MEMCPY_HOST_TO_DEVICE
                    if axclrt_lib.axclrtMemcpy(pointer[0], host, npy.nbytes, kind) != 0:
                        raise RuntimeError(f"axclrtMemcpy failed for input {i}.")

        ret = axclrt_lib.axclrtEngineExecute(self._model_id[0], self._context_id[0], shape_group, self._io[0])
        if ret != 0:
            raise RuntimeError(f"axclrtEngineExecute failed {ret}")

        outputs: list[Any] = [None] * len(places)
        for i, (arg, place) in enumerate(zip(self.get_outputs(shape_group), places, strict=True)):
            if axclrt_lib.axclrtEngineGetOutputBufferByIndex(self._io[0], i, pointer, size) != 0:
                raise RuntimeError(f"axclrtEngineGetOutputBufferByIndex failed for output {i}.")
            npy = np.zeros(arg.shape, dtype=arg.dtype)
            host = axclrt_cffi.cast("void *", npy.ctypes.data)
            if axclrt_lib.axclrtMemcpy(host, pointer[0], npy.nbytes, axclrt_lib.AXCL_MEMCPY_DEVICE_TO_HOST) != 0:
                raise RuntimeError(f"axclrtMemcpy failed for output {i}.")
            outputs[place] = npy
        return outputs
