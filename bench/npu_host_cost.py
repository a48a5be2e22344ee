"""Host-side cost of the NPU path per decoded token, copy against resident, through the axengine test double.

    python bench/npu_host_cost.py EXPORT_DIR HF_DIR [--steps 16] [--context 100]

EXPORT_DIR is a real-shape `vlbatch export` (the double runs its graphs on onnxruntime, with decoder layers of the
NPU files' contract written from HF_DIR's weights when the export's own are format 3's); the double declares the
published InternVL3-2B axmodel shapes (KV cache 2559 x 256 bf16 per layer, 128-token chunks, 9 chunks) and
emulates the memory the runtime drives: a board's cached CMM buffers (AxEngineExecutionProvider) and an AXCL
card's device memory (AXCLRTExecutionProvider). For each provider and `model.npu_io` it prints, per decoded token:

- bytes the CPU copies into the NPU's buffers (memmove on a board, host-to-device over PCIe on a card),
- bytes flushed from and invalidated in the CPU cache (a board), bytes read back to the host (a card),
- bytes copied device-to-device on a card,
- host milliseconds per token: wall time minus the time inside the emulated engine's runs. The emulation's
  flushes and invalidates are plain copies on this machine (a real cache sweep costs more per byte on the
  board's Cortex-A55), so this is this machine's Python and copying, not a board's figure.
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
from format2 import write_format2  # noqa: E402

from batch.infer.pipeline import Pipeline, Request  # noqa: E402
from batch.infer.runtime.onnx_backend import read_manifest  # noqa: E402
from batch.infer.settings import GenerationSettings  # noqa: E402
from batch.infer.timings import Timings  # noqa: E402
from batch.model.export.manifest import FIRST_HEAD_MAJOR_VERSION  # noqa: E402

PROVIDERS = {"board": "AxEngineExecutionProvider", "card": "AXCLRTExecutionProvider"}
COLUMNS = ("copied", "flushed", "invalidated", "h2d", "d2h", "d2d")
SPENT = {"s": 0.0}  # seconds inside the emulated engines' runs


def _time_runs() -> None:
    """Wrap the emulated engines' run calls so the time inside them (the NPU's work) can be taken off."""
    from axengine import _axclrt_capi, _axe_capi

    for lib, name in (
        (_axe_capi.engine_lib, "AX_ENGINE_RunGroupIOSync"),
        (_axe_capi.engine_lib, "AX_ENGINE_RunSyncV2"),
        (_axclrt_capi.axclrt_lib, "axclrtEngineExecute"),
    ):
        inner = getattr(lib, name)

        def timed(*args, _inner=inner):
            t = time.perf_counter()
            try:
                return _inner(*args)
            finally:
                SPENT["s"] += time.perf_counter() - t

        setattr(lib, name, timed)


def measure(folder: Path, hf_dir: Path, provider: str, npu_io: str, steps: int, context: int) -> dict[str, float]:
    axengine.AVAILABLE[:] = [provider]
    pipeline = Pipeline.open(folder, hf_dir=hf_dir, npu_io=npu_io)
    try:
        assert pipeline.backend.npu_io == npu_io, f"{npu_io} fell back to {pipeline.backend.npu_io}"
        request = Request(np.random.default_rng(0).integers(0, 1000, context), None, None, 0.0)
        settings = GenerationSettings(max_new_tokens=steps + 1, ignore_eos=True)
        run = pipeline.steps(request, settings, Timings())
        next(run)  # the prefill and first token: not counted
        axengine.memory.reset()
        SPENT["s"] = 0.0
        t = time.perf_counter()
        tokens = [step.token for step in run]
        wall = time.perf_counter() - t
    finally:
        pipeline.close()
    stats = {name: getattr(axengine.memory, name) / steps for name in COLUMNS}
    stats["host_ms"] = (wall - SPENT["s"]) / steps * 1e3
    stats["tokens"] = tokens  # type: ignore[assignment]
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--context", type=int, default=100, help="prompt tokens before the decoded ones")
    args = parser.parse_args()
    _time_runs()
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = args.export_dir
        if read_manifest(export_dir)["version"] >= FIRST_HEAD_MAJOR_VERSION:  # layers of the NPU files' contract
            export_dir = write_format2(args.hf_dir, export_dir, Path(tmp) / "npu-contract")
        folder = build_axmodel_folder(export_dir, Path(tmp) / "ax", chunk=128, prefill_chunks=9, kv=2559)
        rows = []
        for where, provider in PROVIDERS.items():
            results = {
                io: measure(folder, args.hf_dir, provider, io, args.steps, args.context) for io in ("copy", "resident")
            }
            same = results["copy"]["tokens"] == results["resident"]["tokens"]
            for io, stats in results.items():
                rows.append((where, io, stats, same))
    print(f"per decoded token, {args.steps} tokens after a {args.context}-token prompt (MB = 10^6 bytes)")
    print("| device | npu_io | copied in | flushed | invalidated | host->device | device->host | on device | host ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for where, io, stats, _ in rows:
        cells = " | ".join(f"{stats[c] / 1e6:.4f}" for c in COLUMNS)
        print(f"| {where} | {io} | {cells} | {stats['host_ms']:.2f} |")
    for where in PROVIDERS:
        copy, resident = (next(r[2] for r in rows if r[0] == where and r[1] == io) for io in ("copy", "resident"))
        moved = max(copy["copied"], copy["h2d"]) / max(resident["copied"], resident["h2d"], 1)
        same = next(r[3] for r in rows if r[0] == where)
        faster = copy["host_ms"] / resident["host_ms"]
        verdict = "equal" if same else "DIFFER"
        print(f"{where}: copy/resident bytes copied in x{moved:.0f}, host ms x{faster:.1f}; greedy tokens {verdict}")


if __name__ == "__main__":
    main()
