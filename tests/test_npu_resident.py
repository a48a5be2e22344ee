"""The NPU path with the K/V cache resident in the sessions' buffers (model.npu_io), on the emulated board and card.

The axengine double emulates what the real runtime drives below run(): a board's cached CMM buffers that the NPU
reads from DRAM (a CPU write reaches it only through a flush; the CPU sees NPU output only after an invalidate,
and every run first checks that each byte the CPU wrote was flushed) and an AXCL card's device memory. The
folders declare the published InternVL3-2B shapes: a 2559-row cache and 128-token chunks.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import cffi
import numpy as np
import pytest

from batch.errors import BackendError
from batch.infer.generate import Timings
from batch.infer.pipeline import Pipeline, Request
from batch.infer.runtime.npu_buffers import BoardSession
from batch.infer.runtime.npu_resident import ResidentLayers
from batch.infer.settings import GenerationSettings, MediaSettings

DOUBLES = Path(__file__).parent / "doubles"
sys.path.insert(0, str(DOUBLES))
from axmodel_folder import build_axmodel_folder  # noqa: E402

CHUNK, PREFILL_CHUNKS, KV = 128, 9, 2559  # InternVL3-2B_axmodel_chunk_128's shapes
STEPS = 24
THREE_FRAMES = MediaSettings(video_frames=3)  # 949 tokens: what 1152 holds
PROVIDERS = {"board": "AxEngineExecutionProvider", "card": "AXCLRTExecutionProvider"}


@pytest.fixture(scope="module")
def ax_folder(tiny_onnx_npu: Path, tmp_path_factory) -> Path:
    return build_axmodel_folder(tiny_onnx_npu, tmp_path_factory.mktemp("ax"), CHUNK, PREFILL_CHUNKS, KV)


@pytest.fixture(params=list(PROVIDERS))
def device(request, axengine, monkeypatch) -> str:
    monkeypatch.setattr(axengine, "AVAILABLE", [PROVIDERS[request.param]])
    return request.param


def open_pipeline(folder: Path, hf: Path, npu_io: str) -> Pipeline:
    return Pipeline.open(folder, hf_dir=hf, npu_io=npu_io)


def npu_io_lines(caplog) -> list[str]:
    """The log lines that say which path the NPU's layers took, and why."""
    return [r.getMessage() for r in caplog.records if "npu_io" in r.getMessage()]


def greedy(pipeline: Pipeline, request: Request, steps: int = STEPS) -> list[int]:
    settings = GenerationSettings(max_new_tokens=steps, ignore_eos=True)
    return [s.token for s in pipeline.steps(request, settings, Timings())]


def requests(pipeline: Pipeline, media_dir: Path) -> dict[str, Request]:
    rng = np.random.default_rng(3)
    return {
        "text": pipeline.prepare("Where was this photo taken?"),
        "image": pipeline.prepare("Describe the image.", [media_dir / "wide.png"]),
        "video": pipeline.prepare("What happens in this clip?", [media_dir / "clip.mp4"], THREE_FRAMES),
        "128 tokens": Request(rng.integers(0, 1000, 128), None, None, 0.0),
        "129 tokens": Request(rng.integers(0, 1000, 129), None, None, 0.0),
        "long": Request(rng.integers(0, 1000, 3 * CHUNK + 77), None, None, 0.0),
    }


def test_resident_answers_equal_copy_token_by_token(device, ax_folder, tiny_hf, media_dir, axengine):
    copy = open_pipeline(ax_folder, tiny_hf, "copy")
    resident = open_pipeline(ax_folder, tiny_hf, "resident")
    try:
        assert (copy.backend.npu_io, resident.backend.npu_io) == ("copy", "resident")
        cases = requests(copy, media_dir)
        assert len(cases["video"].ids) > 2 * CHUNK and len(cases["image"].ids) > CHUNK  # across chunk boundaries
        # long first: every later, shorter answer decodes over rows an earlier answer left beyond its position
        for name in ["long", "video", "text", "image", "128 tokens", "129 tokens", "text"]:
            expected = greedy(copy, cases[name])
            assert greedy(resident, cases[name]) == expected, name
            assert len(set(expected)) >= 6
    finally:
        copy.close()
        resident.close()
    assert axengine.memory.errors == []


