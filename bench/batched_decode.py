"""What decoding several captions together could gain: the language model's matrix products at 1, 2 and 4 rows.

    python bench/batched_decode.py models/real-shape-int4 [--rows 1 2 4] [--steps 30] [--threads 2]

A decode step reads every weight once whether it multiplies one token's row or several, so B sequences decoded
together would cost one weight read per step instead of B. This script takes the matrix products of every
decoder layer and of lm_head from an export (the MatMulNBits nodes with their weights, nothing else), runs them
for B rows at once as one step would, and prints ms per step and the aggregate tokens/s against one row. It
leaves out what would not be shared (attention over each sequence's own cache, norms, sampling), so the figures
are an upper bound on the gain.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batch.infer.runtime.onnx_backend import read_manifest  # noqa: E402
from batch.model.ort_options import session_options  # noqa: E402


def matmuls_only(path: Path) -> onnx.ModelProto:
    """The graph's MatMulNBits nodes, each fed from an input of its own width, all outputs kept."""
    model = onnx.load(path)
    initializers = {t.name: t for t in model.graph.initializer}
    nodes, used, widths = [], [], set()
    for i, node in enumerate(n for n in model.graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        widths.add(attrs["K"])
        inputs = [f"x{attrs['K']}", *node.input[1:]]
        nodes.append(helper.make_node("MatMulNBits", inputs, [f"y{i}"], domain=node.domain, **attrs))
        used += [initializers[name] for name in node.input[1:] if name in initializers]
    if not nodes:
        sys.exit(f"{path}: no MatMulNBits nodes (export with --weights int4 or int8)")
    graph = helper.make_graph(
        nodes,
        "matmuls",
        [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["rows", k]) for k in sorted(widths)],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(nodes))],
        used,
    )
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import onnxruntime as ort

    files = read_manifest(args.model_dir)["files"]
    options = session_options(args.threads)
    sessions = [
        ort.InferenceSession(matmuls_only(args.model_dir / name).SerializeToString(), options)
        for name in [*files["layers"], files["post"]]
    ]
    rng = np.random.default_rng(0)
    per_step: dict[int, float] = {}
    for rows in args.rows:
        feeds = [
            {i.name: rng.standard_normal((rows, int(i.name[1:])), dtype=np.float32) for i in s.get_inputs()}
            for s in sessions
        ]
        times = []
        for step in range(args.steps + 3):
            started = time.perf_counter()
            for session, feed in zip(sessions, feeds, strict=True):
                session.run(None, feed)
            if step >= 3:  # the first steps warm the caches
                times.append(time.perf_counter() - started)
        per_step[rows] = float(np.median(times)) * 1e3
    base = per_step[args.rows[0]] / args.rows[0]
    print(
        f"{args.model_dir.name}: matrix products of {len(files['layers'])} layers and lm_head, {args.threads} threads"
    )
    for rows, ms in per_step.items():
        print(
            f"  {rows} rows: {ms:6.2f} ms per step, {1e3 * rows / ms:6.1f} tokens/s together (x{base * rows / ms:.2f})"
        )


if __name__ == "__main__":
    main()
