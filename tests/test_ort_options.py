"""Every onnxruntime session of a process shares one memory arena (batch/model/ort_options.py).

Each case runs in a fresh interpreter: the shared thread pool and arena are made once per process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SESSIONS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from batch.model import ort_options

    if sys.argv[1] == "other-code-first":  # an arena registered by other code before vlbatch's first session
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory, None)
    # a session whose one intermediate tensor is 64 MB: ones expanded to 2048 x 8192, then summed
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2048, 8192])
    graph = helper.make_graph(
        [
            helper.make_node("Expand", ["x", "shape"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0),
        ],
        "big_intermediate",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


    def options():
        if sys.argv[1] != "own-arenas":
            return ort_options.session_options(1)
        ort_options.session_options(1)  # the shared thread pool, which every session of the process must use
        own = ort.SessionOptions()
        own.use_per_session_threads = False
        return own


    sessions = [ort.InferenceSession(model, options(), providers=["CPUExecutionProvider"]) for _ in range(8)]
    resident = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
    before = resident()
    for session in sessions:
        assert session.run(None, {"x": np.ones(1, np.float32)})[0] > 0
    print((resident() - before) / 2**20)
    """
)


def grown_mb(case: str) -> float:
    """How much the resident memory of a fresh process grows while eight sessions each run a 64 MB intermediate."""
    done = subprocess.run([sys.executable, "-c", SESSIONS, case], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_sessions_share_one_arena_so_their_intermediates_are_held_once():
    shared, own = grown_mb("shared"), grown_mb("own-arenas")
    assert own > 6 * 64  # each session's arena keeps its own 64 MB
    assert shared < 3 * 64  # one arena hands the same buffers to every session in turn


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_an_arena_registered_by_other_code_is_shared_instead():
    assert grown_mb("other-code-first") < 3 * 64