def test_a_decode_step_moves_only_the_new_rows(device, ax_folder, tiny_hf, axengine):
    """Per token: each layer's new K and V row, the first layer's hidden state, and the changed mask column and
    index; the same number of bytes at every position."""
    pipeline = open_pipeline(ax_folder, tiny_hf, "resident")
    backend = pipeline.backend
    layer = backend._layers[0]
    row = layer.input(0, "K_cache").shape[2] * 2
    hidden = backend.hidden_size * 2
    per_step = []
    try:
        request = Request(np.random.default_rng(0).integers(0, 1000, 300), None, None, 0.0)
        steps = pipeline.steps(request, GenerationSettings(max_new_tokens=8, ignore_eos=True), Timings())
        next(steps)  # prefill
        next(steps)  # the first decode step rewrites the whole mask over the prefill's
        for _ in steps:
            per_step.append(axengine.memory.snapshot())
            axengine.memory.reset()
    finally:
        pipeline.close()
    per_step = per_step[1:]
    rows = 2 * row * backend.num_layers  # every layer's new K and V row
    small = 2 * hidden + 4 + 2  # layer 0's input and the post graph's (run()), the index, one mask column
    for step in per_step:
        if device == "board":
            assert rows <= step["copied"] <= rows + small and step["h2d"] == step["d2d"] == 0
            assert rows <= step["flushed"] <= rows + small + 64 * (2 * backend.num_layers + 3)  # whole cache lines
        else:  # the rows are copied on the card: only the small inputs cross PCIe
            assert step["d2d"] == rows and step["h2d"] <= small and step["copied"] == 0
    moved = [s["copied"] + s["h2d"] for s in per_step]
    assert max(moved) - min(moved) <= 8  # the same at every position: no history moves


def test_a_flush_left_out_fails_before_the_npu_reads(ax_folder, tiny_hf, axengine, monkeypatch):
    monkeypatch.setattr(BoardSession, "_flush", lambda self, buffer, offset, nbytes: None)
    pipeline = open_pipeline(ax_folder, tiny_hf, "resident")
    try:
        with pytest.raises(AssertionError, match="not flushed|flush"):
            greedy(pipeline, pipeline.prepare("Where was this photo taken?"), 2)
    finally:
        pipeline.close()


def test_a_row_written_where_it_does_not_belong_changes_the_answer(ax_folder, tiny_hf, axengine, monkeypatch):
    """The emulation is not blind: a K/V row copied to the wrong position makes another answer."""
    copy = open_pipeline(ax_folder, tiny_hf, "copy")
    request = copy.prepare("Where was this photo taken?")
    expected = greedy(copy, request)
    copy.close()
    real_copy = BoardSession.copy
    monkeypatch.setattr(
        BoardSession, "copy", lambda self, s, so, t, to, n: real_copy(self, s, so, t, max(0, to - n), n)
    )
    resident = open_pipeline(ax_folder, tiny_hf, "resident")
    try:
        assert greedy(resident, request) != expected
    finally:
        resident.close()


def test_an_older_cache_is_refused_once_a_newer_answer_took_the_buffers(ax_folder, tiny_hf, axengine):
    pipeline = open_pipeline(ax_folder, tiny_hf, "resident")
    backend = pipeline.backend
    try:
        old = backend.new_cache()
        backend.new_cache()
        with pytest.raises(BackendError, match="newer answer"):
            backend.decode_layers(np.zeros((1, 1, backend.hidden_size), np.float32), 0, old)
        with pytest.raises(BackendError, match="every layer at once"):
            backend.decode(0, np.zeros((1, 1, backend.hidden_size), np.float32), 0, backend.new_cache())
    finally:
        pipeline.close()


def _rename(cls, old: str, new: str):
    init = cls.__init__

    def renamed(self, *args, **kwargs):
        init(self, *args, **kwargs)
        setattr(self, new, getattr(self, old))
        delattr(self, old)

    return renamed


DIFFERENCES = [  # each one the path needs and pyaxengine's own run() does not, so copy still answers
    ("board", "missing name"),
    ("board", "renamed attribute"),
    ("board", "struct field"),
    ("card", "small buffer"),
]


