"""Where one decode step's time goes at real shape: sampling, embedding row, the decoder layers, lm_head.

    python bench/profile_decode.py models/real-shape-int4 [--context 400] [--steps 20]

Also times decoder layer 0 alone, repeated with the same inputs (its weights stay in the CPU caches), to
tell weight streaming from compute.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from batch.infer.generate import prefill
from batch.infer.pipeline import Pipeline
from batch.infer.sampling import make_sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pipeline = Pipeline.open(args.model_dir, threads=args.threads)
    backend = pipeline.backend
    ids = np.random.default_rng(0).integers(0, 1000, args.context)
    cache = backend.new_cache()
    logits = backend.logits(prefill(backend, np.asarray(pipeline.embeddings[ids], dtype=np.float32), cache))
    sample = make_sampler()
    spent = dict.fromkeys(("sampling", "embedding row", "layers", "lm_head"), 0.0)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        token = sample(logits)
        t1 = time.perf_counter()
        hidden = pipeline.embeddings[token][None, None].astype(np.float32)
        t2 = time.perf_counter()
        pos = cache.length
        for layer in range(backend.num_layers):
            hidden = backend.decode(layer, hidden, pos, cache)
        cache.length = pos + 1
        t3 = time.perf_counter()
        logits = backend.logits(hidden)
        t4 = time.perf_counter()
        for name, seconds in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[name] += seconds
    total = sum(spent.values())
    for name, seconds in spent.items():
        print(f"{name:<14} {seconds / args.steps * 1e3:7.2f} ms  {seconds / total * 100:5.1f}%")
    print(f"{'per token':<14} {total / args.steps * 1e3:7.2f} ms  ({args.steps / total:.2f} tokens/s)")

    pos = cache.length
    hidden = pipeline.embeddings[0][None, None].astype(np.float32)
    for _ in range(5):
        backend.decode(0, hidden, pos, cache)
    t = time.perf_counter()
    for _ in range(50):
        backend.decode(0, hidden, pos, cache)
    print(f"layer 0 alone, warm caches: {(time.perf_counter() - t) / 50 * 1e3:.2f} ms per decode step")
    pipeline.close()


if __name__ == "__main__":
    main()
