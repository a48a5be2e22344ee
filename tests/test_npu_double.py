"""The axengine double below run(): pyaxengine's private attributes and cffi layer on emulated NPU memory.

The AXE board's CMM is cached and the NPU is not coherent with the CPU: a write is seen by the NPU only once
flushed, an NPU output by the CPU only once invalidated. The AXCL card's memory is reachable only through
axclrtMemcpy. These tests drive the emulation the way code below `run()` does (memmove into `pVirAddr`, flush,
RunGroupIOSync, repointed IO buffers) and check that it behaves as the hardware would, and that `run()` through
either provider computes what the graph computes.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest

from batch.infer.generate import Timings
from batch.infer.pipeline import Pipeline, Request
from batch.infer.settings import GenerationSettings
from batch.model.ort_options import session_options

DOUBLES = Path(__file__).parent / "doubles"
sys.path.insert(0, str(DOUBLES))
from axmodel_folder import build_axmodel_folder  # noqa: E402

CHUNK, PREFILL_CHUNKS, KV = 128, 2, 255
BF16 = np.dtype(ml_dtypes.bfloat16)
AXE, AXCL = "AxEngineExecutionProvider", "AXCLRTExecutionProvider"
LAYER0 = "qwen2_p128_l0_together.axmodel"


@pytest.fixture
def axengine(axengine, monkeypatch):
    """The double (tests/conftest.py) with both providers available."""
    monkeypatch.setattr(axengine, "AVAILABLE", [AXE, AXCL])
    return axengine


@pytest.fixture(scope="module")
def ax_folder(tiny_onnx_npu: Path, tmp_path_factory) -> Path:
    return build_axmodel_folder(tiny_onnx_npu, tmp_path_factory.mktemp("ax"), CHUNK, PREFILL_CHUNKS, KV)


def open_session(axengine, folder: Path, name: str = LAYER0, provider: str = AXE) -> Any:
    return axengine.InferenceSession(str(folder / name), providers=[provider])


def make_feed(session, group: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for arg in session.get_inputs(group):
        if arg.dtype == np.uint32:
            feed[arg.name] = np.arange(int(np.prod(arg.shape)), dtype=np.uint32).reshape(arg.shape)
        elif arg.name == "mask":
            feed[arg.name] = np.zeros(arg.shape, arg.dtype)
        else:
            feed[arg.name] = rng.standard_normal(arg.shape).astype(arg.dtype)
    return feed


def graph_outputs(path: Path, group: int, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """What the graph behind a double's axmodel computes, straight from onnxruntime: the oracle."""
    spec = json.loads(path.read_text())
    declared = spec["groups"][group]
    session = ort.InferenceSession(spec["onnx"], sess_options=session_options(), providers=["CPUExecutionProvider"])
    f32 = {k: v.astype(np.float32) if v.dtype == BF16 else v for k, v in feed.items()}
    if declared.get("placeholder_history"):
        f32["K_cache"] = f32["V_cache"] = np.zeros((1, 0, declared["kv_dim"]), np.float32)
    dtypes = [BF16 if n["dtype"] == "bfloat16" else np.dtype(n["dtype"]) for n in declared["outputs"]]
    return [value.astype(dtype) for value, dtype in zip(session.run(None, f32), dtypes, strict=True)]


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# AXE board: the C-level path below run() ----------------------------------------------------------------------


def stage(session, feed: dict[str, np.ndarray], group: int, flush: bool = True) -> None:
    """Each fed array memmoved into its input buffer and (unless told not to) exactly its bytes flushed."""
    from axengine._axe_capi import engine_cffi, sys_lib

    io = session._sess._io[0]
    for i, arg in enumerate(session.get_inputs(group)):
        array = np.ascontiguousarray(feed[arg.name])
        buffer = io.pInputs[i]
        engine_cffi.memmove(buffer.pVirAddr, engine_cffi.cast("void *", array.ctypes.data), array.nbytes)
        if flush:
            assert sys_lib.AX_SYS_MflushCache(buffer.phyAddr, buffer.pVirAddr, array.nbytes) == 0