@pytest.mark.parametrize(("where", "difference"), DIFFERENCES)
def test_a_runtime_that_differs_falls_back_to_copy_with_one_line(
    where, difference, ax_folder, tiny_hf, media_dir, axengine, monkeypatch, caplog
):
    monkeypatch.setattr(axengine, "AVAILABLE", [PROVIDERS[where]])
    importlib.import_module("axengine._axe")  # what the first session imports, before anything below changes
    board = importlib.import_module("axengine._axe_capi")
    card = importlib.import_module("axengine._axclrt_capi")
    if difference == "missing name":  # pyaxengine's sessions import sys_lib, engine_cffi and engine_lib only
        monkeypatch.delattr(board, "sys_cffi")
        named = "axengine._axe_capi has no attribute sys_cffi"
    elif difference == "small buffer":  # the IO reports an input buffer a byte short of what a group needs
        get = card.axclrt_lib.axclrtEngineGetInputBufferByIndex

        def short(io, index, pointer, size):
            status = get(io, index, pointer, size)
            size[0] -= index == 0
            return status

        monkeypatch.setattr(card.axclrt_lib, "axclrtEngineGetInputBufferByIndex", short)
        named = "input buffer 0 holds"
    elif difference == "renamed attribute":  # one the session itself no longer uses after loading
        session = importlib.import_module("axengine._axe").AXEngineSession
        monkeypatch.setattr(session, "__init__", _rename(session, "_info", "_io_info"))
        named = "AXEngineSession has no attribute _info"
    else:  # a cffi layer whose IO buffer struct names its size otherwise
        ffi = cffi.FFI()
        ffi.cdef(
            """
            typedef struct { unsigned long long phyAddr; void *pVirAddr; unsigned int nBytes; } AX_ENGINE_IO_BUFFER_T;
            typedef struct { AX_ENGINE_IO_BUFFER_T *pInputs; unsigned int nInputSize;
                             AX_ENGINE_IO_BUFFER_T *pOutputs; unsigned int nOutputSize; } AX_ENGINE_IO_T;
            """
        )
        monkeypatch.setattr(board, "engine_cffi", ffi)
        named = "AX_ENGINE_IO_BUFFER_T lacks the field(s) nSize"
    caplog.set_level(logging.INFO, logger="batch.infer.runtime.axengine_backend")
    pipeline = open_pipeline(ax_folder, tiny_hf, "resident")
    try:
        assert pipeline.backend.npu_io == "copy"
        lines = npu_io_lines(caplog)
        assert len(lines) == 1 and named in lines[0] and "decoding with copy" in lines[0], lines
        assert "pyaxengine" in lines[0]
        assert len(greedy(pipeline, pipeline.prepare("Describe the image.", [media_dir / "square.png"]), 4)) == 4
    finally:
        pipeline.close()
    assert axengine.memory.errors == []


def test_auto_takes_resident_after_its_self_check(device, ax_folder, tiny_hf, axengine, caplog):
    caplog.set_level(logging.INFO, logger="batch.infer.runtime.axengine_backend")
    pipeline = open_pipeline(ax_folder, tiny_hf, "auto")
    try:
        assert pipeline.backend.npu_io == "resident"
        assert any("npu_io auto: decoding with the K/V cache resident" in line for line in npu_io_lines(caplog))
    finally:
        pipeline.close()


def test_auto_falls_back_when_the_device_disagrees(ax_folder, tiny_hf, axengine, monkeypatch, caplog):
    """A card whose device-to-device copies report success and copy nothing: the self-check sees other tokens
    than copy's, and the worker decodes with copy."""
    monkeypatch.setattr(axengine, "AVAILABLE", ["AXCLRTExecutionProvider"])
    lib = importlib.import_module("axengine._axclrt_capi").axclrt_lib
    memcpy = lib.axclrtMemcpy

    def lost_on_the_card(target, source, count, kind):
        return 0 if kind == lib.AXCL_MEMCPY_DEVICE_TO_DEVICE else memcpy(target, source, count, kind)

    monkeypatch.setattr(lib, "axclrtMemcpy", lost_on_the_card)
    caplog.set_level(logging.INFO, logger="batch.infer.runtime.axengine_backend")
    pipeline = open_pipeline(ax_folder, tiny_hf, "auto")
    try:
        assert pipeline.backend.npu_io == "copy"
        lines = npu_io_lines(caplog)
        assert len(lines) == 1 and "self-check disagrees" in lines[0], lines
    finally:
        pipeline.close()


def test_closing_gives_every_session_its_own_buffers_back(device, ax_folder, tiny_hf, axengine):
    pipeline = open_pipeline(ax_folder, tiny_hf, "resident")
    layers = pipeline.backend._resident.layers
    own = [[layer.bound._original.get(i) for i in range(5)] for layer in layers]
    assert all(any(b is not None for b in row) for row in own[1:])  # layers after the first read shared buffers
    pipeline.close()
    for layer, before in zip(layers, own, strict=True):
        for index, buffer in enumerate(before):
            if buffer is not None:
                assert layer.bound.input(index) == buffer
    assert axengine.memory.errors == []


