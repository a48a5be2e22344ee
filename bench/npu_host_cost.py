"""Host-side cost of the NPU path per decode step, through the axengine test double at the real shapes.

    python bench/npu_host_cost.py EXPORT_DIR HF_DIR [--steps 16]

EXPORT_DIR is a real-shape `vlbatch export` (the double runs its graphs on onnxruntime); the double declares
the published InternVL3-2B axmodel shapes (KV cache 2559 x 256 bf16 per layer, 128-token chunks, 9 chunks).
Prints, per decoded token, the bytes handed to run() (the runtime copies each fed array to the device) and
the Python time spent outside run().
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "doubles"), str(REPO / "tests")]

import axengine  # noqa: E402  (the double)
from axmodel_folder import build_axmodel_folder  # noqa: E402

from batch.infer.generate import Timings  # noqa: E402
from batch.infer.pipeline import Pipeline, Request  # noqa: E402
from batch.infer.settings import GenerationSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()

    inside = {"s": 0.0, "bytes": 0, "calls": 0}
    run = axengine.InferenceSession.run

    def counted(self, output_names, input_feed, run_options=None, shape_group=0):
        if shape_group == 0 and "_l" in self._name:
            inside["bytes"] += sum(a.nbytes for a in input_feed.values())
            inside["calls"] += 1
        t = time.perf_counter()
        try:
            return run(self, output_names, input_feed, run_options, shape_group)
        finally:
            inside["s"] += time.perf_counter() - t

    axengine.InferenceSession.run = counted
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_axmodel_folder(args.export_dir, Path(tmp), chunk=128, prefill_chunks=9, kv=2559)
        pipeline = Pipeline.open(folder, hf_dir=args.hf_dir)
        request = Request(np.random.default_rng(0).integers(0, 1000, 100), None, None, 0.0)
        timings = Timings()
        steps = pipeline.steps(request, GenerationSettings(max_new_tokens=args.steps + 1, ignore_eos=True), timings)
        next(steps)  # prefill: not counted
        inside.update(s=0.0, bytes=0, calls=0)
        t = time.perf_counter()
        for _ in steps:
            pass
        wall = time.perf_counter() - t
        pipeline.close()
    n = args.steps
    print(f"decode steps: {n}, layer calls per step: {inside['calls'] / n:.0f}")
    print(f"bytes fed to run() per step: {inside['bytes'] / n / 1e6:.1f} MB")
    print(f"Python time outside run() per step: {(wall - inside['s']) / n * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