def run_group(session, group: int) -> int:
    from axengine._axe_capi import engine_lib

    sess = session._sess
    return engine_lib.AX_ENGINE_RunGroupIOSync(sess._handle[0], sess._context[0], group, sess._io)


def host_output(session, group: int, index: int, invalidate: bool) -> np.ndarray:
    """Output `index` as the CPU sees it in the output buffer, after invalidating it or not."""
    from axengine._axe_capi import engine_cffi, sys_lib

    arg = session.get_outputs(group)[index]
    buffer = session._sess._io[0].pOutputs[index]
    if invalidate:
        assert sys_lib.AX_SYS_MinvalidateCache(buffer.phyAddr, buffer.pVirAddr, buffer.nSize) == 0
    size = arg.dtype.itemsize * int(np.prod(arg.shape))
    return np.frombuffer(engine_cffi.buffer(buffer.pVirAddr, size), arg.dtype).reshape(arg.shape).copy()


def input_index(session, group: int, name: str) -> int:
    return [a.name for a in session.get_inputs(group)].index(name)


def test_the_axe_session_has_pyaxengines_private_attributes_and_layouts(axengine, ax_folder):
    from axengine._axe import _get_chip_type
    from axengine._axe_capi import engine_cffi, engine_lib, sys_cffi, sys_lib
    from axengine._axe_types import ChipType

    session = open_session(axengine, ax_folder)
    sess = session._sess
    assert session._provider == AXE and type(sess).__name__ == "AXEngineSession"
    assert engine_cffi.typeof(sess._handle).cname == "uint64_t * *"
    assert engine_cffi.typeof(sess._io).cname == "AX_ENGINE_IO_T *"
    assert [engine_cffi.typeof(i).cname for i in sess._info] == ["AX_ENGINE_IO_INFO_T * *"] * (PREFILL_CHUNKS + 1)
    assert sess._shape_count == PREFILL_CHUNKS + 1 and sess._align == 128
    io = sess._io[0]
    assert (io.nInputSize, io.nOutputSize) == (5, 3) and len(sess._io_inputs_pool) == 5
    for i in range(io.nInputSize):  # one CMM buffer per index, as large as the largest group needs
        largest = max(sess._info[g][0].pInputs[i].nSize for g in range(sess._shape_count))
        phy, vir = sess._io_inputs_pool[i]
        assert io.pInputs[i].nSize == largest and (io.pInputs[i].phyAddr, io.pInputs[i].pVirAddr) == (phy[0], vir[0])
    k_cache = sess._info[0][0].pInputs[0]
    assert engine_cffi.string(k_cache.pName) == b"K_cache" and k_cache.eDataType == engine_lib.AX_ENGINE_DT_BFLOAT16
    assert [k_cache.pShape[d] for d in range(k_cache.nShapeSize)] == [1, KV, session.get_inputs(0)[0].shape[2]]
    # the 64-bit layouts of ax_engine_type.h
    sizes = {t: engine_cffi.sizeof(t) for t in ("AX_ENGINE_IO_META_T", "AX_ENGINE_IO_BUFFER_T", "AX_ENGINE_IO_T")}
    assert sizes == {"AX_ENGINE_IO_META_T": 128, "AX_ENGINE_IO_BUFFER_T": 128, "AX_ENGINE_IO_T": 120}
    assert engine_cffi.offsetof("AX_ENGINE_IO_META_T", "nSize") == 40
    assert engine_cffi.offsetof("AX_ENGINE_IO_BUFFER_T", "nSize") == 16
    assert engine_cffi.offsetof("AX_ENGINE_IO_INFO_T", "bDynamicBatchSize") == 32
    # an AX650: SetAffinity present, GetTotalOps (an MC20E symbol) missing as from the .so
    assert _get_chip_type() is ChipType.MC50
    with pytest.raises(AttributeError, match="AX_ENGINE_GetTotalOps"):
        engine_lib.AX_ENGINE_GetTotalOps  # noqa: B018
    with pytest.raises(TypeError):  # cffi's own argument conversion: an int is not a pointer
        sys_lib.AX_SYS_MflushCache(io.pInputs[0].phyAddr, 1234, 16)
    assert sys_cffi.sizeof("AX_U64") == 8


