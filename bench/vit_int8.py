"""Experiment: the ViT's time per 448 tile on onnxruntime's CPU provider, and its features against a reference.

    python bench/vit_int8.py export HF_DIR OUT_DIR
    python bench/vit_int8.py time A.onnx [B.onnx ...] [--reps 5] [--tiles 1] [--threads 2] [--profile]

`export` writes only the ViT of `vlbatch export`: OUT_DIR/fp32/vit.onnx, and OUT_DIR/int8/vit.onnx quantized and
checked against VIT_INT8_MIN_COSINE as `--vit-weights int8` does (it prints the cosine). `time` runs the models
in one process, in turn, `--reps` times each (the machine drifts between runs, so compare within a run), with
the runtime's session options; it prints wall and process CPU ms per tile (CPU time / threads is the wall time
an idle machine would give), each model's cosine against the first's on the export's check tiles, and with
`--profile` onnxruntime's per-node times summed by operator.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from batch.model.export.exporter import _cosine, _quantize_vit, _save, check_tiles
from batch.model.ort_options import session_options


def export(hf_dir: Path, out_dir: Path) -> None:
    from batch.model.checkpoint import Checkpoint
    from batch.model.export.graphs import vit_graph

    ckpt = Checkpoint(hf_dir)
    ckpt.check_complete()
    fp32, int8 = out_dir / "fp32", out_dir / "int8"
    for folder in (fp32, int8):
        folder.mkdir(parents=True, exist_ok=True)
    _save(vit_graph(ckpt.spec, ckpt.tensor), fp32 / "vit.onnx")
    for name in ("vit.onnx", "vit.onnx.data"):
        if (fp32 / name).exists():
            shutil.copyfile(fp32 / name, int8 / name)
    cosine = _quantize_vit(int8 / "vit.onnx", ckpt.spec.vision.image_size)
    print(f"{int8 / 'vit.onnx'}: int8 cosine {cosine:.5f} against fp32 on the check tiles")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _op_totals(profile: str) -> collections.Counter[str]:
    """Microseconds per operator type over every run the profile holds."""
    totals: collections.Counter[str] = collections.Counter()
    events = json.loads(Path(profile).read_text())
    Path(profile).unlink()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    return totals


def time_models(models: list[Path], reps: int, tiles: int, threads: int, profile: bool) -> None:
    sessions: dict[Path, Any] = {}
    for model in models:
        options = session_options(threads)
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"vit_int8_{len(sessions)}")
        sessions[model] = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    check = check_tiles(448, 4)
    feed = {"image": check_tiles(448, tiles)}
    features = {m: np.concatenate([s.run(None, {"image": t[None]})[0] for t in check]) for m, s in sessions.items()}
    for s in sessions.values():
        s.run(None, feed)  # warm at the timed batch size
    wall, cpu = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(reps):
        for model, s in sessions.items():
            c, t = _cpu_seconds(), time.perf_counter()
            s.run(None, feed)
            wall[model].append((time.perf_counter() - t) * 1e3 / tiles)
            cpu[model].append((_cpu_seconds() - c) * 1e3 / tiles)
    first = features[models[0]]
    for model in models:
        print(
            f"{model}: wall min {min(wall[model]):.0f} median {np.median(wall[model]):.0f} ms/tile "
            f"({', '.join(f'{v:.0f}' for v in wall[model])}); CPU median {np.median(cpu[model]):.0f} ms/tile; "
            f"cosine vs first {_cosine(features[model], first):.5f}"
        )
    if profile:
        runs = (reps + 1) * tiles + len(check)  # every run the profile saw, in tiles
        for model, s in sessions.items():
            totals = _op_totals(s.end_profiling())
            print(f"== {model}: node time {sum(totals.values()) / runs / 1e3:.0f} ms/tile")
            for op, us in totals.most_common():
                print(f"   {op:<26} {us / runs / 1e3:8.1f} ms/tile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write OUT_DIR/fp32/vit.onnx and OUT_DIR/int8/vit.onnx from HF_DIR")
    exp.add_argument("hf_dir", type=Path)
    exp.add_argument("out_dir", type=Path)
    tim = sub.add_parser("time", help="time ViT graphs in one process, in turn")
    tim.add_argument("models", type=Path, nargs="+")
    tim.add_argument("--reps", type=int, default=5)
    tim.add_argument("--tiles", type=int, default=1, help="tiles per session.run")
    tim.add_argument("--threads", type=int, default=2)
    tim.add_argument("--profile", action="store_true", help="onnxruntime's per-node times, summed by operator")
    args = parser.parse_args()
    if args.command == "export":
        export(args.hf_dir, args.out_dir)
    else:
        time_models(args.models, args.reps, args.tiles, args.threads, args.profile)


if __name__ == "__main__":
    main()