def test_npu_io_is_checked_and_refused_for_an_onnxruntime_folder(tiny_onnx):
    from batch.config import ModelConfig
    from batch.infer.runtime.select import open_backend

    with pytest.raises(ValueError, match="npu_io must be copy, resident or auto"):
        ModelConfig(npu_io="fast")
    with pytest.raises(BackendError, match="onnxruntime folder: npu_io resident"):
        open_backend(tiny_onnx, npu_io="resident")


def test_a_card_worker_that_exits_without_closing_frees_each_buffer_once(ax_folder, tiny_hf, tmp_path):
    """pyaxengine unloads every AXCL session at exit and frees whatever buffers its IO points at: the shared
    buffers go back to their sessions first, so nothing is freed twice."""
    import subprocess

    script = tmp_path / "exit_without_close.py"
    script.write_text(
        f"""
import atexit, sys
sys.path[:0] = [{str(DOUBLES)!r}]
import axengine
from axengine import _memory
atexit.register(lambda: print("errors:", _memory.memory.errors))  # runs last: registered first
axengine.AVAILABLE[:] = ["AXCLRTExecutionProvider"]
from batch.infer.pipeline import Pipeline
pipeline = Pipeline.open({str(ax_folder)!r}, hf_dir={str(tiny_hf)!r}, npu_io="resident")
assert pipeline.backend.npu_io == "resident"
print("answered", len(pipeline.ask("Where was this photo taken?").token_ids))
"""
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "answered" in done.stdout and "errors: []" in done.stdout, done.stdout + done.stderr


def test_the_host_cost_benchmark_compares_both_paths_on_both_devices(tiny_onnx, tiny_hf):
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "bench" / "npu_host_cost.py"
    done = subprocess.run(
        [sys.executable, str(bench), str(tiny_onnx), str(tiny_hf), "--steps", "4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = [
        line.split("|")[1:-1]
        for line in done.stdout.splitlines()
        if line.startswith("| board") or line.startswith("| card")
    ]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("board", "copy"),
        ("board", "resident"),
        ("card", "copy"),
        ("card", "resident"),
    ]
    copied = {(r[0].strip(), r[1].strip()): float(r[2]) + float(r[5]) for r in rows}  # memmove + host-to-card
    assert copied["board", "resident"] < copied["board", "copy"] and copied["card", "resident"] < copied["card", "copy"]
    assert done.stdout.count("greedy tokens equal") == 2


@pytest.fixture(scope="module")
def small_cache_folder(tiny_onnx_npu: Path, tmp_path_factory) -> Path:
    """128-token chunks, 2 of them, and a 300-row cache: a 256-token prompt leaves 44 rows to decode into."""
    return build_axmodel_folder(tiny_onnx_npu, tmp_path_factory.mktemp("ax300"), CHUNK, 2, 300)


def test_decoding_to_the_last_row_of_the_cache_equals_copy(device, small_cache_folder, tiny_hf, axengine):
    request = Request(np.random.default_rng(5).integers(0, 1000, 2 * CHUNK), None, None, 0.0)
    settings = GenerationSettings(max_new_tokens=1000, ignore_eos=True)
    answers = {}
    for npu_io in ("copy", "resident"):
        pipeline = open_pipeline(small_cache_folder, tiny_hf, npu_io)
        try:
            answers[npu_io] = pipeline.answer(request, settings)
        finally:
            pipeline.close()
    copy, resident = answers["copy"], answers["resident"]
    assert resident.token_ids == copy.token_ids and resident.finish_reason == copy.finish_reason == "length"
    assert len(copy.token_ids) == 300 - 2 * CHUNK + 1  # every row of the cache, then the token after the last


REFUSALS = [  # (device, the C function that refuses once, the call it refuses, its status)
    ("board", "AX_ENGINE_RunGroupIOSync", 40, 0x80060001),  # a run in the first answer's decode
    ("card", "axclrtEngineExecute", 40, 0x80060001),
    ("card", "axclrtMemcpy", 30, 0x80030002),  # a row copied on the card (device to device)
]


@pytest.mark.parametrize(("where", "name", "nth", "status"), REFUSALS)
def test_a_step_the_device_refuses_ends_that_answer_and_the_next_one_is_right(
    where, name, nth, status, ax_folder, tiny_hf, axengine, monkeypatch
):
    monkeypatch.setattr(axengine, "AVAILABLE", [PROVIDERS[where]])
    copy = open_pipeline(ax_folder, tiny_hf, "copy")
    request = copy.prepare("Where was this photo taken?")
    expected = greedy(copy, request)
    copy.close()
    capi = importlib.import_module("axengine._axe_capi" if where == "board" else "axengine._axclrt_capi")
    lib = capi.engine_lib if where == "board" else capi.axclrt_lib
    real, calls = getattr(lib, name), {"n": 0}

    def refuses_once(*args):
        if name != "axclrtMemcpy" or args[3] == lib.AXCL_MEMCPY_DEVICE_TO_DEVICE:
            calls["n"] += 1
            if calls["n"] == nth:
                return status
        return real(*args)

    monkeypatch.setattr(lib, name, refuses_once)
    pipeline = open_pipeline(ax_folder, tiny_hf, "resident")
    try:
        with pytest.raises(BackendError, match=f"failed with status 0x{status:08x}"):
            greedy(pipeline, request)
        assert greedy(pipeline, request) == expected
    finally:
        pipeline.close()


def test_a_worker_configured_for_resident_decodes_with_it(axengine, ax_folder, tiny_hf, tmp_path):
    from batch.config import Config, ModelConfig, SpoolConfig
    from batch.service.worker.worker import Worker

    model = ModelConfig(dir=ax_folder, hf_dir=tiny_hf, npu_io="resident")
    worker = Worker.from_config(
        Config(model=model, spool=SpoolConfig(dir=tmp_path / "jobs", database=tmp_path / "v.db"))
    )
    try:
        assert worker.pipeline.backend.npu_io == "resident"
    finally:
        worker.close()


def test_a_set_up_the_card_refuses_falls_back_to_copy(ax_folder, tiny_hf, axengine, monkeypatch, caplog):
    """One refused repointing of an input while the path is set up: no exception out of the open, one line, copy."""
    monkeypatch.setattr(axengine, "AVAILABLE", [PROVIDERS["card"]])
    lib = importlib.import_module("axengine._axclrt_capi").axclrt_lib
    real, calls = lib.axclrtEngineSetInputBufferByIndex, {"n": 0}
    setting_up = {"on": False}

    def refuses_the_third(*args):
        calls["n"] += setting_up["on"]
        return 0x80030001 if setting_up["on"] and calls["n"] == 3 else real(*args)

    monkeypatch.setattr(lib, "axclrtEngineSetInputBufferByIndex", refuses_the_third)
    init = ResidentLayers.__init__

    def watched(self, *args):
        setting_up["on"] = True
        try:
            init(self, *args)
        finally:
            setting_up["on"] = False

    monkeypatch.setattr(ResidentLayers, "__init__", watched)
    caplog.set_level(logging.INFO, logger="batch.infer.runtime.axengine_backend")
    for npu_io in ("resident", "auto"):
        caplog.clear()
        calls["n"] = 0
        pipeline = open_pipeline(ax_folder, tiny_hf, npu_io)
        try:
            assert pipeline.backend.npu_io == "copy"
            lines = npu_io_lines(caplog)
            assert len(lines) == 1 and "setting the resident path up failed" in lines[0], lines
            assert len(greedy(pipeline, pipeline.prepare("Where was this photo taken?"), 4)) == 4
        finally:
            pipeline.close()
    assert axengine.memory.errors == []


def test_auto_fits_its_self_check_into_a_small_cache(device, tiny_onnx_npu, tiny_hf, axengine, tmp_path):
    folder = build_axmodel_folder(tiny_onnx_npu, tmp_path, CHUNK, 1, CHUNK + 1)  # one chunk, one row to decode into
    pipeline = open_pipeline(folder, tiny_hf, "auto")
    try:
        assert pipeline.backend.npu_io == "resident"
    finally:
        pipeline.close()


def test_a_model_that_fails_to_open_gives_the_npu_its_memory_back(ax_folder, tiny_hf, axengine, tmp_path):
    import gc
    import shutil

    from axengine._memory import cmm

    broken = shutil.copytree(tiny_hf, tmp_path / "hf")
    (broken / "tokenizer.json").write_text("{not json")
    gc.collect()
    before = len(cmm._by_phy)
    for _ in range(2):
        with pytest.raises(Exception):  # noqa: B017 - whatever the tokenizer library raises
            open_pipeline(ax_folder, broken, "resident")
    gc.collect()
    assert len(cmm._by_phy) == before


def test_a_calibration_is_kept_per_npu_io(ax_folder, tiny_hf):
    from batch.config import ModelConfig
    from batch.service.reports.calibrate import cache_file, this_machine

    copy, resident = (
        this_machine(ModelConfig(dir=ax_folder, hf_dir=tiny_hf, npu_io=io)) for io in ("copy", "resident")
    )
    assert (copy.npu_io, resident.npu_io) == ("copy", "resident") and "npu_io resident" in resident.describe()
    assert cache_file("m@1", copy) != cache_file("m@1", resident)