@pytest.mark.parametrize("provider", [AXE, AXCL])
def test_run_through_either_provider_gives_what_the_graph_computes(provider, axengine, ax_folder):
    session = open_session(axengine, ax_folder, provider=provider)
    for group in range(PREFILL_CHUNKS + 1):
        feed = make_feed(session, group, seed=group)
        axengine.memory.reset()
        got = session.run(None, feed, shape_group=group)
        expected = graph_outputs(ax_folder / LAYER0, group, feed)
        assert all(same_bytes(g, e) for g, e in zip(got, expected, strict=True))
        fed = sum(a.nbytes for a in feed.values())
        out = sum(e.nbytes for e in expected)
        stats = axengine.memory
        if provider == AXE:  # the whole buffer of every input flushed, of every output invalidated
            io = session._sess._io[0]
            assert (stats.copied, stats.h2d, stats.d2h) == (fed, 0, 0)
            assert stats.flushed == sum(io.pInputs[i].nSize for i in range(io.nInputSize))
            assert stats.invalidated == sum(io.pOutputs[i].nSize for i in range(io.nOutputSize))
        else:
            assert (stats.copied, stats.flushed, stats.h2d, stats.d2h) == (0, 0, fed, out)
        assert stats.runs == 1 and stats.errors == []
    assert axengine.calls == [(LAYER0, g) for g in range(PREFILL_CHUNKS + 1)]
    post = open_session(axengine, ax_folder, "qwen2_post.axmodel", provider)  # one group: RunSyncV2
    feed = make_feed(post, 0, seed=9)
    assert same_bytes(post.run(None, feed)[0], graph_outputs(ax_folder / "qwen2_post.axmodel", 0, feed)[0])


def test_output_orders_that_pyaxengine_would_return_permuted_are_refused(axengine, ax_folder):
    session = open_session(axengine, ax_folder)
    feed = make_feed(session, 0, seed=1)
    declared = [a.name for a in session.get_outputs(0)]
    by_name = dict(zip(declared, session.run(declared, feed), strict=True))
    swapped = [declared[1], declared[0], declared[2]]  # its own inverse: pyaxengine returns this order
    got = session.run(swapped, feed)
    assert all(same_bytes(g, by_name[n]) for g, n in zip(got, swapped, strict=True))
    rotated = declared[1:] + declared[:1]
    with pytest.raises(axengine.ContractError, match="its own inverse"):
        session.run(rotated, feed)


def test_a_cpu_write_not_flushed_fails_the_next_run_naming_the_input(axengine, ax_folder):
    session = open_session(axengine, ax_folder)
    feed = make_feed(session, 0, seed=2)
    stage(session, feed, 0)
    assert run_group(session, 0) == 0 and axengine.calls == [(LAYER0, 0)]
    changed = feed["input"].copy()
    bits = changed.view(np.uint16)
    bits[0, 0, 3] ^= 0xFFFF  # bytes 6 and 7
    bits[0, 0, 10] ^= 0xFFFF  # bytes 20 and 21
    stage(session, dict(feed, input=changed), 0, flush=False)
    with pytest.raises(axengine.CoherenceError, match=rf"{LAYER0}: input input .*first at offset 6, last at offset 21"):
        run_group(session, 0)
    assert axengine.calls == [(LAYER0, 0)]  # refused before the graph ran
    stage(session, dict(feed, input=changed), 0)
    assert run_group(session, 0) == 0


