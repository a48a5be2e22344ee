"""Where the decoder layers' time goes in decode steps, per kind of node, from onnxruntime's own profiler.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/node_profile.py models/real-shape-int4 --context 128 --steps 24

Prefills a prompt of --context tokens, decodes --steps tokens, and sums each layer session's kernel times by
operator type over the decode steps only (ms per token, nodes per layer, µs per node). The profiler's own cost is
in the figures, so compare them with each other (two contexts, fused attention or not: VLBATCH_FUSED_ATTENTION),
not with tokens/s measured without it.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import batch.infer.runtime.onnx_backend as onnx_backend  # noqa: E402
from batch.infer.generate import decode_one_token, num_chunks, prefill  # noqa: E402
from batch.infer.pipeline import Pipeline  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        plain = onnx_backend.session_options

        def profiled(threads: int | None = None):  # noqa: ANN202 - onnxruntime's SessionOptions
            options = plain(threads)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(folder) / "layer")
            return options

        onnx_backend.session_options = profiled
        pipeline = Pipeline.open(args.model_dir, threads=args.threads)
        backend, table = pipeline.backend, pipeline.embeddings
        cache = backend.new_cache()
        prefill(backend, np.asarray(table[np.arange(args.context) % len(table)], np.float32), cache)
        for i in range(args.steps):
            decode_one_token(backend, table[i][None, None].astype(np.float32), cache)
        chunks = num_chunks(args.context, backend.chunk_len)
        spent, count = collections.defaultdict(float), collections.Counter()
        for session in backend._layers:
            events = json.loads(Path(session.end_profiling()).read_text())
            runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
            decode_from = runs[chunks]  # each layer ran once per prompt chunk, then once per step
            for event in events:
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= decode_from:
                    spent[event["args"]["op_name"]] += event["dur"]
                    count[event["args"]["op_name"]] += 1
    layers = backend.num_layers
    print(f"{args.model_dir.name}, {args.context} tokens of context, {args.steps} decode steps, {layers} layers")
    print(f"fused attention: {'on' if getattr(backend, 'fused_attention', False) else 'off'}")
    print(f"all nodes: {sum(spent.values()) / args.steps / 1e3:.2f} ms per token")
    for op, us in sorted(spent.items(), key=lambda item: -item[1]):
        per_layer = count[op] / args.steps / layers
        print(f"  {op:<34} {us / args.steps / 1e3:6.2f} ms  {per_layer:4.1f} per layer  {us / count[op]:7.1f} µs each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
