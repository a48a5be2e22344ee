"""Experiment: the ViT with int8 dynamic quantization (onnxruntime quantize_dynamic) against fp32, one tile.

    python bench/vit_int8.py models/real-shape-fp32/vit.onnx [--threads 2]

Prints ms per 448 tile for both and the cosine similarity of their features on a random tile. Not used by
the exporter: on random weights the features drift too far (see README, Performance).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vit", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tile = np.random.default_rng(0).standard_normal((1, 3, 448, 448)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / "vit-int8.onnx"
        quantize_dynamic(args.vit, quantized, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        features = {}
        for name, path in (("fp32", args.vit), ("int8 dynamic", quantized)):
            s = session(path, args.threads)
            s.run(None, {"image": tile})
            t = time.perf_counter()
            features[name] = s.run(None, {"image": tile})[0].ravel()
            print(f"{name:<14} {(time.perf_counter() - t) * 1e3:7.0f} ms per tile")
    a, b = features.values()
    print(f"cosine {float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)):.3f}")


if __name__ == "__main__":
    main()