def test_flushing_part_of_a_buffer_syncs_only_that_part(axengine, ax_folder):
    from axengine._axe_capi import device_bytes, engine_cffi, sys_lib

    session = open_session(axengine, ax_folder)
    feed = make_feed(session, 0, seed=3)
    stage(session, feed, 0)
    assert run_group(session, 0) == 0
    buffer = session._sess._io[0].pInputs[input_index(session, 0, "input")]
    new = (feed["input"].astype(np.float32) + 1).astype(BF16)
    engine_cffi.memmove(buffer.pVirAddr, engine_cffi.cast("void *", new.ctypes.data), new.nbytes)
    half = new.nbytes // 2
    assert sys_lib.AX_SYS_MflushCache(buffer.phyAddr, buffer.pVirAddr, half) == 0
    dram = device_bytes(buffer.phyAddr, new.nbytes)
    assert dram[:half].tobytes() == new.tobytes()[:half]
    assert dram[half:].tobytes() == feed["input"].tobytes()[half:]  # the second half: what was flushed before
    dirty = np.flatnonzero(new.view(np.uint8).ravel()[half:] != feed["input"].view(np.uint8).ravel()[half:]) + half
    with pytest.raises(axengine.CoherenceError, match=f"first at offset {dirty[0]}, last at offset {dirty[-1]}"):
        run_group(session, 0)
    rest = engine_cffi.cast("char *", buffer.pVirAddr) + half
    assert sys_lib.AX_SYS_MflushCache(buffer.phyAddr + half, rest, new.nbytes - half) == 0
    assert run_group(session, 0) == 0
    expected = graph_outputs(ax_folder / LAYER0, 0, dict(feed, input=new))
    assert same_bytes(host_output(session, 0, 2, invalidate=True), expected[2])


def test_npu_outputs_reach_the_cpu_only_once_invalidated(axengine, ax_folder):
    session = open_session(axengine, ax_folder)
    first, second = make_feed(session, 0, seed=4), make_feed(session, 0, seed=5)
    stage(session, first, 0)
    assert run_group(session, 0) == 0
    unseen = host_output(session, 0, 2, invalidate=False)
    assert set(unseen.view(np.uint8).ravel()) == {0xFF}  # the fresh CMM, never written by the CPU
    expected_first = graph_outputs(ax_folder / LAYER0, 0, first)[2]
    assert same_bytes(host_output(session, 0, 2, invalidate=True), expected_first)
    stage(session, second, 0)
    assert run_group(session, 0) == 0
    assert same_bytes(host_output(session, 0, 2, invalidate=False), expected_first)  # stale until invalidated
    expected_second = graph_outputs(ax_folder / LAYER0, 0, second)[2]
    assert not same_bytes(expected_first, expected_second)
    assert same_bytes(host_output(session, 0, 2, invalidate=True), expected_second)


def test_unwritten_cmm_reaches_the_graph_as_bf16_nan(axengine, ax_folder):
    session = open_session(axengine, ax_folder)
    feed = make_feed(session, 0, seed=6)
    stage(session, feed, 0)
    buffer = session._sess._io[0].pInputs[input_index(session, 0, "K_cache")]
    other = open_session(axengine, ax_folder)  # kept: its buffers live as long as it does
    fresh = other._sess._io[0].pInputs[0]  # its K buffer, never written
    buffer.phyAddr, buffer.pVirAddr = fresh.phyAddr, fresh.pVirAddr
    assert run_group(session, 0) == 0
    assert np.isnan(host_output(session, 0, 2, invalidate=True).astype(np.float32)).all()
    del other, fresh  # its buffers go with it here (pyaxengine never frees them): a pointer into them is refused
    assert run_group(session, 0) != 0 and "released with its session" in axengine.memory.errors[-1]


def test_flush_and_invalidate_refuse_a_phy_and_vir_of_different_bytes(axengine):
    from axengine._axe_capi import engine_cffi, sys_lib

    blocks = []
    for _ in range(2):
        phy, vir = engine_cffi.new("AX_U64 *"), engine_cffi.new("AX_VOID **")
        assert sys_lib.AX_SYS_MemAllocCached(phy, vir, 256, 128, engine_cffi.new("AX_S8[]", b"test")) == 0
        blocks.append((phy[0], vir[0]))
    (phy_a, vir_a), (phy_b, vir_b) = blocks
    assert phy_a % 128 == 0 and phy_b >= phy_a + 256  # aligned, never overlapping
    assert int(engine_cffi.cast("uintptr_t", vir_a)) % 128 == 0
    with pytest.raises(axengine.CoherenceError, match="must name the same bytes"):
        sys_lib.AX_SYS_MflushCache(phy_a, vir_b, 16)
    with pytest.raises(axengine.CoherenceError, match="is offset 8 of the block.*is offset 0"):
        sys_lib.AX_SYS_MinvalidateCache(phy_a + 8, vir_a, 16)
    with pytest.raises(axengine.CoherenceError, match="run past the end of the 256-byte block"):
        sys_lib.AX_SYS_MflushCache(phy_a + 128, engine_cffi.cast("char *", vir_a) + 128, 129)
    with pytest.raises(axengine.CoherenceError, match="is in no CMM allocation"):
        sys_lib.AX_SYS_MflushCache(phy_b + 4096, vir_b, 16)  # past the block: the gap before the next one
    assert sys_lib.AX_SYS_MflushCache(phy_a + 128, engine_cffi.cast("char *", vir_a) + 128, 128) == 0
    assert axengine.memory.flushed == 128
    assert sys_lib.AX_SYS_MemFree(phy_a, vir_a) == 0 and sys_lib.AX_SYS_MemFree(phy_b, vir_b) == 0
    assert sys_lib.AX_SYS_MemFree(phy_a, vir_a) != 0 and "not a live CMM block" in axengine.memory.errors[-1]


