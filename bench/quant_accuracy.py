"""How far quantized exports move the first-token logits at real shape, against fp32 on the same prompt.

    python bench/quant_accuracy.py models/real-shape-fp32 models/real-shape-int8 models/real-shape-int4

Prints the cosine similarity and max |diff| of each export's logits against the first folder's, and, as a
yardstick, what 0.1% multiplicative noise on the input embeddings does to the first folder itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from batch.infer.generate import prefill
from batch.infer.pipeline import Pipeline


def first_logits(folder: Path, ids: np.ndarray, noise: float = 0.0) -> np.ndarray:
    pipeline = Pipeline.open(folder, threads=2)
    embeds = np.asarray(pipeline.embeddings[ids], dtype=np.float32)
    embeds = embeds * (1 + noise * np.random.default_rng(1).standard_normal(embeds.shape).astype(np.float32))
    logits = pipeline.backend.logits(prefill(pipeline.backend, embeds, pipeline.backend.new_cache()))
    pipeline.close()
    return logits


def compare(name: str, a: np.ndarray, b: np.ndarray) -> None:
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    same = a.argmax() == b.argmax()
    print(f"{name:<40} cosine {cosine:.4f}  max |diff| {np.abs(a - b).max():.3f}  same top-1 {same}")


def main() -> None:
    reference, *others = [Path(p) for p in sys.argv[1:]]
    ids = np.random.default_rng(0).integers(0, 1000, 128)
    base = first_logits(reference, ids)
    compare(f"{reference.name} + 0.1% input noise", base, first_logits(reference, ids, noise=1e-3))
    for folder in others:
        compare(folder.name, base, first_logits(folder, ids))


if __name__ == "__main__":
    main()
