"""How far quantized exports, or a 16-bit K/V history, move the logits at real shape, against the first folder.

    python bench/quant_accuracy.py models/real-shape-fp32 models/real-shape-int8 models/real-shape-int4
    python bench/quant_accuracy.py models/real-shape-fp32-fp32cache models/real-shape-fp32   # the fp16 history

Each folder prefills the same 400-token prompt (four chunks), then decodes --steps tokens fed the first folder's
greedy choices (teacher forcing: every step compares logits over the same context). Prints, per folder, the
cosine similarity and max |diff| of its logits against the first folder's (first token, and the worst step), and
on how many steps the greedy token is the same; as a yardstick, what 0.1% multiplicative noise on the input
embeddings does to the first folder itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from batch.infer.generate import decode_one_token, prefill
from batch.infer.pipeline import Pipeline

PROMPT_TOKENS = 400


def all_logits(folder: Path, ids: np.ndarray, fed: list[int] | None, steps: int, noise: float = 0.0) -> np.ndarray:
    """(steps + 1, vocab) logits: after the prompt, then after each fed token (the greedy ones where fed is None)."""
    pipeline = Pipeline.open(folder, threads=2)
    backend, table = pipeline.backend, pipeline.embeddings
    embeds = np.asarray(table[ids], dtype=np.float32)
    embeds = embeds * (1 + noise * np.random.default_rng(1).standard_normal(embeds.shape).astype(np.float32))
    cache = backend.new_cache()
    rows = [backend.logits(prefill(backend, embeds, cache))]
    for i in range(steps):
        token = fed[i] if fed is not None else int(rows[-1].argmax())
        rows.append(decode_one_token(backend, table[token][None, None].astype(np.float32), cache))
    pipeline.close()
    return np.stack(rows)


def compare(name: str, a: np.ndarray, b: np.ndarray) -> None:
    cosines = np.einsum("sv,sv->s", a, b) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    diffs = np.abs(a - b).max(axis=1)
    same = int((a.argmax(1) == b.argmax(1)).sum())
    print(
        f"{name:<36} first token: cosine {cosines[0]:.4f}, max |diff| {diffs[0]:.3f};  worst step: cosine "
        f"{cosines.min():.4f}, max |diff| {diffs.max():.3f};  same greedy token {same}/{len(a)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("others", type=Path, nargs="+")
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    ids = np.random.default_rng(0).integers(0, 1000, PROMPT_TOKENS)
    base = all_logits(args.reference, ids, None, args.steps)
    fed = [int(t) for t in base.argmax(1)[:-1]]
    scale = float(np.abs(base).max())
    print(f"{args.reference.name}: logits within +-{scale:.1f}; {PROMPT_TOKENS}-token prompt, {args.steps} steps")
    compare(f"{args.reference.name} + 0.1% input noise", base, all_logits(args.reference, ids, fed, args.steps, 1e-3))
    for folder in args.others:
        compare(folder.name, base, all_logits(folder, ids, fed, args.steps))


if __name__ == "__main__":
    main()