def test_an_input_repointed_at_another_sessions_output_buffer_is_read_there(axengine, ax_folder):
    from axengine._axe_capi import engine_cffi, sys_lib

    layers = sorted(ax_folder.glob("*_together.axmodel"))
    first, second = open_session(axengine, ax_folder), open_session(axengine, ax_folder, layers[-1].name)
    rows = first.run(None, make_feed(first, 1, seed=7), shape_group=1)[2]  # a prefill chunk: 128 rows of output
    hidden = rows[:, 5:6]  # row 5, read in place from layer 0's output buffer as layer 1's decode input
    offset = hidden.nbytes * 5
    source = first._sess._io[0].pOutputs[2]
    target = second._sess._io[0].pInputs[input_index(second, 0, "input")]
    target.phyAddr, target.nSize = source.phyAddr + offset, source.nSize - offset
    target.pVirAddr = engine_cffi.cast("char *", source.pVirAddr) + offset
    second_feed = make_feed(second, 0, seed=8)
    io = second._sess._io[0]
    for i, arg in enumerate(second.get_inputs(0)):
        if arg.name != "input":
            array, buffer = second_feed[arg.name], io.pInputs[i]
            engine_cffi.memmove(buffer.pVirAddr, engine_cffi.cast("void *", array.ctypes.data), array.nbytes)
            sys_lib.AX_SYS_MflushCache(buffer.phyAddr, buffer.pVirAddr, buffer.nSize)
    assert run_group(second, 0) == 0
    expected = graph_outputs(layers[-1], 0, dict(second_feed, input=hidden))
    assert all(same_bytes(host_output(second, 0, j, invalidate=True), expected[j]) for j in range(3))
    # a buffer too small for the group, or a range that leaves its block: a nonzero status, the reason kept
    target.nSize = hidden.nbytes - 2
    assert run_group(second, 0) != 0 and "needs" in axengine.memory.errors[-1]
    target.nSize, target.phyAddr = source.nSize, source.phyAddr + source.nSize - 2  # the block ends 2 bytes on
    assert run_group(second, 0) != 0 and "not inside one CMM block" in axengine.memory.errors[-1]


# AXCL card ----------------------------------------------------------------------------------------------------


def axcl(axengine, ax_folder) -> Any:
    """The AXCL runtime, with a device set on this thread by opening a session."""
    session = open_session(axengine, ax_folder, provider=AXCL)
    from axengine import _axclrt_capi

    assert _axclrt_capi.axclrt_lib.axclrtSetCurrentContext(session._sess._thread_context[0]) == 0
    return _axclrt_capi


def malloc(capi, size: int) -> Any:
    pointer = capi.axclrt_cffi.new("void **")
    assert capi.axclrt_lib.axclrtMalloc(pointer, size, capi.axclrt_lib.AXCL_MEM_MALLOC_NORMAL_ONLY) == 0
    return pointer[0]


def test_the_axcl_session_has_pyaxengines_private_attributes(axengine, ax_folder):
    from axengine._axclrt_capi import DEVICE_BUS_BASE, axclrt_cffi

    session = axengine.InferenceSession(
        str(ax_folder / LAYER0), providers=[(AXCL, {"device_id": 2})], provider_options=[{"device_id": 2}]
    )
    sess = session._sess
    assert type(sess).__name__ == "AXCLRTSession" and session._provider == AXCL
    assert (sess._device_index, sess._device_id) == (2, DEVICE_BUS_BASE + 2)
    # as in pyaxengine 0.1.3, a device given only in the providers' tuple does not reach the session
    assert (
        axengine.InferenceSession(str(ax_folder / LAYER0), providers=[(AXCL, {"device_id": 2})])._sess._device_index
        == 0
    )
    assert axclrt_cffi.typeof(sess._model_id).cname == "uint64_t *"
    assert axclrt_cffi.typeof(sess._io).cname == "void * *" and axclrt_cffi.typeof(sess._info).cname == "void * *"
    assert sess._shape_count == PREFILL_CHUNKS + 1
    explicit = axengine.InferenceSession(str(ax_folder / LAYER0), providers=[AXCL], provider_options=[{"device_id": 3}])
    assert explicit._sess._device_index == 3


def test_axcl_device_to_device_copies_with_offsets(axengine, ax_folder):
    capi = axcl(axengine, ax_folder)
    lib, ffi = capi.axclrt_lib, capi.axclrt_cffi
    axengine.memory.reset()
    a, b = malloc(capi, 64), malloc(capi, 64)
    assert int(ffi.cast("uintptr_t", a)) >= 0x4000_0000_0000_0000
    pattern = np.arange(64, dtype=np.uint8)
    assert lib.axclrtMemcpy(a, ffi.cast("void *", pattern.ctypes.data), 64, lib.AXCL_MEMCPY_HOST_TO_DEVICE) == 0
    dst, src = ffi.cast("char *", b) + 8, ffi.cast("char *", a) + 16
    assert lib.axclrtMemcpy(dst, src, 32, lib.AXCL_MEMCPY_DEVICE_TO_DEVICE) == 0
    back = np.zeros(64, np.uint8)
    assert lib.axclrtMemcpy(ffi.cast("void *", back.ctypes.data), b, 64, lib.AXCL_MEMCPY_DEVICE_TO_HOST) == 0
    assert back[:8].tolist() == [0xFF] * 8 and back[8:40].tolist() == list(range(16, 48))
    assert back[40:].tolist() == [0xFF] * 24
    stats = axengine.memory
    assert (stats.h2d, stats.d2d, stats.d2h, stats.errors) == (64, 32, 64, [])


def test_axcl_memcpy_refuses_a_kind_that_does_not_match_its_pointers(axengine, ax_folder):
    capi = axcl(axengine, ax_folder)
    lib, ffi = capi.axclrt_lib, capi.axclrt_cffi
    device = malloc(capi, 64)
    host = np.zeros(64, np.uint8)
    host_ptr = ffi.cast("void *", host.ctypes.data)
    axengine.memory.reset()
    wrong = [
        (host_ptr, host_ptr, 64, lib.AXCL_MEMCPY_HOST_TO_DEVICE, "dst 0x.* is not a device pointer"),
        (device, device, 64, lib.AXCL_MEMCPY_HOST_TO_DEVICE, "src 0x.* is a device pointer where a host one"),
        (host_ptr, host_ptr, 64, lib.AXCL_MEMCPY_DEVICE_TO_HOST, "src 0x.* is not a device pointer"),
        (device, host_ptr, 64, lib.AXCL_MEMCPY_DEVICE_TO_DEVICE, "src 0x.* is not a device pointer"),
        (ffi.cast("char *", device) + 60, host_ptr, 8, lib.AXCL_MEMCPY_HOST_TO_DEVICE, "leave its device allocation"),
        (device, host_ptr, 65, lib.AXCL_MEMCPY_HOST_TO_DEVICE, "leave its device allocation"),
    ]
    for dst, src, count, kind, reason in wrong:
        assert lib.axclrtMemcpy(dst, src, count, kind) != 0
        assert re.search(reason, axengine.memory.errors.pop()), reason
    stats = axengine.memory
    assert (stats.h2d, stats.d2h, stats.d2d, stats.h2h) == (0, 0, 0, 0)


def test_axcl_double_free_is_refused_and_recorded(axengine, ax_folder):
    capi = axcl(axengine, ax_folder)
    lib, ffi = capi.axclrt_lib, capi.axclrt_cffi
    a = malloc(capi, 64)
    axengine.memory.reset()
    assert lib.axclrtFree(ffi.cast("char *", a) + 8) != 0
    assert "inside a live allocation" in axengine.memory.errors.pop()
    assert lib.axclrtFree(a) == 0 and axengine.memory.errors == []
    assert lib.axclrtFree(a) != 0
    assert axengine.memory.errors == [
        f"axclrtFree(0x{int(ffi.cast('uintptr_t', a)):x}): not a live allocation (freed already?)"
    ]


def test_axcl_input_set_to_another_sessions_buffer_is_read_there(axengine, ax_folder):
    capi = axcl(axengine, ax_folder)
    lib, ffi = capi.axclrt_lib, capi.axclrt_cffi
    layers = sorted(ax_folder.glob("*_together.axmodel"))
    first = open_session(axengine, ax_folder, provider=AXCL)
    second = open_session(axengine, ax_folder, layers[-1].name, AXCL)
    hidden = first.run(None, make_feed(first, 0, seed=10))[2]
    pointer, size = ffi.new("void **"), ffi.new("uint64_t *")
    assert lib.axclrtEngineGetOutputBufferByIndex(first._sess._io[0], 2, pointer, size) == 0
    index = input_index(second, 0, "input")
    assert lib.axclrtEngineSetInputBufferByIndex(second._sess._io[0], index, pointer[0], size[0]) == 0
    feed = make_feed(second, 0, seed=11)
    sess = second._sess
    for i, arg in enumerate(second.get_inputs(0)):
        if arg.name != "input":
            mine = ffi.new("void **")
            assert lib.axclrtEngineGetInputBufferByIndex(sess._io[0], i, mine, size) == 0
            array = feed[arg.name]
            host = ffi.cast("void *", array.ctypes.data)
            assert lib.axclrtMemcpy(mine[0], host, array.nbytes, lib.AXCL_MEMCPY_HOST_TO_DEVICE) == 0
    assert lib.axclrtEngineExecute(sess._model_id[0], sess._context_id[0], 0, sess._io[0]) == 0
    expected = graph_outputs(layers[-1], 0, dict(feed, input=hidden))
    for j, want in enumerate(expected):
        assert lib.axclrtEngineGetOutputBufferByIndex(sess._io[0], j, pointer, size) == 0
        got = np.zeros(want.shape, want.dtype)
        assert (
            lib.axclrtMemcpy(
                ffi.cast("void *", got.ctypes.data), pointer[0], got.nbytes, lib.AXCL_MEMCPY_DEVICE_TO_HOST
            )
            == 0
        )
        assert same_bytes(got, want)
    # too small a buffer for the group: refused
    assert lib.axclrtEngineGetInputBufferByIndex(sess._io[0], index, pointer, size) == 0
    assert lib.axclrtEngineSetInputBufferByIndex(sess._io[0], index, pointer[0], hidden.nbytes - 2) == 0
    assert lib.axclrtEngineExecute(sess._model_id[0], sess._context_id[0], 0, sess._io[0]) != 0
    # pyaxengine's unload frees whatever pointers the IO holds: the borrowed buffer is freed twice
    axengine.memory.reset()
    sess._unload()
    first._sess._unload()
    assert len(axengine.memory.errors) == 1 and "freed already" in axengine.memory.errors[0]


# the whole pipeline -------------------------------------------------------------------------------------------


def test_the_pipeline_decodes_the_same_tokens_through_both_providers(axengine, ax_folder, tiny_hf):
    tokens = {}
    for provider in (AXE, AXCL):
        axengine.memory.reset()
        pipeline = Pipeline.open(ax_folder, hf_dir=tiny_hf, providers=(provider,))
        try:
            request = Request(np.random.default_rng(3).integers(0, 1000, 150), None, None, 0.0)
            settings = GenerationSettings(max_new_tokens=12, ignore_eos=True)
            tokens[provider] = [s.token for s in pipeline.steps(request, settings, Timings())]
        finally:
            pipeline.close()
        assert axengine.memory.errors == [] and axengine.memory.runs > 0
    assert tokens[AXE] == tokens[AXCL] and len(set(tokens[AXE])) >= 4
